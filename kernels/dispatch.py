"""What every kernel dispatcher shares: the `impl` choice and its environment override."""

from __future__ import annotations

import os

IMPLS = ("auto", "triton", "reference")


def requested_impl(impl: str, env_var: str) -> str:
    """`impl` ("auto" | "triton" | "reference") after the environment override: with "auto", `env_var` (same
    values) decides when set. Raises ValueError on any other value, from the argument or the environment."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(env_var, "auto").strip().lower() or "auto"
        if impl not in IMPLS:
            raise ValueError(f"{env_var} must be one of {IMPLS}, got {impl!r}")
    return impl
