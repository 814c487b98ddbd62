"""bench_doc_masks.py --count-ops: the CPU count of the small ops doc_ids adds to a training step."""

from __future__ import annotations

import json

from load_script import load_benchmark


def test_count_ops_counts_both_paths(tmp_path):
    mod = load_benchmark("bench_doc_masks")
    res = mod.main(["--count-ops", "2", "--count-length", "768", "--out", str(tmp_path), "--name", "ops"])
    row = res["op_counts"][0]
    assert row["depth"] == 2 and row["length"] == 768 and row["documents"] >= 2
    assert row["doc_ids_ops"] > row["no_doc_ids_ops"] > 0  # two evictions, a few masks: some ops, not none
    assert row["added_by_doc_ids"] == row["doc_ids_ops"] - row["no_doc_ids_ops"]
    assert row["top"] and all(t["with"] != t["without"] for t in row["top"])
    assert json.loads((tmp_path / "ops.json").read_text())[0] == row
