"""Accuracy against attention FLOPs per token for each budget-policy family, and which family wins at equal FLOPs.

    python benchmarks/plot_budget_pareto.py RUN/budget_passkey/results.json RUN/budget_niah_multikey/results.json \\
        --out RUN/pareto [--tol 0.1] [--acc-tol 0] [--metric accuracy]

Input: one or more memsparse-eval results.json of a budget sweep (`--sweep 'budget=dense;fixed:8;top_p:p=0.9'`);
their cells are merged (a later file's cell of the same task, length, depth and setting replaces an earlier one).
Cells outside a budget sweep count too, their setting being the cell's `budget` (e.g. a run with the checkpoint's
own policy). Each setting's family is its policy name as `memsparse.kernels.parse_policy` reads it: dense, fixed,
length_scaled or top_p.

A point is one (task, length, setting): `--metric` (default decoded accuracy) and `attn_flops_per_token` each
averaged over the depths of that length (every depth weighs the same, as memsparse-eval's summary does).

Writes into --out:
  pareto_<task>.png     one panel per length: every point of a family in its colour (hollow when dominated), the
                        family's Pareto front (no point of the family is at most as costly and at least as
                        accurate, one of them strictly) joined by a line.
  pareto_points.csv     every point: task, length, setting, family, flops, metric, tf_exact, kept fraction, samples,
                        whether it is on its family's front.
  pareto_wins.csv       per task, length and FLOPs budget: each family's best metric within that budget and the
                        winner(s).
  pareto_wins.md        per task and length: budgets won / budgets where the family can run, per family, and the
                        family that wins at the most budgets.

The "wins at equal FLOPs" rule (matched FLOPs): the budgets compared are the measured FLOPs of every point of the
(task, length). A family can run at budget x when one of its points costs at most x * (1 + tol) (tol = --tol,
default 0.10: FLOPs within 10 % count as equal); its value at x is the best metric among those points (its upper
envelope). At each budget the winners are the families whose value is within --acc-tol (default 0: exact ties
only) of the best value there; a family that cannot run at x neither wins nor loses there, and a budget wins for
none when its best value is 0 or when two or more families run there and all of them tie. The family with the
most budgets won is the (task, length) winner (several when tied; "tie" when no budget separates the families,
e.g. when every setting scores 0). With few samples per cell the metric moves in steps of 1/samples: read a win by
a margin below that as a tie.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

FAMILIES = ("dense", "fixed", "length_scaled", "top_p")
COLORS = {"dense": "black", "fixed": "tab:blue", "length_scaled": "tab:green", "top_p": "tab:red"}
METRICS = ("accuracy", "tf_exact", "tf_token_acc")


def fmt_len(n: int) -> str:
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def family(spec: str) -> str:
    """The policy family of a budget spec ('top_p:p=0.9' -> 'top_p'); a bad spec is a one-line SystemExit."""
    from memsparse.kernels import parse_policy

    try:
        return parse_policy(spec).name
    except (ValueError, TypeError) as e:
        raise SystemExit(f"cannot read budget setting {spec!r}: {e}") from None


def load_cells(paths: list[Path]) -> list[dict]:
    """The budget cells of the results files, merged by (task, length, depth, setting), later files winning; each
    cell gets its setting as `_setting`."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
            cells = data["cells"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{p}: not a memsparse-eval results.json ({type(e).__name__}: {e})") from None
        for c in cells:
            kind = c.get("sweep_kind")
            if kind not in (None, "", "budget"):
                continue
            setting = c.get("sweep_value") if kind == "budget" else c.get("budget")
            if setting in (None, ""):
                continue
            merged[(c["task"], int(c["length"]), float(c["depth"]), str(setting))] = dict(c, _setting=str(setting))
    if not merged:
        raise SystemExit("no budget cells in " + ", ".join(map(str, paths)) +
                         " (expected a memsparse-eval --sweep 'budget=...' results.json)")
    return list(merged.values())


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def points(cells: list[dict], metric: str = "accuracy") -> list[dict]:
    """One point per (task, length, setting): the metric and attention FLOPs per token averaged over depths."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["task"], int(c["length"]), c["_setting"])].append(c)
    out = []
    for (task, length, setting), cs in groups.items():
        flops = _mean(c.get("attn_flops_per_token") for c in cs)
        value = _mean(c.get(metric) for c in cs)
        if flops is None or value is None:
            continue
        out.append({"task": task, "length": length, "setting": setting, "family": family(setting),
                    "flops": flops, "value": value, "tf_exact": _mean(c.get("tf_exact") for c in cs),
                    "kept_fraction": _mean(c.get("attn_kept_fraction") for c in cs),
                    "depths": len(cs), "samples": sum(int(c.get("n") or 0) for c in cs)})
    if not out:
        raise SystemExit(f"no cell records both {metric!r} and attn_flops_per_token (a model without attention "
                         "statistics, or the wrong --metric?)")
    out.sort(key=lambda p: (p["task"], p["length"], FAMILIES.index(p["family"]) if p["family"] in FAMILIES else 9,
                            p["flops"], p["setting"]))
    return out


def pareto_front(pts: list[dict]) -> list[dict]:
    """The points no other point dominates (at most the FLOPs and at least the value, one strictly), by FLOPs."""
    front = []
    for p in pts:
        dominated = any(q is not p and q["flops"] <= p["flops"] and q["value"] >= p["value"] and
                        (q["flops"] < p["flops"] or q["value"] > p["value"]) for q in pts)
        if not dominated:
            front.append(p)
    # equal points (same FLOPs and value): keep one
    seen, out = set(), []
    for p in sorted(front, key=lambda p: (p["flops"], -p["value"], p["setting"])):
        if (p["flops"], p["value"]) not in seen:
            seen.add((p["flops"], p["value"]))
            out.append(p)
    return out


def envelope(pts: list[dict], budget: float, tol: float) -> float | None:
    """Best value among `pts` costing at most budget * (1 + tol); None if none does."""
    vals = [p["value"] for p in pts if p["flops"] <= budget * (1.0 + tol)]
    return max(vals) if vals else None


def wins(pts: list[dict], tol: float = 0.10, acc_tol: float = 0.0) -> tuple[list[dict], list[dict]]:
    """The matched-FLOPs comparison of one or more (task, length) panels (rule in the module docstring).
    Returns (per-budget rows, per-(task, length) summary rows)."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for p in pts:
        panels[(p["task"], p["length"])].append(p)
    budget_rows, summary = [], []
    for (task, length), ps in panels.items():
        fams = [f for f in FAMILIES if any(p["family"] == f for p in ps)]
        fams += sorted({p["family"] for p in ps} - set(fams))
        won = dict.fromkeys(fams, 0)
        eligible = dict.fromkeys(fams, 0)
        for budget in sorted({p["flops"] for p in ps}):
            vals = {f: envelope([p for p in ps if p["family"] == f], budget, tol) for f in fams}
            best = max(v for v in vals.values() if v is not None)
            winners = [f for f, v in vals.items() if v is not None and v >= best - acc_tol - 1e-12]
            running = sum(v is not None for v in vals.values())
            decisive = best > 0 and (running == 1 or len(winners) < running)  # a 0 or an all-way tie wins nothing
            for f, v in vals.items():
                eligible[f] += v is not None
                won[f] += decisive and f in winners
            budget_rows.append({"task": task, "length": length, "budget_flops": budget,
                                **{f"{f}_best": vals[f] for f in fams}, "best": best, "winners": "+".join(winners)})
        top = max(won.values())
        summary.append({"task": task, "length": length, "budgets": len({p["flops"] for p in ps}),
                        **{f"{f}_won": won[f] for f in fams}, **{f"{f}_eligible": eligible[f] for f in fams},
                        "winner": "+".join(f for f in fams if won[f] == top) if top else "tie"})
    return budget_rows, summary


def plot_task(pts: list[dict], task: str, path: Path, metric: str, tol: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in pts if p["task"] == task]
    lengths = sorted({p["length"] for p in mine})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 4.0), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        panel = [p for p in mine if p["length"] == length]
        for fam in [f for f in FAMILIES if any(p["family"] == f for p in panel)]:
            fp = [p for p in panel if p["family"] == fam]
            front = pareto_front(fp)
            on = {id(p) for p in front}
            color = COLORS.get(fam, "grey")
            ax.plot([p["flops"] for p in front], [p["value"] for p in front], "-o", color=color, label=fam, ms=5)
            off = [p for p in fp if id(p) not in on]
            if off:
                ax.plot([p["flops"] for p in off], [p["value"] for p in off], "o", mfc="none", color=color, ms=5)
            for p in fp:
                label = p["setting"].partition(":")[2] or p["setting"]
                ax.annotate(label, (p["flops"], p["value"]), fontsize=5.5, alpha=0.75, xytext=(3, 3),
                            textcoords="offset points", color=color)
        xs = [p["flops"] for p in panel]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("attention FLOPs / token (all layers)")
        ax.set_title(f"{task}, {fmt_len(length)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel(f"{metric} (mean over depths)")
    fig.suptitle(f"{task}: {metric} against attention FLOPs per token; lines = each family's Pareto front "
                 f"(hollow = dominated); equal FLOPs = within {tol:.0%}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows])


def _markdown(summary: list[dict], metric: str, tol: float, acc_tol: float) -> str:
    fams = [f for f in FAMILIES if any(f"{f}_won" in s for s in summary)]
    lines = [f"Budget families at matched FLOPs ({metric}; budgets = every measured FLOPs value; a family runs at "
             f"budget x with a point <= x * {1 + tol:g}, winners within {acc_tol:g} of the best; "
             "cells: budgets won / budgets it can run at).", "",
             "| task | length | " + " | ".join(fams) + " | winner |",
             "|---|---|" + "---|" * len(fams) + "---|"]
    for s in summary:
        cells = [f"{s[f + '_won']}/{s[f + '_eligible']}" if f + "_won" in s else "-" for f in fams]
        lines.append(f"| {s['task']} | {fmt_len(s['length'])} | " + " | ".join(cells) + f" | {s['winner']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="memsparse-eval results.json of budget sweeps (merged)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--metric", default="accuracy", choices=METRICS)
    ap.add_argument("--tol", type=float, default=0.10, help="FLOPs within this relative margin count as equal")
    ap.add_argument("--acc-tol", type=float, default=0.0, help="values within this of the best count as wins")
    args = ap.parse_args(argv)
    if args.tol < 0 or args.acc_tol < 0:
        raise SystemExit("--tol and --acc-tol must be >= 0")
    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"results file(s) not found: {', '.join(missing)}")
    pts = points(load_cells(paths), args.metric)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fronts = {(p["task"], p["length"], p["family"]) for p in pts}
    on_front = set()
    for key in fronts:
        on_front |= {id(p) for p in pareto_front([p for p in pts if (p["task"], p["length"], p["family"]) == key])}
    rows = [{**{k: v for k, v in p.items() if k != "value"}, args.metric: p["value"], "on_front": id(p) in on_front}
            for p in pts]
    _write_csv(out / "pareto_points.csv", rows)
    budget_rows, summary = wins(pts, args.tol, args.acc_tol)
    _write_csv(out / "pareto_wins.csv", budget_rows)
    (out / "pareto_wins.md").write_text(_markdown(summary, args.metric, args.tol, args.acc_tol))
    pngs = [plot_task(pts, t, out / f"pareto_{t}.png", args.metric, args.tol)
            for t in dict.fromkeys(p["task"] for p in pts)]
    print((out / "pareto_wins.md").read_text(), end="")
    print(f"wrote {len(pngs)} plot(s), pareto_points.csv, pareto_wins.csv and pareto_wins.md to {out}")
    return {"points": rows, "budgets": budget_rows, "summary": summary, "pngs": pngs}


if __name__ == "__main__":
    main()
