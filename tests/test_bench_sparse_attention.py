"""benchmarks/bench_sparse_attention.py --check-only on CPU at a tiny size: the --variants path (the odd-shape and the
real-mask checks of every listed kernel variant against fp32) runs through the interpreter; the GPU run times them."""

from __future__ import annotations

import json

import pytest
from load_script import load_benchmark

pytest.importorskip("triton")


def _bench():
    return load_benchmark("bench_sparse_attention")


def test_small_checks_stop_at_their_deadline():
    """No odd-shape check starts past `stop_at`: each is listed as skipped instead (on an H100 five variants'
    checks took all of a run's time, 2026-12-05)."""
    mod = _bench()
    lines, skipped = [], []
    out = mod.small_checks(lines.append, variants=("default", "dynamic"), cases=mod.TINY_SMALL_CASES, stop_at=0.0,
                           skipped=skipped)
    assert out == [] and len(skipped) == 2 * len(mod.TINY_SMALL_CASES) and len(lines) == len(skipped)
    assert [c["variant"] for c in skipped[:2]] == ["default", "dynamic"] and "skipped" in lines[0]


def test_the_first_item_starts_whatever_its_estimate():
    """The most important item is never skipped for its (cold-machine) estimate: on a warm H100 an item estimated
    at 309 s was skipped at 6 s of a 220 s deadline and then took 85 s (2026-12-05). Later items still must fit."""
    fits = _bench().item_fits
    assert fits(6, 309, 220, started=False)
    assert not fits(100, 309, 220, started=True) and fits(100, 100, 220, started=True)
    assert fits(1e9, 1e9, 0.0, started=True)  # no deadline


@pytest.mark.slow  # ~10 s on one core (the interpreter at D=128, block 128)
def test_bench_variants_check_only_runs_tiny(tmp_path):
    mod = _bench()
    try:
        doc = mod.main(["--check-only", "--device", "cpu", "--lengths", "128", "--heads", "1/1", "--masks",
                        "window+random", "--variants", "default,persistent+tma,merged", "--out", str(tmp_path),
                        "--name", "tiny"])
    finally:
        mod.DEV = "cuda"
    checks = doc["results"][0]["masks"]["window+random"]["checks"]
    assert [c["variant"] for c in checks] == ["default", "persistent+tma", "merged"]
    for c in checks + doc["meta"]["small_checks"]:
        assert c["pass"] and c["finite"] and set(c["errors"]) == {"o", "lse", "dq", "dk", "dv"}
    assert {c["variant"] for c in doc["meta"]["small_checks"]} == {"default", "persistent+tma", "merged"}
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["meta"]["variants"] == ["default", "persistent+tma", "merged"]
    assert "| 128 | 1/1 | window+random | persistent+tma | default |" in (tmp_path / "tiny.md").read_text()
    with pytest.raises(ValueError, match="variant"):
        mod.main(["--check-only", "--device", "cpu", "--variants", "default,fastest", "--out", str(tmp_path)])


def test_head_dim_and_block_size_reach_the_inputs_and_the_report(tmp_path):
    """--head-dim 32 --block-size 32 (the recipes use 64 / 64): the checked tensors and block lists have them, the
    JSON rows and the report say them; a size the kernels do not take is one line."""
    mod = _bench()
    try:
        doc = mod.main(["--check-only", "--device", "cpu", "--lengths", "128", "--heads", "2/1", "--masks",
                        "window+random", "--variants", "default,merged", "--no-small-checks", "--head-dim", "32",
                        "--block-size", "32", "--out", str(tmp_path), "--name", "d32"])
    finally:
        mod.DEV, mod.HEAD_DIM, mod.BS = "cuda", 128, 128
    row = doc["results"][0]
    assert row["D"] == 32 and row["block_size"] == 32 and doc["meta"]["head_dim"] == 32
    checks = row["masks"]["window+random"]["checks"]
    assert [c["variant"] for c in checks] == ["default", "merged"] and all(c["pass"] for c in checks)
    assert "D=32, causal, block 32;" in (tmp_path / "d32.md").read_text()
    try:
        with pytest.raises(SystemExit, match="head-dim 48"):
            mod.main(["--check-only", "--device", "cpu", "--head-dim", "48", "--out", str(tmp_path)])
        with pytest.raises(SystemExit, match="block-size 96"):
            mod.main(["--check-only", "--device", "cpu", "--block-size", "96", "--out", str(tmp_path)])
    finally:
        mod.DEV, mod.HEAD_DIM, mod.BS = "cuda", 128, 128


def test_flex_autotunes_its_tiles_below_its_default_128(monkeypatch):
    """At --block-size 64 FlexAttention's default 128-wide tiles refuse the mask (forward, H200, 2026-12-06) and leave
    its backward no config on sm90: max-autotune (32- and 64-wide tiles) then; its defaults from 128 up."""
    mod = _bench()
    monkeypatch.setattr(mod, "BS", 64)
    assert mod.flex_compile_kwargs() == {"mode": "max-autotune-no-cudagraphs"}
    monkeypatch.setattr(mod, "BS", 128)
    assert mod.flex_compile_kwargs() == {}


def test_flex_flash_backend_runs_or_says_why(monkeypatch):
    """--flex-flash: without flash_attn.cute the row says why the FLASH backend did not run (and the report prints
    it); when the backend fails on a mask, the error is recorded and nothing else of the row is lost."""
    from types import SimpleNamespace

    import torch

    mod = _bench()
    status = mod.flash_backend_status()
    assert set(status) == {"available", "why"}
    if not status["available"]:
        assert "flash_attn.cute" in status["why"]
    monkeypatch.setattr(mod, "flash_backend_status", lambda: {"available": False, "why": "no flash_attn.cute"})
    assert mod.flex_flash_timings(None, None, None, {}, None) == {"available": False, "why": "no flash_attn.cute"}

    monkeypatch.setattr(mod, "flash_backend_status", lambda: {"available": True, "why": None})
    monkeypatch.setattr(mod, "flex_block_mask", lambda blk, G, L: "mask")
    seen = {}

    def refusing_flex(q, k, v, block_mask, enable_gqa, kernel_options):
        seen.update(kernel_options=kernel_options, block_mask=block_mask)
        raise RuntimeError("BACKEND='FLASH' but flash attention cannot be used: a reason")

    t = torch.zeros(1, 1, 4, 8)
    x = SimpleNamespace(G=1, L=4, q=t, k=t, v=t, qg=t, kg=t, vg=t, do=t)
    out = mod.flex_flash_timings(None, x, lambda: t, {"ours_fwd_ms": [1.0], "ours_fwdbwd_ms": [2.0]}, refusing_flex)
    assert seen == {"kernel_options": {"BACKEND": "FLASH"}, "block_mask": "mask"}
    assert out["available"] and "cannot be used: a reason" in out["error"]

    row = {"L": 4096, "Hq": 8, "Hkv": 4, "masks": {"window+random": {
        "density": 0.2, "ours_fwd_ms": [1.0], "ours_fwdbwd_ms": [2.0],
        "flex_flash": {"available": False, "why": "flash_attn.cute (pip package flash-attn-4) is not importable"}}}}
    table = "\n".join(mod.main_tables([row]))
    assert "FLASH backend" in table and "| 4K | 8/4 | window+random | - | - | - / - | - | flash_attn.cute" in table
