"""Block-sparse attention on the GPU: our Triton kernel vs FlexAttention vs dense SDPA flash, one run.

Same inputs and the same block lists for every variant (BENCHMARKS.md section 1): B=1, 16 query heads,
D=128 (`--head-dim`), bf16, causal 128-blocks (`--block-size`), per query block the 8 most recent blocks
(window 1024, diagonal included) + 16 pseudo-random earlier blocks + block 0; and a dense (full causal) list
beside SDPA.
Before timing, each kernel output and gradient is checked against an fp32 PyTorch computation of the
same function (all query blocks at 8K; a subset of query blocks, and the key blocks whose every query
block is in it, at longer lengths). Writes JSON + a markdown table to --out (default $OUT).

    python benchmarks/bench_sparse_attention.py --out benchmarks/results
    python benchmarks/bench_sparse_attention.py --bwd-modes fused,split --out $OUT  # both backward variants
    # one time-boxed GPU run (H100, ~9 min): every row, the compiler report, CUDA-graph timings and the bars
    timeout -s TERM 560 python benchmarks/bench_sparse_attention.py --bwd-modes split --no-small-checks \
        --report --deadline-s 490 --name sparse_attention_h100_v3 --out $OUT

The run is a list of work items (one mask at one (length, heads), or the selection at one (length, heads)),
ordered by importance (`work_items`); JSON + markdown are rewritten after every item, so a deadline or a
kill keeps everything that finished. With --deadline-s, the first item always starts and a later one only if its
estimated end (`estimate_s`, rescaled by how long finished items took against their estimates) is within that
many seconds of the process start (`item_fits`).

With --bwd-modes, every listed backward (MEMSPARSE_SPARSE_ATTENTION_BWD) is checked and timed on the same
inputs, and the first one fills the main table; without it the default backward is used.

With --variants (e.g. default,persistent,dynamic+tma,dynamic+tma+ws), every listed kernel variant
(`sparse_attention(variant=...)`, kernels/sparse_attention_hopper.py) is checked first, in the same run and on
the same inputs and masks, against the fp32 computation (o, lse, dq, dk, dv; bf16 error <= 1e-2, every value
finite) and timed only when that check passes; the table puts each beside the default kernel and FlexAttention.
The odd-shape checks run every variant too. "default" is the kernel of the main table (always timed).

    # the variants beside the default kernel and FlexAttention at 32K, 16/16 heads: two H200 runs of < 10 min
    # each (every variant autotunes its own kernels); then --heads 16/4 and --lengths 131072 under their own --name
    timeout -s TERM 580 python benchmarks/bench_sparse_attention.py --lengths 32768 --heads 16/16 \
        --masks window+random --no-select --variants default,persistent,dynamic,persistent+tma \
        --report --deadline-s 540 --name sparse_attention_variants_h200_32k_a --out $OUT
    timeout -s TERM 580 python benchmarks/bench_sparse_attention.py --lengths 32768 --heads 16/16 \
        --masks window+random --no-select --variants default,tma,dynamic+tma,dynamic+tma+ws \
        --report --deadline-s 540 --name sparse_attention_variants_h200_32k_b --out $OUT

--check-only runs the checks without timing (no FlexAttention, no SDPA); with --device cpu it runs on the CPU
through TRITON_INTERPRET=1 (tests/test_bench_sparse_attention.py runs it at tiny sizes).

Per row, besides `do_bench` (which includes the host's launch work when that is longer than the GPU's),
our fwd+bwd is also timed replaying a CUDA graph (GPU-only time; FlexAttention too when it captures), and
the host (launch-side) ms per call is measured. --report adds, per Triton kernel of ours that ran, the
autotuner's chosen config, every timed variant, and from the compiled kernel its registers, spills, shared
memory and the occupancy they allow; and a per-kernel GPU time split (torch.profiler) of ours and Flex.
The markdown ends with each of the issue's bars against the measured numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BS = 128  # --block-size
DEV = "cuda"
HEAD_DIM = 128  # --head-dim


def import_kernels():
    """memsparse.kernels, installed or straight from the checkout (without running memsparse/__init__)."""
    try:
        import memsparse.kernels as kernels

        return kernels
    except ImportError:
        pass
    pkg = types.ModuleType("memsparse")
    pkg.__path__ = [str(REPO / "memsparse")]
    sys.modules["memsparse"] = pkg
    spec = importlib.util.spec_from_file_location("memsparse.kernels", REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["memsparse.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


kernels = import_kernels()
from memsparse.kernels.sparse_attention import sparse_attention  # noqa: E402

try:
    from memsparse.kernels.block_select import select_blocks
except ImportError:  # the selector is a separate issue
    select_blocks = None


BWD_ENV = "MEMSPARSE_SPARSE_ATTENTION_BWD"


@contextmanager
def bwd_mode(mode):
    """Run with MEMSPARSE_SPARSE_ATTENTION_BWD=mode (None: leave the environment as it is)."""
    old = os.environ.get(BWD_ENV)
    if mode is not None:
        os.environ[BWD_ENV] = mode
    try:
        yield
    finally:
        if mode is not None:
            if old is None:
                os.environ.pop(BWD_ENV, None)
            else:
                os.environ[BWD_ENV] = old


def host_ms(fn, n=10):
    """Host (launch-side) time per call before the queue drains: what the GPU cannot hide when it is short."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return dt


# ----------------------------------------------------------------------------------------------- masks
def window_random_blocks(Hkv: int, nq: int, window: int = 8, extra: int = 16, seed: int = 0) -> torch.Tensor:
    """(Hkv, nq, nq) bool block mask: block 0 + the `window` most recent blocks + `extra` random earlier ones."""
    dev = DEV
    m = torch.arange(nq, device=dev)[:, None]
    j = torch.arange(nq, device=dev)[None, :]
    blk = ((j <= m) & (j > m - window)) | (j == 0)
    gen = torch.Generator(device=dev).manual_seed(seed)
    score = torch.rand(Hkv, nq, nq, generator=gen, device=dev)
    cand = (j >= 1) & (j <= m - window)
    score = score.masked_fill(~cand, -1.0)
    top = score.topk(min(extra, nq), dim=-1)
    pick = torch.zeros(Hkv, nq, nq, dtype=torch.bool, device=dev)
    pick.scatter_(-1, top.indices, top.values >= 0)
    return blk.expand(Hkv, nq, nq) | pick


def blocks_to_lists(blk: torch.Tensor):
    """(Hkv, nq, nk) bool -> block_indices int32 (1, Hkv, nq, max_count) ascending, block_counts (1, Hkv, nq)."""
    nk = blk.shape[-1]
    cnt = blk.sum(-1)
    ar = torch.arange(nk, device=blk.device)
    idx = torch.where(blk, ar, nk).sort(-1).values[..., : int(cnt.max())]
    idx = torch.where(idx == nk, -1, idx)
    return idx[None].to(torch.int32).contiguous(), cnt[None].to(torch.int32).contiguous()


def lists_to_blocks(idx: torch.Tensor, cnt: torch.Tensor, nk: int) -> torch.Tensor:
    """Inverse of blocks_to_lists for batch 0: (Hkv, nq, nk) bool."""
    idx, cnt = idx[0].long(), cnt[0].long()
    ok = (torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]) & (idx >= 0)
    blk = torch.zeros(*idx.shape[:2], nk + 1, dtype=torch.bool, device=idx.device)
    blk.scatter_(-1, torch.where(ok, idx, nk), True)
    return blk[..., :nk]


