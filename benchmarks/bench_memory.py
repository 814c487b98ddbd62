"""Neural-memory layer benchmark: write + read, forward + backward, tokens/s and peak memory.

memsparse's `NeuralMemory` (depth-2 MLP, chunk-parallel closed-form writes) beside titans-pytorch's
`NeuralMemory(dim=512, heads=8, chunk_size=64)` (when installed: the `bench` extra), same inputs, same run.
Also re-checks on the device that the chunk-parallel write equals the sequential reference.

    python benchmarks/bench_memory.py --out benchmarks/results   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import memsparse.memory as M
from memsparse.config import MemoryConfig
from memsparse.memory import NeuralMemory

_eager_chunk = M.write_chunk


def check_equivalence(device: str) -> float:
    """Max abs difference chunked vs sequential reference (fp32, small) on `device`."""
    torch.manual_seed(0)
    mem = NeuralMemory(64, MemoryConfig(heads=2, head_dim=16, chunk_size=8)).to(device)
    inp = mem.project(torch.randn(2, 29, 64, device=device))
    a, _ = mem.write(mem.init_state(2), inp)
    b, _ = mem.write(mem.init_state(2), inp, impl="sequential")
    return max((x - y).abs().max().item() for x, y in zip(a.weights + a.momentum, b.weights + b.momentum))


def time_fwd_bwd(fn, x, warmup: int = 2, reps: int = 5) -> tuple[float, float]:
    """Median seconds of fn(x) forward+backward and peak GiB."""
    for _ in range(warmup):
        fn(x).float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        x.grad = None
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        fn(x).float().square().mean().backward()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--chunks", default="64,512,2048")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip remaining configs after this many seconds")
    ap.add_argument("--compile", default="", help="chunk sizes to also time with the chunk step under torch.compile")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark runs on a CUDA device"
    dev = "cuda"
    lengths = [int(x) for x in args.lengths.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "dim": args.dim, "heads": args.heads, "batch": 1, "dtype": "bf16 autocast (fast weights fp32)",
           "equivalence_max_abs_diff": check_equivalence(dev), "rows": []}
    start = time.time()
    try:
        from titans_pytorch import NeuralMemory as TitansMemory
    except ImportError:
        TitansMemory = None
    compiled = [int(c) for c in args.compile.split(",") if c]
    systems = [(f"memsparse chunk {c}", c) for c in chunks] + [(f"memsparse chunk {c} compiled", c) for c in compiled]
    systems += [("titans-pytorch 0.5.5 chunk 64", None)] if TitansMemory else []
    for L in lengths:
        for name, chunk in systems:
            if time.time() - start > args.budget_s:
                out["rows"].append({"system": name, "L": L, "status": "skipped (time budget)"})
                continue
            torch.manual_seed(0)
            torch.cuda.empty_cache()
            if chunk is None:
                mod = TitansMemory(dim=args.dim, heads=args.heads, chunk_size=64).to(dev)

                def fn(x, mod=mod):
                    with torch.autocast("cuda", torch.bfloat16):
                        return mod(x)[0]
            else:
                cfg = MemoryConfig(heads=args.heads, head_dim=args.dim // args.heads, depth=2, expansion=4,
                                   chunk_size=chunk)
                mod = NeuralMemory(args.dim, cfg).to(dev)
                # the per-chunk closed-form step under torch.compile (the Python loop over chunks stays)
                M.write_chunk = torch.compile(_eager_chunk) if name.endswith("compiled") else _eager_chunk

                def fn(x, mod=mod):
                    with torch.autocast("cuda", torch.bfloat16):
                        return mod(x)[0]
            x = torch.randn(1, L, args.dim, device=dev, requires_grad=True)
            row = {"system": name, "L": L}
            try:
                t, peak = time_fwd_bwd(fn, x)
                row.update(status="ok", seconds=t, tokens_per_s=L / t, peak_gib=peak)
            except torch.OutOfMemoryError:
                row.update(status="OOM")
            except Exception as e:  # e.g. a compile failure: record it, keep benchmarking
                row.update(status=f"error: {type(e).__name__}: {str(e)[:200]}")
            del mod, x
            out["rows"].append(row)
            print(row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "memory_layer.json").write_text(json.dumps(out, indent=2))
    lines = [f"Memory layer write+read fwd+bwd, B=1, dim {args.dim} = {args.heads} heads x "
             f"{args.dim // args.heads}, bf16 autocast, {out['device']}, torch {out['torch']}; "
             f"chunked == sequential on device: max abs diff {out['equivalence_max_abs_diff']:.2e}", "",
             "| system | L | tokens/s | ms | peak GiB |", "|---|---|---|---|---|"]
    for r in out["rows"]:
        if r["status"] == "ok":
            lines.append(f"| {r['system']} | {r['L']} | {r['tokens_per_s']:,.0f} | {1e3 * r['seconds']:.1f} | "
                         f"{r['peak_gib']:.2f} |")
        else:
            lines.append(f"| {r['system']} | {r['L']} | {r['status']} | | |")
    (Path(args.out) / "memory_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
