"""benchmarks/bench_doc_masks.py runs on CPU at tiny sizes (the GPU run measures the cost of doc_ids)."""

from __future__ import annotations

import json

from load_script import load_benchmark


def test_bench_doc_masks_runs_tiny(tmp_path):
    mod = load_benchmark("bench_doc_masks")
    res = mod.main(["--tiny", "--lengths", "128", "--batch", "2", "--median", "40", "--steps", "1", "--warmup", "0",
                    "--profile", "1", "--out", str(tmp_path), "--name", "tiny"])
    row = res["rows"][0]
    assert row["documents"] > 2 and row["doc_ids_tokens_per_s"] > 0 and row["no_doc_ids_tokens_per_s"] > 0
    assert all(e <= 1e-4 for errs in res["kernel_check"].values() for e in errs.values())
    # the packed forward through the kernel (the interpreter here) against the reference, with doc_ids and without
    check = res["model_check_max_abs_logit_diff"]
    assert check["logit_scale"] > 0 and check["doc_ids"] <= 1e-4 * check["logit_scale"]
    assert check["no_doc_ids"] <= 1e-4 * check["logit_scale"]
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["rows"][0]["length"] == 128
    assert "| 128 |" in (tmp_path / "tiny.md").read_text()
    # the profile: per-step times of both paths and the ops that differ most between them
    assert row["profile_total_ms"]["doc_ids"] > 0 and row["profile_total_ms"]["no_doc_ids"] > 0
    diff = row["profile_diff"]
    assert diff and all(abs(a["delta_ms"]) >= abs(b["delta_ms"]) for a, b in zip(diff, diff[1:]))
    assert "Profile at 128 tokens" in (tmp_path / "tiny.md").read_text()
