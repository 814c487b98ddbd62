"""Learning curves of benchmarks/cpu_memory_probe.py runs side by side: exact match by distance band against
training step, one panel per band, one line per (run, model).

    python benchmarks/plot_memory_probe.py benchmarks/results/cpu_memory_probe.json \\
        benchmarks/results/cpu_memory_probe_key_length/key5_1200.json --out DIR

Runs with `--far LO,HI` get a fourth panel for that band (`far`), runs with `--unseen N` two panels for the
held-out letters (`unseen_in_window`, `unseen_beyond_attention`). Each run is labelled by its file name and
key length (`args.key_length`, 1 when absent: runs from before the option). Writes
DIR/memory_probe_curves.png and DIR/memory_probe_curves.csv (run, key_length, model, step, band, accuracy).
Runs with `--copy-steps N` are shifted by N: their steps count from the start of the mixed schedule (the copy
steps before it are negative), so runs with and without a copying start line up where the memory is needed.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

BANDS = (("in_window", "key 8-24 back (in the window)"), ("relay", "40-90 back (attention relayed)"),
         ("beyond_attention", "112-160 back (memory only)"))
UNSEEN_BANDS = (("unseen_in_window", "held-out letters, 8-24 back"),
                ("unseen_beyond_attention", "held-out letters, 112-160 back"))


def load(paths: list[str]) -> dict[str, dict]:
    """{path: its cpu_memory_probe.py JSON}, each file read once."""
    return {p: json.loads(Path(p).read_text()) for p in paths}


def scaled(title: str, scale: int) -> str:
    """A band title with its distances times `scale` (`cpu_memory_probe.py --scale`): "40-90 back" -> "80-180 back"."""
    if scale == 1:
        return title
    import re

    return re.sub(r"(\d+)-(\d+) back", lambda m: f"{int(m[1]) * scale}-{int(m[2]) * scale} back", title)


def bands(docs: dict[str, dict]) -> list[tuple[str, str]]:
    """BANDS, plus ("far", its range) when a run was trained with `--far` (the widest range among them), plus
    UNSEEN_BANDS when one was trained with `--unseen`; distances times the runs' `--scale` when they share one."""
    fars = [doc["args"]["far"] for doc in docs.values() if doc["args"].get("far")]
    scales = {doc["args"].get("scale", 1) for doc in docs.values()}
    mixed = len(scales) > 1
    scale = 1 if mixed else scales.pop()
    out = [(b, scaled(t, scale) + (" (x each run's --scale)" if mixed else "")) for b, t in BANDS]
    if fars:
        out.append(("far", f"{min(f[0] for f in fars)}-{max(f[1] for f in fars)} back (memory only)"))
    if any(doc["args"].get("unseen") for doc in docs.values()):
        out += [(b, scaled(t, scale)) for b, t in UNSEEN_BANDS]
    return out


def rows(docs: dict[str, dict]) -> list[dict]:
    """One row per (run, model, step, band)."""
    out = []
    for p, doc in docs.items():
        kl = doc["args"].get("key_length", 1)
        shift = doc["args"].get("copy_steps", 0)
        for run in doc["runs"]:
            model = "memory" if run["memory_layers"] else "no memory"
            for point in run["curve"]:
                for band, _ in BANDS + (("far", ""),) + UNSEEN_BANDS:
                    if f"acc_{band}" not in point:
                        continue
                    out.append({"run": Path(p).stem, "key_length": kl, "model": model, "step": point["step"] - shift,
                                "band": band, "accuracy": point[f"acc_{band}"]})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="cpu_memory_probe.py --out JSON files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    docs = load(args.results)
    data = rows(docs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory_probe_curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = bands(docs)
    copying = any(doc["args"].get("copy_steps") for doc in docs.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), sharey=True)
    runs = sorted({(r["key_length"], r["run"]) for r in data})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (band, title) in zip(axes, panels):
        for i, (kl, run) in enumerate(runs):
            for model, style in (("memory", "-"), ("no memory", ":")):
                pts = [(r["step"], r["accuracy"]) for r in data
                       if r["run"] == run and r["model"] == model and r["band"] == band]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[i % len(colors)],
                            label=f"{run}: key of {kl} letter{'s' if kl > 1 else ''}, {model}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step of the mixed schedule (after --copy-steps)" if copying else "training step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match (whole key)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("CPU memory probe: MAC memory vs no memory, by run", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "memory_probe_curves.png", dpi=120)
    print(f"wrote {out / 'memory_probe_curves.png'} and {out / 'memory_probe_curves.csv'}")


if __name__ == "__main__":
    main()
