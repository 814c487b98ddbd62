"""Passkey hits per key across memsparse-eval runs: which keys a model finds, at which lengths and depths.

    python benchmarks/passkey_by_key.py NAME=path/to/results.json [NAME=...] [--lengths 1024,2048] [--out x.csv]

Prints one row per (run, key): found / cells at each length, and with the key inside the window excluded
(depths < 1). memsparse-eval uses the same seeds in every cell, so sample i is the same key at every length.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def hits_by_key(path: Path, lengths: set[int] | None = None) -> dict[str, dict[int, list[tuple[float, bool]]]]:
    """{key: {length: [(depth, found), ...]}} from one memsparse-eval results.json (task passkey)."""
    cells = json.loads(path.read_text())["cells"]
    out: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c["task"] != "passkey" or (lengths and c["length"] not in lengths):
            continue
        for s in c["samples"]:
            out[str(s["answer"])][int(c["length"])].append((float(c["depth"]), float(s["score"]) >= 1.0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=results.json")
    ap.add_argument("--lengths", default="", help="comma-separated lengths in tokens (default: all in each file)")
    ap.add_argument("--out", default="", help="also write the table as CSV here")
    a = ap.parse_args(argv)
    lengths = {int(x) for x in a.lengths.split(",") if x} or None
    rows = []
    for spec in a.runs:
        name, sep, p = spec.partition("=")
        if not sep or not Path(p).is_file():
            print(f"passkey_by_key: expected NAME=results.json with an existing file, got {spec!r}", file=sys.stderr)
            return 2
        for key, by_len in sorted(hits_by_key(Path(p), lengths).items()):
            row = {"run": name, "key": key}
            for n, cells in sorted(by_len.items()):
                row[f"{n}"] = f"{sum(f for _, f in cells)}/{len(cells)}"
                deep = [f for d, f in cells if d < 1]
                row[f"{n}_depth<1"] = f"{sum(deep)}/{len(deep)}"
            rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(r.get(c, "-") for c in cols))
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="-")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
