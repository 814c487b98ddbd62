"""Training (Lightning) on CPU: the CLI and recipes, W&B offline runs, export, exact resume, non-finite steps,
checkpoint errors, DDP with 2 gloo processes."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightning")

from memsparse.train.cli import main  # noqa: E402
from memsparse.train.data import MemSparseDataModule  # noqa: E402
from memsparse.train.module import (  # noqa: E402
    MemSparseLightningModule,
    NonFiniteTrainingError,
    export_checkpoint,
    load_checkpoint,
    param_groups,
)

from memsparse.model import MemSparseLM  # noqa: E402
from memsparse.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

from cli_config import print_config, reused_parser  # noqa: E402  (tests/ is on sys.path: conftest.py)
from tiny_recipe import tiny_model  # noqa: E402

TINY_MODEL = tiny_model()


def tiny_config(root: Path, **over) -> Path:
    """A tiny CPU recipe (CSV logger, no validation unless asked) written under `root`."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 6,
            "limit_val_batches": 0, "log_every_n_steps": 1, "gradient_clip_val": 1.0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
        },
        "model": {"config": copy.deepcopy(TINY_MODEL), "lr": 3e-3, "warmup_steps": 2, "total_steps": 6, "min_lr": 3e-4},
        "data": {"stdlib_limit": 6, "tokenizer": "byte", "seq_len": 128, "batch_size": 2, "val_fraction": 0.2},
        "last_checkpoint": {"every_n_train_steps": 1},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])  # main(args) is given its arguments
    with reused_parser():  # the CLI's parser built once per process (tests/cli_config.py)
        yield


def csv_losses(root: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(next(root.glob("**/metrics.csv")))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


# --------------------------------------------------------------------------------------------- recipes / CLI


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(recipe, capsys):
    cfg = print_config(["fit", "--config", str(recipe)], capsys)
    from memsparse.config import ModelConfig, from_dict

    from_dict(ModelConfig, cfg["model"]["config"]).validate()  # the model part is a valid ModelConfig
    if isinstance(cfg["trainer"]["val_check_interval"], int):  # else Lightning refuses an interval > one epoch
        assert cfg["trainer"]["check_val_every_n_epoch"] is None


def test_validation_interval_may_exceed_an_epoch(tmp_path):
    """mac_small validates every 1000 batches; on a corpus of fewer batches per epoch (211 on the H100 machine's
    stdlib) Lightning refused to start unless the interval counts batches across epochs."""
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "5000", "--trainer.limit_val_batches", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _resolved(recipe: Path, capsys) -> dict:
    cfg = print_config(["fit", "--config", str(recipe)], capsys)
    cfg["trainer"].pop("default_root_dir")
    return cfg


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix[:-1]]


def test_ablations_differ_from_mac_small_in_one_thing(capsys):
    base = _resolved(REPO / "recipes" / "mac_small.yaml", capsys)
    expected = {
        "ablation_budget_fixed": {"model.config.budget"},
        "ablation_budget_length_scaled": set(),  # the baseline policy under its own name / run dir
        "ablation_budget_top_p": {"model.config.budget"},
        "ablation_no_memory": {"model.config.memory_layers"},
        "ablation_consolidation": {"model.config.consolidation.mode", "model.config.consolidation.train_passes"},
        "mag_small": {"model.config.variant"},
    }
    for name, keys in expected.items():
        assert set(_diff(base, _resolved(REPO / "recipes" / f"{name}.yaml", capsys))) == keys, name


def test_unknown_key_is_named(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"model.config.dimm": 64})
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    assert e.value.code != 0
    assert "dimm" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()  # failed before any work


def test_wrong_type_is_named(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"data.batch_size": "four"})
    with reused_parser(), pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "batch_size" in err and "four" in err
    with reused_parser(), pytest.raises(SystemExit):
        main(["fit", "--config", str(tiny_config(tmp_path / "b")), "--model.lr", "fast"])
    err = capsys.readouterr().err
    assert "model.lr" in err and "fast" in err


