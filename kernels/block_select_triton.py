"""Triton block selection: masks, budget policy and index lists in one launch (contract: `select_blocks`).

`select_blocks(..., impl="torch")` builds the selection from ~30 PyTorch ops (masks, closed-form visible tokens,
the policy's count, a double-precision softmax/sort/cumsum for top-p, topk, sort, two wheres). Here one program
owns one (batch, kv head, query block) row and does all of it in registers:

- the row's pooled scores (`BLOCK_NK` = next power of two of the key blocks), times D**-0.5 in fp32;
- allowed / forced / scored masks from indices (causal, sinks, local blocks, `min_key_block` or `min_key`) and
  the visible tokens in the same closed form;
- the count: dense, fixed, length_scaled (fp64, `sqrt` for exponent 0.5 as torch's pow does), or top-p;
- one sort of int64 keys `ordered(rank) << 32 | (BLOCK_NK - 1 - j)` (rank = score, +inf forced, -inf not
  allowed; the low bits break exact ties lower index first), descending. Top-p reads the sorted scores back
  from the keys' high bits: positions [0, n_forced) are the forced blocks, [n_forced, n_valid) the others in
  score order (all of them scored: a block that is neither forced nor wholly before the block's first query
  cannot be allowed), so their fp64 softmax masses and cumulative sum are the reference's `rest.gather(order)`
  and its cumsum, term for term;
- the `count`-th largest key is the threshold: keep = key >= threshold (exactly `count` blocks), compacted to
  ascending indices with a cumsum, padded with -1 to the list width `kmax`.

Not fused: the pooling (`block_pool` of k, `causal_selection_queries` of q, or the caller's `k_pool` /
`q_select`) and the pooled-query x pooled-key product, one batched matmul, stay in PyTorch, the very ops of the
reference: the scores are then bit-identical to it (also under TF32), so the kept lists are equal, not close.
A per-row in-kernel product would re-read every pooled key once per query block (NQ x the matmul's traffic).

Exactly equal to the reference except among exact score ties at the cut (torch.topk's order there is
unspecified; here the lower index wins) and up to summation order in top-p's fp64 masses (~1e-16 against the
rule's 1e-9 tolerances). The fp64 math uses libdevice on the GPU (exp, sqrt, pow, ceil: the functions torch's
CUDA kernels call) and tl.math in the interpreter, whose libdevice is not implemented; there a general length
exponent (neither 0.5 nor 1) is exp(e * log n), a few ulps from pow.
"""

from __future__ import annotations

import os
import struct

import torch
from torch import Tensor

from .budget import BudgetPolicy, Dense, Fixed, LengthScaled, TopP
from .sparse_attention_triton import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

POISON_OUTPUTS = False  # tests: fill every output with a sentinel before the launch (an unwritten element shows)
# num_warps per launch (0 = by BLOCK_NK: 4 up to 1024 key blocks, 8 above); the GPU session may tune it
NUM_WARPS = int(os.environ.get("MEMSPARSE_SELECT_NUM_WARPS", "0"))

_POLICY_IDS = {Dense: 0, Fixed: 1, LengthScaled: 2, TopP: 3}


def unsupported_reason(x: Tensor, policy: BudgetPolicy) -> str | None:
    """Why the kernel cannot select for these inputs (None when it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not x.is_cuda and not interpreting():
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    if type(policy) not in _POLICY_IDS:
        return f"policy {type(policy).__name__} has no fused form (dense, fixed, length_scaled, top_p do)"
    return None


def _bits(x: float) -> int:
    """A float64's bit pattern as a signed int64 (a constexpr the kernel bitcasts back: exact on any backend)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _exponent_mode(e: float) -> int:
    return 0 if e == 1.0 else 1 if e == 0.5 else 2  # torch's pow: copy for 1, sqrt for 0.5, pow otherwise


