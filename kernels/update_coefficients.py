"""Public chunk-update coefficients of the memory's write (contract: `update_coefficients_reference`).

`impl` chooses the path: "triton" (the kernels of `update_coefficients_triton`: one forward and one backward
launch per chunk step instead of ~20 small ones; on CPU they need TRITON_INTERPRET=1) or "reference". "auto"
takes the reference: on the H100 the kernels were correct but slower than the compiled reference (one program per
row is latency-bound; docs/kernels.md), so they are opt-in (impl="triton", or
MEMSPARSE_UPDATE_COEFFICIENTS_IMPL=triton).
"""

from __future__ import annotations

from torch import Tensor

from . import update_coefficients_triton as _tri
from .dispatch import requested_impl
from .update_coefficients_reference import update_coefficients_reference

ENV_VAR = "MEMSPARSE_UPDATE_COEFFICIENTS_IMPL"


def resolve_impl(gnorm: Tensor, impl: str = "auto") -> str:
    """Which path `update_coefficients` takes for these inputs: "triton" or "reference"."""
    impl = requested_impl(impl, ENV_VAR)
    if impl != "triton":
        return "reference"
    reason = _tri.unsupported_reason(gnorm)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run here: {reason}")
    return "triton"


def update_coefficients(gnorm: Tensor, eta: Tensor, theta: Tensor, alpha: Tensor, gates: Tensor | None,
                        max_grad_norm: float, impl: str = "auto"):
    """gnorm, eta, theta, alpha, gates (or None) `(B, H, C)` -> (c, d `(B, H, C)`, gamma, beta_C, P_C `(B, H)`).
    Differentiable on both paths."""
    shape = gnorm.shape
    if gnorm.dim() != 3 or any(t.shape != shape for t in (eta, theta, alpha)) or \
            (gates is not None and gates.shape != shape):
        raise ValueError(f"update_coefficients: gnorm, eta, theta, alpha and gates must share one (B, H, C) shape, "
                         f"got {[tuple(t.shape) for t in (gnorm, eta, theta, alpha) if t is not None]}"
                         f"{'' if gates is None else ' and gates ' + str(tuple(gates.shape))}")
    if resolve_impl(gnorm, impl) == "triton":
        return _tri.update_coefficients_triton(gnorm, eta, theta, alpha, gates, max_grad_norm)
    return update_coefficients_reference(gnorm, eta, theta, alpha, gates, max_grad_norm)
