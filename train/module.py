"""`MemSparseLightningModule`: the training loop around `MemSparseLM` (AdamW, warmup + cosine, logging,
non-finite step skipping, self-describing checkpoints, export for `memsparse-eval`).

The model config's `vocab_size` comes from the data: `memsparse-train` links `data.vocab_size` into
`model.config.vocab_size` when it builds the module, and `setup` checks that the model covers the
datamodule's tokenizer (a clear error otherwise) when the module is used without the CLI.
"""

from __future__ import annotations

import math
import pickle
import random
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memsparse.config import ConfigError, ModelConfig, from_dict
from memsparse.cuda_graph import GraphedLoss
from memsparse.model import MemSparseLM, logit_adjustment
from memsparse.tokenizer import load_tokenizer

CKPT_KEY = "memsparse"  # our section of a Lightning checkpoint
_NO_DECAY_NAMES = ("embed", "persistent_", "init_weights", "gain", "norm", "bias")
_DEFAULT_CONFIG = ModelConfig()  # never mutated: `_as_config` copies it


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: missing, unreadable (truncated or corrupted), or of another model."""


def answer_accuracy_counts(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, source: torch.Tensor,
                           eos_id: int, num_sources: int) -> torch.Tensor:
    """Teacher-forced argmax accuracy at the answer positions of synthetic rows, per source.

    h (B, L, dim): the final (normed) hidden states; weight (V, dim): the output matrix; labels (B, L): aligned
    targets (-100 ignored; with `synthetic_loss: answer` a synthetic row keeps only its answer tokens and the eos
    after them, and the eos is left out here); source (B,): 0 for text (skipped), 1 + k for synthetic task k.
    Returns (4, num_sources) float64: correct answer tokens, answer tokens, rows with every answer token right,
    rows with answer tokens. Logits are computed at the answer positions only."""
    mask = (labels != -100) & (labels != eos_id) & (source[:, None] > 0)
    counts = torch.zeros(4, num_sources, dtype=torch.float64, device=labels.device)
    if not bool(mask.any()):
        return counts
    sel = h[mask]
    correct = (sel.to(weight.dtype) @ weight.t()).argmax(-1) == labels[mask]
    tok_src = source[:, None].expand_as(mask)[mask]
    counts[0].index_add_(0, tok_src, correct.double())
    counts[1].index_add_(0, tok_src, torch.ones_like(correct, dtype=torch.float64))
    wrong = torch.zeros_like(mask)
    wrong[mask] = ~correct
    rows = mask.any(1)
    counts[2].index_add_(0, source, (rows & ~wrong.any(1)).double())
    counts[3].index_add_(0, source, rows.double())
    return counts


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then cosine from 1 to `floor` at `total` steps."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 memory_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices; none on norms, biases, gains, embeddings, persistent tokens, memory
    initial weights. With `memory_lr_scale` != 1 (and `lr`), the long-term memory's parameters
    (`MemSparseLM.memory_parameter_names`) get groups of their own at `lr * memory_lr_scale`: four groups
    (decay, no decay, memory decay, memory no decay) instead of two."""
    split = memory_lr_scale != 1.0
    if split and lr is None:
        raise ValueError("param_groups: memory_lr_scale != 1 needs lr")
    memory = model.memory_parameter_names() if split and hasattr(model, "memory_parameter_names") else set()
    decay, no_decay, mem_decay, mem_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 2)
        plain = p.ndim < 2 or any(k in part for part in leaf for k in _NO_DECAY_NAMES)
        if name in memory:
            (mem_no_decay if plain else mem_decay).append(p)
        else:
            (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split and not (mem_decay or mem_no_decay):  # e.g. names changed by a wrapper: never a silent single rate
        raise ConfigError("found none of the memory's parameters by name in the model being optimized (wrapped "
                          "or flattened?): train with memory_lr_scale 1.0 there", key="model.memory_lr_scale")
    if split:
        groups += [{"params": mem_decay, "weight_decay": weight_decay, "lr": lr * memory_lr_scale},
                   {"params": mem_no_decay, "weight_decay": 0.0, "lr": lr * memory_lr_scale}]
    return groups


def tokenizer_payload(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer as a plain dict `{"kind", "files": {name: text}}` (what `Tokenizer.save` writes)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        files = {p.name: p.read_text() for p in sorted(Path(d).iterdir()) if p.is_file()}
    return {"kind": getattr(tokenizer, "kind", "unknown"), "vocab_size": int(tokenizer.vocab_size), "files": files}


def tokenizer_from_payload(payload: dict[str, Any], directory: str | Path | None = None) -> Any:
    """Rebuild a tokenizer stored by `tokenizer_payload` (written to `directory`, or a temporary one)."""
    if payload.get("kind") == "byte":
        return load_tokenizer("byte") if directory is None else _write_and_load(payload, Path(directory))
    if directory is None:
        with tempfile.TemporaryDirectory() as d:
            return _write_and_load(payload, Path(d))
    return _write_and_load(payload, Path(directory))


def _write_and_load(payload: dict[str, Any], directory: Path) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in payload["files"].items():
        (directory / name).write_text(text)
    return load_tokenizer(directory)


def _as_config(config: ModelConfig | dict | None) -> ModelConfig:
    if config is None:
        return ModelConfig()
    if config is _DEFAULT_CONFIG:
        return from_dict(ModelConfig, asdict(config))
    if isinstance(config, dict):
        return from_dict(ModelConfig, config)
    if isinstance(config, ModelConfig):
        return config
    raise TypeError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")


OPTIMIZER_IMPLS = ("auto", "fused", "foreach")


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of all elements (fp32 scalar): the squared global norm of a list of gradients."""
    return torch.stack([n.float() for n in torch._foreach_norm(tensors, 2.0)]).square().sum()


class _HostFlag:
    """A device bool copied to pinned host memory behind the work queued so far; `get()` waits for that copy only
    (a CUDA event), not for work queued after it, as `bool(tensor)` would."""

    def __init__(self, flag: torch.Tensor) -> None:
        self._event = None
        if flag.is_cuda:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flag.detach().clone()

    def get(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class MemSparseLightningModule(pl.LightningModule):
    """Trains a `MemSparseLM`.

    Args:
        config: the model (`memsparse.config.ModelConfig`; `vocab_size` is filled from the data by the CLI).
        lr: peak learning rate (AdamW).
        betas, eps: AdamW betas and epsilon.
        weight_decay: decoupled weight decay of matrices (none on norms, biases, gains, embeddings,
            persistent tokens and the memory's initial weights).
        warmup_steps: linear warmup (optimizer steps).
        total_steps: length of the cosine schedule; None: `trainer.estimated_stepping_batches` (max_steps).
        min_lr: the learning rate at the end of the cosine.
        compile: `torch.compile` the model (in place: checkpoint keys are unchanged).
        float32_matmul_precision: `torch.set_float32_matmul_precision` at setup ("highest", "high" = TF32
            tensor cores for float32 matmuls such as the memory's fast-weight MLPs, "medium"); None leaves it.
        cuda_graph: replay each training step's forward + backward as one CUDA graph
            (`memsparse.cuda_graph.GraphedLoss`; CUDA only, not with FSDP or `compile`; validation stays eager).
        max_consecutive_nonfinite: stop the run after this many skipped (non-finite) steps in a row.
        memory_lr_scale: the long-term memory's parameters (projections, rate heads, initial fast weights,
            surprise gate) train at `lr * memory_lr_scale`, on the same warmup and cosine; 1.0: one learning
            rate for all (the optimizer then has two groups, as checkpoints before this option).
        val_no_writes: validation also runs each batch with the memory's writes off and logs `val/no_writes/loss`,
            `val/no_writes/answer_token_acc` and `val/no_writes/answer_exact` (per task too): answers the model finds
            only with the writes on are the memory's. Twice the validation time; nothing without memory layers.
        optimizer_impl: AdamW's implementation: "fused" (one kernel per parameter group, its step counters on the
            device; not with fp16's gradient scaler; a non-finite step is then skipped on the device, the host
            counting it one step later, so a step never waits for the device), "foreach", or "auto" (fused on CUDA
            unless the precision is fp16 with its gradient scaler, foreach there; torch's default on CPU).
        logit_adjust: tau > 0 trains on the logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit
            adjustment", eq. 10): cross-entropy of `logits + tau * log(prior)`, the prior being the frequencies of
            the labelled tokens so far (add-one smoothed, counted from step 0 and kept in checkpoints); decoding and
            validation use the raw logits. With the loss on answers only from the first step, the model then
            need not hold the answers' prior, so a token that is a rare answer is not pushed below the common
            ones; no recipe uses it (what the CPU probe measured: docs/training.md). 0: plain cross-entropy.
    """

    def __init__(
        self,
        config: ModelConfig = _DEFAULT_CONFIG,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr: float = 3e-5,
        compile: bool = False,
        cuda_graph: bool = False,
        float32_matmul_precision: str | None = None,
        max_consecutive_nonfinite: int = 5,
        memory_lr_scale: float = 1.0,
        val_no_writes: bool = False,
        optimizer_impl: str = "auto",
        logit_adjust: float = 0.0,
    ) -> None:
        super().__init__()

        def check(ok: bool, key: str, allowed: str, value: Any) -> None:
            if not ok:
                raise ConfigError(f"must be {allowed}, got {value!r}", key=f"model.{key}")

        try:
            cfg = _as_config(config).validate()
        except ConfigError as e:
            raise e.under("model.config") from None
        check(lr > 0, "lr", "> 0", lr)
        check(0 <= min_lr <= lr, "min_lr", f"in [0, model.lr={lr:g}]", min_lr)
        check(warmup_steps >= 0, "warmup_steps", "an integer >= 0", warmup_steps)
        check(total_steps is None or total_steps >= 1, "total_steps", "null or an integer >= 1", total_steps)
        check(len(tuple(betas)) == 2 and all(0 <= b < 1 for b in betas), "betas", "two numbers in [0, 1)", betas)
        check(eps > 0, "eps", "> 0", eps)
        check(weight_decay >= 0, "weight_decay", ">= 0", weight_decay)
        if compile and cuda_graph:
            raise ConfigError("model.compile and model.cuda_graph are exclusive: cuda_graph replays the eager step "
                              "(set model.config.memory.compile for the compiled memory step inside the graph)")
        check(float32_matmul_precision in (None, "highest", "high", "medium"), "float32_matmul_precision",
              "null, highest, high or medium", float32_matmul_precision)
        check(max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "an integer >= 1",
              max_consecutive_nonfinite)
        check(memory_lr_scale > 0, "memory_lr_scale", "> 0", memory_lr_scale)
        check(logit_adjust >= 0, "logit_adjust", ">= 0 (0: plain cross-entropy)", logit_adjust)
        check(optimizer_impl in OPTIMIZER_IMPLS, "optimizer_impl", " / ".join(OPTIMIZER_IMPLS), optimizer_impl)
        if memory_lr_scale != 1.0 and not cfg.memory_layer_ids():
            raise ConfigError("has no memory to scale: model.config.memory_layers is empty (set it to 1.0)",
                              key="model.memory_lr_scale")
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(cfg)  # plain dict: the checkpoint loads with weights_only=True
        self.model = MemSparseLM(cfg)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.compile_model, self.max_consecutive_nonfinite = compile, max_consecutive_nonfinite
        self.memory_lr_scale, self.optimizer_impl = memory_lr_scale, optimizer_impl
        self.val_no_writes = bool(val_no_writes) and bool(cfg.memory_layer_ids())
        self.cuda_graph, self.float32_matmul_precision = cuda_graph, float32_matmul_precision
        self._graphed: GraphedLoss | None = None
        self.logit_adjust = float(logit_adjust)
        self._label_counts: torch.Tensor | None = None  # (V,) float64: labelled tokens so far (logit_adjust)
        if self.logit_adjust:
            self.model.loss_logit_bias = torch.zeros(cfg.vocab_size)
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self._loss_ok: torch.Tensor | None = None  # on the device: every micro-batch's loss of this step finite
        self._step_logs: dict[str, torch.Tensor] = {}  # this step's metrics, logged in on_before_optimizer_step
        self._grad_norm: torch.Tensor | None = None
        self._pending_skip: tuple[int, _HostFlag] | None = None  # (step, flag) of a skip the device decided
        self._t_last: float | None = None
        self._tokens_last = 0
        self._compiled = False
        self._eval_sum, self._eval_tokens = 0.0, 0
        self._answer_hook_handle = None
        self._answer_pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (labels, source) of this forward
        self._answer_names: list[str] | None = None  # synthetic task per source 1 + k, when answers are tracked
        self._answer_counts: torch.Tensor | None = None
        self._answer_counts_no_writes: torch.Tensor | None = None
        self._answer_eos: int | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        """Check the model's vocabulary against the datamodule's tokenizer; guard checkpoint loading."""
        self._check_vocab()
        self._guard_checkpoint_loading()
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if self.cuda_graph and stage == "fit":
            self._check_cuda_graph()
        if self.logit_adjust and stage == "fit":
            self._check_logit_adjust_labels()
        if self.compile_model and not self._compiled:
            self.model.compile()
            self._compiled = True

    def _check_logit_adjust_labels(self) -> None:
        """Warn when logit_adjust meets labels on every token (text, or `synthetic_loss: all`): there the prior is
        the tokens' unigram distribution, and in the CPU probe the adjusted model stopped copying (docs/training.md)."""
        dm = getattr(self._trainer, "datamodule", None)
        if dm is None:
            return
        specs = getattr(dm, "synthetic", None) or []
        every = [w for w, on in (("the text's tokens", 1.0 - sum(s.proportion for s in specs) > 1e-9),
                                 ("synthetic_loss: all", specs and getattr(dm, "synthetic_loss", None) == "all"))
                 if on]
        if every:
            rank_zero_warn(f"model.logit_adjust={self.logit_adjust:g} with labels on every token ({', '.join(every)}): "
                           "the prior is then the tokens' unigram distribution, and in the CPU probe such a model "
                           "stopped copying its keys; the adjustment is meant for data.synthetic_loss: answer with "
                           "no text (docs/training.md)")

    def _check_cuda_graph(self) -> None:
        dev = self.trainer.strategy.root_device
        if dev.type != "cuda":
            raise ConfigError(f"model.cuda_graph=true needs a CUDA device, but this run trains on {dev}: "
                              "set model.cuda_graph=false (or trainer.accelerator=gpu)")
        if self._sharded():
            raise ConfigError("model.cuda_graph=true does not work with FSDP (parameters are gathered per step); "
                              "use trainer.strategy=ddp or set model.cuda_graph=false")

    def _tokenizer(self) -> Any:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(dm, "tokenizer", None)

    def _check_vocab(self) -> None:
        tok = self._tokenizer()
        if tok is None:
            return
        model_v, tok_v = self.config.vocab_size, int(tok.vocab_size)
        if model_v < tok_v:
            raise ConfigError(
                f"model.config.vocab_size={model_v} is smaller than the data's tokenizer ({tok.kind}, "
                f"{tok_v} tokens): the model must cover every token id. Let memsparse-train fill it from "
                f"data.vocab_size, or set it to >= {tok_v}")
        if model_v > tok_v:
            rank_zero_warn(f"model vocab_size={model_v} > tokenizer vocab_size={tok_v} ({tok.kind}): "
                           f"{model_v - tok_v} embedding rows are never used")

    def _guard_checkpoint_loading(self) -> None:
        """Make a corrupted/unreadable `.ckpt` a ValueError naming the file (Lightning loads it after setup)."""
        strategy = self.trainer.strategy
        if getattr(strategy, "_memsparse_guarded", False):
            return
        original = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path, *args: Any, **kwargs: Any):
            try:
                ckpt = original(checkpoint_path, *args, **kwargs)
            except FileNotFoundError:
                raise
            except UNREADABLE_CHECKPOINT as e:
                raise unreadable_checkpoint(checkpoint_path, e) from None
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
                raise CheckpointError(f"{checkpoint_path} is not a Lightning training checkpoint (no state_dict)")
            return ckpt

        strategy.load_checkpoint = load_checkpoint
        strategy._memsparse_guarded = True

    # --------------------------------------------------------------------------------------------- training

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None):
        return self.model(input_ids, labels, return_logits=False, doc_ids=doc_ids)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None and self._tokens_last:
            rate = self._tokens_last * self.trainer.world_size / max(now - self._t_last, 1e-9)
            self._log_host("train/tokens_per_s", rate)
            if torch.cuda.is_available() and self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                self._log_host("train/peak_mem_gib", peak)
        self._t_last = now
        self._tokens_last = int(batch["input_ids"].numel())

    def _log_host(self, name: str, value: float) -> None:
        """Log a number the host already has, as a CPU tensor: Lightning turns a Python number into a tensor on the
        module's device, a pageable host-to-device copy that waits for the device (4 such waits, ~34 ms of a
        stage-1 step on an H100: benchmarks/results/step_profile_fused_h100_2026-12-06/)."""
        self.log(name, torch.tensor(float(value)), on_step=True, on_epoch=False, batch_size=1)

    def _update_logit_bias(self, labels: torch.Tensor) -> None:
        """Count `labels` (-100 ignored) into the prior and set the model's loss bias to logit_adjust * log(prior),
        in place (a CUDA graph reads it) and without a host sync."""
        bias = self.model.loss_logit_bias
        if self._label_counts is None:
            self._label_counts = torch.zeros(bias.shape, dtype=torch.float64, device=bias.device)
        elif self._label_counts.device != bias.device:  # restored from a checkpoint on the CPU
            self._label_counts = self._label_counts.to(bias.device)
        lab = labels.reshape(-1)
        self._label_counts.index_add_(0, lab.clamp_min(0), (lab != -100).to(torch.float64))
        bias.copy_(logit_adjustment(self._label_counts, self.logit_adjust))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.logit_adjust:
            self._update_logit_bias(batch["labels"])
        if self.cuda_graph:
            if self._graphed is None:
                self._graphed = GraphedLoss(self.model)
            out = self._graphed(batch["input_ids"], batch["labels"], batch.get("doc_ids"))
        else:  # packed documents kept apart (doc_ids; the model's cross_document flag ignores them)
            out = self(batch["input_ids"], batch["labels"], batch.get("doc_ids"))
        loss = out.loss.detach()
        # No host sync here: finiteness is decided once a step, in on_before_optimizer_step, with the gradient's
        # (each bool(tensor) makes the host wait for the device, which then idles while the host catches up).
        ok = torch.isfinite(loss)
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok  # over the step's micro-batches
        self._step_logs = {"train/loss": loss, "train/ppl": torch.exp(loss.clamp(max=30.0)),
                           "train/label_tokens": (batch["labels"] != -100).sum().float(),
                           **{f"train/{k}": v.detach().float() for k, v in out.stats.items()}}
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is not None:
            self._log_host("train/lr", opt.param_groups[0]["lr"])
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's loss and gradient norm and skip the step on a non-finite loss or gradient.

        With fused AdamW the skip is decided on the device (`optimizer.found_inf`, as a gradient scaler sets it: the
        fused step then leaves parameters, moments and step counts as they were) and the host learns of it one step
        later, without waiting for this step's work. Otherwise the step's one host read takes both finiteness flags
        at once and a skipped step's gradients are dropped."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = _sum_of_squares(grads) if grads else torch.zeros((), device=self.device)
        if self._sharded():
            sq = self.trainer.strategy.reduce(sq, reduce_op="sum")
        grad_norm = sq.sqrt()
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool, device=sq.device)
        loss_ok = loss_ok.to(sq.device)
        logs, self._step_logs, self._loss_ok = self._step_logs, {}, None
        if self._skips_on_device(optimizer):
            self._settle_skip()  # the previous step's flag: long computed, so no wait on this step's work
            bad_t = ~(loss_ok & torch.isfinite(grad_norm))
            if self.trainer.world_size > 1:  # every rank skips alike (a collective, no host wait)
                bad_t = self.trainer.strategy.reduce(bad_t.float(), reduce_op="sum") > 0
            getattr(optimizer, "optimizer", optimizer).found_inf = bad_t.float()  # torch's, not a wrapper
            self._pending_skip = (self.global_step, _HostFlag(bad_t))
            self._log_step_metrics(logs)  # a skipped step's non-finite loss is logged as it was
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False, batch_size=1)
            self._grad_norm = grad_norm  # clipping a step that is skipped changes nothing
            self._log_host("train/nonfinite_steps", self.nonfinite_steps)
            return
        loss_finite, grad_finite = torch.stack([loss_ok, torch.isfinite(grad_norm)]).tolist()
        bad = not (loss_finite and grad_finite)
        bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if loss_finite:
            self._log_step_metrics(logs)
        self._grad_norm = None if bad else grad_norm
        if not bad:
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False, batch_size=1)
        else:
            for p in self.parameters():
                p.grad = None  # AdamW leaves parameters without a gradient (and their state) untouched
        self._count_step(self.global_step, bad)
        self._log_host("train/nonfinite_steps", self.nonfinite_steps)

    def _log_step_metrics(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self.log(k, v, on_step=True, on_epoch=False, prog_bar=k == "train/loss", batch_size=1)

    def _skips_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step's skip is left to the fused optimizer (`found_inf`): fused AdamW, no gradient scaler
        (it would set found_inf itself), not FSDP."""
        opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        return (bool(opt.defaults.get("fused")) and not self._sharded()
                and getattr(self.trainer.precision_plugin, "scaler", None) is None)

    def _settle_skip(self) -> None:
        """Count the step whose skip the device decided (`_pending_skip`), once its flag has reached the host."""
        if self._pending_skip is not None:
            step, flag = self._pending_skip
            self._pending_skip = None
            self._count_step(step, flag.get())

    def _count_step(self, step: int, bad: bool) -> None:
        """The skipped-step counters; warn on a skip, stop after `max_consecutive_nonfinite` in a row."""
        if not bad:
            self.consecutive_nonfinite = 0
            return
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        rank_zero_warn(f"step {step}: non-finite loss or gradient, optimizer step skipped "
                       f"({self.consecutive_nonfinite} in a row, {self.nonfinite_steps} in total)")
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"{self.consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or gradient "
                f"(max_consecutive_nonfinite={self.max_consecutive_nonfinite}) at step {step}: "
                "stopping. The weights were never updated with them; the last checkpoint is intact. "
                "Lower the learning rate, raise warmup, or check the data.")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clip with torch directly: by the norm on_before_optimizer_step computed (no second norm, no host sync),
        or by value. Not through Lightning's clip_gradients, which refuses fused optimizers under mixed precision
        (they could unscale fp16 gradients inside the step; the fused path is only taken without a scaler). Under
        FSDP the wrapped model's own `clip_grad_norm_` clips by the global norm over all shards (Lightning's FSDP
        precision plugin refuses norm clipping; found in a one-GPU FSDP run of mac_small)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be norm or value, got {gradient_clip_algorithm!r}")
        if self._sharded():
            if gradient_clip_algorithm == "value":
                raise ValueError(f"under FSDP only norm clipping is supported, got gradient_clip_algorithm="
                                 f"{gradient_clip_algorithm!r}")
            self.trainer.model.clip_grad_norm_(float(gradient_clip_val))
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        if gradient_clip_algorithm == "value":
            torch._foreach_clamp_min_(grads, -float(gradient_clip_val))
            torch._foreach_clamp_max_(grads, float(gradient_clip_val))
            return
        norm = self._grad_norm
        if norm is None:
            norm = _sum_of_squares(grads).sqrt()
        coef = (float(gradient_clip_val) / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, coef.to(grads[0].device))

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(self.trainer.strategy, FSDPStrategy)

    # ------------------------------------------------------------------------------------------- evaluation

    def _forward_counted(self, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output on `batch`, its answer positions counted into `_answer_counts` by `_answer_hook`."""
        if self._answer_counts is not None and "source" in batch:
            self._answer_pending = (batch["labels"], batch["source"])  # counted by `_answer_hook` in the forward
        try:
            return self(batch["input_ids"], batch["labels"], batch.get("doc_ids"))
        finally:
            self._answer_pending = None

    @staticmethod
    def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
        """The batch's labelled tokens (at least 1): the loss's weight when epochs are averaged (one host sync)."""
        return max(1, int((batch["labels"] != -100).sum()))

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str, n_tok: int) -> torch.Tensor:
        out = self._forward_counted(batch)
        if torch.isfinite(out.loss):
            self._eval_sum += float(out.loss) * n_tok
            self._eval_tokens += n_tok
        self.log(f"{prefix}/loss", out.loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n_tok,
                 sync_dist=True)
        for k, v in out.stats.items():
            self.log(f"{prefix}/{k}", v.float(), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        n_tok = self._labelled_tokens(batch)
        loss = self._eval_step(batch, "val", n_tok)
        if self.val_no_writes:
            self._no_writes_step(batch, n_tok)
        return loss

    def _no_writes_step(self, batch: dict[str, torch.Tensor], n_tok: int) -> None:
        """The batch again with every memory's writes off (`val_no_writes`): its loss, and its answer positions
        counted apart; each block's write switch is restored after."""
        counts, self._answer_counts = self._answer_counts, self._answer_counts_no_writes
        try:
            with self.model.memory_writes_as(False):
                out = self._forward_counted(batch)
        finally:
            self._answer_counts_no_writes, self._answer_counts = self._answer_counts, counts
        self.log("val/no_writes/loss", out.loss, on_step=False, on_epoch=True, batch_size=n_tok, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The validation step, plus the loss per source (text, each synthetic task): a batch of one source
        reuses its loss, a mixed batch takes one more forward per source."""
        loss = self._eval_step(batch, "test", self._labelled_tokens(batch))
        src = batch.get("source")
        if src is None:
            return loss
        groups = torch.unique(src).tolist()
        for k in groups:
            rows = src == k
            n = int((batch["labels"][rows] != -100).sum())
            docs = batch.get("doc_ids")
            part = loss if len(groups) == 1 else self(batch["input_ids"][rows], batch["labels"][rows],
                                                      None if docs is None else docs[rows]).loss
            if n and bool(torch.isfinite(part)) and k < self._source_sums.shape[1]:
                self._source_sums[0, k] += float(part) * n
                self._source_sums[1, k] += n
        return loss

    def on_validation_epoch_start(self) -> None:
        self._eval_sum, self._eval_tokens = 0.0, 0
        self._start_answer_tracking()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = [s.task for s in (getattr(dm, "synthetic", None) or [])]
        self._source_names = ["text"] + [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        self._source_sums = torch.zeros(2, len(self._source_names), dtype=torch.float64, device=self.device)

    def _start_answer_tracking(self) -> None:
        """Track the answer-token accuracy of the synthetic samples when the datamodule trains on their answers
        only (`synthetic_loss: answer`, where the labels mark the answer positions); off otherwise."""
        self._answer_counts = None
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        specs = getattr(dm, "synthetic", None) or []
        if tok is None or not specs or getattr(dm, "synthetic_loss", None) != "answer":
            return
        names = [s.task for s in specs]
        self._answer_names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        self._answer_eos = int(tok.eos_id)
        self._answer_counts = torch.zeros(4, 1 + len(names), dtype=torch.float64, device=self.device)
        self._answer_counts_no_writes = torch.zeros_like(self._answer_counts) if self.val_no_writes else None
        if self._answer_hook_handle is None:
            self._answer_hook_handle = self.model.norm.register_forward_hook(self._answer_hook)

    def _answer_hook(self, module: torch.nn.Module, args: Any, h: torch.Tensor) -> None:
        """Forward hook on the model's final norm (validation only): count the answer positions' argmax from its
        output, inside the forward (where a sharded model's output weight is gathered), under its autocast."""
        pending, self._answer_pending = self._answer_pending, None
        if pending is not None and self._answer_counts is not None:
            labels, source = pending
            self._answer_counts += answer_accuracy_counts(h, self.model.output_weight, labels, source,
                                                          self._answer_eos, self._answer_counts.shape[1])

    def _log_answer_accuracy(self, prefix: str) -> None:
        """`<prefix>/answer_token_acc` and `<prefix>/answer_exact` over all synthetic sources and per task (all
        ranks' counts summed first); the forward hook is removed, so training runs without it."""
        if self._answer_hook_handle is not None:
            self._answer_hook_handle.remove()
            self._answer_hook_handle = None
        counts, self._answer_counts = self._answer_counts, None
        no_writes, self._answer_counts_no_writes = self._answer_counts_no_writes, None
        self._log_answer_counts(counts, prefix)
        if prefix == "val":
            self._log_answer_counts(no_writes, "val/no_writes")

    def _log_answer_counts(self, counts: torch.Tensor | None, prefix: str) -> None:
        """`<prefix>/answer_token_acc` and `<prefix>/answer_exact`, overall and per task, from `counts`."""
        if counts is None:
            return
        c = self.trainer.strategy.reduce(counts, reduce_op="sum")
        c = c.cpu() if torch.is_tensor(c) else torch.as_tensor(c)
        groups = [("", slice(1, None))] + [(f"/{n}", slice(1 + k, 2 + k)) for k, n in enumerate(self._answer_names)]
        for suffix, idx in groups:
            correct, tokens, exact, rows = (float(c[i, idx].sum()) for i in range(4))
            if tokens > 0:
                self.log(f"{prefix}/answer_token_acc{suffix}", correct / tokens, batch_size=1, sync_dist=True)
                self.log(f"{prefix}/answer_exact{suffix}", exact / rows, batch_size=1, sync_dist=True)

    def _log_ppl(self, prefix: str) -> None:
        """Token-weighted perplexity over the whole evaluation (all ranks)."""
        t = torch.tensor([self._eval_sum, float(self._eval_tokens)], dtype=torch.float64, device=self.device)
        t = self.trainer.strategy.reduce(t, reduce_op="sum")
        if t[1] > 0:
            self.log(f"{prefix}/ppl", torch.exp((t[0] / t[1]).clamp(max=30.0)).float(), batch_size=1, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_ppl("val")
        self._log_answer_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_ppl("test")
        self._log_answer_accuracy("test")
        c = self.trainer.strategy.reduce(self._source_sums, reduce_op="sum")
        c = c.cpu() if torch.is_tensor(c) else torch.as_tensor(c)
        for k, name in enumerate(self._source_names):
            if c[1, k] > 0:
                mean = float(c[0, k] / c[1, k])
                self.log(f"test/loss/{name}", mean, batch_size=1, sync_dist=True)
                self.log(f"test/ppl/{name}", math.exp(min(mean, 30.0)), batch_size=1, sync_dist=True)

    def on_predict_start(self) -> None:
        self._predictions: list[dict[str, Any]] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate a continuation of one prompt (the datamodule's `predict_*` settings): a JSON-ready record."""
        dm = self.trainer.datamodule
        tok = dm.tokenizer
        gen = torch.Generator(device=self.device).manual_seed(int(dm.seed) + int(batch["index"]))
        ids, _ = self.model.generate(batch["input_ids"][None], dm.predict_max_new_tokens,
                                     temperature=dm.predict_temperature, top_k=dm.predict_top_k, eos_id=tok.eos_id,
                                     generator=gen)
        new = ids[0].tolist()
        ended = tok.eos_id in new
        if ended:
            new = new[: new.index(tok.eos_id)]
        rec = {"index": int(batch["index"]), "prompt": batch["prompt"], "completion": tok.decode(new),
               "prompt_tokens": int(batch["input_ids"].numel()) - 1, "completion_tokens": len(new),
               "stopped_at_eos": ended}
        self._predictions.append(rec)
        return rec

    def on_predict_end(self) -> None:
        """Write the records as JSON lines to `data.predict_output` (default `<default_root_dir>/predictions.jsonl`;
        one file per rank, `.rank<N>` before the suffix, when several processes predict)."""
        import json

        dm = self.trainer.datamodule
        out = Path(dm.predict_output or Path(self.trainer.default_root_dir) / "predictions.jsonl")
        if self.trainer.world_size > 1:
            out = out.with_name(f"{out.stem}.rank{self.trainer.global_rank}{out.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for rec in sorted(self._predictions, key=lambda r: r["index"]):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        rank_zero_info(f"wrote {len(self._predictions)} prediction(s) to {out}")

    # ------------------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self.model, self.weight_decay, self.lr, self.memory_lr_scale)
        kwargs: dict[str, Any] = {"lr": self.lr, "betas": self.betas, "eps": self.eps}
        impl = self._resolve_optimizer_impl()
        if impl != "default":
            kwargs[impl] = True
        opt = torch.optim.AdamW(groups, **kwargs)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        if not 0 < total < 10**12:
            raise ConfigError(f"cannot size the cosine schedule (total steps {total}): set trainer.max_steps or "
                              "model.total_steps")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(self.warmup_steps, total, self.min_lr / self.lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _resolve_optimizer_impl(self) -> str:
        """"fused", "foreach" or "default" (torch's own choice) from `optimizer_impl`, the device and the precision."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        cuda = self.device.type == "cuda"
        if self.optimizer_impl == "fused":
            if scaler is not None:
                raise ConfigError("fused AdamW needs a precision without a gradient scaler (bf16-mixed, bf16-true, "
                                  "32-true), not fp16's: use foreach or auto", key="model.optimizer_impl")
            return "fused"
        if self.optimizer_impl == "foreach":
            return "foreach"
        return ("fused" if scaler is None else "foreach") if cuda else "default"

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse non-finite weights; store the model config, the tokenizer, counters and RNG states."""
        self._settle_skip()  # the counters below include the last step's skip
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteTrainingError(f"refusing to save a checkpoint with non-finite weights: {bad[:5]}")
        tok = self._tokenizer()
        np_state = np.random.get_state()
        checkpoint[CKPT_KEY] = {
            "format": 1,
            "model_config": asdict(self.config),
            "tokenizer": tokenizer_payload(tok) if tok is not None else None,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "label_counts": None if self._label_counts is None else self._label_counts.cpu(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": _py_state_to_plain(random.getstate()),
                "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint matches this model (clear error), restore counters and RNG states."""
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        check_checkpoint_matches(checkpoint, self.model, source=str(path or "checkpoint"))
        saved_scale = float((checkpoint.get("hyper_parameters") or {}).get("memory_lr_scale", 1.0))
        if checkpoint.get("optimizer_states") and saved_scale != self.memory_lr_scale:
            # the optimizer's groups (and the scheduler's base rates) were built for the saved scale
            raise ConfigError(f"{path or 'the checkpoint'} was trained with model.memory_lr_scale={saved_scale:g}; "
                              f"resume it with that value, not {self.memory_lr_scale:g}",
                              key="model.memory_lr_scale")
        meta = checkpoint.get(CKPT_KEY) or {}
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        self.consecutive_nonfinite = int(meta.get("consecutive_nonfinite", 0))
        counts = meta.get("label_counts")
        if self.logit_adjust and counts is not None:  # the prior goes on from where the run stopped
            self._label_counts = counts.to(torch.float64)
        rng = meta.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(_plain_to_py_state(rng["python"]))
            n = rng["numpy"]
            np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))

    # ---------------------------------------------------------------------------------------------- export

    def on_train_end(self) -> None:
        self._settle_skip()

    def on_fit_end(self) -> None:
        """Export the final model + tokenizer to `<default_root_dir>/export` (loadable by `from_pretrained`).

        Every rank waits for rank 0's export, so no rank leaves `fit` (and starts tearing down its connections)
        while the export is still being written."""
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "export"
            self.export(out)
            rank_zero_info(f"exported the model and tokenizer to {out}")
        if self.trainer.world_size > 1:
            self.trainer.strategy.barrier("memsparse_export")

    def export(self, directory: str | Path) -> Path:
        """`save_pretrained` + the tokenizer into `directory`."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        tok = self._tokenizer()
        if tok is not None:
            tok.save(directory)
        return directory


# ------------------------------------------------------------------------------------------ checkpoint files


def check_checkpoint_matches(checkpoint: dict[str, Any], model: MemSparseLM, source: str) -> None:
    """ValueError naming `source` when the checkpoint's config or weight shapes differ from `model`'s."""
    meta = checkpoint.get(CKPT_KEY) or {}
    saved_cfg = meta.get("model_config")
    if saved_cfg is not None:
        now = asdict(model.config)
        diff = {k: (saved_cfg.get(k), v) for k, v in now.items() if saved_cfg.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in list(diff.items())[:6])
            raise CheckpointError(f"checkpoint {source} was trained with another model config: {shown}")
    sd = checkpoint.get("state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {source} has no state_dict")
    own = {f"model.{k}": v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(s)}" for k, s in own.items()
             if k in sd and torch.is_tensor(sd[k]) and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {source} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch (checkpoint vs model) {wrong[:5]}")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a memsparse training checkpoint (weights_only); ValueError naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_CHECKPOINT as e:
        raise unreadable_checkpoint(path, e) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or CKPT_KEY not in ckpt:
        raise CheckpointError(f"{path} is not a memsparse training checkpoint (no state_dict / {CKPT_KEY} section)")
    return ckpt


# what torch.load raises on a truncated, corrupted or foreign file
UNREADABLE_CHECKPOINT = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, KeyError,
                         ValueError, AttributeError, ImportError, IndexError)


def unreadable_checkpoint(path: str | Path, error: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint file torch cannot read (the cause's first line, shortened)."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = first.split(". ")[0][:160]
    return CheckpointError(f"cannot read checkpoint {path}: truncated, corrupted or not a torch checkpoint "
                           f"({type(error).__name__}: {first})")


def model_from_checkpoint(path: str | Path) -> tuple[MemSparseLM, Any]:
    """(MemSparseLM with the checkpoint's weights, its tokenizer or None) from a `.ckpt` alone."""
    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    try:
        model = MemSparseLM(from_dict(ModelConfig, meta["model_config"]))
    except (ConfigError, TypeError, KeyError) as e:
        raise ValueError(f"checkpoint {path}: bad model config: {e}") from None
    check_checkpoint_matches(ckpt, model, str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items()})
    tok = tokenizer_from_payload(meta["tokenizer"]) if meta.get("tokenizer") else None
    return model, tok


def export_checkpoint(path: str | Path, directory: str | Path) -> Path:
    """Write a `.ckpt`'s model (`save_pretrained`) and tokenizer into `directory`."""
    model, tok = model_from_checkpoint(path)
    directory = Path(directory)
    model.save_pretrained(directory)
    if tok is not None:
        tok.save(directory)
    return directory


def _py_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_to_py_state(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)
