"""The memsparse language model: adaptive sparse window attention + surprise-gated neural long-term memory.

Every layer processes a span of tokens [p, p+n) given a per-layer cache (`LayerState`): the one-shot forward
is one call with an empty cache, `stream` is many calls that carry it, so the two compute the same function.

Per segment of `segment` tokens, in a memory layer (read first, then write, as the Titans MAC does):
  1. the segment's queries read the memory as it stands (it holds every token that has left the window);
  2. attention: persistent tokens + the previous `window` tokens + the segment (causal), block-sparse with
     a budget policy; MAC adds each token's memory read-out as one extra key/value for that token (merged by
     log-sum-exp, so no token sees another's read-out), MAG gates the memory output beside attention, MAL
     adds it to the attention input;
  3. when the segment is complete, the oldest segment of the window is evicted: written into the memory,
     each token gated by its surprise, then replayed `n` consolidation passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ConsolidationConfig, ModelConfig, from_dict
from .consolidation import consolidation_passes
from .kernels import parse_policy, select_blocks, sparse_attention
from .kernels.block_select import block_pool
from .memory import MemoryInputs, MemoryState, NeuralMemory, WriteStats, compile_cached, soft_gate, use_compiled


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------
def rope_tables(pos: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin `(N, dim)` of the rotary embedding at absolute positions pos `(N,)` (angles in float64)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim))
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, pos: Tensor | tuple[Tensor, Tensor], theta: float = 10000.0) -> Tensor:
    """Rotary embedding (rotate-half form). x `(B, H, N, D)`; pos `(N,)` absolute positions, or the
    (cos, sin) tables of `rope_tables` (computed once for the queries and keys of a span)."""
    cos, sin = rope_tables(pos, x.shape[-1], theta, x.dtype) if isinstance(pos, Tensor) else pos
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(-2)  # one unbind: its backward is one stack, not two slices
    return x * cos + torch.cat([-x2, x1], -1) * sin


def mac_merge(o: Tensor, lse: Tensor, q: Tensor, rk: Tensor, rv: Tensor, scale: float) -> Tensor:
    """MAC: each token's memory read-out as one more key/value for that token alone, merged with its attention
    output by log-sum-exp. o, q, rk, rv `(B, H, n, D)`; lse `(B, H, n)` of the attention -> merged o in o's dtype."""
    s_r = (q.float() * rk.float()).sum(-1) * scale
    m = torch.maximum(lse, s_r)
    wa, wr = torch.exp(lse - m), torch.exp(s_r - m)
    return ((wa.unsqueeze(-1) * o.float() + wr.unsqueeze(-1) * rv.float()) / (wa + wr).unsqueeze(-1)).to(o.dtype)


def swiglu(u: Tensor) -> Tensor:
    """silu(a) * b for u = [a | b] along the last dim: `(..., 2h)` -> `(..., h)`."""
    a, b = u.chunk(2, -1)
    return F.silu(a) * b


