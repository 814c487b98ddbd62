"""Callbacks of `memsparse-train`: the resolved config + tokenizer logged to the run, a logger-safe LR monitor,
a breakdown of the run's wall time, and a cross-rank weight-agreement check for multi-process runs."""

from __future__ import annotations

import hashlib
import json
import time
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


class PhaseTimes(Callback):
    """Where a fit's wall time went: set-up before fit (data, tokenizer, strategy), fit start to the first
    training batch (sanity check included), the first training batches (compilation, autotuning, CUDA-graph
    capture), validation, and the training loop (checkpoints and logging included).

    Rank 0 writes `<default_root_dir>/phase_times.json` at the end of fit (also when fit stops on an exception,
    with `ended_by`), prints a one-line summary and logs the figures as `time/*` metrics. On CUDA the device is
    synchronised at each phase boundary (a handful of times per validation, never inside the steady loop) so
    queued GPU work is charged to the phase that queued it.
    """

    def __init__(self, first_batches: int = 5) -> None:
        if first_batches < 1:
            raise ValueError(f"first_batches must be >= 1, got {first_batches}")
        self.first_batches = first_batches
        self._created = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._fit_start = self._first_batch = self._val_start = None
        self._batch_ends: list[float] = []
        self.validation_s, self.validations, self.sanity_check_s = 0.0, 0, 0.0

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        dev = trainer.strategy.root_device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._fit_start = self._now(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self._now(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is None:
            return
        spent = self._now(trainer) - self._val_start
        self._val_start = None
        if trainer.sanity_checking:
            self.sanity_check_s += spent
        else:
            self.validation_s += spent
            self.validations += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._first_batch is None:
            self._first_batch = self._now(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._first_batch is not None and len(self._batch_ends) < self.first_batches:
            self._batch_ends.append(self._now(trainer) - self._first_batch)

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The figures so far, in seconds (None for a phase not reached)."""
        end = self._now(trainer)
        fit_start = self._fit_start if self._fit_start is not None else end
        out: dict[str, Any] = {
            "setup_s": fit_start - self._created,
            "fit_s": end - fit_start,
            "to_first_batch_s": None if self._first_batch is None else self._first_batch - fit_start,
            "sanity_check_s": self.sanity_check_s,
            "first_batches_s": list(self._batch_ends),
            "validation_s": self.validation_s,
            "validations": self.validations,
            "global_step": trainer.global_step,
        }
        if self._first_batch is not None:  # the loop's own time: all after the first batch but validation
            out["training_s"] = end - self._first_batch - self.validation_s
        return out

    def _write(self, trainer: pl.Trainer, ended_by: str | None = None) -> None:
        times = self.summary(trainer)
        if ended_by:
            times["ended_by"] = ended_by
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "phase_times.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(times, indent=1) + "\n")
        first = times["first_batches_s"]
        rank_zero_info(
            f"wall time: set-up {times['setup_s']:.1f}s, fit {times['fit_s']:.1f}s = to first batch "
            f"{(times['to_first_batch_s'] or 0.0):.1f}s + validation {times['validation_s']:.1f}s "
            f"({times['validations']}x) + training {times.get('training_s', 0.0):.1f}s; first "
            f"{len(first)} batches {first[-1] if first else 0.0:.1f}s ({path})")
        metrics = {f"time/{k}": float(v) for k, v in times.items() if isinstance(v, (int, float))}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._fit_start is not None:
            self._write(trainer, ended_by=f"{type(exception).__name__}: {str(exception)[:200]}")