def test_missing_data_path(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"data.files": [str(tmp_path / "nope" / "corpus.jsonl")]})
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    assert e.value.code == 2 and "data.files: no data file matches" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ quickstart


def test_quickstart_end_to_end(tmp_path):
    root = tmp_path / "qs"
    # limit_val_batches 2, not 1: the CLI parses the number as a float and Lightning reads 1.0 as all the batches
    main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
          "--data.stdlib_limit", "20", "--data.batch_size", "2",
          "--last_checkpoint.every_n_train_steps", "2"])
    ckpts = {p.name for p in (root / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    ckpt = load_checkpoint(root / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["memsparse"]["model_config"]["dim"] == 64 and ckpt["memsparse"]["tokenizer"]["kind"] == "byte"
    # where the wall time went (validation at steps 2 and 4, a sanity check before)
    times = json.loads((root / "phase_times.json").read_text())
    assert times["validations"] == 2 and times["global_step"] == 4 and len(times["first_batches_s"]) == 4
    assert times["validation_s"] > 0 and times["sanity_check_s"] > 0 and times["setup_s"] > 0
    assert times["first_batches_s"] == sorted(times["first_batches_s"])
    parts = times["to_first_batch_s"] + times["validation_s"] + times["training_s"]
    assert abs(parts - times["fit_s"]) < 0.05 and times["to_first_batch_s"] >= times["sanity_check_s"]
    # W&B offline run with the metrics, the resolved config and the tokenizer
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"val/loss", b"train/memory_surprise", b"train/attn_kept_fraction",
                b"train/tokens_per_s", b"train/grad_norm", b"train/lr", b"time/validation_s", b"time/fit_s"):
        assert key in records, key
    assert (runs[0] / "files" / "config.yaml").is_file()
    assert (runs[0] / "files" / "tokenizer" / "memsparse_tokenizer.json").is_file()
    assert (root / "config.yaml").is_file()
    # export loadable by memsparse-eval's loaders
    model = MemSparseLM.from_pretrained(root / "export")
    tok = load_tokenizer(root / "export")
    assert model.config.vocab_size == tok.vocab_size == 259
    assert model.config.dim == 64
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert torch.isfinite(model(ids, return_logits=True).logits).all()


# -------------------------------------------------------------------------------------------------- resume


class SimulatedCrash(Exception):
    pass


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A tiny 6-step run that crashes at the start of step 4 (a mid-epoch `last.ckpt` of step 3 is left)."""
    import lightning.pytorch as pl

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise SimulatedCrash("simulated preemption")

    root = tmp_path_factory.mktemp("stopped")
    from memsparse.train.cli import cli

    c = cli(["--config", str(tiny_config(root))], run=False)
    c.trainer.callbacks.append(Crash())
    with pytest.raises(SimulatedCrash):
        c.trainer.fit(c.model, datamodule=c.datamodule)
    return root


def test_exact_resume(stopped_run, tmp_path):
    full = tmp_path / "full"
    main(["fit", "--config", str(tiny_config(full))])
    resumed = tmp_path / "resumed"
    main(["fit", "--config", str(tiny_config(resumed)),
          "--ckpt_path", str(stopped_run / "checkpoints" / "last.ckpt")])
    a, b, c = csv_losses(full), csv_losses(stopped_run), csv_losses(resumed)
    assert sorted(a) == [0, 1, 2, 3, 4, 5] and sorted(b) == [0, 1, 2] and sorted(c) == [3, 4, 5]
    for s in (0, 1, 2):
        assert a[s] == b[s]
    for s in (3, 4, 5):
        assert a[s] == c[s], (s, a[s], c[s])
    from safetensors.torch import load_file

    wa, wc = load_file(full / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_keeps_the_memory_lr_scale_it_was_started_with(stopped_run, tmp_path, capsys):
    """The optimizer's groups and the scheduler's base rates are the saved run's. memsparse-train takes a resumed
    run's model hyperparameters from its checkpoint (LightningCLI), so the CLI resumes with the saved scale; a
    module built with another scale and fitted from the checkpoint (the Python API) is refused."""
    from memsparse.config import ConfigError, ModelConfig, from_dict

    last = str(stopped_run / "checkpoints" / "last.ckpt")
    main(["fit", "--config", str(tiny_config(tmp_path / "r")), "--model.memory_lr_scale", "4", "--ckpt_path", last])
    assert "ignored: model.memory_lr_scale=4.0 -> 1.0" in capsys.readouterr().err
    module = MemSparseLightningModule(from_dict(ModelConfig, {**TINY_MODEL, "vocab_size": 259}), total_steps=8,
                                      memory_lr_scale=4.0)
    with pytest.raises(ConfigError, match=r"last\.ckpt was trained with model\.memory_lr_scale=1; resume it with"):
        _trainer(tmp_path / "api", 8).fit(module, datamodule=_datamodule(), ckpt_path=last)


def test_resume_names_the_model_settings_the_checkpoint_replaces(stopped_run, tmp_path, capsys):
    last = str(stopped_run / "checkpoints" / "last.ckpt")
    main(["fit", "--config", str(tiny_config(tmp_path / "same")), "--ckpt_path", last])
    assert "warning: a resumed run keeps" not in capsys.readouterr().err
    main(["fit", "--config", str(tiny_config(tmp_path / "lr")), "--model.lr", "0.01", "--ckpt_path", last])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning: a resumed run keeps" in ln]
    assert len(lines) == 1 and lines[0].endswith("are ignored: model.lr=0.01 -> 0.003"), lines


def test_corrupted_checkpoint_is_a_clear_error(stopped_run, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.ckpt"
    data = (stopped_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for name, path in (("a", bad), ("b", truncated)):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(tiny_config(tmp_path / name)), "--ckpt_path", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"cannot read checkpoint {path}: truncated, corrupted" in err, err
    with pytest.raises(ValueError, match="truncated.ckpt"):
        load_checkpoint(truncated)


def test_mismatched_checkpoint_is_a_clear_error(stopped_run, tmp_path):
    from memsparse.config import ModelConfig, from_dict

    module = MemSparseLightningModule(from_dict(ModelConfig, {**TINY_MODEL, "mlp_hidden": 96, "vocab_size": 259}),
                                      total_steps=8)
    with pytest.raises(ValueError, match=r"last\.ckpt.*mlp_hidden: 64 \(checkpoint\) vs 96"):
        _trainer(tmp_path, 8).fit(module, datamodule=_datamodule(),
                                  ckpt_path=str(stopped_run / "checkpoints" / "last.ckpt"))


def test_checkpoint_is_self_describing(stopped_run, tmp_path):
    out = export_checkpoint(stopped_run / "checkpoints" / "last.ckpt", tmp_path / "exp")
    model = MemSparseLM.from_pretrained(out)
    assert load_tokenizer(out).kind == "byte"

    saved = load_checkpoint(stopped_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- module unit


def test_weight_decay_groups():
    from memsparse.config import ModelConfig, from_dict

    m = MemSparseLM(from_dict(ModelConfig, {**TINY_MODEL, "memory": dict(TINY_MODEL["memory"], depth=2)}))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" in nd and "blocks.0.persistent_k" in nd and "blocks.1.memory.gain" in nd
    assert "blocks.1.memory.init_weights.0" in nd and "blocks.0.norm1.weight" in nd
    assert "blocks.0.wq.weight" in d and "blocks.0.mlp.w12.weight" in d and "blocks.1.memory.to_qkv.weight" in d
    assert d | nd == set(names.values()) and not d & nd


def test_memory_lr_scale_gives_the_memory_its_own_groups_on_the_same_schedule():
    module = _tiny_module(memory_lr_scale=4.0)
    names = {id(p): n for n, p in module.model.named_parameters()}
    memory = module.model.memory_parameter_names()
    assert "blocks.1.memory.to_qkv.weight" in memory and "blocks.1.gate.scale" in memory
    assert not any(n.startswith("blocks.0.") or n == "embed.weight" for n in memory)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert len(groups) == 4 and groups[2] | groups[3] == memory and not (groups[0] | groups[1]) & memory
    assert set().union(*groups) == set(names.values())
    assert [g["weight_decay"] for g in opt.param_groups] == [module.weight_decay, 0.0, module.weight_decay, 0.0]
    for _ in range(3):  # warmup, then the cosine: the memory's rate stays 4x the rest's
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] > 0 and lrs[2] == pytest.approx(4 * lrs[0]) and lrs[3] == lrs[2] and lrs[1] == lrs[0]
    plain = _tiny_module().configure_optimizers()["optimizer"]
    assert len(plain.param_groups) == 2  # the default keeps checkpoints' optimizer layout
    from memsparse.config import ConfigError

    wrapped = torch.nn.ModuleDict({"inner": module.model})  # names no longer match: an error, not one rate for all
    wrapped.memory_parameter_names = module.model.memory_parameter_names
    with pytest.raises(ConfigError, match="found none of the memory's parameters"):
        param_groups(wrapped, 0.1, 1e-3, 4.0)


@pytest.mark.parametrize("kw, words", [({"memory_lr_scale": 0.0}, "model.memory_lr_scale: must be > 0"),
                                       ({"memory_lr_scale": 2.0, "no_memory": True}, "has no memory to scale")])
def test_memory_lr_scale_errors(kw, words):
    from memsparse.config import ConfigError, ModelConfig, from_dict

    cfg = {**TINY_MODEL, "vocab_size": 259}
    if kw.pop("no_memory", False):
        cfg["memory_layers"] = []
    with pytest.raises(ConfigError, match=words):
        MemSparseLightningModule(from_dict(ModelConfig, cfg), **kw)


def _trainer(root: Path, max_steps: int):
    import lightning.pytorch as pl
    from memsparse.train.callbacks import LastCheckpoint

    ckpt = LastCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=1)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt],
                      default_root_dir=str(root))


def _tiny_module(**kw) -> MemSparseLightningModule:
    from memsparse.config import ModelConfig, from_dict

    return MemSparseLightningModule(from_dict(ModelConfig, {**TINY_MODEL, "vocab_size": 259}), lr=3e-3,
                                    warmup_steps=1, total_steps=8, **kw)


def _datamodule() -> MemSparseDataModule:
    return MemSparseDataModule(stdlib_limit=4, tokenizer="byte", seq_len=64, batch_size=2, val_fraction=0.0)


def _inject_nan(module: MemSparseLightningModule, bad_calls: set[int] | None):
    """Make the model's loss NaN on the given training-step calls (None: on every call)."""
    forward = module.model.forward
    calls = {"n": 0}

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if bad_calls is None or calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    module.model.forward = patched


def test_nonfinite_loss_skips_the_step(tmp_path):
    module = _tiny_module()
    _inject_nan(module, {2, 3})
    snapshots = {}

    import lightning.pytorch as pl

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = _trainer(tmp_path, 5)
    trainer.callbacks.append(Snap())
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, datamodule=_datamodule())
    assert module.nonfinite_steps == 2 and module.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # steps 2 and 3 were skipped: the weights after them equal those after step 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["memsparse"]["nonfinite_steps"] == 2


def test_consecutive_nonfinite_stops_with_last_good_checkpoint(tmp_path):
    module = _tiny_module(max_consecutive_nonfinite=3)
    _inject_nan(module, {3, 4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive"):
        trainer = _trainer(tmp_path, 8)
        trainer.fit(module, datamodule=_datamodule())
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # 2 good steps + 2 skipped ones were checkpointed; the 3rd skip stopped
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_phase_times_written_when_fit_stops_on_an_error(tmp_path):
    from memsparse.train.callbacks import PhaseTimes

    module = _tiny_module(max_consecutive_nonfinite=2)
    _inject_nan(module, {2, 3, 4, 5})
    trainer = _trainer(tmp_path, 6)
    trainer.callbacks.append(PhaseTimes(first_batches=2))
    with pytest.raises(NonFiniteTrainingError):
        trainer.fit(module, datamodule=_datamodule())
    times = json.loads((tmp_path / "phase_times.json").read_text())
    assert times["ended_by"].startswith("NonFiniteTrainingError: 2 consecutive")
    assert len(times["first_batches_s"]) == 2 and times["validations"] == 0 and times["training_s"] > 0
    with pytest.raises(ValueError, match="first_batches"):
        PhaseTimes(first_batches=0)


def test_phase_times_says_when_max_time_stopped_the_run(tmp_path):
    """A run that max_time cuts short of max_steps is recorded and warned about (its step count depends on the
    machine); one that reaches max_steps under a generous max_time is not."""
    import warnings

    import lightning.pytorch as pl
    from memsparse.train.callbacks import PhaseTimes

    class Slow(pl.Callback):  # each step takes >= 0.3 s, so a 1-second max_time stops well before 50 steps
        def on_train_batch_end(self, *a):
            time.sleep(0.3)

    def fit(root, max_steps, max_time):
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_time=max_time, logger=False,
                             limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=str(root),
                             callbacks=[PhaseTimes(first_batches=1), Slow()])
        trainer.fit(_tiny_module(), datamodule=_datamodule())
        return trainer, json.loads((root / "phase_times.json").read_text())

    with pytest.warns(UserWarning, match=r"max_time stopped this run at step \d+ of trainer.max_steps 50"):
        trainer, times = fit(tmp_path / "cut", 50, {"seconds": 1})
    assert trainer.global_step < 50 and times["ended_by"] == "max_time"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, times = fit(tmp_path / "full", 2, {"minutes": 10})
    assert trainer.global_step == 2 and "ended_by" not in times
    assert not [w for w in caught if "max_time stopped" in str(w.message)]


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    from memsparse.config import ModelConfig, from_dict

    module = MemSparseLightningModule(from_dict(ModelConfig, {**TINY_MODEL, "vocab_size": 200}), total_steps=2)
    with pytest.raises(ValueError, match=r"vocab_size=200.*259"):
        _trainer(tmp_path, 1).fit(module, datamodule=_datamodule())


def _fit_params(tmp_path: Path, module: MemSparseLightningModule) -> list[torch.Tensor]:
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accumulate_grad_batches=2, gradient_clip_val=0.05, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=_datamodule())
    return [p.detach().clone() for p in module.parameters()]


def test_cuda_graph_step_trains_like_eager(tmp_path, monkeypatch):
    """The graphed step (its static-buffer path, graph=False: CPU) under Lightning with gradient accumulation
    and clipping ends at the eager run's weights."""
    import lightning.pytorch as pl

    from memsparse.cuda_graph import GraphedLoss

    pl.seed_everything(0)
    init = [p.detach().clone() for p in _tiny_module().parameters()]
    pl.seed_everything(0)
    eager = _fit_params(tmp_path / "eager", _tiny_module())
    pl.seed_everything(0)
    module = _tiny_module(cuda_graph=True)
    monkeypatch.setattr(MemSparseLightningModule, "_check_cuda_graph", lambda self: None)
    module._graphed = GraphedLoss(module.model, graph=False)
    graphed = _fit_params(tmp_path / "graphed", module)
    assert module._graphed.replays == 6 and module._graphed.captures == 1
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(a, b) for a, b in zip(eager, init)) > 10  # it trained


