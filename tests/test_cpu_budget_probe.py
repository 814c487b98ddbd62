"""benchmarks/cpu_budget_probe.py: its prompts, the kept-block measurement it matches budgets by, a tiny end-to-end
run and its files, and a bad budget spec as a one-line error with status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_script import load_benchmark

REPO = Path(__file__).resolve().parents[1]
bp = load_benchmark("cpu_budget_probe")


def test_a_prompt_holds_its_pairs_inside_blocks_and_asks_one_of_them():
    g = torch.Generator().manual_seed(3)
    for length in (64, 128):
        ids, answer, q = bp.sample(g, length, pairs=4)
        text = "".join(map(chr, ids))
        assert len(ids) == length and q == length - bp.BLOCK and text[q] == "="
        question = text[q - bp.BLOCK:q]
        name = question[1]
        assert question == "?" + name * (bp.BLOCK - 1) and name in bp.NAMES
        found = [i for i in range(q - bp.BLOCK) if text[i].isdigit()]
        assert len(found) == 4  # four pairs, four distinct names
        for i in found:
            assert text[i + 1] == "=" and text[i + 2] in bp.VALUES and text[i + 3] == ";"
            assert i // bp.BLOCK == (i + 3) // bp.BLOCK  # the pair does not straddle a block boundary
        asked = text.index(name + "=")
        assert chr(answer) == text[asked + 2] == text[q + 1]


def test_kept_blocks_are_measured_from_the_models_selection():
    """fixed:1 keeps the forced blocks only (sink + diagonal: at most 2 of the visible ones), dense every visible
    block: on the same prompts their means differ, and dense's is the exact count of visible blocks."""
    calib = bp.calibration_set([64, 128], 4, pairs=2, seed=0)
    dense = bp.kept(bp.build("dense", 0, 128), calib)
    one = bp.kept(bp.build("fixed:1", 0, 128), calib)
    # dense: a query block m of a prompt of N blocks sees the sink and blocks 0..m; mean 1 + (N + 1) / 2, weighted
    # by tokens over 64 (8 blocks) and 128 (16 blocks)
    assert dense["attn_kept_blocks"] == pytest.approx((1 * (1 + 4.5) + 2 * (1 + 8.5)) / 3)
    assert dense["attn_kept_fraction"] == pytest.approx(1.0)
    assert one["attn_kept_blocks"] <= 2.0 and one["attn_kept_blocks"] < dense["attn_kept_blocks"] / 3
    per = 4 * bp.BLOCK * 16 * 4 * 2  # block x head_dim x heads x layers x 4
    assert dense["attn_flops_per_token"] == pytest.approx(dense["attn_kept_blocks"] * per)
    assert dense["n"] == one["n"] == 8
    # without persistent tokens there is no sink block: fixed:1 keeps the diagonal block alone
    assert bp.kept(bp.build("fixed:1", 0, 128, persistent=0), calib)["attn_kept_blocks"] == pytest.approx(1.0)


def test_a_tiny_run_writes_its_files(tmp_path):
    res = bp.main(["--budgets", "fixed:2;dense", "--steps", "2", "--batch", "2", "--eval-every", "1",
                   "--train-lengths", "48,64", "--eval-lengths", "64,128", "--pairs", "2", "--samples", "3",
                   "--calib-samples", "2", "--threads", "1", "--out", str(tmp_path), "--name", "bp"])
    saved = json.loads((tmp_path / "bp.json").read_text())
    assert [r["budget"] for r in saved["runs"]] == ["fixed:2", "dense"]
    assert saved["config"]["memory_layers"] == [] and saved["config"]["window"] >= 128
    for r in saved["runs"]:
        assert [c["step"] for c in r["curve"]] == [1, 2]
        assert [e["length"] for e in r["eval"]] == [64, 128]
        assert all(e["n"] == 3 and 0.0 <= e["accuracy"] <= 1.0 for e in r["eval"])
        assert set(r["kept_before"]) >= {"attn_kept_blocks", "attn_kept_fraction", "attn_flops_per_token"}
    fixed, dense = saved["runs"]
    assert fixed["eval"][1]["attn_kept_blocks"] <= 2.0 < dense["eval"][1]["attn_kept_blocks"]
    assert set(saved["matching"]["before"]["relative"]) == {"fixed:2"}
    assert saved["matching"] == res["matching"]
    md = (tmp_path / "bp.md").read_text().splitlines()
    assert md[0] == "| budget | acc @ 64 (kept blocks) | acc @ 128 (kept blocks) |"
    assert md[2].startswith("| fixed:2 | ") and md[3].startswith("| dense | ")
    assert (tmp_path / "bp.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_prompts():
    a = bp.batch(torch.Generator().manual_seed(5), 3, 64, 2)
    b = bp.batch(torch.Generator().manual_seed(5), 3, 64, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_an_unknown_budget_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        bp.main(["--budgets", "fixed:4;sparse:3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'sparse:3'" in err[0] and "unknown budget policy" in err[0]
    with pytest.raises(SystemExit) as e:
        bp.main(["--eval-lengths", "100"])
    assert e.value.code == 2 and "multiples of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bp.main(["--persistent", "4"])
    assert e.value.code == 2 and "--persistent must be a multiple of 8" in capsys.readouterr().err
    # the script itself: status 2, one line, no traceback
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_budget_probe.py"), "--budgets",
                           "top_p:q=0.9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no argument 'q'" in proc.stderr


def test_sweep_scores_each_trained_model_under_other_budgets_for_the_pareto_plot(tmp_path):
    """--sweep: the dense-trained model scored under fixed:1 / fixed:3 on the eval prompts (kept blocks follow the
    budget; under dense its own eval again); <name>_sweep.json is a budget sweep plot_budget_pareto.py reads."""
    bp.main(["--budgets", "dense", "--sweep", "fixed:1;fixed:3;dense", "--steps", "2", "--batch", "2",
             "--train-lengths", "48,64", "--eval-lengths", "64,128", "--samples", "3", "--calib-samples", "2",
             "--threads", "1", "--out", str(tmp_path), "--name", "bp"])
    run = json.loads((tmp_path / "bp.json").read_text())["runs"][0]
    got = {(r["budget"], r["length"]): r for r in run["sweep"]}
    assert len(got) == 6
    for n in (64, 128):
        assert got["fixed:1", n]["attn_kept_blocks"] < got["fixed:3", n]["attn_kept_blocks"] <= 3.0
        assert got["dense", n]["accuracy"] == next(e["accuracy"] for e in run["eval"] if e["length"] == n)
    md = (tmp_path / "bp.md").read_text()
    assert "scored under other budgets" in md and "| fixed:1 | " in md
    sweep = tmp_path / "bp_sweep.json"
    pareto = load_benchmark("plot_budget_pareto")
    pts = pareto.points(pareto.load_cells([sweep]))
    assert {p["task"] for p in pts} == {"recall_trained_dense"} and len(pts) == 6
    assert {p["family"] for p in pts} == {"fixed", "dense"}
    with pytest.raises(SystemExit):
        bp.main(["--sweep", "fixed:2;sparse:3"])
