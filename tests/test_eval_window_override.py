"""`memsparse-eval --window N` / `EvalPlan(window=N)` / `MemSparseLM.set_window`: an inference-time attention window.

Tiny random model on CPU (segment 32, window 64, as tests/test_eval_harness.py builds it): the trained window as an
override changes nothing; a longer window streams exactly what a model built with that window computes in one shot;
a bad window is one line and exit code 2 before the model is loaded; results.json/csv record the window.
"""

import csv
import json

import pytest
import torch
from memsparse.eval import cli, harness
from memsparse.eval.harness import EvalInputError

from memsparse.config import ConfigError, ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.cuda_graph import GraphedStream
from memsparse.model import MemSparseLM
from memsparse.tokenizer import ByteTokenizer


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                segment=32, window=64, persistent_tokens=8, budget="top_p:p=0.7,min=2",
                consolidation=ConsolidationConfig(mode="schedule", a=1.0, n_max=4),
                memory=MemoryConfig(heads=2, head_dim=8, chunk_size=32))
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    MemSparseLM(tiny_config()).save_pretrained(d)
    ByteTokenizer().save(d)
    return d


def _args(ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--out", str(out), "--no-progress", "--no-wandb", "--tasks", "passkey",
            "--depths", "0.5", *extra]


def _read(out):
    data = json.loads((out / "results.json").read_text())
    with (out / "results.csv").open() as f:
        return data, list(csv.DictReader(f))


def _same_weights(model: MemSparseLM, **cfg) -> MemSparseLM:
    """A model built with `cfg` changed, carrying `model`'s weights (none of them depends on the window)."""
    other = MemSparseLM(tiny_config(**cfg)).to(next(model.parameters()).dtype).eval()
    other.load_state_dict(model.state_dict())
    return other


# ------------------------------------------------------------------------------------------------ the model
def test_longer_window_stream_equals_one_shot_of_a_model_built_with_it():
    torch.manual_seed(0)
    model = MemSparseLM(tiny_config()).double().eval()
    ref = _same_weights(model, window=256)
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(1))
    want = ref(ids).logits  # one shot, window 256: segments leaving it (tokens < 600 - 256 - 24) are evicted
    model.set_window(256)
    assert all(b.cfg.window == 256 for b in model.blocks)
    state = model.init_state(1, total_length=600)
    out, i = [], 0
    for n in (5, 27, 100, 1, 211, 256):  # chunks that start and end mid-block and mid-segment
        lg, state = model.stream(ids[:, i:i + n], state)
        out.append(lg)
        i += n
    torch.testing.assert_close(torch.cat(out, 1), want, rtol=1e-9, atol=1e-9)
    assert all(ls.k.shape[2] == 256 + 600 % 32 for ls in state.layers)  # the longer window's cache
    # the static-buffer path the CUDA graphs replay honours it too
    streamer = GraphedStream(model, graph=False)
    logits, _ = streamer(ids, model.init_state(1, total_length=600))
    torch.testing.assert_close(logits, want, rtol=1e-9, atol=1e-9)
    assert streamer.replays > 0 and all(key[5] == 256 for key in streamer.steps)  # steps keyed by the window
    # and it is not the trained window's function
    model.set_window(64)
    assert (model(ids).logits - want).abs().max() > 1e-6


def test_set_window_rejects_bad_values_and_stale_states():
    model = MemSparseLM(tiny_config()).eval()
    for bad in (48, 0, 16, -32, 64.0, True):
        with pytest.raises(ConfigError, match="window: must be a positive multiple of segment=32"):
            model.set_window(bad)
    assert model.config.window == 64
    ids = torch.randint(0, 256, (1, 200))
    _, state = model.stream(ids)  # cache of window 64
    model.set_window(128)
    with pytest.raises(ValueError, match="streamed with another attention window"):
        model.stream(ids[:, :5], state)
    model.stream(ids[:, :5])  # a fresh stream is fine


# ------------------------------------------------------------------------------------------------ the harness
def test_overrides_apply_and_restore_the_window(ckpt):
    model = MemSparseLM.from_pretrained(ckpt)
    with harness.overrides(model, budget="dense", window="256"):
        assert model.config.window == 256 and all(b.cfg.window == 256 for b in model.blocks)
    assert model.config.window == 64 and all(b.cfg.window == 64 for b in model.blocks)
    with pytest.raises(EvalInputError, match="not a multiple of the model's segment"):
        with harness.overrides(model, window=100):
            pass
    assert model.config.window == 64 and model.config.budget == "top_p:p=0.7,min=2"
    assert harness.parse_window("1k", 32) == 1024
    with pytest.raises(EvalInputError, match="cannot parse length"):
        harness.parse_window("3q", 32)