def test_cuda_graph_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exclusive"):
        _tiny_module(compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match="float32_matmul_precision"):
        _tiny_module(float32_matmul_precision="fast")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _trainer(tmp_path, 1).fit(_tiny_module(cuda_graph=True), datamodule=_datamodule())


# ------------------------------------------------------------------------------------------- logit adjustment


def test_logit_adjust_counts_labels_and_sets_the_loss_bias():
    module = _tiny_module(logit_adjust=2.0)
    V = module.config.vocab_size
    assert module.model.loss_logit_bias.shape == (V,) and not module.model.loss_logit_bias.any()
    a = torch.tensor([[5, 5, -100, 7], [-100, 5, 9, 9]])
    b = torch.tensor([[7, -100, -100, 1]])
    module._update_logit_bias(a)
    module._update_logit_bias(b)
    want = torch.zeros(V, dtype=torch.float64)
    for t, n in {5: 3, 7: 2, 9: 2, 1: 1}.items():
        want[t] = n
    torch.testing.assert_close(module._label_counts, want, rtol=0, atol=0)
    prior = (want + 1) / (want.sum() + V)
    torch.testing.assert_close(module.model.loss_logit_bias, (2.0 * prior.log()).float())
    assert _tiny_module().model.loss_logit_bias is None  # off by default: plain cross-entropy
    with pytest.raises(ValueError, match="logit_adjust"):
        _tiny_module(logit_adjust=-1.0)


