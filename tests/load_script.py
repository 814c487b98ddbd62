"""Import a script by its file path: benchmarks/*.py (and tests/reference_transformer.py) are scripts, not packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path, register: bool = False) -> ModuleType:
    """The file at `path` imported as module <its stem>; `register` also puts it in sys.modules under that name (for
    scripts that other scripts import by name)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_benchmark(name: str, register: bool = False) -> ModuleType:
    """benchmarks/<name>.py imported as module <name> (see load_script)."""
    return load_script(BENCHMARKS / f"{name}.py", register)
