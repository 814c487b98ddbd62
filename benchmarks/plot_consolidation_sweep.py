"""Retrieval against consolidation passes, the length-scaled schedule beside fixed passes, and each pass count's cost.

    python benchmarks/plot_consolidation_sweep.py RUN/cons_passkey/results.json RUN/cons_niah_multikey/results.json \\
        --out RUN/consolidation [--metric accuracy]

Input: one or more memsparse-eval results.json of a consolidation sweep
(`--sweep 'consolidation=off;fixed:1;fixed:2;fixed:4;fixed:8;schedule:a=0.5,n_max=8'`); their cells are merged (a
later file's cell of the same task, length, depth and setting replaces an earlier one). Cells outside a
consolidation sweep count too, their setting being the cell's `consolidation`. Settings `off` and `fixed:N` are
the fixed family (off = 0 passes); `schedule:...` settings are schedules. A point's pass count is the cell's
`consolidation_passes`, the count the harness ran at that prompt length (for a schedule n(L) =
clamp(round(a * log2(L / window)), 0, n_max)).

At one length a schedule runs a fixed number of passes, the same computation as fixed:n(L): what a schedule can
win is where it spends its passes across lengths. So besides one panel per length (schedules at their n(L)), a
last panel averages over the lengths every setting of the task has: a fixed:N point at (N, mean metric), a
schedule at (its mean pass count, mean metric). schedule_vs_fixed.csv compares each schedule with the fixed
passes at the same mean pass count (linear interpolation between the neighbouring fixed points of the mean
curve): `delta` > 0 means the schedule does better for the same total passes.

Wall time: seconds per sample (`wall_s` / n, the whole stream_decode call: prompt, teacher-forced branch, decoding)
and `decode_s_per_sample` (`wall_s - tf_wall_s`, without the teacher-forced branch), and the ratio to the 0-pass
setting at the same task and length (`cost_vs_0_passes`).

Writes into --out: consolidation_<task>.png (top row: metric against passes, one panel per length and the mean
panel; bottom row: seconds per sample against passes, one line per length), consolidation_points.csv (every
point, lengths and the `mean` rows) and schedule_vs_fixed.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

METRICS = ("accuracy", "tf_exact", "tf_token_acc")


def fmt_len(n: int) -> str:
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def kind_of(setting: str) -> str:
    """'off' / 'fixed:N' / 'N' -> 'fixed'; 'schedule...' -> 'schedule'; anything else a one-line SystemExit."""
    head = str(setting).strip().partition(":")[0].strip()
    if head in ("off", "fixed") or head.isdigit():
        return "fixed"
    if head == "schedule":
        return "schedule"
    raise SystemExit(f"cannot read consolidation setting {setting!r} (expected off, fixed:N or schedule:...)")


def load_cells(paths: list[Path]) -> list[dict]:
    """Consolidation cells of the results files, merged by (task, length, depth, setting), later files winning."""
    merged: dict[tuple, dict] = {}
    for p in paths:
        try:
            cells = json.loads(Path(p).read_text())["cells"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{p}: not a memsparse-eval results.json ({type(e).__name__}: {e})") from None
        for c in cells:
            kind = c.get("sweep_kind")
            if kind not in (None, "", "consolidation"):
                continue
            setting = c.get("sweep_value") if kind == "consolidation" else c.get("consolidation")
            if setting in (None, "") or c.get("consolidation_passes") is None:
                continue
            merged[(c["task"], int(c["length"]), float(c["depth"]), str(setting))] = dict(c, _setting=str(setting))
    if not merged:
        raise SystemExit("no consolidation cells in " + ", ".join(map(str, paths)) +
                         " (expected a memsparse-eval --sweep 'consolidation=...' results.json)")
    return list(merged.values())


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def points(cells: list[dict], metric: str = "accuracy") -> list[dict]:
    """One point per (task, length, setting), averaged over depths; plus per task and setting a `mean` point over
    the lengths that every setting of the task has (length 'mean', passes = mean pass count)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["task"], int(c["length"]), c["_setting"])].append(c)
    pts = []
    for (task, length, setting), cs in groups.items():
        value = _mean(c.get(metric) for c in cs)
        if value is None:
            continue
        n = sum(int(c.get("n") or 1) for c in cs)
        wall = sum(float(c["wall_s"]) for c in cs if c.get("wall_s") is not None)
        tf = sum(float(c.get("tf_wall_s") or 0.0) for c in cs)
        pts.append({"task": task, "length": length, "setting": setting, "kind": kind_of(setting),
                    "passes": _mean(c["consolidation_passes"] for c in cs), "value": value,
                    "tf_exact": _mean(c.get("tf_exact") for c in cs), "depths": len(cs), "samples": n,
                    "s_per_sample": wall / n if n else None, "decode_s_per_sample": (wall - tf) / n if n else None,
                    "tokens_per_s": _mean(c.get("tokens_per_s") for c in cs)})
    if not pts:
        raise SystemExit(f"no consolidation cell records {metric!r}")
    for p in pts:  # cost against the 0-pass setting of the same task and length
        base = [q for q in pts if q["task"] == p["task"] and q["length"] == p["length"] and q["kind"] == "fixed"
                and q["passes"] == 0 and q["s_per_sample"]]
        p["cost_vs_0_passes"] = p["s_per_sample"] / base[0]["s_per_sample"] if base and p["s_per_sample"] else None
    out = list(pts)
    for task in dict.fromkeys(p["task"] for p in pts):
        mine = [p for p in pts if p["task"] == task]
        settings = list(dict.fromkeys(p["setting"] for p in mine))
        common = set.intersection(*({p["length"] for p in mine if p["setting"] == s} for s in settings))
        for s in settings:
            ps = [p for p in mine if p["setting"] == s and p["length"] in common]
            if not ps:
                continue
            out.append({"task": task, "length": "mean", "setting": s, "kind": ps[0]["kind"],
                        "passes": _mean(p["passes"] for p in ps), "value": _mean(p["value"] for p in ps),
                        "tf_exact": _mean(p["tf_exact"] for p in ps), "depths": None,
                        "samples": sum(p["samples"] for p in ps), "s_per_sample": _mean(p["s_per_sample"] for p in ps),
                        "decode_s_per_sample": _mean(p["decode_s_per_sample"] for p in ps),
                        "tokens_per_s": None, "cost_vs_0_passes": None,
                        "lengths": ",".join(fmt_len(n) for n in sorted(common))})
    return out


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Piecewise-linear y(x) through the points (xs ascending); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]


