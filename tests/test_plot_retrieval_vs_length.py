"""benchmarks/plot_retrieval_vs_length.py: the plotted numbers are the cells' means, bad --run is one clear error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from load_script import load_benchmark

plot_rvl = load_benchmark("plot_retrieval_vs_length")


def _results(path: Path, acc: dict) -> Path:
    cells = [{"task": "passkey", "length": n, "depth": d, "accuracy": a, "n": 3, "sweep_kind": None}
             for (n, d), a in acc.items()]
    cells.append({"task": "niah_single", "length": 1024, "depth": 0.0, "accuracy": 1.0, "sweep_kind": None})
    path.write_text(json.dumps({"meta": {}, "cells": cells, "summary": []}))
    return path


def test_plotted_numbers_are_the_depth_means(tmp_path):
    a = _results(tmp_path / "a.json", {(1024, 0.0): 1.0, (1024, 0.5): 0.5, (1024, 1.0): 0.0,
                                       (4096, 0.0): 0.0, (4096, 0.5): 0.0, (4096, 1.0): 1.0})
    b = _results(tmp_path / "b.json", {(1024, 0.0): 0.2, (1024, 1.0): 0.4})
    png = plot_rvl.main(["--run", f"mem={a}", "--run", f"none={b}", "--window", "512", "--out",
                         str(tmp_path / "p.png")])
    assert png.is_file() and png.stat().st_size > 1000
    rows = {(r["run"], int(r["length"])): r for r in csv.DictReader(open(png.with_suffix(".csv")))}
    assert set(rows) == {("mem", 1024), ("mem", 4096), ("none", 1024)}  # niah cells are another task
    assert float(rows["mem", 1024]["mean"]) == pytest.approx(0.5)
    assert float(rows["mem", 1024]["mean_depth_below_1"]) == pytest.approx(0.75)
    assert float(rows["mem", 4096]["depth_1"]) == 1.0
    assert float(rows["none", 1024]["mean"]) == pytest.approx(0.3)
    assert int(rows["mem", 1024]["samples"]) == 9 and int(rows["none", 1024]["samples"]) == 6  # 3 a cell


def test_a_run_merges_several_results_files(tmp_path):
    a = _results(tmp_path / "a.json", {(1024, 0.0): 1.0, (1024, 1.0): 0.0})
    b = _results(tmp_path / "b.json", {(1048576, 0.5): 1.0})
    png = plot_rvl.main(["--run", f"mem={a},{b}", "--out", str(tmp_path / "p.png")])
    rows = {int(r["length"]): r for r in csv.DictReader(open(png.with_suffix(".csv")))}
    assert set(rows) == {1024, 1048576} and float(rows[1048576]["mean"]) == 1.0
    assert float(rows[1024]["mean"]) == pytest.approx(0.5)


def test_bad_run_argument_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="LABEL=results.json"):
        plot_rvl.main(["--run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.png")])
    a = _results(tmp_path / "a.json", {(1024, 0.0): 1.0})
    with pytest.raises(SystemExit, match="no cells of task 'niah_multikey'"):
        plot_rvl.main(["--run", f"x={a}", "--task", "niah_multikey", "--out", str(tmp_path / "p.png")])
