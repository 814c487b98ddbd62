"""Block-sparse attention on the GPU: our Triton kernel vs FlexAttention vs dense SDPA flash, one run.

Same inputs and the same block lists for every variant (BENCHMARKS.md section 1): B=1, 16 query heads,
D=128, bf16, causal 128-blocks, per query block the 8 most recent blocks (window 1024, diagonal
included) + 16 pseudo-random earlier blocks + block 0; and a dense (full causal) list beside SDPA.
Before timing, each kernel output and gradient is checked against an fp32 PyTorch computation of the
same function (all query blocks at 8K; a subset of query blocks, and the key blocks whose every query
block is in it, at longer lengths). Writes JSON + a markdown table to --out (default $OUT).

    python benchmarks/bench_sparse_attention.py --out benchmarks/results
    python benchmarks/bench_sparse_attention.py --bwd-modes fused,split --out $OUT  # both backward variants

With --bwd-modes, every listed backward (MEMSPARSE_SPARSE_ATTENTION_BWD) is checked and timed on the same
inputs, and the first one fills the main table; without it the default backward is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BS = 128
DEV = "cuda"


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

    def causal(b, h, q_idx, kv_idx):
        # Block sparsity comes from the BlockMask itself (the compiled kernel visits only listed blocks and
        # evaluates mask_mod on the partial, diagonal ones); the run checks flex's output against ours.
        return q_idx >= kv_idx

    kv_num, kv_idx = ordered(part)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BS, causal)


# ------------------------------------------------------------------------------------------- checking
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
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


def check_kernel(q, k, v, idx, cnt, blk, full_check: bool):
    """Our kernel vs fp32 blockwise reference: rel. errors of o, lse, dq, dk, dv on the checked rows."""
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
    o, lse = sparse_attention(qg, kg, vg, idx, cnt, block_size=BS, return_lse=True, impl="triton")
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
    return {"errors": errs, "finite": finite, "query_blocks_checked": len(qblocks),
            "key_blocks_checked": len(kblocks), "pass": finite and max(errs.values()) <= 1e-2}


def small_checks(log, modes=(None,)):
    """Odd shapes on the GPU (tails, Lq < Lk, GQA, duplicates, junk padding, empty lists, dlse) vs the reference.

    Run with autotuning off (one fixed config per kernel) to keep compiles few; the real-size checks
    below cover the autotuned configs."""
    from memsparse.kernels import sparse_attention_triton as tri

    cases = [  # (Hq, Hkv, Lq, Lk, D, bs, dtype)
        (4, 1, 300, 431, 128, 128, torch.bfloat16), (2, 2, 200, 200, 64, 64, torch.float16),
        (8, 2, 333, 333, 128, 64, torch.float32), (4, 2, 129, 700, 64, 128, torch.bfloat16)]
    saved = tri.AUTOTUNE
    tri.AUTOTUNE = False
    out = []
    try:
        for (Hq, Hkv, Lq, Lk, D, bs, dt), mode in ((c, md) for c in cases for md in modes):
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
            for impl, lst in (("triton", got), ("reference", want)):
                qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                with bwd_mode(mode):
                    o, lse = sparse_attention(qq, kk, vv, idx, cnt.int(), block_size=bs, return_lse=True,
                                              impl=impl)
                    lf = torch.where(torch.isfinite(lse), lse, 0.0)
                    ((o.float() * do).sum() + (lf * dlse).sum()).backward()
                lst += [o, lf, qq.grad, kk.grad, vv.grad]
            errs = {n: rel(a, b) for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want)}
            finite = all(bool(torch.isfinite(t).all()) for t in got)
            tol = 1e-4 if dt == torch.float32 else 1e-2
            out.append({"case": [Hq, Hkv, Lq, Lk, D, bs, str(dt)], "bwd": mode, "errors": errs, "finite": finite,
                        "pass": finite and max(errs.values()) <= tol})
            log("small check " + json.dumps(out[-1]))
    finally:
        tri.AUTOTUNE = saved
    return out


# -------------------------------------------------------------------------------------------- timing
def bench(fn, grads=None):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))


def timed_pair(fn, grads=None):
    return [bench(fn, grads), bench(fn, grads)]


def sdpa_fn(G):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if G == 1:
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    return f


def run_length(L, Hq, Hkv, args, flex_compiled, log):
    G = Hq // Hkv
    D = 128
    nq = L // BS
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(L + Hkv)
    q = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    do = torch.randn(1, Hq, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    causal_pairs = Hq * L * (L + 1) / 2
    res = {"L": L, "Hq": Hq, "Hkv": Hkv, "D": D, "block_size": BS, "masks": {}}

    masks = {}
    if "window+random" in args.masks:
        masks["window+random"] = window_random_blocks(Hkv, nq, seed=L)
    if "dense" in args.masks:
        tri = torch.ones(nq, nq, dtype=torch.bool, device=dev).tril()
        masks["dense"] = tri.expand(Hkv, nq, nq).contiguous()

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    sd, ks, vs = sdpa_fn(G), k, v
    try:
        with torch.no_grad():
            sd(q, k, v)
        res["sdpa_gqa"] = "enable_gqa" if G > 1 else "-"
    except RuntimeError as e:  # flash without GQA support: expand K/V once, outside the timed region
        log(f"SDPA flash refused GQA ({str(e)[:120]}); expanding K/V outside timing")
        sd, ks, vs = sdpa_fn(1), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        res["sdpa_gqa"] = "kv expanded outside timing"
    ksg, vsg = ks.clone().requires_grad_(True), vs.clone().requires_grad_(True)

    def sdpa_fb():
        sd(qg, ksg, vsg).backward(do)

    with torch.no_grad():
        sdpa_fwd = timed_pair(lambda: sd(q, ks, vs))
    sdpa_fb_t = timed_pair(sdpa_fb, [qg, ksg, vsg])
    dense_flops = 4.0 * causal_pairs * D
    res["sdpa"] = {"fwd_ms": sdpa_fwd, "fwdbwd_ms": sdpa_fb_t,
                   "fwd_tflops": dense_flops / min(sdpa_fwd) / 1e9,
                   "fwdbwd_tflops": 3.5 * dense_flops / min(sdpa_fb_t) / 1e9}
    log(f"L={L} G={G} sdpa fwd {sdpa_fwd} fwd+bwd {sdpa_fb_t}")

    for name, blk in masks.items():
        idx, cnt = blocks_to_lists(blk)
        kept = kept_pairs(blk, G)
        fwd_flops = 4.0 * kept * D
        r = {"density": kept / causal_pairs, "kept_pairs": kept, "max_blocks": int(cnt.max()),
             "mean_blocks": float(cnt.float().mean())}
        t0 = time.time()
        modes = args.bwd_modes.split(",") if args.bwd_modes else [None]
        with bwd_mode(modes[0]):
            r["check"] = check_kernel(q, k, v, idx, cnt, blk, full_check=(nq <= 64))
        log(f"L={L} G={G} {name}: density {r['density']:.3f} check {r['check']} ({time.time() - t0:.1f}s)")

        def ours_fwd(idx=idx, cnt=cnt):
            return sparse_attention(q, k, v, idx, cnt, block_size=BS, impl="triton")

        def ours_fb(idx=idx, cnt=cnt):
            sparse_attention(qg, kg, vg, idx, cnt, block_size=BS, impl="triton").backward(do)

        with torch.no_grad():
            r["ours_fwd_ms"] = timed_pair(ours_fwd)
        with bwd_mode(modes[0]):
            r["ours_fwdbwd_ms"] = timed_pair(ours_fb, [qg, kg, vg])
        if args.bwd_modes:
            r["bwd_modes"] = {}
            for i, mode in enumerate(modes):
                with bwd_mode(mode):
                    chk = r["check"] if i == 0 else check_kernel(q, k, v, idx, cnt, blk, full_check=(nq <= 64))
                    t_fb = r["ours_fwdbwd_ms"] if i == 0 else timed_pair(ours_fb, [qg, kg, vg])
                    r["bwd_modes"][mode] = {"check": chk, "fwdbwd_ms": t_fb, "host_ms_per_fwdbwd": host_ms(ours_fb)}
                log(f"L={L} G={G} {name} bwd={mode}: {json.dumps(r['bwd_modes'][mode])}")
        r["ours_fwd_tflops"] = fwd_flops / min(r["ours_fwd_ms"]) / 1e9
        r["ours_fwdbwd_tflops"] = 3.5 * fwd_flops / min(r["ours_fwdbwd_ms"]) / 1e9
        r["ideal_fwd_ms"] = min(sdpa_fwd) * r["density"]
        r["ideal_fwdbwd_ms"] = min(sdpa_fb_t) * r["density"]
        r["ours_vs_ideal_fwd"] = min(r["ours_fwd_ms"]) / r["ideal_fwd_ms"]
        r["ours_vs_ideal_fwdbwd"] = min(r["ours_fwdbwd_ms"]) / r["ideal_fwdbwd_ms"]
        if name == "dense":
            r["ours_vs_sdpa_fwd"] = min(r["ours_fwd_ms"]) / min(sdpa_fwd)
            r["ours_vs_sdpa_fwdbwd"] = min(r["ours_fwdbwd_ms"]) / min(sdpa_fb_t)
        if name != "dense" or args.flex_dense:
            try:
                flex_timings(r, blk, G, L, q, k, v, qg, kg, vg, do, ours_fwd, fwd_flops, flex_compiled)
            except Exception as e:  # keep the rest of the run
                r["flex_error"] = repr(e)[:500]
        log(f"L={L} G={G} {name}: " + json.dumps({kk: vv for kk, vv in r.items() if kk != 'check'}))
        res["masks"][name] = r

    if select_blocks is not None and not args.no_select:
        try:
            res["selection"] = bench_selection(q, k, v, qg, kg, vg, do, G, flex_compiled, log)
        except Exception as e:
            res["selection"] = {"available": True, "error": repr(e)[:500]}
            log(f"selection failed: {e!r}")
    else:
        res["selection"] = {"available": False}
    return res


def flex_timings(r, blk, G, L, q, k, v, qg, kg, vg, do, ours_fwd, fwd_flops, flex_compiled):
    """FlexAttention (compiled) on the same kept blocks: output agreement with ours, then timings."""
    bm = flex_block_mask(blk, G, L)

    def flex_f(q_, k_, v_, bm=bm):
        return flex_compiled(q_, k_, v_, block_mask=bm, enable_gqa=G > 1)

    with torch.no_grad():
        r["flex_vs_ours_out_rel_err"] = rel(flex_f(q, k, v), ours_fwd())
        r["flex_fwd_ms"] = timed_pair(lambda: flex_f(q, k, v))

    def flex_fb():
        flex_f(qg, kg, vg).backward(do)

    r["flex_fwdbwd_ms"] = timed_pair(flex_fb, [qg, kg, vg])
    r["flex_fwd_tflops"] = fwd_flops / min(r["flex_fwd_ms"]) / 1e9
    r["flex_fwdbwd_tflops"] = 3.5 * fwd_flops / min(r["flex_fwdbwd_ms"]) / 1e9
    r["speedup_vs_flex_fwd"] = min(r["flex_fwd_ms"]) / min(r["ours_fwd_ms"])
    r["speedup_vs_flex_fwdbwd"] = min(r["flex_fwdbwd_ms"]) / min(r["ours_fwdbwd_ms"])
    for m in r.get("bwd_modes", {}).values():
        m["speedup_vs_flex_fwdbwd"] = min(r["flex_fwdbwd_ms"]) / min(m["fwdbwd_ms"])


def bench_selection(q, k, v, qg, kg, vg, do, G, flex_compiled, log):
    """select_blocks (top-p, sink + 8 local blocks) + our fwd+bwd, vs FlexAttention on the same mask."""
    policy = "top_p:p=0.9,min=9,max=25"

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
           "select_ms": timed_pair(lambda: sel()), "select_plus_ours_fwdbwd_ms": timed_pair(sel_fb, [qg, kg, vg]),
           "ours_fwdbwd_ms": timed_pair(ours_fb, [qg, kg, vg]), "flex_fwdbwd_ms": timed_pair(flex_fb, [qg, kg, vg])}
    out["speedup_vs_flex_with_selection"] = min(out["flex_fwdbwd_ms"]) / min(out["select_plus_ours_fwdbwd_ms"])
    out["selection_overhead"] = min(out["select_plus_ours_fwdbwd_ms"]) / min(out["ours_fwdbwd_ms"]) - 1
    log("selection: " + json.dumps(out))
    return out


def breakdown(L, Hq, Hkv, log):
    """Where our fwd+bwd time goes on the window+random mask: host planning, each kernel, host (CPU) time."""
    from memsparse.kernels import sparse_attention_triton as tri

    D, nq = 128, L // BS
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
def fmt(x, p=2):
    return "-" if x is None else f"{x:.{p}f}"


def markdown(results, meta):
    lines = [f"# Block-sparse attention: our Triton kernel vs FlexAttention vs SDPA flash ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, B=1, D=128, causal, block 128; "
             f"`do_bench` medians in ms (each timed twice, the lower shown); TFLOP/s on kept work "
             f"(fwd 4*kept*D, fwd+bwd 3.5x). Command: `{meta['command']}`", "",
             "| L | heads q/kv | mask | density | ours fwd | flex fwd | ours fwd+bwd | flex fwd+bwd | "
             "TFLOP/s ours fwd / fwd+bwd | vs flex fwd / fwd+bwd | vs ideal fwd / fwd+bwd | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, m in r["masks"].items():
            lines.append(
                f"| {r['L'] // 1024}K | {r['Hq']}/{r['Hkv']} | {name} | {m['density']:.3f} | "
                f"{fmt(min(m['ours_fwd_ms']), 3)} | {fmt(min(m['flex_fwd_ms']), 3) if 'flex_fwd_ms' in m else '-'} | "
                f"{fmt(min(m['ours_fwdbwd_ms']), 3)} | "
                f"{fmt(min(m['flex_fwdbwd_ms']), 3) if 'flex_fwdbwd_ms' in m else '-'} | "
                f"{m['ours_fwd_tflops']:.0f} / {m['ours_fwdbwd_tflops']:.0f} | "
                f"{fmt(m.get('speedup_vs_flex_fwd'))}x / {fmt(m.get('speedup_vs_flex_fwdbwd'))}x | "
                f"{m['ours_vs_ideal_fwd']:.2f} / {m['ours_vs_ideal_fwdbwd']:.2f} | "
                f"{max(m['check']['errors'].values()):.1e} |")
    lines += ["", "Dense SDPA flash (same inputs) and our kernel on the dense causal list:", "",
              "| L | heads q/kv | SDPA fwd ms (TFLOP/s) | SDPA fwd+bwd ms (TFLOP/s) | ours dense fwd / fwd+bwd ms | "
              "ours / SDPA fwd, fwd+bwd |", "|---|---|---|---|---|---|"]
    for r in results:
        s, d = r["sdpa"], r["masks"].get("dense")
        ours = (f"{min(d['ours_fwd_ms']):.3f} / {min(d['ours_fwdbwd_ms']):.3f} | {d['ours_vs_sdpa_fwd']:.2f} / "
                f"{d['ours_vs_sdpa_fwdbwd']:.2f}") if d else "- | -"
        lines.append(f"| {r['L'] // 1024}K | {r['Hq']}/{r['Hkv']} | {min(s['fwd_ms']):.3f} ({s['fwd_tflops']:.0f}) | "
                     f"{min(s['fwdbwd_ms']):.3f} ({s['fwdbwd_tflops']:.0f}) | {ours} |")
    bm = [(r, name, m) for r in results for name, m in r["masks"].items() if m.get("bwd_modes")]
    if bm:
        lines += ["", "Backward variants (MEMSPARSE_SPARSE_ATTENTION_BWD), same inputs; host ms = launch-side time "
                  "per fwd+bwd call (10 calls, no sync):", "",
                  "| L | heads q/kv | mask | bwd | ours fwd+bwd ms | flex fwd+bwd ms | SDPA fwd+bwd ms (dense) | "
                  "vs flex | host ms | max rel err | check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, name, m in bm:
            for mode, x in m["bwd_modes"].items():
                flex = fmt(min(m["flex_fwdbwd_ms"]), 3) if "flex_fwdbwd_ms" in m else "-"
                lines.append(f"| {r['L'] // 1024}K | {r['Hq']}/{r['Hkv']} | {name} | {mode} | "
                             f"{min(x['fwdbwd_ms']):.3f} | {flex} | {min(r['sdpa']['fwdbwd_ms']):.3f} | "
                             f"{fmt(x.get('speedup_vs_flex_fwdbwd'))}x | {x['host_ms_per_fwdbwd']:.2f} | "
                             f"{max(x['check']['errors'].values()):.1e} | {'pass' if x['check']['pass'] else 'FAIL'} |")
    sc = meta.get("small_checks", [])
    if sc:
        lines += ["", f"Odd-shape GPU checks vs the reference (tails, Lq < Lk, GQA, duplicates, empty lists, "
                  f"dlse): {sum(c['pass'] for c in sc)}/{len(sc)} pass, max rel err "
                  f"{max(max(c['errors'].values()) for c in sc):.1e}."]
    sel = [r for r in results if r.get("selection", {}).get("available") and "error" not in r["selection"]]
    lines += [""]
    if sel:
        lines += ["Selection (`select_blocks`, top-p) + our fwd+bwd vs FlexAttention fwd+bwd on the selected mask:",
                  "", "| L | heads q/kv | blocks/row | select ms | select + ours ms | ours ms | flex ms | "
                  "overhead | speedup vs flex |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            s = r["selection"]
            lines.append(f"| {r['L'] // 1024}K | {r['Hq']}/{r['Hkv']} | {s['mean_blocks']:.1f} | "
                         f"{min(s['select_ms']):.3f} | {min(s['select_plus_ours_fwdbwd_ms']):.3f} | "
                         f"{min(s['ours_fwdbwd_ms']):.3f} | {min(s['flex_fwdbwd_ms']):.3f} | "
                         f"{100 * s['selection_overhead']:.1f}% | {s['speedup_vs_flex_with_selection']:.2f}x |")
    else:
        lines.append("Selection: `memsparse.kernels.block_select.select_blocks` not available in this run.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--heads", default="16/16,16/4", help="q/kv head pairs")
    ap.add_argument("--flex-dense", action="store_true", help="also time FlexAttention on the dense list")
    ap.add_argument("--no-select", action="store_true")
    ap.add_argument("--no-small-checks", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="only time the pieces of our fwd+bwd")
    ap.add_argument("--name", default="sparse_attention")
    ap.add_argument("--masks", default="window+random,dense", help="which block masks to run")
    ap.add_argument("--bwd-modes", default="", help="e.g. fused,split: check and time each backward variant")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="skip (L, heads) runs that would start after this many seconds (0: no limit)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    log_f = open(out / f"{args.name}.log", "a")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    log(json.dumps(meta))
    for name in ("cache_size_limit", "recompile_limit"):  # one compile per (L, GQA) shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    if args.breakdown:
        rows = [breakdown(int(L), *(int(x) for x in hp.split("/")), log)
                for L in args.lengths.split(",") for hp in args.heads.split(",")]
        (out / f"{args.name}_breakdown.json").write_text(json.dumps({"meta": meta, "breakdown": rows}, indent=1))
        return
    t0 = time.time()
    t_start = time.time()
    modes = tuple(args.bwd_modes.split(",")) if args.bwd_modes else (None,)
    meta["small_checks"] = small_checks(log, modes) if not args.no_small_checks else []
    log(f"small checks done in {time.time() - t0:.1f}s")
    results, failures = [], []
    for L in (int(x) for x in args.lengths.split(",")):
        for hp in args.heads.split(","):
            Hq, Hkv = (int(x) for x in hp.split("/"))
            t0 = time.time()
            if args.deadline_s and t0 - t_start > args.deadline_s:
                failures.append({"L": L, "heads": hp, "error": "skipped: past --deadline-s"})
                log(f"L={L} {hp}: skipped (past --deadline-s)")
                continue
            try:
                results.append(run_length(L, Hq, Hkv, args, flex_compiled, log))
            except Exception:
                failures.append({"L": L, "heads": hp, "error": traceback.format_exc()[-2000:]})
                log(failures[-1]["error"])
            log(f"L={L} {Hq}/{Hkv} done in {time.time() - t0:.1f}s")
            torch.cuda.empty_cache()
            (out / f"{args.name}.json").write_text(
                json.dumps({"meta": meta, "results": results, "failures": failures}, indent=1))
            (out / f"{args.name}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
