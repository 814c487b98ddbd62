"""benchmarks/cpu_multikey_probe.py: its samples (pairs placed where asked, names distinct, the answer the asked
pair's value), a short run's files, and a bad setting as a one-line error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from load_script import load_benchmark

mk = load_benchmark("cpu_multikey_probe")


@pytest.mark.parametrize("pairs,lo,hi,others", [(1, 8, 24, (8, 160)), (4, 112, 160, (8, 160)), (8, 40, 90, (8, 160)),
                                                (4, 112, 160, (112, 160)), (8, 112, 160, (112, 160))])
def test_a_sample_holds_its_pairs_and_asks_one_in_its_band(pairs, lo, hi, others):
    g = torch.Generator().manual_seed(pairs)
    for _ in range(20):
        ids, ans, q, values = mk.sample(g, pairs, lo, hi, 192, others)
        text = "".join(map(chr, ids))
        assert len(ids) == 192 and ids[q + 1] == ans
        found = list(re.finditer(r"(\d)=([A-Z]);", text[:q - 2]))
        assert len(found) == pairs and len({m.group(1) for m in found}) == pairs
        assert sorted(values) == sorted(ord(m.group(2)) for m in found)
        asked = text[q - 1]
        assert text[q - 2] == "?" and text[q] == "="
        (m,) = [m for m in found if m.group(1) == asked]
        assert ord(m.group(2)) == ans
        assert lo <= (q - 2) - m.end() <= hi  # filler tokens between the pair's ";" and the question's "?"
        assert all(others[0] <= (q - 2) - f.end() <= others[1] for f in found if f is not m)


def test_sky_filler_repeats_the_sentence_around_the_pairs():
    """--filler sky: the same pairs and question, in the repeated sentence instead of random letters."""
    g = torch.Generator().manual_seed(5)
    sentence = mk.probe.FILLER * 20
    for _ in range(10):
        ids, ans, q, values = mk.sample(g, 2, 112, 160, 192, (112, 160), filler="sky")
        text = "".join(map(chr, ids))
        found = list(re.finditer(r"(\d)=([A-Z]);", text[:q - 2]))
        assert len(found) == 2 and ids[q + 1] == ans and text[q - 2] == "?"
        pieces = re.split(r"\d=[A-Z];|\?\d=", text[:q + 1])
        assert all(p in sentence for p in pieces) and any(len(p) > 20 for p in pieces)
        assert text[q + 2:] in sentence
    with pytest.raises(ValueError, match="filler must be"):
        mk.fill(g, 5, "noise")


def test_question_gap_puts_fixed_characters_between_the_name_and_the_equals(monkeypatch):
    """--question-gap N: "?7" + N characters of QUESTION_GAP + "=", the answer after it; training and evaluation
    alike, and key_match reads the asked name N + 1 back."""
    g = torch.Generator().manual_seed(1)
    for gap in (0, 5):
        ids, ans, q, _ = mk.sample(g, 2, 112, 160, 192, (112, 160), gap=gap)
        text = "".join(map(chr, ids))
        assert text[q] == "=" and ids[q + 1] == ans and text[q - gap - 2] == "?"
        assert text[q - gap:q] == mk.QUESTION_GAP[:gap]
        (m,) = [m for m in re.finditer(r"(\d)=([A-Z]);", text[:q - gap - 2]) if m.group(1) == text[q - gap - 1]]
        assert ord(m.group(2)) == ans
    with pytest.raises(ValueError, match="question gap"):
        mk.sample(g, 2, 112, 160, 192, gap=len(mk.QUESTION_GAP) + 1)
    gaps = set()
    real = mk.batch
    monkeypatch.setattr(mk, "batch", lambda *a, **k: (gaps.add(k.get("gap", a[8] if len(a) > 8 else 0)),
                                                      real(*a, **k))[1])
    mk.main(["--pairs", "2", "--steps", "3", "--eval-samples", "3", "--batch", "2", "--no-baseline",
             "--question-gap", "4", "--key-match"])
    assert gaps == {4}


def test_gap_ramp_grows_the_training_gap_to_the_question_gap():
    assert [mk.train_gap(s, 5, 0) for s in (1, 500)] == [5, 5]
    got = [mk.train_gap(s, 5, 600) for s in range(1, 901)]
    assert got[0] == 0 and got == sorted(got) and set(got) == set(range(6)) and (got[499], got[500]) == (4, 5)
    assert sum(g == 0 for g in got) == 100  # each of the 6 gaps 600 / 6 steps, then the full gap


def test_oracle_shift_makes_keys_the_token_2_back_and_queries_1_back():
    model = mk.probe.build(True, 0, conv=4, memory_depth=1)
    mem = model.blocks[1].memory
    mk.oracle_shift([mem])
    assert not mem.conv_weight.requires_grad
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    raw = mem.to_qkv(x).detach().view(2, 12, 3, mem.heads, mem.head_dim)
    inp = mem.project(x)

    def heads(t, back):  # (B, N, H, D) -> (B, H, N, D), the token `back` tokens before (zeros before the start)
        t = torch.cat([torch.zeros_like(t[:, :back]), t[:, :12 - back]], 1)
        return t.permute(0, 2, 1, 3)

    norm = torch.nn.functional.normalize
    torch.testing.assert_close(inp.q.detach(), norm(heads(raw[:, :, 0], 1), dim=-1))
    torch.testing.assert_close(inp.k.detach(), norm(heads(raw[:, :, 1], 2), dim=-1))
    torch.testing.assert_close(inp.v.detach(), heads(raw[:, :, 2], 0))
    with pytest.raises(ValueError, match="needs a memory convolution of >= 3 taps"):
        mk.oracle_shift([mk.probe.build(True, 0, conv=2).blocks[1].memory])
    far = mk.probe.build(True, 0, conv=8, memory_depth=1).blocks[1].memory  # a question gap of 5: the name 6 back
    mk.oracle_shift([far], query_back=6)
    raw_far = far.to_qkv(x).detach().view(2, 12, 3, far.heads, far.head_dim)
    torch.testing.assert_close(far.project(x).q.detach(), norm(heads(raw_far[:, :, 0], 6), dim=-1))
    with pytest.raises(ValueError, match="needs a memory convolution of >= 7 taps"):
        mk.oracle_shift([mk.probe.build(True, 0, conv=4).blocks[1].memory], query_back=6)


def test_a_short_run_writes_its_table_and_curves(tmp_path):
    res = mk.main(["--pairs", "1,2", "--steps", "2", "--eval-every", "1", "--eval-samples", "4", "--batch", "2",
                   "--out", str(tmp_path)])
    assert [(r["pairs"], r["memory_layers"]) for r in res["runs"]] == [(1, [1]), (1, []), (2, [1]), (2, [])]
    for r in res["runs"]:
        f = r["final"]
        assert len(r["curve"]) == 2 and 0.0 <= f["acc_beyond_attention"] <= f["any_beyond_attention"] <= 1.0
    one = [r for r in res["runs"] if r["pairs"] == 1]
    assert all(r["final"][f"acc_{b}"] == r["final"][f"any_{b}"] for r in one for b, *_ in mk.BANDS)
    saved = json.loads((tmp_path / "multikey_probe.json").read_text())
    assert saved["runs"] == res["runs"] and saved["chance"] == 1 / 20
    md = (tmp_path / "multikey_probe.md").read_text().splitlines()
    assert md[0].startswith("| pairs | model | steps | in_window (8-24)") and md[0].endswith("all_beyond (112-160) |")
    assert len(md) == 2 + 4
    png = tmp_path / "multikey_probe.png"
    assert png.stat().st_size > 1000
    png.unlink()
    assert mk.main(["--plot-only", "--out", str(tmp_path)])["runs"] == res["runs"] and png.stat().st_size > 1000


def test_memory_depth_and_width_reach_the_model(monkeypatch):
    built = []
    real = mk.probe.build
    monkeypatch.setattr(mk.probe, "build", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    mk.main(["--pairs", "1", "--steps", "1", "--eval-samples", "2", "--batch", "2", "--no-baseline",
             "--memory-depth", "1", "--memory-head-dim", "8", "--memory-layers", "1,0", "--memory-conv", "4",
             "--memory-conv-init", "random", "--variant", "mag", "--no-surprise-gate"])
    (model,) = built
    mem, cfg = model.config.memory, model.config
    assert (mem.depth, mem.head_dim, cfg.memory_layers, mem.conv, mem.conv_init) == (1, 8, [0, 1], 4, "random")
    assert (cfg.variant, cfg.surprise_gate) == ("mag", False)


def test_memory_lr_scale_trains_the_memory_model_s_memory_faster(monkeypatch):
    made = []
    real = torch.optim.AdamW
    monkeypatch.setattr(mk.torch.optim, "AdamW", lambda groups, **k: made.append((groups, k)) or real(groups, **k))
    mk.main(["--pairs", "1", "--steps", "1", "--eval-samples", "2", "--batch", "2", "--memory-lr-scale", "4",
             "--lr", "0.001"])
    (memory_groups, kw), (plain_groups, _) = made  # the memory model first, then the baseline
    assert kw["lr"] == 0.001 and [g["lr"] for g in memory_groups] == [0.001, 0.004]
    assert all(p.requires_grad for g in memory_groups for p in g["params"]) and memory_groups[1]["params"]
    assert [g["lr"] for g in plain_groups] == [0.001]  # the baseline has no memory to scale


@pytest.mark.parametrize("flag,far,filler", [([], (8, 160, (8, 160)), "random"),
                                             (["--train-all-beyond"], (112, 160, (112, 160)), "random"),
                                             (["--filler", "sky"], (8, 160, (8, 160)), "sky")])
def test_training_steps_ask_where_the_flag_says(monkeypatch, flag, far, filler):
    seen, fillers = [], set()
    real = mk.batch

    def spy(g, n, pairs, lo, hi, length, others=(8, mk.TOP), filler="random", gap=0):
        fillers.add(filler)  # training and evaluation alike
        if n == 2:  # training batches (the evaluation draws 3)
            seen.append((lo, hi, tuple(others)))
        return real(g, n, pairs, lo, hi, length, others, filler, gap)

    monkeypatch.setattr(mk, "batch", spy)
    mk.main(["--pairs", "2", "--steps", "6", "--eval-every", "6", "--eval-samples", "3", "--batch", "2",
             "--no-baseline", *flag])
    assert seen == [far, far, (8, 24, (8, 160))] * 2 and fillers == {filler}


def test_key_match_compares_the_question_with_the_asked_values_key(monkeypatch):
    """A memory whose key at a value is its name's vector (2 back) and whose query at the question's "=" is the
    asked name's (1 back) matches the asked value exactly and the others less: key_match reads those positions."""
    from types import SimpleNamespace

    model = mk.probe.build(True, 0, memory_layers=(0,))
    blk = model.blocks[0]

    def by_name(h):  # h (B, N, dim) -> q, k (B, 1, N, dim): q at t = h[t-1], k at t = h[t-2]
        q, k = torch.zeros_like(h), torch.zeros_like(h)
        q[:, 1:], k[:, 2:] = h[:, :-1], h[:, :-2]
        return SimpleNamespace(q=q.unsqueeze(1), k=k.unsqueeze(1))

    monkeypatch.setattr(blk.memory, "project", by_name)
    got = mk.key_match(model, torch.Generator().manual_seed(0), 3, 192, 6)
    assert list(got) == ["layer0"]
    assert got["layer0"]["asked"] == pytest.approx(1.0, abs=1e-5) and got["layer0"]["other"] < 0.9


