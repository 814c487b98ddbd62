"""Plots of eval results (matplotlib, Agg backend): length x depth heatmaps (decoded accuracy beside teacher-forced
exact match) and sweep line plots."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from memsparse.eval.harness import format_length as _fmt_len  # noqa: E402


def slug(text: str) -> str:
    """A filename-safe form of a setting ('top_p:p=0.9,min=2' -> 'top_p-p0.9-min2')."""
    s = re.sub(r"[=]", "", str(text))
    s = re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-")
    return s or "default"


METRIC_LABELS = {"accuracy": "decoded accuracy", "tf_exact": "teacher-forced exact", "tf_token_acc":
                 "teacher-forced token acc."}


def heatmap(rows: Sequence[dict], task: str, path: str | Path, title: str | None = None,
            metrics: Sequence[str] = ("accuracy",)) -> Path:
    """One task's cells as lengths (rows) x depths (columns) grids, one panel per metric in `metrics` that any cell
    has (e.g. decoded accuracy beside teacher-forced exact match), colour-coded 0..1, values in the cells."""
    rows = [r for r in rows if r["task"] == task]
    if not rows:
        raise ValueError(f"no cells for task {task!r}")
    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)] or ["accuracy"]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    width = max(5.0, 2.0 + 0.9 * len(depths))
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), max(3.2, 1.8 + 0.5 * len(lengths))),
                             dpi=110, squeeze=False)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    for ax, metric in zip(axes[0], metrics):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in rows:
            if r.get(metric) is not None:
                grid[lengths.index(r["length"]), depths.index(r["depth"])] = r[metric]
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                v = grid[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if np.isnan(v) or 0.25 < v < 0.85 else "white")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
        ax.set_xlabel("needle depth (fraction of the haystack)")
        ax.set_ylabel("context length (tokens)")
        label = METRIC_LABELS.get(metric, metric)
        ax.set_title(f"{title or task}\n{label}" if len(metrics) > 1 else (title or task), fontsize=8)
        fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_plot(summary: Sequence[dict], kind: str, path: str | Path) -> Path:
    """One panel per task, one line per length: accuracy (mean over depths) against attention FLOPs per token
    (kind 'budget') or consolidation passes (kind 'consolidation'), each point labelled with its setting."""
    xkey = "attn_flops_per_token" if kind == "budget" else "consolidation_passes"
    xlabel = "attention FLOPs / token (all layers)" if kind == "budget" else "consolidation passes"
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    if not tasks:
        raise ValueError("empty sweep summary")
    ncol = min(3, len(tasks))
    nrow = -(-len(tasks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.8 * nrow), dpi=110, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        pts = [s for s in summary if s["task"] == task and s[xkey] is not None]
        lengths = sorted({s["length"] for s in pts})
        for length in lengths:
            line = sorted((s for s in pts if s["length"] == length), key=lambda s: (s[xkey], str(s["sweep_value"])))
            xs, ys = [s[xkey] for s in line], [s["accuracy"] for s in line]
            ax.plot(xs, ys, marker="o", label=_fmt_len(length))
            for s in line if length == lengths[-1] else []:  # settings named once, on the longest length
                ax.annotate(str(s["sweep_value"]), (s[xkey], s["accuracy"]), fontsize=6, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")
        xs_all = [s[xkey] for s in pts]
        if kind == "budget" and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
            ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(title="length", fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"{kind} sweep", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(rows: Sequence[dict], summary: Sequence[dict], out_dir: str | Path,
                sweep_kind: str | None = None) -> list[Path]:
    """Heatmap per task (per task and setting in a sweep) and, for a sweep, the sweep plot; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    settings = list(dict.fromkeys(r.get("sweep_value") for r in rows))
    for task in tasks:
        for sv in settings:
            sub = [r for r in rows if r["task"] == task and r.get("sweep_value") == sv]
            if not sub:
                continue
            if sv is None:
                name = f"heatmap_{slug(task)}.png"
                title = f"{task}\nbudget {sub[0]['budget']}\nconsolidation {sub[0]['consolidation']}"
            else:
                name, title = f"heatmap_{slug(task)}__{sweep_kind}_{slug(sv)}.png", f"{task}\n{sweep_kind} {sv}"
            paths.append(heatmap(sub, task, out_dir / name, title=title, metrics=("accuracy", "tf_exact")))
    if sweep_kind:
        paths.append(sweep_plot(summary, sweep_kind, out_dir / f"sweep_{sweep_kind}.png"))
    return paths