def test_logit_adjust_trains_another_model_and_its_prior_is_checkpointed(tmp_path):
    """The biased loss changes training (not validation or decoding); the counts reach the checkpoint, hold every
    labelled token of the run, and come back on resume."""
    import lightning.pytorch as pl

    pl.seed_everything(0)
    plain = _fit_snapshots(tmp_path / "plain", _tiny_module(), 3)
    pl.seed_everything(0)
    module = _tiny_module(logit_adjust=1.0)
    with pytest.warns(UserWarning, match=r"model.logit_adjust=1 with labels on every token \(the text's tokens\)"):
        adjusted = _fit_snapshots(tmp_path / "adjusted", module, 3)
    assert not all(torch.equal(x, y) for x, y in zip(plain[3], adjusted[3]))
    ckpt = load_checkpoint(tmp_path / "adjusted" / "checkpoints" / "last.ckpt")
    counts = ckpt["memsparse"]["label_counts"]
    torch.testing.assert_close(counts, module._label_counts.cpu(), rtol=0, atol=0)
    assert 3 * 2 * 60 <= float(counts.sum()) <= 3 * 2 * 64  # 3 steps of 2 x 64 tokens, loss on every next token
    assert load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")["memsparse"]["label_counts"] is None
    fresh = _tiny_module(logit_adjust=1.0)
    fresh.on_load_checkpoint(ckpt)
    torch.testing.assert_close(fresh._label_counts, counts, rtol=0, atol=0)
    x = torch.randint(0, 259, (1, 32))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(x, labels=x).loss,
                                   torch.nn.functional.cross_entropy(module.model(x).logits[0], x[0]))


