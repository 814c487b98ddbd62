"""Typed, validated configuration dataclasses (YAML-serialisable through `asdict` / `from_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting or input that cannot work (an impossible value, a missing or unreadable file): the message names
    the key or file and what is allowed. `memsparse-train` reports it as one line and exits with status 2.

    `ConfigError(msg, key="window")` reads "window: msg"; `e.under("model.config")` is the same error with the key
    as a user writes it in a recipe ("model.config.window: msg")."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.message, self.key = str(message), key
        super().__init__(f"{key}: {message}" if key else str(message))

    def under(self, prefix: str) -> ConfigError:
        """This error with its key under `prefix` (unchanged when it names no key)."""
        if self.key is None:
            return self
        err = type(self).__new__(type(self))
        ConfigError.__init__(err, self.message, f"{prefix}.{self.key}")
        return err


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(msg, key=field_name)


@dataclass
class MemoryConfig:
    """Neural long-term memory (Titans): per-head MLP fast weights written by gradient steps.

    The write rule (Titans eqs. 13-14): S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; k_t, v_t),
    M_t = (1 - alpha_t) M_{t-1} + S_t, with l = 1/2 ||M(k) - v||^2 and eta/theta/alpha per token.
    """

    heads: int = 4
    head_dim: int = 32
    depth: int = 2                      # MLP layers of the memory (>= 1)
    expansion: int = 4                  # hidden width = expansion * head_dim (depth >= 2)
    activation: str = "silu"            # silu | gelu
    chunk_size: int = 64                # write chunk: gradients taken at the chunk-start weights
    lr_max: float = 0.5                 # theta_t = lr_max * sigmoid(.)
    lr_init: float = 0.1
    momentum_init: float = 0.9          # eta_t at init
    forget_init: float = 1e-3           # alpha_t at init
    max_grad_norm: float = 1.0          # per-token surprise is clipped to this norm (bounds the update)
    qk_norm: bool = True                # L2-normalise memory keys and queries
    conv: int = 0                       # causal depthwise conv of this many taps on q/k/v (Titans 4.4); 0: none
    conv_init: str = "identity"         # identity (last tap 1: starts as without it) | random (as nn.Conv1d's)
    #                                     | box (q/k taps all 1/sqrt(K): the sum of the last K tokens; v identity)
    query_pool: bool = False            # queries: a softmax over the last `conv` tokens' query projections by a
    #                                     learned per-head content score (+ a bias per lag) instead of the
    #                                     convolution's fixed taps (keys and values keep them); needs conv >= 2
    write_input: str = "layer"          # layer: q, k, v from the layer's input | embeddings: keys, values and
    #                                     write rates from the token embeddings, queries from the layer's input
    compile: bool = False               # CUDA, training: chunk step and read under torch.compile (~2x, H100)

    def validate(self) -> MemoryConfig:
        _check(self.heads >= 1, "memory.heads", f"must be >= 1, got {self.heads}")
        _check(self.head_dim >= 1, "memory.head_dim", f"must be >= 1, got {self.head_dim}")
        _check(self.depth >= 1, "memory.depth", f"must be >= 1, got {self.depth}")
        _check(self.expansion >= 1, "memory.expansion", f"must be >= 1, got {self.expansion}")
        _check(self.activation in ("silu", "gelu"), "memory.activation",
               f"must be silu or gelu, got {self.activation!r}")
        _check(self.chunk_size >= 1, "memory.chunk_size", f"must be positive, got {self.chunk_size}")
        _check(0 < self.lr_init < self.lr_max, "memory.lr_init",
               f"must be in (0, lr_max={self.lr_max}), got {self.lr_init}")
        _check(0 < self.momentum_init < 1, "memory.momentum_init", f"must be in (0, 1), got {self.momentum_init}")
        _check(0 < self.forget_init < 1, "memory.forget_init", f"must be in (0, 1), got {self.forget_init}")
        _check(self.max_grad_norm > 0, "memory.max_grad_norm", f"must be positive, got {self.max_grad_norm}")
        _check(isinstance(self.conv, int) and not isinstance(self.conv, bool) and self.conv >= 0, "memory.conv",
               f"must be an integer >= 0 (taps; 0 = no convolution), got {self.conv!r}")
        _check(self.conv_init in ("identity", "random", "box"), "memory.conv_init",
               f"must be identity, random or box, got {self.conv_init!r}")
        _check(not self.query_pool or self.conv >= 2, "memory.query_pool",
               f"pools the last memory.conv tokens: needs memory.conv >= 2, got {self.conv}")
        _check(self.write_input in ("layer", "embeddings"), "memory.write_input",
               f"must be layer or embeddings, got {self.write_input!r}")
        return self


@dataclass
class ConsolidationConfig:
    """Consolidation ("sleep") passes: after each eviction, replay the evicted keys/values n more times.

    mode "off" | "fixed" (n = passes) | "schedule" (n(L) = clamp(round(a * log2(L / window)), 0, n_max), L the
    sequence length: the stream's declared total length, else the tokens seen so far). Training uses
    `train_passes` (unrolled differentiably; default 0). replay "segment" (the whole evicted segment) or
    "surprising" (its `replay_tokens` most surprising tokens, a bounded replay buffer).
    """

    mode: str = "off"
    passes: int = 0
    a: float = 1.0
    n_max: int = 8
    replay: str = "segment"
    replay_tokens: int = 64
    train_passes: int = 0

    def validate(self) -> ConsolidationConfig:
        _check(self.mode in ("off", "fixed", "schedule"), "consolidation.mode",
               f"must be off, fixed or schedule, got {self.mode!r}")
        _check(self.passes >= 0, "consolidation.passes", f"must be >= 0, got {self.passes}")
        _check(self.n_max >= 0, "consolidation.n_max", f"must be >= 0, got {self.n_max}")
        _check(self.a >= 0, "consolidation.a", f"must be >= 0, got {self.a}")
        _check(self.replay in ("segment", "surprising"), "consolidation.replay",
               f"must be segment or surprising, got {self.replay!r}")
        _check(self.replay_tokens >= 1, "consolidation.replay_tokens", f"must be >= 1, got {self.replay_tokens}")
        _check(self.train_passes >= 0, "consolidation.train_passes", f"must be >= 0, got {self.train_passes}")
        return self


@dataclass
class ModelConfig:
    """A memsparse language model: decoder blocks of sparse window attention + neural memory + SwiGLU MLP.

    The sequence is processed in segments of `segment` tokens; attention sees the persistent tokens, the
    previous `window` tokens and the current segment (causally); a segment leaving the window is written
    into the memory of each memory layer (gated by surprise), then optionally replayed (consolidation).
    """

    vocab_size: int = 259
    dim: int = 128
    depth: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    mlp_hidden: int = 344                # SwiGLU hidden width
    block_size: int = 16                 # attention block (64 or 128 on GPU)
    segment: int = 64                    # tokens per segment = tokens evicted at a time (multiple of block_size)
    window: int = 128                    # attention window in tokens (multiple of segment)
    persistent_tokens: int = 16          # learned persistent key/values per layer (multiple of block_size; 0 = none)
    budget: str = "length_scaled:c=12,min_tokens=64"  # dense | fixed:k | length_scaled:... | top_p:...
    local_blocks: int = 1                # most recent blocks always kept (diagonal included)
    selection_impl: str = "torch"        # block selection: torch ops | triton (fused kernel) | auto (triton on CUDA)
    variant: str = "mac"                 # mac | mag | mal
    memory_layers: list[int] | None = None  # None: every layer; [] : no memory
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    surprise_gate: bool = True           # learned soft gate on each evicted token's surprise
    hard_keep_fraction: float = 1.0      # inference: write only this top fraction (by surprise) of evicted tokens
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    loss_chunk: int = 4096               # tokens per chunk of the chunked cross-entropy
    activation_checkpointing: bool = False  # training: recompute each block in backward (long sequences)
    compile_pointwise: bool = False      # CUDA, training: rotary, MAC merge, pre-norms + casts, SwiGLU gate compiled
    cross_document: bool = False         # ignore doc_ids: packed documents share attention and memory (the old way)

    def validate(self) -> ModelConfig:
        from memsparse.kernels.budget import parse_policy

        for name in ("vocab_size", "dim", "depth", "heads", "kv_heads", "head_dim", "mlp_hidden", "block_size",
                     "segment", "window", "loss_chunk"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                   f"must be a positive integer, got {getattr(self, name)!r}")
        _check(self.heads % self.kv_heads == 0, "kv_heads", f"must divide heads={self.heads}, got {self.kv_heads}")
        _check(self.segment % self.block_size == 0, "segment",
               f"must be a multiple of block_size={self.block_size}, got {self.segment}")
        _check(self.window % self.segment == 0, "window",
               f"must be a multiple of segment={self.segment}, got {self.window}")
        _check(self.persistent_tokens >= 0 and self.persistent_tokens % self.block_size == 0, "persistent_tokens",
               f"must be a non-negative multiple of block_size={self.block_size}, got {self.persistent_tokens}")
        _check(self.variant in ("mac", "mag", "mal"), "variant", f"must be mac, mag or mal, got {self.variant!r}")
        _check(self.local_blocks >= 1, "local_blocks", f"must be >= 1, got {self.local_blocks}")
        _check(self.selection_impl in ("torch", "triton", "auto"), "selection_impl",
               f"must be torch, triton or auto, got {self.selection_impl!r}")
        _check(0 < self.hard_keep_fraction <= 1, "hard_keep_fraction",
               f"must be in (0, 1], got {self.hard_keep_fraction}")
        for i in self.memory_layer_ids():
            _check(0 <= i < self.depth, "memory_layers", f"layer {i} is out of range for depth={self.depth}")
        try:
            parse_policy(self.budget)
        except ValueError as e:
            raise ConfigError(str(e), key="budget") from None
        if isinstance(self.memory, dict):
            self.memory = from_dict(MemoryConfig, self.memory)
        if isinstance(self.consolidation, dict):
            self.consolidation = from_dict(ConsolidationConfig, self.consolidation)
        self.memory.validate()
        self.consolidation.validate()
        return self

    def memory_layer_ids(self) -> list[int]:
        return list(range(self.depth)) if self.memory_layers is None else list(self.memory_layers)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Build dataclass `cls` from a dict, recursing into dataclass fields; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    hints = _resolved_types(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        kwargs[key] = value
    return cls(**kwargs)


def _resolved_types(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - forward refs we cannot resolve
        return {}


__all__ = ["ConfigError", "MemoryConfig", "ConsolidationConfig", "ModelConfig", "to_dict", "from_dict"]
