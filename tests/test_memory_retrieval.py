"""The memory carries a key past every attention path (benchmarks/cpu_memory_probe.py at its committed settings).

Trained the same way for 150 steps, MemSparseLM with a MAC memory layer answers a one-letter key stated 112-160
tokens before the question (window 32, segment 16, two layers: no attention path reaches it) and the same model
without memory cannot; both copy it from inside the window. About 3 minutes on 2 cores: marked slow.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).parent.parent / "benchmarks" / "cpu_memory_probe.py"
_spec = importlib.util.spec_from_file_location("cpu_memory_probe", _path)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


@pytest.mark.slow
def test_memory_carries_the_key_beyond_attention_and_no_memory_does_not():
    args = argparse.Namespace(steps=150, batch=32, length=192, lr=3e-3, eval_every=150, seed=0)
    with_memory = probe.train(True, args)["final"]
    without = probe.train(False, args)["final"]
    assert with_memory["acc_in_window"] >= 0.9 and without["acc_in_window"] >= 0.9
    assert with_memory["acc_beyond_attention"] >= 0.8  # measured 1.0 (benchmarks/results/cpu_memory_probe.json)
    assert without["acc_beyond_attention"] <= 0.25     # chance is 0.05
