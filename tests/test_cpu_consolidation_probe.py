"""benchmarks/cpu_consolidation_probe.py: the settings it scores, the passes each gives per prompt length (the
schedule n(L) = clamp(round(a * log2(L / window)), 0, n_max)), its files, and a bad setting as a one-line error."""

from __future__ import annotations

import json

import pytest
from load_script import load_benchmark

cons = load_benchmark("cpu_consolidation_probe")


def test_a_short_run_scores_every_setting_with_the_schedules_passes(tmp_path):
    settings = "off,fixed:2,schedule:a=0.25,schedule:a=1"
    res = cons.main(["--steps", "1", "--eval-every", "1", "--bands", "2", "--samples", "2", "--chunk", "2",
                     "--eval-samples", "4", "--settings", settings, "--threads", "1", "--out", str(tmp_path)])
    rows = {(r["band"], r["setting"]): r for r in res["rows"]}
    assert len(rows) == 2 * 4
    # window 32: at 192 tokens log2(6) = 2.58, at 2,112 tokens log2(66) = 6.04
    assert [rows["112-160", s]["passes"] for s in ("schedule:a=0.25", "schedule:a=1")] == [1, 3]
    assert [rows["1.5K-2K", s]["passes"] for s in ("schedule:a=0.25", "schedule:a=1")] == [2, 6]
    assert rows["1.5K-2K", "off"]["passes"] == 0 and rows["1.5K-2K", "fixed:2"]["passes"] == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 for r in rows.values())
    saved = json.loads((tmp_path / "consolidation_probe.json").read_text())
    assert saved["rows"] == res["rows"] and saved["window"] == 32
    assert (tmp_path / "consolidation_probe.png").stat().st_size > 1000
    md = (tmp_path / "consolidation_probe.md").read_text().splitlines()
    assert md[0] == "| setting | key 112-160 back | key 1.5K-2K back |" and len(md) == 2 + 4
    assert md[2].startswith("| off | ") and "(0 p, " in md[2]


def test_bad_settings_are_one_line_errors():
    with pytest.raises(SystemExit, match="unknown consolidation setting 'fixd:2'"):
        cons.main(["--settings", "off,fixd:2"])
    with pytest.raises(SystemExit, match="--bands must be 1-4"):
        cons.main(["--bands", "0"])
    with pytest.raises(SystemExit, match="--train-passes must be >= 0"):
        cons.main(["--train-passes", "-1"])
    with pytest.raises(SystemExit, match="--replay-tokens must be 1-16"):
        cons.main(["--replay", "surprising", "--replay-tokens", "0"])


def test_surprising_replay_reaches_the_model():
    c = cons.consolidation("fixed:2", "surprising", 4)
    assert (c.mode, c.passes, c.replay, c.replay_tokens) == ("fixed", 2, "surprising", 4)


def test_score_counts_a_model_that_answers_every_key(monkeypatch):
    """A model whose logits put the next token first scores 1.0 (and 0.0 when they point one token off): the
    band's answers are scored through the memory probe's `key_hits`."""
    import types

    import torch

    real = cons.probe.build(True, 0)

    class Oracle(torch.nn.Module):
        def __init__(self, shift: int):
            super().__init__()
            self.config, self.shift = real.config, shift

        def set_consolidation(self, cfg):
            self.config = real.config

        def forward(self, ids):
            nxt = torch.roll(ids, -self.shift, dims=1)
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, 128).float())

    band = cons.BANDS[0]
    assert cons.score(Oracle(1), "off", band, n=6, seed=0, chunk=3)["accuracy"] == 1.0
    assert cons.score(Oracle(2), "off", band, n=6, seed=0, chunk=3)["accuracy"] == 0.0
    # --filler random: the prompts change (random letters), the layout and the oracle's score do not
    assert cons.score(Oracle(1), "off", band, n=6, seed=0, chunk=3, filler="random")["accuracy"] == 1.0
    seen, real_batch = [], cons.probe.batch

    def batch(*a, **k):
        seen.append(k.get("filler"))
        return real_batch(*a, **k)
    monkeypatch.setattr(cons.probe, "batch", batch)
    cons.score(Oracle(1), "off", band, n=2, seed=0, chunk=2, filler="random")
    assert seen == ["random"]
