"""Retrieval while training (memsparse.train.callbacks.RetrievalEval) and the validation answer-token accuracy
(memsparse.train.module), on CPU with tiny models."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from cli_config import reused_parser  # noqa: E402  (tests/ is on sys.path: conftest.py)
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from memsparse.train.callbacks import RetrievalEval  # noqa: E402
from memsparse.train.cli import main  # noqa: E402
from memsparse.train.data import MemSparseDataModule  # noqa: E402
from memsparse.train.module import MemSparseLightningModule, answer_accuracy_counts  # noqa: E402

from memsparse.config import ModelConfig, from_dict  # noqa: E402

TINY_MODEL = {
    "dim": 32, "depth": 2, "heads": 2, "kv_heads": 1, "head_dim": 16, "mlp_hidden": 64, "block_size": 16,
    "segment": 32, "window": 256, "persistent_tokens": 16, "memory_layers": [1],
    "memory": {"heads": 2, "head_dim": 16, "depth": 1, "chunk_size": 16},
}
GRID = {"every_n_steps": 2, "tasks": "passkey", "lengths": [256, 384], "depths": "0,1", "samples": 1}


@pytest.fixture(autouse=True)
def _argv_and_threads(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with reused_parser():  # the CLI's parser built once per process (tests/cli_config.py)
        yield
    torch.set_num_threads(n)


def _module(**model) -> MemSparseLightningModule:
    cfg = from_dict(ModelConfig, {**copy.deepcopy(TINY_MODEL), "vocab_size": 259, **model})
    return MemSparseLightningModule(cfg, lr=3e-3, warmup_steps=1, total_steps=8)


def _datamodule(**kw) -> MemSparseDataModule:
    args = dict(stdlib_limit=6, tokenizer="byte", seq_len=256, batch_size=2, val_fraction=0.2,
                synthetic=[{"task": "passkey", "proportion": 0.5, "lengths": [256]}])
    args.update(kw)
    return MemSparseDataModule(**args)


def _trainer(root: Path, max_steps: int = 4, callbacks=(), **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                logger=CSVLogger(str(root), name="csv"), log_every_n_steps=1, callbacks=list(callbacks))
    args.update(kw)
    return pl.Trainer(**args)


def _metrics(root: Path) -> list[dict]:
    return list(csv.DictReader(open(next(root.glob("**/metrics.csv")))))


# ------------------------------------------------------------------------------------ validation answer accuracy


def test_answer_accuracy_counts_perfect_random_and_text_rows():
    V, dim, eos = 12, 16, 11
    weight = torch.eye(dim)[:V]  # logits = the first V coordinates of h
    labels = torch.full((3, 10), -100)
    labels[0] = torch.randint(0, 10, (10,))  # a text row: skipped
    labels[1, 4:8], labels[1, 8] = torch.tensor([3, 1, 4, 1]), eos  # answer + eos (the eos is not counted)
    labels[2, 2:5], labels[2, 5] = torch.tensor([5, 9, 2]), eos
    source = torch.tensor([0, 1, 2])
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), dim).float()
    c = answer_accuracy_counts(perfect, weight, labels, source, eos, 3)
    assert c.tolist() == [[0, 4, 3], [0, 4, 3], [0, 1, 1], [0, 1, 1]]
    wrong = perfect.clone()
    wrong[2, 3] = torch.nn.functional.one_hot(torch.tensor(0), dim).float()  # one answer token of row 2 wrong
    c = answer_accuracy_counts(wrong, weight, labels, source, eos, 3)
    assert c[:, 2].tolist() == [2, 3, 0, 1] and c[:, 1].tolist() == [4, 4, 1, 1]
    torch.manual_seed(0)
    big = torch.full((64, 10), -100)
    big[:, 2:8] = torch.randint(0, 10, (64, 6))
    c = answer_accuracy_counts(torch.randn(64, 10, dim), weight, big, torch.ones(64, dtype=torch.long), eos, 2)
    assert c[1, 1] == 384 and c[0, 1] / c[1, 1] < 0.2 and c[2, 1] == 0  # chance level (1/12), no exact row


def test_validation_answer_accuracy_matches_full_logits(tmp_path):
    """The logged val/answer_token_acc equals the argmax accuracy computed from the full logits of the same batches,
    per task; the forward hook is gone after validation."""
    dm = _datamodule()
    module = _module()
    trainer = _trainer(tmp_path, limit_val_batches=1.0)  # text batches first, then the passkey samples
    trainer.validate(module, datamodule=dm, verbose=False)
    logged = trainer.callback_metrics
    correct = tokens = rows = exact = 0
    module.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module.model(batch["input_ids"]).logits
            mask = (batch["labels"] != -100) & (batch["labels"] != dm.tokenizer.eos_id) & (batch["source"][:, None] > 0)
            ok = logits.argmax(-1) == batch["labels"]
            correct, tokens = correct + int((ok & mask).sum()), tokens + int(mask.sum())
            has = mask.any(1)
            rows, exact = rows + int(has.sum()), exact + int((has & (ok | ~mask).all(1)).sum())
    assert tokens > 0 and rows == int((dm.val_dataset.sources() > 0).sum())
    assert float(logged["val/answer_token_acc"]) == pytest.approx(correct / tokens)
    assert float(logged["val/answer_token_acc/passkey"]) == pytest.approx(correct / tokens)
    assert float(logged["val/answer_exact"]) == pytest.approx(exact / rows)
    assert not module.model.norm._forward_hooks


def test_validation_with_the_memory_writes_off(tmp_path):
    """model.val_no_writes: val/no_writes/* are the loss and answer accuracy of the same batches with every memory's
    writes off (checked against the full logits); the writes are on again after; a model without memory logs none."""
    torch.manual_seed(0)
    dm = _datamodule()
    module = _module(window=64)  # 256-token samples: segments leave the window and are written into the memory
    module.val_no_writes = True
    trainer = _trainer(tmp_path, limit_val_batches=1.0)
    trainer.validate(module, datamodule=dm, verbose=False)
    logged = trainer.callback_metrics
    assert all(blk.memory_writes for blk in module.model.blocks)
    correct = tokens = 0
    losses = []
    module.eval()
    module.model.set_memory_writes(False)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = module.model(batch["input_ids"], labels=batch["labels"])
            losses.append((float(out.loss), int((batch["labels"] != -100).sum())))
            mask = (batch["labels"] != -100) & (batch["labels"] != dm.tokenizer.eos_id) & (batch["source"][:, None] > 0)
            ok = out.logits.argmax(-1) == batch["labels"]
            correct, tokens = correct + int((ok & mask).sum()), tokens + int(mask.sum())
    module.model.set_memory_writes(True)
    assert tokens > 0
    assert float(logged["val/no_writes/answer_token_acc/passkey"]) == pytest.approx(correct / tokens)
    mean = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    off, on = float(logged["val/no_writes/loss"]), float(logged["val/loss"])
    assert off != on and abs(off - mean) < abs(off - on) / 10  # the writes-off loss, not the writes-on one
    plain = _module(memory_layers=[])
    plain_module = MemSparseLightningModule(plain.model.config, lr=3e-3, warmup_steps=1, total_steps=8,
                                            val_no_writes=True)
    assert not plain_module.val_no_writes
    trainer = _trainer(tmp_path / "plain", limit_val_batches=1.0)
    trainer.validate(plain_module, datamodule=dm, verbose=False)
    assert not [k for k in trainer.callback_metrics if "no_writes" in k]


def test_no_answer_accuracy_without_answer_masks(tmp_path):
    trainer = _trainer(tmp_path, limit_val_batches=2)
    trainer.validate(_module(), datamodule=_datamodule(synthetic_loss="all"), verbose=False)
    assert "val/loss" in trainer.callback_metrics
    assert not any(k.startswith("val/answer") for k in trainer.callback_metrics)


# ------------------------------------------------------------------------------------------- RetrievalEval


class TrainModeProbe(pl.Callback):
    """Records, at every training batch start, whether the model is in train mode."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.model.training)


def test_callback_in_a_tiny_fit(tmp_path):
    """Every 2 steps the grid runs; keys reach the CSV logger; cells.csv/jsonl and heatmaps are written; the model
    is back in train mode; the training losses are those of the same fit without the callback."""
    root = tmp_path / "with"
    probe = TrainModeProbe()
    cb = RetrievalEval(**GRID)
    pl.seed_everything(0)
    _trainer(root, callbacks=[cb, probe]).fit(_module(), datamodule=_datamodule(synthetic=[]))
    rows = _metrics(root)
    keys = {k for r in rows for k, v in r.items() if v}
    for key in ("retrieval/passkey/256/acc", "retrieval/passkey/384/acc", "retrieval/passkey/256/tf_exact",
                "retrieval/passkey/384/tf_token_acc", "retrieval/acc", "retrieval/tf_exact", "retrieval/tf_token_acc",
                "retrieval/passkey/256/tf_stop", "retrieval/tf_stop", "retrieval/wall_s"):
        assert key in keys, key
    evals = [r for r in rows if r.get("retrieval/acc")]
    assert [int(r["step"]) for r in evals] == [2, 4]
    assert all(0.0 <= float(r["retrieval/tf_token_acc"]) <= 1.0 and float(r["retrieval/wall_s"]) > 0 for r in evals)
    out = root / "retrieval"
    cells = list(csv.DictReader(open(out / "cells.csv")))
    assert len(cells) == 2 * 2 * 2  # steps x lengths x depths
    assert {(c["step"], c["length"], c["depth"], c["in_window"]) for c in cells} == {
        (s, n, d, w) for s in ("2", "4") for n, w in (("256", "True"), ("384", "False")) for d in ("0.0", "1.0")}
    lines = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(len(x["samples"]) == 1 and "tf_prediction" in x["samples"][0] for x in lines)
    for step in (2, 4):
        png = out / f"heatmap_passkey_step{step}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert probe.modes and all(probe.modes)
    assert cb.last_step == 4

    pl.seed_everything(0)
    plain = tmp_path / "without"
    _trainer(plain).fit(_module(), datamodule=_datamodule(synthetic=[]))
    loss = [{int(r["step"]): r["train/loss"] for r in _metrics(d) if r.get("train/loss")} for d in (root, plain)]
    assert loss[0] == loss[1] and len(loss[0]) == 4


def test_callback_no_writes_runs_the_grid_again_with_the_memory_writes_off(tmp_path, monkeypatch):
    """no_writes: each evaluation also runs with the memory's writes off (cells with memory_writes false, metrics
    under retrieval/no_writes/, their own heatmap), predicting what memsparse-eval's --no-memory-writes path does on
    the same weights; the writes are on again for training. A model without memory layers runs the grid once."""
    import memsparse.train.callbacks as callbacks

    seen, real = [], callbacks.run_eval

    def spy(model, *a, **kw):  # the writes flag of every block while the grid runs
        seen.append({blk.memory_writes for blk in model.blocks})
        return real(model, *a, **kw)

    monkeypatch.setattr(callbacks, "run_eval", spy)
    cb = RetrievalEval(**{**GRID, "lengths": [384]}, no_writes=True)
    pl.seed_everything(0)
    module = _module()
    dm = _datamodule(synthetic=[])
    _trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(module, datamodule=dm)
    out = tmp_path / "retrieval"
    cells = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert [c["memory_writes"] for c in cells] == [True, True, False, False]
    assert [r["memory_writes"] for r in csv.DictReader(open(out / "cells.csv"))] == ["True", "True", "False", "False"]
    keys = {k for r in _metrics(tmp_path) for k, v in r.items() if v}
    assert {"retrieval/no_writes/acc", "retrieval/no_writes/passkey/384/acc", "retrieval/acc"} <= keys
    assert (out / "heatmap_passkey_no_writes_step2.png").stat().st_size > 1000
    model = module.model
    assert seen == [{True}, {False}] and all(blk.memory_writes for blk in model.blocks)
    from memsparse.eval.harness import run_eval

    model.set_memory_writes(False)
    again = run_eval(model, dm.tokenizer, cb.plan, torch.device("cpu"), progress=False, warmup=False,
                     cuda_graph=False, teacher_forced=True, inference_mode=False, measure_memory=False)
    model.set_memory_writes(True)
    assert [s["tf_prediction"] for c in again for s in c["samples"]] == [
        s["tf_prediction"] for c in cells[2:] for s in c["samples"]]

    plain = RetrievalEval(**{**GRID, "lengths": [384]}, no_writes=True)
    pl.seed_everything(0)
    _trainer(tmp_path / "no_memory", max_steps=2, callbacks=[plain]).fit(_module(memory_layers=[]),
                                                                         datamodule=_datamodule(synthetic=[]))
    rows = list(csv.DictReader(open(tmp_path / "no_memory" / "retrieval" / "cells.csv")))
    assert [r["memory_writes"] for r in rows] == ["True", "True"]

    every = RetrievalEval(**{**GRID, "lengths": [384]}, no_writes=True)  # memory_layers None: memory in every layer
    pl.seed_everything(0)
    _trainer(tmp_path / "every", max_steps=2, callbacks=[every]).fit(_module(memory_layers=None),
                                                                     datamodule=_datamodule(synthetic=[]))
    rows = list(csv.DictReader(open(tmp_path / "every" / "retrieval" / "cells.csv")))
    assert [r["memory_writes"] for r in rows] == ["True", "True", "False", "False"]


@pytest.mark.parametrize("max_steps,at_end,steps", [(3, True, [2, 3]), (4, True, [2, 4]), (3, False, [2])])
def test_callback_at_end(tmp_path, max_steps, at_end, steps):
    """at_end: the grid also runs at the fit's last step unless the schedule just evaluated it (never twice); its
    cells reach cells.csv and its metrics the CSV logger after training has ended."""
    cb = RetrievalEval(**{**GRID, "lengths": [256]}, at_end=at_end)
    pl.seed_everything(0)
    _trainer(tmp_path, max_steps=max_steps, callbacks=[cb]).fit(_module(), datamodule=_datamodule(synthetic=[]))
    cells = list(csv.DictReader(open(tmp_path / "retrieval" / "cells.csv")))
    assert [int(c["step"]) for c in cells] == [s for s in steps for _ in range(2)]  # 2 depths a step
    assert [int(r["step"]) for r in _metrics(tmp_path) if r.get("retrieval/acc")] == steps
    assert cb.last_step == steps[-1]


def test_a_fresh_fit_starts_its_own_cells_and_a_resumed_one_appends(tmp_path):
    """A second fresh fit in the same directory moves the first run's cells and heatmaps to retrieval/earlier/
    (the by-step tables then hold one run); a fit resumed from a checkpoint appends to its run's cells."""
    grid = {**GRID, "lengths": [256]}
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    pl.seed_everything(0)
    _trainer(tmp_path, max_steps=2, callbacks=[RetrievalEval(**grid), ckpt], enable_checkpointing=True).fit(
        _module(), datamodule=_datamodule(synthetic=[]))
    out = tmp_path / "retrieval"
    first = (out / "cells.jsonl").read_text()
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="earlier run's cells"):
        _trainer(tmp_path, max_steps=4, callbacks=[RetrievalEval(**grid)]).fit(
            _module(), datamodule=_datamodule(synthetic=[]))
    assert [int(c["step"]) for c in csv.DictReader(open(out / "cells.csv"))] == [2, 2, 4, 4]
    (earlier,) = (out / "earlier").iterdir()
    assert (earlier / "cells.jsonl").read_text() == first
    assert sorted(p.name for p in earlier.iterdir()) == ["cells.csv", "cells.jsonl", "heatmap_passkey_step2.png"]
    assert sorted(p.name for p in out.glob("heatmap_*")) == ["heatmap_passkey_step2.png", "heatmap_passkey_step4.png"]

    root = tmp_path / "resumed"
    pl.seed_everything(0)
    _trainer(root, max_steps=2, callbacks=[RetrievalEval(**grid), ckpt], enable_checkpointing=True).fit(
        _module(), datamodule=_datamodule(synthetic=[]))
    pl.seed_everything(0)
    _trainer(root, max_steps=4, callbacks=[RetrievalEval(**grid)]).fit(
        _module(), datamodule=_datamodule(synthetic=[]), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [int(c["step"]) for c in csv.DictReader(open(root / "retrieval" / "cells.csv"))] == [2, 2, 4, 4]
    assert not (root / "retrieval" / "earlier").exists()


def test_callback_from_the_recipe_yaml(tmp_path):
    """The recipes' form (trainer.callbacks class_path/init_args) through memsparse-train, beside the default
    callbacks (PhaseTimes still writes its file); with gradient accumulation the evaluation runs once per step."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 3,
                    "accumulate_grad_batches": 2,
                    "limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path)}},
                    "callbacks": [{"class_path": "memsparse.train.callbacks.RetrievalEval",
                                   "init_args": {**GRID, "lengths": "256"}}]},
        "model": {"config": copy.deepcopy(TINY_MODEL), "lr": 3e-3, "warmup_steps": 1, "total_steps": 3},
        "data": {"stdlib_limit": 4, "tokenizer": "byte", "seq_len": 128, "batch_size": 2, "val_fraction": 0.0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    cells = list(csv.DictReader(open(tmp_path / "retrieval" / "cells.csv")))
    assert [c["step"] for c in cells] == ["2", "2"]  # one length x 2 depths, once (not again on step 3's first half)
    assert any(r.get("retrieval/passkey/256/acc") for r in _metrics(tmp_path))
    assert (tmp_path / "phase_times.json").is_file()


def test_batch_none_streams_every_prompt_of_a_length_together():
    assert RetrievalEval(samples=3, depths="0,1", batch=None).plan.batch == 6
    assert RetrievalEval(samples=3).plan.batch == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"tasks": "passkey,nope"}, "unknown task 'nope'"),
    ({"at_end": "yes"}, "at_end must be true or false"),
    ({"no_writes": 1}, "no_writes must be true or false"),
    ({"lengths": "1k,3q"}, "cannot parse length '3q'"),
    ({"depths": "0,2"}, "outside [0, 1]"),
    ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
    ({"samples": 0}, "samples must be an integer >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"batch": 0}, "batch must be an integer >= 1"),
])
def test_misconfiguration_is_a_one_line_error_at_construction(kwargs, message):
    with pytest.raises(ValueError) as e:
        RetrievalEval(**kwargs)
    assert message in str(e.value) and str(e.value).startswith("RetrievalEval: ") and "\n" not in str(e.value)


def test_misconfigured_recipe_fails_before_training(tmp_path, capsys):
    cfg = {"trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "default_root_dir": str(tmp_path),
                       "callbacks": [{"class_path": "memsparse.train.callbacks.RetrievalEval",
                                      "init_args": {"tasks": "nope"}}]},
           "model": {"config": copy.deepcopy(TINY_MODEL)},
           "data": {"stdlib_limit": 4, "tokenizer": "byte", "seq_len": 128, "batch_size": 2}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:  # the ConfigError inside jsonargparse's union error, as one line
        main(["fit", "--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("memsparse-train: error: RetrievalEval: unknown task 'nope'"), err
    assert not (tmp_path / "checkpoints").exists()


def test_length_below_the_prompt_overhead_fails_at_setup(tmp_path):
    cb = RetrievalEval(every_n_steps=1, tasks="passkey", lengths="100,256")
    with pytest.raises(ValueError, match=r"RetrievalEval: .*passkey needs >= \d+ tokens, got 100"):
        _trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(_module(), datamodule=_datamodule(synthetic=[]))
    assert not (tmp_path / "retrieval").exists()


@pytest.mark.slow
def test_ddp_only_rank_zero_evaluates(tmp_path):
    """Two gloo processes: rank 0 evaluates, rank 1 waits; both finish with the same weights. Validation (every 2
    steps) logs the answer-token accuracy summed over both ranks."""
    root = tmp_path / "ddp"
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true", "max_steps": 4,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False,
                    "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(root)}},
                    "callbacks": [{"class_path": "memsparse.train.callbacks.RetrievalEval", "init_args": GRID},
                                  {"class_path": "memsparse.train.callbacks.RankAgreementCheck",
                                   "init_args": {"output_dir": str(root / "digests")}}]},
        # window 64 < seq_len: every memory parameter is used each step (DDP checks)
        "model": {"config": {**copy.deepcopy(TINY_MODEL), "window": 64}, "lr": 3e-3, "warmup_steps": 1,
                  "total_steps": 4},
        "data": {"stdlib_limit": 6, "tokenizer": "byte", "seq_len": 256, "batch_size": 2, "val_fraction": 0.2,
                 "synthetic": [{"task": "passkey", "proportion": 0.5, "lengths": [256]}]},
    }
    root.mkdir(parents=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PL_DISABLE_FORK": "1"}
    exe = Path(sys.executable).parent / "memsparse-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "memsparse.train.cli"]
    proc = subprocess.run([*cmd, "fit", "--config", str(root / "tiny.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cells = list(csv.DictReader(open(root / "retrieval" / "cells.csv")))
    assert sorted({c["step"] for c in cells}) == ["2", "4"] and len(cells) == 8  # rank 0 alone wrote them
    digests = [json.loads((root / "digests" / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["sha256"] == digests[1]["sha256"] and digests[0]["step"] == 4
    val = [r for r in _metrics(root) if r.get("val/answer_token_acc/passkey")]
    assert len(val) == 2 and all(0.0 <= float(r["val/answer_exact"]) <= 1.0 for r in val)


def test_off_under_fsdp():
    """Lightning runs FSDP on GPUs only: the strategy object stands in for the run here."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cb = RetrievalEval(every_n_steps=1)
    with pytest.warns(UserWarning, match="RetrievalEval is off: FSDP"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")
    trainer = SimpleNamespace(global_step=1)
    cb.evaluate = lambda *a: pytest.fail("evaluated under FSDP")
    cb.on_train_batch_end(trainer, None, None, None, 0)
