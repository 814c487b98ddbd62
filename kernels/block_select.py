"""Block selection for sparse attention: pooled-query x pooled-key scores, forced blocks, a budget policy.

Output is already in the kernel's index format (sorted, padded with -1, int32). `impl` picks the path: "torch"
(the default: a chain of ~30 PyTorch ops, any device; its cost is part of every "adaptive" timing) or "triton"
(`block_select_triton`: masks, policy and lists in one launch after the same pooling and score matmul; CUDA, or
CPU under TRITON_INTERPRET=1). "auto" is "torch" until the fused path has been checked and timed on the GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import block_select_triton as _tri
from .budget import BudgetPolicy, parse_policy

IMPLS = ("auto", "torch", "triton")


def block_pool(x: Tensor, block_size: int) -> Tensor:
    """Mean over each block of `block_size` rows: `(B, H, L, D)` -> `(B, H, ceil(L/bs), D)` fp32 (tail averaged)."""
    B, H, L, D = x.shape
    full, tail = divmod(L, block_size)
    # block sums accumulated in fp32 straight from x: no fp32 copy or padded copy of the whole of x
    sums = x[:, :, :full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
    if not tail:
        return sums / block_size
    last = x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32) / tail
    return torch.cat([sums / block_size, last], 2)


def causal_selection_queries(q: Tensor, num_kv_heads: int, block_size: int) -> Tensor:
    """Selection query of each query block: the mean query of the *previous* block (over the GQA group's heads
    and the block's tokens), so a block's selection never depends on its own or later tokens; block 0 uses
    its first query. `(B, Hq, Lq, D)` -> `(B, Hkv, NQ, D)`."""
    B, Hq, Lq, D = q.shape
    qg = q.float().view(B, num_kv_heads, Hq // num_kv_heads, Lq, D).mean(2)
    pooled = block_pool(qg, block_size)
    return torch.cat([qg[:, :, :1], pooled[:, :, :-1]], dim=2)


def resolve_impl(q: Tensor, policy: BudgetPolicy, impl: str = "torch") -> str:
    """Which path `select_blocks` takes: "torch" or "triton". "auto" is the fused kernel for CUDA tensors it
    supports (checked equal to the torch path on an H200, 3.4-12x faster at 8K-32K:
    docs/kernels.md) and "torch" otherwise, the interpreter included. Raises ValueError for an unknown impl or a
    "triton" that cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"select_blocks: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if q.is_cuda and _tri.unsupported_reason(q, policy) is None else "torch"
    if impl != "triton":
        return "torch"
    reason = _tri.unsupported_reason(q, policy)
    if reason is not None:
        raise ValueError(f"select_blocks(impl='triton') cannot run here: {reason}")
    return "triton"


def _raw_scores(q: Tensor, k: Tensor, bs: int, num_kv_heads: int, q_select: Tensor | None,
                k_pool: Tensor | None) -> Tensor:
    """Pooled-query x pooled-key products `(B, Hkv, NQ, NK)`, not yet scaled (both paths: identical scores)."""
    k_pool = block_pool(k, bs) if k_pool is None else k_pool
    q_sel = causal_selection_queries(q, num_kv_heads, bs) if q_select is None else q_select.float()
    return torch.einsum("bhnd,bhkd->bhnk", q_sel, k_pool)


def list_width(policy: BudgetPolicy, nk: int, block_size: int, sink_blocks: int, local_blocks: int,
               max_visible_blocks: int | None = None) -> int:
    """The index lists' width `kmax`, from host-side bounds: no device sync on the hot path (visible tokens are
    counted over complete blocks, one more than the keys present when the queries are not block-aligned)."""
    vis_bound = nk if max_visible_blocks is None else min(nk, max_visible_blocks)
    forced_bound = min(nk, sink_blocks + local_blocks + 1)
    return max(1, min(nk, policy.max_count(vis_bound, (vis_bound + 1) * block_size, forced_bound, block_size)))


def select_blocks(q: Tensor, k: Tensor, *, block_size: int, policy: BudgetPolicy | str, causal: bool = True,
                  sink_blocks: int = 1, local_blocks: int = 1, min_key_block: Tensor | None = None,
                  q_select: Tensor | None = None, max_visible_blocks: int | None = None,
                  return_info: bool = False, min_key: Tensor | None = None, k_pool: Tensor | None = None,
                  impl: str = "torch"):
    """Choose the key blocks of each query block.

    q `(B, Hq, Lq, D)`, k `(B, Hkv, Lk, D)`, queries aligned to the end of the keys. Always kept: the first
    `sink_blocks` key blocks (persistent tokens / sink) and the `local_blocks` most recent visible blocks
    (the diagonal included); then the best-scoring visible blocks until `policy` is met. `min_key_block`
    `(NQ,)` bounds the visible range from below (a sliding window; sinks exempt). `q_select` `(B, Hkv, NQ, D)`
    overrides the selection queries (default `causal_selection_queries`). `max_visible_blocks` (host int, e.g.
    from the window) bounds the list width without a device sync; by default it is the number of key blocks.
    Packed documents: `min_key` `(B, NQ)` (instead of min_key_block) is the first visible non-sink key of each
    query block, not necessarily block-aligned (the later of the window start and the start of the document of
    the block's first query): blocks before its block are never candidates, and the visible tokens are counted
    from it. `k_pool` `(B, Hkv, NK, D)` overrides the pooled keys (the model pools a block's keys of one
    document only).

    Returns block_indices int32 `(B, Hkv, NQ, max_count)` (ascending, padded with -1) and block_counts int32
    `(B, Hkv, NQ)`; with return_info also a dict (visible blocks, forced blocks, scores).

    `impl`: "torch" (default), "triton" (the fused kernel: equal lists, except that among exactly tied scores at
    the cut it keeps the lower index where torch.topk's choice is unspecified) or "auto" (the kernel for supported
    CUDA inputs, else "torch"; `resolve_impl`). The model's choice is `ModelConfig.selection_impl`.
    """
    policy = parse_policy(policy)
    if local_blocks < 1:
        raise ValueError(f"local_blocks must be >= 1 (the diagonal block is always kept), got {local_blocks}")
    if sink_blocks < 0:
        raise ValueError(f"sink_blocks must be >= 0, got {sink_blocks}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv or k.shape[0] != B or k.shape[3] != D or Lq > Lk:
        raise ValueError(f"select_blocks: incompatible q{tuple(q.shape)} and k{tuple(k.shape)}")
    bs = block_size
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    if resolve_impl(q, policy, impl) == "triton":
        raw = _raw_scores(q, k, bs, Hkv, q_select, k_pool)
        kmax = list_width(policy, nk, bs, sink_blocks, local_blocks, max_visible_blocks)
        return _tri.select_from_scores(raw, scale=D ** -0.5, block_size=bs, policy=policy, causal=causal,
                                       sink_blocks=sink_blocks, local_blocks=local_blocks, Lq=Lq, Lk=Lk, kmax=kmax,
                                       min_key_block=None if min_key is not None else min_key_block,
                                       min_key=min_key, return_info=return_info)
    dev = q.device
    off = Lk - Lq
    m = torch.arange(nq, device=dev)
    first = off + m * bs
    last = off + torch.clamp((m + 1) * bs, max=Lq) - 1
    j = torch.arange(nk, device=dev)
    diag_lo, diag_hi = (first // bs)[:, None], (last // bs)[:, None]
    visible = j[None, :] <= diag_hi if causal else torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if min_key is not None:  # per row and query block: (B, 1, NQ) so every mask below broadcasts to (B, Hkv, NQ, NK)
        min_key = min_key.to(dev).long().unsqueeze(1)
        min_key_block = min_key // bs
    in_window = torch.ones_like(visible) if min_key_block is None else j >= min_key_block.to(dev)[..., None]
    sink = j[None, :] < sink_blocks
    allowed = visible & (in_window | sink)
    local = (j[None, :] >= diag_lo - (local_blocks - 1)) & (j[None, :] <= (diag_hi if causal else nk))
    forced = allowed & (sink | local)
    if causal:
        # budgets read only what every query of the block sees: scores of blocks wholly at or before the block's
        # first query, and the visible tokens at the block's end as if it were complete (not where the input
        # happens to end), so a partial block keeps what the same block keeps once complete. Counted in closed
        # form over (NQ,) vectors: blocks lo..d_last of the window plus the sinks below it, the last one partial
        # when the queries are not block-aligned.
        scored = allowed & ((j[None, :] + 1) * bs - 1 <= first[:, None]) if policy.reads_scores else None
        last_full = off + (m + 1) * bs - 1
        d_last = last_full // bs
        lo = torch.zeros_like(m) if min_key_block is None else min_key_block.to(dev).long().clamp_min(0)
        n_win = (d_last - lo + 1).clamp_min(0)
        n_sink = torch.minimum(lo.clamp(max=sink_blocks), d_last + 1).clamp_min(0)
        visible_tokens = (n_win + n_sink) * bs - (bs - 1 - last_full % bs) * ((n_win > 0) | (d_last < n_sink))
        if min_key is not None:  # the window's first block counted from min_key on
            visible_tokens = visible_tokens - (min_key - lo * bs) * (n_win > 0)
    else:
        scored = allowed if policy.reads_scores else None
        visible_tokens = (torch.clamp(Lk - j[None, :] * bs, 0, bs) * allowed).sum(-1)

    scores = _raw_scores(q, k, bs, Hkv, q_select, k_pool) * (D ** -0.5)

    allowed_b = allowed.expand(B, Hkv, nq, nk)
    forced_b = forced.expand(B, Hkv, nq, nk)
    counts = policy.num_blocks(scores, allowed_b, forced_b, visible_tokens.expand(B, Hkv, nq), bs,
                               None if scored is None else scored.expand(B, Hkv, nq, nk))
    kmax = list_width(policy, nk, bs, sink_blocks, local_blocks, max_visible_blocks)
    rank = scores.masked_fill(forced_b, math.inf).masked_fill(~allowed_b, -math.inf)
    counts = torch.clamp(counts, max=kmax)  # a too-small hint would cut lists: callers pass an upper bound
    idx = torch.topk(rank, kmax, dim=-1).indices
    keep = torch.arange(kmax, device=dev) < counts.unsqueeze(-1)
    idx = torch.where(keep, idx, torch.full_like(idx, nk)).sort(-1).values
    idx = torch.where(idx == nk, torch.full_like(idx, -1), idx)
    out = (idx.to(torch.int32), counts.to(torch.int32))
    if not return_info:
        return out
    info = {"visible_blocks": allowed.sum(-1), "forced_blocks": forced.sum(-1), "scores": scores,
            "visible_tokens": visible_tokens}
    return (*out, info)


def kept_fraction(block_counts: Tensor, visible_blocks: Tensor) -> float:
    """Kept / visible key blocks, averaged over query blocks (1.0 = dense)."""
    vis = visible_blocks.expand_as(block_counts).double().clamp_min(1)
    return float((block_counts.double() / vis).mean())