def schedule_vs_fixed(pts: list[dict]) -> list[dict]:
    """Each schedule's mean point against the fixed passes' mean curve at the same mean pass count."""
    rows = []
    for task in dict.fromkeys(p["task"] for p in pts):
        mean = [p for p in pts if p["task"] == task and p["length"] == "mean"]
        fixed = sorted((p for p in mean if p["kind"] == "fixed"), key=lambda p: p["passes"])
        xs, ys = [p["passes"] for p in fixed], [p["value"] for p in fixed]
        for s in (p for p in mean if p["kind"] == "schedule"):
            f = interpolate(xs, ys, s["passes"])
            rows.append({"task": task, "schedule": s["setting"], "lengths": s.get("lengths"),
                         "mean_passes": s["passes"], "schedule_value": s["value"], "fixed_value_at_passes": f,
                         "delta": None if f is None else s["value"] - f,
                         "schedule_s_per_sample": s["s_per_sample"]})
    return rows


def plot_task(pts: list[dict], task: str, path: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in pts if p["task"] == task]
    lengths = sorted({p["length"] for p in mine if p["length"] != "mean"})
    panels = lengths + (["mean"] if any(p["length"] == "mean" for p in mine) else [])
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.0), squeeze=False)
    for ax, length in zip(axes[0], panels):
        panel = [p for p in mine if p["length"] == length]
        fixed = sorted((p for p in panel if p["kind"] == "fixed"), key=lambda p: p["passes"])
        ax.plot([p["passes"] for p in fixed], [p["value"] for p in fixed], "-o", color="tab:blue",
                label="off / fixed:N")
        for i, s in enumerate(p for p in panel if p["kind"] == "schedule"):
            ax.plot([s["passes"]], [s["value"]], marker="*s^D"[i % 4], ms=11, ls="none", color=f"C{i + 1}",
                    label=s["setting"])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("mean consolidation passes over lengths" if length == "mean" else "consolidation passes")
        ax.set_title(f"{task}, mean over lengths" if length == "mean" else f"{task}, {fmt_len(length)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(f"{metric} (mean over depths)")
    cost = axes[1][0]
    for i, length in enumerate(lengths):
        fixed = sorted((p for p in mine if p["length"] == length and p["kind"] == "fixed"), key=lambda p: p["passes"])
        cost.plot([p["passes"] for p in fixed], [p["s_per_sample"] for p in fixed], "-o", color=f"C{i}",
                  label=fmt_len(length))
        for s in (p for p in mine if p["length"] == length and p["kind"] == "schedule"):
            cost.plot([s["passes"]], [s["s_per_sample"]], "*", ms=10, color=f"C{i}")
    cost.set_xlabel("consolidation passes (stars: schedules)")
    cost.set_ylabel("seconds per sample")
    cost.set_yscale("log")
    cost.grid(alpha=0.3)
    cost.legend(title="length", fontsize=7)
    cost.set_title("wall time per sample", fontsize=10)
    rel = axes[1][1] if len(panels) > 1 else None
    if rel is not None:
        for i, length in enumerate(lengths):
            fixed = sorted((p for p in mine if p["length"] == length and p["kind"] == "fixed"),
                           key=lambda p: p["passes"])
            rel.plot([p["passes"] for p in fixed], [p["cost_vs_0_passes"] for p in fixed], "-o", color=f"C{i}",
                     label=fmt_len(length))
        rel.set_xlabel("consolidation passes")
        rel.set_ylabel("wall time / wall time at 0 passes")
        rel.grid(alpha=0.3)
        rel.legend(title="length", fontsize=7)
        rel.set_title("relative cost", fontsize=10)
    for ax in list(axes[1])[2:]:
        ax.axis("off")
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="memsparse-eval results.json of consolidation sweeps (merged)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--metric", default="accuracy", choices=METRICS)
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"results file(s) not found: {', '.join(missing)}")
    pts = points(load_cells(paths), args.metric)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**{k: v for k, v in p.items() if k != "value"}, args.metric: p["value"]} for p in pts]
    _write_csv(out / "consolidation_points.csv", rows)
    svf = schedule_vs_fixed(pts)
    if svf:
        _write_csv(out / "schedule_vs_fixed.csv", svf)
    tasks = dict.fromkeys(p["task"] for p in pts)
    pngs = [plot_task(pts, t, out / f"consolidation_{t}.png", args.metric) for t in tasks]
    for r in svf:
        d = "n/a (outside the fixed pass counts)" if r["delta"] is None else f"{r['delta']:+.3f}"
        print(f"{r['task']}: {r['schedule']} mean passes {r['mean_passes']:.2f} {args.metric} "
              f"{r['schedule_value']:.3f}, fixed at equal passes: {d}")
    print(f"wrote {len(pngs)} plot(s), consolidation_points.csv" + (" and schedule_vs_fixed.csv" if svf else "") +
          f" to {out}")
    return {"points": rows, "schedule_vs_fixed": svf, "pngs": pngs}


if __name__ == "__main__":
    main()
