"""Summarise a training run logged with CSVLogger: loss curve PNG + JSON/markdown (tokens/s, peak memory).

    python benchmarks/plot_train_run.py RUN_DIR/.../metrics.csv --name mac_small_h100 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compare_runs import load_run, summarise  # benchmarks/ is on sys.path when run as a script


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("metrics_csv")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="")
    ap.add_argument("--command", default="")
    args = ap.parse_args(argv)
    series = load_run(args.metrics_csv)
    loss, val = series.get("train/loss", []), series.get("val/loss", [])
    summary = {"name": args.name, "device": args.device, "command": args.command, **summarise(series)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{args.name} ({args.device})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}_loss.png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
