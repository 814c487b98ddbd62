"""benchmarks/bench_eval_batch.py on CPU: a tiny checkpoint's cells one at a time and batched, compared."""

from __future__ import annotations

import json

import pytest
import torch
from load_script import load_benchmark

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM
from memsparse.tokenizer import ByteTokenizer


def _mod():
    return load_benchmark("bench_eval_batch")


def _tiny_checkpoint(tmp_path):
    """A seeded tiny MAC model with the byte tokenizer, saved under tmp_path / "ckpt"."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                      segment=32, window=64, persistent_tokens=8, memory=MemoryConfig(heads=2, head_dim=8,
                                                                                        chunk_size=32))
    ckpt = MemSparseLM(cfg).save_pretrained(tmp_path / "ckpt")
    ByteTokenizer().save(ckpt)
    return ckpt


def test_batched_cells_are_compared_with_one_at_a_time(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    assert _mod().main(["--checkpoint", str(ckpt), "--lengths", "300", "--depths", "0,1", "--samples", "3",
                        "--batch", "3", "--device", "cpu", "--name", "b", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["batch"] == 3 and res["device"] == "cpu" and len(res["rows"]) == 2
    for r in res["rows"]:
        assert r["n"] == 3 and 0 <= r["same_prediction"] <= 3 and r["wall_s_batch_1"] > 0 and r["speedup"] > 0
    assert "same answers" in (tmp_path / "b.md").read_text() and res["warmup"] is True


def test_the_warm_up_runs_both_settings_untimed_first(tmp_path, monkeypatch):
    """--warmup (default): both batch settings once at every length with one depth before the timed runs."""
    mod = _mod()
    calls, real = [], mod.cli.main

    def main(argv):
        calls.append((argv[argv.index("--batch") + 1], argv[argv.index("--depths") + 1], argv[argv.index("--out") + 1]))
        return real(argv)
    monkeypatch.setattr(mod.cli, "main", main)
    ckpt = _tiny_checkpoint(tmp_path)
    args = ["--checkpoint", str(ckpt), "--lengths", "260", "--depths", "0,1", "--samples", "2", "--batch", "2",
            "--device", "cpu", "--name", "w", "--out", str(tmp_path)]
    assert mod.main(args) == 0
    assert [(b, dp) for b, dp, _ in calls] == [("1", "0"), ("2", "0"), ("1", "0,1"), ("2", "0,1")]
    assert [o.rsplit("/", 1)[-1] for *_, o in calls] == ["warmup1", "warmup2", "batch1", "batch2"]
    calls.clear()
    assert mod.main([*args, "--no-warmup"]) == 0
    assert [(b, dp) for b, dp, _ in calls] == [("1", "0,1"), ("2", "0,1")]


def test_a_batch_of_one_is_refused():
    with pytest.raises(SystemExit):
        _mod().main(["--batch", "1"])
