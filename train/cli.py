"""`memsparse-train`: a LightningCLI over `MemSparseLightningModule` and `MemSparseDataModule`.

    memsparse-train fit --config recipes/quickstart.yaml [--trainer.max_steps 50 ...]
    memsparse-train fit --config recipes/quickstart.yaml --print_config
    memsparse-train test --config X.yaml --data.test_fraction 0.05 --ckpt_path .../last.ckpt   # test/loss, test/ppl
    memsparse-train predict --config X.yaml --data.predict_file prompts.txt --ckpt_path .../last.ckpt

Defaults: W&B logging, offline unless the user has a key or set WANDB_MODE (runs under
`<trainer.default_root_dir>/wandb/`); checkpoints in `<trainer.default_root_dir>/checkpoints`: the best by
val/loss (`checkpoint.*`) and `last.ckpt` every `last_checkpoint.every_n_train_steps` steps, at the end, and at the
end of the step during which a first Ctrl-C or a SIGTERM came (the run then stops: exit 130 or 143);
the final model + tokenizer exported to `<trainer.default_root_dir>/export`. `model.config.vocab_size` is
taken from the data's tokenizer.

Errors a user makes (a bad value, a missing or unreadable file, an unknown key, a YAML syntax error) are one or
two lines on stderr, naming the key or file, with exit status 2; `--debug` (anywhere on the command line) or
`MEMSPARSE_DEBUG=1` shows the traceback instead. A fresh `fit` refuses a run directory that already holds
checkpoints: resume it (`--ckpt_path last`) or start afresh there (`--overwrite`).
"""

from __future__ import annotations

import difflib
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from memsparse.config import ConfigError

from .callbacks import (
    LastCheckpoint,
    PhaseTimes,
    ResumeAwareProgressBar,
    RunConfigCallback,
    SafeLearningRateMonitor,
    last_checkpoint_of,
)
from .data import MemSparseDataModule, resolve_files
from .module import UNREADABLE_CHECKPOINT, MemSparseLightningModule, NonFiniteTrainingError, unreadable_checkpoint

