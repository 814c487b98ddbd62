"""Time `select_blocks` alone (pooled scores, budget, index lists) on the GPU, optionally beside a baseline copy
of the selection code, and check that both keep the same number of blocks where they should agree.

    python benchmarks/bench_select.py --out benchmarks/results/select_causal_h200.json
    python benchmarks/bench_select.py --baseline DIR   # DIR holds an earlier block_select.py + budget.py
                                                      # (e.g. `git show REV:kernels/block_select.py > DIR/...`)
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


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--heads", default="16/4", help="query/kv heads")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--policies", default="length_scaled:c=12,min_tokens=512;top_p:p=0.9,min=2;fixed:16")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = load_baseline(args.baseline) if args.baseline else None
    hq, hkv = (int(x) for x in args.heads.split("/"))
    rows = []
    for L in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, hq, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for pol in args.policies.split(";"):
            kw = dict(block_size=args.block, policy=pol, sink_blocks=1, local_blocks=1)
            row = {"length": L, "policy": pol, "heads": args.heads,
                   "ms": time_ms(lambda q=q, k=k, kw=kw: select_blocks(q, k, **kw))}
            _, cnt = select_blocks(q, k, **kw)
            row["mean_kept_blocks"] = float(cnt.double().mean())
            if base is not None:
                row["baseline_ms"] = time_ms(lambda q=q, k=k, kw=kw: base(q, k, **kw))
                _, cnt_b = base(q, k, **kw)
                row["baseline_mean_kept_blocks"] = float(cnt_b.double().mean())
                row["blocks_differing_count"] = int((cnt != cnt_b).sum())
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
