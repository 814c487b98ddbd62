"""Opt-in Hopper-oriented variants of the Triton block-sparse attention (contract: `sparse_attention_reference`).

The default kernels (`sparse_attention_triton`) are untouched; these compute the same function with the same
plan (`sparse_attention_plan`: clamped counts, unmasked prefixes, the launch orders) and are chosen with
`sparse_attention(..., variant=...)`. A variant is a "+"-joined set of:

- `persistent`: a fixed number of programs (`persistent_programs()`: the SM count on a GPU) loop over the work
  items, item w = (ORDER[w // NRT], row tile w % NRT), ORDER sorted by kept-block count descending (built once
  per call by the plan, in torch), program p taking items p, p + P, p + 2P, ...: the longest rows start first
  and no program is launched for a short tail. The backward's dQ kernel does the same over the query lists and
  the dK/dV kernel over the key blocks' reverse lists (longest first).
- `dynamic`: the same persistent programs and sorted items, but each program takes the next item from an atomic
  counter (a zeroed int32 per launch) as it finishes one: longest-first list scheduling, where `persistent`'s
  static stride can leave one program with more work than another.
- `tma`: K/V tiles in the forward and dQ kernels, Q/dO tiles in the dK/dV kernel, loaded through on-device
  tensor descriptors (`tl.make_tensor_descriptor`, 4-D over (B, H, L, D) with each tensor's own strides, so a
  tile past L is zero-filled by the hardware instead of masked); on Hopper and later that is a TMA load. The
  descriptors need a global scratch allocation: `triton.set_allocator` is set once, to torch's allocator.
- `merged`: the backward's dK/dV and dQ work in one launch, as FlexAttention's backward kernel does: programs
  [0, n_kv) take the key tiles (longest reverse list first), the rest the query row tiles, each with its own tile
  shape (BLOCK_M1 x BLOCK_N1 for dK/dV, BLOCK_M2 x BLOCK_N2 for dQ) under one num_warps / num_stages; the two
  roles' programs share the GPU instead of the dQ kernel waiting for the dK/dV kernel's tail. The forward is the
  default grid. Combines with `tma` only.
- `ws`: adds autotune configs that mark the key-tile loops `tl.range(..., warp_specialize=True)`, vary
  `num_stages` (software pipelining depth) and, for `persistent`, flatten the work-item loop with its key-tile
  loops (`tl.range(..., flatten=True)`) and cap an 8-warp tile at 128 registers a thread (`maxnreg`, two CTAs an
  SM), beside the variant's plain configs.

The variants run the same two-loop structure (unmasked prefix, masked rest), the same -inf bias for invalid and
duplicate slots, the same fp32 online softmax and the same backward (delta prep, dQ, dK/dV through the reverse
index) as the default kernels; with MEMSPARSE_SPARSE_ATTENTION_BWD=fused a variant's backward is the default
fused one. They are checked in the CPU interpreter (tests/test_sparse_attention_variants.py) and not yet timed
on a GPU; benchmarks/bench_sparse_attention.py --variants checks and times them beside the default kernel.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import sparse_attention_triton as _tri
from .sparse_attention_triton import HAS_TRITON, LOG2E, interpreting, triton

if HAS_TRITON:
    import triton.language as tl

    from .sparse_attention_triton import _mma
else:  # pragma: no cover - depends on the machine
    tl = None

VARIANT_PARTS = ("persistent", "dynamic", "tma", "ws", "merged")
# Number of programs of a persistent launch: None = the device's SM count (GPU) or 3 under the interpreter (so the
# CPU tests give every program several items). MEMSPARSE_SPARSE_ATTENTION_PROGRAMS overrides it.
PERSISTENT_PROGRAMS: int | None = None
PROGRAMS_ENV_VAR = "MEMSPARSE_SPARSE_ATTENTION_PROGRAMS"


def parse_variant(variant: str) -> frozenset[str]:
    """"default" -> {}; "persistent+tma" -> {"persistent", "tma"}; ValueError on anything else. "ws" needs
    another part beside it (it only adds configs to a variant)."""
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a string, got {variant!r}")
    v = variant.strip().lower()
    if v in ("", "default"):
        return frozenset()
    parts = frozenset(p for p in v.replace(",", "+").split("+") if p)
    bad = parts - set(VARIANT_PARTS)
    if bad or not parts:
        raise ValueError(f"variant must be 'default' or a '+'-joined set of {VARIANT_PARTS}, got {variant!r}")
    if parts == {"ws"}:
        raise ValueError("variant 'ws' adds configs to another variant: use e.g. 'persistent+ws'")
    if {"persistent", "dynamic"} <= parts:
        raise ValueError("variant: 'persistent' (static schedule) and 'dynamic' exclude each other")
    if "merged" in parts and parts - {"merged", "tma"}:
        raise ValueError(f"variant 'merged' combines with 'tma' only, got {variant!r}")
    return parts


def persistent_programs(device: torch.device) -> int:
    env = os.environ.get(PROGRAMS_ENV_VAR, "").strip()
    if env:
        n = int(env)
    elif PERSISTENT_PROGRAMS is not None:
        n = PERSISTENT_PROGRAMS
    elif device.type == "cuda":
        n = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n = 3
    if n < 1:
        raise ValueError(f"the number of persistent programs must be >= 1, got {n}")
    return n


def _ensure_allocator(device: torch.device) -> None:
    """On-device tensor descriptors need global scratch memory (Triton >= 3.3: `triton.set_allocator`). Triton keeps
    the allocator in a ContextVar, so one set in the forward's thread is unset in autograd's backward thread (the
    first GPU run of the TMA variants failed there): check at every TMA launch, and set torch's allocator where the
    calling context has none (a user's own allocator is kept)."""
    if device.type != "cuda":
        return
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass

    def alloc(size: int, alignment: int, stream):  # on the current CUDA device, where Triton launches
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)


