"""benchmarks/retrieval_by_step.py: RetrievalEval's cells.jsonl counted per step, beyond / inside the window."""

from __future__ import annotations

import json

from load_script import load_benchmark

rbs = load_benchmark("retrieval_by_step")


def _cell(step, length, distance, scores, tf):
    return {"task": "passkey", "length": length, "depth": 0.0, "window": 512, "step": step,
            "accuracy": sum(scores) / len(scores), "tf_stop": 1.0,
            "samples": [{"answer": str(100 + i), "prediction": " x", "score": s, "tf_exact": t,
                         "tf_token_acc": 0.5 + t / 2, "needle_distances": [distance]}
                        for i, (s, t) in enumerate(zip(scores, tf))]}


def test_counts_per_step(tmp_path, capsys):
    p = tmp_path / "cells.jsonl"
    rows = [_cell(10, 1024, 900, [0.0, 0.0], [0.0, 1.0]), _cell(10, 2048, 100, [1.0, 0.0], [1.0, 0.0]),
            _cell(20, 1024, 900, [1.0, 1.0], [1.0, 1.0]), _cell(20, 2048, 100, [1.0, 1.0], [1.0, 1.0])]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert rbs.main([f"a={p}", "--name", "t", "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "t.json").read_text())["runs"]["a"]
    assert [r["step"] for r in got] == [10, 20]
    first = got[0]
    assert (first["beyond"], first["tf_beyond"], first["beyond_n"]) == (0, 1, 2)
    assert (first["inside"], first["tf_inside"], first["inside_n"]) == (1, 1, 2)
    assert first["acc_1024"] == 0.0 and first["acc_2048"] == 0.5
    assert first["tf_token_acc"] == 0.75 and got[1]["tf_token_acc"] == 1.0
    assert got[1]["beyond"] == 2 and got[1]["inside"] == 2
    assert (tmp_path / "o" / "t.png").stat().st_size > 0
    assert "| a | 10 | 0.00 | 0.50 | 0 / 1 of 2 | 1 / 1 of 2 | 0.75 | 1.00 |" in capsys.readouterr().out


def test_other_tasks_get_their_own_accuracy_columns_and_leave_the_passkey_counts(tmp_path, capsys):
    """A grid with niah_multikey beside passkey: one accuracy column per task and length (mean over depths), and
    the passkey counts, accuracies and tf figures unchanged by the other task's cells."""
    pk = _cell(10, 512, 100, [1.0, 0.0], [1.0, 0.0])
    mk = [{**_cell(10, 512, 100, [0.0, 0.0], [0.0, 0.0]), "task": "niah_multikey", "depth": d, "accuracy": a,
           "tf_stop": 0.0} for d, a in ((0.0, 0.5), (1.0, 0.0))]
    p = tmp_path / "cells.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [pk, *mk]) + "\n")
    assert rbs.main([f"a={p}", "--name", "t", "--out", str(tmp_path / "o")]) == 0
    (row,) = json.loads((tmp_path / "o" / "t.json").read_text())["runs"]["a"]
    assert row["tasks"] == {"niah_multikey 512": 0.25}
    assert (row["inside"], row["inside_n"], row["acc_512"], row["tf_stop"]) == (1, 2, 0.5, 1.0)
    out = capsys.readouterr().out
    assert "| run | step | acc 512 | niah_multikey 512 acc |" in out and "| a | 10 | 0.50 | 0.25 | 0 / 0 of 0 |" in out


def test_bad_input_is_one_line(tmp_path, capsys):
    assert rbs.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "NAME=cells.jsonl" in capsys.readouterr().err
    p = tmp_path / "x.jsonl"
    p.write_text('{"task": "passkey"}\n')
    assert rbs.main([f"a={p}", "--out", str(tmp_path)]) == 2
    assert "not RetrievalEval cells" in capsys.readouterr().err


def test_writes_off_cells_are_counted_apart(tmp_path, capsys):
    """RetrievalEval's no_writes pass: its cells never enter the writes-on counts; they get their own columns."""
    on = _cell(10, 1024, 900, [1.0, 1.0], [1.0, 1.0])
    off = {**_cell(10, 1024, 900, [0.0, 1.0], [0.0, 1.0]), "memory_writes": False}
    p = tmp_path / "cells.jsonl"
    p.write_text(json.dumps(on) + "\n" + json.dumps(off) + "\n")
    assert rbs.main([f"a={p}", "--name", "t", "--out", str(tmp_path / "o")]) == 0
    (row,) = json.loads((tmp_path / "o" / "t.json").read_text())["runs"]["a"]
    assert (row["beyond"], row["beyond_n"], row["acc_1024"]) == (2, 2, 1.0)
    assert (row["beyond_no_writes"], row["inside_no_writes"]) == (1, 0)
    assert "| 1 / 0 |" in capsys.readouterr().out


def test_memory_gate(tmp_path, capsys):
    """--memory-gate N: exit 3 when the memory adds fewer than N keys past the window at the last writes-off step;
    2 when there is no writes-off pass to read."""
    on = _cell(10, 1024, 900, [1.0, 1.0], [1.0, 1.0])
    off = {**_cell(10, 1024, 900, [0.0, 1.0], [0.0, 1.0]), "memory_writes": False}
    p = tmp_path / "cells.jsonl"
    p.write_text(json.dumps(on) + "\n" + json.dumps(off) + "\n")
    args = [f"a={p}", "--name", "t", "--out", str(tmp_path / "o"), "--memory-gate"]
    assert rbs.main([*args, "1"]) == 0  # 2 found with the writes, 1 without: the memory carries 1
    assert rbs.main([*args, "2"]) == 3
    assert "the memory carries 1 keys past the window (2 found with its writes, 1 without)" in capsys.readouterr().err
    p.write_text(json.dumps(on) + "\n")
    assert rbs.main([*args, "1"]) == 2
    assert "no writes-off evaluation" in capsys.readouterr().err


def test_copy_check(tmp_path, capsys):
    """--copy-check: exit 4 when the last step decodes no key inside the window, 0 once one is decoded."""
    p = tmp_path / "cells.jsonl"
    p.write_text(json.dumps(_cell(900, 256, 100, [0.0, 0.0], [0.0, 1.0])) + "\n")
    args = [f"a={p}", "--name", "t", "--out", str(tmp_path / "o"), "--copy-check"]
    assert rbs.main(args) == 4
    assert "no key inside the window decoded (0 of 2; teacher-forced 1)" in capsys.readouterr().err
    assert (tmp_path / "o" / "t.md").is_file()  # the outputs are written before the check
    p.write_text(json.dumps(_cell(900, 256, 100, [0.0, 0.0], [0.0, 0.0])) + "\n"
                 + json.dumps(_cell(1200, 256, 100, [1.0, 0.0], [1.0, 0.0])) + "\n")
    assert rbs.main(args) == 0
