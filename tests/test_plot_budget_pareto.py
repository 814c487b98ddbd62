"""benchmarks/plot_budget_pareto.py: depth means, each family's Pareto front, the matched-FLOPs winner rule on a
hand-built case whose answer is known, and bad input as one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from load_script import load_benchmark

pareto = load_benchmark("plot_budget_pareto")

# (length, setting): per depth (0.0, 1.0) a (flops, accuracy) pair
CASE = {
    (1024, "dense"): [(10.0, 1.0), (10.0, 1.0)],
    (1024, "fixed:2"): [(2.0, 0.2), (2.0, 0.2)],
    (1024, "fixed:4"): [(4.0, 0.4), (4.0, 0.6)],          # mean 0.5
    (1024, "fixed:6"): [(6.0, 0.4), (6.0, 0.4)],          # dominated by fixed:4
    (1024, "top_p:p=0.5"): [(2.9, 0.6), (3.1, 0.6)],      # mean FLOPs 3.0
    (1024, "top_p:p=0.9"): [(8.0, 0.9), (8.0, 0.9)],
    (1024, "length_scaled:c=8,min_tokens=0"): [(4.3, 0.5), (4.3, 0.6)],  # 4.3 is within 10 % of 4; mean 0.55
    (4096, "dense"): [(10.0, 0.8), (10.0, 0.8)],
    (4096, "fixed:2"): [(2.0, 0.8), (2.0, 0.8)],
    (4096, "top_p:p=0.5"): [(3.0, 0.5), (3.0, 0.5)],
}


def _results(path: Path, case: dict = CASE, extra: list | None = None) -> Path:
    cells = []
    for (length, setting), per_depth in case.items():
        for depth, (flops, acc) in zip((0.0, 1.0), per_depth):
            cells.append({"task": "passkey", "length": length, "depth": depth, "n": 2, "accuracy": acc,
                          "tf_exact": acc, "attn_flops_per_token": flops,
                          "attn_kept_fraction": None if flops is None else flops / 10,
                          "sweep_kind": "budget", "sweep_value": setting, "budget": setting})
    cells += extra or []
    path.write_text(json.dumps({"meta": {}, "cells": cells, "summary": []}))
    return path


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_points_fronts_and_winners(tmp_path):
    other = [{"task": "passkey", "length": 1024, "depth": 0.0, "n": 1, "accuracy": 0.0, "attn_flops_per_token": 1.0,
              "sweep_kind": "consolidation", "sweep_value": "fixed:1", "budget": "dense"}]  # another sweep: ignored
    res = pareto.main([str(_results(tmp_path / "r.json", extra=other)), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert (out / "pareto_passkey.png").stat().st_size > 1000
    pts = {(int(r["length"]), r["setting"]): r for r in _rows(out / "pareto_points.csv")}
    assert len(pts) == len(CASE)
    assert float(pts[1024, "fixed:4"]["accuracy"]) == pytest.approx(0.5)
    assert float(pts[1024, "top_p:p=0.5"]["flops"]) == pytest.approx(3.0)
    assert pts[1024, "top_p:p=0.5"]["family"] == "top_p"
    assert int(pts[1024, "dense"]["samples"]) == 4 and int(pts[1024, "dense"]["depths"]) == 2
    front = {s for (n, s), r in pts.items() if n == 1024 and s.startswith("fixed") and r["on_front"] == "True"}
    assert front == {"fixed:2", "fixed:4"}  # fixed:6 costs more for less

    by_budget = {(r["length"], round(r["budget_flops"], 6)): r for r in res["budgets"]}
    expect_1k = {2.0: "fixed", 3.0: "top_p", 4.0: "top_p", 4.3: "top_p", 6.0: "top_p", 8.0: "top_p", 10.0: "dense"}
    assert {b: r["winners"] for (n, b), r in by_budget.items() if n == 1024} == expect_1k
    assert by_budget[1024, 4.0]["length_scaled_best"] == pytest.approx(0.55)  # 4.3 <= 4 * 1.1: it runs at 4
    assert by_budget[1024, 2.0]["top_p_best"] is None  # its cheapest point costs 3 > 2.2: cannot run at 2
    summary = {s["length"]: s for s in res["summary"]}
    s1 = summary[1024]
    assert (s1["top_p_won"], s1["top_p_eligible"]) == (5, 6)
    assert (s1["fixed_won"], s1["fixed_eligible"]) == (1, 7)
    assert (s1["length_scaled_won"], s1["length_scaled_eligible"]) == (0, 5)
    assert (s1["dense_won"], s1["dense_eligible"]) == (1, 1)
    assert s1["winner"] == "top_p"
    s4 = summary[4096]  # fixed:2 as good as dense at a fifth of the FLOPs; dense ties at its own budget
    assert (s4["fixed_won"], s4["dense_won"], s4["top_p_won"]) == (3, 1, 0) and s4["winner"] == "fixed"
    assert by_budget[4096, 10.0]["winners"] == "dense+fixed"
    md = (out / "pareto_wins.md").read_text()
    assert "| passkey | 1K | 1/1 | 1/7 | 0/5 | 5/6 | top_p |" in md
    wins_csv = _rows(out / "pareto_wins.csv")
    assert len(wins_csv) == 7 + 3


def test_tolerances_change_the_matching(tmp_path):
    r = _results(tmp_path / "r.json")
    strict = pareto.main([str(r), "--out", str(tmp_path / "a"), "--tol", "0"])
    s = {x["length"]: x for x in strict["summary"]}[1024]
    assert s["length_scaled_eligible"] == 4  # 4.3 no longer counts as budget 4
    loose = pareto.main([str(r), "--out", str(tmp_path / "b"), "--acc-tol", "0.06"])
    b = {(x["length"], x["budget_flops"]): x for x in loose["budgets"]}
    assert b[1024, 4.0]["winners"] == "length_scaled+top_p"  # 0.55 within 0.06 of 0.6


def test_later_files_replace_cells_and_cells_outside_a_sweep_count(tmp_path):
    a = _results(tmp_path / "a.json")
    own = [{"task": "passkey", "length": 1024, "depth": d, "n": 1, "accuracy": 0.7, "attn_flops_per_token": 5.0,
            "sweep_kind": None, "sweep_value": None, "budget": "length_scaled:c=12,min_tokens=512"} for d in (0.0, 1.0)]
    b = _results(tmp_path / "b.json", {(1024, "top_p:p=0.9"): [(8.0, 0.1), (8.0, 0.1)]}, extra=own)
    res = pareto.main([str(a), str(b), "--out", str(tmp_path / "out")])
    pts = {(p["length"], p["setting"]): p for p in res["points"]}
    assert pts[1024, "top_p:p=0.9"]["accuracy"] == pytest.approx(0.1)
    assert pts[1024, "length_scaled:c=12,min_tokens=512"]["family"] == "length_scaled"


def test_a_panel_where_nothing_is_retrieved_has_no_winner(tmp_path):
    """Every setting at 0 (a model that retrieves nothing): no budget is won, the winner is "tie", not the family
    with the most settings."""
    zeros = {(1024, s): [(f, 0.0), (f, 0.0)] for s, f in
             (("dense", 10.0), ("fixed:2", 2.0), ("fixed:4", 4.0), ("top_p:p=0.5", 3.0), ("top_p:p=0.9", 8.0))}
    res = pareto.main([str(_results(tmp_path / "r.json", zeros)), "--out", str(tmp_path / "out")])
    (s,) = res["summary"]
    assert s["winner"] == "tie" and s["fixed_won"] == s["top_p_won"] == s["dense_won"] == 0
    assert s["fixed_eligible"] == 5


def test_pareto_front_unit():
    pts = [{"flops": f, "value": v, "setting": str(i)} for i, (f, v) in
           enumerate([(1, 0.1), (2, 0.5), (2, 0.4), (3, 0.5), (4, 0.9), (4, 0.9)])]
    assert [(p["flops"], p["value"]) for p in pareto.pareto_front(pts)] == [(1, 0.1), (2, 0.5), (4, 0.9)]


def test_bad_input_is_one_line(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="not found"):
        pareto.main([str(tmp_path / "missing.json"), "--out", out])
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(SystemExit, match="not a memsparse-eval results.json"):
        pareto.main([str(junk), "--out", out])
    cons = tmp_path / "cons.json"
    cons.write_text(json.dumps({"cells": [{"task": "passkey", "length": 1024, "depth": 0.0, "accuracy": 1.0,
                                           "sweep_kind": "consolidation", "sweep_value": "off"}]}))
    with pytest.raises(SystemExit, match="no budget cells"):
        pareto.main([str(cons), "--out", out])
    bad = _results(tmp_path / "bad.json", {(1024, "sometimes:3"): [(1.0, 1.0), (1.0, 1.0)]})
    with pytest.raises(SystemExit, match="cannot read budget setting 'sometimes:3'"):
        pareto.main([str(bad), "--out", out])
    noflops = _results(tmp_path / "nf.json", {(1024, "dense"): [(None, 1.0), (None, 1.0)]})
    with pytest.raises(SystemExit, match="attn_flops_per_token"):
        pareto.main([str(noflops), "--out", out])
