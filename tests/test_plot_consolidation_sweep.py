"""benchmarks/plot_consolidation_sweep.py: depth means per pass count, the schedule at its mean pass count against
fixed passes at equal total passes, wall time per pass count, and bad input as one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from load_script import load_benchmark

cons = load_benchmark("plot_consolidation_sweep")

K32, K128, M1 = 32768, 131072, 1048576
# (setting, length): (passes, accuracy at depth 0, accuracy at depth 1, wall_s of the cell)
CASE = {
    ("off", K32): (0, 0.1, 0.3, 1.0), ("off", K128): (0, 0.0, 0.2, 4.0),
    ("fixed:1", K32): (1, 0.2, 0.4, 1.2), ("fixed:1", K128): (1, 0.1, 0.3, 4.8),
    ("fixed:2", K32): (2, 0.3, 0.5, 1.4), ("fixed:2", K128): (2, 0.2, 0.4, 5.6),
    ("fixed:4", K32): (4, 0.5, 0.7, 2.0), ("fixed:4", K128): (4, 0.4, 0.6, 8.0),
    # n(L) = round(0.5 * log2(L / 512)): 3 at 32K, 4 at 128K
    ("schedule:a=0.5,n_max=8", K32): (3, 0.4, 0.6, 1.7), ("schedule:a=0.5,n_max=8", K128): (4, 0.5, 0.7, 8.0),
    ("off", M1): (0, 0.0, 0.0, 30.0),  # a length only one setting has: not in the mean over lengths
}


def _results(path: Path, case: dict = CASE) -> Path:
    cells = []
    for (setting, length), (passes, a0, a1, wall) in case.items():
        for depth, acc in ((0.0, a0), (1.0, a1)):
            cells.append({"task": "passkey", "length": length, "depth": depth, "n": 2, "accuracy": acc,
                          "tf_exact": acc, "wall_s": wall, "tf_wall_s": 0.1 * wall, "tokens_per_s": 2 * length / wall,
                          "consolidation_passes": passes, "consolidation": setting,
                          "sweep_kind": "consolidation", "sweep_value": setting})
    path.write_text(json.dumps({"meta": {}, "cells": cells, "summary": []}))
    return path


def test_points_schedule_and_cost(tmp_path):
    res = cons.main([str(_results(tmp_path / "r.json")), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert (out / "consolidation_passkey.png").stat().st_size > 1000
    with open(out / "consolidation_points.csv") as f:
        rows = {(r["setting"], r["length"]): r for r in csv.DictReader(f)}
    assert float(rows["fixed:2", str(K32)]["accuracy"]) == pytest.approx(0.4)  # mean over the two depths
    assert float(rows["schedule:a=0.5,n_max=8", str(K32)]["passes"]) == 3
    assert rows["schedule:a=0.5,n_max=8", str(K32)]["kind"] == "schedule" and rows["off", str(K32)]["kind"] == "fixed"
    # wall time: a cell's wall_s over its n samples, over two depths; cost against the 0-pass setting
    assert float(rows["fixed:4", str(K128)]["s_per_sample"]) == pytest.approx(16.0 / 4)
    assert float(rows["fixed:4", str(K128)]["decode_s_per_sample"]) == pytest.approx(0.9 * 16.0 / 4)
    assert float(rows["fixed:4", str(K128)]["cost_vs_0_passes"]) == pytest.approx(2.0)
    # the mean over lengths uses the lengths every setting has (not the 1M cell of `off`)
    mean_off = rows["off", "mean"]
    assert mean_off["lengths"] == "32K,128K" and float(mean_off["accuracy"]) == pytest.approx(0.15)
    assert float(rows["schedule:a=0.5,n_max=8", "mean"]["passes"]) == pytest.approx(3.5)
    # fixed mean curve: 0 -> 0.15, 1 -> 0.25, 2 -> 0.35, 4 -> 0.55; at 3.5 passes 0.5; the schedule has 0.55
    (svf,) = res["schedule_vs_fixed"]
    assert svf["fixed_value_at_passes"] == pytest.approx(0.5)
    assert svf["schedule_value"] == pytest.approx(0.55) and svf["delta"] == pytest.approx(0.05)
    with open(out / "schedule_vs_fixed.csv") as f:
        assert float(next(csv.DictReader(f))["delta"]) == pytest.approx(0.05)


def test_schedule_outside_the_fixed_range_has_no_delta(tmp_path):
    case = {k: v for k, v in CASE.items() if k[0] in ("off", "fixed:1", "schedule:a=0.5,n_max=8")}
    res = cons.main([str(_results(tmp_path / "r.json", case)), "--out", str(tmp_path / "out")])
    (svf,) = res["schedule_vs_fixed"]
    assert svf["mean_passes"] == pytest.approx(3.5) and svf["delta"] is None


def test_interpolate():
    assert cons.interpolate([0, 1, 4], [0.0, 1.0, 4.0], 2.5) == pytest.approx(2.5)
    assert cons.interpolate([0, 1], [0.2, 0.4], 1.0) == pytest.approx(0.4)
    assert cons.interpolate([0, 1], [0.2, 0.4], 1.5) is None


def test_bad_input_is_one_line(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="not found"):
        cons.main([str(tmp_path / "missing.json"), "--out", out])
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"cells": [{"task": "passkey", "length": 1024, "depth": 0.0, "accuracy": 1.0,
                                             "consolidation_passes": 0, "sweep_kind": "budget",
                                             "sweep_value": "dense"}]}))
    with pytest.raises(SystemExit, match="no consolidation cells"):
        cons.main([str(budget), "--out", out])
    weird = _results(tmp_path / "w.json", {("twice", K32): (2, 0.0, 0.0, 1.0)})
    with pytest.raises(SystemExit, match="cannot read consolidation setting 'twice'"):
        cons.main([str(weird), "--out", out])
    junk = tmp_path / "junk.json"
    junk.write_text("{")
    with pytest.raises(SystemExit, match="not a memsparse-eval results.json"):
        cons.main([str(junk), "--out", out])