def policy_constexprs(policy: BudgetPolicy) -> dict:
    """The policy as the kernel's constexpr arguments (floats as exact fp64 bit patterns)."""
    pid = _POLICY_IDS[type(policy)]
    kw = dict(POLICY=pid, FIXED_K=0, C_BITS=0, MIN_TOKENS_BITS=0, EXP_MODE=0, EXP_BITS=0, P_BITS=0, MIN_BLOCKS=0,
              MAX_BLOCKS=-1, MIN_C_BITS=0, MAX_C_BITS=0, HAS_MIN_C=False, HAS_MAX_C=False, FORCED_MASS=True)
    if pid == 1:
        kw["FIXED_K"] = int(policy.k)
    elif pid == 2:
        kw.update(C_BITS=_bits(policy.c), MIN_TOKENS_BITS=_bits(float(policy.min_tokens)),
                  EXP_MODE=_exponent_mode(float(policy.exponent)), EXP_BITS=_bits(policy.exponent))
    elif pid == 3:
        kw.update(P_BITS=_bits(policy.p), MIN_BLOCKS=int(policy.min),
                  MAX_BLOCKS=-1 if policy.max is None else int(policy.max),
                  HAS_MIN_C=policy.min_c is not None, HAS_MAX_C=policy.max_c is not None,
                  MIN_C_BITS=_bits(policy.min_c or 0.0), MAX_C_BITS=_bits(policy.max_c or 0.0),
                  FORCED_MASS=bool(policy.forced_mass))
    return kw


