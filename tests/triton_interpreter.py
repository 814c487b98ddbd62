"""Triton's interpreter without two kinds of work whose results it never uses (test speed only).

Under TRITON_INTERPRET=1 (Triton 3.x):

1. Every integer add, sub and mul runs the overflow sanitizer (`InterpreterOptions.sanitize_overflow` is True):
   both operands cast to int64, the operation redone, compared with the type's bounds, and the condition handed to
   `device_assert`, which returns at once unless `options.debug` is set, and the interpreter never sets it
   (TRITON_DEBUG=1 does not either): an int32 overflow wraps silently under the interpreter with or without the
   sanitizer, and so does a failing `tl.device_assert`. Compiled kernels run the sanitizer only in debug mode.
   `install()` turns the option off only while `options.debug` is False and `device_assert` is that early return.
2. A kernel launch (`GridExecutor.__call__`) patches triton.language (`_patch_lang`: its builtins wrapped to run on
   numpy, `range`, `reduce`, tensor methods ...) and restores it when the launch ends. Every call of a
   `@triton.jit` helper inside the kernel (`InterpretedFunction.__call__`) runs `_patch_lang` again:
   `inspect.getmembers` over tl, tl.tensor and tl.math finds every builtin already wrapped (a wrapper is no
   builtin, so it is left as it is), the same stateless helpers are set again, and that second scope is never
   restored. `install()` lets a device call skip it when the running launch has already patched every
   triton.language module (tl, tl.core) the helper's globals hold; any other call runs Triton's own `_patch_lang`.

The kernels' own operations are the same either way: when this was written (Triton 3.9), all 287 launches of
tests/test_{sparse_attention,update_coefficients,memory_grads}_kernel.py and test_select_triton.py left every
tensor argument bitwise equal (sha1 after each launch) with and without `install()`; those four files took 114 s
without it, 85 s with 2. alone and 55 s with both, on 2 cores. Where the interpreter's code is not the one this was
written against, the part concerned is left alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import os


def install() -> bool:
    """Install both (once); True when at least one is active."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.language.semantic import TritonSemantic
        from triton.runtime import interpreter as ti
    except Exception:  # no triton, or another layout
        return False
    return any([_sanitizer_off(ti, TritonSemantic), _skip_device_call_repatching(ti, tl)])


def _sanitizer_off(ti, semantic) -> bool:
    try:
        assert_src = inspect.getsource(semantic.device_assert)
        sanitize_src = inspect.getsource(semantic.binary_op_sanitize_overflow_impl)
        builder = ti.interpreter_builder
        options = builder.options
    except Exception:
        return False
    dead = ("if not self.builder.options.debug:\n            return" in assert_src
            and "self.device_assert(cond, msg, None)" in sanitize_src)
    if not dead or getattr(options, "debug", True) or not dataclasses.is_dataclass(options):
        return False
    if options.sanitize_overflow:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


def _skip_device_call_repatching(ti, tl) -> bool:
    if getattr(ti, "_memsparse_skip_repatch", False):
        return True
    try:
        launch_src = inspect.getsource(ti.GridExecutor.__call__)
        device_src = inspect.getsource(ti.InterpretedFunction.__call__)
    except Exception:
        return False
    if ("patch_scope = _patch_lang(self.fn)" not in launch_src or "patch_scope.restore()" not in launch_src
            or "_patch_lang(self.fn)" not in device_src or not hasattr(ti, "_LangPatchScope")):
        return False

    patch_lang, launch = ti._patch_lang, ti.GridExecutor.__call__
    covered: list[set[int]] = []  # per running launch: ids of the language modules its patches cover
    modules: dict[int, set[int]] = {}  # id(fn.__globals__) -> ids of the triton.language modules it holds

    def lang_modules(fn) -> set[int]:
        g = fn.__globals__
        if id(g) not in modules:
            modules[id(g)] = {id(v) for v in g.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}
        return modules[id(g)]

    def skipping_patch_lang(fn):
        mods = lang_modules(fn)
        if covered and mods and mods <= covered[-1]:
            return ti._LangPatchScope()  # already patched by this launch (and restored when it ends)
        scope = patch_lang(fn)
        if covered:
            covered[-1] |= mods
        return scope

    def tracking_launch(self, *args, **kwargs):
        covered.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            covered.pop()

    ti._patch_lang = skipping_patch_lang
    ti.GridExecutor.__call__ = tracking_launch
    ti._memsparse_skip_repatch = True
    return True
