"""benchmarks/cpu_memory_alone_probe.py: the memory alone reads the question's query once, after writing the
context before the question; the oracle shift learns the binding in a few hundred steps; bad settings are errors."""

from __future__ import annotations

import json

import pytest
import torch
from load_script import load_benchmark

ma = load_benchmark("cpu_memory_alone_probe")


def test_the_answer_depends_on_the_context_before_the_question_only():
    torch.manual_seed(0)
    model = ma.MemoryAlone(oracle=True)
    ids, q, ans = ma.draw(torch.Generator().manual_seed(1), 3, 2, 192)
    assert (ids[:, q + 1] == ans).all() and q == 166
    base = model(ids, q)
    after = ids.clone()
    after[:, q + 1:] = ord("a")  # the answer and what follows are never written
    torch.testing.assert_close(model(after, q), base)
    before = ids.clone()
    before[:, :q - 2] = ord("a")  # the context is
    assert not torch.allclose(model(before, q), base)


@pytest.mark.slow
def test_with_the_oracle_shift_the_memory_alone_binds_names_to_values(tmp_path):
    res = ma.main(["--oracle-shift", "--steps", "250", "--eval-every", "250", "--eval-samples", "100",
                   "--out", str(tmp_path)])
    assert res["final"]["acc"] >= 0.9  # 2 pairs: a memory that keeps the values but not their names scores ~0.5
    assert json.loads((tmp_path / "memory_alone.json").read_text())["final"] == res["final"]


@pytest.mark.parametrize("argv,message", [(["--pairs", "9"], "--pairs must be 1-8"),
                                          (["--length", "100"], "--length must be >= 168"),
                                          (["--steps", "0"], "must be >= 1")])
def test_bad_settings_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        ma.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