if HAS_TRITON:

    @triton.jit
    def _f64(BITS: tl.constexpr):
        """An exact fp64 constant from its bit pattern (a float constexpr could pass through fp32)."""
        return tl.full([1], BITS, tl.int64).to(tl.float64, bitcast=True)

    @triton.jit
    def _exp64(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _sqrt64(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.sqrt(x)
        else:
            return tl.sqrt(x)

    @triton.jit
    def _ceil64(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.ceil(x)
        else:
            return tl.ceil(x)

    @triton.jit
    def _pow64(x, EXP_MODE: tl.constexpr, EXP_BITS: tl.constexpr, LIBDEVICE: tl.constexpr):
        """x ** e for x >= 1 as torch computes it: x (e = 1), sqrt (e = 0.5), pow otherwise."""
        if EXP_MODE == 0:
            return x
        elif EXP_MODE == 1:
            return _sqrt64(x, LIBDEVICE)
        else:
            e = _f64(EXP_BITS)
            if LIBDEVICE:
                return libdevice.pow(x, e)
            else:
                return tl.exp(e * tl.log(x))

    @triton.jit
    def _scaled_blocks(vt, C_BITS: tl.constexpr, BS: tl.constexpr, LIBDEVICE: tl.constexpr):
        """ceil(clamp(c * sqrt(max(vt, 1)), min=0) / bs): top-p's length-scaled bounds (min_c / max_c)."""
        t = _f64(C_BITS) * _sqrt64(tl.maximum(vt.to(tl.float64), 1.0), LIBDEVICE)
        t = tl.maximum(t, 0.0)
        return tl.minimum(_ceil64(t / BS, LIBDEVICE), 1073741824.0).to(tl.int32)

    @triton.jit
    def _pick(x, at, j):
        """The element of a 1-D tensor at position `at` (a scalar), as a (1,) tensor."""
        return tl.sum(tl.where(j == at, x, tl.zeros_like(x)), 0, keep_dims=True)

    @triton.jit
    def _floordiv(a, B: tl.constexpr):
        """floor(a / B) for B > 0 whatever the sign of a (integer division truncates on the GPU)."""
        return tl.where(a >= 0, a // B, -((B - 1 - a) // B))

    @triton.jit
    def _select_kernel(S, MK, IDX, CNT, VIS, FRC, VTOK, NQ, NK, Lq, Lk, KMAX, H, smk_b, smk_m, scale,
                       BS: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr, CAUSAL: tl.constexpr,
                       WINDOW: tl.constexpr, WRITE_INFO: tl.constexpr, BLOCK_NK: tl.constexpr,
                       BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
                       POLICY: tl.constexpr, FIXED_K: tl.constexpr, C_BITS: tl.constexpr,
                       MIN_TOKENS_BITS: tl.constexpr, EXP_MODE: tl.constexpr, EXP_BITS: tl.constexpr,
                       P_BITS: tl.constexpr, MIN_BLOCKS: tl.constexpr, MAX_BLOCKS: tl.constexpr,
                       HAS_MIN_C: tl.constexpr, MIN_C_BITS: tl.constexpr, HAS_MAX_C: tl.constexpr,
                       MAX_C_BITS: tl.constexpr, TOL_BITS: tl.constexpr, FORCED_MASS: tl.constexpr):
        # WINDOW: 0 none, 1 MK = min_key_block (first candidate block), 2 MK = min_key (first visible key)
        # POLICY: 0 dense, 1 fixed, 2 length_scaled, 3 top_p
        row = tl.program_id(0)
        m = row % NQ
        bh = row // NQ
        h = bh % H
        b = bh // H
        j = tl.arange(0, BLOCK_NK)
        in_range = j < NK
        srow = S + row.to(tl.int64) * NK
        s = tl.load(srow + j, mask=in_range, other=0.0) * scale
        if WRITE_INFO:
            tl.store(srow + j, s, mask=in_range)  # return_info's scores: scaled in place

        # ---- masks, as select_blocks builds them -------------------------------------------------------------
        off = Lk - Lq
        first = off + m * BS
        last = off + tl.minimum((m + 1) * BS, Lq) - 1
        diag_lo = first // BS
        diag_hi = last // BS
        sink = j < SINK
        if CAUSAL:
            visible = in_range & (j <= diag_hi)
            local = (j >= diag_lo - (LOCAL - 1)) & (j <= diag_hi)
        else:
            visible = in_range
            local = j >= diag_lo - (LOCAL - 1)  # (the reference's upper end is nk: every later block)
        lo = m * 0
        if WINDOW == 0:
            allowed = visible
        else:
            mk = tl.load(MK + b.to(tl.int64) * smk_b + m.to(tl.int64) * smk_m).to(tl.int32)
            if WINDOW == 2:
                mkb = _floordiv(mk, BS)
            else:
                mkb = mk
            allowed = visible & ((j >= mkb) | sink)
            lo = tl.maximum(mkb, 0)
        forced = allowed & (sink | local)
        n_valid = tl.sum(allowed.to(tl.int32), 0)
        n_forced = tl.sum(forced.to(tl.int32), 0)

        # ---- visible tokens: at the block's end as if complete (causal), or every allowed key ----------------
        if CAUSAL:
            last_full = off + (m + 1) * BS - 1
            d_last = last_full // BS
            n_win = tl.maximum(d_last - lo + 1, 0)
            n_sink = tl.maximum(tl.minimum(tl.minimum(lo, SINK), d_last + 1), 0)
            part = ((n_win > 0) | (d_last < n_sink)).to(tl.int32)
            vt = (n_win + n_sink) * BS - (BS - 1 - last_full % BS) * part
            if WINDOW == 2:
                vt = vt - (mk - lo * BS) * (n_win > 0).to(tl.int32)
            scored = allowed & ((j + 1) * BS - 1 <= first)
        else:
            vt = tl.sum(tl.where(allowed, tl.minimum(tl.maximum(Lk - j * BS, 0), BS), 0), 0)
            scored = allowed

        # ---- sort keys: ordered(rank) in the high half, lower index first among ties in the low half ----------
        bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))  # -0.0 ties +0.0, as torch compares
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving float -> int
        ordered = tl.where(forced, 2147483647, tl.where(allowed, ordered, -2147483648))
        key = (ordered.to(tl.int64) << 32) | (BLOCK_NK - 1 - j).to(tl.int64)

        # ---- the policy's count (forced included, at most the allowed blocks) --------------------------------
        if POLICY == 3:
            srt = tl.sort(key, 0, descending=True)
            s64 = s.to(tl.float64)
            if FORCED_MASS:
                massed = scored
            else:  # the candidates' mass only (TopP.forced_mass=0): forced blocks hold no share
                massed = scored & (forced == 0)
            n_scored = tl.sum(massed.to(tl.int32), 0)
            smax = tl.max(tl.where(massed, s64, -float("inf")), 0)
            smax = tl.where(n_scored > 0, smax, 0.0)
            e = tl.where(massed, _exp64(s64 - smax, LIBDEVICE), 0.0)
            denom = tl.sum(e, 0)
            denom = tl.where(n_scored > 0, denom, 1.0)
            forced_mass = tl.sum(tl.where(forced, e / denom, 0.0), 0)
            hi = (srt >> 32).to(tl.int32)
            s_sorted = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True).to(tl.float64)
            ranked = (j >= n_forced) & (j < n_valid)  # the non-forced allowed blocks, best score first
            rest = tl.where(ranked, _exp64(tl.where(ranked, s_sorted, smax) - smax, LIBDEVICE) / denom, 0.0)
            cum = tl.cumsum(rest, 0)
            total = tl.max(cum, 0)  # cum is non-decreasing: its last value
            need = _f64(P_BITS) - forced_mass
            bar = need - _f64(TOL_BITS)
            # the reference counts cum < bar over nk positions whose non-forced ones come first: forced ones
            # (mass 0) follow at the total
            extra = tl.sum(((cum < bar) & (j >= n_forced) & in_range).to(tl.int32), 0) + \
                n_forced * (total < bar).to(tl.int32) + 1
            extra = tl.where(need > _f64(TOL_BITS), extra, 0)
            count = n_forced + extra
            if HAS_MIN_C:
                lo_c = _scaled_blocks(vt, MIN_C_BITS, BS, LIBDEVICE)
            else:
                lo_c = tl.full([1], MIN_BLOCKS, tl.int32)
            count = tl.maximum(count, lo_c)
            if MAX_BLOCKS >= 0:
                count = tl.minimum(count, MAX_BLOCKS)
            if HAS_MAX_C:
                count = tl.minimum(count, _scaled_blocks(vt, MAX_C_BITS, BS, LIBDEVICE))
        elif POLICY == 2:
            t = _f64(C_BITS) * _pow64(tl.maximum(vt.to(tl.float64), 1.0), EXP_MODE, EXP_BITS, LIBDEVICE)
            t = tl.maximum(t, _f64(MIN_TOKENS_BITS))
            count = tl.minimum(_ceil64(t / BS, LIBDEVICE), 1073741824.0).to(tl.int32)
        elif POLICY == 1:
            count = tl.full([1], FIXED_K, tl.int32)
        else:
            count = tl.full([1], 0, tl.int32) + n_valid
        count = tl.minimum(tl.maximum(count, n_forced), n_valid)
        count = tl.minimum(count, KMAX)  # the list width: callers pass an upper bound

        # ---- the count best blocks by rank, ascending, padded with -1 -----------------------------------------
        if POLICY == 3:
            thr = _pick(srt, count - 1, j)
            keep = (key >= thr) & (count > 0)
        else:
            keep = allowed
            if tl.sum(count, 0) < n_valid:  # fewer than every allowed block: rank them (dense skips the sort)
                srt2 = tl.sort(key, 0, descending=True)
                thr = _pick(srt2, count - 1, j)
                keep = (key >= thr) & (count > 0)
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1
        orow = IDX + row.to(tl.int64) * KMAX
        tl.store(orow + pos, j, mask=keep)
        kk = tl.arange(0, BLOCK_K)
        tl.store(orow + kk, tl.full([BLOCK_K], -1, tl.int32), mask=(kk >= count) & (kk < KMAX))
        one = tl.arange(0, 1)
        tl.store(CNT + row + one, count)
        if WRITE_INFO:  # per (batch, query block): the kv head 0 programs write them
            w = (one + h) == 0
            iat = b.to(tl.int64) * NQ + m + one
            tl.store(VIS + iat, tl.full([1], 0, tl.int64) + n_valid, mask=w)
            tl.store(FRC + iat, tl.full([1], 0, tl.int64) + n_forced, mask=w)
            tl.store(VTOK + iat, tl.full([1], 0, tl.int64) + vt, mask=w)


def _num_warps(block_nk: int) -> int:
    return NUM_WARPS if NUM_WARPS > 0 else (4 if block_nk <= 1024 else 8)


def select_from_scores(scores: Tensor, *, scale: float, block_size: int, policy: BudgetPolicy, causal: bool,
                       sink_blocks: int, local_blocks: int, Lq: int, Lk: int, kmax: int,
                       min_key_block: Tensor | None = None, min_key: Tensor | None = None,
                       return_info: bool = False):
    """The selection from raw pooled scores `(B, Hkv, NQ, NK)` fp32 (q_sel . k_pool, not yet scaled): returns
    block_indices int32 `(B, Hkv, NQ, kmax)`, block_counts int32 `(B, Hkv, NQ)` and, with return_info, the
    info dict of `select_blocks` (scores scaled in place in `scores`). `min_key_block` `(NQ,)` or `min_key`
    `(B, NQ)` (at most one), the other arguments as in `select_blocks` (kmax: the list width it computed)."""
    reason = unsupported_reason(scores, policy)
    if reason is not None:
        raise ValueError(f"select_blocks(impl='triton') cannot run here: {reason}")
    if min_key_block is not None and min_key is not None:
        raise ValueError("pass min_key_block or min_key, not both")
    B, H, nq, nk = scores.shape
    dev = scores.device
    scores = scores.contiguous()
    if scores.dtype != torch.float32:
        raise ValueError(f"select_from_scores: scores must be fp32, got {scores.dtype}")
    if POISON_OUTPUTS:
        idx = torch.full((B, H, nq, kmax), 7777, dtype=torch.int32, device=dev)
        cnt = torch.full((B, H, nq), 7777, dtype=torch.int32, device=dev)
    else:
        idx = torch.empty((B, H, nq, kmax), dtype=torch.int32, device=dev)
        cnt = torch.empty((B, H, nq), dtype=torch.int32, device=dev)
    window, mk, smk = 0, cnt, (0, 0)  # any pointer when there is no window
    if min_key_block is not None or min_key is not None:
        window = 1 if min_key is None else 2
        mk = (min_key_block if min_key is None else min_key).to(dev)
        mk = torch.broadcast_to(mk if mk.dtype in (torch.int32, torch.int64) else mk.long(), (B, nq))
        smk = mk.stride()
    if return_info:
        info_bufs = [torch.full((B, nq), -7777 if POISON_OUTPUTS else 0, dtype=torch.int64, device=dev)
                     for _ in range(3)]
    else:
        info_bufs = [cnt] * 3
    if B * H * nq:
        block_nk = max(16, triton.next_power_of_2(nk))
        _select_kernel[(B * H * nq,)](
            scores, mk, idx, cnt, *info_bufs, nq, nk, Lq, Lk, kmax, H, smk[0], smk[1], scale,
            BS=block_size, SINK=sink_blocks, LOCAL=local_blocks, CAUSAL=bool(causal), WINDOW=window,
            WRITE_INFO=bool(return_info), BLOCK_NK=block_nk, BLOCK_K=max(16, triton.next_power_of_2(kmax)),
            LIBDEVICE=not interpreting(), TOL_BITS=_bits(1e-9), **policy_constexprs(policy),
            num_warps=_num_warps(block_nk), num_stages=1)
    if not return_info:
        return idx, cnt
    vis, frc, vtok = (t[:, None] if min_key is not None else t[0] for t in info_bufs)
    return idx, cnt, {"visible_blocks": vis, "forced_blocks": frc, "scores": scores, "visible_tokens": vtok}

