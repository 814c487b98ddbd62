"""Passkey retrieval against training steps, from RetrievalEval's cells.jsonl of one or more runs: per run and step,
decoded accuracy per length, keys found with the key beyond / inside the attention window (decoded and
teacher-forced), the teacher-forced answer-token accuracy (tf_token_acc: a key copied in part shows here before it
is found whole) and tf_stop; a table (.md), the figures (.json) and a plot of the counts against steps (.png).
The grid's other tasks (e.g. niah_multikey) get a decoded-accuracy column per task and length (`tasks` in the
.json); every other figure is the passkey's.
Where the cells hold RetrievalEval's `no_writes` pass (the grid again with the memory's writes off), each row also
counts the keys found without the memory's writes (`beyond_no_writes`, `inside_no_writes`), drawn dashed: keys
beyond the window found only with the writes on are the memory's.

    python benchmarks/retrieval_by_step.py seed0=.../cells.jsonl seed1=.../cells.jsonl --name X --out DIR \
        --device "NVIDIA H100 80GB HBM3"

The window split uses each sample's needle distance (passkey_by_key.py); a resumed run's cells.jsonl holds the
evaluations of all its invocations.

`--memory-gate N` (runs with the writes-off pass): after writing the outputs, exit 3 if at the last evaluated
step of any run the memory carries fewer than N keys past the window (found with its writes minus found without):
`run_retrieval.sh MEMORY_GATE=N` stops the curriculum there instead of training stages 3-4 on a model whose keys
past the window are attention's.

`--copy-check`: exit 4 (after writing the outputs) if at the last evaluated step of any run no key inside the window
was decoded: a stage-1 model that has not learned to copy (on an H100 the recipe's stage 1 ends there at step 900;
the copy appears by step 1,200). `run_retrieval.sh` logs it after stage 1 and goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("passkey_by_key", Path(__file__).with_name("passkey_by_key.py"))
pbk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pbk)


def found(cells: list[dict]) -> dict[bool, list[int]]:
    """{beyond the window: [decoded hits, teacher-forced hits, prompts]} over the passkey prompts of `cells` that
    carry a needle distance."""
    count = {True: [0, 0, 0], False: [0, 0, 0]}
    for cells_by_len in pbk.hits_from_cells(cells).values():
        for hits in cells_by_len.values():
            for _, hit, beyond, tf, _ in hits:
                if beyond is not None:
                    count[beyond][0] += hit
                    count[beyond][1] += bool(tf)
                    count[beyond][2] += 1
    return count


def by_step(path: Path) -> list[dict]:
    """One row per evaluated step: {step, acc_<length>, beyond, beyond_n, inside, inside_n, tf_beyond, tf_inside,
    tf_token_acc, tf_stop} (counts of prompts; tf_token_acc the mean over the passkey samples that report it,
    tf_stop over the passkey cells that report it, else None), and
    beyond_no_writes / inside_no_writes where the step has a writes-off pass. The file is read once."""
    all_cells, _ = pbk.read_cells(path)
    passes = {w: [c for c in all_cells if c.get("memory_writes", True) == w] for w in (True, False)}
    rows = []
    for step in sorted({int(c["step"]) for c in passes[True]}):
        cells, off_cells = ([c for c in passes[w] if int(c["step"]) == step] for w in (True, False))
        row: dict = {"step": step}
        for c in cells:
            if c["task"] == "passkey":
                row.setdefault(f"acc_{c['length']}", []).append(float(c["accuracy"]))
        for k in [k for k in row if k.startswith("acc_")]:
            row[k] = round(sum(row[k]) / len(row[k]), 4)
        other: dict[str, list[float]] = {}  # the grid's other tasks: decoded accuracy per length, over the depths
        for c in cells:
            if c["task"] != "passkey":
                other.setdefault(f"{c['task']} {c['length']}", []).append(float(c["accuracy"]))
        if other:
            row["tasks"] = {k: round(sum(v) / len(v), 4) for k, v in other.items()}
        stops = [float(c["tf_stop"]) for c in cells if c["task"] == "passkey" and c.get("tf_stop") is not None]
        row["tf_stop"] = round(sum(stops) / len(stops), 4) if stops else None
        tok = [float(x["tf_token_acc"]) for c in cells if c["task"] == "passkey" for x in c.get("samples", [])
               if x.get("tf_token_acc") is not None]
        row["tf_token_acc"] = round(sum(tok) / len(tok), 4) if tok else None
        count = found(cells)
        row.update(beyond=count[True][0], tf_beyond=count[True][1], beyond_n=count[True][2],
                   inside=count[False][0], tf_inside=count[False][1], inside_n=count[False][2])
        off = found(off_cells)
        if off[True][2] + off[False][2]:
            row.update(beyond_no_writes=off[True][0], inside_no_writes=off[False][0])
        rows.append(row)
    return rows


def memory_keys(rows: list[dict]) -> tuple[int, dict] | None:
    """(keys past the window found with the memory's writes minus without, the row) at the last step that has a
    writes-off pass; None if no step has one."""
    off = [r for r in rows if "beyond_no_writes" in r]
    return (off[-1]["beyond"] - off[-1]["beyond_no_writes"], off[-1]) if off else None


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one line per run and step."""
    lengths = sorted({int(k[4:]) for rows in runs.values() for r in rows for k in r if k.startswith("acc_")})
    tasks = sorted({k for rows in runs.values() for r in rows for k in r.get("tasks", {})},
                   key=lambda k: (k.rsplit(" ", 1)[0], int(k.rsplit(" ", 1)[1])))
    writes_off = any("beyond_no_writes" in r for rows in runs.values() for r in rows)
    head = ["run", "step"] + [f"acc {n}" for n in lengths] + [f"{k} acc" for k in tasks] + [
        "beyond the window: decoded / teacher-forced", "inside: decoded / teacher-forced", "tf_token_acc",
        "tf_stop"] + (
        ["memory writes off: beyond / inside (decoded)"] if writes_off else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in runs.items():
        for r in rows:
            cells = [name, str(r["step"])] + [f"{r[f'acc_{n}']:.2f}" if f"acc_{n}" in r else "-" for n in lengths]
            cells += [f"{r['tasks'][k]:.2f}" if k in r.get("tasks", {}) else "-" for k in tasks]
            cells += [f"{r['beyond']} / {r['tf_beyond']} of {r['beyond_n']}",
                      f"{r['inside']} / {r['tf_inside']} of {r['inside_n']}",
                      "-" if r.get("tf_token_acc") is None else f"{r['tf_token_acc']:.2f}",
                      "-" if r["tf_stop"] is None else f"{r['tf_stop']:.2f}"]
            if writes_off:
                cells.append(f"{r['beyond_no_writes']} / {r['inside_no_writes']}" if "beyond_no_writes" in r else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, where in zip(axes, ("beyond", "inside")):
        for i, (name, rows) in enumerate(runs.items()):
            color = f"C{i}"
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r[where] / max(r[f"{where}_n"], 1) for r in rows], marker="o", color=color, label=name)
            off = [r for r in rows if f"{where}_no_writes" in r]
            if off:
                ax.plot([r["step"] for r in off], [r[f"{where}_no_writes"] / max(r[f"{where}_n"], 1) for r in off],
                        "--", marker="x", color=color, label=f"{name}, memory writes off")
        ax.set_title(f"key {where} the attention window")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("passkey exact match (decoded)")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=cells.jsonl (RetrievalEval's, under the run's retrieval/)")
    ap.add_argument("--name", default="retrieval_by_step")
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="", help="the GPU the runs trained on (for the plot's title)")
    ap.add_argument("--memory-gate", type=int, default=None, metavar="N",
                    help="exit 3 if at the last writes-off evaluation of a run the memory carries fewer than N keys "
                         "past the window (found with its writes minus without)")
    ap.add_argument("--copy-check", action="store_true",
                    help="exit 4 if at the last evaluated step of a run no key inside the window was decoded")
    a = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for spec in a.runs:
        name, sep, p = spec.partition("=")
        if not sep or not Path(p).is_file() or not p.endswith(".jsonl"):
            print(f"retrieval_by_step: expected NAME=cells.jsonl with an existing file, got {spec!r}", file=sys.stderr)
            return 2
        try:
            runs[name] = by_step(Path(p))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"retrieval_by_step: {p}: not RetrievalEval cells ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    (out / f"{a.name}.md").write_text(md)
    (out / f"{a.name}.json").write_text(json.dumps({"device": a.device, "runs": runs}, indent=1) + "\n")
    plot(runs, f"passkey by training step ({a.device})" if a.device else "passkey by training step",
         out / f"{a.name}.png")
    print(md, end="")
    if a.memory_gate is not None:
        for name, rows in runs.items():
            got = memory_keys(rows)
            if got is None:
                print(f"retrieval_by_step: {name}: no writes-off evaluation (RetrievalEval no_writes): the memory "
                      "gate cannot be read", file=sys.stderr)
                return 2
            n, r = got
            if n < a.memory_gate:
                print(f"retrieval_by_step: {name} at step {r['step']}: the memory carries {n} keys past the window "
                      f"({r['beyond']} found with its writes, {r['beyond_no_writes']} without), fewer than "
                      f"--memory-gate {a.memory_gate}", file=sys.stderr)
                return 3
    if a.copy_check:
        for name, rows in runs.items():
            r = rows[-1] if rows else None
            if r is not None and r["inside_n"] and not r["inside"]:
                print(f"retrieval_by_step: {name} at step {r['step']}: no key inside the window decoded (0 of "
                      f"{r['inside_n']}; teacher-forced {r['tf_inside']}): the copy is not learned yet",
                      file=sys.stderr)
                return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
