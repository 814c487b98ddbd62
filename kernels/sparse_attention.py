"""Public block-sparse attention: picks the Triton kernel on CUDA and the reference elsewhere.

`impl` chooses the path: "auto" (Triton for supported CUDA inputs, else the reference), "triton"
(force the kernel; on CPU it needs TRITON_INTERPRET=1) or "reference". With impl="auto" the
environment variable MEMSPARSE_SPARSE_ATTENTION_IMPL (same three values) overrides the choice.
Supported by the kernel: head dims 16/32/64/128, block sizes 16..256 (powers of two), fp16/bf16/fp32;
anything else falls back to the reference with a one-time warning.
`variant` picks an opt-in Hopper-oriented variant of the Triton path (`sparse_attention_hopper`: "persistent" or
"dynamic", "tma", "ws", joined with "+"), "default" the kernels above; left as None it is the environment variable
MEMSPARSE_SPARSE_ATTENTION_VARIANT when set (so a whole model can run a variant unchanged), else "default". The
reference ignores it.
"""

from __future__ import annotations

import os
import warnings

from torch import Tensor

from . import sparse_attention_hopper as _hop
from . import sparse_attention_triton as _tri
from .dispatch import requested_impl
from .sparse_attention_reference import check_sparse_attention_inputs, sparse_attention_reference

ENV_VAR = "MEMSPARSE_SPARSE_ATTENTION_IMPL"
VARIANT_ENV_VAR = "MEMSPARSE_SPARSE_ATTENTION_VARIANT"
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def resolve_impl(q: Tensor, block_size: int, impl: str = "auto") -> str:
    """Which path `sparse_attention` takes for these inputs: "triton" or "reference"."""
    impl = requested_impl(impl, ENV_VAR)
    if impl == "reference":
        return "reference"
    if impl == "auto" and not q.is_cuda:
        return "reference"
    reason = _tri.unsupported_reason(q, block_size)
    if reason is None:
        return "triton"
    if impl == "triton" and (not _tri.HAS_TRITON or (not q.is_cuda and not _tri.interpreting())):
        raise ValueError(f"impl='triton' cannot run here: {reason}")
    _warn_once(f"sparse_attention: using the PyTorch reference ({reason})")
    return "reference"


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: Tensor, *,
                     block_size: int, causal: bool = True, scale: float | None = None, return_lse: bool = False,
                     impl: str = "auto", key_start: Tensor | None = None, shared_keys: int = 0,
                     variant: str | None = None):
    """Block-sparse attention (contract in `sparse_attention_reference`): returns (B, Hq, Lq, D) [, lse].

    q `(B, Hq, Lq, D)`, k/v `(B, Hkv, Lk, D)`, block_indices int `(B, Hkv, ceil(Lq/bs), max_blocks)`
    sorted ascending per row, block_counts `(B, Hkv, ceil(Lq/bs))`. Gradients flow to q, k, v, also
    through the returned lse. `key_start` `(B, Lq)` (optional) masks keys of other documents: query i sees key j
    only when j >= key_start[b, i] or j < shared_keys (the persistent tokens). `variant`: "default" or an opt-in
    variant of the Triton kernels (`sparse_attention_hopper.parse_variant`), e.g. "dynamic+tma", or "auto": "merged"
    with grouped-query heads (Hq > Hkv; 1.10-1.17x the default forward + backward on one H100, docs/kernels.md),
    else "default"; None: the environment variable MEMSPARSE_SPARSE_ATTENTION_VARIANT, else "default".
    """
    check_sparse_attention_inputs(q, k, v, block_indices, block_counts, block_size, key_start, shared_keys)
    if variant is None:
        variant = os.environ.get(VARIANT_ENV_VAR, "").strip() or "default"
    if isinstance(variant, str) and variant.strip().lower() == "auto":
        variant = "merged" if q.shape[1] > k.shape[1] else "default"
    variant_parts = _hop.parse_variant(variant)
    if not (k.device == q.device == v.device == block_indices.device == block_counts.device) or \
            (key_start is not None and key_start.device != q.device):
        raise ValueError("q, k, v, block_indices, block_counts and key_start must be on one device")
    if resolve_impl(q, block_size, impl) == "triton":
        if variant_parts:
            return _hop.sparse_attention_variant(q, k, v, block_indices, block_counts, block_size=block_size,
                                                 variant=variant, causal=causal, scale=scale, return_lse=return_lse,
                                                 key_start=key_start, shared_keys=shared_keys)
        return _tri.sparse_attention_triton(q, k, v, block_indices, block_counts, block_size=block_size,
                                            causal=causal, scale=scale, return_lse=return_lse,
                                            key_start=key_start, shared_keys=shared_keys)
    return sparse_attention_reference(q, k, v, block_indices, block_counts, block_size=block_size,
                                      causal=causal, scale=scale, return_lse=return_lse, key_start=key_start,
                                      shared_keys=shared_keys)
