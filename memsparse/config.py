"""Typed, validated configuration dataclasses (YAML-serialisable through `asdict` / `from_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An impossible configuration; the message names the field."""


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


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
        return self


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


__all__ = ["ConfigError", "MemoryConfig", "to_dict", "from_dict", "field"]
