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

from .consolidation import consolidation_passes
from .memory import MemoryInputs, MemoryState
from .model import LayerState, LMOutput, MemSparseLM, StreamState


def _amp_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(autocast enabled, its dtype) for `device_type`: part of every capture's key."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_uncached(device_type: str, amp: tuple[bool, torch.dtype]):
    """The captured autocast state with the weight cache off (a cast cached outside a capture is not recorded)."""
    enabled, dtype = amp
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False) if enabled else contextlib.nullcontext()


def _capture(warm, record, device: torch.device, warmup: int, on_error=None) -> torch.cuda.CUDAGraph:
    """`warmup` calls of `warm()` on a side stream (autotuning, compilation, lazy initialisation stay out of the
    graph), then `record()` captured as a CUDA graph. `on_error(e)` -> the exception to raise if the capture
    itself fails."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            warm()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            record()
    except RuntimeError as e:  # torch.AcceleratorError is a RuntimeError
        if on_error is None:
            raise
        raise on_error(e) from e
    return g


def _training_capture_error(e: Exception) -> RuntimeError:
    return RuntimeError(
        f"CUDA-graph capture of the training step failed ({type(e).__name__}: {e}). Something in the step "
        "synchronises with the host or runs on another stream (e.g. an autograd graph of this model built "
        "outside GraphedLoss is still alive). Train without it: model.cuda_graph=false")


class _AttachGrads(torch.autograd.Function):
    """loss -> loss, with d loss / d params = the graph's gradients (scaled by the incoming gradient)."""

    @staticmethod
    def forward(ctx, loss: Tensor, cap: _CapturedLoss, *params: Tensor) -> Tensor:
        ctx.cap, ctx.replay = cap, cap.replays
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        cap: _CapturedLoss = ctx.cap
        if cap.replays != ctx.replay:
            raise RuntimeError("backward of a GraphedLoss output after a later step was run: its gradients were "
                               "overwritten. Call backward on each step's loss before running the next step.")
        grads = cap.grads
        have = [gr for gr in grads if gr is not None]
        scaled = iter(torch._foreach_mul(have, g.to(have[0].dtype))) if have else iter(())
        return (None, None, *[None if gr is None else next(scaled) for gr in grads])


class _CapturedLoss:
    """Static inputs, outputs and (on CUDA) the graph of one input shape."""

    def __init__(self, model: MemSparseLM, input_ids: Tensor, labels: Tensor, amp: tuple, graph: bool,
                 warmup: int, doc_ids: Tensor | None = None):
        self.model, self.amp = model, amp
        self.params = tuple(p for p in model.parameters() if p.requires_grad)
        self.ids, self.labels = input_ids.clone(), labels.clone()
        self.doc_ids = None if doc_ids is None else doc_ids.to(input_ids.device).clone()
        self.replays = 0
        self.cuda_graph = None
        if not graph:
            return
        self.cuda_graph = _capture(self.run, lambda: self.fill(*self.run()), input_ids.device, warmup,
                                   _training_capture_error)

    def run(self):
        """One forward + backward on the static inputs -> (loss, stats, grads): what the graph records."""
        with _autocast_uncached(self.ids.device.type, self.amp):
            out = self.model(self.ids, self.labels, return_logits=False, doc_ids=self.doc_ids)
        grads = torch.autograd.grad(out.loss, self.params, allow_unused=True)
        return out.loss.detach(), {k: v.detach() for k, v in out.stats.items()}, grads

    def fill(self, loss, stats, grads):
        self.loss, self.stats, self.grads = loss, stats, tuple(grads)

    def step(self, input_ids: Tensor, labels: Tensor, doc_ids: Tensor | None = None) -> LMOutput:
        self.ids.copy_(input_ids)
        self.labels.copy_(labels)
        if doc_ids is not None:
            self.doc_ids.copy_(doc_ids)
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        else:
            self.fill(*self.run())
        self.replays += 1
        loss = _AttachGrads.apply(self.loss, self, *self.params)
        return LMOutput(loss, None, {k: v.clone() for k, v in self.stats.items()})


