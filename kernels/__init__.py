"""memsparse.kernels: attention, memory-gradient and memory-update kernels, each beside its plain-PyTorch reference.
Imports nothing of memsparse."""

from .block_select import block_pool, causal_selection_queries, kept_fraction, select_blocks
from .budget import BudgetPolicy, Dense, Fixed, LengthScaled, TopP, attention_flops, parse_policy
from .memory_grads import token_gradients_mlp2
from .memory_grads_reference import token_gradients_mlp2_reference
from .sparse_attention import sparse_attention
from .sparse_attention_reference import dense_block_mask, sparse_attention_reference
from .update_coefficients import update_coefficients
from .update_coefficients_reference import update_coefficients_reference

__all__ = [
    "sparse_attention", "sparse_attention_reference", "dense_block_mask",
    "select_blocks", "block_pool", "causal_selection_queries", "kept_fraction",
    "token_gradients_mlp2", "token_gradients_mlp2_reference", "update_coefficients", "update_coefficients_reference",
    "BudgetPolicy", "Dense", "Fixed", "LengthScaled", "TopP", "parse_policy", "attention_flops",
]
