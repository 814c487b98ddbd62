"""benchmarks/kept_budget_vs_length.py: the c * sqrt(L) fit, and a --tiny run whose kept tokens are the model's own
selection (dense keeps every visible token; length_scaled:c=4 keeps ~4 sqrt(L), which the fit recovers)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from load_script import load_benchmark

kept = load_benchmark("kept_budget_vs_length")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the runs below set one thread (tiny tensors: fastest, no fight with other tests)


def test_fit_recovers_c_and_the_exponent():
    L = [1024 * 2**i for i in range(8)]
    exact = kept.fit_sqrt(L, [12.0 * math.sqrt(n) for n in L])
    assert exact["c"] == pytest.approx(12.0, rel=1e-12) and exact["rms_rel_err"] == pytest.approx(0.0, abs=1e-12)
    assert exact["power_b"] == pytest.approx(0.5, abs=1e-9) and exact["power_a"] == pytest.approx(12.0, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    noise = (1 + 0.05 * torch.randn(len(L), generator=g)).tolist()
    noisy = kept.fit_sqrt(L, [7.0 * math.sqrt(n) * e for n, e in zip(L, noise)])
    assert noisy["c"] == pytest.approx(7.0, rel=0.05) and 0.0 < noisy["rms_rel_err"] < 0.1
    linear = kept.fit_sqrt(L, [0.1 * n for n in L])  # a constant kept fraction: exponent 1, a poor sqrt fit
    assert linear["power_b"] == pytest.approx(1.0) and linear["rms_rel_err"] > 0.5
    with pytest.raises(ValueError):
        kept.fit_sqrt([1024], [0.0])


def test_visible_tokens_of_a_segment():
    # block 8, segment 32, 8 persistent: blocks end at s0+8..s0+32; window 64 from segment start 256 on: 192..
    assert kept.segment_visible_tokens(0, 32, 8, 1 << 20, 8) == pytest.approx(8 + 20)
    assert kept.segment_visible_tokens(256, 32, 8, 64, 8) == pytest.approx(8 + 64 + 20)


def test_tiny_run_writes_the_model_selection_and_fit(tmp_path):
    out = tmp_path / "kept"
    res = kept.main(["--tiny", "--lengths", "256,512,1k", "--device", "cpu", "--threads", "1", "--budget",
                     "dense;length_scaled:c=4,min_tokens=0", "--out", str(out)])
    data = json.loads((out / "kept_budget.json").read_text())
    assert data["meta"]["window"] == 1024 and data["meta"]["native_window"] == 64
    assert set(data["fits"]) == {"dense", "length_scaled:c=4,min_tokens=0"}
    pts = {(p["budget"], p["length"]): p for p in data["points"]}
    for n in (256, 512, 1024):
        d = pts["dense", n]  # dense keeps every visible block: the bookkeeping matches the selection exactly
        assert d["kept_tokens"] == pytest.approx(d["visible_tokens"]) and d["kept_fraction"] == pytest.approx(1.0)
        assert d["visible_tokens"] == pytest.approx(8 + n - 32 + 20)  # the segment ending at n, window lifted
    fit = data["fits"]["length_scaled:c=4,min_tokens=0"]
    assert fit["c"] == pytest.approx(4.0, rel=0.1)  # whole blocks round the kept tokens up by < one block
    assert fit["power_b"] == pytest.approx(0.5, abs=0.1) and fit["rms_rel_err"] < 0.1
    assert data["fits"]["dense"]["power_b"] == pytest.approx(1.0, abs=0.05)
    curve = data["curves"]["dense"]
    assert len(curve["end"]) == 1024 // 32 and curve["kept_tokens"] == pytest.approx(curve["visible"])
    with open(out / "kept_budget.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "kept_budget.png").stat().st_size > 1000
    assert res["fits"] == data["fits"]

    # the native window: visible context stops at persistent + window + segment whatever the length
    nat = kept.main(["--tiny", "--lengths", "256,512", "--device", "cpu", "--threads", "1", "--budget", "dense",
                     "--window", "native", "--out", str(tmp_path / "native")])
    assert [p["visible_tokens"] for p in nat["points"]] == pytest.approx([8 + 64 + 20] * 2)


def test_bad_input_is_one_line(tmp_path):
    base = ["--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="multiples of the segment"):
        kept.main([*base, "--lengths", "300"])
    with pytest.raises(SystemExit, match="bad budget policy"):
        kept.main([*base, "--lengths", "256", "--budget", "top_p:p=2"])
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        kept.main([*base, "--lengths", "256", "--task", "nope"])
    with pytest.raises(SystemExit, match="passkey needs >="):
        kept.main([*base, "--lengths", "64"])
    with pytest.raises(SystemExit, match="does not exist"):
        kept.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
