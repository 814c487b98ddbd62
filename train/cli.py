"""`memsparse-train`: a LightningCLI over `MemSparseLightningModule` and `MemSparseDataModule`.

    memsparse-train fit --config recipes/quickstart.yaml [--trainer.max_steps 50 ...]
    memsparse-train fit --config recipes/quickstart.yaml --print_config
    memsparse-train test --config X.yaml --data.test_fraction 0.05 --ckpt_path .../last.ckpt   # test/loss, test/ppl
    memsparse-train predict --config X.yaml --data.predict_file prompts.txt --ckpt_path .../last.ckpt

Defaults: W&B logging, offline unless the user has a key or set WANDB_MODE (runs under
`<trainer.default_root_dir>/wandb/`); checkpoints in `<trainer.default_root_dir>/checkpoints`: the best by
val/loss (`checkpoint.*`) and `last.ckpt` every `last_checkpoint.every_n_train_steps` steps and at the end;
the final model + tokenizer exported to `<trainer.default_root_dir>/export`. `model.config.vocab_size` is
taken from the data's tokenizer.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from .callbacks import LastCheckpoint, PhaseTimes, RunConfigCallback, SafeLearningRateMonitor
from .data import DataConfigError, MemSparseDataModule, resolve_files
from .module import MemSparseLightningModule, NonFiniteTrainingError

_WANDB = "lightning.pytorch.loggers.WandbLogger"


class UsageError(ValueError):
    """A command line that cannot work (reported as one line, exit 2)."""


def configure_wandb_env() -> str:
    """W&B offline unless the user chose: WANDB_MODE set, WANDB_API_KEY set, or a `wandb login` in ~/.netrc."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.path.expanduser("~/.netrc"))
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
            return "online"
    except OSError:
        pass
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


class MemSparseCLI(LightningCLI):
    """LightningCLI with memsparse's defaults (checkpointing, W&B, the vocab link, run-directory layout)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best by validation loss
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.save_top_k": 1,
            "checkpoint.save_last": False,
            "checkpoint.filename": "best-step{step:06d}-loss{val/loss:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # last.ckpt, for resuming
        # The model's vocabulary is the tokenizer's (known when the datamodule is built).
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads `--ckpt_path`'s hyperparameters (the model config of a resumed run comes from the
        checkpoint); make an unreadable file a ValueError naming it instead of an unpickling traceback."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, KeyError,
                ValueError, AttributeError) as e:
            raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:300]}") from None

    def before_instantiate_classes(self) -> None:
        """Place checkpoints and W&B runs under `trainer.default_root_dir` unless configured otherwise."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.get("default_root_dir") or os.getcwd()
        cfg.trainer.default_root_dir = root
        for key in ("checkpoint", "last_checkpoint"):
            if cfg.get(key) is not None and cfg[key].get("dirpath") is None:
                cfg[key].dirpath = os.path.join(root, "checkpoints")
        loggers = cfg.trainer.get("logger")
        for lg in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(lg, "class_path", None) == _WANDB:
                if lg.init_args.get("save_dir") in (None, "."):
                    lg.init_args.save_dir = root
                Path(root).mkdir(parents=True, exist_ok=True)

    def before_fit(self) -> None:
        """Fail before any work when a data file is missing."""
        dm = self.datamodule
        for files in (dm.files, dm.val_files):
            if files:
                resolve_files(files)
        import torch

        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")

    before_validate = before_fit

    def before_test(self) -> None:
        """`test` and `predict` need trained weights: refuse to evaluate a freshly initialised model."""
        sub = self.subcommand
        if self.config[sub].get("ckpt_path") is None:
            raise UsageError(f"memsparse-train {sub} needs trained weights: pass --ckpt_path "
                             "(e.g. <trainer.default_root_dir>/checkpoints/last.ckpt)")
        self.before_fit()

    before_predict = before_test


def cli(args: ArgsType = None, run: bool = True) -> MemSparseCLI:
    """Build (and by default run) the CLI; `args` as for LightningCLI (a list of strings, or None: sys.argv)."""
    mode = configure_wandb_env()
    return MemSparseCLI(
        MemSparseLightningModule,
        MemSparseDataModule,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            # offline passed explicitly: W&B caches settings per process, so the environment alone is not enough
            "logger": {"class_path": _WANDB, "init_args": {"project": "memsparse", "log_model": False,
                                                           "offline": mode == "offline"}},
            "callbacks": [SafeLearningRateMonitor(logging_interval="step"), PhaseTimes()],
        },
        seed_everything_default=0,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "yaml"},
    )


def main(args: ArgsType = None) -> None:
    """Console entry point `memsparse-train`."""
    ok = False
    try:
        cli(args)
        ok = True
    except NonFiniteTrainingError as e:
        print(f"memsparse-train: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except (DataConfigError, UsageError) as e:
        print(f"memsparse-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _close_process_group(synchronise=ok)
        _finish_wandb()


def _close_process_group(synchronise: bool) -> None:
    """Destroy the distributed process group (if any) before interpreter shutdown.

    Left to Lightning's atexit hook, the ranks tore their connections down in no particular order while
    C++ threads were still running, and a rank occasionally aborted at exit ("terminate called without an
    active exception", exit code -6) after a successful run. After a successful command the ranks first meet
    at a barrier, so they close together; after a failure they do not wait for each other."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronise:
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
    dist.destroy_process_group()


def _finish_wandb() -> None:
    """Close the W&B run now (flushes the offline run files) instead of at interpreter exit."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()  # drop the per-process settings so a later run in this process starts clean


if __name__ == "__main__":
    main()
