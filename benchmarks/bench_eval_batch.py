"""memsparse-eval with the samples of a cell streamed one at a time (`--batch 1`) and together (`--batch N`): the
same checkpoint, prompts and seeds in one run; per cell the wall time of each and whether they decode the same.

A trained checkpoint (`--checkpoint DIR`, its own tokenizer) or, without one, a mac_small-shape model with random
weights and the byte tokenizer (then only the speed and the agreement mean anything). Both settings run eager
streaming by default, as the in-training RetrievalEval does (`--cuda-graph`: memsparse-eval's default on a GPU).
Both settings first run untimed at every length (one depth), so the timed runs compare steady cells, not who paid
the compilation (`--no-warmup`: the first run pays it). Writes <name>.json / .md under --out.

    python benchmarks/bench_eval_batch.py --checkpoint outputs/retrieval_small_copy/export --lengths 512,2k,8k \\
        --samples 5 --batch 5 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from memsparse.eval import cli

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM


def random_checkpoint(directory: Path) -> Path:
    """A mac_small-shape model with random weights (byte vocabulary), saved under `directory`."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=512, depth=8, heads=8, kv_heads=4, head_dim=64, mlp_hidden=1408,
                      block_size=64, segment=512, window=512, persistent_tokens=64,
                      budget="length_scaled:c=12,min_tokens=512", memory_layers=[1, 3, 5],
                      memory=MemoryConfig(heads=8, head_dim=64, chunk_size=512))
    return MemSparseLM(cfg).save_pretrained(directory)


def compare(one: list[dict], many: list[dict]) -> list[dict]:
    """One row per cell: wall times, speed-up, and how many samples decode / teacher-force the same."""
    rows = []
    for a, b in zip(one, many, strict=True):
        pairs = list(zip(a["samples"], b["samples"], strict=True))
        rows.append({
            "task": a["task"], "length": a["length"], "depth": a["depth"], "n": a["n"],
            "wall_s_batch_1": a["wall_s"], "wall_s_batch_n": b["wall_s"], "speedup": a["wall_s"] / b["wall_s"],
            "same_prediction": sum(x["prediction"] == y["prediction"] for x, y in pairs),
            "same_tf_prediction": sum(x.get("tf_prediction") == y.get("tf_prediction") for x, y in pairs),
            "accuracy_batch_1": a["accuracy"], "accuracy_batch_n": b["accuracy"],
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a memsparse-eval checkpoint (default: random weights)")
    ap.add_argument("--tasks", default="passkey")
    ap.add_argument("--lengths", default="512,2k,8k")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--batch", type=int, default=5, help="the batched setting's --batch")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="first run both settings untimed at every length with one depth, so that neither timed "
                         "run pays the compilation and autotuning (without it the first run does)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--name", default="eval_batch")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if args.batch < 2 or args.samples < 2:
        ap.error(f"--batch and --samples must be >= 2 to compare with one at a time, got {args.batch}, {args.samples}")
    runs, walls = {}, {}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(d) / "ckpt")
        tok = [] if args.checkpoint else ["--tokenizer", "byte"]

        def evaluate(b: int, out: Path, lengths: str, depths: str) -> int:
            return cli.main(["--checkpoint", str(ckpt), *tok, "--tasks", args.tasks, "--lengths", lengths,
                             "--depths", depths, "--samples", str(args.samples), "--batch", str(b), "--no-wandb",
                             "--no-progress", "--out", str(out),
                             "--cuda-graph" if args.cuda_graph else "--no-cuda-graph",
                             *(["--device", args.device] if args.device else [])])
        if args.warmup:  # compilation and autotuning at every length and batch shape, untimed, before either run
            for b in (1, args.batch):
                if rc := evaluate(b, Path(d) / f"warmup{b}", args.lengths, args.depths.split(",")[0]):
                    return rc
        for b in (1, args.batch):
            out = Path(d) / f"batch{b}"
            t0 = time.perf_counter()
            if rc := evaluate(b, out, args.lengths, args.depths):
                return rc
            walls[b] = time.perf_counter() - t0
            data = json.loads((out / "results.json").read_text())
            runs[b], device = data["cells"], data["meta"]["device"]
    rows = compare(runs[1], runs[args.batch])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    res = {"device": name, "torch": torch.__version__, "checkpoint": args.checkpoint or "random weights",
           "batch": args.batch, "samples": args.samples, "cuda_graph": args.cuda_graph, "warmup": args.warmup,
           "process_wall_s": {"1": walls[1], str(args.batch): walls[args.batch]}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    n = len(rows) * args.samples
    lines = [f"memsparse-eval, a cell's {args.samples} samples one at a time against {args.batch} together "
             f"({res['checkpoint']}; {name}, torch {res['torch']}; "
             f"{'CUDA-graph' if args.cuda_graph else 'eager'} streaming)", "",
             f"Whole runs (start-up included{', after an untimed warm-up of both' if args.warmup else ''}): "
             f"{walls[1]:.1f} s against {walls[args.batch]:.1f} s. Same decoded "
             f"answers: {sum(r['same_prediction'] for r in rows)} of {n}; same teacher-forced: "
             f"{sum(r['same_tf_prediction'] for r in rows)} of {n}.", "",
             "| task | length | depth | wall s, 1 at a time | together | speed-up | same answers "
             "| accuracy 1 / together |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['length']:,} | {r['depth']:g} | {r['wall_s_batch_1']:.2f} | "
                     f"{r['wall_s_batch_n']:.2f} | {r['speedup']:.2f}x | {r['same_prediction']} / {r['n']} | "
                     f"{r['accuracy_batch_1']:.2f} / {r['accuracy_batch_n']:.2f} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
