"""benchmarks/fingerprint.py: the training trace it prints is reproducible and sees what it should (doc_ids)."""

from __future__ import annotations

from load_script import load_benchmark


def load():
    return load_benchmark("fingerprint")


def test_trace_is_reproducible_and_depends_on_doc_ids():
    fp = load()
    a, b = fp.training_trace(False, steps=2), fp.training_trace(False, steps=2)
    assert a == b and len(a) == 2 and all(len(r) == 2 for r in a)
    assert fp.training_trace(True, steps=2) != a  # packed documents change the loss
