"""benchmarks/needle_distances.py: the stage-2 recipe puts more needles far back than its earlier mixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from load_script import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
nd = load_benchmark("needle_distances")

pytest.importorskip("memsparse.eval.tasks")


def test_far_keys_mixture_moves_needles_back(tmp_path, capsys):
    base, far = tmp_path / "base.json", tmp_path / "far.json"
    recipe, overlay = ROOT / "recipes" / "retrieval_small.yaml", ROOT / "recipes" / "overlays" / "near_keys_stage2.yaml"
    assert nd.main([str(recipe), str(overlay), "--samples", "40", "--distances", "1500", "--out", str(base)]) == 0
    assert nd.main([str(recipe), "--samples", "40", "--distances", "1500", "--out", str(far)]) == 0
    b, f = json.loads(base.read_text()), json.loads(far.read_text())
    assert len(f["rows"]) == len(b["rows"]) + 1
    far_spec = [r for r in f["rows"] if r["depths"] == [0.0, 0.25]]
    assert len(far_spec) == 1 and far_spec[0]["share_ge_1500"][0] > 0.5
    assert f["mixture"]["1500"][0] > 2 * b["mixture"]["1500"][0]
    assert "| all | mixture |" in capsys.readouterr().out


def test_no_mixture_is_one_line(tmp_path, capsys):
    p = tmp_path / "x.yaml"
    p.write_text("data: {seq_len: 64}\n")
    assert nd.main([str(p)]) == 2
    assert "no data.synthetic" in capsys.readouterr().err