def test_logit_adjust_warns_only_where_every_token_is_labelled(recwarn):
    """The answers-only mixture (no text, synthetic_loss: answer) fits quietly; text or synthetic_loss: all warns."""
    from types import SimpleNamespace as NS

    module = _tiny_module(logit_adjust=2.0)
    for specs, loss, want in [([NS(proportion=0.6), NS(proportion=0.4)], "answer", None),
                              ([NS(proportion=1.0)], "all", r"\(synthetic_loss: all\)"),
                              ([NS(proportion=0.5)], "answer", r"\(the text's tokens\)"),
                              ([NS(proportion=0.5)], "all", r"\(the text's tokens, synthetic_loss: all\)")]:
        module._trainer = NS(datamodule=NS(synthetic=specs, synthetic_loss=loss))
        recwarn.clear()
        module._check_logit_adjust_labels()
        got = [str(w.message) for w in recwarn if "logit_adjust" in str(w.message)]
        assert (got == []) if want is None else (len(got) == 1 and re.search(want, got[0]))
    module._trainer = None


def test_logit_adjust_under_the_graphed_step_trains_like_eager(tmp_path, monkeypatch):
    """GraphedLoss reads the loss bias that each step updates in place."""
    import lightning.pytorch as pl

    from memsparse.cuda_graph import GraphedLoss

    pl.seed_everything(0)
    eager = _fit_params(tmp_path / "eager", _tiny_module(logit_adjust=1.5))
    pl.seed_everything(0)
    module = _tiny_module(cuda_graph=True, logit_adjust=1.5)
    monkeypatch.setattr(MemSparseLightningModule, "_check_cuda_graph", lambda self: None)
    module._graphed = GraphedLoss(module.model, graph=False)
    graphed = _fit_params(tmp_path / "graphed", module)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_under_fsdp_uses_the_wrapped_models_norm_clip(monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; the module clips through FSDP's clip_grad_norm_
    instead (Lightning runs FSDP only on GPUs, so the sharded state is stood in for here)."""
    module = _tiny_module()
    calls = []

    class Wrapped:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)

    class Trainer:
        model = Wrapped()

    monkeypatch.setattr(type(module), "trainer", property(lambda self: Trainer()))
    monkeypatch.setattr(module, "_sharded", lambda: True)
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert calls == [0.5]
    with pytest.raises(ValueError, match="only norm clipping"):
        module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_equals_torchs(monkeypatch, algorithm):
    """Unsharded, the module clips by the norm its on_before_optimizer_step computed (or by value) as
    torch.nn.utils.clip_grad_norm_ / clip_grad_value_ do."""
    torch.manual_seed(0)
    module = _tiny_module()
    monkeypatch.setattr(module, "_sharded", lambda: False)
    params = [p for p in module.parameters()][:6]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    twins = [p.detach().clone().requires_grad_() for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    if algorithm == "norm":
        module._grad_norm = torch.nn.utils.clip_grad_norm_(twins, 0.5)  # the norm before clipping, as the hook's
    else:
        torch.nn.utils.clip_grad_value_(twins, 0.5)
    want = [t.grad for t in twins]
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)
    if algorithm == "norm":
        assert abs(float(torch.stack([p.grad.norm() for p in params]).norm()) - 0.5) < 1e-4
        module._grad_norm = None  # without it the module computes the same norm itself
        for p in params:
            p.grad = p.grad * 10
        module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
        assert abs(float(torch.stack([p.grad.norm() for p in params]).norm()) - 0.5) < 1e-4


def test_optimizer_impl_choice_and_errors(tmp_path, monkeypatch):
    """auto: torch's own AdamW on CPU (fused on CUDA without a grad scaler); fused refused under a scaler."""
    with pytest.raises(ValueError, match="optimizer_impl"):
        _tiny_module(optimizer_impl="apex")
    module = _tiny_module()
    _trainer(tmp_path / "auto", 1).fit(module, datamodule=_datamodule())
    assert not module.optimizers(use_pl_optimizer=False).defaults.get("fused")
    assert module._resolve_optimizer_impl() == "default"
    module = _tiny_module(optimizer_impl="fused")
    _trainer(tmp_path / "fused", 1).fit(module, datamodule=_datamodule())
    assert module.optimizers(use_pl_optimizer=False).defaults["fused"]
    monkeypatch.setattr(type(module.trainer.precision_plugin), "scaler", object(), raising=False)
    with pytest.raises(ValueError, match="without a gradient scaler"):
        module._resolve_optimizer_impl()


def _fit_snapshots(tmp_path, module, steps):
    import lightning.pytorch as pl

    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    trainer = _trainer(tmp_path, steps)
    trainer.callbacks.append(Snap())
    trainer.fit(module, datamodule=_datamodule())
    return snapshots


def test_fused_adamw_skips_nonfinite_steps_on_the_device(tmp_path):
    """With fused AdamW a non-finite step is skipped by the optimizer (found_inf) and counted one step later: the
    weights after the skipped steps equal those before, as on the host path, and the counters and checkpoint
    agree; both paths end at the same weights."""
    torch.manual_seed(0)
    module = _tiny_module(optimizer_impl="fused")
    init = copy.deepcopy(module.state_dict())
    _inject_nan(module, {2, 3})
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradient, optimizer step skipped"):
        snaps = _fit_snapshots(tmp_path / "fused", module, 5)
    assert module.nonfinite_steps == 2 and module.consecutive_nonfinite == 0
    assert all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[3], snaps[4]))
    assert load_checkpoint(tmp_path / "fused" / "checkpoints" / "last.ckpt")["memsparse"]["nonfinite_steps"] == 2
    opt = module.optimizers(use_pl_optimizer=False)
    assert {float(s["step"]) for s in opt.state.values()} == {3.0}  # 5 steps, 2 skipped

    host = _tiny_module()  # torch's default AdamW, the host path
    host.load_state_dict(init)
    _inject_nan(host, {2, 3})
    with pytest.warns(UserWarning, match="non-finite"):
        ref = _fit_snapshots(tmp_path / "host", host, 5)
    for a, b in zip(snaps[5], ref[5]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_adamw_stops_after_consecutive_nonfinite_steps(tmp_path):
    module = _tiny_module(optimizer_impl="fused", max_consecutive_nonfinite=3)
    _inject_nan(module, {3, 4, 5, 6, 7, 8})
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive.*at step 4"):  # as on the host path
        _trainer(tmp_path, 8).fit(module, datamodule=_datamodule())
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # the third skip was counted when its checkpoint was saved: that save stopped
    assert ckpt["memsparse"]["nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """The module's own hooks read a device value on the host (bool / item / tolist / int / float of a tensor) once
    an optimizer step: each such read makes the host wait for the device (H100 profile, docs/performance.md)."""
    import inspect

    import lightning.pytorch as pl
    import memsparse.train.module as mod

    reads = []
    counting = [False]

    def counted(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            if counting[0] and inspect.currentframe().f_back.f_code.co_filename == mod.__file__:
                reads.append((name, inspect.currentframe().f_back.f_lineno))
            return orig(self, *a, **k)
        return f

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    # A Python number given to self.log becomes a tensor on the module's device: a host-to-device copy that waits
    # for the device as a read does. Host numbers are logged as CPU tensors.
    logged = []
    log = MemSparseLightningModule.log

    def log_spy(self, name, value, *a, **k):
        if counting[0]:
            logged.append((name, type(value).__name__, getattr(value, "device", None)))
        return log(self, name, value, *a, **k)

    monkeypatch.setattr(MemSparseLightningModule, "log", log_spy)

    class Window(pl.Callback):
        def on_train_batch_start(self, *a):
            counting[0] = True

        def on_train_batch_end(self, *a):
            counting[0] = False

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         gradient_clip_val=1.0, default_root_dir=str(tmp_path), callbacks=[Window()])
    trainer.fit(_tiny_module(), datamodule=_datamodule())
    assert [name for name, line in reads] == ["tolist"] * 4, reads  # (what, line in train/module.py)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= {n for n, _, _ in logged}
    assert [x for x in logged if x[1] != "Tensor"] == []


def test_lr_schedule():
    from memsparse.train.module import WarmupCosine

    f = WarmupCosine(warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 200))
    assert not math.isnan(f(10))


# ------------------------------------------------------------------------------------------- multi-process


# fused: the skip flag reduced across ranks on the device; "auto" (the same run without it) only in the slow run
@pytest.mark.parametrize("impl", [pytest.param("auto", marks=pytest.mark.slow), "fused"])
def test_ddp_two_cpu_processes_agree(tmp_path, impl):
    root = tmp_path / "ddp"
    cfg = tiny_config(root, **{
        "trainer.strategy": "ddp", "trainer.devices": 2, "trainer.max_steps": 3, "model.optimizer_impl": impl,
        "trainer.callbacks": [{"class_path": "memsparse.train.callbacks.RankAgreementCheck",
                               "init_args": {"output_dir": str(root / "digests")}}],
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PL_DISABLE_FORK": "1"}
    exe = Path(sys.executable).parent / "memsparse-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "memsparse.train.cli"]
    proc = subprocess.run([*cmd, "fit", "--config", str(cfg)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = [json.loads((root / "digests" / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["world_size"] == 2 and digests[0]["step"] == digests[1]["step"] == 3
    assert digests[0]["sha256"] == digests[1]["sha256"]
    assert (root / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("synchronise", [True, False])
def test_cli_closes_the_process_group_before_exit(tmp_path, synchronise):
    """memsparse-train destroys the process group itself (after a barrier when the command succeeded) rather than
    leaving it to interpreter shutdown, where a rank once aborted after a successful DDP run."""
    import torch.distributed as dist
    from memsparse.train.cli import _close_process_group

    _close_process_group(synchronise)  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        _close_process_group(synchronise)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
