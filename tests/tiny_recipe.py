"""The tiny model of the CPU training tests (recipes written by tests/test_train*.py, test_cli_errors.py, ...)."""

from __future__ import annotations


def tiny_model() -> dict:
    """A fresh `model.config` mapping: dim 32, 2 layers, window 64, segments of 32, memory in layer 1."""
    return {
        "dim": 32, "depth": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp_hidden": 64, "block_size": 16,
        "segment": 32, "window": 64, "persistent_tokens": 16, "memory_layers": [1],
        "memory": {"heads": 2, "head_dim": 16, "depth": 1, "chunk_size": 16},
    }
