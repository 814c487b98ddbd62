"""How many consolidation ("sleep") passes follow an eviction: fixed, or scaled by sequence length."""

from __future__ import annotations

import math

from .config import ConsolidationConfig


def consolidation_passes(cfg: ConsolidationConfig, seq_len: int, window: int, training: bool) -> int:
    """Extra replays of an evicted segment through the write rule.

    Training: `cfg.train_passes` (unrolled, differentiable). Inference: 0 when off, `cfg.passes` when fixed,
    and for "schedule" n(L) = clamp(round(a * log2(L / window)), 0, n_max): none while everything fits in
    the window, one more each time the sequence doubles beyond it (scaled by `a`).
    """
    if training:
        return cfg.train_passes
    if cfg.mode == "off":
        return 0
    if cfg.mode == "fixed":
        return cfg.passes
    if seq_len <= window:
        return 0
    return int(min(max(round(cfg.a * math.log2(seq_len / window)), 0), cfg.n_max))
