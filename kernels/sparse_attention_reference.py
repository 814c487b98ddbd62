"""Plain-PyTorch block-sparse attention: the CPU path and the oracle the Triton kernel must match.

Contract (shared by every implementation of `sparse_attention`):
- q `(B, Hq, Lq, D)`, k/v `(B, Hkv, Lk, D)`, `Hq % Hkv == 0` (GQA: query head h uses KV head h // (Hq/Hkv)).
- `block_indices` int32 `(B, Hkv, ceil(Lq / block_size), max_blocks)`: for each query block, the key blocks
  it attends, ascending; only the first `block_counts[b, h, m]` entries are read (the rest is padding).
  Duplicated entries count once. Key block j covers keys `[j*bs, min((j+1)*bs, Lk))`; query block m
  covers queries `[m*bs, min((m+1)*bs, Lq))`.
- Queries are aligned to the end of the keys: query i sits at key position `Lk - Lq + i`; with
  `causal=True` it sees key j only when `j <= Lk - Lq + i` (masking inside any block that crosses the
  diagonal).
- Documents (optional `key_start` int `(B, Lq)`, with `shared_keys`): query i of batch row b sees key j only
  when `j >= key_start[b, i]` or `j < shared_keys`, masked inside any block. For packed documents laid out
  back to back, `key_start` is the key index of the first token of the query's document, so no query sees a
  key of another document; the first `shared_keys` keys (persistent tokens) stay visible to every query.
  None = no document mask (today's kernel, unchanged).
- A query that sees no key (empty list, or every listed key masked) returns 0 with lse = -inf and gets
  zero gradients, never NaN.
- Returns `(B, Hq, Lq, D)` in q's dtype, and with `return_lse=True` also the natural-log log-sum-exp of
  the scaled scores, fp32 `(B, Hq, Lq)`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sparse_attention_inputs(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor,
                                  block_counts: Tensor, block_size: int, key_start: Tensor | None = None,
                                  shared_keys: int = 0) -> None:
    """Raise ValueError naming the argument for any input that breaks the contract above."""
    if key_start is not None:
        if key_start.dim() != 2 or tuple(key_start.shape) != (q.shape[0], q.shape[2]) or \
                key_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"key_start must be an integer (B, Lq) = {(q.shape[0], q.shape[2])} tensor, got "
                             f"{key_start.dtype} {tuple(key_start.shape)}")
        if shared_keys < 0:
            raise ValueError(f"shared_keys must be >= 0, got {shared_keys}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, L, D); got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)} v{tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hkv, Lk, D={D}); got {tuple(k.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(f"q is longer than k (Lq={Lq} > Lk={Lk}); queries align to the end of the keys")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    nq = math.ceil(Lq / block_size)
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (B, Hkv, nq):
        raise ValueError(f"block_indices must be (B={B}, Hkv={Hkv}, ceil(Lq/bs)={nq}, max_blocks); "
                         f"got {tuple(block_indices.shape)}")
    if tuple(block_counts.shape) != (B, Hkv, nq):
        raise ValueError(f"block_counts must be (B={B}, Hkv={Hkv}, {nq}); got {tuple(block_counts.shape)}")
    if block_indices.dtype not in (torch.int32, torch.int64) or block_counts.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_indices and block_counts must be integer tensors (int32)")


def _valid_slots(block_indices: Tensor, block_counts: Tensor, num_key_blocks: int) -> Tensor:
    """(B, Hkv, NQ, MB) bool: slot is within count, in range, and not a repeat of an earlier slot."""
    mb = block_indices.shape[-1]
    slot = torch.arange(mb, device=block_indices.device)
    valid = slot < block_counts.unsqueeze(-1)
    valid &= (block_indices >= 0) & (block_indices < num_key_blocks)
    same = block_indices.unsqueeze(-1) == block_indices.unsqueeze(-2)  # [.., i, j]
    earlier = torch.ones(mb, mb, dtype=torch.bool, device=block_indices.device).tril(-1)  # j < i
    dup = (same & earlier & valid.unsqueeze(-2)).any(-1)
    return valid & ~dup


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: Tensor,
                               *, block_size: int, causal: bool = True, scale: float | None = None,
                               return_lse: bool = False, key_start: Tensor | None = None, shared_keys: int = 0):
    """Block-sparse attention by gathering each query block's listed key blocks (memory ~ kept work).

    Shapes as in the module docstring. Computes in fp32 (or float64 for float64 inputs).
    """
    check_sparse_attention_inputs(q, k, v, block_indices, block_counts, block_size, key_start, shared_keys)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs = block_size
    nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
    mb = block_indices.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    if mb == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out

    idx = block_indices.long()
    valid = _valid_slots(idx, block_counts.long(), nk)  # (B, Hkv, NQ, MB)
    idx_c = idx.clamp(0, nk - 1)

    kp = torch.nn.functional.pad(k.to(cdt), (0, 0, 0, nk * bs - Lk)).view(B, Hkv, nk, bs, D)
    vp = torch.nn.functional.pad(v.to(cdt), (0, 0, 0, nk * bs - Lk)).view(B, Hkv, nk, bs, D)
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(Hkv, device=q.device)[None, :, None, None]
    kg = kp[bi, hi, idx_c].reshape(B, Hkv, nq, mb * bs, D)
    vg = vp[bi, hi, idx_c].reshape(B, Hkv, nq, mb * bs, D)

    qp = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, nq * bs - Lq)).view(B, Hkv, G, nq, bs, D)
    s = torch.einsum("bhgnqd,bhnkd->bhgnqk", qp, kg) * scale  # (B, Hkv, G, NQ, bs, MB*bs)

    key_pos = (idx_c.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).reshape(B, Hkv, nq, mb * bs)
    key_ok = valid.unsqueeze(-1).expand(B, Hkv, nq, mb, bs).reshape(B, Hkv, nq, mb * bs) & (key_pos < Lk)
    mask = key_ok.unsqueeze(-2)  # (B, Hkv, NQ, 1, MB*bs)
    if causal:
        q_pos = (Lk - Lq) + torch.arange(nq * bs, device=q.device).view(nq, bs)
        mask = mask & (key_pos.unsqueeze(-2) <= q_pos[None, None, :, :, None])
    if key_start is not None:  # documents: keys from the query's document on, and the shared keys
        ks = torch.nn.functional.pad(key_start.long(), (0, nq * bs - Lq)).view(B, 1, nq, bs, 1)
        kp_ = key_pos.unsqueeze(-2)
        mask = mask & ((kp_ >= ks) | (kp_ < shared_keys))
    mask = mask.unsqueeze(2)  # broadcast over G

    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)  # exp(-inf) = 0 on masked entries
    denom = p.sum(-1, keepdim=True)
    denom_safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    o = torch.einsum("bhgnqk,bhnkd->bhgnqd", p / denom_safe, vg)
    o = o.reshape(B, Hq, nq * bs, D)[:, :, :Lq].to(q.dtype)
    if not return_lse:
        return o
    lse = torch.where(denom > 0, m_safe + torch.log(denom_safe), torch.full_like(denom, -math.inf))
    lse = lse.reshape(B, Hq, nq * bs)[:, :, :Lq].float()
    return o, lse


def dense_block_mask(block_indices: Tensor, block_counts: Tensor, Lq: int, Lk: int, block_size: int,
                     causal: bool = True, key_start: Tensor | None = None, shared_keys: int = 0) -> Tensor:
    """The (B, Hkv, Lq, Lk) boolean mask that a block list means (for oracles and FlexAttention)."""
    bs = block_size
    nk = math.ceil(Lk / bs)
    valid = _valid_slots(block_indices.long(), block_counts.long(), nk)
    B, Hkv, nq, mb = block_indices.shape
    blk = torch.zeros(B, Hkv, nq, nk + 1, dtype=torch.bool, device=block_indices.device)
    tgt = torch.where(valid, block_indices.long().clamp(0, nk - 1), torch.full_like(block_indices.long(), nk))
    blk.scatter_(-1, tgt, True)
    blk = blk[..., :nk]
    mask = blk.repeat_interleave(bs, dim=2)[:, :, :Lq].repeat_interleave(bs, dim=3)[..., :Lk]
    if causal:
        qpos = (Lk - Lq) + torch.arange(Lq, device=mask.device)
        mask = mask & (torch.arange(Lk, device=mask.device)[None, :] <= qpos[:, None])
    if key_start is not None:
        kpos = torch.arange(Lk, device=mask.device)
        mask = mask & ((kpos >= key_start.long()[:, None, :, None]) | (kpos < shared_keys))
    return mask