def kept_pairs(blk: torch.Tensor, G: int) -> float:
    """Visible (query, key) pairs over all query heads (Lq == Lk, multiple of BS)."""
    nq = blk.shape[1]
    m = torch.arange(nq, device=blk.device)[:, None]
    j = torch.arange(blk.shape[2], device=blk.device)[None, :]
    per = torch.where(j < m, BS * BS, torch.where(j == m, BS * (BS + 1) // 2, 0))
    return float((blk * per).sum()) * G


def flex_block_mask(blk: torch.Tensor, G: int, L: int):
    """FlexAttention BlockMask with the same kept blocks: diagonal blocks partial (causal mask_mod), rest full."""
    from torch.nn.attention.flex_attention import BlockMask

    blk = blk.repeat_interleave(G, dim=0)[None]  # (1, Hq, nq, nk)
    nq = blk.shape[2]
    diag = torch.eye(nq, dtype=torch.bool, device=blk.device)
    part, full = blk & diag, blk & ~diag

    def ordered(b):
        b = b.to(torch.int32)
        return b.sum(-1).to(torch.int32), torch.argsort(b, dim=-1, descending=True, stable=True).to(torch.int32)

    kv_num, kv_idx = ordered(part)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BS, flex_causal)


def flex_causal(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod (one module-level function, so masks of one shape reuse the compiled kernels).

    Block sparsity comes from the BlockMask itself (the compiled kernel visits only listed blocks and
    evaluates mask_mod on the partial, diagonal ones); the run checks flex's output against ours."""
    return q_idx >= kv_idx


# ------------------------------------------------------------------------------------------- checking
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def blockwise_reference(q, k, v, do, idx, cnt, qblocks):
    """fp32 outputs/lse for the listed query blocks, and grads of sum(o*do) over those blocks.

    Returns o, lse (rows of qblocks only, concatenated), dq, dk, dv (full-size; exact for rows in qblocks,
    and for key blocks whose every listing query block is in qblocks)."""
    Hq, D, Hkv = q.shape[1], q.shape[3], k.shape[1]
    G = Hq // Hkv
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    outs, lses = [], []
    for m in qblocks:
        c = int(cnt[0, :, m].max())
        bi = idx[0, :, m, :c].long()  # (Hkv, c)
        ok = (torch.arange(c, device=q.device) < cnt[0, :, m, None]) & (bi >= 0)
        pos = (bi.clamp_min(0)[..., None] * BS + torch.arange(BS, device=q.device)).reshape(Hkv, c * BS)
        key_ok = ok[..., None].expand(Hkv, c, BS).reshape(Hkv, c * BS)
        kg = kf[0].gather(1, pos[..., None].expand(Hkv, c * BS, D))
        vg = vf[0].gather(1, pos[..., None].expand(Hkv, c * BS, D))
        qm = qf[0, :, m * BS:(m + 1) * BS].reshape(Hkv, G * BS, D)
        s = (qm @ kg.transpose(1, 2)) * D ** -0.5
        qpos = (m * BS + torch.arange(BS, device=q.device)).repeat(G)
        mask = key_ok[:, None, :] & (pos[:, None, :] <= qpos[None, :, None])
        s = s.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(s, -1)
        o = torch.softmax(s, -1) @ vg
        o = o.reshape(Hq, BS, D)
        (o * do[0, :, m * BS:(m + 1) * BS].float()).sum().backward()
        outs.append(o.detach())
        lses.append(lse.detach().reshape(Hq, BS))
    return torch.cat(outs, 1), torch.cat(lses, 1), qf.grad, kf.grad, vf.grad


def check_kernel(q, k, v, idx, cnt, blk, full_check: bool, variant: str = "default"):
    """Our kernel (one variant) vs fp32 blockwise reference: rel. errors of o, lse, dq, dk, dv on the checked rows."""
    nq = blk.shape[1]
    fanin = blk.any(0)  # (nq, nk): some head's query block m lists key block j
    if full_check:
        qblocks, kblocks = list(range(nq)), list(range(nq))
    else:
        kblocks = [nq - 1, nq - 5, nq - 17]
        qset = {0, 1, nq // 3, nq // 2, nq - 2, nq - 1}
        for j in kblocks:
            qset |= set(torch.nonzero(fanin[:, j]).flatten().tolist())
        qblocks = sorted(qset)
    do = torch.randn_like(q)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o, lse = sparse_attention(qg, kg, vg, idx, cnt, block_size=BS, return_lse=True, impl="triton", variant=variant)
    o.backward(do)
    ro, rlse, rdq, rdk, rdv = blockwise_reference(q, k, v, do, idx, cnt, qblocks)
    rows = torch.cat([torch.arange(m * BS, (m + 1) * BS, device=q.device) for m in qblocks])
    krows = torch.cat([torch.arange(j * BS, (j + 1) * BS, device=q.device) for j in kblocks])
    errs = {
        "o": rel(o[0][:, rows], ro), "lse": rel(lse[0][:, rows], rlse),
        "dq": rel(qg.grad[0][:, rows], rdq[0][:, rows]),
        "dk": rel(kg.grad[0][:, krows], rdk[0][:, krows]), "dv": rel(vg.grad[0][:, krows], rdv[0][:, krows]),
    }
    finite = all(bool(torch.isfinite(t).all()) for t in (o, lse, qg.grad, kg.grad, vg.grad))
    return {"errors": errs, "finite": finite, "variant": variant, "query_blocks_checked": len(qblocks),
            "key_blocks_checked": len(kblocks), "pass": finite and max(errs.values()) <= 1e-2}


SMALL_CASES = [  # (Hq, Hkv, Lq, Lk, D, bs, dtype)
    (4, 1, 300, 431, 128, 128, torch.bfloat16), (2, 2, 200, 200, 64, 64, torch.float16),
    (8, 2, 333, 333, 128, 64, torch.float32), (4, 2, 129, 700, 64, 128, torch.bfloat16)]
# --check-only on the CPU (interpreter): the same kinds of shapes, smaller
TINY_SMALL_CASES = [(2, 1, 40, 61, 16, 32, torch.bfloat16), (2, 2, 29, 70, 16, 64, torch.float32)]


def small_checks(log, modes=(None,), variants=("default",), cases=None, stop_at=None, skipped=None):
    """Odd shapes on the GPU (tails, Lq < Lk, GQA, duplicates, junk padding, empty lists, dlse) vs the reference,
    for every backward mode and every kernel variant. With `stop_at` (epoch seconds) no check starts after it:
    each (case, mode, variant) compiles its own kernels (~20 s on an H100), so five variants' checks alone took
    the 219 s a run had left (2026-12-05); the skipped ones are appended to `skipped`.

    Run with autotuning off (one fixed config per kernel) to keep compiles few; the real-size checks
    below cover the autotuned configs."""
    from memsparse.kernels import sparse_attention_triton as tri

    cases = SMALL_CASES if cases is None else cases
    saved = tri.AUTOTUNE
    tri.AUTOTUNE = False
    out = []
    try:
        for (Hq, Hkv, Lq, Lk, D, bs, dt), mode, var in ((c, md, va) for c in cases for md in modes
                                                        for va in variants):
            if stop_at is not None and time.time() > stop_at:
                if skipped is not None:
                    skipped.append({"case": [Hq, Hkv, Lq, Lk, D, bs, str(dt)], "bwd": mode, "variant": var})
                log(f"small check skipped (past the checks' share of --deadline-s): {[Hq, Hkv, Lq, Lk, D, bs]} "
                    f"{dt} bwd={mode} variant={var}")
                continue
            gen = torch.Generator(device=DEV).manual_seed(Lq + Lk)
            q = torch.randn(2, Hq, Lq, D, device=DEV, generator=gen).to(dt)
            k = torch.randn(2, Hkv, Lk, D, device=DEV, generator=gen).to(dt)
            v = torch.randn(2, Hkv, Lk, D, device=DEV, generator=gen).to(dt)
            do = torch.randn(2, Hq, Lq, D, device=DEV, generator=gen)
            dlse = torch.randn(2, Hq, Lq, device=DEV, generator=gen)
            nq, nk = math.ceil(Lq / bs), math.ceil(Lk / bs)
            mb = nk + 2
            idx = torch.randint(0, nk, (2, Hkv, nq, mb), device=DEV, generator=gen).sort(-1).values
            cnt = torch.randint(0, mb + 1, (2, Hkv, nq), device=DEV, generator=gen)
            cnt[0, 0, 0] = 0  # an empty list
            idx = torch.where(torch.arange(mb, device=DEV) < cnt[..., None], idx, -1).int()
            got, want = [], []
            try:
                for impl, lst in (("triton", got), ("reference", want)):
                    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                    with bwd_mode(mode):
                        o, lse = sparse_attention(qq, kk, vv, idx, cnt.int(), block_size=bs, return_lse=True,
                                                  impl=impl, variant=var)
                        lf = torch.where(torch.isfinite(lse), lse, 0.0)
                        ((o.float() * do).sum() + (lf * dlse).sum()).backward()
                    lst += [o, lf, qq.grad, kk.grad, vv.grad]
            except Exception as e:  # a variant that does not compile or run here: recorded, the run goes on
                if var == "default":
                    raise
                out.append({"case": [Hq, Hkv, Lq, Lk, D, bs, str(dt)], "bwd": mode, "variant": var, "errors": {},
                            "finite": False, "pass": False, "error": repr(e)[:500]})
                log("small check " + json.dumps(out[-1]) + "\n" + traceback.format_exc()[-1500:])
                _recover_cuda(log)
                continue
            errs = {n: rel(a, b) for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want)}
            finite = all(bool(torch.isfinite(t).all()) for t in got)
            tol = 1e-4 if dt == torch.float32 else 1e-2
            out.append({"case": [Hq, Hkv, Lq, Lk, D, bs, str(dt)], "bwd": mode, "variant": var, "errors": errs,
                        "finite": finite, "pass": finite and max(errs.values()) <= tol})
            log("small check " + json.dumps(out[-1]))
    finally:
        tri.AUTOTUNE = saved
    return out



# -------------------------------------------------------------------------------------------- timing
SLOW_MS = 60.0  # calls slower than this are kernel-bound: one do_bench, no host-ms / graph / profiler pass


def bench(fn, grads=None):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def timed_pair(fn, grads=None):
    """Two do_bench medians (the tables show the lower); one when the call is slow (already long timed)."""
    t = [bench(fn, grads)]
    if t[0] < SLOW_MS:
        t.append(bench(fn, grads))
    return t


def _graph_bench_manual(fn, grads=None, rep_ms=40.0, retries=10):
    """fn captured n times in one CUDA graph; ms per fn from event-timed replays (median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for x in grads or ():
                x.grad = None
            fn()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(3):
            fn()
        e1.record()
        torch.cuda.synchronize()
        n = max(1, int(rep_ms / max(e0.elapsed_time(e1) / 3, 1e-3)))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                for x in grads or ():
                    x.grad = None
                fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(retries):
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            out.append(e0.elapsed_time(e1) / n)
    torch.cuda.current_stream().wait_stream(s)
    out.sort()
    return float(out[len(out) // 2])


def graph_bench(fn, grads=None):
    """GPU-only ms per call: fn replayed from a CUDA graph (no host launch cost; unlike do_bench, no L2 flush).

    triton.testing.do_bench_cudagraph when it exists, else a manual capture (`_graph_bench_manual`)."""
    try:
        from triton.testing import do_bench_cudagraph
    except ImportError:
        return _graph_bench_manual(fn, grads)
    try:
        return float(do_bench_cudagraph(fn, rep=40, grad_to_none=grads, return_mode="median"))
    except TypeError:  # an older signature without return_mode
        return float(do_bench_cudagraph(fn, rep=40, grad_to_none=grads))


def graph_pair(fn, grads=None):
    return [graph_bench(fn, grads), graph_bench(fn, grads)]


def gpu_kernel_split(fn, grads=(), n=2):
    """torch.profiler over n calls: GPU ms per call of each kernel (by name), heaviest first, and the sum."""
    from torch.profiler import ProfilerActivity, profile

    for x in grads:
        x.grad = None
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            for x in grads:
                x.grad = None
            fn()
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        d = tot.setdefault(e.name, [0.0, 0])
        d[0] += e.time_range.elapsed_us()
        d[1] += 1
    rows = sorted(({"name": k, "ms": v[0] / n / 1e3, "calls": v[1] / n} for k, v in tot.items()),
                  key=lambda x: -x["ms"])
    return {"kernels": rows, "total_ms": sum(x["ms"] for x in rows)}


def sdpa_fn(G):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if G == 1:
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    return f


# --------------------------------------------------------------------------- compiler / occupancy report
# H100 (sm_90) per-SM limits used for the occupancy estimate.
REGS_PER_SM = 65536
SMEM_PER_SM = 232448  # bytes one SM can give to resident CTAs (227 KB)
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
# Our Triton kernels (JITFunction attribute -> label) and their autotuners (attribute -> label).
KERNELS = {"_fwd_kernel": "fwd", "_dq_kernel": "dq", "_dkdv_kernel": "dkdv", "_plan_kernel": "plan",
           "_bwd_prep_kernel": "prep"}
TUNERS = {"_fwd_tuned": "fwd", "_dq_tuned": "dq", "_dkdv_tuned": "dkdv", "_fused_tuned": "fused"}
# The opt-in variants' kernels (kernels/sparse_attention_hopper.py); a compiled one is labelled e.g.
# "fwd[persistent+tma]" from its PERSISTENT (0 one program per item, 1 persistent, 2 dynamic) / TMA constexprs.
VAR_KERNELS = {"_fwd_var_kernel": "fwd", "_dq_var_kernel": "dq", "_dkdv_var_kernel": "dkdv",
               "_bwd_merged_kernel": "bwd"}


def var_label(name, mode, tma):
    if name == "bwd":  # the merged backward (dK/dV and dQ programs in one launch)
        return f"bwd[merged{'+tma' if str(tma) == 'True' else ''}]"
    mode = int(mode) if str(mode).isdigit() else int(str(mode) == "True")
    sched = {1: "persistent", 2: "dynamic"}.get(mode)
    return f"{name}[{'+'.join(p for p in (sched, 'tma' if tma else None) if p)}]"
KERNEL_ORDER = ("fwd", "dq", "dkdv", "fused", "bwd", "plan", "prep")


def occupancy(n_regs, shared, num_warps):
    """Resident CTAs per SM allowed by registers, shared memory and warps; the min, warps/SM, the limiter."""
    out = {"by_regs": None, "by_smem": None, "by_warps": None, "ctas": None, "warps_per_sm": None,
           "occupancy": None, "limiter": None}
    if not num_warps:
        return out
    lim = {"warps": MAX_WARPS_PER_SM // num_warps}
    out["by_warps"] = lim["warps"]
    if n_regs:
        out["by_regs"] = lim["regs"] = REGS_PER_SM // (n_regs * 32 * num_warps)
    if shared is not None:
        out["by_smem"] = lim["smem"] = SMEM_PER_SM // shared if shared > 0 else MAX_CTAS_PER_SM
    if "regs" not in lim or "smem" not in lim:  # without both, no honest minimum
        return out
    ctas = min(min(lim.values()), MAX_CTAS_PER_SM)
    out["ctas"] = ctas
    out["warps_per_sm"] = ctas * num_warps
    out["occupancy"] = ctas * num_warps / MAX_WARPS_PER_SM
    out["limiter"] = "/".join(k for k in ("regs", "smem", "warps") if lim[k] == ctas) or "cta cap"
    return out


def _config_dict(cfg):
    kw = getattr(cfg, "kwargs", {}) or {}
    tiles = ({k: kw.get(k) for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")} if "BLOCK_M1" in kw
             else {"BLOCK_M": kw.get("BLOCK_M"), "BLOCK_N": kw.get("BLOCK_N")})
    return {**tiles, "num_warps": getattr(cfg, "num_warps", None),
            "num_stages": getattr(cfg, "num_stages", None),
            **{k: True for k in ("WS", "FLATTEN") if kw.get(k)},
            **({"maxnreg": cfg.maxnreg} if getattr(cfg, "maxnreg", None) else {})}


def _ms(v):
    """An autotuner timing: a float, or [median, p20, p80] (do_bench quantiles)."""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def kernel_resources(ck):
    """n_regs, n_spills, shared bytes, warps, stages and name of a triton CompiledKernel (None when missing)."""
    out = {"n_regs": None, "n_spills": None, "shared": None, "num_warps": None, "num_stages": None, "name": None}
    if ck is None:
        return out
    try:
        if getattr(ck, "n_regs", None) is None and hasattr(ck, "_init_handles"):
            ck._init_handles()  # registers/spills are known once the binary is loaded (it ran, so it is)
    except Exception:
        pass
    md = getattr(ck, "metadata", None)

    def get(name, *objs):
        for o in objs:
            x = o.get(name) if isinstance(o, dict) else getattr(o, name, None)
            if x is not None:
                return x
        return None

    for name in ("n_regs", "n_spills"):
        x = getattr(ck, name, None)
        out[name] = int(x) if x is not None else None
    for name in ("shared", "num_warps", "num_stages"):
        x = get(name, md, ck)
        out[name] = int(x) if isinstance(x, (int, float)) else None
    out["name"] = get("name", ck, md)
    return out


class KernelRecorder:
    """Keeps every compiled variant of our Triton kernels that ran, with its config and launch grid.

    Wraps each JITFunction's `run` (the autotuner benchmarks and launches through `fn.run`, which returns the
    CompiledKernel), so nothing in the kernels module changes. `snapshot_tuning` reads each autotuner's cache
    (tuning key -> chosen config) and `configs_timings` (the variants it timed) after a work item."""

    def __init__(self, tri, hop=None):
        self.tri = tri
        self.hop = hop
        self.context = ""
        self.compiled = {}  # id(CompiledKernel) -> entry
        self.tuned = {}  # (tuner, repr(key)) -> entry
        self._last_timings = {}
        self.errors = []
        self._patched = []
        for attr, label in KERNELS.items():
            fn = getattr(tri, attr, None)
            orig = getattr(fn, "run", None)
            if orig is None:
                self.errors.append(f"{attr}: no JITFunction.run to wrap")
                continue
            try:
                fn.run = self._wrap(orig, label)
                self._patched.append((fn, orig))
            except Exception as e:
                self.errors.append(f"{attr}: {e!r}"[:200])
        for attr, label in (VAR_KERNELS.items() if hop is not None else ()):
            fn = getattr(hop, attr, None)
            orig = getattr(fn, "run", None)
            if orig is None:
                self.errors.append(f"{attr}: no JITFunction.run to wrap")
                continue
            fn.run = self._wrap(orig, label, variant=True)
            self._patched.append((fn, orig))

    def _tuners(self):
        """(id label, tuner, kernel label or None = derive from the key) of every autotuner."""
        out = [(label, getattr(self.tri, attr, None), label) for attr, label in TUNERS.items()]
        for (name, ws), t in (getattr(self.hop, "_TUNED", {}) or {}).items():
            out.append((f"{name}_var{'_ws' if ws else ''}", t, None))
        if getattr(self.hop, "_MERGED_TUNED", None) is not None:
            out.append(("bwd_merged", self.hop._MERGED_TUNED, "bwd[merged]"))
        return out

    def _wrap(self, orig, label, variant=False):
        def run(*args, **kwargs):
            ck = orig(*args, **kwargs)
            try:
                lab = var_label(label, kwargs.get("PERSISTENT"), kwargs.get("TMA")) if variant else label
                self._record(lab, kwargs, ck)
            except Exception as e:  # never break a launch for the report
                if len(self.errors) < 10:
                    self.errors.append(f"record {label}: {e!r}"[:200])
            return ck

        return run

    def _record(self, label, kw, ck):
        if ck is None:
            return
        e = self.compiled.get(id(ck))
        if e is None:
            if kw.get("FUSED"):
                label = "fused"
            e = {"kernel": label, "ck": ck, "launches": 0, "programs": {},
                 "constexprs": {k: kw[k] for k in ("G", "BS", "D", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1",
                                                   "BLOCK_M2", "BLOCK_N2", "R", "CAUSAL", "FUSED",
                                                   "PERSISTENT", "TMA", "WS", "FLATTEN")
                                if isinstance(kw.get(k), (int, bool))},
                 "num_warps": kw.get("num_warps"), "num_stages": kw.get("num_stages"), "maxnreg": kw.get("maxnreg")}
            self.compiled[id(ck)] = e
        e["launches"] += 1
        if self.context not in e["programs"]:
            e["programs"][self.context] = None
            grid = kw.get("grid")
            if callable(grid):
                grid = grid(kw)
            e["programs"][self.context] = int(math.prod(int(x) for x in grid))

    def restore(self):
        for fn, orig in self._patched:
            try:
                del fn.run  # back to the class's method
            except Exception:
                try:
                    fn.run = orig
                except Exception:
                    pass
        self._patched = []

    def snapshot_tuning(self):
        for label, t, kernel in self._tuners():
            cache = getattr(t, "cache", None)
            if not isinstance(cache, dict):
                continue
            names = list(getattr(t, "keys", None) or [])
            timings = getattr(t, "configs_timings", None)
            fresh = isinstance(timings, dict) and timings is not self._last_timings.get(label)
            new = [k for k in cache if (label, repr(k)) not in self.tuned]
            for k in new:
                kt = k if isinstance(k, tuple) else (k,)
                key = {(names[i] if i < len(names) else "dtype"): str(v) for i, v in enumerate(kt)
                       if i < len(names) or i == len(names)}
                kern = kernel or var_label(label.split("_")[0], key.get("PERSISTENT"), key.get("TMA") == "True")
                shown = kern if kernel else kern + (" (ws configs)" if label.endswith("_ws") else "")
                entry = {"tuner": shown, "kernel": kern, "key": key, "best": _config_dict(cache[k]),
                         "context": self.context, "timings": None}
                if fresh and len(new) == 1:  # the autotuner keeps only the last tuning's timings
                    entry["timings"] = [dict(_config_dict(c), ms=_ms(v)) for c, v in timings.items()]
                self.tuned[(label, repr(k))] = entry
            if fresh:
                self._last_timings[label] = timings

    def report(self):
        """JSON-able: device limits, autotuning (chosen + timed variants), every compiled variant's resources."""
        dev = {"regs_per_sm": REGS_PER_SM, "smem_per_sm": SMEM_PER_SM, "max_warps_per_sm": MAX_WARPS_PER_SM,
               "max_ctas_per_sm": MAX_CTAS_PER_SM}
        try:
            dev["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        except Exception:
            dev["sm_count"] = None
        variants = []
        for e in self.compiled.values():
            res = kernel_resources(e["ck"])
            nw = res["num_warps"] or e["num_warps"]
            ns = res["num_stages"] or e["num_stages"]
            variants.append({"kernel": e["kernel"], **e["constexprs"], "num_warps": nw, "num_stages": ns,
                             "n_regs": res["n_regs"], "n_spills": res["n_spills"], "shared": res["shared"],
                             "name": res["name"], "occupancy": occupancy(res["n_regs"], res["shared"], nw),
                             "launches": e["launches"], "programs": dict(e["programs"]),
                             **({"maxnreg": e["maxnreg"]} if e.get("maxnreg") else {})})
        return {"device": dev, "tuning": list(self.tuned.values()), "compiled": variants, "errors": self.errors}


# ------------------------------------------------------------------------------------------ work items
ROW_KEYS = ("L", "Hq", "Hkv")


def parse_heads(spec: str):
    return [tuple(int(x) for x in hp.split("/")) for hp in spec.split(",") if hp]


def work_items(lengths, heads, masks, select: bool):
    """(kind, L, Hq, Hkv) in the order that matters for the issue, so a deadline cuts the least important:
    window+random at 32K (first heads), 128K (first heads), 32K (other heads), 8K; dense at 32K / 8K; the
    selection at 32K (first heads); then the rest (other lengths' window+random, 128K dense, other selections)."""
    h0 = heads[0] if heads else None

    def rank(kind, L, h):
        if kind == "window+random":
            if L == 32768 and h == h0:
                return 0
            if L == 131072 and h == h0:
                return 1
            return {32768: 2, 8192: 3}.get(L, 7)
        if kind == "dense":
            if L == 32768 and h == h0:
                return 4
            return 4.5 if L <= 32768 else 8
        if kind == "select":
            return 5 if (L == 32768 and h == h0) else 9
        return 10  # another mask kind

    kinds = list(masks) + (["select"] if select else [])
    items = [(kind, L, *h) for kind in kinds for L in lengths for h in heads]
    pos = {it: i for i, it in enumerate(items)}
    return sorted(items, key=lambda it: (rank(it[0], it[1], tuple(it[2:])), lengths.index(it[1]),
                                         heads.index(tuple(it[2:])), pos[it]))


EST_S = {"window+random": {8192: 20, 32768: 30, 131072: 40}, "dense": {8192: 12, 32768: 20, 131072: 45},
         "select": {8192: 15, 32768: 20, 131072: 40}}
AUTOTUNE_S = 35  # first item of a GQA group: fwd/dq/dkdv autotuning (~14 configs compiled and timed)
FLEX_COMPILE_S = 20  # FlexAttention fwd+bwd compile for a new (L, heads) shape
SDPA_S = {8192: 2, 32768: 4, 131072: 15}  # the dense SDPA baseline of a new (L, heads)
VARIANT_S = {8192: 10, 32768: 15, 131072: 25}  # one kernel variant's check + timings on one row
VARIANT_TUNE_S = 40  # a variant's autotuning for a new GQA group (its fwd/dq/dkdv configs; more with "ws")


def estimate_s(item, state, flex_dense=False, n_variants=0):
    """Seconds an item should take, with its one-time costs (autotuning, Flex compile, SDPA baseline)."""
    kind, L, Hq, Hkv = item
    t = EST_S.get(kind, {}).get(L, 30 * max(L / 32768, 0.5))
    if kind != "select":
        t += n_variants * VARIANT_S.get(L, 20)
    if Hq // Hkv not in state["tuned_groups"]:
        t += AUTOTUNE_S + (n_variants * VARIANT_TUNE_S if kind != "select" else 0)
    if (kind != "dense" or flex_dense) and (L, Hq, Hkv) not in state["flex_shapes"]:
        t += FLEX_COMPILE_S
    if kind != "select" and (L, Hq, Hkv) not in state["sdpa_rows"]:
        t += SDPA_S.get(L, 5)
    return t


def item_fits(now_s: float, est_s: float, deadline_s: float, started: bool) -> bool:
    """Whether a work item starts: always without a deadline, and always the first one (the most important; its
    estimate counts cold compiles and autotuning, 2-4x a warm machine's time: 309 s estimated, 85 s taken on an
    H100 with a filled Triton cache), else only if its estimated end is within the deadline."""
    return not deadline_s or not started or now_s + est_s <= deadline_s


def make_inputs(L, Hq, Hkv, D=None):
    """Deterministic per (L, Hkv), so every item of one (L, heads) sees the same tensors; D: HEAD_DIM if None."""
    D = HEAD_DIM if D is None else D
    gen = torch.Generator(device=DEV).manual_seed(L + Hkv)
    q = torch.randn(1, Hq, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, Hkv, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, Hkv, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    do = torch.randn(1, Hq, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    return types.SimpleNamespace(L=L, Hq=Hq, Hkv=Hkv, G=Hq // Hkv, D=D, nq=L // BS, q=q, k=k, v=v, do=do,
                                 qg=qg, kg=kg, vg=vg)


def sdpa_baseline(res, x, log):
    """Dense causal SDPA flash fwd and fwd+bwd on the row's inputs (once per (L, heads))."""
    if "sdpa" in res:
        return res["sdpa"]
    G, D = x.G, x.D
    sd, ks, vs = sdpa_fn(G), x.k, x.v
    try:
        with torch.no_grad():
            sd(x.q, x.k, x.v)
        res["sdpa_gqa"] = "enable_gqa" if G > 1 else "-"
    except RuntimeError as e:  # flash without GQA support: expand K/V once, outside the timed region
        log(f"SDPA flash refused GQA ({str(e)[:120]}); expanding K/V outside timing")
        sd, ks, vs = sdpa_fn(1), x.k.repeat_interleave(G, 1), x.v.repeat_interleave(G, 1)
        res["sdpa_gqa"] = "kv expanded outside timing"
    ksg, vsg = ks.clone().requires_grad_(True), vs.clone().requires_grad_(True)

    def sdpa_fb():
        sd(x.qg, ksg, vsg).backward(x.do)

    with torch.no_grad():
        fwd = timed_pair(lambda: sd(x.q, ks, vs))
    fb = timed_pair(sdpa_fb, [x.qg, ksg, vsg])
    x.qg.grad = None
    dense_flops = 4.0 * x.Hq * x.L * (x.L + 1) / 2 * D
    res["sdpa"] = {"fwd_ms": fwd, "fwdbwd_ms": fb, "fwd_tflops": dense_flops / min(fwd) / 1e9,
                   "fwdbwd_tflops": 3.5 * dense_flops / min(fb) / 1e9}
    log(f"L={x.L} {x.Hq}/{x.Hkv} sdpa fwd {fwd} fwd+bwd {fb}")
    return res["sdpa"]


def parse_variants(spec: str):
    """--variants: comma-separated kernel variants ("default" = the main table's kernel), each validated."""
    from memsparse.kernels.sparse_attention_hopper import parse_variant

    out = [v.strip().lower() for v in (spec or "").split(",") if v.strip()]
    for v in out:
        parse_variant(v)  # ValueError on a bad name, before anything runs
    return out


def time_variant(x, idx, cnt, blk, variant, fwd_flops, r, args, log):
    """One kernel variant on a row's inputs and mask: the fp32 check first; fwd, fwd+bwd (and CUDA-graph fwd+bwd)
    timed only when it passes. Errors are recorded, not raised (the other variants still run)."""
    out = {"variant": variant}
    grads = [x.qg, x.kg, x.vg]

    def fwd():
        return sparse_attention(x.q, x.k, x.v, idx, cnt, block_size=BS, impl="triton", variant=variant)

    def fb():
        sparse_attention(x.qg, x.kg, x.vg, idx, cnt, block_size=BS, impl="triton", variant=variant).backward(x.do)

    t0 = time.time()
    try:
        out["check"] = check_kernel(x.q, x.k, x.v, idx, cnt, blk, full_check=(x.nq <= 64), variant=variant)
        log(f"L={x.L} G={x.G} variant={variant}: check {out['check']} ({time.time() - t0:.1f}s)")
        if not out["check"]["pass"]:
            out["error"] = "check failed: not timed"
            return out
        with torch.no_grad():
            out["fwd_ms"] = timed_pair(fwd)
        out["fwdbwd_ms"] = timed_pair(fb, grads)
        out["fwd_tflops"] = fwd_flops / min(out["fwd_ms"]) / 1e9
        out["fwdbwd_tflops"] = 3.5 * fwd_flops / min(out["fwdbwd_ms"]) / 1e9
        out["speedup_vs_default_fwd"] = min(r["ours_fwd_ms"]) / min(out["fwd_ms"])
        out["speedup_vs_default_fwdbwd"] = min(r["ours_fwdbwd_ms"]) / min(out["fwdbwd_ms"])
        if not args.no_graph and min(out["fwdbwd_ms"]) < SLOW_MS:
            try:
                out["fwdbwd_graph_ms"] = graph_pair(fb, grads)
            except Exception as e:
                out["fwdbwd_graph_ms_error"] = repr(e)[:300]
                _recover_cuda(log)
    except Exception as e:  # a variant that does not compile or run here: recorded, the run goes on
        out["error"] = repr(e)[:500]
        log(f"L={x.L} G={x.G} variant={variant} failed: {traceback.format_exc()[-1500:]}")
        _recover_cuda(log)
    finally:
        for g in grads:
            g.grad = None
    log(f"L={x.L} G={x.G} variant={variant}: " + json.dumps({k: v for k, v in out.items() if k != "check"}))
    return out


def run_mask(res, x, name, args, flex_compiled, log):
    """One mask at one (L, heads): check, our fwd / fwd+bwd (do_bench, host ms, CUDA graph), Flex, profiler."""
    L, G, nq, D = x.L, x.G, x.nq, x.D
    sd = sdpa_baseline(res, x, log)
    if name == "window+random":
        blk = window_random_blocks(x.Hkv, nq, seed=L)
    elif name == "dense":
        blk = torch.ones(nq, nq, dtype=torch.bool, device=DEV).tril().expand(x.Hkv, nq, nq).contiguous()
    else:
        raise ValueError(f"unknown mask {name!r}")
    idx, cnt = blocks_to_lists(blk)
    kept = kept_pairs(blk, G)
    causal_pairs = x.Hq * L * (L + 1) / 2
    fwd_flops = 4.0 * kept * D
    r = {"density": kept / causal_pairs, "kept_pairs": kept, "max_blocks": int(cnt.max()),
         "mean_blocks": float(cnt.float().mean())}
    res["masks"][name] = r  # visible (partial) from here on; filled in as it goes
    modes = args.bwd_modes.split(",") if args.bwd_modes else [None]
    grads = [x.qg, x.kg, x.vg]
    t0 = time.time()
    with bwd_mode(modes[0]):
        r["check"] = check_kernel(x.q, x.k, x.v, idx, cnt, blk, full_check=(nq <= 64))
    r["bwd"] = modes[0] or "default"
    log(f"L={L} G={G} {name}: density {r['density']:.3f} check {r['check']} ({time.time() - t0:.1f}s)")

    def ours_fwd(idx=idx, cnt=cnt):
        return sparse_attention(x.q, x.k, x.v, idx, cnt, block_size=BS, impl="triton")

    def ours_fwd_ng():
        with torch.no_grad():
            return ours_fwd()

    def ours_fb(idx=idx, cnt=cnt):
        sparse_attention(x.qg, x.kg, x.vg, idx, cnt, block_size=BS, impl="triton").backward(x.do)

    with torch.no_grad():
        r["ours_fwd_ms"] = timed_pair(ours_fwd)
    with bwd_mode(modes[0]):
        r["ours_fwdbwd_ms"] = timed_pair(ours_fb, grads)
        fast = min(r["ours_fwdbwd_ms"]) < SLOW_MS
        if fast:
            r["ours_host_ms_per_fwdbwd"] = host_ms(ours_fb)
    if len(modes) > 1:
        r["bwd_modes"] = {}
        for i, mode in enumerate(modes):
            with bwd_mode(mode):
                chk = r["check"] if i == 0 else check_kernel(x.q, x.k, x.v, idx, cnt, blk, full_check=(nq <= 64))
                t_fb = r["ours_fwdbwd_ms"] if i == 0 else timed_pair(ours_fb, grads)
                r["bwd_modes"][mode] = {"check": chk, "fwdbwd_ms": t_fb,
                                        "host_ms_per_fwdbwd": host_ms(ours_fb) if fast else None}
            log(f"L={L} G={G} {name} bwd={mode}: {json.dumps(r['bwd_modes'][mode])}")
    r["ours_fwd_tflops"] = fwd_flops / min(r["ours_fwd_ms"]) / 1e9
    r["ours_fwdbwd_tflops"] = 3.5 * fwd_flops / min(r["ours_fwdbwd_ms"]) / 1e9
    variants = [vname for vname in parse_variants(args.variants) if vname != "default"]
    if variants:
        r["variants"] = {}
        for vname in variants:
            with bwd_mode(modes[0]):
                r["variants"][vname] = time_variant(x, idx, cnt, blk, vname, fwd_flops, r, args, log)
    r["ideal_fwd_ms"] = min(sd["fwd_ms"]) * r["density"]
    r["ideal_fwdbwd_ms"] = min(sd["fwdbwd_ms"]) * r["density"]
    r["ours_vs_ideal_fwd"] = min(r["ours_fwd_ms"]) / r["ideal_fwd_ms"]
    r["ours_vs_ideal_fwdbwd"] = min(r["ours_fwdbwd_ms"]) / r["ideal_fwdbwd_ms"]
    if name == "dense":
        r["ours_vs_sdpa_fwd"] = min(r["ours_fwd_ms"]) / min(sd["fwd_ms"])
        r["ours_vs_sdpa_fwdbwd"] = min(r["ours_fwdbwd_ms"]) / min(sd["fwdbwd_ms"])
    flex_fb = None
    if name != "dense" or args.flex_dense:
        try:
            flex_fb = flex_timings(r, blk, x, ours_fwd, fwd_flops, flex_compiled)
        except Exception as e:  # keep the rest of the run
            r["flex_error"] = repr(e)[:500]
            log(f"L={L} G={G} {name}: flex failed {e!r}"[:600])
        if args.flex_flash:
            r["flex_flash"] = flex_flash_timings(blk, x, ours_fwd, r, flex_compiled)
            log(f"L={L} G={G} {name}: flex FLASH backend {json.dumps(r['flex_flash'])}"[:900])
    # GPU-only times (CUDA graph replays) last: a capture that fails cannot spoil the numbers above.
    if not args.no_graph and fast:
        with bwd_mode(modes[0]):
            for key, fn, gr in (("ours_fwd_graph_ms", ours_fwd_ng, None), ("ours_fwdbwd_graph_ms", ours_fb, grads)):
                try:
                    r[key] = graph_pair(fn, gr)
                except Exception as e:
                    r[key + "_error"] = repr(e)[:300]
                    log(f"L={L} G={G} {name}: graph timing {key} failed {e!r}"[:400])
                    _recover_cuda(log)
        if flex_fb is not None:
            try:
                r["flex_fwdbwd_graph_ms"] = graph_pair(flex_fb, grads)
            except Exception as e:
                r["flex_fwdbwd_graph_ms_error"] = repr(e)[:300]
                log(f"L={L} G={G} {name}: flex graph timing failed {e!r}"[:400])
                _recover_cuda(log)
        for g in grads:
            g.grad = None
    derived_graph(r)
    if args.report and fast:
        try:
            with bwd_mode(modes[0]):
                r["gpu_split_ours"] = gpu_kernel_split(ours_fb, grads)
            if flex_fb is not None:
                r["gpu_split_flex"] = gpu_kernel_split(flex_fb, grads)
        except Exception as e:
            r["gpu_split_error"] = repr(e)[:300]
            log(f"L={L} G={G} {name}: profiler split failed {e!r}"[:400])
    for g in grads:
        g.grad = None
    log(f"L={L} G={G} {name}: " + json.dumps({kk: vv for kk, vv in r.items()
                                              if kk not in ("check", "gpu_split_ours", "gpu_split_flex")}))
    return r


def _recover_cuda(log):
    """After a failed capture: make sure no capture is left open and the device still answers."""
    if DEV != "cuda":
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:
        log(f"CUDA not usable after a failed capture: {e!r}"[:300])


def derived_graph(r):
    """Ratios from the CUDA-graph (GPU-only) times, where they exist."""
    og = r.get("ours_fwdbwd_graph_ms")
    if og:
        r["ours_vs_ideal_fwdbwd_graph"] = min(og) / r["ideal_fwdbwd_ms"]
        if r.get("flex_fwdbwd_ms"):
            r["speedup_vs_flex_fwdbwd_graph"] = min(r["flex_fwdbwd_ms"]) / min(og)  # flex as do_bench timed it
        if r.get("flex_fwdbwd_graph_ms"):
            r["speedup_vs_flex_fwdbwd_both_graph"] = min(r["flex_fwdbwd_graph_ms"]) / min(og)
        r["launch_overhead_share"] = max(0.0, 1 - min(og) / min(r["ours_fwdbwd_ms"]))


def flex_compile_kwargs() -> dict:
    """torch.compile arguments for FlexAttention. Its default tiles are 128 tokens wide: at a block mask finer than
    that the forward refuses the mask ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N", H200 at block
    64, 2026-12-06) and the backward skips every config it has (on sm90 one, 64 x 128 x 128 x 64 at head dim 64-128,
    in torch 2.11-2.13's template heuristics), leaving none. max-autotune adds configs of 32- and 64-wide tiles and
    picks the fastest that divides the block size, in both passes; from 128 up, the defaults."""
    return {"mode": "max-autotune-no-cudagraphs"} if BS < 128 else {}


def flex_timings(r, blk, x, ours_fwd, fwd_flops, flex_compiled):
    """FlexAttention (compiled) on the same kept blocks: output agreement with ours, then timings.
    Returns its fwd+bwd callable (for the graph / profiler passes)."""
    G = x.G
    bm = flex_block_mask(blk, G, x.L)

    def flex_f(q_, k_, v_, bm=bm):
        return flex_compiled(q_, k_, v_, block_mask=bm, enable_gqa=G > 1)

    with torch.no_grad():
        r["flex_vs_ours_out_rel_err"] = rel(flex_f(x.q, x.k, x.v), ours_fwd())
        r["flex_fwd_ms"] = timed_pair(lambda: flex_f(x.q, x.k, x.v))

    def flex_fb():
        flex_f(x.qg, x.kg, x.vg).backward(x.do)

    grads = [x.qg, x.kg, x.vg]
    r["flex_fwdbwd_ms"] = timed_pair(flex_fb, grads)
    if min(r["flex_fwdbwd_ms"]) < SLOW_MS:
        r["flex_host_ms_per_fwdbwd"] = host_ms(flex_fb)
    r["flex_fwd_tflops"] = fwd_flops / min(r["flex_fwd_ms"]) / 1e9
    r["flex_fwdbwd_tflops"] = 3.5 * fwd_flops / min(r["flex_fwdbwd_ms"]) / 1e9
    r["speedup_vs_flex_fwd"] = min(r["flex_fwd_ms"]) / min(r["ours_fwd_ms"])
    r["speedup_vs_flex_fwdbwd"] = min(r["flex_fwdbwd_ms"]) / min(r["ours_fwdbwd_ms"])
    for m in r.get("bwd_modes", {}).values():
        m["speedup_vs_flex_fwdbwd"] = min(r["flex_fwdbwd_ms"]) / min(m["fwdbwd_ms"])
    for m in r.get("variants", {}).values():
        if m.get("fwdbwd_ms"):
            m["speedup_vs_flex_fwd"] = min(r["flex_fwd_ms"]) / min(m["fwd_ms"])
            m["speedup_vs_flex_fwdbwd"] = min(r["flex_fwdbwd_ms"]) / min(m["fwdbwd_ms"])
        if m.get("fwdbwd_graph_ms") and r.get("flex_fwdbwd_ms"):
            m["speedup_vs_flex_fwdbwd_graph"] = min(r["flex_fwdbwd_ms"]) / min(m["fwdbwd_graph_ms"])
    return flex_fb


def flash_backend_status() -> dict:
    """Whether this torch can run FlexAttention's FLASH backend (CuTe DSL kernels from the flash-attn-4 package,
    imported as `flash_attn.cute`): torch's own check, or why not."""
    try:
        from torch._inductor.kernel.flex.flex_flash_attention import ensure_flash_available
    except Exception as e:  # a torch without the FLASH backend
        return {"available": False, "why": f"torch {torch.__version__} has no FLASH backend: {e!r}"[:300]}
    ok = bool(ensure_flash_available())
    return {"available": ok, "why": None if ok else "flash_attn.cute (pip package flash-attn-4) is not importable"}


def flex_flash_timings(blk, x, ours_fwd, r, flex_compiled) -> dict:
    """FlexAttention with kernel_options={"BACKEND": "FLASH"} on the same kept blocks: output agreement with ours,
    fwd and fwd+bwd ms, speed-ups against it; or the error that stopped it (one line)."""
    out = flash_backend_status()
    if not out["available"]:
        return out
    bm = flex_block_mask(blk, x.G, x.L)

    def f(q_, k_, v_):
        return flex_compiled(q_, k_, v_, block_mask=bm, enable_gqa=x.G > 1, kernel_options={"BACKEND": "FLASH"})

    try:
        with torch.no_grad():
            out["out_rel_err_vs_ours"] = rel(f(x.q, x.k, x.v), ours_fwd())
            out["fwd_ms"] = timed_pair(lambda: f(x.q, x.k, x.v))
        out["fwdbwd_ms"] = timed_pair(lambda: f(x.qg, x.kg, x.vg).backward(x.do), [x.qg, x.kg, x.vg])
    except Exception as e:  # the backend refuses this mask, shape or card: say why, keep the run
        out["error"] = repr(e)[:500]
        _recover_cuda(lambda m: None)
        return out
    out["ours_speedup_fwd"] = min(out["fwd_ms"]) / min(r["ours_fwd_ms"])
    out["ours_speedup_fwdbwd"] = min(out["fwdbwd_ms"]) / min(r["ours_fwdbwd_ms"])
    return out


def bench_selection(x, flex_compiled, log):
    """select_blocks (top-p, sink + 8 local blocks) + our fwd+bwd, vs FlexAttention on the same mask."""
    policy = "top_p:p=0.9,min=9,max=25"
    q, k, qg, kg, vg, do, G = x.q, x.k, x.qg, x.kg, x.vg, x.do, x.G

    def sel():
        return select_blocks(q, k, block_size=BS, policy=policy, sink_blocks=1, local_blocks=8)

    idx, cnt = sel()
    nq = q.shape[2] // BS
    blk = lists_to_blocks(idx, cnt, nq)
    bm = flex_block_mask(blk, G, q.shape[2])

    def sel_fb():
        i, c = sel()
        sparse_attention(qg, kg, vg, i, c, block_size=BS, impl="triton").backward(do)

    def ours_fb():
        sparse_attention(qg, kg, vg, idx, cnt, block_size=BS, impl="triton").backward(do)

    def flex_fb():
        flex_compiled(qg, kg, vg, block_mask=bm, enable_gqa=G > 1).backward(do)

    out = {"available": True, "policy": policy, "mean_blocks": float(cnt.float().mean()),
           "density": kept_pairs(blk, G) / (x.Hq * x.L * (x.L + 1) / 2),
           "select_ms": timed_pair(lambda: sel()), "select_plus_ours_fwdbwd_ms": timed_pair(sel_fb, [qg, kg, vg]),
           "ours_fwdbwd_ms": timed_pair(ours_fb, [qg, kg, vg]), "flex_fwdbwd_ms": timed_pair(flex_fb, [qg, kg, vg])}
    out["speedup_vs_flex_with_selection"] = min(out["flex_fwdbwd_ms"]) / min(out["select_plus_ours_fwdbwd_ms"])
    out["speedup_vs_flex_given_mask"] = min(out["flex_fwdbwd_ms"]) / min(out["ours_fwdbwd_ms"])
    out["selection_overhead"] = min(out["select_plus_ours_fwdbwd_ms"]) / min(out["ours_fwdbwd_ms"]) - 1
    for g in (qg, kg, vg):
        g.grad = None
    log("selection: " + json.dumps(out))
    return out


def breakdown(L, Hq, Hkv, log):
    """Where our fwd+bwd time goes on the window+random mask: host planning, each kernel, host (CPU) time."""
    from memsparse.kernels import sparse_attention_triton as tri

    D, nq = HEAD_DIM, L // BS
    gen = torch.Generator(device=DEV).manual_seed(L)
    q = torch.randn(1, Hq, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, Hkv, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, Hkv, L, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    do = torch.randn_like(q)
    idx, cnt = blocks_to_lists(window_random_blocks(Hkv, nq, seed=L))
    sc = D ** -0.5
    plan = tri.sparse_attention_plan(idx, cnt, L, L, BS, True)
    o, lse = tri._fwd_impl(q, k, v, idx, *plan[:3], BS, True, sc)
    t = {"L": L, "Hq": Hq, "Hkv": Hkv}
    t["fwd_impl_ms"] = bench(lambda: tri._fwd_impl(q, k, v, idx, *plan[:3], BS, True, sc))
    t["plan_ms"] = bench(lambda: tri.sparse_attention_plan(idx, cnt, L, L, BS, True))
    t["reverse_index_ms"] = bench(lambda: tri._reverse_from_keys(plan[3], plan[4]))
    for fused in (True, False):
        t[f"bwd_impl_{'fused' if fused else 'split'}_ms"] = bench(
            lambda fused=fused: tri._bwd_impl(do, q, k, v, o, lse, None, idx, *plan, BS, True, sc, fused))
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def fb():
        sparse_attention(qg, kg, vg, idx, cnt, block_size=BS, impl="triton").backward(do)

    t["autograd_fwdbwd_ms"] = bench(fb, [qg, kg, vg])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fb()
    t["host_ms_per_fwdbwd"] = (time.perf_counter() - t0) / 20 * 1e3  # launch-side time before the queue drains
    torch.cuda.synchronize()
    for name in ("_fwd_tuned", "_dq_tuned", "_dkdv_tuned", "_fused_tuned"):
        cfg = getattr(getattr(tri, name), "best_config", None)
        t[name + "_best"] = str(cfg)
    log("breakdown " + json.dumps(t))
    return t


# ------------------------------------------------------------------------------------------- report
def fmt(x, p=2, suffix=""):
    return "-" if x is None else f"{x:.{p}f}{suffix}"


def mn(x):
    """The lower of a timing pair (None when missing)."""
    return min(x) if x else None


def kl(L):
    return f"{L // 1024}K" if L >= 1024 else str(L)


def row_label(res, name=None):
    return f"{kl(res['L'])} {res['Hq']}/{res['Hkv']}" + (f" {name}" if name else "")


def max_err(check):
    errs = (check or {}).get("errors") or {}
    return max(errs.values()) if errs else None


def sorted_rows(results):
    return sorted(results, key=lambda r: (r["L"], -r["Hkv"]))


def timed_masks(results):
    """(row, mask name, mask results) for every mask whose fwd+bwd was timed, in table order."""
    for r in sorted_rows(results):
        for name, m in r["masks"].items():
            if "ours_fwdbwd_ms" in m:
                yield r, name, m


def main_tables(results):
    lines = ["| L | heads q/kv | mask | density | ours fwd | flex fwd | ours fwd+bwd | flex fwd+bwd | "
             "ours fwd+bwd (graph) ms | TFLOP/s ours fwd / fwd+bwd | vs flex fwd / fwd+bwd | "
             "vs flex fwd+bwd, ours graphed (flex do_bench / flex graphed) | vs ideal fwd / fwd+bwd | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, name, m in timed_masks(results):
        lines.append(
            f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {m['density']:.3f} | "
            f"{fmt(mn(m.get('ours_fwd_ms')), 3)} | {fmt(mn(m.get('flex_fwd_ms')), 3)} | "
            f"{fmt(mn(m.get('ours_fwdbwd_ms')), 3)} | {fmt(mn(m.get('flex_fwdbwd_ms')), 3)} | "
            f"{fmt(mn(m.get('ours_fwdbwd_graph_ms')), 3)} | "
            f"{fmt(m.get('ours_fwd_tflops'), 0)} / {fmt(m.get('ours_fwdbwd_tflops'), 0)} | "
            f"{fmt(m.get('speedup_vs_flex_fwd'), 2, 'x')} / {fmt(m.get('speedup_vs_flex_fwdbwd'), 2, 'x')} | "
            f"{fmt(m.get('speedup_vs_flex_fwdbwd_graph'), 2, 'x')} / "
            f"{fmt(m.get('speedup_vs_flex_fwdbwd_both_graph'), 2, 'x')} | "
            f"{fmt(m.get('ours_vs_ideal_fwd'))} / {fmt(m.get('ours_vs_ideal_fwdbwd'))} | "
            f"{_e(max_err(m.get('check')))} |")
    flash = [(r, name, m["flex_flash"]) for r, name, m in timed_masks(results) if "flex_flash" in m]
    if flash:
        lines += ["", 'FlexAttention\'s FLASH backend (`kernel_options={"BACKEND": "FLASH"}`, `--flex-flash`) on the '
                  "same masks, or why it did not run:", "",
                  "| L | heads q/kv | mask | FLASH fwd | FLASH fwd+bwd | ours vs FLASH fwd / fwd+bwd | "
                  "rel err vs ours | not run because |", "|---|---|---|---|---|---|---|---|"]
        for r, name, f in flash:
            why = f.get("why") or f.get("error") or ""
            lines.append(
                f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {fmt(mn(f.get('fwd_ms')), 3)} | "
                f"{fmt(mn(f.get('fwdbwd_ms')), 3)} | {fmt(f.get('ours_speedup_fwd'), 2, 'x')} / "
                f"{fmt(f.get('ours_speedup_fwdbwd'), 2, 'x')} | {_e(f.get('out_rel_err_vs_ours'))} | "
                f"{why.replace('|', '/')} |")
    lines += ["", "GPU-only (CUDA graph replays) vs `do_bench`, and the host's launch-side ms per fwd+bwd call "
              "(10 calls, no sync); launch share = 1 - graph / do_bench:", "",
              "| L | heads q/kv | mask | ours fwd graph | ours fwd+bwd do_bench | ours fwd+bwd graph | ours host ms | "
              "launch share | flex fwd+bwd do_bench | flex fwd+bwd graph | flex host ms | ours vs ideal (graph) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, name, m in timed_masks(results):
        og = fmt(mn(m.get("ours_fwdbwd_graph_ms")), 3) if "ours_fwdbwd_graph_ms_error" not in m else "fail"
        fg = fmt(mn(m.get("flex_fwdbwd_graph_ms")), 3) if "flex_fwdbwd_graph_ms_error" not in m else "fail"
        share = m.get("launch_overhead_share")
        lines.append(
            f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {fmt(mn(m.get('ours_fwd_graph_ms')), 3)} | "
            f"{fmt(mn(m.get('ours_fwdbwd_ms')), 3)} | {og} | {fmt(m.get('ours_host_ms_per_fwdbwd'))} | "
            f"{fmt(None if share is None else 100 * share, 0, '%')} | {fmt(mn(m.get('flex_fwdbwd_ms')), 3)} | "
            f"{fg} | {fmt(m.get('flex_host_ms_per_fwdbwd'))} | {fmt(m.get('ours_vs_ideal_fwdbwd_graph'))} |")
    lines += ["", "Dense SDPA flash (same inputs) and our kernel on the dense causal list:", "",
              "| L | heads q/kv | SDPA fwd ms (TFLOP/s) | SDPA fwd+bwd ms (TFLOP/s) | ours dense fwd / fwd+bwd ms | "
              "ours / SDPA fwd, fwd+bwd |", "|---|---|---|---|---|---|"]
    for r in sorted_rows(results):
        s, d = r.get("sdpa"), r["masks"].get("dense")
        if not s:
            continue
        ours = (f"{fmt(mn(d.get('ours_fwd_ms')), 3)} / {fmt(mn(d.get('ours_fwdbwd_ms')), 3)} | "
                f"{fmt(d.get('ours_vs_sdpa_fwd'))} / {fmt(d.get('ours_vs_sdpa_fwdbwd'))}") if d else "- | -"
        lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {mn(s['fwd_ms']):.3f} ({s['fwd_tflops']:.0f}) | "
                     f"{mn(s['fwdbwd_ms']):.3f} ({s['fwdbwd_tflops']:.0f}) | {ours} |")
    return lines


def _e(x):
    return "-" if x is None else f"{x:.1e}"


def _small_max(sc):
    return _e(max((max(c["errors"].values()) for c in sc if c["errors"]), default=None))


def variants_lines(results):
    bm = [(r, name, m) for r in sorted_rows(results) for name, m in r["masks"].items() if m.get("bwd_modes")]
    if not bm:
        return []
    lines = ["", "Backward variants (MEMSPARSE_SPARSE_ATTENTION_BWD), same inputs; host ms = launch-side time "
             "per fwd+bwd call (10 calls, no sync):", "",
             "| L | heads q/kv | mask | bwd | ours fwd+bwd ms | flex fwd+bwd ms | SDPA fwd+bwd ms (dense) | "
             "vs flex | host ms | max rel err | check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, name, m in bm:
        for mode, x in m["bwd_modes"].items():
            lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {mode} | {fmt(mn(x['fwdbwd_ms']), 3)} | "
                         f"{fmt(mn(m.get('flex_fwdbwd_ms')), 3)} | {fmt(mn(r['sdpa']['fwdbwd_ms']), 3)} | "
                         f"{fmt(x.get('speedup_vs_flex_fwdbwd'), 2, 'x')} | {fmt(x.get('host_ms_per_fwdbwd'))} | "
                         f"{_e(max_err(x['check']))} | {'pass' if x['check']['pass'] else 'FAIL'} |")
    return lines


def kernel_variant_lines(results):
    """The --variants table: each kernel variant beside the default kernel and FlexAttention, same inputs/masks."""
    rows = [(r, name, m) for r in sorted_rows(results) for name, m in r["masks"].items() if m.get("variants")]
    if not rows:
        return []
    lines = ["", "Kernel variants (`sparse_attention(variant=...)`, kernels/sparse_attention_hopper.py), same inputs "
             "and masks; each checked against fp32 first (o, lse, dq, dk, dv) and timed only if the check passes; "
             "ratios > 1 = the variant is faster:", "",
             "| L | heads q/kv | mask | variant | check (max rel err) | fwd ms | fwd+bwd ms | fwd+bwd graph ms | "
             "TFLOP/s fwd / fwd+bwd | vs default fwd / fwd+bwd | vs flex fwd / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, name, m in rows:
        lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | default | {_e(max_err(m.get('check')))} | "
                     f"{fmt(mn(m.get('ours_fwd_ms')), 3)} | {fmt(mn(m.get('ours_fwdbwd_ms')), 3)} | "
                     f"{fmt(mn(m.get('ours_fwdbwd_graph_ms')), 3)} | {fmt(m.get('ours_fwd_tflops'), 0)} / "
                     f"{fmt(m.get('ours_fwdbwd_tflops'), 0)} | 1.00x / 1.00x | "
                     f"{fmt(m.get('speedup_vs_flex_fwd'), 2, 'x')} / {fmt(m.get('speedup_vs_flex_fwdbwd'), 2, 'x')} |")
        for vname, x in m["variants"].items():
            chk = x.get("check")
            status = ("-" if not chk else ("pass" if chk["pass"] else "FAIL")) + f" ({_e(max_err(chk))})"
            if x.get("error"):
                status += f" error: {x['error'][:120]}"
            lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {vname} | {status} | "
                         f"{fmt(mn(x.get('fwd_ms')), 3)} | {fmt(mn(x.get('fwdbwd_ms')), 3)} | "
                         f"{fmt(mn(x.get('fwdbwd_graph_ms')), 3)} | {fmt(x.get('fwd_tflops'), 0)} / "
                         f"{fmt(x.get('fwdbwd_tflops'), 0)} | {fmt(x.get('speedup_vs_default_fwd'), 2, 'x')} / "
                         f"{fmt(x.get('speedup_vs_default_fwdbwd'), 2, 'x')} | "
                         f"{fmt(x.get('speedup_vs_flex_fwd'), 2, 'x')} / "
                         f"{fmt(x.get('speedup_vs_flex_fwdbwd'), 2, 'x')} |")
    return lines


def selection_lines(results):
    sel = [r for r in sorted_rows(results) if r.get("selection", {}).get("available")]
    if not sel:
        return ["Selection: not run (`--no-select`, `select_blocks` unavailable, or past the deadline)."]
    lines = ["Selection (`select_blocks`, top-p) + our fwd+bwd vs FlexAttention fwd+bwd on the selected mask "
             "(Flex is given the mask: its time excludes the selection):", "",
             "| L | heads q/kv | blocks/row | density | select ms | select + ours ms | ours ms | flex ms | overhead | "
             "vs flex, selection included | vs flex, given the mask |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        s = r["selection"]
        if "error" in s:
            lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | error: {s['error'][:80]} |||||||||")
            continue
        lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {s['mean_blocks']:.1f} | {fmt(s.get('density'), 3)} | "
                     f"{fmt(mn(s['select_ms']), 3)} | {fmt(mn(s['select_plus_ours_fwdbwd_ms']), 3)} | "
                     f"{fmt(mn(s['ours_fwdbwd_ms']), 3)} | {fmt(mn(s['flex_fwdbwd_ms']), 3)} | "
                     f"{100 * s['selection_overhead']:.1f}% | {s['speedup_vs_flex_with_selection']:.2f}x | "
                     f"{fmt(s.get('speedup_vs_flex_given_mask'), 2, 'x')} |")
    return lines


def _cfg_str(c):
    return f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')} w{c.get('num_warps')} s{c.get('num_stages')}" + \
        (" ws" if c.get("WS") else "") + (" flat" if c.get("FLATTEN") else "") + \
        (f" maxnreg{c['maxnreg']}" if c.get("maxnreg") else "")


def _uniq(vals, f=str):
    u = sorted({v for v in vals if v is not None})
    return "/".join(f(v) for v in u) if u else "n/a"


def _occ_str(variants):
    """CTAs/SM by regs / smem / warps -> min (limiter), for one or more compiled instances of a config."""
    occ = [v["occupancy"] for v in variants]
    if not occ:
        return "n/a", "n/a"
    parts = " / ".join(_uniq([o.get(k) for o in occ]) for k in ("by_regs", "by_smem", "by_warps"))
    lim = _uniq([o.get("limiter") for o in occ])
    ctas = _uniq([o.get("ctas") for o in occ])
    wps = _uniq([o.get("warps_per_sm") for o in occ])
    pct = _uniq([None if o.get("occupancy") is None else round(100 * o["occupancy"]) for o in occ])
    return f"{parts} -> {ctas} ({lim})", f"{wps} ({pct}%)"


def _matching(compiled, kernel, G, cfg):
    return [v for v in compiled if v["kernel"] == kernel and str(v.get("G")) == str(G)
            and v.get("BLOCK_M") == cfg.get("BLOCK_M") and v.get("BLOCK_N") == cfg.get("BLOCK_N")
            and v.get("num_warps") == cfg.get("num_warps") and v.get("num_stages") == cfg.get("num_stages")
            and bool(v.get("WS")) == bool(cfg.get("WS")) and bool(v.get("FLATTEN")) == bool(cfg.get("FLATTEN"))
            and v.get("maxnreg") == cfg.get("maxnreg")]


def report_lines(report, results):
    """Markdown for the --report data: chosen configs, variants timed, compiled resources, waves, GPU split."""
    if not report:
        return []
    dev, compiled = report.get("device", {}), report.get("compiled", [])
    sms = dev.get("sm_count")
    lines = ["", "## Compiler report (`--report`)", "",
             f"Per kernel and autotuning key: the config the autotuner chose, and from the compiled kernel registers "
             f"per thread, spills, shared memory, and the CTAs one SM can hold (by registers "
             f"{dev.get('regs_per_sm', REGS_PER_SM)} // (regs*32*warps), by shared memory "
             f"{dev.get('smem_per_sm', SMEM_PER_SM)} // shared, by warps "
             f"{dev.get('max_warps_per_sm', MAX_WARPS_PER_SM)} // warps; the min and what sets it); "
             f"{sms or 'n/a'} SMs. "
             "Several values (a/b) = several compiled specializations of one config (e.g. list widths).", "",
             "| kernel | G | tuned on | chosen BLOCK_MxBLOCK_N, warps, stages | regs/thread | spills | smem KB | "
             "CTAs/SM regs / smem / warps -> min (limiter) | warps/SM (occupancy) |",
             "|---|---|---|---|---|---|---|---|---|"]
    tuning = sorted(report.get("tuning", []), key=lambda t: (KERNEL_ORDER.index(t["tuner"])
                                                             if t["tuner"] in KERNEL_ORDER else 99,
                                                             str(t["key"].get("G"))))
    for t in tuning:
        G = t["key"].get("G")
        vs = _matching(compiled, t.get("kernel", t["tuner"]), G, t["best"])
        occ, wps = _occ_str(vs)
        lines.append(f"| {t['tuner']} | {G} | {t.get('context') or '-'} | {_cfg_str(t['best'])} | "
                     f"{_uniq([v['n_regs'] for v in vs])} | {_uniq([v['n_spills'] for v in vs])} | "
                     f"{_uniq([v['shared'] for v in vs], lambda s: f'{s / 1024:.0f}')} | {occ} | {wps} |")
    for v in compiled:
        if v["kernel"] in ("plan", "prep"):
            occ, wps = _occ_str([v])
            lines.append(f"| {v['kernel']} (not tuned) | - | - | R={v.get('R')}, w{v.get('num_warps')} "
                         f"s{v.get('num_stages')} | {fmt(v['n_regs'], 0)} | {fmt(v['n_spills'], 0)} | "
                         f"{fmt(None if v['shared'] is None else v['shared'] / 1024, 0)} | {occ} | {wps} |")
    timed = [t for t in tuning if t.get("timings")]
    if timed:
        lines += ["", "Variants timed by the autotuner (its do_bench median on the tuning row) with their "
                  "compiled resources:", "",
                  "| kernel | G | config | autotune ms | vs chosen | regs | spills | smem KB | CTAs/SM -> min "
                  "(limiter) |", "|---|---|---|---|---|---|---|---|---|"]
        for t in timed:
            G = t["key"].get("G")
            best = next((x["ms"] for x in t["timings"] if _cfg_str(x) == _cfg_str(t["best"])), None)
            for x in sorted(t["timings"], key=lambda x: (x["ms"] is None, x["ms"] or 0)):
                vs = _matching(compiled, t.get("kernel", t["tuner"]), G, x)
                occ, _ = _occ_str(vs)
                ratio = x["ms"] / best if (x["ms"] and best) else None
                lines.append(f"| {t['tuner']} | {G} | {_cfg_str(x)}{' (chosen)' if ratio == 1 else ''} | "
                             f"{fmt(x['ms'], 3)} | {fmt(ratio, 2, 'x')} | {_uniq([v['n_regs'] for v in vs])} | "
                             f"{_uniq([v['n_spills'] for v in vs])} | "
                             f"{_uniq([v['shared'] for v in vs], lambda s: f'{s / 1024:.0f}')} | {occ} |")
    waves = []
    for t in tuning:
        for v in _matching(compiled, t.get("kernel", t["tuner"]), t["key"].get("G"), t["best"]):
            ctas = v["occupancy"].get("ctas")
            for ctx, n in v.get("programs", {}).items():
                if n and ctx:
                    w = n / (sms * ctas) if (sms and ctas) else None
                    waves.append((t["tuner"], ctx, n, w))
    if waves:
        lines += ["", "Launch size of the chosen configs per row: programs, and waves = programs / (SMs x CTAs/SM) "
                  "(a small or fractional last wave leaves SMs idle at the tail):", "",
                  "| kernel | row | programs | waves |", "|---|---|---|---|"]
        seen = set()
        for kern, ctx, n, w in sorted(waves, key=lambda x: (x[1], KERNEL_ORDER.index(x[0])
                                                            if x[0] in KERNEL_ORDER else 99)):
            if (kern, ctx) not in seen:
                seen.add((kern, ctx))
                lines.append(f"| {kern} | {ctx} | {n} | {fmt(w, 2)} |")
    splits = [(r, name, m) for r in sorted_rows(results) for name, m in r["masks"].items()
              if m.get("gpu_split_ours")]
    if splits:
        lines += ["", "Where the GPU time of one fwd+bwd goes (torch.profiler, kernel ms per call, heaviest first; "
                  "sum = all kernels incl. memsets/copies):", "",
                  "| L | heads q/kv | mask | ours kernels (ms) | ours sum | flex kernels (ms) | flex sum |",
                  "|---|---|---|---|---|---|---|"]

        def top(sp, n):
            return ", ".join(f"{k['name'][:40]} {k['ms']:.3f}" for k in sp["kernels"][:n]) if sp else "-"

        for r, name, m in splits:
            fs = m.get("gpu_split_flex")
            lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {top(m['gpu_split_ours'], 7)} | "
                         f"{m['gpu_split_ours']['total_ms']:.3f} | {top(fs, 4)} | "
                         f"{fmt(fs['total_ms'] if fs else None, 3)} |")
    if report.get("errors"):
        lines += ["", "Report collection notes: " + "; ".join(report["errors"][:10])]
    return lines


# ------------------------------------------------------------------------------------------------ bars
BARS = [
    ("1", "fwd+bwd >= 1.3x faster than FlexAttention on identical masks (32K and 128K)", 1.3, "ge"),
    ("2", "fwd+bwd within 1.2x of ideal (dense SDPA flash fwd+bwd x density)", 1.2, "le"),
    ("3", "selection included, still >= 1.15x faster than FlexAttention given the mask", 1.15, "ge"),
    ("4", "dense budget (full causal list) within 1.15x of SDPA flash fwd+bwd", 1.15, "le"),
    ("5", "bf16 max rel err <= 1e-2 (o, lse, dq, dk, dv vs fp32 reference)", 1e-2, "le"),
]


def judge(value, target, op, ours_ms=None):
    """met?, and how far: for a miss the factor our time must shrink by (and to what); for a pass the headroom."""
    if value is None:
        return None, "not measured"
    met = value >= target if op == "ge" else value <= target
    # factor > 1: ours must get that many times faster; < 1: ours could get that much slower and still pass
    need = target / value if op == "ge" else value / target
    if ours_ms is None:
        gap = (f"off by {100 * (need - 1):.0f}%" if not met else f"margin {100 * (1 - need):.0f}%")
    elif not met:
        gap = (f"ours must get {need:.2f}x faster: {ours_ms:.3f} -> {ours_ms / need:.3f} ms "
               f"(-{100 * (1 - 1 / need):.0f}%)")
    else:
        gap = f"headroom {100 * (1 / need - 1):.0f}% ({ours_ms:.3f} ms; the bar allows {ours_ms / need:.3f} ms)"
    return met, gap


def bars(results):
    """Every bar against every measured row (computed from the numbers in `results`, nothing typed in)."""
    out = []
    for bid, text, target, op in BARS:
        rows = []
        for r in sorted_rows(results):
            for name, m in r["masks"].items():
                lab = row_label(r, name)
                if bid == "1" and name != "dense" and r["L"] in (32768, 131072):
                    rows.append((lab + " (do_bench)", m.get("speedup_vs_flex_fwdbwd"), mn(m.get("ours_fwdbwd_ms")),
                                 True))
                    if m.get("speedup_vs_flex_fwdbwd_both_graph") is not None:
                        rows.append((lab + " (GPU-only: both CUDA-graphed)", m["speedup_vs_flex_fwdbwd_both_graph"],
                                     mn(m.get("ours_fwdbwd_graph_ms")), False))
                    for vname, x in (m.get("variants") or {}).items():
                        if x.get("speedup_vs_flex_fwdbwd") is not None:
                            rows.append((f"{lab} variant={vname} (do_bench)", x["speedup_vs_flex_fwdbwd"],
                                         mn(x.get("fwdbwd_ms")), False))
                elif bid == "2" and name != "dense":
                    rows.append((lab + " (do_bench)", m.get("ours_vs_ideal_fwdbwd"), mn(m.get("ours_fwdbwd_ms")), True))
                    if m.get("ours_vs_ideal_fwdbwd_graph") is not None:
                        rows.append((lab + " (ours CUDA-graphed)", m["ours_vs_ideal_fwdbwd_graph"],
                                     mn(m.get("ours_fwdbwd_graph_ms")), False))
                    rows.append((lab + " (fwd only)", m.get("ours_vs_ideal_fwd"), mn(m.get("ours_fwd_ms")), False))
                elif bid == "4" and name == "dense":
                    rows.append((lab + " fwd+bwd", m.get("ours_vs_sdpa_fwdbwd"), mn(m.get("ours_fwdbwd_ms")), True))
                    rows.append((lab + " fwd only", m.get("ours_vs_sdpa_fwd"), mn(m.get("ours_fwd_ms")), False))
                elif bid == "5" and m.get("check"):
                    rows.append((lab, max_err(m["check"]), None, True))
                    for mode, x in (m.get("bwd_modes") or {}).items():
                        rows.append((f"{lab} bwd={mode}", max_err(x.get("check")), None, True))
                    for vname, x in (m.get("variants") or {}).items():
                        if x.get("check"):
                            rows.append((f"{lab} variant={vname}", max_err(x["check"]), None, True))
            s = r.get("selection") or {}
            if bid == "3" and s.get("available") and "error" not in s:
                rows.append((row_label(r, "selection"), s.get("speedup_vs_flex_with_selection"),
                             mn(s.get("select_plus_ours_fwdbwd_ms")), True))
        for lab, value, ours, primary in rows:
            met, gap = judge(value, target, op, ours)
            out.append({"bar": bid, "text": text, "row": lab, "value": value, "target": target, "op": op,
                        "met": met, "gap": gap, "primary": primary})
        if not rows:
            out.append({"bar": bid, "text": text, "row": "-", "value": None, "target": target, "op": op,
                        "met": None, "gap": "not measured in this run", "primary": True})
    return out


def bars_lines(bar_rows):
    lines = ["", "## Bars (computed from the numbers above)", "",
             "Primary rows use `do_bench` times (as every table above); secondary rows (GPU-only / fwd only) show "
             "how much of a gap is launch overhead or the backward.", ""]
    for bid, text, target, op in BARS:
        rows = [b for b in bar_rows if b["bar"] == bid]
        prim = [b for b in rows if b["primary"] and b["met"] is not None]
        if prim:
            worst = (min if op == "ge" else max)(prim, key=lambda b: b["value"])
            head = (f"met in {sum(b['met'] for b in prim)}/{len(prim)} primary rows; worst {worst['row']}: "
                    f"{_val(worst['value'], bid)} vs {'>=' if op == 'ge' else '<='} {_val(target, bid)}")
        else:
            head = "not measured in this run"
        lines += [f"**Bar {bid}: {text}** ({head})", "", "| row | measured | target | status | how far |",
                  "|---|---|---|---|---|"]
        for b in rows:
            status = "-" if b["met"] is None else ("met" if b["met"] else "MISSED")
            lines.append(f"| {b['row']} | {_val(b['value'], bid)} | {'>=' if op == 'ge' else '<='} "
                         f"{_val(target, bid)} | {status} | {b['gap']} |")
        lines.append("")
    return lines


def _val(v, bid):
    if v is None:
        return "-"
    return f"{v:.1e}" if bid == "5" else (f"{v:.2f}x" if bid in ("1", "3") else f"{v:.2f}")


def markdown(results, meta, report=None, failures=()):
    lines = [f"# Block-sparse attention: our Triton kernel vs FlexAttention vs SDPA flash ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, B=1, D={meta.get('head_dim', 128)}, causal, "
             f"block {meta.get('block_size', 128)}; `do_bench` medians in ms (each timed twice, the lower shown; "
             f"once above {SLOW_MS:.0f} ms); "
             f"graph = CUDA-graph replays (GPU-only, no host launch cost, no L2 flush); TFLOP/s on kept work "
             f"(fwd 4*kept*D, fwd+bwd 3.5x); ideal = SDPA time x density. Command: `{meta['command']}`", ""]
    lines += main_tables(results)
    lines += variants_lines(results)
    lines += kernel_variant_lines(results)
    sc = meta.get("small_checks", [])
    if sc:
        lines += ["", f"Odd-shape GPU checks vs the reference (tails, Lq < Lk, GQA, duplicates, empty lists, "
                  f"dlse): {sum(c['pass'] for c in sc)}/{len(sc)} pass, max rel err {_small_max(sc)}."]
        lines += [f"Odd-shape check FAILED: {c['case']} bwd={c['bwd']} variant={c.get('variant', 'default')}: "
                  f"{c.get('error') or c['errors']}" for c in sc if not c["pass"]]
    if meta.get("small_checks_skipped"):
        lines += [f"Odd-shape checks skipped at 40% of --deadline-s: {len(meta['small_checks_skipped'])} "
                  f"(variants {sorted({c['variant'] for c in meta['small_checks_skipped']})})."]
    lines += [""] + selection_lines(results)
    lines += report_lines(report, results)
    lines += bars_lines(bars(results))
    run = meta.get("run") or {}
    if run or failures:
        lines += ["## Run", ""]
        if run:
            lines.append(f"{run.get('done', 0)} work items done, {len(run.get('skipped', []))} skipped past the "
                         f"deadline, elapsed {fmt(run.get('elapsed_s'), 0)} s (deadline "
                         f"{fmt(run.get('deadline_s'), 0)} s){'; INTERRUPTED' if run.get('interrupted') else ''}.")
            if run.get("skipped"):
                lines.append("Skipped: " + ", ".join(run["skipped"]) + ".")
        for f in failures:
            if not str(f.get("error", "")).startswith("skipped"):
                last = (str(f.get("error", "")).strip().splitlines() or [""])[-1]
                lines.append(f"Failed: {f.get('item')}: `{last[-300:]}` (traceback in the JSON / log)")
        lines.append("")
    return "\n".join(lines) + "\n"




def process_start_time() -> float:
    """Epoch seconds when this process started (Linux /proc), else now: the deadline counts imports too."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        return time.time()


def check_only(args, lengths, heads, masks, variants, modes, log):
    """--check-only: every (length, heads, mask) x kernel variant x backward mode against the fp32 computation,
    no timing; on CPU through the interpreter."""
    results = []
    for L in lengths:
        for Hq, Hkv in heads:
            x = make_inputs(L, Hq, Hkv)
            row = {"L": L, "Hq": Hq, "Hkv": Hkv, "D": x.D, "block_size": BS, "masks": {}}
            results.append(row)
            for name in masks:
                if name == "window+random":
                    blk = window_random_blocks(Hkv, x.nq, seed=L)
                elif name == "dense":
                    blk = torch.ones(x.nq, x.nq, dtype=torch.bool, device=DEV).tril().expand(Hkv, x.nq, x.nq)
                else:
                    raise ValueError(f"unknown mask {name!r}")
                idx, cnt = blocks_to_lists(blk.contiguous())
                checks = row["masks"].setdefault(name, {"checks": []})["checks"]
                for vname in variants or ["default"]:
                    for mode in modes:
                        t0 = time.time()
                        with bwd_mode(mode):
                            chk = check_kernel(x.q, x.k, x.v, idx, cnt, blk, full_check=(x.nq <= 64), variant=vname)
                        chk["bwd"] = mode or "default"
                        checks.append(chk)
                        log(f"L={L} {Hq}/{Hkv} {name} variant={vname} bwd={chk['bwd']}: {json.dumps(chk)} "
                            f"({time.time() - t0:.1f}s)")
    return results


def check_only_lines(results, meta):
    lines = [f"# Block-sparse attention kernel checks, no timing ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, B=1, D={meta.get('head_dim', 128)}, causal, "
             f"block {meta.get('block_size', 128)}; rel. errors against an fp32 computation (pass: every value finite "
             f"and each <= 1e-2). "
             f"Command: `{meta['command']}`", "",
             "| L | heads q/kv | mask | variant | bwd | o | lse | dq | dk | dv | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted_rows(results):
        for name, m in r["masks"].items():
            for c in m["checks"]:
                e = c["errors"]
                lines.append(f"| {kl(r['L'])} | {r['Hq']}/{r['Hkv']} | {name} | {c['variant']} | {c['bwd']} | "
                             + " | ".join(_e(e[k]) for k in ("o", "lse", "dq", "dk", "dv"))
                             + f" | {'pass' if c['pass'] else 'FAIL'} |")
    sc = meta.get("small_checks", [])
    if sc:
        lines += ["", f"Odd-shape checks vs the reference: {sum(c['pass'] for c in sc)}/{len(sc)} pass, max rel err "
                  f"{_small_max(sc)}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    global DEV, HEAD_DIM, BS
    t_proc = process_start_time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--heads", default="16/16,16/4", help="q/kv head pairs (the first is the headline one)")
    ap.add_argument("--flex-dense", action="store_true", help="also time FlexAttention on the dense list")
    ap.add_argument("--flex-flash", action="store_true",
                    help='also time FlexAttention\'s FLASH backend (kernel_options={"BACKEND": "FLASH"}; needs '
                         'flash_attn.cute), or record why it cannot run')
    ap.add_argument("--no-select", action="store_true")
    ap.add_argument("--no-small-checks", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (GPU-only) timings")
    ap.add_argument("--report", action="store_true",
                    help="compiler/occupancy report of our Triton kernels + per-kernel GPU time split")
    ap.add_argument("--breakdown", action="store_true", help="only time the pieces of our fwd+bwd")
    ap.add_argument("--name", default="sparse_attention")
    ap.add_argument("--masks", default="window+random,dense", help="which block masks to run")
    ap.add_argument("--bwd-modes", default="", help="e.g. fused,split: check and time each backward variant")
    ap.add_argument("--variants", default="",
                    help="kernel variants to check and time beside the default kernel, e.g. "
                         "default,persistent,dynamic,tma,persistent+tma,dynamic+tma+ws")
    ap.add_argument("--persistent-programs", type=int, default=0,
                    help="programs of a persistent variant's launch (0: the SM count)")
    ap.add_argument("--check-only", action="store_true", help="only the checks (every variant and bwd mode)")
    ap.add_argument("--head-dim", type=int, default=128, help="D of q, k, v (the GPU recipes use 64)")
    ap.add_argument("--block-size", type=int, default=128,
                    help="tokens a block (the GPU recipes use 64; the masks' window and extra blocks stay counts)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --check-only (needs TRITON_INTERPRET=1)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start a work item only if its estimated end is within this many seconds of the process "
                         "start (0: no limit)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    from memsparse.kernels import sparse_attention_hopper as hop
    from memsparse.kernels import sparse_attention_triton as tri

    variants = parse_variants(args.variants)
    if args.persistent_programs:
        hop.PERSISTENT_PROGRAMS = args.persistent_programs
    DEV = args.device
    if args.head_dim not in tri.SUPPORTED_HEAD_DIMS:
        raise SystemExit(f"--head-dim {args.head_dim}: the kernels take {tri.SUPPORTED_HEAD_DIMS}")
    HEAD_DIM = args.head_dim
    if args.block_size not in (16, 32, 64, 128, 256):
        raise SystemExit(f"--block-size {args.block_size}: the kernels take 16 to 256, a power of two")
    BS = args.block_size
    if DEV != "cuda" and not (args.check_only and DEV == "cpu" and tri.interpreting()):
        raise SystemExit("--device cpu runs only with --check-only and TRITON_INTERPRET=1")
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": "python " + " ".join(sys.argv if argv is None else
                                                                                 [sys.argv[0], *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": variants, "head_dim": HEAD_DIM,
            "block_size": BS, "flex_flash_backend": flash_backend_status()}
    log_f = open(out / f"{args.name}.log", "a")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    log(json.dumps(meta))
    if args.check_only:
        lengths = [int(x) for x in args.lengths.split(",")]
        modes = tuple(args.bwd_modes.split(",")) if args.bwd_modes else (None,)
        meta["small_checks"] = ([] if args.no_small_checks else
                                small_checks(log, modes, variants or ["default"],
                                             TINY_SMALL_CASES if DEV == "cpu" else None))
        results = check_only(args, lengths, parse_heads(args.heads), [m for m in args.masks.split(",") if m],
                             variants, modes, log)
        doc = {"meta": meta, "results": results}
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str))
        md = check_only_lines(results, meta)
        (out / f"{args.name}.md").write_text(md)
        log_f.close()
        print(md)
        return doc
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("cache_size_limit", "recompile_limit"):  # one compile per (L, GQA) shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    flex_compiled = torch.compile(flex_attention, dynamic=False, **flex_compile_kwargs())
    if args.breakdown:
        rows = [breakdown(L, Hq, Hkv, log) for L in (int(x) for x in args.lengths.split(","))
                for Hq, Hkv in parse_heads(args.heads)]
        (out / f"{args.name}_breakdown.json").write_text(json.dumps({"meta": meta, "breakdown": rows}, indent=1))
        return

    recorder = KernelRecorder(tri, hop) if args.report else None
    results, failures = [], []
    lengths = [int(x) for x in args.lengths.split(",")]
    heads = parse_heads(args.heads)
    masks = [m for m in args.masks.split(",") if m]
    items = work_items(lengths, heads, masks, select=select_blocks is not None and not args.no_select)
    run = {"deadline_s": args.deadline_s or None, "planned": [_item_str(it) for it in items], "done": 0,
           "skipped": [], "items": [], "interrupted": False}
    meta["run"] = run

    def write():
        run["elapsed_s"] = time.time() - t_proc
        report = None
        if recorder is not None:
            try:
                recorder.snapshot_tuning()
                report = recorder.report()
            except Exception as e:
                report = {"errors": [f"report failed: {e!r}"[:300]]}
        doc = {"meta": meta, "results": sorted_rows(results), "failures": failures, "report": report,
               "bars": bars(results)}
        (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str))
        md = markdown(results, meta, report, failures)
        (out / f"{args.name}.md").write_text(md)
        return md

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    md = ""
    try:
        modes = tuple(args.bwd_modes.split(",")) if args.bwd_modes else (None,)
        t0 = time.time()
        if recorder is not None:
            recorder.context = "small checks"
        # the odd-shape checks may use at most 40% of --deadline-s, so the timings still get most of it
        stop_at = t_proc + 0.4 * args.deadline_s if args.deadline_s else None
        meta["small_checks_skipped"] = []
        meta["small_checks"] = (small_checks(log, modes, variants or ["default"], stop_at=stop_at,
                                             skipped=meta["small_checks_skipped"]) if not args.no_small_checks else [])
        if not args.no_small_checks:
            log(f"small checks done in {time.time() - t0:.1f}s")
        state = {"tuned_groups": set(), "flex_shapes": set(), "sdpa_rows": set(), "est_sum": 0.0, "act_sum": 0.0}
        attempted = False
        for it in items:
            kind, L, Hq, Hkv = it
            est = estimate_s(it, state, args.flex_dense, len([v for v in variants if v != "default"]))
            scale = min(max(state["act_sum"] / state["est_sum"], 0.25), 2.0) if state["est_sum"] > 0 else 1.0
            now = time.time() - t_proc
            if not item_fits(now, est * scale, args.deadline_s, started=attempted):
                run["skipped"].append(_item_str(it))
                failures.append({"item": _item_str(it), "error": f"skipped: at {now:.0f}s, estimated "
                                 f"{est * scale:.0f}s would pass --deadline-s {args.deadline_s:.0f}"})
                log(f"{_item_str(it)}: skipped at {now:.0f}s (estimated {est * scale:.0f}s, deadline "
                    f"{args.deadline_s:.0f}s)")
                continue
            attempted = True
            res = next((r for r in results if (r["L"], r["Hq"], r["Hkv"]) == (L, Hq, Hkv)), None)
            if res is None:
                res = {"L": L, "Hq": Hq, "Hkv": Hkv, "D": HEAD_DIM, "block_size": BS, "masks": {}}
                results.append(res)
            if recorder is not None:
                recorder.context = _item_str(it)
            t_item = time.time()
            x = None
            try:
                x = make_inputs(L, Hq, Hkv)
                if kind == "select":
                    try:
                        res["selection"] = bench_selection(x, flex_compiled, log)
                    except Exception as e:
                        res["selection"] = {"available": True, "error": repr(e)[:500]}
                        raise
                else:
                    run_mask(res, x, kind, args, flex_compiled, log)
            except Exception:
                if kind in res["masks"] and "ours_fwdbwd_ms" not in res["masks"][kind]:
                    res["masks"].pop(kind)  # a partial row would read as a result
                failures.append({"item": _item_str(it), "error": traceback.format_exc()[-2000:]})
                log(failures[-1]["error"])
            dt = time.time() - t_item
            state["tuned_groups"].add(Hq // Hkv)
            if "sdpa" in res:
                state["sdpa_rows"].add((L, Hq, Hkv))
            if kind != "dense" or args.flex_dense:
                state["flex_shapes"].add((L, Hq, Hkv))
            state["est_sum"] += est
            state["act_sum"] += dt
            run["done"] += 1
            run["items"].append({"item": _item_str(it), "estimated_s": est, "took_s": dt})
            log(f"{_item_str(it)} done in {dt:.1f}s (estimated {est:.0f}s); elapsed {time.time() - t_proc:.0f}s")
            del x
            torch.cuda.empty_cache()
            md = write()
    except (SystemExit, KeyboardInterrupt):
        run["interrupted"] = True
        log("interrupted: writing what finished")
    finally:
        if recorder is not None:
            recorder.context = ""
        md = write()
        if recorder is not None:
            recorder.restore()
    print(md)


def _item_str(it):
    kind, L, Hq, Hkv = it
    return f"{kl(L)} {Hq}/{Hkv} {'selection' if kind == 'select' else kind}"


if __name__ == "__main__":
    main()
