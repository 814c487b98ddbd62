"""benchmarks/run_budget_training.sh on CPU (SMOKE=1: a tiny model, 2 steps, a tiny eval grid): each budget is
trained, matched, evaluated, tabulated and packed; and benchmarks/budget_training.py's training cost is the one the
training logs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from load_script import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_budget_training.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
bt = load_benchmark("budget_training")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "NAME": "smoke",
         "WORK": str(tmp_path / "work"), "SMOKE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=e, capture_output=True, text=True, timeout=240)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_unknown_budget_or_bad_steps_is_refused_before_anything_runs(tmp_path):
    r = _run(tmp_path, BUDGETS="fixed nonsense")
    assert r.returncode == 2 and "unknown budget nonsense" in r.stdout
    r = _run(tmp_path, STEPS="ten")
    assert r.returncode == 2 and "STEPS must be a positive integer" in r.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow  # ~45 s (four CLI processes): the default run keeps the quick refusals above
def test_smoke_trains_matches_evaluates_and_tabulates_each_budget(tmp_path):
    budgets = ["top_p_fm0", "fixed"]
    r = _run(tmp_path, BUDGETS=" ".join(budgets))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "out" / "smoke"
    rows = _rows(d / "budget_training.csv")
    assert [row["budget"] for row in rows] == budgets  # one row per budget, in order
    assert rows[0]["spec"] == "top_p:p=0.8,min=2,max=16,forced_mass=0"
    # fixed was matched to top_p_fm0's logged training cost: its spec is the match's, within 10% on the rows
    match = json.loads((d / "fixed" / "match.json").read_text())
    assert rows[1]["spec"] == match["spec"] == (d / "fixed" / "budget.txt").read_text().strip()
    assert match["spec"].startswith("fixed:") and abs(match["relative"]) <= 0.10
    assert match["target_kept_blocks"] == pytest.approx(bt.logged_mean(d / "top_p_fm0" / "metrics_top_p_fm0.csv"))
    for row in rows:
        assert float(row["train_kept_blocks"]) > 0 and float(row["train_attn_flops_per_token"]) > 0
        assert float(row["eval_attn_flops_per_token"]) > 0
        assert row["passkey@256"] != "" and row["passkey@512"] != ""
    assert float(rows[0]["train_vs_reference"]) == 0.0
    cells = _rows(d / "budget_training_cells.csv")
    assert len(cells) == 2 * 2 * 2  # budgets x lengths x depths
    assert "| fixed | `fixed:" in (d / "budget_training.md").read_text()
    assert (d / "pareto" / "pareto_points.csv").is_file() and (d / "runs.md").is_file()
    log = (d / "steps.log").read_text()
    assert log.count("train: exit 0") == 2 and log.count("eval: exit 0") == 2 and "matched to top_p_fm0" in log
    assert "done after" in log
    with tarfile.open(tmp_path / "out" / "smoke.tgz") as t:
        names = set(t.getnames())
    assert {"smoke/budget_training.csv", "smoke/fixed/eval/results.json", "smoke/steps.log"} <= names
    assert not any("checkpoints" in n for n in names)  # the runs' checkpoints stay in WORK
    assert (tmp_path / "work" / "budget_training_fixed" / "export" / "config.json").is_file()


@pytest.mark.slow  # ~40 s: all four default budgets, evaluated one after the other
def test_smoke_default_budgets(tmp_path):
    r = _run(tmp_path, EVAL_PARALLEL="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rows(tmp_path / "out" / "smoke" / "budget_training.csv")
    assert [row["budget"] for row in rows] == ["top_p_fm0", "fixed", "length_scaled", "top_p"]
    assert rows[2]["spec"].startswith("length_scaled:c=") and rows[3]["spec"] == "top_p:p=0.8,min=2,max=16"


# The geometry and mixture of recipes/ablation_retrieval_no_memory_copy.yaml when its committed H100 run trained
# (benchmarks/results/retrieval_no_memory_ablation_h100_2026-12-06/): window 512, segment 256, blocks of 64, one
# sink block, rows of 1,024 holding one 256-512-token sample each.
STAGE1 = {
    "model": {"config": {"block_size": 64, "segment": 256, "window": 512, "persistent_tokens": 64,
                         "local_blocks": 1, "heads": 8, "head_dim": 64, "depth": 8}},
    "data": {"seq_len": 1024, "synthetic": [
        {"task": "passkey", "proportion": 0.5, "lengths": [256, 320, 384, 448, 512]},
        {"task": "niah_single", "proportion": 0.25, "lengths": [320, 384, 448, 512]},
        {"task": "niah_multikey", "proportion": 0.25, "lengths": [384, 448, 512]}]},
}


def test_computed_training_cost_is_the_logged_one():
    """The matching's kept blocks for a score-free budget equal what the training logged (train/attn_kept_blocks)."""
    logged = bt.logged_mean(REPO / "benchmarks" / "results" / "retrieval_no_memory_ablation_h100_2026-12-06" /
                            "metrics_ablation_retrieval_no_memory_copy.csv")
    assert bt.training_kept(STAGE1, "length_scaled:c=12,min_tokens=512") == pytest.approx(logged, rel=2e-3)
    assert bt.attention_flops_per_block(STAGE1) == 4 * 64 * 64 * 8 * 8


