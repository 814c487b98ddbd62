"""Retrieval accuracy against prompt length for several runs, from memsparse-eval's results.json files.

    python benchmarks/plot_retrieval_vs_length.py --task passkey --window 512 \\
        --run "memory=DIR_A/eval_passkey/results.json" --run "no memory=DIR_B/eval_passkey/results.json" \\
        --out accuracy_vs_length.png

A run may name several results files (LABEL=a.json,b.json): their cells are merged (e.g. a 1K-32K grid and a 1M
cell of the same model).

Left panel: greedy exact match averaged over all depths of a length; right panel: over the depths below 1 only
(the key well before the question, beyond a short window), with the key at depth 1 (just before the question)
drawn dashed. Each left-panel point is labelled with the samples behind it (n, all depths together). A vertical
line marks the attention window. Also writes the numbers plotted as a CSV beside the PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def by_length(results: dict, task: str) -> dict[int, dict[float, tuple[float, int]]]:
    """{length: {depth: (accuracy, samples)}} of one task from a memsparse-eval results.json (its `cells`)."""
    out: dict[int, dict[float, tuple[float, int]]] = defaultdict(dict)
    for c in results["cells"]:
        if c["task"] == task and c.get("sweep_kind") in (None, ""):
            out[int(c["length"])][float(c["depth"])] = (float(c["accuracy"]), int(c.get("n", 1)))
    if not out:
        raise SystemExit(f"no cells of task {task!r} in the results")
    return dict(sorted(out.items()))


def summarise(cells: dict[int, dict[float, tuple[float, int]]]) -> list[dict]:
    """One row a length: the mean over depths, over depths < 1, depth 1 alone, and the samples behind them."""
    rows = []
    for n, d in cells.items():
        acc = {depth: a for depth, (a, _) in d.items()}
        far = [a for depth, a in acc.items() if depth < 1.0]
        rows.append({"length": n, "mean": sum(acc.values()) / len(acc),
                     "mean_depth_below_1": sum(far) / len(far) if far else float("nan"),
                     "depth_1": acc.get(1.0, float("nan")), "samples": sum(k for _, k in d.values())})
    return rows


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True,
                    help="LABEL=path/to/results.json[,more.json] (repeatable; a run's files are merged)")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--window", type=int, default=None, help="attention window in tokens (vertical line)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", required=True, help="PNG path; the CSV goes beside it")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    table = []
    for spec in args.run:
        label, sep, paths = spec.partition("=")
        files = [Path(p) for p in paths.split(",")]
        if not sep or not all(f.is_file() for f in files):
            raise SystemExit(f"--run must be LABEL=results.json[,more.json] of existing files, got {spec!r}")
        cells: dict[int, dict[float, float]] = {}
        for f in files:  # several grids of one model (e.g. 1K-32K and 1M) on one line
            for n, d in by_length(json.loads(f.read_text()), args.task).items():
                cells.setdefault(n, {}).update(d)
        rows = summarise(dict(sorted(cells.items())))
        xs = [r["length"] for r in rows]
        line, = axes[0].plot(xs, [r["mean"] for r in rows], marker="o", label=label)
        for r in rows:  # few samples make a point jump to 0 or 1: say how many stand behind it
            axes[0].annotate(f"n={r['samples']}", (r["length"], r["mean"]), textcoords="offset points",
                             xytext=(0, 6), ha="center", fontsize=6, color=line.get_color())
        axes[1].plot(xs, [r["mean_depth_below_1"] for r in rows], marker="o", color=line.get_color(),
                     label=f"{label}: depths < 1")
        axes[1].plot(xs, [r["depth_1"] for r in rows], ls="--", marker="x", color=line.get_color(),
                     label=f"{label}: depth 1")
        table += [{"run": label, **r} for r in rows]
    for ax, title in zip(axes, ("all depths", "by depth")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if args.window:
            ax.axvline(args.window, color="grey", ls=":", label=f"window {args.window}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{args.task} exact match")
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(out)
    return out


if __name__ == "__main__":
    main()
