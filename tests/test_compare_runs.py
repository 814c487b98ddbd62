"""benchmarks/compare_runs.py: the multi-GPU comparison (scaling, loss agreement) from CSVLogger metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from load_script import load_benchmark


@pytest.fixture(scope="module")
def cr():
    return load_benchmark("compare_runs", register=True)  # plot_train_run imports it by this name


def _metrics(path: Path, rates: list[float], val: dict[int, float], mem: float = 3.0) -> Path:
    """A CSVLogger-shaped metrics.csv: one train row per step, validation rows apart, empty cells elsewhere."""
    keys = ["epoch", "step", "train/loss", "train/tokens_per_s", "train/peak_mem_gib", "val/loss"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for step, rate in enumerate(rates):
            w.writerow({"epoch": 0, "step": step, "train/loss": 5.0 - 0.01 * step, "train/tokens_per_s": rate,
                        "train/peak_mem_gib": mem})
            if step in val:
                w.writerow({"epoch": 0, "step": step, "val/loss": val[step]})
    return path


def test_scaling_uses_steady_medians_and_val_gap_uses_common_steps(cr, tmp_path):
    # the first fifth (compilation) is slow in both runs and must not count
    base = _metrics(tmp_path / "a.csv", [1.0] * 4 + [100.0] * 8 + [200.0] * 8, {9: 4.0, 19: 3.0})
    two = _metrics(tmp_path / "b.csv", [1.0] * 4 + [190.0] * 8 + [380.0] * 8, {9: 4.1, 19: 2.95, 15: 9.9}, mem=2.0)
    res = cr.main([f"one={base}", f"two={two}", "--name", "cmp", "--out", str(tmp_path / "out"), "--device", "x"])
    assert res["runs"]["one"]["tokens_per_s_median"] == 150.0  # all 20 rates: 100
    assert res["comparison"]["two"]["scaling"] == pytest.approx(1.9)
    assert res["comparison"]["two"]["val_steps_compared"] == [9, 19]          # step 15 only in one run
    assert res["comparison"]["two"]["max_val_loss_gap"] == pytest.approx(0.1)
    assert res["runs"]["two"]["peak_mem_gib"] == 2.0
    saved = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert saved["baseline"] == "one" and saved["comparison"]["one"]["scaling"] == 1.0
    assert "| two | 285 | 1.90x |" in (tmp_path / "out" / "cmp.md").read_text()
    assert (tmp_path / "out" / "cmp_loss.png").stat().st_size > 1000


def test_bad_input_is_a_clear_error(cr, tmp_path):
    good = _metrics(tmp_path / "a.csv", [1.0] * 5, {})
    with pytest.raises(SystemExit):
        cr.main([str(good), "--name", "x", "--out", str(tmp_path)])                 # no LABEL=
    with pytest.raises(SystemExit):
        cr.main([f"a={good}", f"a={good}", "--name", "x", "--out", str(tmp_path)])  # label twice
    with pytest.raises(ValueError, match="baseline 'zz'"):
        cr.main([f"a={good}", "--baseline", "zz", "--name", "x", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        cr.main([f"a={tmp_path / 'missing.csv'}", "--name", "x", "--out", str(tmp_path)])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="not a CSVLogger metrics file"):
        cr.main([f"a={tmp_path / 'empty.csv'}", "--name", "x", "--out", str(tmp_path)])


def test_plot_train_run_summary_comes_from_the_same_reader(cr, tmp_path):
    ptr = load_benchmark("plot_train_run")
    m = _metrics(tmp_path / "a.csv", [1.0] * 2 + [50.0] * 8, {5: 4.5})
    ptr.main([str(m), "--name", "one", "--out", str(tmp_path / "o")])
    got = json.loads((tmp_path / "o" / "one.json").read_text())
    assert got["tokens_per_s_median"] == 50.0 and got["val_loss"] == [[5, 4.5]] and got["steps_logged"] == 10


def test_metric_is_plotted_and_recorded_per_run_and_a_missing_one_is_an_error(cr, tmp_path, capsys):
    a = _metrics(tmp_path / "a.csv", [1.0] * 10, {4: 3.0, 9: 2.0})
    b = _metrics(tmp_path / "b.csv", [1.0] * 10, {9: 2.5})
    res = cr.main([f"a={a}", f"b={b}", "--name", "m", "--out", str(tmp_path / "o"), "--metric", "val/loss"])
    assert res["metrics"]["val/loss"] == {"a": [(4, 3.0), (9, 2.0)], "b": [(9, 2.5)]}
    assert (tmp_path / "o" / "m_val_loss.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        cr.main([f"a={a}", "--name", "m", "--out", str(tmp_path / "o"), "--metric", "val/answer_token_acc"])
    assert "not logged by run(s) a" in capsys.readouterr().err


def test_plot_train_run_plots_answer_accuracy_with_and_without_memory_writes(cr, tmp_path):
    ptr = load_benchmark("plot_train_run")
    keys = ["epoch", "step", "train/loss", "val/loss", "val/answer_token_acc/passkey",
            "val/no_writes/answer_token_acc/passkey"]
    m = tmp_path / "m.csv"
    with m.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for step in range(6):
            w.writerow({"epoch": 0, "step": step, "train/loss": 3.0})
        w.writerow({"epoch": 0, "step": 5, "val/loss": 2.0, "val/answer_token_acc/passkey": 0.8,
                    "val/no_writes/answer_token_acc/passkey": 0.3})
    ptr.main([str(m), "--name", "r", "--out", str(tmp_path / "o")])
    got = json.loads((tmp_path / "o" / "r.json").read_text())["answer_token_acc"]
    assert got == {"val/answer_token_acc/passkey": [[5, 0.8]], "val/no_writes/answer_token_acc/passkey": [[5, 0.3]]}
    assert (tmp_path / "o" / "r_loss.png").stat().st_size > 1000
