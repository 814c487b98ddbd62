"""Passkey hits per key across memsparse-eval runs: which keys a model finds, at which lengths and depths.

    python benchmarks/passkey_by_key.py NAME=path/to/results.json [NAME=...] [--lengths 1024,2048] [--out x.csv]
    python benchmarks/passkey_by_key.py NAME=path/to/cells.jsonl@1900 ...   RetrievalEval's cells at step 1900
                                                                            (without @STEP: the last step)

Prints one row per (run, key): found / cells at each length, and with the key inside the window excluded
(depths < 1). memsparse-eval uses the same seeds in every cell, so sample i is the same key at every length.
Where the results hold each sample's needle distance (memsparse-eval from 2026-12-06 on), a `beyond_window` column
per key and a line per run count the prompts whose key lies more than the cell's attention window before the
prompt's end (only the memory, or attention relayed through the layers, can reach it there) apart from the rest.
Where the results hold teacher-forced scores (`tf_exact`), a second line per run gives the teacher-forced exact
match beyond and inside the window, and counts the prompts right when teacher-forced but wrong when decoded,
and of them those that run on: the key's digits, then more ("555443" for 55544), a model that found the key but
did not stop after it (exact match needs a word boundary after the key).

`--tokenizer DIR` (the run's export) adds each key's tokens and the share of all keys that hold its rarest token
(`rarest_share`, from benchmarks/key_tokenization.py), and a line per run with the hit rate by that share: a key
token the model rarely answered in training is not copied (benchmarks/results/cpu_memory_probe_unseen_2026-12-05/).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

# (depth, found, beyond the window, teacher-forced exact, ran on past the key): None where the file does not say
Hit = tuple[float, bool, bool | None, bool | None, bool]


def read_cells(path: Path) -> tuple[list[dict], dict]:
    """(every cell, meta) of a memsparse-eval results.json or a RetrievalEval cells.jsonl (one cell a line, each with
    its `step` and, from its `no_writes` pass, `memory_writes`), the file read once."""
    if path.suffix != ".jsonl":
        data = json.loads(path.read_text())
        return data["cells"], data.get("meta", {})
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], {}


def step_cells(cells: list[dict], step: int | None = None, writes: bool = True,
               where: object = "the file") -> list[dict]:
    """RetrievalEval cells of one step (None: the last) and pass (`writes` False: the memory's writes off). A step
    the cells do not hold is a ValueError naming `where` and the steps they do."""
    cells = [c for c in cells if c.get("memory_writes", True) == writes]
    steps = sorted({int(c["step"]) for c in cells})
    if not steps:
        raise ValueError(f"{where} holds no cells")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"{where} holds steps {', '.join(map(str, steps))}, not {step}")
    return [c for c in cells if int(c["step"]) == step]


def load_cells(path: Path, step: int | None = None, writes: bool = True) -> tuple[list[dict], dict]:
    """(cells, meta) of a memsparse-eval results.json, or of one step of a RetrievalEval cells.jsonl (`step` None:
    the last; `writes` False: the cells its `no_writes` pass evaluated with the memory's writes off)."""
    cells, meta = read_cells(path)
    return (cells, meta) if path.suffix != ".jsonl" else (step_cells(cells, step, writes, path), meta)


def hits_from_cells(cells: list[dict], meta: dict | None = None,
                    lengths: set[int] | None = None) -> dict[str, dict[int, list[Hit]]]:
    """{key: {length: [(depth, found, beyond_window, tf_exact, ran_on), ...]}} of the passkey cells; beyond_window:
    the key's distance from the prompt's end exceeds the cell's window (None without distances); tf_exact: the
    teacher-forced exact match (None without it); ran_on: not found, though the decoded text starts with the key
    (more digits followed it)."""
    out: dict[str, dict[int, list[Hit]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["task"] != "passkey" or (lengths and c["length"] not in lengths):
            continue
        window = c.get("window") or (meta or {}).get("window")
        for s in c["samples"]:
            dist = s.get("needle_distances")
            beyond = None if not dist or not window else min(dist) > int(window)
            found = float(s["score"]) >= 1.0
            tf = None if "tf_exact" not in s else float(s["tf_exact"]) >= 1.0
            ran_on = not found and str(s.get("prediction", "")).strip().startswith(str(s["answer"]))
            out[str(s["answer"])][int(c["length"])].append((float(c["depth"]), found, beyond, tf, ran_on))
    return out


def hits_by_key(path: Path, lengths: set[int] | None = None, step: int | None = None,
                writes: bool = True) -> dict[str, dict[int, list[Hit]]]:
    """`hits_from_cells` of one memsparse-eval results.json or one step of a RetrievalEval cells.jsonl."""
    cells, meta = load_cells(path, step, writes)
    return hits_from_cells(cells, meta, lengths)


SHARE_BINS = ((0.0, 1e-3, "< 0.1%"), (1e-3, 1e-2, "0.1-1%"), (1e-2, 1.1, ">= 1%"))


def rarest_shares(tokenizer_dir: str, digits: int = 5) -> dict[str, tuple[list[str], float]]:
    """{key: (its tokens, share of all `digits`-digit keys holding its rarest token)} under a saved tokenizer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("key_tokenization", Path(__file__).with_name("key_tokenization.py"))
    kt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kt)
    from memsparse.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    stats, enc, share = kt.key_statistics(tok, digits)
    return {str(k): ([tok.decode([t]) for t in ids], min(share[t] for t in ids) / stats["keys"])
            for k, ids in enc.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=results.json, or NAME=cells.jsonl[@STEP]")
    ap.add_argument("--lengths", default="", help="comma-separated lengths in tokens (default: all in each file)")
    ap.add_argument("--out", default="", help="also write the table as CSV here")
    ap.add_argument("--tokenizer", default="", help="a saved tokenizer directory: add each key's rarest-token share")
    ap.add_argument("--digits", type=int, default=5, help="the keys' digits (passkey: 5)")
    ap.add_argument("--no-writes", action="store_true",
                    help="cells.jsonl inputs: the cells RetrievalEval evaluated with the memory's writes off")
    a = ap.parse_args(argv)
    lengths = {int(x) for x in a.lengths.split(",") if x} or None
    if a.tokenizer and not Path(a.tokenizer).is_dir():
        print(f"passkey_by_key: --tokenizer {a.tokenizer!r} is not a directory", file=sys.stderr)
        return 2
    shares = rarest_shares(a.tokenizer, a.digits) if a.tokenizer else None
    rows, summary = [], []
    for spec in a.runs:
        name, sep, p = spec.partition("=")
        step = None
        head, _, tail = p.rpartition("@")
        if tail.isdigit() and head.endswith(".jsonl"):
            p, step = head, int(tail)
        if not sep or not Path(p).is_file():
            print(f"passkey_by_key: expected NAME=results.json or NAME=cells.jsonl[@STEP] with an existing file, got "
                  f"{spec!r}", file=sys.stderr)
            return 2
        if a.no_writes and not p.endswith(".jsonl"):
            print(f"passkey_by_key: --no-writes reads RetrievalEval's cells.jsonl; {p} is a memsparse-eval results "
                  "file (run with --no-memory-writes, it is the writes-off grid itself: drop --no-writes)",
                  file=sys.stderr)
            return 2
        try:
            by_key = hits_by_key(Path(p), lengths, step, writes=not a.no_writes)
        except ValueError as e:
            print(f"passkey_by_key: {e}", file=sys.stderr)
            return 2
        bins = {label: [0, 0] for _, _, label in SHARE_BINS}
        where = {True: [0, 0], False: [0, 0]}  # beyond the window / inside: [hits, prompts]
        forced = {True: [0, 0], False: [0, 0]}  # the same, teacher-forced exact: [hits, prompts]
        lost = [0, 0]  # right when teacher-forced, wrong when decoded: [prompts, of them ran on past the key]
        for key, by_len in sorted(by_key.items()):
            row = {"run": name, "key": key}
            hits = [h for cells in by_len.values() for h in cells]
            if shares is not None:
                tokens, rarest = shares.get(key, ([], float("nan")))
                row["tokens"], row["rarest_share"] = " ".join(repr(t) for t in tokens), f"{rarest:.5f}"
                label = next((lb for lo, hi, lb in SHARE_BINS if lo <= rarest < hi), None)
                if label is not None:
                    bins[label][0] += sum(h[1] for h in hits)
                    bins[label][1] += len(hits)
            for n, cells in sorted(by_len.items()):
                row[f"{n}"] = f"{sum(h[1] for h in cells)}/{len(cells)}"
                deep = [h[1] for h in cells if h[0] < 1]
                row[f"{n}_depth<1"] = f"{sum(deep)}/{len(deep)}"
            far = [0, 0]  # this key beyond the window: [hits, prompts]
            for _, f, b, tf, ran_on in hits:
                if b is not None:
                    where[b][0] += f
                    where[b][1] += 1
                    if b:
                        far[0] += f
                        far[1] += 1
                    if tf is not None:
                        forced[b][0] += tf
                        forced[b][1] += 1
                if tf and not f:
                    lost[0] += 1
                    lost[1] += ran_on
            if any(h[2] is not None for h in hits):
                row["beyond_window"] = f"{far[0]}/{far[1]}"
            rows.append(row)
        if where[True][1] or where[False][1]:
            summary.append(f"{name}: key beyond the attention window {where[True][0]}/{where[True][1]}, "
                           f"inside it {where[False][0]}/{where[False][1]}")
        if forced[True][1] or forced[False][1]:
            summary.append(f"{name}: teacher-forced, beyond the window {forced[True][0]}/{forced[True][1]}, inside "
                           f"{forced[False][0]}/{forced[False][1]}; right teacher-forced but not decoded {lost[0]}, "
                           f"of them {lost[1]} ran on past the key (its digits, then more)")
        if shares is not None:
            summary.append(f"{name}: hits by the key's rarest-token share: " + ", ".join(
                f"{lb} {h}/{n}" for lb, (h, n) in bins.items()))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(r.get(c, "-") for c in cols))
    for line in summary:
        print(line)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="-")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
