"""Summarise a training run logged with CSVLogger: loss curve PNG + JSON/markdown (tokens/s, peak memory).

    python benchmarks/plot_train_run.py RUN_DIR/.../metrics.csv --name mac_small_h100 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("metrics_csv")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="")
    ap.add_argument("--command", default="")
    args = ap.parse_args(argv)
    rows = list(csv.DictReader(open(args.metrics_csv)))

    def series(key):
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]

    loss, val = series("train/loss"), series("val/loss")
    tps, mem = series("train/tokens_per_s"), series("train/peak_mem_gib")
    steady = [v for _, v in tps[len(tps) // 5:]] or [v for _, v in tps]
    summary = {
        "name": args.name, "device": args.device, "command": args.command, "steps_logged": len(loss),
        "first_loss": loss[0][1] if loss else None, "last_loss": loss[-1][1] if loss else None,
        "val_loss": val, "tokens_per_s_median": statistics.median(steady) if steady else None,
        "peak_mem_gib": max((v for _, v in mem), default=None),
        "kept_fraction_last": series("train/attn_kept_fraction")[-1][1] if series("train/attn_kept_fraction") else None,
    }
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
