"""memsparse.kernels: attention kernels, each beside its plain-PyTorch reference. Imports nothing of memsparse."""

from .sparse_attention import sparse_attention
from .sparse_attention_reference import dense_block_mask, sparse_attention_reference

__all__ = ["sparse_attention", "sparse_attention_reference", "dense_block_mask"]
