"""benchmarks/triton_variants.py: each launch's Triton signature, and the variants an evaluation adds to training's."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from load_script import load_benchmark

pytest.importorskip("triton")

from tiny_recipe import tiny_model  # noqa: E402

tv = load_benchmark("triton_variants")


def test_specialisation_follows_tritons_keys():
    spec = tv.specialisation
    assert spec(1, False) == ("i", "1", "i32")
    assert spec(1024, False) == ("i", "16", "i32") and spec(1000, False) == ("i", "i", "i32")
    assert spec(2**40, False)[2] == "i64"
    assert spec(1000, True) == spec(1000, True) != spec(1024, True)  # constexprs: by value
    x = torch.zeros(8, dtype=torch.float32)
    assert spec(x, False) == ("p", "float32", True)
    assert spec(x[1:], False) == ("p", "float32", False)  # 4 bytes in: not 16-byte aligned
    assert spec(x.bfloat16(), False)[1] == "bfloat16"


@pytest.mark.slow  # ~10 s (a fit and an evaluation): the key test above stays in the default run
def test_an_evaluation_adds_variants_to_trainings(tmp_path, monkeypatch):
    """A tiny recipe: training rows of one length in bf16, then a float32 grid of two lengths and decoding:
    the sparse-attention forward gets variants of its own in the evaluation (dtype, the lengths' specialisations)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MEMSPARSE_SPARSE_ATTENTION_IMPL", raising=False)
    run = InterpretedFunction.run
    recipe = {
        "trainer": {"callbacks": [{"class_path": "memsparse.train.callbacks.RetrievalEval",
                                   "init_args": {"tasks": "passkey", "lengths": [256, 300], "depths": [0.5],
                                                 "samples": 1}}]},
        "model": {"config": {**tiny_model(), "budget": "fixed:3"}},
        "data": {"seq_len": 64},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = tv.main([str(path), "--out", str(tmp_path), "--name", "tv"])
    rows = {r["kernel"]: r for r in result["kernels"]}
    assert InterpretedFunction.run is run and "MEMSPARSE_SPARSE_ATTENTION_IMPL" not in os.environ  # restored
    fwd = rows["sparse_attention_triton._fwd_kernel"]
    assert fwd["train_variants"] >= 1 and fwd["train_launches"] >= 2  # one per layer at least
    assert fwd["eval_new_variants"] >= 2  # float32, and decoding's one-token queries
    assert rows["sparse_attention_triton._dkdv_kernel"]["eval_launches"] == 0  # no backward in the evaluation
    saved = json.loads((tmp_path / "tv.json").read_text())
    assert saved["totals"]["eval_new_variants"] == sum(r["eval_new_variants"] for r in result["kernels"])
    assert (tmp_path / "tv.md").read_text().startswith("# Triton kernel variants")
    with pytest.raises(SystemExit, match="no RetrievalEval"):
        recipe["trainer"]["callbacks"] = []
        path.write_text(yaml.safe_dump(recipe))
        tv.main([str(path), "--out", str(tmp_path)])
