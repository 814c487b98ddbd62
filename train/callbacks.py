"""Callbacks of `memsparse-train`: the resolved config + tokenizer logged to the run, a logger-safe LR monitor,
and a cross-rank weight-agreement check for multi-process runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps and at the end of training, whether or not
    validation ran (the best-by-val-loss checkpoint is a separate `ModelCheckpoint`). Never written on an
    exception, so a run stopped by non-finite losses keeps its last good checkpoint."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500, verbose: bool = False) -> None:
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, verbose=verbose,
                         every_n_train_steps=every_n_train_steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SafeLearningRateMonitor(LearningRateMonitor):
    """`LearningRateMonitor` that does nothing (instead of failing) when the trainer has no logger."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.loggers:
            self.logging_interval = "never"
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved YAML to the run directory (`config.yaml`, as Lightning does) and, for W&B, logs the
    full config, the YAML file and the tokenizer files to the run."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        config_path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename
        dm = getattr(trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        for lg in loggers:
            run = lg.experiment
            resolved = self.parser.dump(self.config, skip_none=False, format="json")
            run.config.update({"resolved_config": json.loads(resolved)}, allow_val_change=True)
            files_dir = Path(run.dir)
            if config_path.is_file():
                (files_dir / "config.yaml").write_text(config_path.read_text())
                run.save(str(files_dir / "config.yaml"), base_path=str(files_dir), policy="now")
            if tok is not None:
                tok_dir = files_dir / "tokenizer"
                tok.save(tok_dir)
                for f in sorted(tok_dir.iterdir()):
                    run.save(str(f), base_path=str(files_dir), policy="now")


class RankAgreementCheck(Callback):
    """At the end of fit, every rank hashes its weights; a mismatch between ranks is an error.

    With `output_dir`, each rank also writes `weights_rank<r>.json` (its hash and parameter count) there.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir

    @staticmethod
    def weights_digest(module: torch.nn.Module) -> str:
        h = hashlib.sha256()
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = self.weights_digest(pl_module)
        if self.output_dir is not None:
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"weights_rank{trainer.global_rank}.json").write_text(json.dumps(
                {"rank": trainer.global_rank, "world_size": trainer.world_size, "sha256": digest,
                 "step": trainer.global_step}))
        if trainer.world_size > 1:
            digests = trainer.strategy.all_gather(torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64,
                                                               device=pl_module.device))
            if not bool((digests == digests[0]).all()):
                raise RuntimeError("ranks disagree on the weights after fit: the replicas diverged")
            rank_zero_info(f"all {trainer.world_size} ranks agree on the weights (sha256 {digest[:16]})")
