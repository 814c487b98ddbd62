"""Callbacks of `memsparse-train`: the resolved config + tokenizer logged to the run, a logger-safe LR monitor,
a breakdown of the run's wall time, a cross-rank weight-agreement check for multi-process runs, and retrieval
evaluation while training (the `memsparse-eval` harness on a small grid every N steps)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from memsparse.eval.harness import (
    EvalInputError,
    EvalPlan,
    check_plan,
    parse_depths,
    parse_lengths,
    parse_tasks,
    run_eval,
    summarize,
)

from memsparse.config import ConfigError


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps and at the end of training, whether or not
    validation ran (the best-by-val-loss checkpoint is a separate `ModelCheckpoint`). Never written on an
    exception, so a run stopped by non-finite losses keeps its last good checkpoint.

    A stop asked for from outside is not an exception: the first Ctrl-C (SIGINT; the handler is installed while
    training runs, from the main thread, unless SIGINT is ignored) or a SIGTERM (Lightning's signal connector sets
    `trainer.received_sigterm`) saves `last.ckpt` at the end of the current optimizer step (the last batch of a
    gradient-accumulation cycle), where the periodic saves happen, so a resume from it is as exact as from those;
    training stops there (`trainer.should_stop`) and `stopped_by` says why ("SIGINT" or "SIGTERM"). After a Ctrl-C
    the fit returns; after a SIGTERM Lightning raises its `SIGTERMException`, after the step (its own check would
    have stopped inside an accumulation cycle, without a checkpoint). No validation runs for the stop, except one
    that Lightning's schedule has at that step anyway (after a Ctrl-C). A second Ctrl-C restores the previous
    handler and raises KeyboardInterrupt: training stops at once, through Lightning's interrupt path, without
    saving. With several processes the ranks agree on the step (any rank's signal counts), so all save there.
    """

    CTRL_C_MESSAGE = ("memsparse-train: Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again to stop "
                      "at once, without saving)")

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500, verbose: bool = False) -> None:
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, verbose=verbose,
                         every_n_train_steps=every_n_train_steps)
        self.stopped_by: str | None = None
        self._sigint_requested = False
        self._previous_sigint: Any = None
        self._sigint_installed = False
        self._announce = False
        self._step_at_batch_start: int | None = None
        self._sigterm_held = False

    # ------------------------------------------------------------------------------------------- signals

    def _install_sigint(self, trainer: pl.Trainer) -> None:
        if self._sigint_installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):  # ignored (a background job) or not set from Python: leave it so
            return
        self._previous_sigint, self._sigint_installed = previous, True
        self._announce = trainer.is_global_zero
        signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if not self._sigint_installed:
            return
        self._sigint_installed = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._sigint_requested:  # the second Ctrl-C: stop now, through Lightning's KeyboardInterrupt path
            self._restore_sigint()
            raise KeyboardInterrupt
        self._sigint_requested = True
        if self._announce:
            line = self.CTRL_C_MESSAGE + "\n"
            try:
                sys.stderr.write("\n" + line if _on_a_terminal(sys.stderr) else line)  # past a progress bar's line
                sys.stderr.flush()
            except (RuntimeError, OSError, ValueError):  # stderr busy in the interrupted frame: write to the fd
                os.write(2, line.encode())

    # -------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.stopped_by, self._sigint_requested, self._sigterm_held = None, False, False
        self._install_sigint(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        connector = getattr(trainer, "_signal_connector", None)
        can_hold = hasattr(connector, "received_sigterm")
        if trainer.global_step == self._step_at_batch_start:  # inside a gradient-accumulation cycle
            if trainer.received_sigterm and can_hold:
                # Lightning would raise its SIGTERMException after this batch, before the optimizer step, where no
                # checkpoint resumes exactly: hold the flag until the step has ended (then it raises it there).
                connector.received_sigterm, self._sigterm_held = False, True
            return  # stop only where an optimizer step ended (on every rank alike)
        several = trainer.world_size > 1  # then one decision for all ranks: all save (a collective) at this step

        def any_rank(flag: bool) -> bool:
            return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if several else flag

        got_sigterm = trainer.received_sigterm or self._sigterm_held
        if not any_rank(self._sigint_requested or got_sigterm):
            return
        sigterm = any_rank(got_sigterm)
        if sigterm and can_hold:  # Lightning raises SIGTERMException after this step, on every rank
            connector.received_sigterm = True
        self.stopped_by = "SIGTERM" if sigterm else "SIGINT"
        # Lightning validates after a step that sets should_stop. Not for this stop, unless its schedule has a
        # validation after this step anyway (Ctrl-C only: after a SIGTERM Lightning stops it after one batch). A
        # resumed fit skips a validation due at the step of its checkpoint, so this one would otherwise be lost.
        skip_validation = sigterm or not any_rank(self._validation_due(trainer))
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        trainer.should_stop = True
        loop = trainer.fit_loop.epoch_loop
        if skip_validation and hasattr(loop, "_skip_next_val"):
            loop._skip_next_val = True
        if not sigterm and not getattr(trainer.fit_loop, "_can_stop_early", True):
            raise KeyboardInterrupt  # min_steps/min_epochs not met: Lightning would ignore should_stop

    @staticmethod
    def _validation_due(trainer: pl.Trainer) -> bool:
        """Whether Lightning's schedule validates after this batch (asked before `should_stop` is set; the same
        answer on every rank for a schedule in batches)."""
        try:
            return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except Exception:  # another Lightning version: no validation
            return False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        if not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)  # saves only with save_on_exception (off)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)


