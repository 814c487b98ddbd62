"""Triton block-sparse flash attention, forward and backward (contract: `sparse_attention_reference`).

Design (docs/kernels.md has the long form):
- Rows. A program owns one query block m of one (batch, KV head) and a tile of BLOCK_M rows of the
  flattened (G query heads x block_size queries) row space, so the G heads of a GQA group share each
  key/value tile load (one tile spans several heads when BLOCK_M > block_size).
- Forward / dQ. Loop over the block's listed key blocks (BLOCK_N keys at a time). Lists are split on
  the host side into a prefix of "full" blocks (entirely visible to every query of the block, no
  element mask: the unmasked fast loop) and the rest (diagonal / key-tail / out-of-order blocks:
  masked loop). Invalid slots and an entry equal to its predecessor (lists are sorted, so that is a
  duplicate) get a -inf score bias instead of a branch, which keeps the loop body pipelinable.
- dK/dV. A reverse index (key block -> ascending list of query blocks that list it), built on the
  GPU with a stable sort + searchsorted, lets one program own a key tile and accumulate dK/dV in
  registers over its query blocks: no atomics, deterministic, attention matrix never stored.
- Programs are launched heaviest first (longest list first), so the sink block's dK/dV program,
  listed by every query block, starts at once rather than last.
- lse is saved per query row (natural log); the backward uses delta = rowsum(dO * O) - dlse, so
  gradients flow through a returned lse too.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # triton is optional: without it the dispatcher uses the reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Debug aid for tests: fill every output buffer with NaN before the kernels run, so an element that
# a kernel fails to write shows up as NaN instead of as a plausible stale value.
POISON_OUTPUTS = os.environ.get("MEMSPARSE_POISON_OUTPUTS", "0") == "1"
# Tile sizes used under TRITON_INTERPRET=1 (no autotuning there); tests change them to reach every
# tiling regime (BLOCK_N < block_size, BLOCK_M < or > block_size).
INTERPRET_CONFIG = {"fwd": (64, 64), "dq": (64, 64), "dkdv": (64, 64), "fused": (64, 64)}
# GPU launches autotune (configs below, cached per head dim / block size / GQA group / dtype); with
# AUTOTUNE = False they use FIXED_CONFIG ((BLOCK_M, BLOCK_N, num_warps, num_stages)): one compile each.
AUTOTUNE = os.environ.get("MEMSPARSE_SPARSE_ATTENTION_AUTOTUNE", "1") == "1"
FIXED_CONFIG = {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "fused": (64, 64, 4, 2)}
# Backward variant (read at each backward call): "split" = separate dQ and dK/dV kernels (7 matmuls per tile
# pair); "fused" = one pass per key tile computing dK/dV and adding dQ with fp32 atomics (5 matmuls). Both are
# correct on the H100; split is the default because fused measured slower there (32K MHA fwd+bwd 9.99 ms vs
# 8.47 ms, benchmarks/results/sparse_attention_h100_v2.md): the dQ atomics cost more than the 2 matmuls saved.
EXTRA_CONFIGS_ENV_VAR = "MEMSPARSE_SPARSE_ATTENTION_EXTRA_CONFIGS"


def parse_extra_configs(text: str) -> dict[str, list[tuple[int, int, int, int]]]:
    """Candidate tilings to append to the autotune lists, read once at import from
    MEMSPARSE_SPARSE_ATTENTION_EXTRA_CONFIGS: "dkdv:128,64,8,3;fwd:64,128,4,2" (kernel: BLOCK_M, BLOCK_N,
    num_warps, num_stages), so a GPU run can time a tiling beside the tuned ones (the bench's --report lists
    every timed config) before it joins a list. Returns {kernel: [config, ...]}; a malformed entry raises."""
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, nums = item.partition(":")
        name = name.strip()
        try:
            cfg = tuple(int(x) for x in nums.split(","))
        except ValueError:
            cfg = ()
        if name not in FIXED_CONFIG or len(cfg) != 4 or min(cfg) < 1 or any(v & (v - 1) for v in cfg[:3]):
            raise ValueError(f"{EXTRA_CONFIGS_ENV_VAR}: {item!r} is not kernel:BLOCK_M,BLOCK_N,warps,stages "
                             f"(kernel one of {sorted(FIXED_CONFIG)}; tiles and warps powers of two)")
        out.setdefault(name, []).append(cfg)
    return out


EXTRA_CONFIGS = parse_extra_configs(os.environ.get(EXTRA_CONFIGS_ENV_VAR, ""))
BWD_ENV_VAR = "MEMSPARSE_SPARSE_ATTENTION_BWD"
BWD_MODES = ("split", "fused")
DEFAULT_BWD_MODE = "split"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(q: Tensor, block_size: int) -> str | None:
    """Why the Triton path cannot run these inputs (None when it can)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {SUPPORTED_HEAD_DIMS}"
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size {block_size} not in {SUPPORTED_BLOCK_SIZES}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not in {SUPPORTED_DTYPES}"
    if not q.is_cuda and not interpreting():
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    return None


