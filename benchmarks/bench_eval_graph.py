"""memsparse-eval with and without CUDA-graph streaming (GraphedStream), one run, same checkpoint and prompts.

A mac_small-shape model with random weights and the byte tokenizer (what is measured is the harness's speed and
that both paths decode the same tokens, not accuracy). Writes eval_graph.json / .md under --out.

    python benchmarks/bench_eval_graph.py --lengths 16k,64k --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from memsparse.eval import cli

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="16k,64k")
    ap.add_argument("--tasks", default="passkey")
    ap.add_argument("--name", default="eval_graph")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=512, depth=8, heads=8, kv_heads=4, head_dim=64, mlp_hidden=1408,
                      block_size=64, segment=512, window=2048, persistent_tokens=64,
                      budget="length_scaled:c=12,min_tokens=512", memory_layers=[1, 3, 5],
                      memory=MemoryConfig(heads=8, head_dim=64, chunk_size=512))
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        ckpt = MemSparseLM(cfg).save_pretrained(Path(d) / "ckpt")
        for mode in ("--no-cuda-graph", "--cuda-graph"):
            out = Path(d) / mode.strip("-")
            cli.main(["--checkpoint", str(ckpt), "--tokenizer", "byte", "--tasks", args.tasks, "--lengths",
                      args.lengths, "--depths", "0.5", "--device", "cuda", "--no-wandb", "--no-progress",
                      "--out", str(out), mode])
            runs[mode.strip("-")] = json.loads((out / "results.json").read_text())["cells"]
    rows = []
    for eager, graph in zip(runs["no-cuda-graph"], runs["cuda-graph"]):
        same = [a["prediction"] == b["prediction"] for a, b in zip(eager["samples"], graph["samples"])]
        rows.append({"task": eager["task"], "length": eager["length"], "eager_tokens_per_s": eager["tokens_per_s"],
                     "graph_tokens_per_s": graph["tokens_per_s"], "eager_peak_gib": eager["peak_mem_bytes"] / 2**30,
                     "graph_peak_gib": graph["peak_mem_bytes"] / 2**30, "same_predictions": all(same)})
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    lines = [f"memsparse-eval, eager vs CUDA-graph streaming (mac_small shape, random weights, byte tokenizer), "
             f"{res['device']}, torch {res['torch']}", "",
             "| task | length | eager tokens/s | graphed tokens/s | speed-up | peak GiB eager / graphed "
             "| same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['length']:,} | {r['eager_tokens_per_s']:,.0f} "
                     f"| {r['graph_tokens_per_s']:,.0f} "
                     f"| {r['graph_tokens_per_s'] / r['eager_tokens_per_s']:.1f}x | {r['eager_peak_gib']:.2f} / "
                     f"{r['graph_peak_gib']:.2f} | {'yes' if r['same_predictions'] else 'NO'} |")
    (Path(args.out) / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