def last_checkpoint_of(trainer: pl.Trainer) -> LastCheckpoint | None:
    """The trainer's `LastCheckpoint` callback (None without one)."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)


def _on_a_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ResumeAwareProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, except that a fit resumed mid-epoch (where Lightning skips `on_train_epoch_start`)
    shows the epoch's total and counts from the resumed batch, so the rate is that of this run's batches."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_idx + 1  # batches of this epoch before the checkpoint
        if done > 0:
            total = self.total_train_batches  # what Lightning shows at an epoch's start, from batch 0
            if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
                total = min(trainer.num_training_batches, done + trainer.max_steps - trainer.global_step)
            bar = self.train_progress_bar
            bar.reset(total=convert_inf(total))
            bar.initial = bar.n = done  # tqdm's rate counts from `initial`
            bar.set_description(f"Epoch {trainer.current_epoch}")
            bar.refresh()


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


def synced_clock(trainer: pl.Trainer) -> float:
    """time.perf_counter() after the trainer's device has finished its queued work (CUDA: synchronised)."""
    dev = trainer.strategy.root_device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


class PhaseTimes(Callback):
    """Where a fit's wall time went: set-up before fit (data, tokenizer, strategy), fit start to the first
    training batch (sanity check included), the first training batches (compilation, autotuning, CUDA-graph
    capture), validation, and the training loop (checkpoints and logging included).

    Rank 0 writes `<default_root_dir>/phase_times.json` at the end of fit (also when fit stops on an exception,
    with `ended_by`), prints a one-line summary and logs the figures as `time/*` metrics. On CUDA the device is
    synchronised at each phase boundary (a handful of times per validation, never inside the steady loop) so
    queued GPU work is charged to the phase that queued it.

    A fit stopped by Ctrl-C or SIGTERM (`LastCheckpoint`) is recorded with `ended_by: "SIGINT"` or `"SIGTERM"`.
    A fit that `trainer.max_time` stopped before `trainer.max_steps` is recorded with `ended_by: "max_time"` and
    warned about: how many steps it trained then depends on the machine's speed and its compile times, and a
    recipe measured so does not reproduce (docs/training.md, "Stop by steps").

    A resumed fit (`--ckpt_path`) adds to the file instead of replacing it: `segments` lists each invocation's
    figures (with its `start_step`), and the top-level figures are the sums over them (`first_batches_s` is the
    first invocation's, `global_step` and `ended_by` the latest's).
    """

    ADDITIVE = ("setup_s", "fit_s", "to_first_batch_s", "sanity_check_s", "validation_s", "validations",
                "training_s")

    def __init__(self, first_batches: int = 5) -> None:
        if first_batches < 1:
            raise ValueError(f"first_batches must be >= 1, got {first_batches}")
        self.first_batches = first_batches
        self._created = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._fit_start = self._first_batch = self._val_start = self._start_step = None
        self._batch_ends: list[float] = []
        self.validation_s, self.validations, self.sanity_check_s = 0.0, 0, 0.0

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        return synced_clock(trainer)

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # restored by now when the fit resumes

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

    @classmethod
    def merge(cls, previous: dict | None, times: dict) -> dict:
        """The file's content after this invocation (`times`) of a fit resumed from a run whose file held
        `previous` (None: a fit in one go, written as it is)."""
        if not isinstance(previous, dict):
            return times
        segments = previous.get("segments") or [{k: v for k, v in previous.items() if k != "segments"}]
        segments = [*segments, times]
        out: dict[str, Any] = {}
        for k in cls.ADDITIVE:
            vals = [s[k] for s in segments if isinstance(s.get(k), (int, float))]
            out[k] = sum(vals) if vals else None
        out["first_batches_s"] = next((s["first_batches_s"] for s in segments if s.get("first_batches_s")), [])
        out["global_step"] = times["global_step"]
        if "ended_by" in times:
            out["ended_by"] = times["ended_by"]
        out["segments"] = segments
        return out

    def _write(self, trainer: pl.Trainer, ended_by: str | None = None) -> None:
        times = self.summary(trainer)
        if ended_by:
            times["ended_by"] = ended_by
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "phase_times.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        times["start_step"] = self._start_step
        previous = None
        if trainer.ckpt_path is not None and path.is_file():  # resumed: add to the earlier invocations' figures
            try:
                previous = json.loads(path.read_text())
            except (OSError, ValueError):
                previous = None
        merged = self.merge(previous, times)
        path.write_text(json.dumps(merged, indent=1) + "\n")
        first = times["first_batches_s"]
        total = ""
        if merged is not times:
            total = (f"; over all {len(merged['segments'])} invocations of this run: fit {merged['fit_s']:.1f}s, "
                     f"training {(merged['training_s'] or 0.0):.1f}s")
        rank_zero_info(
            f"wall time: set-up {times['setup_s']:.1f}s, fit {times['fit_s']:.1f}s = to first batch "
            f"{(times['to_first_batch_s'] or 0.0):.1f}s + validation {times['validation_s']:.1f}s "
            f"({times['validations']}x) + training {times.get('training_s', 0.0):.1f}s; first "
            f"{len(first)} batches {first[-1] if first else 0.0:.1f}s{total} ({path})")
        metrics = {f"time/{k}": float(v) for k, v in merged.items() if isinstance(v, (int, float))}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def stopped_by_time(trainer: pl.Trainer) -> bool:
        """Whether the fit ended because `trainer.max_time` ran out before `trainer.max_steps` was reached."""
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = None if timer is None else timer.time_remaining("train")
        short = trainer.max_steps is not None and 0 < trainer.max_steps and trainer.global_step < trainer.max_steps
        return short and left is not None and left <= 0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        by_time = self.stopped_by_time(trainer)
        last = last_checkpoint_of(trainer)
        by_signal = None if last is None else last.stopped_by
        self._write(trainer, ended_by="max_time" if by_time else by_signal)
        if by_time:
            rank_zero_warn(
                f"trainer.max_time stopped this run at step {trainer.global_step} of trainer.max_steps "
                f"{trainer.max_steps}: the steps trained depend on this machine's speed and compile times. For a run "
                "that trains the same anywhere, set trainer.max_steps to the steps wanted and keep max_time as a "
                "guard.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, ConfigError) and self._first_batch is None:
            return  # a setting that cannot work, found before training: nothing was measured
        if self._fit_start is not None:
            by = "SIGTERM" if isinstance(exception, SIGTERMException) else \
                f"{type(exception).__name__}: {str(exception)[:200]}"
            self._write(trainer, ended_by=by)


class RetrievalEval(Callback):
    """Every `every_n_steps` optimizer steps, a small retrieval grid (tasks x lengths x depths x samples) through
    the harness `memsparse-eval` uses (`memsparse.eval.harness.run_eval`) on the module's model: eager (no CUDA
    graphs: a CUDA-graph training step stays as captured), in float32 with autocast off as `memsparse-eval` runs an
    export, under `torch.no_grad`, in eval mode, then back to train mode. Decoded accuracy and the teacher-forced
    accuracy at the answer positions are logged per (task, length) and overall to the run's loggers
    (`retrieval/<task>/<length>/acc|tf_exact|tf_token_acc|tf_stop`, `retrieval/acc|tf_exact|tf_token_acc|tf_stop`,
    `retrieval/wall_s`; tf_stop: how often the model ends a complete teacher-forced answer, see `run_cell`);
    every cell is appended to `<output_dir>/cells.csv` and `cells.jsonl` (with the per-sample predictions; a fresh
    fit first moves an earlier run's files to `<output_dir>/earlier/`, a resumed one appends), and a
    heatmap per task is written as `<output_dir>/heatmap_<task>_step<N>.png` (also logged as an
    image to W&B). `output_dir` defaults to `<default_root_dir>/retrieval`.

    Only global rank 0 evaluates; the other ranks wait at a barrier (each rank takes the same decision from the
    global step, so no collective is left unmatched). Off under FSDP (parameters are sharded), with a warning. A
    failing evaluation warns and training continues.

    Args:
        every_n_steps: optimizer steps between evaluations (the first at step `every_n_steps`).
        tasks: registered task names (comma-separated or a list).
        lengths: prompt lengths in tokens (`1k` = 1024; comma-separated or a list); pick some inside and some beyond
            the model's attention window (`model.config.window`).
        depths: needle depths in [0, 1].
        samples: samples per cell (sample i has the same seed in every cell).
        max_new_tokens: decoding budget; None: each task's `max_answer_tokens`.
        seed: base seed of the samples (fixed across evaluations, so the curves compare like with like).
        output_dir: where the CSV/JSONL and heatmaps go; None: `<trainer.default_root_dir>/retrieval`.
        chunk_tokens: prompt tokens per streaming call (`stream_decode`).
        at_end: also run the grid when training ends (`max_steps`, `max_time`, early stopping) at a step the
            schedule did not already evaluate, so a run of any length reports its final model.
        no_writes: also run the grid with the memory's writes off (`set_memory_writes(False)`, as
            `memsparse-eval --no-memory-writes`): what the model finds without its memory, logged as
            `retrieval/no_writes/...` and written as cells with `memory_writes` false (the heatmap
            `heatmap_<task>_no_writes_step<N>.png`). A key beyond the window that is found only with the writes on
            is carried by the memory; one found either way, by attention relayed through the layers. Doubles the
            evaluation's time; a model without memory layers skips it.
        batch: prompts streamed together: a cell's samples, and beyond `samples` whole cells of one length (None:
            every prompt of a length; default 1, one at a time). The same cells up to float rounding, in fewer
            launches (`benchmarks/bench_eval_batch.py` measures both).
    """

    CSV_FIELDS = ["step", "task", "length", "in_window", "depth", "n", "accuracy", "tf_token_acc", "tf_exact",
                  "tf_stop", "wall_s", "tf_wall_s", "tokens_per_s", "memory_writes"]

    def __init__(self, every_n_steps: int = 500, tasks: str | list[str] = "passkey",
                 lengths: str | list[int | str] = "1k,4k", depths: str | list[float] = "0,0.5,1", samples: int = 2,
                 max_new_tokens: int | None = None, seed: int = 0, output_dir: str | None = None,
                 chunk_tokens: int = 8192, at_end: bool = False, no_writes: bool = False,
                 batch: int | None = 1) -> None:
        try:
            self.tasks, self.lengths, self.depths = parse_tasks(tasks), parse_lengths(lengths), parse_depths(depths)
        except EvalInputError as e:
            raise ConfigError(f"RetrievalEval: {e}") from None
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("samples", samples, 1),
                                 ("chunk_tokens", chunk_tokens, 1), ("max_new_tokens", max_new_tokens, 1),
                                 ("batch", batch, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"RetrievalEval: {name} must be an integer >= {low}, got {value!r}")
        self.every_n_steps, self.samples, self.seed = every_n_steps, samples, int(seed)
        self.max_new_tokens, self.output_dir, self.chunk_tokens = max_new_tokens, output_dir, chunk_tokens
        for name, flag in (("at_end", at_end), ("no_writes", no_writes)):
            if not isinstance(flag, bool):
                raise ConfigError(f"RetrievalEval: {name} must be true or false, got {flag!r}")
        self.at_end, self.no_writes, self.batch = at_end, no_writes, batch
        self.last_step: int | None = None
        self._off: str | None = None
        self._tokenizer: Any = None

    @property
    def plan(self) -> EvalPlan:
        return EvalPlan(self.tasks, self.lengths, self.depths, self.samples, self.seed,
                        batch=self.samples * len(self.depths) if self.batch is None else self.batch)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the grid against the data's tokenizer (each length above its task's prompt overhead)."""
        if stage != "fit":
            return
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            self._off = "FSDP shards the parameters, and only rank 0 would evaluate"
            rank_zero_warn(f"RetrievalEval is off: {self._off}")
            return
        dm = getattr(trainer, "datamodule", None)
        self._tokenizer = getattr(dm, "tokenizer", None)
        if self._tokenizer is None:
            raise ValueError("RetrievalEval needs the datamodule's tokenizer (trainer.datamodule.tokenizer)")
        try:
            check_plan(self.tasks, self.lengths, self._tokenizer)
        except EvalInputError as e:
            raise ConfigError(f"RetrievalEval: {e}") from None

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fresh fit (not resumed from a checkpoint) starts its own cells.csv / cells.jsonl: an earlier run's
        files in the output directory (a fit again in the same `default_root_dir`, e.g. with `--overwrite`) move to
        `<output_dir>/earlier/<UTC time>/`, so that the by-step tables hold one run's cells. A resumed fit appends."""
        if self._off or trainer.ckpt_path is not None or not trainer.is_global_zero:
            return
        out = self.output_path(trainer)
        old = [p for p in (out / "cells.csv", out / "cells.jsonl") if p.exists()]
        if not old:
            return
        old += sorted(out.glob("heatmap_*.png"))
        dest = out / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        while dest.exists():
            dest = dest.with_name(dest.name + "_")
        dest.mkdir(parents=True)
        for p in old:
            p.rename(dest / p.name)
        rank_zero_warn(f"RetrievalEval: a fresh fit; an earlier run's cells in {out} moved to {dest}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate_once(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end:
            self._evaluate_once(trainer, pl_module)

    def _evaluate_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate at this global step unless off, at step 0 or already done at it (micro-batches of the next
        optimizer step, and the end of a fit that stopped on a scheduled step, see the same global step)."""
        step = trainer.global_step
        if self._off or step == 0 or step == self.last_step:
            return
        self.last_step = step
        self.evaluate(trainer, pl_module)

    def output_path(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "retrieval"

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict] | None:
        """Run the grid now (rank 0; the other ranks wait); returns the cells on rank 0, else None."""
        rows = None
        if trainer.is_global_zero:
            rows = self._evaluate(trainer, pl_module)
        if trainer.world_size > 1:
            trainer.strategy.barrier("memsparse_retrieval_eval")
        return rows

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict] | None:
        model = pl_module.model
        device = pl_module.device
        step = trainer.global_step
        was_training = model.training
        t0 = time.perf_counter()
        passes = [True] + ([False] if self.no_writes and model.config.memory_layer_ids() else [])
        rows, metrics = [], {}
        try:
            for writes in passes:
                with model.memory_writes_as(writes), torch.autocast(device.type, enabled=False):
                    cells = run_eval(model, self._tokenizer, self.plan, device, progress=False, warmup=False,
                                     cuda_graph=False, teacher_forced=True, max_new_tokens=self.max_new_tokens,
                                     inference_mode=False, measure_memory=False)
                for r in cells:
                    r["step"], r["in_window"], r["memory_writes"] = step, r["length"] <= model.config.window, writes
                metrics.update(self.metrics(cells, "retrieval" if writes else "retrieval/no_writes"))
                rows += cells
        except Exception as e:  # a monitor: never stop the run over it
            rank_zero_warn(f"RetrievalEval at step {step} failed ({type(e).__name__}: {e}); training continues")
            return None
        finally:
            model.train(was_training)
        wall = time.perf_counter() - t0
        metrics["retrieval/wall_s"] = wall
        try:
            images = self._write(trainer, rows)
        except OSError as e:
            rank_zero_warn(f"RetrievalEval: cannot write its files ({e})")
            images = {}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
            if isinstance(lg, WandbLogger):
                for task, path in images.items():
                    lg.log_image(key=f"retrieval/heatmap_{task}", images=[str(path)], step=step)
        parts = [f"{k.removeprefix('retrieval/')} {v:.2f}" for k, v in metrics.items()
                 if k.endswith("/acc") and not k.startswith("retrieval/no_writes/")]
        no_writes = metrics.get("retrieval/no_writes/acc")
        rank_zero_info(f"retrieval at step {step} ({wall:.1f}s): " + ", ".join(parts) +
                       f"; tf_exact {metrics.get('retrieval/tf_exact', float('nan')):.2f}"
                       f", tf_stop {metrics.get('retrieval/tf_stop', float('nan')):.2f}" +
                       ("" if no_writes is None else f"; memory writes off: acc {no_writes:.2f}"))
        return rows

    @staticmethod
    def metrics(rows: list[dict], prefix: str = "retrieval") -> dict[str, float]:
        """`<prefix>/<task>/<length>/acc|tf_exact|tf_token_acc|tf_stop` (mean over depths) and the means over all
        cells (`<prefix>/acc`, ...)."""
        out: dict[str, float] = {}
        for s in summarize(rows):
            key = f"{prefix}/{s['task']}/{_length_key(s['length'])}"
            out[f"{key}/acc"] = s["accuracy"]
            for m in ("tf_exact", "tf_token_acc", "tf_stop"):
                if s.get(m) is not None:
                    out[f"{key}/{m}"] = s[m]
        for name, m in (("acc", "accuracy"), ("tf_exact", "tf_exact"), ("tf_token_acc", "tf_token_acc"),
                        ("tf_stop", "tf_stop")):
            vals = [r[m] for r in rows if r.get(m) is not None]
            if vals:
                out[f"{prefix}/{name}"] = sum(vals) / len(vals)
        return out

    def _write(self, trainer: pl.Trainer, rows: list[dict]) -> dict[str, Path]:
        """Append the cells to cells.csv / cells.jsonl, write one heatmap per task; returns {task: png}."""
        from memsparse.eval.plots import heatmap, slug

        out = self.output_path(trainer)
        out.mkdir(parents=True, exist_ok=True)
        step = rows[0]["step"] if rows else trainer.global_step
        csv_path = out / "cells.csv"
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.CSV_FIELDS})
        with (out / "cells.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
        images = {}
        for writes, tag in ((True, ""), (False, "_no_writes")):
            part = [r for r in rows if r.get("memory_writes", True) == writes]
            for task in dict.fromkeys(r["task"] for r in part):
                images[task + tag] = heatmap(part, task, out / f"heatmap_{slug(task)}{tag}_step{step}.png",
                                             title=f"{task}{', memory writes off' if tag else ''}, step {step}",
                                             metrics=("accuracy", "tf_exact"))
        return images


def _length_key(n: int) -> str:
    """4096 -> '4k', 1048576 -> '1m', 1536 -> '1536' (metric names)."""
    for unit, size in (("m", 1024**2), ("k", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
