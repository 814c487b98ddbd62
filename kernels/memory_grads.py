"""Public per-token memory gradients (depth-2 MLP): the Triton kernels on CUDA, the reference elsewhere.

`impl` chooses the path: "auto" (Triton for supported CUDA inputs, else the reference), "triton" (force the
kernels; on CPU they need TRITON_INTERPRET=1) or "reference". With impl="auto" the environment variable
MEMSPARSE_MEMORY_GRADS_IMPL (same values) overrides the choice. On the H100 the compiled write step on the
kernels matches eager PyTorch (relative error 7e-4 in values, 9e-4 in gradients, TF32 matmuls on both sides)
and takes 297 instead of 307 us (benchmarks/results/write_step_kernels_fn.md, write_step_blocked_torch.md).
"""

from __future__ import annotations

from torch import Tensor

from . import memory_grads_triton as _tri
from .dispatch import requested_impl
from .memory_grads_reference import token_gradients_mlp2_reference

ENV_VAR = "MEMSPARSE_MEMORY_GRADS_IMPL"


def resolve_impl(k: Tensor, hidden: int, activation: str, impl: str = "auto") -> str:
    """Which path `token_gradients_mlp2` takes for these inputs: "triton" or "reference"."""
    impl = requested_impl(impl, ENV_VAR)
    if impl == "reference" or (impl == "auto" and not k.is_cuda):
        return "reference"
    reason = _tri.unsupported_reason(k, hidden, activation)
    if reason is None:
        return "triton"
    if impl == "triton":
        raise ValueError(f"impl='triton' cannot run here: {reason}")
    return "reference"


def token_gradients_mlp2(k: Tensor, v: Tensor, w0: Tensor, w1: Tensor, gain: Tensor, activation: str = "silu",
                         impl: str = "auto"):
    """Per-token gradient factors of a depth-2 memory (contract in `token_gradients_mlp2_reference`):
    (acts [k, a1], dzs [dz0, dz1], loss, gnorm). Differentiable (second order) on both paths."""
    B, H, C, D = k.shape
    if v.shape != k.shape or w0.shape[:3] != (B, H, D) or w1.shape != (B, H, w0.shape[-1], D) or \
            gain.shape != (H, D):
        raise ValueError(f"token_gradients_mlp2: shapes k {tuple(k.shape)}, v {tuple(v.shape)}, w0 "
                         f"{tuple(w0.shape)}, w1 {tuple(w1.shape)}, gain {tuple(gain.shape)} do not match")
    if resolve_impl(k, w0.shape[-1], activation, impl) == "triton":
        return _tri.token_gradients_mlp2_triton(k, v, w0, w1, gain)
    if activation != "silu":
        raise ValueError(f"token_gradients_mlp2 computes silu memories, got activation {activation!r}")
    return token_gradients_mlp2_reference(k, v, w0, w1, gain)
