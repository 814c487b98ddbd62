"""Summarise a training run logged with CSVLogger: loss curve PNG + JSON/markdown (tokens/s, peak memory).

    python benchmarks/plot_train_run.py RUN_DIR/.../metrics.csv --name mac_small_h100 --out benchmarks/results

A run that logged validation answer accuracy (`val/answer_token_acc`, per task `.../<task>`) gets a second panel of
it against the step, and, where it also logged `val/no_writes/...` (`model.val_no_writes`), the same curves with the
memory's writes off, dashed: where the two coincide the memory carries nothing. The JSON then holds the series
(`answer_token_acc`: {metric: [[step, value], ...]}).
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
    answers = {k: v for k, v in sorted(series.items())
               if k.startswith(("val/answer_token_acc", "val/no_writes/answer_token_acc"))}
    if answers:
        summary["answer_token_acc"] = {k: [list(p) for p in v] for k, v in answers.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if answers else 1, figsize=(13 if answers else 7, 4), squeeze=False)
    ax = axes[0][0]
    if loss:
        ax.plot(*zip(*loss), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{args.name} ({args.device})")
    ax.legend()
    ax.grid(alpha=0.3)
    if answers:
        acc = axes[0][1]
        on = [k for k in answers if not k.startswith("val/no_writes/")]
        for i, k in enumerate(on):
            label = k.removeprefix("val/answer_token_acc").lstrip("/") or "all tasks"
            acc.plot(*zip(*answers[k]), "o-", color=f"C{i}", label=label)
            off = answers.get(k.replace("val/", "val/no_writes/", 1))
            if off:
                acc.plot(*zip(*off), "x--", color=f"C{i}", label=f"{label}, memory writes off")
        acc.set_xlabel("step")
        acc.set_ylabel("val answer-token accuracy (teacher-forced)")
        acc.set_ylim(-0.03, 1.03)
        acc.legend(fontsize=7)
        acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}_loss.png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
