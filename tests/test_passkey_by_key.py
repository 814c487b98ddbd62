"""benchmarks/passkey_by_key.py: hits counted per key and length, depth 1 set apart, bad argument one line."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("passkey_by_key", REPO / "benchmarks" / "passkey_by_key.py")
pbk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pbk)


def _cell(n, d, found):  # found: {key: score}
    return {"task": "passkey", "length": n, "depth": d,
            "samples": [{"answer": k, "prediction": " x", "score": s} for k, s in found.items()]}


def test_counts_per_key(tmp_path, capsys):
    cells = [_cell(1024, 0.0, {"111": 1.0, "222": 0.0}), _cell(1024, 1.0, {"111": 1.0, "222": 1.0}),
             _cell(2048, 0.5, {"111": 0.0, "222": 0.0}),
             {"task": "niah_single", "length": 1024, "depth": 0.0, "samples": [{"answer": "9", "score": 1.0}]}]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cells": cells}))
    out = tmp_path / "t.csv"
    assert pbk.main([f"run={p}", "--out", str(out)]) == 0
    rows = {r["key"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"111", "222"}  # niah cells are another task
    assert rows["111"]["1024"] == "2/2" and rows["111"]["1024_depth<1"] == "1/1"
    assert rows["222"]["1024"] == "1/2" and rows["222"]["1024_depth<1"] == "0/1"
    assert rows["222"]["2048"] == "0/1"
    assert pbk.main([f"run={p}", "--lengths", "2048"]) == 0
    assert "1024" not in capsys.readouterr().out.splitlines()[-1]


def test_bad_argument_is_one_line(tmp_path, capsys):
    assert pbk.main([str(tmp_path / "missing.json")]) == 2
    assert "NAME=results.json" in capsys.readouterr().err
