"""benchmarks/step_cost.py: steady ms a step from phase_times.json with RetrievalEval's seconds left out, and the
line a + b x tokens through the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from load_script import load_benchmark


def _mod():
    return load_benchmark("step_cost")


def _run(tmp_path, name, batch, seq_len, ms, evals=()):
    """A made-up run of 105 steps at `ms` a step after 5 first batches taking 10 s, plus RetrievalEval calls."""
    d = tmp_path / name
    d.mkdir()
    phase = {"global_step": 105, "start_step": 0, "first_batches_s": [6, 7, 8, 9, 10],
             "training_s": 10 + 100 * ms / 1000 + sum(evals)}
    (d / "phase_times.json").write_text(json.dumps(phase))
    (d / "train.log").write_text("".join(f"retrieval at step {i} ({s}s): passkey/1k/acc 0.50\n"
                                         for i, s in enumerate(evals)))
    (d / "recipe.yaml").write_text(f"data:\n  batch_size: {batch}\n  seq_len: {seq_len}\n")
    return [name, str(d / "phase_times.json"), str(d / "train.log"), str(d / "recipe.yaml")]


def test_steady_step_time_and_the_line_through_the_runs(tmp_path):
    mod = _mod()
    a = _run(tmp_path, "short", 16, 1000, ms=40.8, evals=(40.0, 2.5))  # 12 ms + 1.8 ms per 1K tokens
    b = _run(tmp_path, "long", 16, 4000, ms=127.2)
    doc = mod.main(["--run", *a, "--run", *b, "--name", "sc", "--out", str(tmp_path / "out")])
    short, long_ = doc["runs"]
    assert short["ms_per_step"] == pytest.approx(40.8) and short["retrieval_eval_s"] == pytest.approx(42.5)
    assert long_["ms_per_step"] == pytest.approx(127.2) and short["steps"] == 100
    assert doc["fit"]["ms_per_step"] == pytest.approx(12.0) and doc["fit"]["ms_per_1k_tokens"] == pytest.approx(1.8)
    assert "| short | 16 x 1000 | 100 | 42.5 | 40.8 |" in (tmp_path / "out" / "sc.md").read_text()


def test_a_run_without_steady_steps_is_one_line(tmp_path):
    mod = _mod()
    bad = _run(tmp_path, "bad", 2, 64, ms=10.0)
    phase = json.loads(Path(bad[1]).read_text())
    phase["global_step"] = 5
    Path(bad[1]).write_text(json.dumps(phase))
    with pytest.raises(SystemExit, match="run bad: too few steps"):
        mod.main(["--run", *bad, "--out", str(tmp_path)])
