"""benchmarks/run_claims.sh on a tiny random checkpoint on CPU: the steps run, log, pack and report failure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from load_script import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_claims.sh"
kept = load_benchmark("kept_budget_vs_length")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model, tok = kept.tiny_model(0)
    model.save_pretrained(d)
    tok.save(d)
    return d


def _run(tmp_path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "NAME": "smoke",
         "OMP_NUM_THREADS": "1", "EVAL_ARGS": "--device cpu --threads 1", "KEPT_ARGS": "--device cpu --threads 1",
         **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def test_needs_a_checkpoint_and_known_claims(tmp_path, ckpt):
    r = _run(tmp_path, CK="")
    assert r.returncode != 0 and "set CK" in r.stderr
    r = _run(tmp_path, CK=str(ckpt), CLAIMS="everything")
    assert r.returncode == 2 and "unknown claim everything" in r.stdout


def test_kept_claim_runs_logs_and_packs(tmp_path, ckpt):
    r = _run(tmp_path, CK=str(ckpt), CLAIMS="kept", KEPT_BUDGETS="top_p:p=0.5", KEPT_LENGTHS="256,512")
    assert r.returncode == 0, r.stdout + r.stderr
    d = tmp_path / "out" / "smoke"
    data = json.loads((d / "kept" / "kept_budget.json").read_text())
    assert data["meta"]["budgets"] == ["top_p:p=0.5"] and data["meta"]["window_mode"] == "full"
    assert "kept: exit 0" in (d / "steps.log").read_text()
    with tarfile.open(tmp_path / "out" / "smoke.tgz") as t:
        assert "smoke/kept/kept_budget.json" in t.getnames()


def test_a_failing_step_fails_the_run(tmp_path, ckpt):
    r = _run(tmp_path, CK=str(ckpt), CLAIMS="kept", KEPT_LENGTHS="100")  # not a multiple of the segment
    assert r.returncode == 1 and "multiples of the segment" in r.stdout


@pytest.mark.slow  # ~45 s on one CPU core: every claim, two evals and the plots
def test_all_claims_smoke(tmp_path, ckpt):
    r = _run(tmp_path, CK=str(ckpt), BUDGET_TASKS="passkey", BUDGET_LENGTHS="256,512", BUDGET_DEPTHS="0.5",
             BUDGET_SPECS="dense;fixed:2;length_scaled:c=4,min_tokens=16;top_p:p=0.5", KEPT_BUDGETS="top_p:p=0.5",
             KEPT_LENGTHS="256,512", CONS_TASKS="passkey", CONS_LENGTHS="256,512", CONS_DEPTHS="0.5",
             CONS_SPECS="off;fixed:1;schedule:a=0.5,n_max=2")
    assert r.returncode == 0, r.stdout + r.stderr
    d = tmp_path / "out" / "smoke"
    with open(d / "pareto" / "pareto_points.csv") as f:
        fams = {row["family"] for row in csv.DictReader(f)}
    assert fams == {"dense", "fixed", "length_scaled", "top_p"}
    assert (d / "pareto" / "pareto_passkey.png").is_file() and (d / "pareto" / "pareto_wins.md").is_file()
    assert (d / "kept" / "kept_budget.json").is_file()
    with open(d / "consolidation" / "consolidation_points.csv") as f:
        passes = {(row["setting"], row["length"]): float(row["passes"]) for row in csv.DictReader(f)}
    assert passes["schedule:a=0.5,n_max=2", "256"] == 1 and passes["schedule:a=0.5,n_max=2", "512"] == 2  # window 64
    assert (d / "consolidation" / "consolidation_passkey.png").is_file()
    log = (d / "steps.log").read_text()
    assert log.count("exit 0 after") == 5 and "done (exit 0)" in log
