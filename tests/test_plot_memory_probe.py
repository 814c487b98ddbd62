"""benchmarks/plot_memory_probe.py: one CSV row per (run, model, step, band), key length 1 for runs without it."""

from __future__ import annotations

import csv
import json

import pytest
from load_script import load_benchmark

pytest.importorskip("matplotlib")
plot = load_benchmark("plot_memory_probe")


def _run(tmp_path, name, args, accs):
    curve = [{"step": s, "acc_in_window": a, "acc_relay": a / 2, "acc_beyond_attention": a / 4} for s, a in accs]
    doc = {"args": args, "runs": [{"memory_layers": [1], "curve": curve}, {"memory_layers": [], "curve": curve[:1]}]}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(doc))
    return str(p)


def test_curves_csv_and_png(tmp_path):
    old = _run(tmp_path, "old", {"steps": 100}, [(50, 0.4), (100, 0.8)])
    new = _run(tmp_path, "key5", {"steps": 100, "key_length": 5}, [(50, 0.2), (100, 1.0)])
    plot.main([old, new, "--out", str(tmp_path / "o")])
    rows = list(csv.DictReader(open(tmp_path / "o" / "memory_probe_curves.csv")))
    assert len(rows) == 2 * (2 + 1) * 3  # two files x (2 memory points + 1 no-memory point) x 3 bands
    assert {r["key_length"] for r in rows if r["run"] == "old"} == {"1"}
    beyond = [r for r in rows if r["run"] == "key5" and r["model"] == "memory" and r["band"] == "beyond_attention"]
    assert [(r["step"], float(r["accuracy"])) for r in beyond] == [("50", 0.05), ("100", 0.25)]
    assert (tmp_path / "o" / "memory_probe_curves.png").stat().st_size > 10_000


def test_unseen_bands_get_their_panels_and_rows(tmp_path):
    seen = _run(tmp_path, "plain", {"steps": 100}, [(100, 1.0)])
    p = tmp_path / "unseen.json"
    curve = [{"step": 100, "acc_in_window": 1.0, "acc_relay": 1.0, "acc_beyond_attention": 1.0,
              "acc_unseen_in_window": 0.0, "acc_unseen_beyond_attention": 0.5}]
    p.write_text(json.dumps({"args": {"steps": 100, "unseen": 4}, "runs": [{"memory_layers": [1], "curve": curve}]}))
    assert [b for b, _ in plot.bands(plot.load([seen]))] == ["in_window", "relay", "beyond_attention"]
    assert [b for b, _ in plot.bands(plot.load([seen, str(p)]))][-2:] == ["unseen_in_window",
                                                                          "unseen_beyond_attention"]
    plot.main([seen, str(p), "--out", str(tmp_path / "o")])
    rows = list(csv.DictReader(open(tmp_path / "o" / "memory_probe_curves.csv")))
    unseen = {r["band"]: float(r["accuracy"]) for r in rows if r["run"] == "unseen" and r["band"].startswith("unseen")}
    assert unseen == {"unseen_in_window": 0.0, "unseen_beyond_attention": 0.5}


def test_copy_steps_shift_the_curve_to_the_mixed_schedule(tmp_path):
    """A run with --copy-steps N is plotted from the start of its mixed schedule: step - N."""
    copy = _run(tmp_path, "copy300", {"steps": 600, "copy_steps": 300}, [(200, 1.0), (400, 1.0)])
    plot.main([copy, "--out", str(tmp_path / "o")])
    rows = list(csv.DictReader(open(tmp_path / "o" / "memory_probe_curves.csv")))
    assert sorted({int(r["step"]) for r in rows if r["model"] == "memory"}) == [-100, 100]


def test_band_titles_follow_the_runs_scale():
    one = {"args": {"key_length": 2}, "runs": []}
    two = {"args": {"key_length": 2, "scale": 2}, "runs": []}
    assert dict(plot.bands({"a": one}))["relay"] == "40-90 back (attention relayed)"
    assert dict(plot.bands({"a": two}))["beyond_attention"] == "224-320 back (memory only)"
    assert "x each run's --scale" in dict(plot.bands({"a": one, "b": two}))["relay"]