def test_python_api_window_matches_a_model_trained_with_it(ckpt):
    """EvalPlan(window=...) on the checkpoint gives the rows of a model whose config has that window."""
    model = MemSparseLM.from_pretrained(ckpt)
    kw = dict(progress=False, warmup=False)
    plan = harness.EvalPlan(["passkey"], [512], [0.5], window=256)
    rows = harness.run_eval(model, ByteTokenizer(), plan, "cpu", **kw)
    ref = harness.run_eval(_same_weights(model, window=256), ByteTokenizer(), harness.EvalPlan(["passkey"], [512],
                                                                                                [0.5]), "cpu", **kw)
    assert model.config.window == 64  # restored
    for key in ("window", "consolidation_passes", "attn_kept_blocks", "tf_token_acc"):
        assert rows[0][key] == ref[0][key], key
    assert rows[0]["window"] == 256 and rows[0]["consolidation_passes"] == 1  # round(log2(512 / 256))
    assert rows[0]["samples"][0]["prediction"] == ref[0]["samples"][0]["prediction"]
    with pytest.raises(EvalInputError, match="not a multiple"):
        harness.run_eval(model, ByteTokenizer(), harness.EvalPlan(["passkey"], [512], [0.5], window=40), "cpu", **kw)


# ------------------------------------------------------------------------------------------------ the CLI
def _strip(cells):
    drop = {"wall_s", "tf_wall_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_growth_bytes"}
    return [{k: v for k, v in c.items() if k not in drop} for c in cells]


def test_trained_window_override_is_identical_to_none(tmp_path, ckpt):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(_args(ckpt, a, "--lengths", "384")) == 0
    assert cli.main(_args(ckpt, b, "--lengths", "384", "--window", "64")) == 0
    da, ra = _read(a)
    db, rb = _read(b)
    assert _strip(da["cells"]) == _strip(db["cells"]) and da["summary"] == db["summary"]
    assert [r["accuracy"] for r in ra] == [r["accuracy"] for r in rb]
    assert da["meta"]["window"] == db["meta"]["window"] == da["meta"]["model_window"] == 64


def test_budget_sweep_with_a_longer_window_records_it(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(ckpt, out, "--lengths", "512", "--window", "0.25k",
                          "--sweep", "budget=dense;fixed:2")) == 0
    assert "attention window 256 tokens (the checkpoint's: 64)" in capsys.readouterr().err
    data, rows = _read(out)
    assert data["meta"]["window"] == 256 and data["meta"]["model_window"] == 64
    assert data["meta"]["model_config"]["window"] == 64  # the checkpoint's own config, as trained
    assert {c["sweep_value"] for c in data["cells"]} == {"dense", "fixed:2"}
    assert all(c["window"] == 256 for c in data["cells"]) and all(s["window"] == 256 for s in data["summary"])
    assert [r["window"] for r in rows] == ["256", "256"]
    kept = {c["sweep_value"]: c["attn_kept_blocks"] for c in data["cells"]}
    # dense sees persistent + up to 256 + 32 tokens: more key blocks than the trained window's at most 14
    assert kept["dense"] > (8 + 64 + 32) // 8 + 1 > kept["fixed:2"]


@pytest.mark.parametrize("window,message", [
    ("100", "window 100 is not a multiple of the model's segment (32 tokens): use a positive multiple of 32"),
    ("16", "window 16 is not a multiple of the model's segment"),
    ("3q", "window: cannot parse length '3q'"),
])
def test_bad_window_is_one_line_and_exit_2(tmp_path, ckpt, capsys, monkeypatch, window, message):
    def boom(*a, **k):
        raise AssertionError("model work started before the window was validated")

    monkeypatch.setattr(MemSparseLM, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(cli, "run_eval", boom)
    with pytest.raises(SystemExit) as e:
        cli.main(_args(ckpt, tmp_path / "out", "--lengths", "512", "--window", window))
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if not x.startswith(("usage:", " "))]
    assert line.startswith("memsparse-eval: error: ") and message in line and "Traceback" not in err
    assert not (tmp_path / "out").exists()
