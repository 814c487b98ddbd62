"""benchmarks/cpu_long_prefix_probe.py: a key inside the window behind a prefix of filler, scored with the memory's
writes on and off, and its argument checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from load_script import load_benchmark

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
lp = load_benchmark("cpu_long_prefix_probe")


def test_prefixed_samples_put_the_key_right_before_the_question():
    g = torch.Generator().manual_seed(0)
    ids, ans = lp.prefixed_batch(g, 3, 50, 192)
    assert ids.shape == (3, 242)
    for row, (key, q) in zip(ids.tolist(), ans):
        assert q >= 50 and chr(row[q]) == "=" and chr(row[q - 1]) == "K" and chr(row[q - 2]) == "?"
        assert row[q + 1] == key[0]  # the answer follows the question
        assert "".join(map(chr, row[:50])).strip(lp.cmp.RANDOM_FILLER) == ""  # the prefix is filler only


def test_a_short_run_scores_every_prefix_both_ways(tmp_path):
    out = tmp_path / "r.json"
    result = lp.main(["--steps", "2", "--prefixes", "0,32", "--samples", "4", "--threads", "1", "--out", str(out)])
    assert [r["prefix"] for r in result["rows"]] == [0, 32]
    assert all(0.0 <= r[k] <= 1.0 for r in result["rows"] for k in ("writes_on", "writes_off"))
    assert json.loads(out.read_text())["rows"] == result["rows"]
    with pytest.raises(SystemExit):
        lp.main(["--prefixes", "0,-1"])