def test_match_finds_the_nearest_fixed_and_length_scaled_budget():
    target = bt.training_kept(STAGE1, "fixed:5")
    spec, got = bt.match(STAGE1, "fixed", target)
    assert spec == "fixed:5" and got == pytest.approx(target)
    spec, got = bt.match(STAGE1, "length_scaled", target)
    assert spec.startswith("length_scaled:c=") and spec.endswith(",min_tokens=128") and abs(got / target - 1) < 0.03
    with pytest.raises(SystemExit, match="learned scores"):
        bt.training_kept(STAGE1, "top_p:p=0.8")
    with pytest.raises(SystemExit, match="packed text"):
        bt.training_kept({"data": {"synthetic": [{"task": "passkey", "proportion": 0.5}]}}, "fixed:5")


@pytest.mark.slow  # ~10 s: one budget trained, the next skipped by the deadline
def test_a_budget_that_would_pass_the_deadline_is_skipped(tmp_path):
    r = _run(tmp_path, BUDGETS="fixed dense", DEADLINE_S="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "out" / "smoke"
    assert "dense: skipped" in (d / "steps.log").read_text()
    assert [row["budget"] for row in _rows(d / "budget_training.csv")] == ["fixed"]
    assert "not matched to a measured cost" in (d / "steps.log").read_text()  # no top_p_fm0 before it


def _leaves(d: dict, prefix: str = "") -> set[str]:
    return {k for key, v in d.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                 else {f"{prefix}{key}"})}


def test_budget_overlays_change_only_the_budget_and_the_run_directory():
    """Every model of the comparison trains the same recipe: its overlay sets model.config.budget and its own
    trainer.default_root_dir, nothing else; the shared overlay widens the window and drops the memory."""
    overlays = sorted((REPO / "recipes" / "overlays").glob("budget_training_*.yaml"))
    names = {p.stem.removeprefix("budget_training_") for p in overlays} - {"cpu_smoke"}
    assert names >= {"fixed", "length_scaled", "top_p", "top_p_fm0", "dense"}
    for name in names:
        ov = bt.load_recipe([str(REPO / "recipes" / "overlays" / f"budget_training_{name}.yaml")])
        assert _leaves(ov) == {"trainer.default_root_dir", "model.config.budget"}, name
        assert ov["trainer"]["default_root_dir"] == f"outputs/budget_training_{name}"
    base = bt.load_recipe([str(REPO / "recipes" / p) for p in (
        "ablation_retrieval_no_memory_copy.yaml", "overlays/budget_training.yaml")])
    mc = base["model"]["config"]
    assert mc["memory_layers"] == [] and mc["window"] == 2048 and base["data"]["seq_len"] == 2048
    seq_len, parts = bt.mixture(base)
    assert all(n <= mc["window"] for _, lengths in parts for n in lengths)  # every needle inside the window
    smoke = bt.load_recipe([str(REPO / "recipes" / "overlays" / "budget_training_cpu_smoke.yaml")])
    assert "budget" not in smoke["model"]["config"]
