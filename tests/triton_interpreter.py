"""Triton's interpreter without its redundant re-patching at every device-function call (test speed only).

Under TRITON_INTERPRET=1 (Triton 3.x), a kernel launch (`GridExecutor.__call__`) patches triton.language
(`_patch_lang`: its builtins wrapped to run on numpy, `range`, `reduce`, tensor methods ...) and restores it when
the launch ends. Every call of a `@triton.jit` helper inside the kernel (`InterpretedFunction.__call__`) runs
`_patch_lang` again: `inspect.getmembers` over tl, tl.tensor and tl.math finds every builtin already wrapped (a
wrapper is no builtin, so it is left as it is), the same stateless helpers are set again, and that second scope is
never restored. The kernels call helpers in their inner loops: with Triton 3.9 that scan was a quarter of the
interpreted kernel tests' time (tests/test_{sparse_attention,update_coefficients,memory_grads}_kernel.py and
test_select_triton.py: 114 s -> 85 s on 2 cores without it).

`install()` lets a device call skip it when the running launch has already patched every triton.language module
(tl, tl.core) the helper's globals hold; any other call runs Triton's own `_patch_lang`. The kernels execute the
same numpy operations either way: when this was written, all 287 launches of those four files left every tensor
argument bitwise equal (sha1 after each launch) with and without it. If the interpreter's code is not the one this
was written against, nothing is changed.
"""

from __future__ import annotations

import inspect
import os


def install() -> bool:
    """Install the skip (once); True when it is active."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti

        launch_src = inspect.getsource(ti.GridExecutor.__call__)
        device_src = inspect.getsource(ti.InterpretedFunction.__call__)
    except Exception:  # no triton, or another layout
        return False
    if getattr(ti, "_memsparse_skip_repatch", False):
        return True
    if ("patch_scope = _patch_lang(self.fn)" not in launch_src or "patch_scope.restore()" not in launch_src
            or "_patch_lang(self.fn)" not in device_src or not hasattr(ti, "_LangPatchScope")):
        return False

    patch_lang, launch = ti._patch_lang, ti.GridExecutor.__call__
    covered: list[set[int]] = []  # per running launch: ids of the language modules its patches cover
    languages = (tl, tl.core)

    def lang_modules(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and any(v is m for m in languages)}

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