@pytest.mark.parametrize("write_input", ["layer", "embeddings"])
def test_a_key_match_run_records_it_per_memory_layer(tmp_path, write_input):
    res = mk.main(["--pairs", "2", "--steps", "1", "--eval-samples", "3", "--batch", "2", "--no-baseline",
                   "--key-match", "--memory-layers", "0,1", "--memory-write-input", write_input,
                   "--out", str(tmp_path)])
    assert res["args"]["memory_write_input"] == write_input
    km = res["runs"][0]["key_match"]
    assert sorted(km) == ["layer0", "layer1"] and all(-1 <= v <= 1 for c in km.values() for v in c.values())


@pytest.mark.parametrize("argv,message", [(["--pairs", "0,2"], "--pairs must be 1-8 each"),
                                          (["--pairs", "two"], "--pairs must be comma-separated integers"),
                                          (["--length", "100"], "--length must be >= 168"),
                                          (["--question-gap", "5", "--length", "170"], "--length must be >= 173"),
                                          (["--question-gap", "-1"], "--question-gap must be 0-"),
                                          (["--gap-ramp", "100"], "--gap-ramp must be >= 0, and needs --question-gap"),
                                          (["--memory-conv", "-1"], "--memory-conv must be >= 0"),
                                          (["--memory-lr-scale", "0"], "--memory-lr-scale must be > 0"),
                                          (["--memory-query-pool", "--memory-conv", "1"],
                                           "--memory-query-pool pools the last --memory-conv tokens"),
                                          (["--memory-layers", "2"], "--memory-layers must name layers 0 and/or 1"),
                                          (["--memory-layers", "x"], "--memory-layers must be comma-separated"),
                                          (["--memory-depth", "0"], "--memory-depth and --memory-head-dim must be"),
                                          (["--memory-head-dim", "0"], "--memory-depth and --memory-head-dim must be"),
                                          (["--filler", "noise"], "argument --filler: invalid choice"),
                                          (["--oracle-shift", "--memory-conv", "2"], "--oracle-shift needs"),
                                          (["--oracle-shift", "--memory-conv", "4", "--question-gap", "5"],
                                           "--oracle-shift needs --memory-conv 7 or more"),
                                          (["--plot-only"], "--plot-only needs --out DIR")])
def test_bad_settings_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        mk.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
