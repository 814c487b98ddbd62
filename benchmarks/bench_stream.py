"""Streaming inference (prefill) to 1M tokens: tokens/s and peak GPU memory per length, one run.

The mac_small shape (dim 512, depth 8, memory in 3 layers, segment 512, window 2048), random weights (speed
and memory do not depend on them), bf16 autocast, B=1; the prompt is streamed in calls of `--chunk` tokens,
logits discarded. Peak memory should not grow with length.

    python benchmarks/bench_stream.py --lengths 65536,262144,1048576 --out benchmarks/results

`--graph` streams through `memsparse.cuda_graph.GraphedStream` (steady-state segments replayed as CUDA graphs),
after checking it against the eager stream on the GPU (logits and final state of an 8K-token prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.cuda_graph import GraphedStream
from memsparse.model import MemSparseLM


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_graph(model, vocab: int) -> dict:
    """GraphedStream vs model.stream on the GPU: all logits and the final state of one 8K-token prompt."""
    ids = torch.randint(0, vocab, (1, 8192), device="cuda")
    gs = GraphedStream(model)
    with torch.autocast("cuda", torch.bfloat16):
        want, st_want = model.stream(ids, model.init_state(1, total_length=8192))
        got, st = gs(ids, model.init_state(1, total_length=8192))
    flat = [torch.cat([t.flatten().float() for ls in s.layers for t in ls.tensors()]) for s in (st, st_want)]
    res = {"logits_rel_err": _rel(got, want), "state_rel_err": _rel(*flat), "replays": gs.replays,
           "graphs": len(gs.steps)}
    res["ok"] = res["logits_rel_err"] < 1e-2 and res["state_rel_err"] < 1e-2 and gs.replays > 0
    print("graph check:", res, flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="65536,262144,1048576")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--budget", default="length_scaled:c=12,min_tokens=256")
    ap.add_argument("--graph", action="store_true", help="stream through GraphedStream (CUDA graphs)")
    ap.add_argument("--name", default="stream_prefill", help="results file stem")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16384, dim=512, depth=8, heads=8, kv_heads=4, head_dim=64, mlp_hidden=1408,
                      block_size=64, segment=512, window=2048, persistent_tokens=64, budget=args.budget,
                      memory_layers=[1, 3, 5], memory=MemoryConfig(heads=8, head_dim=64, chunk_size=512))
    model = MemSparseLM(cfg).cuda().eval()
    rows = []
    check = check_graph(model, cfg.vocab_size) if args.graph else None
    stream = GraphedStream(model) if args.graph else model.stream
    # warm-up (kernel compilation / autotuning, graph capture) outside the timed runs
    with torch.autocast("cuda", torch.bfloat16):
        stream(torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda"), return_logits="none")
    for L in (int(x) for x in args.lengths.split(",")):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        state = model.init_state(1, total_length=L)
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            for i in range(0, L, args.chunk):
                ids = torch.randint(0, cfg.vocab_size, (1, min(args.chunk, L - i)), device="cuda")
                _, state = stream(ids, state, return_logits="none")
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        row = {"L": L, "seconds": t, "tokens_per_s": L / t,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "peak_above_weights_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
               "state_mib": state.nbytes() / 2**20,
               "kept_fraction": float(state.stat_means()["attn_kept_fraction"])}
        print(row, flush=True)
        rows.append(row)
        del state
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": "mac_small shape",
           "budget": args.budget, "chunk": args.chunk, "cuda_graph": args.graph, "graph_check": check, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    lines = [f"Streaming prefill, mac_small shape (dim 512, depth 8, memory in 3 layers, segment 512, window 2048), "
             f"B=1, bf16 autocast, {out['device']}, torch {out['torch']}, budget {args.budget}"
             + (", CUDA graphs (GraphedStream)" if args.graph else ""), "",
             "| tokens | tokens/s | peak GiB | peak above weights GiB | carried state MiB | kept fraction |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']:,} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
                     f"{r['peak_above_weights_gib']:.2f} | {r['state_mib']:.1f} | {r['kept_fraction']:.3f} |")
    if check:
        lines += ["", f"GraphedStream vs eager stream, 8K tokens: {'pass' if check['ok'] else 'FAIL'}; logits rel err "
                      f"{check['logits_rel_err']:.1e}, final state rel err {check['state_rel_err']:.1e}, "
                      f"{check['replays']} graphed segments"]
    (Path(args.out) / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
