"""Time `select_blocks` alone (pooled scores, budget, index lists) on the GPU, per implementation (`--impl`) and
optionally beside a baseline copy of the selection code, after checking that they select the same blocks.

    python benchmarks/bench_select.py --out benchmarks/results/select_causal_h200.json
    python benchmarks/bench_select.py --impl torch,triton --lengths 8192,32768,131072 --pooled both \\
        --out benchmarks/results/select_fused_h200.json     # the fused kernel beside the PyTorch chain
    python benchmarks/bench_select.py --impl torch,triton --lengths 6144 --queries 2048 --window 4096 \
        --pooled yes             # model-like: a 2K span against its 4K window (+ span) of keys, pooled inputs
    python benchmarks/bench_select.py --baseline DIR   # DIR holds an earlier block_select.py + budget.py
                                                      # (e.g. `git show REV:kernels/block_select.py > DIR/...`)

With several impls, every case is first checked on the device against the first impl: block counts and index
lists per row. Rows whose lists differ only by blocks of exactly equal score (torch.topk's pick among ties is
unspecified; the kernel keeps the lower index) are counted as `tie_rows`; any other difference is printed and the
run stops (exit 1) before timing. `--pooled yes` passes precomputed selection queries and pooled keys, as the model
does (the selection proper: scores, masks, budget, lists); `no` pools inside select_blocks (the part the fused
kernel leaves to PyTorch); `both` times each. `--window W` adds a sliding window of W tokens (min_key_block and
the max_visible_blocks hint, as the model passes them). `--profile` prints each impl's top kernels.
Runs on CPU for a smoke test (`--device cpu`, triton under TRITON_INTERPRET=1); times are then meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from memsparse.kernels import select_blocks
from memsparse.kernels.block_select import block_pool, causal_selection_queries


def load_baseline(directory: str):
    """select_blocks from a directory holding block_select.py and budget.py (loaded as a throwaway package)."""
    pkg = "baseline_select"
    spec = importlib.util.spec_from_file_location(pkg, Path(directory) / "__init__.py",
                                                  submodule_search_locations=[directory])
    (Path(directory) / "__init__.py").touch()
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    spec.loader.exec_module(mod)
    sub = importlib.import_module(f"{pkg}.block_select")
    return sub.select_blocks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, reps: int = 20, device: str = "cuda") -> float:
    for _ in range(3):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps * 1e3


def compare_selections(ref, other, scores) -> dict:
    """Per row (batch, kv head, query block): counts equal and index lists equal, or differing only by blocks
    of exactly equal score. Returns counts of rows and up to 5 examples of real differences."""
    (idx_a, cnt_a), (idx_b, cnt_b) = ref, other
    out = {"rows": int(cnt_a.numel()), "count_mismatch_rows": 0, "list_mismatch_rows": 0, "tie_rows": 0,
           "examples": []}
    if idx_a.shape != idx_b.shape:
        out["list_mismatch_rows"] = out["rows"]
        out["examples"].append(f"list widths differ: {tuple(idx_a.shape)} vs {tuple(idx_b.shape)}")
        return out
    bad_cnt = cnt_a != cnt_b
    bad_idx = (idx_a != idx_b).any(-1) & ~bad_cnt
    out["count_mismatch_rows"] = int(bad_cnt.sum())
    for r in bad_cnt.nonzero().tolist()[:5]:
        out["examples"].append(f"row {r}: count {int(cnt_a[tuple(r)])} vs {int(cnt_b[tuple(r)])}")
    for r in bad_idx.nonzero().tolist():
        c = int(cnt_a[tuple(r)])
        a, b = set(idx_a[tuple(r)][:c].tolist()), set(idx_b[tuple(r)][:c].tolist())
        s = scores[tuple(r)].float()
        only_a, only_b = sorted(a - b), sorted(b - a)
        if sorted(s[only_a].tolist()) == sorted(s[only_b].tolist()):
            out["tie_rows"] += 1
            continue
        out["list_mismatch_rows"] += 1
        if len(out["examples"]) < 5:
            out["examples"].append(f"row {r}: only in first {only_a} (scores {s[only_a].tolist()}), "
                                   f"only in second {only_b} (scores {s[only_b].tolist()})")
    return out


def profile_top(fn, device: str, n: int = 12) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    _sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            fn()
        _sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,32768", help="key lengths")
    ap.add_argument("--queries", type=int, default=0, help="query tokens, aligned to the end of the keys "
                    "(0: as many as keys); the model selects a span of queries against its window's keys")
    ap.add_argument("--heads", default="16/4", help="query/kv heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--policies", default="length_scaled:c=12,min_tokens=512;top_p:p=0.9,min=2;fixed:16")
    ap.add_argument("--impl", default="torch", help="comma-separated select_blocks impls (torch, triton); the "
                    "first is the reference the others are checked against")
    ap.add_argument("--pooled", choices=("no", "yes", "both"), default="no",
                    help="pass precomputed q_select/k_pool (as the model does), pool inside, or time both")
    ap.add_argument("--window", type=int, default=0, help="sliding window in tokens (0: none)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base = load_baseline(args.baseline) if args.baseline else None
    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    hq, hkv = (int(x) for x in args.heads.split("/"))
    dev, bs = args.device, args.block
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        Lq = min(args.queries, L) if args.queries else L
        q = torch.randn(args.batch, hq, Lq, args.head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(args.batch, hkv, L, args.head_dim, device=dev, dtype=torch.bfloat16, generator=g)
        nq = -(-Lq // bs)
        extra = {}
        if args.window:  # block m sees keys from (its first query - window) on, plus the sink
            first = L - Lq + torch.arange(nq, device=dev) * bs
            extra = {"min_key_block": torch.clamp((first - args.window) // bs, min=0),
                     "max_visible_blocks": args.window // bs + 3}
        pooled_kw = {"q_select": causal_selection_queries(q, hkv, bs), "k_pool": block_pool(k, bs)}
        for pooled in (("no", "yes") if args.pooled == "both" else (args.pooled,)):
            for pol in args.policies.split(";"):
                kw = dict(block_size=bs, policy=pol, sink_blocks=1, local_blocks=1, **extra,
                          **(pooled_kw if pooled == "yes" else {}))
                row = {"length": L, "queries": Lq, "policy": pol, "heads": args.heads, "batch": args.batch,
                       "pooled": pooled, "window": args.window}
                ref_idx, ref_cnt, info = select_blocks(q, k, impl=impls[0], return_info=True, **kw)
                for impl in impls[1:]:
                    check = compare_selections((ref_idx, ref_cnt), select_blocks(q, k, impl=impl, **kw),
                                               info["scores"])
                    row[f"check_{impl}"] = check
                    if check["count_mismatch_rows"] or check["list_mismatch_rows"]:
                        print(json.dumps(row), flush=True)
                        print(f"MISMATCH {impl} vs {impls[0]} at L={L} {pol} pooled={pooled}: "
                              f"{check['count_mismatch_rows']} count / {check['list_mismatch_rows']} list rows of "
                              f"{check['rows']}", file=sys.stderr)
                        for e in check["examples"]:
                            print("  " + e, file=sys.stderr)
                        return 1
                for impl in impls:
                    def fn(q=q, k=k, kw=kw, impl=impl):
                        return select_blocks(q, k, impl=impl, **kw)

                    row[f"ms_{impl}"] = time_ms(fn, args.reps, dev)
                    if args.profile:
                        print(f"--- {impl} L={L} {pol} pooled={pooled}\n{profile_top(fn, dev)}", flush=True)
                row["ms"] = row[f"ms_{impls[0]}"]
                if "torch" in impls and "triton" in impls:
                    row["speedup_triton"] = row["ms_torch"] / row["ms_triton"]
                row["mean_kept_blocks"] = float(ref_cnt.double().mean())
                if base is not None:
                    row["baseline_ms"] = time_ms(lambda q=q, k=k, kw=kw: base(q, k, **kw), args.reps, dev)
                    _, cnt_b = base(q, k, **kw)
                    row["baseline_mean_kept_blocks"] = float(cnt_b.double().mean())
                    row["blocks_differing_count"] = int((ref_cnt != cnt_b).sum())
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        name = torch.cuda.get_device_name() if dev.startswith("cuda") else dev
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