if HAS_TRITON:

    @triton.jit
    def _mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the CPU interpreter's bf16 tl.dot is wrong (triton 3.9), so it multiplies the same
        # bf16-rounded operands in fp32 instead; GPU launches never set it.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, IDX, CNT, NFULL, ORDER, KS,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                    Hkv, Lq, Lk, NQ, NK, MB, qk_scale, NSHARED,
                    G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                    UPCAST: tl.constexpr, DOC: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        NSUB: tl.constexpr = BS // BLOCK_N
        pid = tl.program_id(0)
        flat = tl.load(ORDER + pid // NRT)  # (b * Hkv + hkv) * NQ + m, heaviest first
        rt = pid % NRT
        bh = flat // NQ
        m = flat % NQ
        b = bh // Hkv
        hkv = bh % Hkv

        r = rt * BLOCK_M + tl.arange(0, BLOCK_M)
        g = r // BS
        qi = m * BS + r % BS
        row_ok = (r < G * BS) & (qi < Lq)
        qpos = Lk - Lq + qi
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        head = hkv * G + g
        if DOC:  # documents: this row sees keys from its document's first key on, and the shared keys
            ks = tl.load(KS + b * Lq + qi, mask=row_ok, other=0)

        q_ptrs = Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh

        cnt = tl.load(CNT + flat)
        nfull = tl.load(NFULL + flat)
        idx_base = IDX + flat * MB

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)

        # Fast loop: blocks fully visible to every row, no element mask.
        for it in range(0, nfull * NSUB):
            s = it // NSUB
            j = tl.load(idx_base + s)
            jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
            ok = (j != jp) & (j >= 0) & (j < NK)
            bias = tl.where(ok, 0.0, float("-inf"))
            kn = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N + offs_n
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None])
            qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale + bias
            if DOC:
                qk = tl.where((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :])
            acc = acc * alpha[:, None] + _mma(p.to(vt.dtype), vt, DOT_PREC, UPCAST)
            m_i = m_new

        # Masked loop: diagonal blocks, the key tail, anything out of order.
        for it in range(nfull * NSUB, cnt * NSUB):
            s = it // NSUB
            j = tl.load(idx_base + s)
            jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
            ok = (j != jp) & (j >= 0) & (j < NK)
            kn = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N + offs_n
            k_ok = kn < tl.where(ok, Lk, 0)  # (a scalar bool & a vector trips the interpreter)
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
            qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale
            msk = k_ok[None, :]
            if CAUSAL:
                msk = msk & (kn[None, :] <= qpos[:, None])
            if DOC:
                msk = msk & ((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED))
            qk = tl.where(msk, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + _mma(p.to(vt.dtype), vt, DOT_PREC, UPCAST)
            m_i = m_new

        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o_ptrs = O + b * sob + head[:, None] * soh + qi[:, None] * som + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (b * Hkv * G + head) * Lq + qi, lse, mask=row_ok)

    @triton.jit
    def _dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, IDX, CNT, NFULL, ORDER, KS,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                   Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                   G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   UPCAST: tl.constexpr, DOC: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        NSUB: tl.constexpr = BS // BLOCK_N
        pid = tl.program_id(0)
        flat = tl.load(ORDER + pid // NRT)
        rt = pid % NRT
        bh = flat // NQ
        m = flat % NQ
        b = bh // Hkv
        hkv = bh % Hkv

        r = rt * BLOCK_M + tl.arange(0, BLOCK_M)
        g = r // BS
        qi = m * BS + r % BS
        row_ok = (r < G * BS) & (qi < Lq)
        qpos = Lk - Lq + qi
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        head = hkv * G + g
        if DOC:
            ks = tl.load(KS + b * Lq + qi, mask=row_ok, other=0)

        q = tl.load(Q + b * sqb + head[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + head[:, None] * sdoh + qi[:, None] * sdom + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        row_lin = (b * Hkv * G + head) * Lq + qi
        # LSE2 holds lse * log2(e) with +inf for rows that saw no key, so their p is exactly 0.
        lse2 = tl.load(LSE2 + row_lin, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_lin, mask=row_ok, other=0.0)
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh

        cnt = tl.load(CNT + flat)
        nfull = tl.load(NFULL + flat)
        idx_base = IDX + flat * MB
        dq = tl.zeros([BLOCK_M, D], tl.float32)

        for it in range(0, nfull * NSUB):
            s = it // NSUB
            j = tl.load(idx_base + s)
            jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
            ok = (j != jp) & (j >= 0) & (j < NK)
            bias = tl.where(ok, 0.0, float("-inf"))
            kn = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N + offs_n
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None])
            vt = tl.load(v_base + kn[None, :] * svn + offs_d[:, None])
            qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale + bias
            if DOC:
                qk = tl.where((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED), qk, float("-inf"))
            p = tl.math.exp2(qk - lse2[:, None])
            dp = _mma(do, vt, DOT_PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mma(ds.to(kt.dtype), tl.trans(kt), DOT_PREC, UPCAST)

        for it in range(nfull * NSUB, cnt * NSUB):
            s = it // NSUB
            j = tl.load(idx_base + s)
            jp = tl.load(idx_base + s - 1, mask=s > 0, other=-1)
            ok = (j != jp) & (j >= 0) & (j < NK)
            kn = tl.minimum(tl.maximum(j, 0), NK - 1) * BS + (it % NSUB) * BLOCK_N + offs_n
            k_ok = kn < tl.where(ok, Lk, 0)  # (a scalar bool & a vector trips the interpreter)
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
            vt = tl.load(v_base + kn[None, :] * svn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
            qk = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale
            msk = k_ok[None, :]
            if CAUSAL:
                msk = msk & (kn[None, :] <= qpos[:, None])
            if DOC:
                msk = msk & ((kn[None, :] >= ks[:, None]) | (kn[None, :] < NSHARED))
            qk = tl.where(msk, qk, float("-inf"))
            p = tl.math.exp2(qk - lse2[:, None])
            dp = _mma(do, vt, DOT_PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mma(ds.to(kt.dtype), tl.trans(kt), DOT_PREC, UPCAST)

        dq_ptrs = DQ + b * sdqb + head[:, None] * sdqh + qi[:, None] * sdqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _kv_steps(k, v, kn, dk, dv, lo, hi, REV_PERM, q_base, do_base, LSE2, DELTA, DQA, row_base, ks_base,
                  sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, scale, NSHARED,
                  G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  MASKED: tl.constexpr, FUSED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  DOC: tl.constexpr):
        """Row tiles lo..hi of one key tile's reverse list: dK/dV in registers (+ dQ atomics when FUSED)."""
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M
        ar = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        for it in range(lo, hi):
            p = tl.load(REV_PERM + it // NRT)  # flat slot (b, hkv, m, s) of the listing entry
            m = ((p // MB) % NQ).to(tl.int32)
            r = (it % NRT) * BLOCK_M + ar
            g = r // BS
            qi = m * BS + r % BS
            row_ok = (r < G * BS) & (qi < Lq)
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
            if DOC:  # every step: a listing query block may hold rows of a later document
                ks = tl.load(ks_base + qi, mask=row_ok, other=0)
                qkt = tl.where((kn[:, None] >= ks[None, :]) | (kn[:, None] < NSHARED), qkt, float("-inf"))
            pt = tl.math.exp2(qkt - lse2[None, :])
            dv += _mma(pt.to(do.dtype), do, DOT_PREC, UPCAST)
            dpt = _mma(v, tl.trans(do), DOT_PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dst_lo = dst.to(q.dtype)
            dk += _mma(dst_lo, q, DOT_PREC, UPCAST)
            if FUSED:
                # dQ rows of this tile += dS @ K (keys past Lk load as 0, so they add exactly 0)
                dq = _mma(tl.trans(dst_lo), k, DOT_PREC, UPCAST) * scale
                tl.atomic_add(DQA + row[:, None] * D + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, DK, DV, DQA, LSE2, DELTA, REV_OFF, REV_PERM, REV_NPART, ORDER, KS,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     Hkv, Lq, Lk, NQ, NK, MB, qk_scale, scale, NSHARED,
                     G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, FUSED: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr, DOC: tl.constexpr):
        NRT: tl.constexpr = (G * BS + BLOCK_M - 1) // BLOCK_M  # row tiles per query block
        NSUB: tl.constexpr = BS // BLOCK_N
        pid = tl.program_id(0)
        flat = tl.load(ORDER + pid // NSUB)  # (b * Hkv + hkv) * NK + j, longest reverse list first
        sub = pid % NSUB
        bh = flat // NK
        j = flat % NK
        b = bh // Hkv
        hkv = bh % Hkv

        offs_d = tl.arange(0, D)
        kn = j * BS + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = kn < Lk
        # Keys past Lk load as 0; their rows of dK/dV are junk but never stored.
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
        # Masked steps (query blocks crossing the diagonal) first, then the unmasked rest.
        ks_base = KS + b * Lq
        dk, dv = _kv_steps(k, v, kn, dk, dv, e0 * NRT, (e0 + npart) * NRT, REV_PERM, q_base, do_base, LSE2, DELTA,
                           DQA, row_base, ks_base, sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, scale, NSHARED,
                           G, BS, D, BLOCK_M, CAUSAL, FUSED, DOT_PREC, UPCAST, DOC)
        dk, dv = _kv_steps(k, v, kn, dk, dv, (e0 + npart) * NRT, e1 * NRT, REV_PERM, q_base, do_base, LSE2, DELTA,
                           DQA, row_base, ks_base, sqh, sqm, sdoh, sdom, Lq, Lk, NQ, MB, qk_scale, scale, NSHARED,
                           G, BS, D, BLOCK_M, False, FUSED, DOT_PREC, UPCAST, DOC)

        dk_ptrs = DK + b * sdkb + hkv * sdkh + kn[:, None] * sdkn + offs_d[None, :]
        dv_ptrs = DV + b * sdvb + hkv * sdvh + kn[:, None] * sdvn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])

    @triton.jit
    def _plan_kernel(IDX, CNT, CNT_C, NFULL, KEYS, NPART, NROWS, NQ, NK, MB, Lq, Lk,
                     BS: tl.constexpr, CAUSAL: tl.constexpr, R: tl.constexpr, MBP: tl.constexpr):
        """Per list (b, hkv, m): clamped count, unmasked-prefix length; per slot: reverse-index sort key
        ((b*Hkv + hkv)*NK + j for a valid first occurrence, B*Hkv*NK otherwise) and the diagonal count."""
        rows = tl.program_id(0) * R + tl.arange(0, R)
        rok = rows < NROWS
        m = rows % NQ
        bh = rows // NQ
        s = tl.arange(0, MBP)
        c = tl.load(CNT + rows, mask=rok, other=0)
        c = tl.minimum(tl.maximum(c, 0), MB)
        sok = rok[:, None] & (s[None, :] < MB)
        base = IDX + rows[:, None] * MB + s[None, :]
        j = tl.load(base, mask=sok, other=-1)
        jp = tl.load(base - 1, mask=sok & (s[None, :] > 0), other=-1)
        in_cnt = s[None, :] < c[:, None]
        qlo = Lk - Lq + m * BS  # first query position of the block
        full = (j + 1) * BS <= Lk
        if CAUSAL:
            full = full & ((j + 1) * BS - 1 <= qlo[:, None])
        first_bad = tl.min(tl.where(in_cnt & (full == 0), s[None, :], MB), 1)
        nfull = tl.minimum(first_bad, c)
        tl.store(CNT_C + rows, c, mask=rok)
        tl.store(NFULL + rows, nfull, mask=rok)
        valid = in_cnt & (j >= 0) & (j < NK) & (j != jp)
        n_keys = (NROWS // NQ) * NK
        key = tl.where(valid, bh[:, None] * NK + j, n_keys)
        tl.store(KEYS + rows[:, None] * MB + s[None, :], key, mask=sok)
        if CAUSAL:
            part = valid & ((j + 1) * BS - 1 > qlo[:, None])
            tl.atomic_add(NPART + key, tl.full([R, MBP], 1, tl.int32), mask=part, sem="relaxed")

    @triton.jit
    def _bwd_prep_kernel(O, DO, LSE, DLSE, LSE2, DELTA, sob, soh, som, sdob, sdoh, sdom, Hq, Lq,
                         HAS_DLSE: tl.constexpr, D: tl.constexpr, R: tl.constexpr):
        """delta = rowsum(dO * O) - dlse; lse2 = lse * log2(e), +inf where lse is -inf (row saw no key)."""
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        rows = tl.program_id(0) * R + tl.arange(0, R)
        ok = rows < Lq
        offs_d = tl.arange(0, D)
        o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lin = bh * Lq + rows
        if HAS_DLSE:
            delta -= tl.load(DLSE + lin, mask=ok, other=0.0)
        lse = tl.load(LSE + lin, mask=ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        tl.store(DELTA + lin, delta, mask=ok)
        tl.store(LSE2 + lin, lse2, mask=ok)

    def _cfg(bm, bn, w, s):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)

    def _configs(name, base):
        """`base` tilings plus the EXTRA_CONFIGS candidates for kernel `name` not already among them."""
        return [_cfg(*c) for c in dict.fromkeys([*base, *EXTRA_CONFIGS.get(name, [])])]

    def _prune(configs, named_args, **kwargs):
        bs = kwargs.get("BS", named_args.get("BS"))
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= bs]
        return kept or [_cfg(64, bs, 4, 2)]

    _KEY = ["D", "BS", "G", "CAUSAL", "DOC"]  # triton adds the tensor dtypes to the key
    _fwd_tuned = triton.autotune(
        _configs("fwd", [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]),
        key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
    _dq_tuned = triton.autotune(
        _configs("dq", [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4)]),
        key=_KEY, prune_configs_by={"early_config_prune": _prune})(_dq_kernel)

    def _prune_dkdv(configs, named_args, **kwargs):
        # The 128-row tile was checked against the reference on an H100 in bf16 at every head dim and in fp32 up to
        # head dim 64 (benchmarks/results/dkdv_candidates_check_h100_2026-12-07/); fp32 at 128 was not (8 warps ask
        # 362 KB of shared memory, 4 warps did not finish the check), so it is not offered there.
        d, q = kwargs.get("D", named_args.get("D")), named_args.get("Q")
        if q is not None and q.dtype == torch.float32 and d is not None and d > 64:
            configs = [c for c in configs if c.kwargs["BLOCK_M"] < 128]
        return _prune(configs, named_args, **kwargs)

    # 128x64 at 4 warps: dK/dV 1.09 ms against 64x64's 1.83 at 32K 8/4 heads D=64 (H100, 2026-12-07,
    # benchmarks/results/dkdv_timing_h100_2026-12-07/)
    _dkdv_tuned = triton.autotune(
        _configs("dkdv", [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3),
                          (128, 64, 4, 3)]),
        key=_KEY + ["FUSED"], prune_configs_by={"early_config_prune": _prune_dkdv})(_dkdv_kernel)
    # The fused backward adds a (BLOCK_M x D) fp32 atomic per step: wide key tiles halve that traffic.
    _fused_tuned = triton.autotune(
        _configs("fused", [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 8, 2)]),
        key=_KEY + ["FUSED"], prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=["DQA"])(_dkdv_kernel)


def _launch(name, tuned, plain, n_tiles_fn, *args, **meta):
    """Autotuned launch on GPU; a fixed config under the interpreter or with AUTOTUNE off."""
    if interpreting() or not AUTOTUNE:
        bm, bn, warps, stages = (*INTERPRET_CONFIG[name], 4, 1) if interpreting() else FIXED_CONFIG[name]
        bn = min(bn, meta["BS"])
        grid = (n_tiles_fn({"BLOCK_M": bm, "BLOCK_N": bn}),)
        plain[grid](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)
    else:
        tuned[lambda cfg: (n_tiles_fn(cfg),)](*args, **meta)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def bwd_mode() -> str:
    """Backward variant: "split" (dQ and dK/dV kernels, the default) or "fused" (one pass per key tile, dQ by
    fp32 atomics), from MEMSPARSE_SPARSE_ATTENTION_BWD."""
    mode = os.environ.get(BWD_ENV_VAR, DEFAULT_BWD_MODE).strip().lower() or DEFAULT_BWD_MODE
    if mode not in BWD_MODES:
        raise ValueError(f"{BWD_ENV_VAR} must be one of {BWD_MODES}, got {mode!r}")
    return mode


# ------------------------------------------------------------------------------------------------- plan
def _plan_impl(idx: Tensor, cnt: Tensor, Lq: int, Lk: int, bs: int, causal: bool):
    B, Hkv, NQ, MB = idx.shape
    NK = math.ceil(Lk / bs)
    dev = idx.device
    nrows = B * Hkv * NQ
    cnt_c = torch.empty(nrows, dtype=torch.int32, device=dev)
    nfull = torch.empty(nrows, dtype=torch.int32, device=dev)
    keys = torch.empty(nrows * MB, dtype=torch.int32, device=dev)
    npart = torch.zeros(B * Hkv * NK + 1, dtype=torch.int32, device=dev)  # last: sink of invalid slots
    mbp = triton.next_power_of_2(MB)
    r = max(1, min(64, 4096 // mbp))
    _plan_kernel[(triton.cdiv(nrows, r),)](idx, cnt.to(torch.int32).contiguous(), cnt_c, nfull, keys, npart,
                                            nrows, NQ, NK, MB, Lq, Lk, BS=bs, CAUSAL=causal, R=r, MBP=mbp)
    order = torch.argsort(cnt_c, descending=True, stable=True).to(torch.int32)
    return cnt_c, nfull, order, keys, npart


@torch.library.custom_op("memsparse::sparse_attention_plan", mutates_args=())
def sparse_attention_plan(block_indices: Tensor, block_counts: Tensor, Lq: int, Lk: int, block_size: int,
                          causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What depends only on the lists (int32 contiguous), built once per call and shared by forward and
    backward: (counts clamped, unmasked-prefix lengths, forward launch order, reverse-index sort keys,
    per key block the number of listing query blocks that cross the diagonal)."""
    return _plan_impl(block_indices, block_counts, Lq, Lk, block_size, causal)


@sparse_attention_plan.register_fake
def _(block_indices, block_counts, Lq, Lk, block_size, causal):
    B, Hkv, NQ, MB = block_indices.shape
    n = B * Hkv * NQ
    new = block_indices.new_empty
    return (new(n, dtype=torch.int32), new(n, dtype=torch.int32), new(n, dtype=torch.int32),
            new(n * MB, dtype=torch.int32), new(B * Hkv * math.ceil(Lk / block_size) + 1, dtype=torch.int32))


def _plan_forward(idx: Tensor, cnt: Tensor, Lq: int, Lk: int, bs: int, causal: bool):
    """(clamped counts, unmasked-prefix lengths, launch order heaviest first), each int32 per list."""
    cnt_c, nfull, order, _, _ = _plan_impl(idx.to(torch.int32).contiguous(), cnt, Lq, Lk, bs, causal)
    return cnt_c, nfull, order


def _reverse_from_keys(keys: Tensor, npart: Tensor):
    """CSR reverse index from the plan's sort keys: (offsets int32 (n_keys+1,), perm int64 (flat slot of each
    entry, ascending query block within a key block), npart int32 (n_keys,), order int32 (n_keys,))."""
    n_keys = npart.numel() - 1
    sorted_key, perm = torch.sort(keys, stable=True)  # stable: query blocks stay ascending per key block
    bounds = torch.arange(n_keys + 1, dtype=torch.int32, device=keys.device)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)
    order = torch.argsort(offsets[1:] - offsets[:-1], descending=True, stable=True).to(torch.int32)
    return offsets, perm, npart, order


def build_reverse_index(idx: Tensor, cnt: Tensor, Lq: int, Lk: int, bs: int, causal: bool):
    """Key block -> query blocks that list it (deduped, ascending), built on the device.

    Returns (offsets int32 (B*Hkv*NK + 1,), qblocks int32, npart int32 (B*Hkv*NK,), order int32 (B*Hkv*NK,)):
    the list of flat key block x = (b*Hkv + h)*NK + j is qblocks[offsets[x]:offsets[x+1]]; its first npart[x]
    entries need the causal mask. (The kernels read the sort permutation instead of qblocks.)
    """
    NQ, MB = idx.shape[2], idx.shape[3]
    _, _, _, keys, npart = _plan_impl(idx.to(torch.int32).contiguous(), cnt, Lq, Lk, bs, causal)
    offsets, perm, npart, order = _reverse_from_keys(keys, npart)
    qblocks = ((perm // MB) % NQ).to(torch.int32)
    return offsets, qblocks, npart[:-1], order


def _ks_arg(key_start: Tensor | None, placeholder: Tensor) -> Tensor:
    """The kernels' KS pointer: key_start int32 contiguous, or any int32 tensor when there are no documents
    (DOC=False compiles its loads out)."""
    return placeholder if key_start is None else key_start.to(torch.int32).contiguous()


def _last_dim_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt_c: Tensor, nfull: Tensor, order: Tensor,
              block_size: int, causal: bool, scale: float, key_start: Tensor | None = None,
              shared_keys: int = 0) -> tuple[Tensor, Tensor]:
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    NQ, NK, MB = idx.shape[2], math.ceil(Lk / block_size), idx.shape[3]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if POISON_OUTPUTS:
        o.fill_(float("nan"))
        lse.fill_(float("nan"))
    n_work = B * Hkv * NQ
    _launch("fwd", _fwd_tuned, _fwd_kernel, lambda c: n_work * triton.cdiv(G * block_size, c["BLOCK_M"]),
            q, k, v, o, lse, idx, cnt_c, nfull, order, _ks_arg(key_start, cnt_c),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            Hkv, Lq, Lk, NQ, NK, MB, scale * LOG2E, shared_keys,
            G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=_dot_prec(q.dtype), UPCAST=_upcast(q.dtype),
            DOC=key_start is not None)
    return o, lse


def _bwd_prep(do: Tensor, o: Tensor, lse: Tensor, dlse: Tensor | None):
    B, Hq, Lq, D = o.shape
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=o.device)
    lse2 = torch.empty_like(delta)
    dl = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    r = 32 if D <= 64 else 16
    _bwd_prep_kernel[(triton.cdiv(Lq, r), B * Hq)](o, do, lse.contiguous(), dl, lse2, delta, o.stride(0), o.stride(1),
                                                   o.stride(2), do.stride(0), do.stride(1), do.stride(2), Hq, Lq,
                                                   HAS_DLSE=dlse is not None, D=D, R=r)
    return lse2, delta


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Tensor | None,
              idx: Tensor, cnt_c: Tensor, nfull: Tensor, order_q: Tensor, keys: Tensor, npart: Tensor,
              block_size: int, causal: bool, scale: float, fused: bool, key_start: Tensor | None = None,
              shared_keys: int = 0):
    q, k, v, do, o = (_last_dim_contig(t) for t in (q, k, v, do, o))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    NQ, NK, MB = idx.shape[2], math.ceil(Lk / block_size), idx.shape[3]
    rev_off, rev_perm, rev_npart, order_k = _reverse_from_keys(keys, npart)
    lse2, delta = _bwd_prep(do, o, lse, dlse)

    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if fused:
        dq_acc = torch.zeros((B, Hq, Lq, D), dtype=torch.float32, device=q.device)
        dq = None
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dq_acc = dk  # unused
    if POISON_OUTPUTS:
        for t in (dq, dk, dv):
            if t is not None:
                t.fill_(float("nan"))
    prec = _dot_prec(q.dtype)
    if not fused:
        n_qwork = B * Hkv * NQ
        _launch("dq", _dq_tuned, _dq_kernel, lambda c: n_qwork * triton.cdiv(G * block_size, c["BLOCK_M"]),
                q, k, v, do, dq, lse2, delta, idx, cnt_c, nfull, order_q, _ks_arg(key_start, cnt_c),
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                Hkv, Lq, Lk, NQ, NK, MB, scale * LOG2E, scale, shared_keys,
                G=G, BS=block_size, D=D, CAUSAL=causal, DOT_PREC=prec, UPCAST=_upcast(q.dtype),
                DOC=key_start is not None)
    n_kwork = B * Hkv * NK
    name, tuned = ("fused", _fused_tuned) if fused else ("dkdv", _dkdv_tuned)
    _launch(name, tuned, _dkdv_kernel, lambda c: n_kwork * (block_size // c["BLOCK_N"]),
            q, k, v, do, dk, dv, dq_acc, lse2, delta, rev_off, rev_perm, rev_npart, order_k,
            _ks_arg(key_start, cnt_c),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            Hkv, Lq, Lk, NQ, NK, MB, scale * LOG2E, scale, shared_keys,
            G=G, BS=block_size, D=D, CAUSAL=causal, FUSED=fused, DOT_PREC=prec, UPCAST=_upcast(q.dtype),
            DOC=key_start is not None)
    if fused:
        dq = dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)
    return dq, dk, dv


# torch.compile sees these ops as opaque nodes (with fake implementations for shape inference).
@torch.library.custom_op("memsparse::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cnt_c: Tensor, nfull: Tensor,
                         order: Tensor, keys: Tensor, npart: Tensor, block_size: int, causal: bool,
                         scale: float, key_start: Tensor | None = None,
                         shared_keys: int = 0) -> tuple[Tensor, Tensor]:
    """Forward kernel on a plan from `sparse_attention_plan` (keys/npart ride along for the backward):
    (o (B, Hq, Lq, D) in q.dtype, lse (B, Hq, Lq) fp32). key_start/shared_keys: the document mask."""
    return _fwd_impl(q, k, v, block_indices, cnt_c, nfull, order, block_size, causal, scale, key_start,
                     shared_keys)


@sparse_attention_fwd.register_fake
def _(q, k, v, block_indices, cnt_c, nfull, order, keys, npart, block_size, causal, scale, key_start=None,
      shared_keys=0):
    B, Hq, Lq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("memsparse::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                         dlse: Tensor | None, block_indices: Tensor, cnt_c: Tensor, nfull: Tensor, order: Tensor,
                         keys: Tensor, npart: Tensor, block_size: int, causal: bool, scale: float,
                         fused: bool, key_start: Tensor | None = None,
                         shared_keys: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernels: (dq, dk, dv) shaped like (q, k, v)."""
    return _bwd_impl(do, q, k, v, o, lse, dlse, block_indices, cnt_c, nfull, order, keys, npart, block_size,
                     causal, scale, fused, key_start, shared_keys)


@sparse_attention_bwd.register_fake
def _(do, q, k, v, o, lse, dlse, block_indices, cnt_c, nfull, order, keys, npart, block_size, causal, scale,
      fused, key_start=None, shared_keys=0):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, idx, cnt_c, nfull, order, keys, npart, block_size, causal, scale, key_start, shared_keys = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, idx, cnt_c, nfull, order, keys, npart, key_start)
    ctx.meta = (block_size, causal, scale, shared_keys)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, idx, cnt_c, nfull, order, keys, npart, key_start = ctx.saved_tensors
    block_size, causal, scale, shared_keys = ctx.meta
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = sparse_attention_bwd(do, q, k, v, o, lse, dlse, idx, cnt_c, nfull, order, keys, npart,
                                      block_size, causal, scale, bwd_mode() == "fused", key_start, shared_keys)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


sparse_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_counts: Tensor, *,
                            block_size: int, causal: bool = True, scale: float | None = None,
                            return_lse: bool = False, key_start: Tensor | None = None, shared_keys: int = 0):
    """The Triton path (inputs already checked): (B, Hq, Lq, D) [, lse (B, Hq, Lq) fp32]. key_start `(B, Lq)`
    (optional): the document mask of the contract."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if block_indices.shape[-1] == 0:  # no slots at all: one padding slot keeps pointers valid
        block_indices = block_indices.new_zeros((*block_indices.shape[:3], 1))
        block_counts = torch.zeros_like(block_counts)
    idx = block_indices.to(torch.int32).contiguous()
    Lq, Lk = q.shape[2], k.shape[2]
    plan = sparse_attention_plan(idx, block_counts, Lq, Lk, block_size, causal)
    ks = None if key_start is None else key_start.to(torch.int32).contiguous()
    o, lse = sparse_attention_fwd(q, k, v, idx, *plan, block_size, causal, scale, ks, int(shared_keys))
    return (o, lse) if return_lse else o
