"""A training step's forward + backward replayed as one CUDA graph.

The memsparse step is thousands of small kernels (segment loop x layers x memory chunks): on an H100 the GPU
is busy under 15% of an eager step (benchmarks/results/profile_model.md). Capturing the whole forward and
backward once and replaying it removes the Python and launch cost; the shapes of a step depend only on
(batch, length), never on data (the attention budget's per-block cap is computed on the host from lengths,
and nothing in the model reads a device value back), so one capture serves every step of that shape.

`GraphedLoss(model)(input_ids, labels)` returns the model's `LMOutput` (no logits) whose loss is attached to
the model's parameters: `loss.backward()` (with any scale, e.g. gradient accumulation's 1/n) hands autograd
the gradients the graph computed, so optimizers, gradient clipping, accumulation and DDP's reducer hooks
work unchanged. The gradients live in static buffers that the next replay overwrites: call `backward` on a
step's loss before running the next step (a later backward raises).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from .model import LMOutput, MemSparseLM


class _AttachGrads(torch.autograd.Function):
    """loss -> loss, with d loss / d params = the graph's gradients (scaled by the incoming gradient)."""

    @staticmethod
    def forward(ctx, loss: Tensor, step: GraphedLoss, *params: Tensor) -> Tensor:
        ctx.step, ctx.replay = step, step.replays
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        step: GraphedLoss = ctx.step
        if step.replays != ctx.replay:
            raise RuntimeError("backward of a GraphedLoss output after a later step was run: its gradients were "
                               "overwritten. Call backward on each step's loss before running the next step.")
        grads = step.static_grads
        have = [gr for gr in grads if gr is not None]
        scaled = iter(torch._foreach_mul(have, g.to(have[0].dtype))) if have else iter(())
        return (None, None, *[None if gr is None else next(scaled) for gr in grads])


class GraphedLoss:
    """Forward + backward of `model(input_ids, labels)` captured once per input shape and replayed.

    Args:
        model: a `MemSparseLM` on a CUDA device (in training mode when called).
        warmup: eager iterations on a side stream before capture (autotuning, compilation, allocator warm-up).
        graph: False runs the same static-buffer step eagerly instead of replaying a graph (CPU tests,
            debugging a capture); the results are the same.

    Call with input_ids, labels `(B, L)` (as `MemSparseLM.forward`) -> `LMOutput(loss, None, stats)`. The
    captured step uses the autocast state (enabled, dtype) of its first call, with autocast's weight cache
    off as capture requires. A new shape recaptures (with a warning); so does a parameter that was
    reallocated (e.g. `model.to(...)`). The model's parameters must stay where they are between steps
    (in-place optimizer updates are fine).
    """

    def __init__(self, model: MemSparseLM, *, warmup: int = 3, graph: bool = True):
        if not isinstance(model, MemSparseLM):
            raise TypeError(f"GraphedLoss needs a MemSparseLM, got {type(model).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning and lazy initialisation must not be captured), "
                             f"got {warmup}")
        self.model, self.warmup, self.graph = model, warmup, graph
        self.replays = 0
        self.captures = 0
        self.static_grads: tuple[Tensor | None, ...] = ()
        self._key = None
        self._cuda_graph = None

    # ----------------------------------------------------------------------------------------------------
    def __call__(self, input_ids: Tensor, labels: Tensor) -> LMOutput:
        model = self.model
        if not model.training or not torch.is_grad_enabled():
            raise RuntimeError("GraphedLoss replays a training step: call it with the model in train() mode "
                               "and gradients enabled (evaluate with the model itself)")
        if self.graph and not input_ids.is_cuda:
            raise ValueError("CUDA graphs need the model and inputs on a CUDA device (got "
                             f"{input_ids.device}); use graph=False or the model directly on CPU")
        model._check_ids(input_ids)  # host-side checks once per shape are not enough: ids change every step
        if labels is None or labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {None if labels is None else tuple(labels.shape)}")
        key = self._make_key(input_ids)
        if key != self._key:
            if self._key is not None:
                warnings.warn(f"GraphedLoss: input shape or parameters changed ({self._key[0]} -> {key[0]}): "
                              "recapturing the step", stacklevel=2)
            self._capture(input_ids, labels, key)
        self._ids.copy_(input_ids)
        self._labels.copy_(labels)
        if self.graph:
            self._cuda_graph.replay()
        else:
            self._fill(*self._run())
        self.replays += 1
        loss = _AttachGrads.apply(self._loss, self, *self._params)
        return LMOutput(loss, None, {k: v.clone() for k, v in self._stats.items()})

    # ----------------------------------------------------------------------------------------------------
    def _make_key(self, input_ids: Tensor):
        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        amp = (torch.is_autocast_enabled(input_ids.device.type), torch.get_autocast_dtype(input_ids.device.type))
        return (tuple(input_ids.shape), input_ids.device, amp, tuple(p.data_ptr() for p in params))

    def _autocast(self):
        dev = self._ids.device.type
        enabled, dtype = self._key[2]
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=dtype, cache_enabled=False)

    def _run(self):
        """One forward + backward on the static inputs -> (loss, stats, grads): what the graph records."""
        with self._autocast():
            out = self.model(self._ids, self._labels, return_logits=False)
        grads = torch.autograd.grad(out.loss, self._params, allow_unused=True)
        return out.loss.detach(), {k: v.detach() for k, v in out.stats.items()}, grads

    def _fill(self, loss, stats, grads):
        self._loss, self._stats, self.static_grads = loss, stats, tuple(grads)

    def _capture(self, input_ids: Tensor, labels: Tensor, key) -> None:
        self._cuda_graph = None  # release the previous graph's memory pool first
        self._key = key
        self._params = tuple(p for p in self.model.parameters() if p.requires_grad)
        self._ids, self._labels = input_ids.clone(), labels.clone()
        self.captures += 1
        if not self.graph:
            return
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run()
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        torch.cuda.synchronize(input_ids.device)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                self._fill(*self._run())
        except RuntimeError as e:  # torch.AcceleratorError is a RuntimeError
            self._key = None
            raise RuntimeError(
                f"CUDA-graph capture of the training step failed ({type(e).__name__}: {e}). Something in the step "
                "synchronises with the host or runs on another stream (e.g. an autograd graph of this model built "
                "outside GraphedLoss is still alive). Train without it: model.cuda_graph=false") from e
        self._cuda_graph = g

