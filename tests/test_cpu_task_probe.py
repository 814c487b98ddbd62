"""benchmarks/cpu_task_probe.py: a short run through the training data path and memsparse-eval's decoding writes
its curve, table and plot; settings that cannot work are one-line errors."""

from __future__ import annotations

import json

import pytest
from load_script import load_benchmark

tp = load_benchmark("cpu_task_probe")
TINY = ["--task", "passkey", "--tokenizer", "byte", "--lengths", "256", "--steps", "2", "--eval-every", "1",
        "--eval-samples", "1", "--eval-depths", "0.5", "--dim", "32", "--depth", "2", "--heads", "2", "--batch", "2",
        "--threads", "1"]


def test_a_short_run_writes_its_curve_table_and_plot(tmp_path):
    res = tp.main(TINY + ["--out", str(tmp_path)])
    assert [r["step"] for r in res["curve"]] == [1, 2]
    cell = res["curve"][-1]["eval"]["256"]
    assert 0.0 <= cell["accuracy"] <= 1.0 and 0.0 <= cell["tf_token_acc"] <= 1.0
    assert json.loads((tmp_path / "task_probe.json").read_text())["curve"] == res["curve"]
    assert "| 2 |" in (tmp_path / "task_probe.md").read_text()
    assert (tmp_path / "task_probe.png").stat().st_size > 1000


def test_the_rows_are_the_training_path_s_answer_only_rows(monkeypatch):
    seen = []
    real = tp.MemSparseLM.forward
    monkeypatch.setattr(tp.MemSparseLM, "forward", lambda self, ids, labels=None, **k: (
        seen.append(labels) if labels is not None and self.training else None) or real(self, ids, labels, **k))
    tp.main(TINY)
    labels = seen[0]
    assert labels.shape == (2, 256)
    assert all(0 < int((row != -100).sum()) <= 9 for row in labels)  # a 5-digit key, its eos: nothing else


def test_distractors_give_niah_multikey_that_many_other_needles():
    import argparse

    task = tp.make_task(argparse.Namespace(task="niah_multikey", distractors=1))
    sample = task.generate(512, 0.5, 0, tp.load_tokenizer("byte"))
    assert task.num_distractors == 1 and len(sample.meta["values"]) == len(sample.meta["needle_texts"]) == 2
    assert tp.make_task(argparse.Namespace(task="niah_multikey", distractors=None)).num_distractors == 3


def test_first_trains_the_first_steps_on_another_task_and_scores_both(monkeypatch, tmp_path):
    """--first TASK:STEPS: the first STEPS batches are TASK's rows (the labelled answers are its values), the rest
    --task's; every evaluation scores both tasks, and the table and plot show both."""
    seen = []
    real = tp.MemSparseLM.forward
    monkeypatch.setattr(tp.MemSparseLM, "forward", lambda self, ids, labels=None, **k: (
        seen.append(int((labels != -100).sum(-1).max())) if labels is not None and self.training else None) or
        real(self, ids, labels, **k))
    argv = TINY[:]
    argv[argv.index("--steps") + 1] = "3"
    res = tp.main(argv + ["--first", "niah_multikey_pair:2", "--lengths", "480", "--out", str(tmp_path)])
    assert seen == [9, 9, 7]  # " 1234567" + eos (byte tokens) twice, then a passkey " 12345" + eos
    assert [sorted(r) for r in res["curve"]] == [["eval", "eval_first", "loss", "step", "wall_s"]] * 3
    assert "niah_multikey_pair 480: exact / tf_token_acc" in (tmp_path / "task_probe.md").read_text()


@pytest.mark.parametrize("argv, message", [(["--distractors", "1"], "--distractors needs --task niah_multikey"),
                                           (["--lengths", "600"], "must be given and <= --window (512)"),
                                           (["--task", "nope"], "nope"),
                                           (["--dim", "30"], "--dim (30) must be a multiple of 2 x --heads (2)"),
                                           (["--lengths", "2x"], "--lengths must be comma-separated integers"),
                                           (["--lengths", "64"], "too short"),
                                           (["--eval-depths", "0.5,2"], "depth '2' is outside [0, 1]"),
                                           (["--first", "niah_single:5"], "0 < STEPS < --steps (2)"),
                                           (["--first", "nope:1"], "nope")])
def test_bad_settings_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        tp.main(TINY + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
