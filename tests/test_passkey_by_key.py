"""benchmarks/passkey_by_key.py: hits counted per key and length, depth 1 set apart, bad argument one line."""

from __future__ import annotations

import csv
import json

from load_script import load_benchmark

pbk = load_benchmark("passkey_by_key")


def _cell(n, d, found):  # found: {key: score}
    return {"task": "passkey", "length": n, "depth": d,
            "samples": [{"answer": k, "prediction": " x", "score": s} for k, s in found.items()]}


def test_counts_per_key(tmp_path, capsys):
    cells = [_cell(1024, 0.0, {"111": 1.0, "222": 0.0}), _cell(1024, 1.0, {"111": 1.0, "222": 1.0}),
             _cell(2048, 0.5, {"111": 0.0, "222": 0.0}),
             {"task": "niah_single", "length": 1024, "depth": 0.0, "samples": [{"answer": "9", "score": 1.0}]}]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cells": cells}))
    out = tmp_path / "t.csv"
    assert pbk.main([f"run={p}", "--out", str(out)]) == 0
    rows = {r["key"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"111", "222"}  # niah cells are another task
    assert rows["111"]["1024"] == "2/2" and rows["111"]["1024_depth<1"] == "1/1"
    assert rows["222"]["1024"] == "1/2" and rows["222"]["1024_depth<1"] == "0/1"
    assert rows["222"]["2048"] == "0/1"
    assert pbk.main([f"run={p}", "--lengths", "2048"]) == 0
    assert "1024" not in capsys.readouterr().out.splitlines()[-1]


def test_bad_argument_is_one_line(tmp_path, capsys):
    assert pbk.main([str(tmp_path / "missing.json")]) == 2
    assert "NAME=results.json" in capsys.readouterr().err


def test_rarest_token_share_per_key_and_hits_by_share(tmp_path, capsys):
    from memsparse.tokenizer import train_bpe

    # a corpus that repeats " 123": one token no other 3-digit key holds (share 1/900)
    tok = train_bpe(iter(["the value 123 and 123 again, 123 " * 50, "other words 4 5 6 7 8 9 0"]), 300,
                    split_digits=False)
    tok.save(tmp_path / "tok")
    cells = [_cell(1024, 0.0, {"123": 0.0, "456": 1.0}), _cell(1024, 1.0, {"123": 0.0, "456": 1.0})]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cells": cells}))
    out = tmp_path / "t.csv"
    assert pbk.main([f"run={p}", "--tokenizer", str(tmp_path / "tok"), "--digits", "3", "--out", str(out)]) == 0
    rows = {r["key"]: r for r in csv.DictReader(open(out))}
    assert float(rows["123"]["rarest_share"]) == round(1 / 900, 5) and rows["123"]["tokens"] == "' 123'"
    assert float(rows["456"]["rarest_share"]) >= 0.01
    assert "run: hits by the key's rarest-token share: < 0.1% 0/0, 0.1-1% 0/2, >= 1% 2/2" in capsys.readouterr().out
    assert pbk.main([f"run={p}", "--tokenizer", str(tmp_path / "nope")]) == 2


def test_beyond_the_window_from_needle_distances(tmp_path, capsys):
    """Samples with needle distances are split at the cell's window: a `beyond_window` column per key and a line
    per run; a file without distances (older memsparse-eval) shows neither."""
    def cell(d, found):  # found: {key: (score, distance)}
        return {"task": "passkey", "length": 1024, "depth": d, "window": 512,
                "samples": [{"answer": k, "score": s, "needle_distances": [dist]} for k, (s, dist) in found.items()]}

    cells = [cell(0.0, {"111": (1.0, 1000), "222": (0.0, 990)}), cell(0.5, {"111": (0.0, 513), "222": (1.0, 512)}),
             cell(1.0, {"111": (1.0, 10), "222": (1.0, 12)})]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"meta": {"window": 512}, "cells": cells}))
    out = tmp_path / "t.csv"
    assert pbk.main([f"run={p}", "--out", str(out)]) == 0
    assert "run: key beyond the attention window 1/3, inside it 3/3" in capsys.readouterr().out
    rows = {r["key"]: r for r in csv.DictReader(open(out))}
    assert rows["111"]["beyond_window"] == "1/2" and rows["222"]["beyond_window"] == "0/1"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"cells": [_cell(1024, 0.0, {"111": 1.0})]}))
    assert pbk.main([f"old={old}"]) == 0
    assert "beyond" not in capsys.readouterr().out


def test_teacher_forced_split_and_keys_that_run_on(tmp_path, capsys):
    """With tf_exact in the samples: a line per run with the teacher-forced exact match beyond / inside the window,
    the prompts right teacher-forced but not decoded, and of them those whose decoded text is the key then more."""
    def s(k, score, tf, dist, pred):
        return {"answer": k, "score": score, "tf_exact": tf, "needle_distances": [dist], "prediction": pred}

    cells = [{"task": "passkey", "length": 1024, "depth": 0.0, "window": 512,
              "samples": [s("111", 0.0, 1.0, 1000, " 1119"), s("222", 0.0, 1.0, 990, " 229"),
                          s("333", 1.0, 1.0, 900, " 333")]},
             {"task": "passkey", "length": 1024, "depth": 1.0, "window": 512,
              "samples": [s("111", 0.0, 0.0, 10, " 1110"), s("222", 1.0, 1.0, 12, " 222.")]}]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"cells": cells}))
    assert pbk.main([f"run={p}"]) == 0
    out = capsys.readouterr().out
    assert "run: key beyond the attention window 1/3, inside it 1/2" in out
    # " 1110" ran on but was wrong teacher-forced too: not counted; " 229" is wrong, not a run-on
    assert ("run: teacher-forced, beyond the window 3/3, inside 1/2; right teacher-forced but not decoded 2, "
            "of them 1 ran on past the key (its digits, then more)") in out


def test_retrieval_eval_cells_by_step(tmp_path, capsys):
    """RetrievalEval's cells.jsonl: @STEP picks one evaluation, none the last; an absent step names those held."""
    def cell(step, found):
        c = _cell(1024, 0.0, {"111": found})
        c["samples"][0]["needle_distances"], c["window"], c["step"] = [900], 512, step
        return json.dumps(c)

    p = tmp_path / "cells.jsonl"
    p.write_text("\n".join([cell(10, 0.0), cell(20, 1.0)]) + "\n")
    assert pbk.main([f"a={p}@10", f"b={p}"]) == 0
    out = capsys.readouterr().out
    assert "a: key beyond the attention window 0/1" in out and "b: key beyond the attention window 1/1" in out
    assert pbk.main([f"a={p}@30"]) == 2
    assert "holds steps 10, 20, not 30" in capsys.readouterr().err


def test_no_writes_reads_the_writes_off_cells(tmp_path, capsys):
    c = _cell(1024, 0.0, {"111": 1.0})
    c["samples"][0]["needle_distances"], c["window"], c["step"] = [900], 512, 5
    p = tmp_path / "cells.jsonl"
    p.write_text(json.dumps(c) + "\n" + json.dumps({**c, "memory_writes": False,
                                                    "samples": [{**c["samples"][0], "score": 0.0}]}) + "\n")
    assert pbk.main([f"on={p}"]) == 0 and pbk.main([f"off={p}", "--no-writes"]) == 0
    out = capsys.readouterr().out
    assert "on: key beyond the attention window 1/1" in out and "off: key beyond the attention window 0/1" in out
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"cells": [c]}))
    assert pbk.main([f"x={results}", "--no-writes"]) == 2
    assert "--no-writes reads RetrievalEval's cells.jsonl" in capsys.readouterr().err
