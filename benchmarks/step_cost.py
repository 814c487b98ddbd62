"""What a training step of a finished run cost, and how that splits into a per-step and a per-token part.

From each run's `phase_times.json` (memsparse.train.callbacks.PhaseTimes), its training log (the "retrieval at step
N (X s)" lines RetrievalEval prints, whose time the loop's own time includes) and its recipe (batch_size x
data.seq_len tokens a step, padding included):

    steady ms a step = (training_s - first_batches_s[-1] - RetrievalEval seconds) / (steps - len(first_batches_s))

then a least-squares line through the runs, ms a step = a + b x (tokens a step / 1000): `a` is what a step costs
whatever its length (host work, launches, per-step syncs, the optimizer), `b` the cost of 1K more tokens.

    python benchmarks/step_cost.py --run stage1 DIR/phase_times.json DIR/train.log recipes/retrieval_small_copy.yaml \\
        --run stage2 ... --name step_cost --out DIR

`--data-rate N` also times N samples of each recipe's training set drawn in one process on this machine (one data
worker's samples/s), to compare with the samples a step needs at the measured pace. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

RETRIEVAL_LINE = re.compile(r"retrieval at step (\d+) \(([\d.]+)s\)")


def steady_ms(phase: dict, log_text: str) -> tuple[float, int, float]:
    """(steady ms a step, steps counted, RetrievalEval seconds subtracted) of one run."""
    first = phase.get("first_batches_s") or []
    steps = int(phase["global_step"]) - int(phase.get("start_step", 0))
    if not first or steps <= len(first):
        raise ValueError(f"too few steps after the first batches ({steps} steps, {len(first)} first batches)")
    evals = sum(float(m.group(2)) for m in RETRIEVAL_LINE.finditer(log_text))
    loop_s = float(phase["training_s"]) - float(first[-1]) - evals
    return 1000.0 * loop_s / (steps - len(first)), steps - len(first), evals


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x (two or more distinct x)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("the runs need two or more different step sizes for the line")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def data_rate(recipe: Path, samples: int) -> float:
    """Samples/s of the recipe's training set drawn in this process (one data worker); a fresh byte-level
    stand-in is not used: the recipe's own tokenizer is trained into a temporary directory."""
    import inspect
    import tempfile

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from memsparse.train.data import MemSparseDataModule

    cfg = yaml.safe_load(recipe.read_text())["data"]
    names = inspect.signature(MemSparseDataModule.__init__).parameters
    kw = {k: v for k, v in cfg.items() if k in names}
    with tempfile.TemporaryDirectory() as tmp:
        kw.update(num_workers=0, persistent_workers=False, pin_memory=False, tokenizer_dir=tmp)
        dm = MemSparseDataModule(**kw)
        dm.prepare_data()
        dm.setup("fit")
        ds = dm.train_dataset
        idx = np.random.default_rng(0).integers(0, len(ds), samples)
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        return samples / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs=4, action="append", required=True,
                    metavar=("NAME", "PHASE_TIMES", "TRAIN_LOG", "RECIPE"))
    ap.add_argument("--data-rate", type=int, default=0, help="samples to draw per recipe (0: no data timing)")
    ap.add_argument("--name", default="step_cost")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    rows = []
    for name, pt, lg, rc in args.run:
        try:
            phase = json.loads(Path(pt).read_text())
            data = yaml.safe_load(Path(rc).read_text())["data"]
            ms, counted, evals = steady_ms(phase, Path(lg).read_text())
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"step_cost: run {name}: {e}") from None
        rows.append({"run": name, "batch": int(data["batch_size"]), "seq_len": int(data["seq_len"]),
                     "tokens_per_step": int(data["batch_size"]) * int(data["seq_len"]), "steps": counted,
                     "retrieval_eval_s": evals, "ms_per_step": ms})
        rows[-1]["tokens_per_s"] = rows[-1]["tokens_per_step"] / ms * 1000.0
        if args.data_rate:
            rate = data_rate(Path(rc), args.data_rate)
            rows[-1]["data_samples_per_s_one_worker"] = rate
            rows[-1]["data_ms_per_step_one_worker"] = 1000.0 * rows[-1]["batch"] / rate
    doc: dict = {"runs": rows, "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])}
    if len({r["tokens_per_step"] for r in rows}) > 1:
        a, b = fit_line([r["tokens_per_step"] / 1000 for r in rows], [r["ms_per_step"] for r in rows])
        doc["fit"] = {"ms_per_step": a, "ms_per_1k_tokens": b}
        for r in rows:
            r["fixed_share"] = a / r["ms_per_step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Training-step cost: `{doc['command']}`", "",
             "| run | rows x tokens | steps counted | RetrievalEval s left out | ms a step | tokens/s | per-step share "
             "| one data worker: samples/s (ms a step) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['fixed_share']:.0f}%" if "fixed_share" in r else "-"
        dr = (f"{r['data_samples_per_s_one_worker']:.0f} ({r['data_ms_per_step_one_worker']:.1f})"
              if "data_samples_per_s_one_worker" in r else "-")
        lines.append(f"| {r['run']} | {r['batch']} x {r['seq_len']} | {r['steps']} | {r['retrieval_eval_s']:.1f} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {share} | {dr} |")
    if "fit" in doc:
        lines += ["", f"Line through the runs: ms a step = {doc['fit']['ms_per_step']:.1f} + "
                      f"{doc['fit']['ms_per_1k_tokens']:.2f} x (tokens a step / 1000)."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
