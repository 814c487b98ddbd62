"""Budget policies for block-sparse attention: how many key blocks each query block keeps.

All policies share one interface, `num_blocks(scores, valid, forced, visible_tokens, block_size, scored)`,
returning the total kept count per query block (forced blocks included), and are parsed from a string spec so configs
and command lines can name them: `dense`, `fixed:16`, `length_scaled:c=12,min_tokens=256`,
`top_p:p=0.9,min=2,max=64` (or `min_c=4,max_c=24` for length-scaled bounds).

Causality: a policy may read only what every query of its block may see. `scored` marks the blocks whose
pooled score reads no key after the block's first query (complete past blocks and the persistent sinks; the
diagonal block is forced and carries no score), and `visible_tokens` is counted at the end of the block as if it
were complete, so a block's budget never depends on where the input ends (streaming token by token, any split,
and the one-shot forward keep the same blocks).

Length scaling follows The Sparse Frontier (arXiv 2504.17768): at ~0.2 relative error the kept tokens were
about 1.6K at 16K, 2.2K at 32K, 3.3K at 64K, i.e. roughly c * sqrt(L) with c ~ 12. So the kept fraction
c / sqrt(L) falls as the visible context L grows: short contexts keep nearly everything, long ones far less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class BudgetPolicy:
    """Decides the number of kept key blocks per query block."""

    name = "base"
    reads_scores = False  # whether num_blocks reads `scores` (then select_blocks passes `scored`)

    def num_blocks(self, scores: Tensor, valid: Tensor, forced: Tensor, visible_tokens: Tensor,
                   block_size: int, scored: Tensor | None = None) -> Tensor:
        """scores/valid/forced/scored `(B, H, NQ, NK)`, visible_tokens `(B, H, NQ)` -> kept count `(B, H, NQ)`
        int64. `scored` (default: all valid) marks the blocks whose scores a policy may read.

        The count includes the forced blocks and never exceeds the number of valid blocks.
        """
        raise NotImplementedError

    def spec(self) -> str:
        raise NotImplementedError

    def max_count(self, max_visible_blocks: int, max_visible_tokens: int, max_forced: int, block_size: int) -> int:
        """A host-side upper bound on `num_blocks` (sizes the index lists without a device sync)."""
        return max_visible_blocks


def _clamp_count(count: Tensor, forced: Tensor, valid: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(count, forced.sum(-1)), valid.sum(-1))


@dataclass
class Dense(BudgetPolicy):
    """Every visible block."""

    name = "dense"

    def num_blocks(self, scores, valid, forced, visible_tokens, block_size, scored=None):
        return valid.sum(-1)

    def spec(self) -> str:
        return "dense"


@dataclass
class Fixed(BudgetPolicy):
    """Exactly `k` blocks in total (all when fewer are visible; never fewer than the forced ones)."""

    k: int = 16
    name = "fixed"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"fixed budget k must be >= 1, got {self.k}")

    def num_blocks(self, scores, valid, forced, visible_tokens, block_size, scored=None):
        return _clamp_count(torch.full_like(visible_tokens, self.k, dtype=torch.long), forced, valid)

    def spec(self) -> str:
        return f"fixed:{self.k}"

    def max_count(self, max_visible_blocks, max_visible_tokens, max_forced, block_size):
        return min(max(self.k, max_forced), max_visible_blocks)


def length_scaled_tokens(visible_tokens: Tensor, c: float, min_tokens: int, exponent: float = 0.5) -> Tensor:
    """Kept tokens for a visible context of n tokens: max(min_tokens, c * n**exponent) (capped at n by callers)."""
    return torch.clamp(c * visible_tokens.double().clamp_min(1) ** exponent, min=float(min_tokens))


@dataclass
class LengthScaled(BudgetPolicy):
    """Keep ~ c * sqrt(n) tokens of n visible: kept fraction c / sqrt(n) shrinks as the context grows."""

    c: float = 12.0
    min_tokens: int = 256
    exponent: float = 0.5
    name = "length_scaled"

    def __post_init__(self):
        if self.c <= 0 or self.min_tokens < 0 or not 0 < self.exponent <= 1:
            raise ValueError(f"length_scaled needs c > 0, min_tokens >= 0, 0 < exponent <= 1; got {self}")

    def num_blocks(self, scores, valid, forced, visible_tokens, block_size, scored=None):
        tokens = length_scaled_tokens(visible_tokens, self.c, self.min_tokens, self.exponent)
        count = torch.ceil(tokens / block_size).long()
        return _clamp_count(count, forced, valid)

    def spec(self) -> str:
        return f"length_scaled:c={self.c},min_tokens={self.min_tokens},exponent={self.exponent}"

    def max_count(self, max_visible_blocks, max_visible_tokens, max_forced, block_size):
        tokens = max(self.min_tokens, self.c * max(max_visible_tokens, 1) ** self.exponent)  # monotone in n
        return min(max(math.ceil(tokens / block_size), max_forced), max_visible_blocks)


@dataclass
class TopP(BudgetPolicy):
    """Smallest set of blocks (forced first, then by score) holding mass >= p of the estimated attention.

    Mass is the softmax of the pooled scores over the scored blocks (the visible blocks whose keys all precede
    the block's first query); the unscored diagonal block is forced and takes no share. Bounds: `min`/`max` blocks, or
    length-scaled bounds `min_c`/`max_c` (tokens c * sqrt(n)) when given. `forced_mass=0`: the mass is the softmax
    over the candidate (not forced) blocks only, so a sink block whose pooled score dominates cannot meet p alone
    (trained with the default 1, a toy model's budget collapsed onto its sink and diagonal blocks:
    benchmarks/results/cpu_budget_probe_2026-12-06/).
    """

    p: float = 0.9
    min: int = 1
    max: int | None = None
    min_c: float | None = None
    max_c: float | None = None
    forced_mass: int = 1
    name = "top_p"
    reads_scores = True

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"top_p needs 0 < p <= 1, got {self.p}")
        if self.min < 0 or (self.max is not None and self.max < self.min):
            raise ValueError(f"top_p needs 0 <= min <= max, got min={self.min} max={self.max}")
        if self.forced_mass not in (0, 1):
            raise ValueError(f"top_p needs forced_mass 0 or 1, got {self.forced_mass}")

    def num_blocks(self, scores, valid, forced, visible_tokens, block_size, scored=None):
        scorable = valid if scored is None else valid & scored
        if not self.forced_mass:  # the candidates' mass only: forced blocks are kept but hold no share
            scorable = scorable & ~forced
        s = scores.double().masked_fill(~scorable, -math.inf)
        mass = torch.softmax(s, -1).nan_to_num(0.0)
        forced_mass = (mass * forced).sum(-1)
        # forced blocks are kept first; the others (all scored) greedily by score until the mass reaches p
        rest = mass.masked_fill(forced, 0.0)
        order = torch.sort(s.masked_fill(forced, -math.inf), -1, descending=True).indices
        cum = torch.cumsum(rest.gather(-1, order), -1)
        need = self.p - forced_mass
        extra = (cum < need.unsqueeze(-1) - 1e-9).sum(-1) + 1
        extra = torch.where(need > 1e-9, extra, torch.zeros_like(extra))
        count = forced.sum(-1) + extra
        lo = torch.full_like(count, self.min)
        if self.min_c is not None:
            lo = torch.ceil(length_scaled_tokens(visible_tokens, self.min_c, 0) / block_size).long()
        count = torch.maximum(count, lo)
        if self.max is not None:
            count = torch.minimum(count, torch.full_like(count, self.max))
        if self.max_c is not None:
            hi = torch.ceil(length_scaled_tokens(visible_tokens, self.max_c, 0) / block_size).long()
            count = torch.minimum(count, hi)
        return _clamp_count(count, forced, valid)

    def max_count(self, max_visible_blocks, max_visible_tokens, max_forced, block_size):
        bound = max_visible_blocks
        if self.max is not None:
            bound = min(bound, max(self.max, max_forced))
        if self.max_c is not None:
            hi = math.ceil(self.max_c * max(max_visible_tokens, 1) ** 0.5 / block_size)
            bound = min(bound, max(hi, max_forced))
        return bound

    def spec(self) -> str:
        parts = [f"p={self.p}", f"min={self.min}"]
        for k in ("max", "min_c", "max_c"):
            if getattr(self, k) is not None:
                parts.append(f"{k}={getattr(self, k)}")
        if not self.forced_mass:
            parts.append("forced_mass=0")
        return "top_p:" + ",".join(parts)


_POLICIES = {"dense": Dense, "fixed": Fixed, "length_scaled": LengthScaled, "top_p": TopP}


def parse_policy(spec: str | BudgetPolicy) -> BudgetPolicy:
    """'dense' | 'fixed:16' | 'fixed:k=16' | 'length_scaled:c=12,min_tokens=256' | 'top_p:p=0.9,min=2,max=64'."""
    if isinstance(spec, BudgetPolicy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"budget policy must be a non-empty string, got {spec!r}")
    name, _, args = spec.strip().partition(":")
    if name not in _POLICIES:
        raise ValueError(f"unknown budget policy {name!r}; known: {sorted(_POLICIES)}")
    cls = _POLICIES[name]
    kwargs = {}
    for i, item in enumerate(a for a in args.split(",") if a.strip()):
        key, eq, val = item.partition("=")
        if not eq:  # positional: fixed:16
            key, val = {"fixed": "k", "top_p": "p", "length_scaled": "c"}.get(name, "?"), item
            if i > 0 or key == "?":
                raise ValueError(f"budget policy {spec!r}: write arguments as key=value")
        key = key.strip()
        fields = cls.__dataclass_fields__
        if key not in fields:
            raise ValueError(f"budget policy {name!r} has no argument {key!r}; known: {list(fields)}")
        typ = fields[key].type
        try:
            kwargs[key] = int(val) if typ in ("int", "int | None") else float(val)
        except ValueError:
            raise ValueError(f"budget policy {spec!r}: {key}={val!r} is not a number") from None
    return cls(**kwargs)


def attention_flops(block_counts: Tensor, block_size: int, head_dim: int, q_heads_per_kv: int = 1) -> float:
    """Forward attention FLOPs implied by a selection: 4 * bs^2 * D per kept (query block, key block) pair
    and query head (QK^T and PV; diagonal blocks counted whole). Forward+backward is about 3.5x this."""
    return float(block_counts.double().sum()) * 4.0 * block_size * block_size * head_dim * q_heads_per_kv