def _tma_ready(t: Tensor) -> Tensor:
    """A tensor a 4-D descriptor can address: last dim contiguous, 16-byte aligned base, positive 16-byte multiple
    strides (an expanded dim's stride 0 is not a TMA stride)."""
    es = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s > 0 and (s * es) % 16 == 0 for s in t.stride()[:-1])
    return t if ok else t.clone(memory_format=torch.contiguous_format)


if HAS_TRITON:

    @triton.jit
    def _fwd_step(q, acc, m_i, l_i, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn, ks, qpos,
                  Lk, NK, NSHARED, qk_scale,
                  BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DOC: tl.constexpr,
                  TMA: tl.constexpr):
        NSUB: tl.constexpr = BS // BLOCK_N
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        s = it // NSUB
        j = tl.load(idx_base + s)
        jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
        ok = (j != jp) & (j >= 0) & (j < NK)
        n0 = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N
        kn = n0 + offs_n
        if MASKED:
            k_ok = kn < tl.where(ok, Lk, 0)  # (a scalar bool & a vector trips the interpreter)
        if TMA:  # rows past Lk come back as zeros
            kt = tl.trans(dk_.load([b, hkv, n0, 0]).reshape(BLOCK_N, D))
        elif MASKED:
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        else:
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None])
        qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale
        if MASKED:
            msk = k_ok[None, :]
            if CAUSAL:
                msk = msk & (kn[None, :] <= qpos[:, None])
            if DOC:
                msk = msk & ((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED))
            qk = tl.where(msk, qk, float("-inf"))
        else:
            qk = qk + tl.where(ok, 0.0, float("-inf"))
            if DOC:
                qk = tl.where((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            vt = dv_.load([b, hkv, n0, 0]).reshape(BLOCK_N, D)
        elif MASKED:
            vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        else:
            vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :])
        acc = acc * alpha[:, None] + _mma(p.to(vt.dtype), vt, DOT_PREC, UPCAST)
        return acc, m_new, l_i

    @triton.jit
    def _query_rows(w, ORDER, KS, Hkv, Lq, Lk, NQ, G: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOC: tl.constexpr):
        """Row tile w % NRT of the query block ORDER[w // NRT]: its flat (b, hkv, query block) index, b, hkv, the
        query index, validity, position and head of each row, and each row's document start (KS; DOC only)."""
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        flat = tl.load(ORDER + w // NRT)
        bh = flat // NQ
        b = bh // Hkv
        hkv = bh % Hkv
        r = (w % NRT) * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = (flat % NQ) * BS + r % BS
        row_ok = (r < G * BS) & (qi < Lq)
        if DOC:
            ks = tl.load(KS + b * Lq + qi, mask=row_ok, other=0)
        else:
            ks = qi  # unused
        return flat, b, hkv, qi, row_ok, Lk - Lq + qi, hkv * G + r // BS, ks

    @triton.jit
    def _fwd_item(w, Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                  Hkv, Lq, Lk, NQ, NK, MB, qk_scale, NSHARED,
                  G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, DOC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
        """One work item: row tile w % NRT of the query block ORDER[w // NRT]."""
        NSUB: tl.constexpr = BS // BLOCK_N
        flat, b, hkv, qi, row_ok, qpos, head, ks = _query_rows(w, ORDER, KS, Hkv, Lq, Lk, NQ, G, BS, BLOCK_M, DOC)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh
        cnt = tl.load(CNT + flat)
        nfull = tl.load(NFULL + flat)
        idx_base = IDX + flat * MB
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for it in tl.range(0, nfull * NSUB, warp_specialize=WS):  # blocks every row sees whole: no element mask
            acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn,
                                      ks, qpos, Lk, NK, NSHARED, qk_scale, BS, D, BLOCK_N, False, CAUSAL, DOT_PREC,
                                      UPCAST, DOC, TMA)
        for it in tl.range(nfull * NSUB, cnt * NSUB, warp_specialize=WS):  # diagonal, key tail, out of order
            acc, m_i, l_i = _fwd_step(q, acc, m_i, l_i, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn,
                                      ks, qpos, Lk, NK, NSHARED, qk_scale, BS, D, BLOCK_N, True, CAUSAL, DOT_PREC,
                                      UPCAST, DOC, TMA)
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o_ptrs = O + b * sob + head[:, None] * soh + qi[:, None] * som + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (b * Hkv * G + head) * Lq + qi, lse, mask=row_ok)

    @triton.jit
    def _fwd_var_kernel(Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                        B, Hkv, Lq, Lk, NQ, NK, MB, N_WORK, qk_scale, NSHARED, CTR,
                        G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                        UPCAST: tl.constexpr, DOC: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr,
                        WS: tl.constexpr, FLATTEN: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        if TMA:
            dk_ = tl.make_tensor_descriptor(K, shape=[B, Hkv, Lk, D], strides=[skb, skh, skn, 1],
                                            block_shape=[1, 1, BLOCK_N, D])
            dv_ = tl.make_tensor_descriptor(V, shape=[B, Hkv, Lk, D], strides=[svb, svh, svn, 1],
                                            block_shape=[1, 1, BLOCK_N, D])
        else:
            dk_ = K  # unused
            dv_ = V
        if PERSISTENT == 2:  # dynamic: each program takes the next item (heaviest first) from an atomic counter
            w = tl.atomic_add(CTR, 1)
            while w < N_WORK * NRT:
                _fwd_item(w, Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                          sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                          Hkv, Lq, Lk, NQ, NK, MB, qk_scale, NSHARED,
                          G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
                w = tl.atomic_add(CTR, 1)
        elif PERSISTENT == 1:  # static: items sorted heaviest first; program p takes p, p + P, ...
            for w in tl.range(tl.program_id(0), N_WORK * NRT, tl.num_programs(0), flatten=FLATTEN):
                _fwd_item(w, Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                          sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                          Hkv, Lq, Lk, NQ, NK, MB, qk_scale, NSHARED,
                          G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
        else:
            _fwd_item(tl.program_id(0), Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                      Hkv, Lq, Lk, NQ, NK, MB, qk_scale, NSHARED,
                      G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)

    @triton.jit
    def _dq_step(q, do, lse2, delta, dq, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn, ks, qpos,
                 Lk, NK, NSHARED, qk_scale,
                 BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DOC: tl.constexpr,
                 TMA: tl.constexpr):
        NSUB: tl.constexpr = BS // BLOCK_N
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        s = it // NSUB
        j = tl.load(idx_base + s)
        jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
        ok = (j != jp) & (j >= 0) & (j < NK)
        n0 = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N
        kn = n0 + offs_n
        if MASKED:
            k_ok = kn < tl.where(ok, Lk, 0)
        if TMA:  # (BLOCK_N, D) tiles, rows past Lk zero
            kk = dk_.load([b, hkv, n0, 0]).reshape(BLOCK_N, D)
            vv = dv_.load([b, hkv, n0, 0]).reshape(BLOCK_N, D)
            kt = tl.trans(kk)
            vt = tl.trans(vv)
        elif MASKED:
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
            vt = tl.load(v_base + kn[None, :] * svn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        else:
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None])
            vt = tl.load(v_base + kn[None, :] * svn + offs_d[:, None])
        qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale
        if MASKED:
            msk = k_ok[None, :]
            if CAUSAL:
                msk = msk & (kn[None, :] <= qpos[:, None])
            if DOC:
                msk = msk & ((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED))
            qk = tl.where(msk, qk, float("-inf"))
        else:
            qk = qk + tl.where(ok, 0.0, float("-inf"))
            if DOC:
                qk = tl.where((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED), qk, float("-inf"))
        p = tl.math.exp2(qk - lse2[:, None])
        dp = _mma(do, vt, DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        if TMA:
            dq += _mma(ds.to(kk.dtype), kk, DOT_PREC, UPCAST)
        else:
            dq += _mma(ds.to(kt.dtype), tl.trans(kt), DOT_PREC, UPCAST)
        return dq

    @triton.jit
    def _dq_item(w, Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                 Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                 G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                 UPCAST: tl.constexpr, DOC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
        NSUB: tl.constexpr = BS // BLOCK_N
        flat, b, hkv, qi, row_ok, qpos, head, ks = _query_rows(w, ORDER, KS, Hkv, Lq, Lk, NQ, G, BS, BLOCK_M, DOC)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + head[:, None] * sdoh + qi[:, None] * sdom + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        row_lin = (b * Hkv * G + head) * Lq + qi
        lse2 = tl.load(LSE2 + row_lin, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_lin, mask=row_ok, other=0.0)
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh
        cnt = tl.load(CNT + flat)
        nfull = tl.load(NFULL + flat)
        idx_base = IDX + flat * MB
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        for it in tl.range(0, nfull * NSUB, warp_specialize=WS):
            dq = _dq_step(q, do, lse2, delta, dq, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn, ks,
                          qpos, Lk, NK, NSHARED, qk_scale, BS, D, BLOCK_N, False, CAUSAL, DOT_PREC, UPCAST, DOC,
                          TMA)
        for it in tl.range(nfull * NSUB, cnt * NSUB, warp_specialize=WS):
            dq = _dq_step(q, do, lse2, delta, dq, it, idx_base, k_base, v_base, dk_, dv_, b, hkv, skn, svn, ks,
                          qpos, Lk, NK, NSHARED, qk_scale, BS, D, BLOCK_N, True, CAUSAL, DOT_PREC, UPCAST, DOC,
                          TMA)
        dq_ptrs = DQ + b * sdqb + head[:, None] * sdqh + qi[:, None] * sdqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _dq_var_kernel(Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                       B, Hkv, Lq, Lk, NQ, NK, MB, N_WORK, qk_scale, scale, NSHARED, CTR,
                       G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                       UPCAST: tl.constexpr, DOC: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr,
                       WS: tl.constexpr, FLATTEN: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        if TMA:
            dk_ = tl.make_tensor_descriptor(K, shape=[B, Hkv, Lk, D], strides=[skb, skh, skn, 1],
                                            block_shape=[1, 1, BLOCK_N, D])
            dv_ = tl.make_tensor_descriptor(V, shape=[B, Hkv, Lk, D], strides=[svb, svh, svn, 1],
                                            block_shape=[1, 1, BLOCK_N, D])
        else:
            dk_ = K  # unused
            dv_ = V
        if PERSISTENT == 2:
            w = tl.atomic_add(CTR, 1)
            while w < N_WORK * NRT:
                _dq_item(w, Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                         Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                         G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
                w = tl.atomic_add(CTR, 1)
        elif PERSISTENT == 1:
            for w in tl.range(tl.program_id(0), N_WORK * NRT, tl.num_programs(0), flatten=FLATTEN):
                _dq_item(w, Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                         Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                         G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
        else:
            _dq_item(tl.program_id(0), Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS, dk_, dv_,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                     Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                     G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)

    @triton.jit
    def _kv_step(k, v, kn, dk, dv, it, REV_PERM, q_base, do_base, dq_, ddo_, b, hkv, LSE2, DELTA, row_base,
                 ks_base, sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, NSHARED,
                 G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DOC: tl.constexpr,
                 TMA: tl.constexpr):
        """One row tile of one key tile's reverse list: dK/dV += its contributions."""
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        ar = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        p = tl.load(REV_PERM + it // NRT)  # flat slot (b, hkv, m, s) of the listing entry
        m = ((p // MB) % NQ).to(tl.int32)
        rt = it % NRT
        r = rt * BLOCK_M + ar
        g = r // BS
        qi = m * BS + r % BS
        row_ok = (r < G * BS) & (qi < Lq)
        if TMA:  # queries past Lq come back as zeros
            h0 = hkv * G + (rt * BLOCK_M) // BS
            q0 = m * BS + (rt * BLOCK_M) % BS
            q = dq_.load([b, h0, q0, 0]).reshape(BLOCK_M, D)
            do = ddo_.load([b, h0, q0, 0]).reshape(BLOCK_M, D)
            if (G * BS) % BLOCK_M != 0:  # the last row tile reaches into the next KV group's heads: zero them
                q = tl.where(row_ok[:, None], q, 0.0).to(q_base.dtype.element_ty)
                do = tl.where(row_ok[:, None], do, 0.0).to(do_base.dtype.element_ty)
        else:
            q = tl.load(q_base + g[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + g[:, None] * sdoh + qi[:, None] * sdom + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)
        row = row_base + g * Lq + qi
        lse2 = tl.load(LSE2 + row, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
        qkt = _mma(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale
        if MASKED:
            qkt = tl.where(kn[:, None] <= (Lk - Lq + qi)[None, :], qkt, float("-inf"))
        if DOC:
            ks = tl.load(ks_base + qi, mask=row_ok, other=0)
            qkt = tl.where((kn[:, None] >= ks[None, :]) | (kn[:, None] < NSHARED), qkt, float("-inf"))
        pt = tl.math.exp2(qkt - lse2[None, :])
        dv += _mma(pt.to(do.dtype), do, DOT_PREC, UPCAST)
        dpt = _mma(v, tl.trans(do), DOT_PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _mma(dst.to(q.dtype), q, DOT_PREC, UPCAST)
        return dk, dv

    @triton.jit
    def _dkdv_item(w, Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS, dq_, ddo_,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                   G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   UPCAST: tl.constexpr, DOC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        NSUB: tl.constexpr = BS // BLOCK_N
        flat = tl.load(ORDER + w // NSUB)  # (b * Hkv + hkv) * NK + j, longest reverse list first
        sub = w % NSUB
        bh = flat // NK
        j = flat % NK
        b = bh // Hkv
        hkv = bh % Hkv
        offs_d = tl.arange(0, D)
        kn = j * BS + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = kn < Lk
        k = tl.load(K + b * skb + hkv * skh + kn[:, None] * skn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + hkv * svh + kn[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        e0 = tl.load(REV_OFF + flat)
        e1 = tl.load(REV_OFF + flat + 1)
        npart = tl.load(REV_NPART + flat)  # the first npart query blocks cross the diagonal
        q_base = Q + b * sqb + hkv * G * sqh
        do_base = DO + b * sdob + hkv * G * sdoh
        row_base = (b * Hkv + hkv) * G * Lq
        ks_base = KS + b * Lq
        for it in tl.range(e0 * NRT, (e0 + npart) * NRT, warp_specialize=WS):
            dk, dv = _kv_step(k, v, kn, dk, dv, it, REV_PERM, q_base, do_base, dq_, ddo_, b, hkv, LSE2, DELTA,
                              row_base, ks_base, sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, NSHARED,
                              G, BS, D, BLOCK_M, CAUSAL, DOT_PREC, UPCAST, DOC, TMA)
        for it in tl.range((e0 + npart) * NRT, e1 * NRT, warp_specialize=WS):
            dk, dv = _kv_step(k, v, kn, dk, dv, it, REV_PERM, q_base, do_base, dq_, ddo_, b, hkv, LSE2, DELTA,
                              row_base, ks_base, sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, NSHARED,
                              G, BS, D, BLOCK_M, False, DOT_PREC, UPCAST, DOC, TMA)
        dk_ptrs = DK + b * sdkb + hkv * sdkh + kn[:, None] * sdkn + offs_d[None, :]
        dv_ptrs = DV + b * sdvb + hkv * sdvh + kn[:, None] * sdvn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])

    @triton.jit
    def _dkdv_var_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                         sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                         B, Hkv, Lq, Lk, NQ, NK, MB, N_WORK, qk_scale, scale, NSHARED, CTR,
                         G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                         UPCAST: tl.constexpr, DOC: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr,
                         WS: tl.constexpr, FLATTEN: tl.constexpr):
        NSUB: tl.constexpr = BS // BLOCK_N
        HB: tl.constexpr = BLOCK_M // BS if BLOCK_M > BS else 1  # heads per row tile
        RB: tl.constexpr = BS if BLOCK_M > BS else BLOCK_M  # queries per head in a row tile
        if TMA:  # Q and dO: (1, HB heads, RB queries, D) tiles
            dq_ = tl.make_tensor_descriptor(Q, shape=[B, Hkv * G, Lq, D], strides=[sqb, sqh, sqm, 1],
                                            block_shape=[1, HB, RB, D])
            ddo_ = tl.make_tensor_descriptor(DO, shape=[B, Hkv * G, Lq, D], strides=[sdob, sdoh, sdom, 1],
                                             block_shape=[1, HB, RB, D])
        else:
            dq_ = Q  # unused
            ddo_ = DO
        if PERSISTENT == 2:
            w = tl.atomic_add(CTR, 1)
            while w < N_WORK * NSUB:
                _dkdv_item(w, Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS, dq_, ddo_,
                           sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                           sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                           G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
                w = tl.atomic_add(CTR, 1)
        elif PERSISTENT == 1:
            for w in tl.range(tl.program_id(0), N_WORK * NSUB, tl.num_programs(0), flatten=FLATTEN):
                _dkdv_item(w, Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS, dq_, ddo_,
                           sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                           sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                           G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)
        else:
            _dkdv_item(tl.program_id(0), Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS,
                       dq_, ddo_, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                       sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                       G, BS, D, BLOCK_M, BLOCK_N, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, WS)

    @triton.jit
    def _bwd_merged_kernel(Q, K, V, DO, DQ, DK, DV, LSE2, DELTA, IDX, CNT, NFULL, ORDER_Q,
                           REV_OFF, REV_PERM, REV_NPART, ORDER_K, KS,
                           sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                           sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                           B, Hkv, Lq, Lk, NQ, NK, MB, N_KWORK, qk_scale, scale, NSHARED,
                           G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M1: tl.constexpr,
                           BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                           CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DOC: tl.constexpr,
                           TMA: tl.constexpr):
        """Programs [0, N_KWORK * BS / BLOCK_N1): one key tile's dK/dV each; the rest: one query row tile's dQ."""
        NSUB1: tl.constexpr = BS // BLOCK_N1
        HB: tl.constexpr = BLOCK_M1 // BS if BLOCK_M1 > BS else 1
        RB: tl.constexpr = BS if BLOCK_M1 > BS else BLOCK_M1
        if TMA:
            dq_ = tl.make_tensor_descriptor(Q, shape=[B, Hkv * G, Lq, D], strides=[sqb, sqh, sqm, 1],
                                            block_shape=[1, HB, RB, D])
            ddo_ = tl.make_tensor_descriptor(DO, shape=[B, Hkv * G, Lq, D], strides=[sdob, sdoh, sdom, 1],
                                             block_shape=[1, HB, RB, D])
            dk_ = tl.make_tensor_descriptor(K, shape=[B, Hkv, Lk, D], strides=[skb, skh, skn, 1],
                                            block_shape=[1, 1, BLOCK_N2, D])
            dv_ = tl.make_tensor_descriptor(V, shape=[B, Hkv, Lk, D], strides=[svb, svh, svn, 1],
                                            block_shape=[1, 1, BLOCK_N2, D])
        else:
            dq_, ddo_, dk_, dv_ = Q, DO, K, V  # unused
        w = tl.program_id(0)
        n_kv = N_KWORK * NSUB1
        if w < n_kv:
            _dkdv_item(w, Q, K, V, DO, DK, DV, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER_K, KS, dq_, ddo_,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                       sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                       G, BS, D, BLOCK_M1, BLOCK_N1, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, False)
        else:
            _dq_item(w - n_kv, Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER_Q, KS, dk_, dv_,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                     Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                     G, BS, D, BLOCK_M2, BLOCK_N2, CAUSAL, DOT_PREC, UPCAST, DOC, TMA, False)

    def _mcfg(m1, n1, m2, n2, w, s):
        return triton.Config({"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}, num_warps=w,
                             num_stages=s)

    # The split kernels' configs paired (dK/dV tile, dQ tile) at one num_warps / num_stages.
    _MERGED = [_mcfg(64, 128, 128, 64, 8, 2), _mcfg(64, 128, 128, 64, 8, 3), _mcfg(32, 128, 128, 64, 8, 3),
               _mcfg(64, 64, 64, 64, 4, 3), _mcfg(32, 64, 64, 32, 4, 3), _mcfg(64, 64, 128, 64, 8, 3)]

    def _mprune(configs, named_args, **kwargs):
        bs = kwargs.get("BS", named_args.get("BS"))
        kept = [c for c in configs if c.kwargs["BLOCK_N1"] <= bs and c.kwargs["BLOCK_N2"] <= bs]
        return kept or [_mcfg(64, bs, 64, bs, 4, 2)]

    _MERGED_TUNED = triton.autotune(_MERGED, key=["D", "BS", "G", "CAUSAL", "DOC", "TMA"],
                                    prune_configs_by={"early_config_prune": _mprune})(_bwd_merged_kernel)

    def _cfg(bm, bn, w, s, ws=False, flat=False, maxnreg=None):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": ws, "FLATTEN": flat}, num_warps=w, num_stages=s,
                             maxnreg=maxnreg)

    # Each variant kernel's plain configs are the default kernel's (same tiles, warps, stages); "ws" adds the
    # warp-specialized loops and deeper/shallower pipelines on the tiles the default autotuner picked on the H100,
    # the flattened persistent loop, and an 8-warp tile capped at 128 registers a thread (maxnreg), so that two
    # CTAs fit an SM (the default's chosen tiles ran at 255 registers, one CTA an SM, on the H100).
    _PLAIN = {
        "fwd": [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3),
                _cfg(128, 64, 8, 2)],
        "dq": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 4)],
        "dkdv": [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3),
                 _cfg(64, 64, 8, 3)],
    }
    _WS = {
        "fwd": [_cfg(128, 128, 8, 3, True), _cfg(128, 64, 4, 3, True), _cfg(128, 128, 8, 2, True),
                _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 4), _cfg(64, 64, 4, 5), _cfg(128, 128, 8, 3, flat=True),
                _cfg(128, 64, 8, 2, maxnreg=128)],
        "dq": [_cfg(128, 64, 8, 3, True), _cfg(64, 64, 4, 3, True), _cfg(128, 64, 8, 4), _cfg(64, 32, 4, 5),
               _cfg(128, 64, 8, 3, flat=True), _cfg(128, 64, 8, 2, maxnreg=128)],
        "dkdv": [_cfg(64, 128, 8, 2, True), _cfg(32, 128, 8, 3, True), _cfg(64, 128, 8, 3), _cfg(32, 64, 4, 5),
                 _cfg(64, 128, 8, 2, flat=True), _cfg(64, 128, 8, 2, maxnreg=128)],
    }

    def _prune(configs, named_args, **kwargs):
        """Key tiles no wider than a block; FLATTEN only where there is a static persistent loop to flatten."""
        bs = kwargs.get("BS", named_args.get("BS"))
        static = kwargs.get("PERSISTENT", named_args.get("PERSISTENT")) == 1
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= bs and (static or not c.kwargs["FLATTEN"])]
        return kept or [_cfg(64, bs, 4, 2)]

    _KEY = ["D", "BS", "G", "CAUSAL", "DOC", "PERSISTENT", "TMA"]
    _KERNELS = {"fwd": _fwd_var_kernel, "dq": _dq_var_kernel, "dkdv": _dkdv_var_kernel}
    # (kernel name, with ws configs) -> autotuner; the persistent / tma flags are part of the key.
    # reset_to_zero: the dynamic schedule's counter starts at 0 in every tuning run (and after tuning).
    _TUNED = {(name, ws): triton.autotune(_PLAIN[name] + (_WS[name] if ws else []), key=_KEY,
                                          prune_configs_by={"early_config_prune": _prune},
                                          reset_to_zero=["CTR"])(kern)
              for name, kern in _KERNELS.items() for ws in (False, True)}


# Tile sizes under the interpreter (tests change them to reach every tiling regime).
INTERPRET_CONFIG = {"fwd": (64, 64), "dq": (64, 64), "dkdv": (64, 64)}  # "merged": the dkdv and dq tiles


def _fixed_config(name: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel `name` when nothing autotunes: the interpreter's small
    tile, or the GPU's fixed config (`MEMSPARSE_SPARSE_ATTENTION_AUTOTUNE=0`)."""
    return (*INTERPRET_CONFIG[name], 4, 1) if interpreting() else _tri.FIXED_CONFIG[name]


def _launch(name: str, parts: frozenset, n_items_fn, device: torch.device, *args, **meta):
    """Autotuned on a GPU (with the ws configs when asked); under the interpreter (or with autotuning off) one
    fixed tile, its loops marked warp-specialized when "ws" is asked (the interpreter ignores the mark).
    n_items_fn(cfg) -> the number of work items; a persistent launch runs min(programs, items) programs."""
    mode = 2 if "dynamic" in parts else (1 if "persistent" in parts else 0)
    nprog = persistent_programs(device) if mode else None

    def grid(cfg):
        n = n_items_fn(cfg)
        return (min(n, nprog) if mode else n,)

    # the dynamic schedule's work counter (a fresh zero per launch; unused, and never zeroed, otherwise)
    ctr = (torch.zeros if mode == 2 else torch.empty)(1, dtype=torch.int32, device=device)
    meta.update(PERSISTENT=mode, TMA="tma" in parts, CTR=ctr)
    if "tma" in parts:
        _ensure_allocator(device)
    if interpreting() or not _tri.AUTOTUNE:
        bm, bn, warps, stages = _fixed_config(name)
        bn = min(bn, meta["BS"])
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn}
        _KERNELS[name][grid(cfg)](*args, BLOCK_M=bm, BLOCK_N=bn, WS="ws" in parts, FLATTEN=False,
                                  num_warps=warps, num_stages=stages, **meta)
    else:
        _TUNED[(name, "ws" in parts)][lambda cfg: grid(cfg)](*args, **meta)


def _launch_merged(parts: frozenset, device: torch.device, n_qwork: int, n_kwork: int, *args, **meta):
    """The merged backward: n_kwork * (bs / BLOCK_N1) dK/dV programs, then n_qwork * ceil(G * bs / BLOCK_M2) dQ
    programs, in one launch (autotuned on a GPU; under the interpreter the dkdv and dq tiles of
    INTERPRET_CONFIG)."""
    G, bs = meta["G"], meta["BS"]

    def grid(cfg):
        return (n_kwork * (bs // cfg["BLOCK_N1"]) + n_qwork * triton.cdiv(G * bs, cfg["BLOCK_M2"]),)

    if "tma" in parts:
        _ensure_allocator(device)
    if interpreting() or not _tri.AUTOTUNE:
        m1, n1, warps, stages = _fixed_config("dkdv")  # one launch: the dK/dV kernel's warps and stages
        m2, n2 = _fixed_config("dq")[:2]
        cfg = {"BLOCK_M1": m1, "BLOCK_N1": min(n1, bs), "BLOCK_M2": m2, "BLOCK_N2": min(n2, bs)}
        _bwd_merged_kernel[grid(cfg)](*args, **cfg, num_warps=warps, num_stages=stages, **meta)
    else:
        _MERGED_TUNED[lambda cfg: grid(cfg)](*args, **meta)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt_c: Tensor, nfull: Tensor, order: Tensor,
              block_size: int, causal: bool, scale: float, key_start: Tensor | None, shared_keys: int,
              parts: frozenset) -> tuple[Tensor, Tensor]:
    q, k, v = (_tri._last_dim_contig(t) for t in (q, k, v))
    if "tma" in parts:
        k, v = _tma_ready(k), _tma_ready(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    NQ, NK, MB = idx.shape[2], math.ceil(Lk / block_size), idx.shape[3]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if _tri.POISON_OUTPUTS:
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
    n_work = B * Hkv * NQ
    _launch("fwd", parts, lambda c: n_work * triton.cdiv(G * block_size, c["BLOCK_M"]), q.device,
            q, k, v, o, lse, idx, cnt_c, nfull, order, _tri._ks_arg(key_start, cnt_c),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            B, Hkv, Lq, Lk, NQ, NK, MB, n_work, scale * LOG2E, shared_keys,
            G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=_tri._dot_prec(q.dtype), UPCAST=_tri._upcast(q.dtype),
            DOC=key_start is not None)
    return o, lse


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Tensor | None,
              idx: Tensor, cnt_c: Tensor, nfull: Tensor, order_q: Tensor, keys: Tensor, npart: Tensor,
              block_size: int, causal: bool, scale: float, key_start: Tensor | None, shared_keys: int,
              parts: frozenset):
    """Split backward (delta prep, dQ, dK/dV) with the variant's grids and loads."""
    q, k, v, do, o = (_tri._last_dim_contig(t) for t in (q, k, v, do, o))
    if "tma" in parts:
        q, k, v, do = (_tma_ready(t) for t in (q, k, v, do))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    NQ, NK, MB = idx.shape[2], math.ceil(Lk / block_size), idx.shape[3]
    rev_off, rev_perm, rev_npart, order_k = _tri._reverse_from_keys(keys, npart)
    lse2, delta = _tri._bwd_prep(do, o, lse, dlse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if _tri.POISON_OUTPUTS:
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    prec, up, doc = _tri._dot_prec(q.dtype), _tri._upcast(q.dtype), key_start is not None
    ks = _tri._ks_arg(key_start, cnt_c)
    n_qwork = B * Hkv * NQ
    n_kwork = B * Hkv * NK
    if "merged" in parts:
        _launch_merged(parts, q.device, n_qwork, n_kwork,
                       q, k, v, do, dq, dk, dv, lse2, delta, idx, cnt_c, nfull, order_q,
                       rev_off, rev_perm, rev_npart, order_k, ks,
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                       dq.stride(0), dq.stride(1), dq.stride(2),
                       dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                       B, Hkv, Lq, Lk, NQ, NK, MB, n_kwork, scale * LOG2E, scale, shared_keys,
                       G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=prec, UPCAST=up, DOC=doc,
                       TMA="tma" in parts)
        return dq, dk, dv
    _launch("dq", parts, lambda c: n_qwork * triton.cdiv(G * block_size, c["BLOCK_M"]), q.device,
            q, k, v, do, dq, lse2, delta, idx, cnt_c, nfull, order_q, ks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            B, Hkv, Lq, Lk, NQ, NK, MB, n_qwork, scale * LOG2E, scale, shared_keys,
            G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=prec, UPCAST=up, DOC=doc)
    _launch("dkdv", parts, lambda c: n_kwork * (block_size // c["BLOCK_N"]), q.device,
            q, k, v, do, dk, dv, lse2, delta, rev_off, rev_perm, rev_npart, order_k, ks,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            B, Hkv, Lq, Lk, NQ, NK, MB, n_kwork, scale * LOG2E, scale, shared_keys,
            G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=prec, UPCAST=up, DOC=doc)
    return dq, dk, dv


@torch.library.custom_op("memsparse::sparse_attention_fwd_variant", mutates_args=())
def sparse_attention_fwd_variant(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cnt_c: Tensor,
                                 nfull: Tensor, order: Tensor, keys: Tensor, npart: Tensor, block_size: int,
                                 causal: bool, scale: float, key_start: Tensor | None, shared_keys: int,
                                 variant: str) -> tuple[Tensor, Tensor]:
    """A variant's forward on a plan from `sparse_attention_plan`: (o, lse fp32)."""
    return _fwd_impl(q, k, v, block_indices, cnt_c, nfull, order, block_size, causal, scale, key_start,
                     shared_keys, parse_variant(variant))


@sparse_attention_fwd_variant.register_fake
def _(q, k, v, block_indices, cnt_c, nfull, order, keys, npart, block_size, causal, scale, key_start, shared_keys,
      variant):
    B, Hq, Lq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("memsparse::sparse_attention_bwd_variant", mutates_args=())
def sparse_attention_bwd_variant(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                                 dlse: Tensor | None, block_indices: Tensor, cnt_c: Tensor, nfull: Tensor,
                                 order: Tensor, keys: Tensor, npart: Tensor, block_size: int, causal: bool,
                                 scale: float, key_start: Tensor | None, shared_keys: int,
                                 variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """A variant's backward: (dq, dk, dv); MEMSPARSE_SPARSE_ATTENTION_BWD=fused runs the default fused one."""
    if _tri.bwd_mode() == "fused":
        return _tri._bwd_impl(do, q, k, v, o, lse, dlse, block_indices, cnt_c, nfull, order, keys, npart,
                              block_size, causal, scale, True, key_start, shared_keys)
    return _bwd_impl(do, q, k, v, o, lse, dlse, block_indices, cnt_c, nfull, order, keys, npart, block_size,
                     causal, scale, key_start, shared_keys, parse_variant(variant))


@sparse_attention_bwd_variant.register_fake
def _(do, q, k, v, o, lse, dlse, block_indices, cnt_c, nfull, order, keys, npart, block_size, causal, scale,
      key_start, shared_keys, variant):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    (q, k, v, idx, cnt_c, nfull, order, keys, npart, block_size, causal, scale, key_start, shared_keys,
     variant) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, idx, cnt_c, nfull, order, keys, npart, key_start)
    ctx.meta = (block_size, causal, scale, shared_keys, variant)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, idx, cnt_c, nfull, order, keys, npart, key_start = ctx.saved_tensors
    block_size, causal, scale, shared_keys, variant = ctx.meta
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = sparse_attention_bwd_variant(do, q, k, v, o, lse, dlse, idx, cnt_c, nfull, order, keys, npart,
                                              block_size, causal, scale, key_start, shared_keys, variant)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


sparse_attention_fwd_variant.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention_variant(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: Tensor, *,
                             block_size: int, variant: str, causal: bool = True, scale: float | None = None,
                             return_lse: bool = False, key_start: Tensor | None = None, shared_keys: int = 0):
    """The Triton path through a variant (inputs already checked; `variant` not "default")."""
    parse_variant(variant)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if block_indices.shape[-1] == 0:  # no slots at all: one padding slot keeps pointers valid
        block_indices = block_indices.new_zeros((*block_indices.shape[:3], 1))
        block_counts = torch.zeros_like(block_counts)
    idx = block_indices.to(torch.int32).contiguous()
    Lq, Lk = q.shape[2], k.shape[2]
    plan = _tri.sparse_attention_plan(idx, block_counts, Lq, Lk, block_size, causal)
    ks = None if key_start is None else key_start.to(torch.int32).contiguous()
    o, lse = sparse_attention_fwd_variant(q, k, v, idx, *plan, block_size, causal, scale, ks, int(shared_keys),
                                          variant)
    return (o, lse) if return_lse else o