_WANDB = "lightning.pytorch.loggers.WandbLogger"
PROG = "memsparse-train"
WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run a resumed fit continues
_CKPT_KEYWORDS = ("best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself ("last" is ours)


class UsageError(ConfigError):
    """A command line that cannot work (reported as one line, exit 2)."""


def debug_enabled() -> bool:
    """`--debug` was given (it sets MEMSPARSE_DEBUG=1, which the processes of a multi-process run inherit)."""
    return os.environ.get("MEMSPARSE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


class MemSparseArgumentParser(LightningArgumentParser):
    """Parse errors as one or two lines (`memsparse-train: error: ...`) instead of ~140 lines of usage; with
    `--debug` jsonargparse's own report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_enabled():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
        text = _shorten(" ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else ""))
        hint = _suggest(parser, message)
        sys.stderr.write(f"{PROG}: error: {text}\n")
        sys.stderr.write(f"  {hint + '; ' if hint else ''}`{prog} --help` lists every key\n")
        self.exit(2)


def _shorten(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(parser: Any, message: str) -> str:
    """"did you mean --trainer.max_steps?" for an unknown option or key in the message."""
    import re

    words = re.findall(r"(?:--)?([A-Za-z_][\w.]*\.[\w.]+|[A-Za-z_]\w+)", str(message))
    if "unrecognized arguments" not in message and "not accept" not in message and "not expected" not in message:
        return ""
    known = sorted({o.lstrip("-") for a in parser._actions for o in a.option_strings if o.startswith("--")})
    for w in words:
        if "." not in w or w in known:
            continue
        close = difflib.get_close_matches(w, known, n=2, cutoff=0.75)
        if close:
            return "did you mean " + " or ".join(f"--{c}" for c in close) + "?"
    return ""


def check_config_files(args: list[str]) -> None:
    """Each `--config FILE` exists and is valid YAML; UsageError naming the file (and line) otherwise.
    A value that is not a path (an inline YAML/JSON string) is left to the parser."""
    import yaml

    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        else:
            continue
        path = Path(os.path.expanduser(value))
        looks_like_path = path.suffix.lower() in (".yaml", ".yml", ".json") or ("/" in value and "{" not in value
                                                                                and ":" not in value)
        if not path.is_file():
            if path.is_dir():
                raise UsageError(f"--config {value}: a directory, not a config file")
            if looks_like_path:
                raise UsageError(f"--config {value}: no such file (resolved as {path.absolute()})")
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{value}:{mark.line + 1}:{mark.column + 1}" if mark else value
            what = "; ".join(x for x in (e.context, e.problem) if x)
            raise UsageError(f"{where}: YAML syntax error: {what}") from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--config {value}: cannot read it as YAML ({type(e).__name__}: {e})") from None
        if data is not None and not isinstance(data, dict):
            raise UsageError(f"--config {value}: expected a mapping of keys (trainer:, model:, data:, ...), got a "
                             f"{type(data).__name__}")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A parsed config node (jsonargparse Namespace, dict, dataclass fields) as {dotted key: value}; lists and
    tuples are compared as lists."""
    if node is None:
        return {}
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    elif hasattr(node, "__dataclass_fields__"):
        node = {k: getattr(node, k) for k in node.__dataclass_fields__}
    if not isinstance(node, dict):
        return {prefix.rstrip("."): list(node) if isinstance(node, tuple) else node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _checkpoint_dirs(cfg: Any, root: str) -> list[Path]:
    """Where this run's checkpoint callbacks write (`checkpoint.dirpath`, `last_checkpoint.dirpath`)."""
    dirs = []
    for key in ("last_checkpoint", "checkpoint"):
        node = cfg.get(key)
        if node is not None:
            dirs.append(Path(node.get("dirpath") or os.path.join(root, "checkpoints")))
    return list(dict.fromkeys(dirs))


def _checkpoints_in(dirs: list[Path]) -> list[Path]:
    return sorted({p for d in dirs if d.is_dir() for p in d.glob("*.ckpt") if p.is_file()})


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
    """LightningCLI with memsparse's defaults (checkpointing, W&B, the vocab link, run-directory layout) and its
    run hygiene (a fresh fit never mixes with an earlier run's checkpoints; a resumed fit continues its W&B run)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: start a fresh run in a trainer.default_root_dir that holds an earlier run's "
                                 "checkpoints, deleting them (without it such a fit refuses to start)")
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

    def _root(self, cfg: Any) -> str:
        return cfg.trainer.get("default_root_dir") or os.getcwd()

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last` -> this run's newest `last*.ckpt` (a UsageError when there is none: no silent fresh
        start); a path that does not exist is a UsageError listing the run's checkpoints. LightningCLI then reads
        the file's hyperparameters (the model config of a resumed run comes from the checkpoint): an unreadable
        file is a CheckpointError naming it ("truncated, corrupted or not a torch checkpoint"). Model settings of
        the config or command line that the checkpoint's replace are named in one warning line."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        path = cfg.get("ckpt_path")
        if path is not None:
            path = str(path)
            dirs = _checkpoint_dirs(cfg, self._root(cfg))
            if path == "last":
                found = [p for p in _checkpoints_in(dirs) if p.name.startswith("last")]
                if not found:
                    where = " or ".join(str(d) for d in dirs)
                    raise UsageError(f"--ckpt_path last: no last.ckpt in {where}: nothing to resume. Drop "
                                     "--ckpt_path to start a fresh run, or pass a checkpoint file")
                cfg.ckpt_path = path = str(max(found, key=lambda p: p.stat().st_mtime))
            elif path not in _CKPT_KEYWORDS and "://" not in path and not path.startswith("registry:"):
                p = Path(os.path.expanduser(path))
                if not p.is_file():
                    have = _checkpoints_in(dirs)
                    known = f"; checkpoints of this run: {', '.join(str(h) for h in have[:4])}" if have else ""
                    raise UsageError(f"--ckpt_path {path}: no such file{known}")
        before = _flat(cfg.get("model"))
        try:
            super()._parse_ckpt_path()
        except UNREADABLE_CHECKPOINT as e:
            raise unreadable_checkpoint(path, e) from None
        after = _flat(self.config[sub].get("model"))
        changed = [k for k in before if k in after and before[k] != after[k]]
        if changed and rank_zero_only.rank == 0:
            shown = ", ".join(f"model.{k}={before[k]!r} -> {after[k]!r}" for k in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            who = "a resumed run keeps" if sub == "fit" else f"{sub} uses"
            print(f"{PROG}: warning: {who} its checkpoint's model settings; these differ from the config or "
                  f"command line and are ignored: {shown}{more}", file=sys.stderr, flush=True)

    def before_instantiate_classes(self) -> None:
        """Place checkpoints and W&B runs under `trainer.default_root_dir` unless configured otherwise; for `fit`,
        refuse a directory with an earlier run's checkpoints (unless resuming or `--overwrite`) and give a resumed
        fit the W&B run id of the run it continues."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = self._root(cfg)
        cfg.trainer.default_root_dir = root
        for key in ("checkpoint", "last_checkpoint"):
            if cfg.get(key) is not None and cfg[key].get("dirpath") is None:
                cfg[key].dirpath = os.path.join(root, "checkpoints")
        data = cfg.get("data")
        if data is not None and self.subcommand in ("fit", "validate", "test"):
            for key in ("files", "val_files"):  # a missing data file: before any other work or output
                if data.get(key):
                    resolve_files(data[key], f"data.{key}")
        self._wandb_id_file: tuple[Path, str] | None = None
        loggers = cfg.trainer.get("logger")
        for lg in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(lg, "class_path", None) == _WANDB:
                if lg.init_args.get("save_dir") in (None, "."):
                    lg.init_args.save_dir = root
                Path(root).mkdir(parents=True, exist_ok=True)
                if self.subcommand == "fit":
                    self._wandb_run_id(lg, root, resuming=cfg.get("ckpt_path") is not None)

    def _set_seed(self) -> None:
        """Lightning's seeding without its "Seed set to N" line (the seed is in the run's config.yaml), so that an
        error found while the classes are built is the only output."""
        import logging

        log = logging.getLogger("lightning.fabric.utilities.seed")
        level = log.level
        log.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            log.setLevel(level)

    def _check_fresh_run(self, cfg: Any, root: str) -> None:
        """A fit without --ckpt_path in a directory holding checkpoints would write `last-v1.ckpt` beside the old
        run's `last.ckpt` (and a later `--ckpt_path .../last.ckpt` would resume the wrong run): refuse, or with
        --overwrite delete the old checkpoints first."""
        if cfg.get("ckpt_path") is not None:
            return
        old = _checkpoints_in(_checkpoint_dirs(cfg, root))
        if not old:
            return
        if not cfg.get("overwrite"):
            shown = ", ".join(p.name for p in old[:3]) + (f" (+{len(old) - 3} more)" if len(old) > 3 else "")
            raise UsageError(f"{root} already holds a run (checkpoints {shown} in {old[0].parent}): resume it with "
                             "--ckpt_path last, start afresh there with --overwrite (deletes those checkpoints), or "
                             "set another --trainer.default_root_dir")
        for p in old:
            p.unlink(missing_ok=True)  # every process of a multi-process run does it; the first one wins

    def _wandb_run_id(self, lg: Any, root: str, resuming: bool) -> None:
        """A resumed fit logs to the W&B run it continues (its id is kept in `<root>/wandb_run_id`); a fresh fit
        gets a new id, written there once the run is sure to start (`instantiate_trainer`). An id set in the config
        wins."""
        if lg.init_args.get("id") or lg.init_args.get("version"):
            return
        path = Path(root) / WANDB_ID_FILE
        run_id = path.read_text().strip() if resuming and path.is_file() else ""
        if not run_id:
            if rank_zero_only.rank != 0:
                return  # only rank 0 logs to W&B
            run_id = secrets.token_hex(4)
            self._wandb_id_file = (path, run_id)
        lg.init_args.id = run_id

    def instantiate_trainer(self, **kwargs: Any):
        """Lightning's trainer, its default TQDM progress bar replaced by one that counts from the resumed
        position (a resumed run: the epoch's total and the rate of this run's batches). Before it, for `fit`, the
        run-directory check (`_check_fresh_run`); and the documents are read first, so that an error in them (a
        wrong data.text_field) is reported before the trainer's output."""
        if self.subcommand == "fit":  # after the model and data were built: a bad value is reported first
            cfg = self.config["fit"]
            self._check_fresh_run(cfg, cfg.trainer.default_root_dir)
            if getattr(self, "_wandb_id_file", None) is not None:
                path, run_id = self._wandb_id_file
                path.write_text(run_id + "\n")
        dm = getattr(self, "datamodule", None)
        if isinstance(dm, MemSparseDataModule) and self.subcommand in ("fit", "validate", "test") and dm.text_share:
            dm.documents()
        trainer = super().instantiate_trainer(**kwargs)
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) is TQDMProgressBar:
                trainer.callbacks[i] = ResumeAwareProgressBar(refresh_rate=cb.refresh_rate, leave=cb._leave)
        return trainer

    def fit(self, model: Any, **kwargs: Any) -> None:
        """`trainer.fit`, and how to resume when it was stopped from outside: the first Ctrl-C or a SIGTERM saves
        `last.ckpt` at the end of the current step and stops (`LastCheckpoint`); a second Ctrl-C stops at once
        (Lightning's graceful shutdown, which exits). Either way rank 0 prints the command that resumes the run, and
        the exit status is 130 (Ctrl-C) or 143 (SIGTERM)."""
        try:
            self.trainer.fit(model, **kwargs)
        except SystemExit as e:  # Lightning's exit after a KeyboardInterrupt, or its SIGTERMException
            if not self.trainer.interrupted:
                raise
            sigterm = isinstance(e, SIGTERMException) or self._stopped_by() == "SIGTERM"
            self._stop("SIGTERM" if sigterm else "SIGINT")
        by = self._stopped_by()
        if by is not None:  # a Ctrl-C stop after the step's save: the fit returned
            self._stop(by)

    def _stopped_by(self) -> str | None:
        last = last_checkpoint_of(self.trainer)
        return None if last is None else last.stopped_by

    def _stop(self, signal_name: str) -> NoReturn:
        if self.trainer.is_global_zero:
            print(self.resume_hint(signal_name), file=sys.stderr, flush=True)
        raise SystemExit(143 if signal_name == "SIGTERM" else 130) from None

    def resume_hint(self, signal_name: str | None = None) -> str:
        """What to run to resume this interrupted fit (or that there is nothing to resume yet); `signal_name`
        ("SIGINT", "SIGTERM") says what stopped it."""
        step = self.trainer.global_step
        last = last_checkpoint_of(self.trainer)
        by = {"SIGINT": " (Ctrl-C)", "SIGTERM": " (SIGTERM)"}.get(signal_name or "", "")
        path = Path(last.last_model_path) if last is not None and last.last_model_path else None
        if path is None or not path.is_file():
            return (f"{PROG}: interrupted at step {step}{by}, before any checkpoint was written: nothing to resume "
                    "(rerun the command to start again)")
        args = list(self._argv)
        for flag in ("--ckpt_path", "--overwrite"):
            while flag in args:
                i = args.index(flag)
                del args[i:i + 2]
            args = [a for a in args if not a.startswith(flag + "=")]
        saved = getattr(last, "_last_global_step_saved", None)
        at = f" (step {saved})" if saved else ""
        cmd = shlex.join([PROG, *args, "--ckpt_path", str(path)])
        return (f"{PROG}: interrupted at step {step}{by}; the last checkpoint is {path}{at}. Resume with:\n  {cmd}\n"
                f"  (or the same command with --ckpt_path last)")

    def before_fit(self) -> None:
        """Fail before any work when a data file is missing; a single-process fit also builds its datasets here,
        so that a mistake in them (a synthetic length too short for its task's prompt) is reported before
        Lightning's device lines and before a W&B run is created (Lightning creates it before the datamodule's
        setup). With several processes the datasets wait for the fit: rank 0 trains the BPE while the others
        wait at a barrier."""
        self._check_data_files()
        dm = self.datamodule
        if self.trainer.world_size == 1 and isinstance(dm, MemSparseDataModule):
            dm.trainer = self.trainer  # the tokenizer's default directory is under trainer.default_root_dir
            dm.setup("fit")  # idempotent: Lightning's own call then returns at once

    def _check_data_files(self) -> None:
        """A missing data file is a one-line error before any work (and TF32 matmuls on a GPU)."""
        dm = self.datamodule
        for key, files in (("data.files", dm.files), ("data.val_files", dm.val_files)):
            if files:
                resolve_files(files, key)
        import torch

        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")

    def before_validate(self) -> None:
        """As `fit`, without building the datasets early (Lightning's setup does)."""
        self._check_data_files()

    def before_test(self) -> None:
        """`test` and `predict` need trained weights: refuse to evaluate a freshly initialised model."""
        sub = self.subcommand
        if self.config[sub].get("ckpt_path") is None:
            raise UsageError(f"memsparse-train {sub} needs trained weights: pass --ckpt_path "
                             "(e.g. <trainer.default_root_dir>/checkpoints/last.ckpt)")
        self._check_data_files()

    before_predict = before_test


def cli(args: ArgsType = None, run: bool = True) -> MemSparseCLI:
    """Build (and by default run) the CLI; `args` as for LightningCLI (a list of strings, or None: sys.argv)."""
    mode = configure_wandb_env()
    MemSparseCLI._argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
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
        parser_class=MemSparseArgumentParser,
        parser_kwargs={"parser_mode": "yaml"},
    )


def main(args: ArgsType = None) -> None:
    """Console entry point `memsparse-train`: a user's error is one line and exit status 2 (a ConfigError anywhere
    in the exception's chain, e.g. inside jsonargparse's report of a callback that failed to build), too many
    non-finite steps exit 3; `--debug` or MEMSPARSE_DEBUG=1 lets the exception through with its traceback."""
    ok = False
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None and "--debug" in argv:
        os.environ["MEMSPARSE_DEBUG"] = "1"  # inherited by the processes Lightning launches for DDP
        argv = [a for a in argv if a != "--debug"]
        if args is None:
            sys.argv = [sys.argv[0], *argv]  # DDP's launcher re-runs sys.argv
        else:
            args = argv
    try:
        if argv is not None:
            check_config_files(argv)
        cli(args)
        ok = True
    except NonFiniteTrainingError as e:
        if debug_enabled():
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except KeyboardInterrupt:  # outside the training loop (inside it, `MemSparseCLI.fit` says how to resume)
        if debug_enabled():
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        user_error = _config_error_in(e)
        if user_error is None or debug_enabled():
            raise
        print(f"{PROG}: error: {_shorten(str(user_error), 600)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _close_process_group(synchronise=ok)
        _finish_wandb()


def _config_error_in(e: BaseException) -> ConfigError | None:
    """The ConfigError `e` is or was caused by (jsonargparse wraps a class that failed to build in its own
    ValueError, keeping the original as the cause)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ConfigError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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