class GraphedLoss:
    """Forward + backward of `model(input_ids, labels)` captured once per input shape and replayed.

    Args:
        model: a `MemSparseLM` on a CUDA device (in training mode when called).
        warmup: eager iterations on a side stream before capture (autotuning, compilation, allocator warm-up).
        graph: False runs the same static-buffer step eagerly instead of replaying a graph (CPU tests,
            debugging a capture); the results are the same.
        max_graphs: captured shapes kept (each holds its own memory pool); a new shape beyond it releases the
            oldest.

    Call with input_ids, labels `(B, L)` and optionally doc_ids `(B, L)` (as `MemSparseLM.forward`; with and
    without doc_ids are two captures) -> `LMOutput(loss, None, stats)`. A step
    uses the autocast state (enabled, dtype) of the call that captured it, with autocast's weight cache off as
    capture requires. Each new shape is captured (with a warning after the first); so is a step after a
    parameter was reallocated (e.g. `model.to(...)`). The model's parameters must stay where they are between
    steps (in-place optimizer updates are fine). Capture happens on the first call of a shape: no autograd
    graph of the model built outside GraphedLoss (on another stream) may be alive then.
    """

    def __init__(self, model: MemSparseLM, *, warmup: int = 3, graph: bool = True, max_graphs: int = 2):
        if not isinstance(model, MemSparseLM):
            raise TypeError(f"GraphedLoss needs a MemSparseLM, got {type(model).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning and lazy initialisation must not be captured), "
                             f"got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model, self.warmup, self.graph, self.max_graphs = model, warmup, graph, max_graphs
        self.replays = 0
        self.captures = 0
        self._steps: dict = {}

    def __call__(self, input_ids: Tensor, labels: Tensor, doc_ids: Tensor | None = None) -> LMOutput:
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
        dev = input_ids.device.type
        amp = _amp_state(dev)
        params = tuple(p.data_ptr() for p in model.parameters() if p.requires_grad)
        if doc_ids is not None and (doc_ids.shape != input_ids.shape or doc_ids.dtype.is_floating_point):
            raise ValueError(f"doc_ids must be an integer tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {doc_ids.dtype} {tuple(doc_ids.shape)}")
        key = (tuple(input_ids.shape), input_ids.device, amp, params, doc_ids is not None)
        cap = self._steps.get(key)
        if cap is None:
            if self._steps:
                warnings.warn(f"GraphedLoss: capturing the step for a new input shape or new parameters "
                              f"({tuple(input_ids.shape)}); keep batch size and length fixed to avoid this",
                              stacklevel=2)
            while len(self._steps) >= self.max_graphs:  # release the oldest graph's memory pool first
                self._steps.pop(next(iter(self._steps)))
            cap = self._steps[key] = _CapturedLoss(model, input_ids, labels, amp, self.graph, self.warmup, doc_ids)
            self.captures += 1
        self.replays += 1
        return cap.step(input_ids, labels, doc_ids)


# ----------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------
def _flatten_layer(ls: LayerState) -> tuple[list[Tensor], tuple]:
    """A LayerState as a flat tensor list and the structure to rebuild it."""
    out = [ls.k, ls.v, ls.q_pool_prev, ls.q_sum_cur]
    mi, mem = ls.mem_inputs, ls.memory
    if mi is not None:
        out += [mi.q, mi.k, mi.v, mi.eta, mi.theta, mi.alpha]
    n_w = 0
    if mem is not None:
        n_w = len(mem.weights)
        out += [*mem.weights, *mem.momentum, mem.step]
    if ls.conv is not None:
        out.append(ls.conv)
    return out, (mi is not None, mem is not None, n_w, ls.conv is not None)


def _unflatten_layer(ts: list[Tensor], spec: tuple) -> LayerState:
    has_mi, has_mem, n_w, has_conv = spec
    k, v, qp, qs = ts[:4]
    i = 4
    mi = None
    if has_mi:
        mi = MemoryInputs(*ts[i:i + 6])
        i += 6
    mem = None
    if has_mem:
        mem = MemoryState(list(ts[i:i + n_w]), list(ts[i + n_w:i + 2 * n_w]), ts[i + 2 * n_w])
        i += 2 * n_w + 1
    return LayerState(k, v, mi, mem, qp, qs, ts[i] if has_conv else None)


class _SegmentStep:
    """One full, segment-aligned streaming step of fixed state shapes, on static buffers (replayed as a graph)."""

    def __init__(self, model: MemSparseLM, ids: Tensor, state: StreamState, graph: bool, warmup: int):
        self.model, self.graph = model, graph
        self.total_length = state.total_length
        flat = [_flatten_layer(ls) for ls in state.layers]
        self.specs = [spec for _, spec in flat]
        self.sizes = [len(ts) for ts, _ in flat]
        self.static_in = [t.clone() for ts, _ in flat for t in ts]
        self.ids = ids.clone()
        self.pos_t = torch.tensor(state.pos, device=ids.device)
        self.capture_pos = state.pos  # python-side logic is the same at every steady-state pos (shapes key it)
        self._cuda_graph = None
        self.amp = _amp_state(ids.device.type)
        if graph:
            def record():
                self._outputs = self._body()
                self._copy_back(self._outputs[1])

            self._cuda_graph = _capture(self._body, record, ids.device, warmup)

    def layers(self, tensors: list[Tensor]) -> list[LayerState]:
        out, i = [], 0
        for spec, n in zip(self.specs, self.sizes):
            out.append(_unflatten_layer(tensors[i:i + n], spec))
            i += n
        return out

    def _body(self):
        st = StreamState(self.layers(self.static_in), self.capture_pos, self.total_length)
        stats: dict = {}
        with _autocast_uncached(self.ids.device.type, self.amp):
            h, new = self.model._run(self.ids, st, stats, pos_t=self.pos_t)
        return h, [t for ls in new.layers for t in _flatten_layer(ls)[0]], stats

    def _copy_back(self, tensors: list[Tensor]) -> None:
        """Copy flat state tensors into the static inputs (those already living there are skipped)."""
        for a, b in zip(self.static_in, tensors):
            if a.data_ptr() != b.data_ptr():
                a.copy_(b)

    def load(self, state: StreamState) -> None:
        """Copy a state into the static inputs (unless it already lives there)."""
        self._copy_back([t for ls in state.layers for t in _flatten_layer(ls)[0]])

    def run(self, ids: Tensor, pos: int) -> tuple[Tensor, dict]:
        """One segment at `pos` from the loaded state; afterwards the static inputs hold the new state."""
        self.ids.copy_(ids)
        self.pos_t.fill_(pos)
        if self._cuda_graph is not None:
            self._cuda_graph.replay()
            h, _, stats = self._outputs
        else:
            h, outs, stats = self._body()
            self._copy_back(outs)
        return h, stats


class GraphedStream:
    """`MemSparseLM.stream` with every full, segment-aligned step at steady-state shapes replayed as a CUDA graph.

    Once the window is full, a streaming step (one segment: read, attend, evict into the memory, consolidate)
    has the same shapes at every position, and nothing in it reads a device value back; positions enter
    through a device tensor. Steps are captured per (state shapes, consolidation passes) and the state stays
    in the graph's buffers between segments; other steps (the first windows, partial segments) run eagerly.

    `GraphedStream(model)(input_ids, state=None, return_logits="all")` -> (logits, state): the same contract
    and results as `model.stream`. The returned state is a copy, safe to keep. `graph=False` runs the same
    static-buffer steps eagerly (CPU tests, debugging).
    """

    def __init__(self, model: MemSparseLM, *, graph: bool = True, warmup: int = 2, max_graphs: int = 8):
        if not isinstance(model, MemSparseLM):
            raise TypeError(f"GraphedStream needs a MemSparseLM, got {type(model).__name__}")
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"warmup and max_graphs must be >= 1, got {warmup}, {max_graphs}")
        self.model, self.graph, self.warmup, self.max_graphs = model, graph, warmup, max_graphs
        self.steps: dict = {}
        self.replays = 0

    def _key(self, ids: Tensor, state: StreamState):
        cfg = self.model.config
        S, W = cfg.segment, cfg.window
        if ids.shape[1] != S or state.pos % S or state.pos < W:
            return None
        if any(ls.k.shape[2] != W for ls in state.layers):
            return None
        seq_len = state.total_length if state.total_length is not None else state.pos + S
        passes = consolidation_passes(cfg.consolidation, seq_len, W, False)
        shapes = tuple(tuple(t.shape) + (t.dtype,) for ls in state.layers for t in _flatten_layer(ls)[0])
        amp = _amp_state(ids.device.type)
        # the declared total length matters only through the pass count (python-side, keyed here); the window
        # (`set_window`) is baked into a capture's python-side logic (which segment is evicted): keyed too
        return (tuple(ids.shape), ids.device, passes, shapes, amp, W,
                cfg.budget, cfg.hard_keep_fraction, repr(cfg.consolidation))

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, state: StreamState | None = None, return_logits: str = "all"):
        model = self.model
        model._check_ids(input_ids)
        if return_logits not in ("all", "last", "none"):
            raise ValueError(f"return_logits must be all, last or none, got {return_logits!r}")
        if self.graph and not input_ids.is_cuda:
            raise ValueError(f"CUDA graphs need a CUDA device (got {input_ids.device}); use graph=False")
        if model.training:
            raise RuntimeError("GraphedStream is for inference: call model.eval() first")
        state = model.init_state(input_ids.shape[0], device=input_ids.device) if state is None else state
        S = model.config.segment
        outs = []
        i, n = 0, input_ids.shape[1]
        stats = state.stats
        live: _SegmentStep | None = None  # the step whose static buffers hold the current state
        used: set[int] = set()
        while i < n:
            take = min(S - state.pos % S, n - i)
            ids = input_ids[:, i:i + take]
            key = self._key(ids, state)
            step = None
            if key is not None:
                step = self.steps.get(key)
                if step is None and len(self.steps) < self.max_graphs:
                    step = self.steps[key] = _SegmentStep(model, ids, state, self.graph, self.warmup)
                    live = step  # its static inputs are copies of `state`
            if step is not None:
                if live is not step:
                    step.load(state)
                h, seg_stats = step.run(ids, state.pos)
                self.replays += 1
                used.add(id(step))
                for k, (tot, cnt) in seg_stats.items():
                    t0, c0 = stats.get(k, (0.0, 0))
                    stats[k] = (t0 + tot, c0 + cnt)
                state = StreamState(step.layers(step.static_in), state.pos + take, state.total_length, stats)
                live = step
            else:
                h, state = model._run(ids, state, stats)
                live = None
            if return_logits == "all":
                outs.append(h @ model.output_weight.t())
            elif return_logits == "last" and i + take == n:
                outs.append(h[:, -1:] @ model.output_weight.t())
            i += take
        if used:  # hand back copies of whatever lives in static buffers (the next replay overwrites them)
            ptrs = {t.data_ptr() for step in self.steps.values() if id(step) in used for t in step.static_in
                    if t.numel()}
            layers = []
            for ls in state.layers:
                ts, spec = _flatten_layer(ls)
                layers.append(_unflatten_layer([t.clone() if t.data_ptr() in ptrs else t for t in ts], spec))
            state = StreamState(layers, state.pos, state.total_length, stats)
        return (torch.cat(outs, 1) if outs else None), state
