"""Start a fit from another run's weights (a curriculum stage, fine-tuning): `InitFromWeights`.

Unlike `--ckpt_path` (which resumes a run: optimizer, step, schedule, data order), this loads only the model's
weights, so the next stage may change the data (sequence length, task mixture), the schedule and the steps:

    trainer:
      callbacks:
        - class_path: memsparse.train.init_from.InitFromWeights
          init_args: {path: outputs/retrieval_small_copy/export}
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from memsparse.model import MemSparseLM

from .module import CheckpointError, load_checkpoint


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """InitFromWeights' path is neither an export directory nor a checkpoint file."""


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, model config as a dict) from an export directory (`save_pretrained`) or a `.ckpt`."""
    path = Path(path)
    if path.is_dir():
        try:
            model = MemSparseLM.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"InitFromWeights: cannot load weights from {path}: {e}") from None
        return model.state_dict(), asdict(model.config)
    if path.is_file():
        ckpt = load_checkpoint(path)
        sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        return sd, ckpt["memsparse"]["model_config"] if "memsparse" in ckpt else {}
    raise WeightsNotFoundError(f"InitFromWeights: no export directory or checkpoint at {path}")


# config fields that change no weight's meaning: a later stage may set them differently
# (the window and segment set only which keys attention sees and when tokens are evicted into the memory, as
# `MemSparseLM.set_window` switches at inference: a stage may shrink the window so that only the memory reaches back)
_FREE_FIELDS = {"budget", "consolidation", "hard_keep_fraction", "compile_pointwise", "loss_chunk", "checkpoint",
                "memory.compile", "memory.chunk_size", "window", "segment"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class InitFromWeights(pl.Callback):
    """Before the first step, copy the weights of `path` (an export directory or a `.ckpt`) into the model.

    The architecture must match (same shapes and the same config except budget, consolidation and other
    settings that change no weight's meaning); a mismatch is a one-line ValueError naming the fields.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)
        if not Path(self.path).exists():
            raise WeightsNotFoundError(f"InitFromWeights: no export directory or checkpoint at {self.path}")
        self.loaded = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # a resumed run already has its own (later) weights
            rank_zero_info(f"InitFromWeights: resuming from {trainer.ckpt_path}, {self.path} not loaded")
            return
        sd, cfg = load_weights(self.path)
        model: MemSparseLM = pl_module.model
        if cfg:
            mine, theirs = _flat(asdict(model.config)), _flat(cfg)
            diff = sorted(k for k in set(mine) | set(theirs)
                          if k not in _FREE_FIELDS and mine.get(k) != theirs.get(k))
            if diff:
                shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])
                raise CheckpointError(f"InitFromWeights: {self.path} is a different architecture ({shown})")
        own = model.state_dict()
        bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
        if bad:
            raise CheckpointError(f"InitFromWeights: {self.path} does not match the model's weights: {bad[:5]}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(sd[k].to(v.dtype))
        self.loaded = True
        rank_zero_info(f"InitFromWeights: model weights loaded from {self.path}")
