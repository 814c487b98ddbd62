"""Compare training runs logged with CSVLogger: one loss plot, a table and a JSON (tokens/s, scaling, loss agreement).

    python benchmarks/compare_runs.py 1gpu=RUN1/metrics.csv ddp2=RUN2/metrics.csv fsdp2=RUN3/metrics.csv \
        --baseline 1gpu --name multi_gpu_h200 --out benchmarks/results --device "2x H200"

Each run's tokens/s is the median of its logged `train/tokens_per_s` after the first fifth of them (compilation,
capture and warm-up stay out; the logged rate already counts every rank). Scaling is each run's median over the
baseline's. Loss agreement compares validation losses at the steps both runs logged.

`--metric val/answer_token_acc` (repeatable) also plots that logged metric of every run against the step, into
<name>_<metric>.png, and records its values per run in the JSON's `metrics`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def load_run(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a CSVLogger metrics.csv (empty cells skipped)."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = list(csv.DictReader(path.open()))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path} is not a CSVLogger metrics file (no rows or no step column)")
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key not in ("step", "epoch") and value not in (None, ""):
                out.setdefault(key, []).append((int(r["step"]), float(value)))
    return out


def summarise(series: dict[str, list[tuple[int, float]]]) -> dict:
    """Loss, validation loss, steady-state tokens/s and peak memory of one run (`load_run`'s output)."""
    loss, val = series.get("train/loss", []), series.get("val/loss", [])
    tps = [v for _, v in series.get("train/tokens_per_s", [])]
    steady = tps[len(tps) // 5:] or tps
    kept = series.get("train/attn_kept_fraction", [])
    return {
        "steps_logged": len(loss),
        "first_loss": loss[0][1] if loss else None, "last_loss": loss[-1][1] if loss else None,
        "val_loss": val,
        "tokens_per_s_median": statistics.median(steady) if steady else None,
        "peak_mem_gib": max((v for _, v in series.get("train/peak_mem_gib", [])), default=None),
        "kept_fraction_last": kept[-1][1] if kept else None,
    }


def compare(runs: dict[str, dict], baseline: str) -> dict:
    """Scaling (tokens/s over the baseline's) and the largest validation-loss gap to the baseline, per run."""
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {sorted(runs)}")
    base = runs[baseline]
    base_val = dict(base["val_loss"])
    out = {}
    for label, s in runs.items():
        common = sorted(set(base_val) & {k for k, _ in s["val_loss"]})
        val = dict(s["val_loss"])
        gaps = [abs(val[k] - base_val[k]) for k in common]
        rate, base_rate = s["tokens_per_s_median"], base["tokens_per_s_median"]
        out[label] = {
            "scaling": rate / base_rate if rate and base_rate else None,
            "val_steps_compared": common,
            "max_val_loss_gap": max(gaps) if gaps else None,
        }
    return out


def write_table(result: dict, path: Path) -> str:
    lines = [f"Training runs compared, {result['device']}; baseline {result['baseline']}", "",
             "| run | median tokens/s | scaling | peak GiB | last val loss (step) | max val gap to baseline |",
             "|---|---|---|---|---|---|"]
    for label, s in result["runs"].items():
        c = result["comparison"][label]
        rate = f"{s['tokens_per_s_median']:,.0f}" if s["tokens_per_s_median"] else "-"
        scale = f"{c['scaling']:.2f}x" if c["scaling"] else "-"
        mem = f"{s['peak_mem_gib']:.1f}" if s["peak_mem_gib"] is not None else "-"
        last = f"{s['val_loss'][-1][1]:.3f} ({s['val_loss'][-1][0]})" if s["val_loss"] else "-"
        gap = f"{c['max_val_loss_gap']:.3f} over {len(c['val_steps_compared'])}" if c["max_val_loss_gap"] is not None \
            else "-"
        lines.append(f"| {label} | {rate} | {scale} | {mem} | {last} | {gap} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4))


def _save(fig, ax, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], title: str, path: Path) -> None:
    fig, ax = _axes()
    for i, (label, series) in enumerate(runs.items()):
        color = f"C{i}"
        if series.get("train/loss"):
            ax.plot(*zip(*series["train/loss"]), color=color, lw=0.8, alpha=0.5, label=f"{label} train")
        if series.get("val/loss"):
            ax.plot(*zip(*series["val/loss"]), "o-", color=color, ms=4, label=f"{label} val")
    _save(fig, ax, "cross-entropy (nats/token)", title, path)


def plot_metric(runs: dict[str, dict[str, list[tuple[int, float]]]], metric: str, title: str, path: Path) -> None:
    """One logged metric of every run against the optimizer step."""
    fig, ax = _axes()
    for i, (label, series) in enumerate(runs.items()):
        ax.plot(*zip(*series[metric]), "o-", color=f"C{i}", ms=4, label=label)
    _save(fig, ax, metric, title, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.csv, one per run")
    ap.add_argument("--baseline", default=None, help="label the others are compared with (default: the first)")
    ap.add_argument("--name", required=True, help="results file stem")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="")
    ap.add_argument("--command", default="", help="the command(s) behind the runs, recorded in the JSON")
    ap.add_argument("--metric", action="append", default=[],
                    help="a logged metric to plot for every run (repeatable), e.g. val/answer_token_acc")
    args = ap.parse_args(argv)
    series = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            ap.error(f"run {spec!r}: expected LABEL=path/to/metrics.csv")
        if label in series:
            ap.error(f"run label {label!r} given twice")
        series[label] = load_run(path)
    for metric in args.metric:
        missing = [label for label, s in series.items() if not s.get(metric)]
        if missing:
            ap.error(f"--metric {metric!r}: not logged by run(s) {', '.join(missing)}")
    runs = {label: summarise(s) for label, s in series.items()}
    baseline = args.baseline or next(iter(runs))
    result = {"name": args.name, "device": args.device, "command": args.command, "baseline": baseline,
              "runs": runs, "comparison": compare(runs, baseline),
              "metrics": {m: {label: s[m] for label, s in series.items()} for m in args.metric}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(write_table(result, out / f"{args.name}.md"))
    title = f"{args.name} ({args.device})" if args.device else args.name
    plot(series, title, out / f"{args.name}_loss.png")
    for metric in args.metric:
        plot_metric(series, metric, title, out / f"{args.name}_{metric.replace('/', '_')}.png")
    return result


if __name__ == "__main__":
    main()