def rms_norm_cast(x: Tensor, weight: Tensor, eps: float | None, dtype: torch.dtype) -> Tensor:
    """RMSNorm of x `(..., dim)` (as `nn.RMSNorm`) cast to `dtype`, the input of the linear layers after it."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps).to(dtype)


def add_rms_norm_cast(x: Tensor, y: Tensor, weight: Tensor, eps: float | None, dtype: torch.dtype):
    """The residual add and the next pre-norm: (x + y, RMSNorm(x + y) cast to `dtype`)."""
    s = x + y
    return s, rms_norm_cast(s, weight, eps, dtype)


class SwiGLU(nn.Module):
    """w3(silu(x w1) * (x w2)), w1 and w2 as one matmul. `fused`: on CUDA in training the gate runs compiled:
    one kernel forward, and one backward that writes the gradient of [x w1 | x w2] whole (eager, the gradient
    of the split is a concatenation of two full-length halves)."""

    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        u = self.w12(x)
        return self.w3((compile_cached(swiglu) if use_compiled(self.fused, u) else swiglu)(u))


class SurpriseGate(nn.Module):
    """Gate in [0, 1] on each evicted token's write from its surprise (gradient norm at the chunk start).

    Soft and learned in training: g = sigmoid(s_h * log(grad_norm) + b_h), initialised near 1 (write nearly
    everything) so the model learns what to drop. At inference an optional hard rule keeps only the top
    `keep_fraction` of a segment's tokens by surprise.
    """

    def __init__(self, heads: int, learned: bool = True):
        super().__init__()
        self.learned = learned
        self.scale = nn.Parameter(torch.ones(heads))
        self.bias = nn.Parameter(torch.full((heads,), 4.0))

    def forward(self, stats: WriteStats, keep_fraction: float = 1.0, keep: int | None = None,
                rank: Tensor | None = None) -> Tensor:
        """Gate `(B, H, C)` of a chunk's tokens. With keep_fraction < 1, exactly `keep` tokens (default
        ceil(keep_fraction * C)) pass the hard rule: the most surprising, ties broken by position (by `rank`
        instead of the surprise when given)."""
        gn = stats.grad_norm
        if self.learned:
            g = soft_gate(gn, self.scale, self.bias)
        else:
            g = torch.ones_like(gn)
        if keep_fraction < 1.0:
            n = gn.shape[-1]
            keep = math.ceil(keep_fraction * n) if keep is None else keep
            g = g * top_count_mask(gn if rank is None else rank, keep).to(g.dtype)
        return g

    def segment_gate_fn(self, keep_fraction: float, n_tokens: int, valid: Tensor | None = None):
        """The gate as a `gate_fn` for one write of `n_tokens` (an evicted segment) in chunks: the hard rule keeps
        ceil(keep_fraction * n_tokens) tokens of the whole write, spread over its chunks by cumulative counts
        (chunk [a, b) keeps ceil(f*b) - ceil(f*a)), since a chunk's surprise exists only once the chunks before
        it are written. `valid` `(B, n_tokens)` or `(B, H, n_tokens)` bool (documents): other tokens rank last."""
        done = [0]

        def gate_fn(stats: WriteStats) -> Tensor:
            a = done[0]
            b = a + stats.grad_norm.shape[-1]
            done[0] = b
            if b > n_tokens:
                raise ValueError(f"segment gate: {b} tokens written, the segment has {n_tokens}")
            rank = None
            if valid is not None and keep_fraction < 1:
                rank = _rank_valid(stats.grad_norm, valid[..., a:b])
            return self(stats, keep_fraction,
                        math.ceil(keep_fraction * b) - math.ceil(keep_fraction * a) if keep_fraction < 1 else None,
                        rank)
        return gate_fn


def top_count_indices(x: Tensor, count: int) -> Tensor:
    """Positions `(..., count)`, ascending, of the `count` largest entries of x `(..., C)` per row, ties broken by
    position (earlier first). Values within ~1e-6 of the row's largest count as tied, so rounding noise
    (streaming against a one-shot forward) does not reorder the equal surprises of identical tokens."""
    ref = x.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    key = torch.round(x.detach() / ref * 2.0 ** 20)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :max(count, 0)].sort(-1).values


def top_count_mask(x: Tensor, count: int) -> Tensor:
    """Bool mask `(..., C)` of exactly `count` largest entries of x per row (`top_count_indices`)."""
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, top_count_indices(x, count), True)


@dataclass
class LayerState:
    """What one layer carries across spans: attention cache of the window, the memory inputs of those same
    tokens (written when they are evicted), the memory, and the running pooled selection queries."""

    k: Tensor                       # (B, Hkv, T, D) roped keys of tokens [start, pos)
    v: Tensor
    mem_inputs: MemoryInputs | None  # same T tokens (q dropped)
    memory: MemoryState | None
    q_pool_prev: Tensor             # (B, Hkv, D) mean selection query of the last complete block
    q_sum_cur: Tensor               # (B, Hkv, D) sum over the current, incomplete block
    conv: Tensor | None = None      # (B, K-1, 3*Hm*Dm) the memory's short-convolution state (memory.conv)

    def detach(self) -> LayerState:
        mi = self.mem_inputs
        if mi is not None:
            mi = MemoryInputs(*(t.detach() for t in (mi.q, mi.k, mi.v, mi.eta, mi.theta, mi.alpha)))
        mem = None if self.memory is None else self.memory.detach()
        conv = None if self.conv is None else self.conv.detach()
        return LayerState(self.k.detach(), self.v.detach(), mi, mem, self.q_pool_prev.detach(),
                          self.q_sum_cur.detach(), conv)

    def tensors(self) -> list[Tensor]:
        out = [self.k, self.v, self.q_pool_prev, self.q_sum_cur]
        if self.mem_inputs is not None:
            mi = self.mem_inputs
            out += [mi.k, mi.v, mi.eta, mi.theta, mi.alpha]
        if self.memory is not None:
            out += [*self.memory.weights, *self.memory.momentum]
        if self.conv is not None:
            out.append(self.conv)
        return out


# "No document known" for a cached token: it belongs to a document before the current one (its start is never
# needed: such tokens are only ever masked, gated off or left out of pooling).
OLD_DOCUMENT = 2 ** 62


@dataclass
class Documents:
    """Where the documents of a span start (packed sequences; `MemSparseLM.forward(..., doc_ids=...)`).

    start `(B, n)` int64: absolute position of the first token of each span token's document; prev `(B,)`: the
    same for the token before the span (the span's position when there is none). Every layer derives its masks
    from these: attention keys before `start` are masked, the selector's candidates, pooled keys and pooled
    queries stop at the document's start, and the memory restarts from its initial weights at it."""

    start: Tensor
    prev: Tensor
    # what every layer derives alike from these (same span, same cache length): computed by the first, reused
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def _once(self, key: tuple, make):
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def with_cache(self, pos: int, c0: int) -> Tensor:
        """`(B, pos - c0 + n)`: the document start of every cached token [c0, pos) and span token: the current
        document's from `prev` on, OLD_DOCUMENT before it."""
        if pos == c0:
            return self.start
        return self._once(("with_cache", pos, c0), lambda: self._with_cache(pos, c0))

    def _with_cache(self, pos: int, c0: int) -> Tensor:
        cache_pos = torch.arange(c0, pos, device=self.start.device)
        cached = torch.where(cache_pos[None, :] >= self.prev[:, None], self.prev[:, None],
                             torch.full_like(self.prev[:, None], OLD_DOCUMENT))
        return torch.cat([cached, self.start], 1)

    def evictions(self, pos: int, c0: int, ev0: int, count: int, segment: int, dtype: torch.dtype):
        """The document masks of `count` consecutive evicted segments from segment `ev0` on (tokens cached from
        c0): (reset `(B, count)` bool: the segment's last token starts its document inside the segment, so its
        write starts from the initial memory; gates `(B, count, segment)` of `dtype`: 1 for the tokens of that
        document, 0 before it). One set of small ops per span for all of them (and for every layer)."""
        def make():
            S = segment
            e0 = ev0 * S - c0
            last = self.with_cache(pos, c0)[:, e0 + S - 1:e0 + count * S:S]             # (B, count) starts
            tok = torch.arange(ev0 * S, (ev0 + count) * S, device=last.device).view(count, S)
            return last >= tok[:, 0], (tok[None] >= last[..., None]).to(dtype)
        return self._once(("evictions", pos, c0, ev0, count, segment, dtype), make)

    def restarted_steps(self, pos: int, c0: int, ev0: int, count: int, segment: int, dtype: torch.dtype,
                        per_eviction: int) -> Tensor:
        """`(B,)` int64 for the memory's step counter after the span's `count` evictions (masks of `evictions`)
        of `per_eviction` tokens each: the tokens written from the last reset on; 2^62 in rows without a reset.
        Those rows' counter counts on from before the span, and always reaches at least this count in a row that
        reset: so the counter is `minimum(this, the count without resets)`, one op per layer."""
        def make():
            resets = self.evictions(pos, c0, ev0, count, segment, dtype)[0]
            since = torch.arange(count * per_eviction, 0, -per_eviction, device=resets.device)  # from eviction i on
            return torch.where(resets, since, OLD_DOCUMENT).amin(1)
        return self._once(("restarted_steps", pos, c0, ev0, count, segment, dtype, per_eviction), make)

    def fresh(self, pos: int, n: int, segment: int, window: int) -> Tensor:
        """`(B, n)` bool: the span tokens whose document has nothing evicted yet (they read the initial memory)."""
        def make():
            t_abs = torch.arange(pos, pos + n, device=self.start.device)
            return self.start >= (t_abs // segment - window // segment) * segment
        return self._once(("fresh", pos, n, segment, window), make)


def document_starts(doc_ids: Tensor, pos: int = 0, prev_id: Tensor | None = None,
                    prev_start: Tensor | None = None) -> Documents:
    """doc_ids `(B, n)` of tokens [pos, pos+n) -> `Documents`. A document starts where the id changes (any
    integers; -1 padding is one more document); the first token continues the stream's document when its id
    equals `prev_id` (the last id seen, `(B,)`), else it starts a new one."""
    B, n = doc_ids.shape
    dev = doc_ids.device
    new = torch.ones(B, n, dtype=torch.bool, device=dev)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if prev_id is not None:
        new[:, 0] = doc_ids[:, 0] != prev_id
    ar = torch.arange(pos, pos + n, device=dev)
    start = torch.where(new, ar, -1).cummax(1).values
    prev = torch.full((B,), pos, dtype=torch.long, device=dev) if prev_start is None else prev_start.long()
    start = torch.where(start < 0, prev[:, None], start)
    return Documents(start, prev)


@dataclass
class StreamState:
    """Everything carried across segments: per-layer caches and memories, the position, the declared total
    length (for the consolidation schedule; None = tokens seen so far); with documents, the last document id
    and its start position per sequence (None without)."""

    layers: list[LayerState]
    pos: int = 0
    total_length: int | None = None
    stats: dict = field(default_factory=dict)  # running (sum, count) of the model's statistics over the stream
    doc_id: Tensor | None = None
    doc_start: Tensor | None = None

    def detach(self) -> StreamState:
        return StreamState([layer.detach() for layer in self.layers], self.pos, self.total_length, self.stats,
                           self.doc_id, self.doc_start)

    def stat_means(self) -> dict[str, Tensor]:
        """Means over the stream so far: attention kept fraction/blocks, memory surprise and gate."""
        return stat_means(self.stats)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


@dataclass
class LMOutput:
    loss: Tensor | None
    logits: Tensor | None
    stats: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_memory: bool):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.wq = nn.Linear(cfg.dim, H * D, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)
        P = cfg.persistent_tokens
        self.persistent_k = nn.Parameter(torch.randn(Hkv, P, D) * D ** -0.5) if P else None
        self.persistent_v = nn.Parameter(torch.randn(Hkv, P, D) * D ** -0.5) if P else None
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, fused=cfg.compile_pointwise)
        self.memory = NeuralMemory(cfg.dim, cfg.memory) if has_memory else None
        self.gate = SurpriseGate(cfg.memory.heads, cfg.surprise_gate) if has_memory else None
        self.mag_gate = nn.Linear(cfg.dim, cfg.dim) if has_memory and cfg.variant == "mag" else None
        self.policy = parse_policy(cfg.budget)
        self.memory_writes = True  # False: evicted segments are not written (an ablation; see set_memory_writes)

    # -- state ------------------------------------------------------------------------------------------
    def init_state(self, batch: int, device, dtype) -> LayerState:
        cfg = self.cfg
        z = torch.zeros(batch, cfg.kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        mem = self.memory.init_state(batch, device) if self.memory is not None else None
        mi = None
        if self.memory is not None:
            Hm, Dm = cfg.memory.heads, cfg.memory.head_dim
            e = torch.zeros(batch, Hm, 0, Dm, device=device)
            r = torch.zeros(batch, Hm, 0, device=device)
            mi = MemoryInputs(e, e, e, r, r, r)
        qz = torch.zeros(batch, cfg.kv_heads, cfg.head_dim, device=device, dtype=torch.float32)
        conv = self.memory.conv_state(batch, device) if self.memory is not None else None
        return LayerState(z, z.clone(), mi, mem, qz, qz.clone(), conv)

    # -- forward over a span ------------------------------------------------------------------------------
    def forward(self, x: Tensor, st: LayerState, pos: int, total_len: int | None, stats: dict,
                pos_t: Tensor | None = None, docs: Documents | None = None, emb: Tensor | None = None):
        """x `(B, n, dim)` = tokens [pos, pos+n) -> (x_out, new LayerState). `pos_t` (optional, 0-dim device
        tensor equal to pos) feeds the rotary positions, so a captured CUDA graph can be replayed at any pos.
        `docs`: packed documents, kept apart (see `Documents`); None = one document. `emb` `(B, n, dim)`: the
        same tokens' embeddings, the memory's write input under `memory.write_input: embeddings` (None, or x
        itself in the first layer: the layer's input)."""
        cfg = self.cfg
        B, n, _ = x.shape
        S, W = cfg.segment, cfg.window
        w_seg = W // S
        dst = None if docs is None else docs.with_cache(pos, pos - st.k.shape[2])  # (B, cached + n)
        norm_dtype = self._fuse_norms(x)
        h = compile_cached(rms_norm_cast)(x, self.norm1.weight, self.norm1.eps, norm_dtype) if norm_dtype else \
            _autocast_input(self.norm1(x))

        # 1. memory: per segment, read with the state as it stands, then evict what leaves the window
        mem_out, mem_state, mem_inputs, conv = None, st.memory, st.mem_inputs, st.conv
        if self.memory is not None:
            src = None
            if emb is not None and emb is not x:  # normed as the layer's own input is
                src = compile_cached(rms_norm_cast)(emb, self.norm1.weight, self.norm1.eps, norm_dtype) \
                    if norm_dtype else _autocast_input(self.norm1(emb))
            new_in, conv = self.memory.project_stream(h, st.conv, None if docs is None else docs.start, pos, src)
            all_in = _cat_inputs(st.mem_inputs, new_in)
            c0 = pos - st.k.shape[2]  # absolute position of the first cached token (a multiple of S)
            bounds = [pos, *range((pos // S + 1) * S, pos + n, S), pos + n]
            q_parts = new_in.q.split([b - a for a, b in zip(bounds, bounds[1:])], dim=2)
            segments = all_in.split_writes(S) if c0 % S == 0 else None
            # the writes depend only on the evicted tokens, so run them first and read every piece afterwards
            # with the state it would have seen (pieces of equal length are read in one batched call)
            evicts = [s1 // S - 1 - w_seg for s1 in bounds[1:] if s1 % S == 0] if self.memory_writes else []
            evicts = [ev for ev in evicts if ev >= 0]  # segment s1//S - 1 complete: evict segment (s1//S-1) - w_seg
            init_w = None
            if dst is not None and evicts:  # write only the document of the segment's last token, from scratch
                resets, doc_gates = docs.evictions(pos, c0, evicts[0], len(evicts), S, all_in.k.dtype)
                init_w = self.memory.initial_weights(B, x.device)
                # one view of them per eviction, unbound from one expand: backward then sums their gradients in
                # one stack and one sum, not one accumulation per eviction and weight
                init_each = list(zip(*(w.unsqueeze(1).expand(B, len(evicts), *w.shape[1:]).unbind(1)
                                       for w in init_w)))
                # every eviction writes as many tokens (one consolidation schedule): the step counters of the
                # rows reset are set once after the writes, else before each write
                steps_once = total_len is not None or len(evicts) == 1
            read_states, written, n_written, written_in = [], [], [], []
            for s1 in bounds[1:]:
                read_states.append(mem_state)
                ev = s1 // S - 1 - w_seg
                if s1 % S == 0 and ev in evicts:
                    e0 = ev * S - c0
                    seg = segments[e0 // S] if segments is not None else all_in.slice(slice(e0, e0 + S))
                    seq_len = total_len if total_len is not None else s1
                    gates = reset = None
                    if init_w is not None:  # the reset itself is folded into the write
                        i = ev - evicts[0]
                        reset, gates = resets[:, i], doc_gates[:, i]
                        if not steps_once:
                            mem_state = MemoryState(mem_state.weights, mem_state.momentum,
                                                    torch.where(reset, 0, mem_state.step))
                    mem_state, ws, n_w = self._evict(mem_state, seg, seq_len, gates, reset,
                                                     None if reset is None else list(init_each[i]))
                    written.append(ws)
                    written_in.append(seg)
                    n_written.append(n_w)
            if init_w is not None and steps_once:
                assert len(set(n_written)) == 1, n_written
                last = docs.restarted_steps(pos, c0, evicts[0], len(evicts), S, all_in.k.dtype, n_written[0])
                mem_state = MemoryState(mem_state.weights, mem_state.momentum, torch.minimum(last, mem_state.step))
            if written:  # one reduction per span, not per segment (each eviction writes S tokens: equal weights)
                _acc(stats, "memory_surprise", torch.cat([w.grad_norm for w in written], -1).mean(), len(written))
                gate = torch.cat([w.gate for w in written], -1)
                _acc(stats, "memory_gate", gate.mean(), len(written))
                _acc_rates(stats, written_in, gate, len(written))
            if dst is None:
                mem_out = self.memory.read_out(read_states, list(q_parts))
            else:  # a token whose document has nothing evicted yet reads the initial memory
                mem_out = self.memory.read_out(read_states, list(q_parts), init_mask=docs.fresh(pos, n, S, W),
                                               init_weights=init_w, all_queries=new_in.q)
            if cfg.variant != "mac":  # MAC feeds it to a linear layer only: no cast to fp32 and back
                mem_out = mem_out.to(x.dtype)

        # 2. attention over persistent + window + span
        att_in = h + mem_out if (mem_out is not None and cfg.variant == "mal") else h
        o, new_k, new_v, q_pool_prev, q_sum_cur = self._attend(att_in, st, pos, mem_out, stats, pos_t, docs, dst)
        if mem_out is not None and cfg.variant == "mag":
            x = x + self.wo(o) + torch.sigmoid(self.mag_gate(h)) * mem_out
            h2 = _autocast_input(self.norm2(x))
        elif norm_dtype:
            x, h2 = compile_cached(add_rms_norm_cast)(x, self.wo(o), self.norm2.weight, self.norm2.eps, norm_dtype)
        else:
            x = x + self.wo(o)
            h2 = _autocast_input(self.norm2(x))
        x = x + self.mlp(h2)

        # 3. trim the cache to the window of the next token's segment
        end = pos + n
        keep_from = max(0, (end // S - w_seg) * S)
        c0 = pos - st.k.shape[2]
        cut = keep_from - c0
        if self.memory is not None:
            mem_inputs = all_in.slice(slice(cut, None))
            mem_inputs.q = mem_inputs.q[:, :, :0]
        new_state = LayerState(new_k[:, :, cut:], new_v[:, :, cut:], mem_inputs, mem_state, q_pool_prev, q_sum_cur,
                               conv)
        return x, new_state

    def _fuse_norms(self, x: Tensor) -> torch.dtype | None:
        """The autocast dtype when the pre-norms run compiled with their cast (and the residual add before the
        second): `compile_pointwise`, CUDA training under autocast. None: eager."""
        dev = x.device.type
        if use_compiled(self.cfg.compile_pointwise, x) and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None

    def _evict(self, mem: MemoryState, ev: MemoryInputs, seq_len: int, gates: Tensor | None = None,
               reset: Tensor | None = None, init_weights: list[Tensor] | None = None
               ) -> tuple[MemoryState, WriteStats, int]:
        """Write one evicted segment (surprise-gated), then its consolidation passes. Returns (memory, the
        first write's stats, the number of tokens written). `gates` `(B, S)` of 0/1 in ev's dtype (documents):
        only the tokens of gate 1 are written and replayed (the others get gate 0, which leaves memory and momentum
        untouched) and ranked by the hard keep; `reset` `(B,)` bool (documents): those rows' first write starts
        from `init_weights` and zero momentum (their step counter is the caller's)."""
        cfg = self.cfg
        keep = 1.0 if self.training else cfg.hard_keep_fraction
        rank = gates is not None and not self._soft_gate_only(keep)  # the hard keep ranks: it needs them as bool
        valid = gates > 0 if rank else None
        mem, ws = self.memory.write(mem, ev, gates, reset=reset, init_weights=init_weights,
                                    **self._gate_kwargs(keep, ev.k.shape[2], valid))
        n_written = ev.k.shape[2]
        passes = consolidation_passes(cfg.consolidation, seq_len, cfg.window, self.training)
        if passes:
            replay, r_gates, r_valid = ev, gates, valid
            if cfg.consolidation.replay == "surprising" and cfg.consolidation.replay_tokens < ev.k.shape[2]:
                gn = ws.grad_norm if gates is None else _rank_valid(ws.grad_norm, gates > 0 if valid is None else valid)
                top = top_count_indices(gn, cfg.consolidation.replay_tokens)
                replay = _gather_inputs(ev, top)
                if gates is not None:
                    r_gates = gates[:, None, :].expand(-1, top.shape[1], -1).gather(2, top)
                    r_valid = r_gates > 0 if rank else None
            for _ in range(passes):
                mem, _ = self.memory.write(mem, replay, r_gates,
                                           **self._gate_kwargs(keep, replay.k.shape[2], r_valid))
                n_written += replay.k.shape[2]
        return mem, ws, n_written

    def _soft_gate_only(self, keep: float) -> bool:
        """Whether the surprise gate is the learned soft gate alone (fused into the chunk step; no ranking)."""
        return self.gate.learned and keep >= 1.0

    def _gate_kwargs(self, keep: float, n_tokens: int, valid: Tensor | None = None) -> dict:
        """The surprise gate as `NeuralMemory.write` takes it for a write of `n_tokens`: the learned soft gate as
        parameters (fused into the chunk step), a function otherwise (hard keep of the write's top tokens at
        inference, or no learned gate). `valid` (documents): tokens of another document rank last in the hard
        keep."""
        if self._soft_gate_only(keep):
            return {"gate_params": (self.gate.scale, self.gate.bias)}
        return {"gate_fn": self.gate.segment_gate_fn(keep, n_tokens, valid)}

    def _attend(self, h: Tensor, st: LayerState, pos: int, mem_out: Tensor | None, stats: dict,
                pos_t: Tensor | None = None, docs: Documents | None = None, dst: Tensor | None = None):
        cfg = self.cfg
        B, n, _ = h.shape
        H, Hkv, D, bs, S, P = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.block_size, cfg.segment, cfg.persistent_tokens
        G = H // Hkv
        fuse = use_compiled(cfg.compile_pointwise, h)  # one fused kernel forward for each pointwise chain
        rope_fn, merge_fn = (compile_cached(apply_rope), compile_cached(mac_merge)) if fuse else (apply_rope, mac_merge)
        positions = torch.arange(n, device=h.device) + (pos if pos_t is None else pos_t)
        q = self.wq(h).view(B, n, H, D).transpose(1, 2)
        if docs is None:
            rope = rope_tables(positions, D, cfg.rope_theta, q.dtype)
        else:  # rotary positions restart at each document (the persistent keys have none: a query of a document
            # then meets them as at the start of a stream); the same tables in every layer: built once
            rope = docs._once(("rope", pos, n, D, cfg.rope_theta, q.dtype), lambda: tuple(
                t.view(B, 1, n, D) for t in
                rope_tables((positions[None, :] - docs.start).flatten(), D, cfg.rope_theta, q.dtype)))
        q = rope_fn(q, rope)
        k_raw, v_raw = self.wkv(h).view(B, n, 2, Hkv, D).permute(2, 0, 3, 1, 4).unbind(0)
        k_new = rope_fn(k_raw, rope)
        if st.k.shape[2]:
            k_all = torch.cat([st.k.to(k_new.dtype), k_new], 2)
            v_all = torch.cat([st.v.to(v_raw.dtype), v_raw], 2)
        else:  # empty cache (a one-shot forward): no full-length copy
            k_all, v_all = k_new, v_raw
        c0 = pos - st.k.shape[2]
        if P:
            pk = self.persistent_k.to(k_all.dtype).unsqueeze(0).expand(B, -1, -1, -1)
            pv = self.persistent_v.to(v_all.dtype).unsqueeze(0).expand(B, -1, -1, -1)
            keys, vals = torch.cat([pk, k_all], 2), torch.cat([pv, v_all], 2)
        else:
            keys, vals = k_all, v_all

        # queries start at a block boundary: pad the front of a span that starts mid-block (outputs dropped)
        r = pos % bs
        qp = F.pad(q, (0, 0, r, 0)) if r else q
        nq = math.ceil((r + n) / bs)
        qstart = pos - r + torch.arange(nq, device=h.device) * bs
        # causal selection queries: block m is chosen with the mean query of block m-1 (carried across spans)
        if docs is None:
            sums = block_query_sums(q.detach(), Hkv, bs, r)
            sums[:, :, 0] += st.q_sum_cur
            q_prev = st.q_pool_prev
        else:  # documents: block m is chosen for the document of its first token, from that document's queries
            dm = docs._once(("attention", pos, n, c0, bs), lambda: _document_masks(docs, dst, qstart, c0, r, n, bs))
            sums = block_query_sums(q.detach().float() * dm["q_weight"], Hkv, bs, r)
            sums[:, :, 0] += st.q_sum_cur * dm["carry_sum"]
            q_prev = st.q_pool_prev * dm["carry_pool"] if r == 0 else st.q_pool_prev
        pools = sums / bs
        q_sel = torch.cat([q_prev.unsqueeze(2), pools[:, :, :-1]], 2)
        if (pos + n) % bs == 0:
            q_pool_prev, q_sum_cur = pools[:, :, -1], torch.zeros_like(st.q_sum_cur)
        else:
            q_pool_prev = pools[:, :, -2] if nq >= 2 else st.q_pool_prev
            q_sum_cur = sums[:, :, -1]
        # sliding window: query block of segment j sees tokens from max(0, j*S - window) on (sinks exempt)
        win_start = torch.clamp((qstart // S) * S - cfg.window, min=0)
        min_key_block = (P + win_start - c0) // bs
        doc_kw, key_start = {}, None
        if docs is not None:  # candidates, pooled keys and visible tokens from the block's document on
            def starts():
                min_key = P + torch.maximum(win_start[None, :], dm["blk_doc"]) - c0
                key_start = P + docs.start - c0
                key_start = F.pad(key_start, (r, 0), value=P) if r else key_start
                return min_key, key_start, _document_key_weights(dst, c0, keys.shape[2] - P, bs)
            min_key, key_start, pool_w = docs._once(("keys", pos, n, c0, bs, P, S, cfg.window), starts)
            doc_kw = {"min_key": min_key, "k_pool": _document_key_pool(keys.detach(), dst, c0, P, bs, pool_w)}
            min_key_block = None
        idx, cnt, info = select_blocks(qp.detach(), keys.detach(), block_size=bs, policy=self.policy,
                                       sink_blocks=P // bs,
                                       local_blocks=cfg.local_blocks, min_key_block=min_key_block,
                                       q_select=q_sel, max_visible_blocks=(P + cfg.window + S) // bs + 1,
                                       return_info=True, impl=cfg.selection_impl, **doc_kw)
        # token-weighted over spans (and averaged over layers)
        _acc(stats, "attn_kept_fraction", (cnt.double() / info["visible_blocks"].clamp_min(1)).mean(), n)
        _acc(stats, "attn_kept_blocks", cnt.double().mean(), n)
        want_lse = mem_out is not None and cfg.variant == "mac"
        res = sparse_attention(qp, keys, vals, idx, cnt, block_size=bs, return_lse=want_lse,
                               **({} if key_start is None else {"key_start": key_start, "shared_keys": P}))
        o, lse = (res if want_lse else (res, None))
        o = o[:, :, r:]
        if want_lse:
            lse = lse[:, :, r:]
            # MAC: each token's memory read-out is one more key/value, for that token alone
            rk, rv = self.wkv(mem_out).view(B, n, 2, Hkv, D).permute(2, 0, 3, 1, 4)
            rk = rope_fn(rk, rope).repeat_interleave(G, 1)
            rv = rv.repeat_interleave(G, 1)
            o = merge_fn(o, lse, q, rk, rv, D ** -0.5).to(h.dtype)
        o = o.transpose(1, 2).reshape(B, n, H * D)
        return o, k_all, v_all, q_pool_prev, q_sum_cur


def block_query_sums(q: Tensor, num_kv_heads: int, block_size: int, offset: int) -> Tensor:
    """Per query block, the sum over its tokens of the GQA group's mean query, fp32: q `(B, Hq, n, D)`, whose
    first token sits `offset` tokens into its block -> `(B, Hkv, ceil((offset + n) / block_size), D)`."""
    B, Hq, n, D = q.shape
    G, bs = Hq // num_kv_heads, block_size
    nq = -(-(offset + n) // bs)
    if offset == 0 and n % bs == 0:  # whole blocks: summed straight from q in fp32, no copy of q
        return q.unflatten(1, (num_kv_heads, G)).unflatten(3, (nq, bs)).sum((2, 4), dtype=torch.float32) / G
    qg = F.pad(q.float().view(B, num_kv_heads, G, n, D).mean(2), (0, 0, offset, nq * bs - offset - n))
    return qg.view(B, num_kv_heads, nq, bs, D).sum(3)


def _document_masks(docs: Documents, dst: Tensor, qstart: Tensor, c0: int, r: int, n: int, bs: int) -> dict:
    """The selection queries' document masks of a span (the same in every layer): blk_doc `(B, nq)` the document
    of each query block's first token; q_weight `(B, 1, n, 1)` fp32: 1 for a token of the next block's document
    (a block's pooled query is summed from those); carry_sum / carry_pool `(B, 1, 1)`: whether the sum and the
    pooled query carried from the previous span belong to the same document."""
    blk_doc = torch.minimum(dst[:, qstart - c0], qstart)  # (B, nq); OLD_DOCUMENT -> the block's own start
    # a block's sum holds its tokens of the next block's document (the last token's, for the last block)
    nxt = torch.cat([blk_doc[:, 1:], docs.start[:, -1:]], 1)
    ref = nxt.repeat_interleave(bs, 1)[:, r:r + n]
    return {"blk_doc": blk_doc, "q_weight": (docs.start == ref).to(torch.float32)[:, None, :, None],
            "carry_sum": (docs.prev == nxt[:, 0])[:, None, None],
            "carry_pool": (blk_doc[:, 0] == docs.prev)[:, None, None]}


def _document_key_weights(dst: Tensor, c0: int, T: int, bs: int) -> tuple[Tensor, Tensor]:
    """`_document_key_pool`'s weights of tokens [c0, c0 + T) with document starts dst `(B, T)`: (w `(B, 1, nb, bs,
    1)` fp32, 1 for the keys of the document of their block's last key, its sum per block clamped to >= 1)."""
    B = dst.shape[0]
    nb = -(-T // bs)
    kpos = torch.arange(c0, c0 + T, device=dst.device)
    last = torch.clamp(torch.arange(nb, device=dst.device) * bs + bs - 1, max=T - 1)
    w = (kpos[None, :] >= dst[:, last].repeat_interleave(bs, 1)[:, :T]).to(torch.float32)  # (B, T)
    wp = F.pad(w, (0, nb * bs - T)).view(B, 1, nb, bs, 1)
    return wp, wp.sum(3).clamp_min(1.0)


def _document_key_pool(keys: Tensor, dst: Tensor, c0: int, P: int, bs: int,
                       weights: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Pooled keys for the selector with documents: each key block's mean over its keys of the document of its
    last key (only that document's later queries ever score the block), fp32 `(B, Hkv, NK, D)`. keys
    `(B, Hkv, P + T, D)` = persistent + tokens [c0, c0 + T) with document starts dst `(B, T)`."""
    B, Hkv, Lk, D = keys.shape
    T = Lk - P
    nb = -(-T // bs)
    wp, count = _document_key_weights(dst, c0, T, bs) if weights is None else weights
    kt = F.pad(keys[:, :, P:].float(), (0, 0, 0, nb * bs - T)).view(B, Hkv, nb, bs, D)
    pooled = (kt * wp).sum(3) / count
    if not P:
        return pooled
    return torch.cat([block_pool(keys[:, :, :P], bs), pooled], 2)


def _rank_valid(gn: Tensor, valid: Tensor) -> Tensor:
    """Surprises `(B, H, N)` for a ranking where tokens outside `valid` (bool, broadcastable) come last."""
    v = valid if valid.dim() == gn.dim() else valid[:, None, :]
    low = -gn.detach().abs().amax(-1, keepdim=True) - 1.0
    return torch.where(v, gn, low)


def _autocast_input(h: Tensor) -> Tensor:
    """h in the autocast dtype when autocast is on: cast once here, not once per linear layer that reads it (each
    cast of a full-length activation is a copy forward and another backward)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return h.to(torch.get_autocast_dtype(dev))
    return h


def _acc(stats: dict, key: str, value: Tensor, weight: int = 1) -> None:
    """Running weighted (sum, count) of a scalar statistic: constant memory however long the stream."""
    total, n = stats.get(key, (0.0, 0))
    stats[key] = (total + value.detach().float() * weight, n + weight)


def _acc_rates(stats: dict, inputs: list, gate: Tensor, n: int) -> None:
    """The learned write rates of `n` evicted segments (`inputs`; their surprise gates `gate` (B, H, n * S); Titans
    eq. 13-14): `memory_lr` (theta) and `memory_forget` (alpha) per token, and `memory_keep_1k`, the share of the
    fast weights a run of 1,024 tokens at those forget rates keeps, exp(1024 * mean log(1 - g * alpha)). It shows how
    far back forgetting alone lets the memory reach (later writes overwriting a trace are not counted)."""
    alpha = torch.cat([m.alpha for m in inputs], -1).float()
    _acc(stats, "memory_lr", torch.cat([m.theta for m in inputs], -1).float().mean(), n)
    _acc(stats, "memory_forget", alpha.mean(), n)
    eff = alpha * gate.float()
    _acc(stats, "memory_keep_1k", torch.exp(1024 * torch.log1p(-eff.clamp_max(1 - 1e-6)).mean()), n)


def stat_means(stats: dict) -> dict[str, Tensor]:
    return {k: total / n for k, (total, n) in stats.items()}


def _cat_inputs(a: MemoryInputs | None, b: MemoryInputs) -> MemoryInputs:
    if a is None or a.k.shape[2] == 0:
        return b
    return MemoryInputs(b.q, *(torch.cat([x, y.to(x.dtype)], 2) for x, y in
                               ((a.k, b.k), (a.v, b.v), (a.eta, b.eta), (a.theta, b.theta), (a.alpha, b.alpha))))


def _gather_inputs(a: MemoryInputs, idx: Tensor) -> MemoryInputs:
    """Select tokens idx `(B, H, K)` of each head."""
    def g4(t):
        return t.gather(2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))
    return MemoryInputs(a.q[:, :, :0], g4(a.k), g4(a.v), a.eta.gather(2, idx), a.theta.gather(2, idx),
                        a.alpha.gather(2, idx))


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class MemSparseLM(nn.Module):
    """Decoder-only LM. `forward(input_ids, labels)` -> LMOutput; `stream(ids, state)`; `generate(...)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        mem_layers = set(config.memory_layer_ids())
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(config, i in mem_layers) for i in range(config.depth)])
        self.norm = nn.RMSNorm(config.dim)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # (V,) added to the logits inside the loss in train mode only (never to returned logits, never exported):
        # the logit-adjusted loss of memsparse-train's `model.logit_adjust`, updated in place between steps
        self.register_buffer("loss_logit_bias", None, persistent=False)

    @property
    def output_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def memory_parameter_names(self) -> set[str]:
        """Names (as in `named_parameters`) of the long-term memory's parameters: every memory layer's
        projections, rate heads and initial fast weights, and its surprise gate. Empty without memory."""
        names = set()
        for i, blk in enumerate(self.blocks):
            for part in ("memory", "gate"):
                module = getattr(blk, part, None)
                if module is not None:
                    names.update(f"blocks.{i}.{part}.{n}" for n, _ in module.named_parameters())
        return names

    # -- inference-time overrides (no retraining) ------------------------------------------------------
    def set_budget(self, spec: str) -> None:
        """Switch every layer's attention budget policy (e.g. 'dense', 'fixed:8', 'top_p:p=0.9')."""
        policy = parse_policy(spec)
        self.config.budget = spec
        for blk in self.blocks:
            blk.policy = policy

    def set_memory_writes(self, enabled: bool) -> None:
        """Switch the memory's writes on or off. Off, every memory stays at its learned initial weights whatever the
        stream evicts (reads still run): the inference-time ablation that shows what the memory carries."""
        for blk in self.blocks:
            blk.memory_writes = bool(enabled)

    @contextmanager
    def memory_writes_as(self, enabled: bool) -> Iterator[MemSparseLM]:
        """`set_memory_writes(enabled)` inside the `with` block; each block's own switch is restored after it, also
        when the block raises."""
        before = [blk.memory_writes for blk in self.blocks]
        self.set_memory_writes(enabled)
        try:
            yield self
        finally:
            for blk, on in zip(self.blocks, before):
                blk.memory_writes = on

    def set_window(self, window: int) -> None:
        """Switch the attention window (tokens; a multiple of `segment`, at least one segment) for streams started
        from now on: everything that depends on it (the cache kept, which segment is evicted into the memory, the
        consolidation schedule, the selector's visible range) reads `config.window`. A model trained with another
        window is then out of its training distribution. A stream state carried over from before the change is
        refused (its cache holds the old window): start from `init_state`."""
        seg = self.config.segment
        if isinstance(window, bool) or not isinstance(window, int) or window < seg or window % seg:
            raise ConfigError(f"must be a positive multiple of segment={seg}, got {window!r}", key="window")
        self.config.window = window
        for blk in self.blocks:
            blk.cfg = self.config

    def set_consolidation(self, consolidation: ConsolidationConfig) -> None:
        """Switch the consolidation schedule (all layers share the model's config object)."""
        self.config.consolidation = consolidation.validate()
        for blk in self.blocks:
            blk.cfg = self.config

    # -- state ------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1, total_length: int | None = None, device=None) -> StreamState:
        """A fresh stream: empty window caches, memories at their learned initial weights, position 0.

        `total_length` (optional) is the length the stream will reach; the consolidation schedule uses it.
        """
        device = device or self.embed.weight.device
        dtype = self.embed.weight.dtype
        return StreamState([b.init_state(batch_size, device, dtype) for b in self.blocks], 0, total_length)

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            got = getattr(input_ids, "shape", input_ids)
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got {got}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        V = self.config.vocab_size
        if input_ids.is_cuda:  # checked on the device, without a host sync on the training hot path
            torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(), f"input_ids out of vocabulary ({V})")
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids out of vocabulary: values in [{lo}, {hi}], vocab_size={V}")

    def _documents(self, doc_ids: Tensor | None, input_ids: Tensor, state: StreamState) -> Documents | None:
        """The span's `Documents` from doc_ids `(B, n)` (None: one document, today's path; also when the model
        was built with `cross_document`). A state that has seen documents continues its last one when the
        span brings no doc_ids."""
        if self.config.cross_document:
            return None
        if doc_ids is None:
            if state.doc_id is None:
                return None
            doc_ids = state.doc_id[:, None].expand(input_ids.shape)
        if not isinstance(doc_ids, Tensor) or doc_ids.shape != input_ids.shape or doc_ids.dtype.is_floating_point:
            got = f"{doc_ids.dtype} {tuple(doc_ids.shape)}" if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
            raise ValueError(f"doc_ids must be an integer tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {got}")
        return document_starts(doc_ids.to(input_ids.device), state.pos, state.doc_id, state.doc_start)

    def _check_state_window(self, state: StreamState) -> None:
        """A state carries the tokens [max(0, (pos // segment - window // segment) * segment), pos) in its caches;
        one streamed with another window (or segment) would be evicted into the memory wrongly: refused."""
        S, W = self.config.segment, self.config.window
        want = state.pos - max(0, (state.pos // S - W // S) * S)
        for ls in state.layers:
            if ls.k.shape[2] != want:
                raise ValueError(f"stream state at position {state.pos} caches {ls.k.shape[2]} tokens, but window="
                                 f"{W} (segment {S}) keeps {want}: the state was streamed with another attention "
                                 "window; after set_window, start a fresh stream (init_state)")

    def _run(self, input_ids: Tensor, state: StreamState, stats: dict,
             pos_t: Tensor | None = None, doc_ids: Tensor | None = None) -> tuple[Tensor, StreamState]:
        self._check_state_window(state)
        x = self.embed(input_ids)
        emb = x if self.config.memory.write_input == "embeddings" else None
        docs = self._documents(doc_ids, input_ids, state)
        new_layers = []
        ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for blk, ls in zip(self.blocks, state.layers):
            if ckpt:  # keep only each block's input; recompute the block (memory loop included) in backward
                # nothing random inside; not stashing RNG state also keeps it CUDA-graph capturable
                x, ls = checkpoint(blk, x, ls, state.pos, state.total_length, stats, pos_t, docs, emb,
                                   use_reentrant=False, preserve_rng_state=False)
            else:
                x, ls = blk(x, ls, state.pos, state.total_length, stats, pos_t, docs, emb)
            new_layers.append(ls)
        doc_id, doc_start = state.doc_id, state.doc_start
        if docs is not None:
            ids = doc_ids if doc_ids is not None else state.doc_id[:, None].expand(input_ids.shape)
            doc_id, doc_start = ids[:, -1].to(input_ids.device), docs.start[:, -1]
        return self.norm(x), StreamState(new_layers, state.pos + input_ids.shape[1], state.total_length, stats,
                                         doc_id, doc_start)

    # -- training / scoring ----------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, labels: Tensor | None = None, return_logits: bool = True,
                state: StreamState | None = None, doc_ids: Tensor | None = None) -> LMOutput:
        """input_ids `(B, L)`; labels `(B, L)` already aligned (labels[t] is the target at position t; -100 =
        ignore). Returns LMOutput(loss, logits `(B, L, V)` or None, stats of scalar tensors).

        doc_ids `(B, L)` (optional, any integers; a change of id starts a document): packed documents are kept
        apart: no token attends to, selects, or reads from the memory anything of another document; each
        document is computed as a fresh stream started at its first token's position (docs/architecture.md).
        None (or a model built with `cross_document: true`): the whole row is one context, as before."""
        self._check_ids(input_ids)
        B, L = input_ids.shape
        state = self.init_state(B, total_length=L) if state is None else state
        stats: dict = {}
        h, _ = self._run(input_ids, state, stats, doc_ids=doc_ids)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            bias = self.loss_logit_bias if self.training else None
            loss = chunked_cross_entropy(h, self.output_weight, labels, self.config.loss_chunk, bias)
        logits = h @ self.output_weight.t() if return_logits else None
        return LMOutput(loss, logits, stat_means(stats))

    # -- streaming --------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, input_ids: Tensor, state: StreamState | None = None, return_logits: str = "all",
               doc_ids: Tensor | None = None):
        """Process any length segment by segment with memory flat in length.

        input_ids `(B, n)`; returns (logits `(B, n, V)` | last `(B, 1, V)` | None, new state). Equal to the
        one-shot forward of the whole sequence when the state declares the same total length. doc_ids `(B, n)`
        (optional): documents as in `forward`; a new document behaves as a fresh `init_state` started at its
        position (without doc_ids a stream that has seen documents continues its last one).
        """
        self._check_ids(input_ids)
        if return_logits not in ("all", "last", "none"):
            raise ValueError(f"return_logits must be all, last or none, got {return_logits!r}")
        state = self.init_state(input_ids.shape[0], device=input_ids.device) if state is None else state
        S = self.config.segment
        outs = []
        i, n = 0, input_ids.shape[1]
        stats = state.stats
        while i < n:
            take = min(S - state.pos % S, n - i)
            h, state = self._run(input_ids[:, i:i + take], state, stats,
                                 doc_ids=None if doc_ids is None else doc_ids[:, i:i + take])
            if return_logits == "all":
                outs.append(h @ self.output_weight.t())
            elif return_logits == "last" and i + take == n:
                outs.append(h[:, -1:] @ self.output_weight.t())
            i += take
        return (torch.cat(outs, 1) if outs else None), state

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 eos_id: int | None = None, state: StreamState | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, StreamState]:
        """Stream the prompt, then decode greedily (temperature 0) or by sampling. Returns (new ids `(B, m)`, state)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        logits, state = self.stream(input_ids, state, return_logits="last")
        out = []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = _sample(logits[:, -1].float(), temperature, top_k, generator)
            out.append(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            logits, state = self.stream(nxt[:, None], state, return_logits="last")
        ids = torch.stack(out, 1) if out else input_ids.new_zeros(input_ids.shape[0], 0)
        return ids, state

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors: a self-describing checkpoint."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.head is None:
            sd = {k: v for k, v in sd.items() if k != "head.weight"}
        save_file(sd, str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MemSparseLM:
        """Load a directory written by `save_pretrained`; clear errors for missing or mismatched files."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"checkpoint {directory}: missing {p.name}")
        try:
            config = from_dict(ModelConfig, json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, ConfigError, TypeError) as e:
            raise ValueError(f"checkpoint {directory}: bad config.json: {e}") from None
        model = cls(config)
        try:
            sd = load_file(str(w_path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ValueError(f"checkpoint {directory}: cannot read model.safetensors ({e})") from None
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory}: weights do not match config.json "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def logit_adjustment(counts: Tensor, tau: float) -> Tensor:
    """The logit-adjusted loss's bias (Menon et al. 2021, eq. 10): `tau * log(prior)` `(V,)`, the prior being the
    label counts `(V,)` add-one smoothed, in their dtype. Added to the logits inside the loss only."""
    return tau * torch.log((counts + 1) / (counts.sum() + counts.numel()))


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096,
                          bias: Tensor | None = None) -> Tensor:
    """Mean CE of `h @ weight.T (+ bias)` against labels without materialising all logits: chunks of `chunk`
    tokens, each recomputed in backward (activation checkpointing). h `(B, L, dim)`, labels `(B, L)` (-100
    ignored), bias `(V,)` or None."""
    hf, lf = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    count = (lf != -100).sum().clamp_min(1)  # all ignored -> loss 0 (no host sync to test it)
    if h.device.type == "cpu":  # no device to sync with: only the labelled rows' logits (an answer-only loss labels
        keep = lf != -100       # a few tokens a row); on a GPU the shapes stay static (CUDA graphs)
        hf, lf = hf[keep], lf[keep]

    def piece(hc, lc):
        logits = (hc @ weight.t()).float()
        return F.cross_entropy(logits if bias is None else logits + bias, lc, ignore_index=-100, reduction="sum")

    for hc, lc in zip(hf.split(chunk), lf.split(chunk)):  # one split: its backward is one concatenation
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(piece, hc, lc, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + piece(hc, lc)
    return total / count
