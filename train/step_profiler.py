"""`StepProfiler`: where the wall time of a window of steady training steps goes (torch.profiler).

A short training step can be slow for reasons no per-kernel benchmark shows: host work between launches, a host
sync that makes the host wait for the device every step, data loading. This callback profiles `steps` training
batches from `start_step` on (after compilation and CUDA-graph capture) and writes, on rank 0:

- `<dirpath>/step_profile.json`: wall ms per step (host clock, device synchronised at both ends), device-busy ms
  per step (the union of the kernels' intervals) and the idle share of the device, host time per step spent
  waiting on the device (`cudaStreamSynchronize` / `cudaDeviceSynchronize` / `cudaEventSynchronize`) and how
  many such waits and scalar reads (`aten::_local_scalar_dense`: `.item()`, `bool(tensor)`, `int(tensor)`) a step
  does, and the top ops by host and by device time;
- `<dirpath>/step_profile.md`: the same as tables;
- `<dirpath>/step_trace.json` (`trace=True`): the Chrome / Perfetto trace.

Use it from a recipe or the command line, e.g.
`memsparse-train fit --config recipes/retrieval_small_copy.yaml --trainer.max_steps 130
--trainer.callbacks+=memsparse.train.step_profiler.StepProfiler --trainer.callbacks.init_args.start_step 100`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from memsparse.train.callbacks import synced_clock
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SCALAR_READ = "aten::_local_scalar_dense"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of (start_us, end_us) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1000.0


def _ranked(d: dict[str, float], steps: int, rows: int) -> list[dict[str, Any]]:
    """The `rows` largest of name -> total us, as ms a step."""
    ranked = sorted(d.items(), key=lambda kv: -kv[1])[:rows]
    return [{"name": k, "ms_per_step": v / 1000.0 / steps} for k, v in ranked]


def _device_and_waits(kernels: list[tuple[str, float, float]], waits_us: list[float], reads: int, steps: int,
                      rows: int) -> dict[str, Any]:
    """The figures both summaries share, from the device activity (name, start us, duration us), the host's waits
    on the device (duration us each) and the scalar reads: per step."""
    iv = [(s, s + d) for _, s, d in kernels]
    per_kernel: dict[str, float] = {}
    for name, _, d in kernels:
        per_kernel[name] = per_kernel.get(name, 0.0) + d
    return {"device_busy_ms_per_step": _union_ms(iv) / steps if kernels else None,
            "host_sync_ms_per_step": sum(waits_us) / 1000.0 / steps, "host_syncs_per_step": len(waits_us) / steps,
            "scalar_reads_per_step": reads / steps, "top_device_kernels": _ranked(per_kernel, steps, rows)}


def summarize(events: Any, steps: int, wall_s: float, rows: int = 15) -> dict[str, Any]:
    """A profile's events (`prof.events()`) over `steps` steps of `wall_s` seconds -> the summary dict."""
    kernels: list[tuple[str, float, float]] = []
    waits_us: list[float] = []
    reads = 0
    host: dict[str, float] = {}
    for e in events:
        dev_type = getattr(e, "device_type", None)
        if dev_type is not None and dev_type != torch.autograd.DeviceType.CPU:
            if not getattr(e, "is_user_annotation", False):  # a record_function range on the device is no kernel
                kernels.append((e.name, e.time_range.start, e.time_range.elapsed_us()))
            continue
        host[e.name] = host.get(e.name, 0.0) + e.self_cpu_time_total
        if e.name in SYNC_OPS:
            waits_us.append(e.cpu_time_total)
        elif e.name == SCALAR_READ:
            reads += 1
    wall_ms = 1000.0 * wall_s / steps
    out = {"steps": steps, "wall_ms_per_step": wall_ms,
           **_device_and_waits(kernels, waits_us, reads, steps, rows), "top_host_ops": _ranked(host, steps, rows)}
    busy = out["device_busy_ms_per_step"]
    out["device_idle_share"] = (1.0 - min(busy, wall_ms) / wall_ms) if busy is not None and wall_ms > 0 else None
    return out


def summarize_trace(path: str | Path, steps: int, rows: int = 15) -> dict[str, Any]:
    """The same figures from a Chrome trace (`step_trace.json`, optionally gzipped) of `steps` steps: device busy
    ms a step (union of kernel, memcpy and memset intervals), the device's span and idle ms a step inside it, host
    waits on the device and scalar reads a step, and the top kernels by device time."""
    import gzip

    path = Path(path)
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        doc = json.load(f)
    events = [e for e in (doc["traceEvents"] if isinstance(doc, dict) else doc) if e.get("ph") == "X"]
    dev = [(e["name"], float(e["ts"]), float(e.get("dur", 0))) for e in events
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not dev:
        raise ValueError(f"{path}: no device activity in the trace")
    span_ms = (max(s + d for _, s, d in dev) - min(s for _, s, _ in dev)) / 1000.0
    waits_us = [float(e.get("dur", 0)) for e in events if e.get("name") in SYNC_OPS]
    reads = sum(1 for e in events if e.get("name") == SCALAR_READ)
    out = {"steps": steps, **_device_and_waits(dev, waits_us, reads, steps, rows),
           "device_span_ms_per_step": span_ms / steps, "device_kernels_per_step": len(dev) / steps}
    out["device_idle_ms_per_step"] = span_ms / steps - out["device_busy_ms_per_step"]
    if any(e.get("cat") == "python_function" for e in events):  # a trace recorded with stacks (stack=True)
        out["host_waits_by_caller"] = _waits_by_caller(events, steps, rows)
    return out


def _caller(frames: list[str]) -> str:
    """The innermost Python frame outside torch itself (the code that asked for the value), else the innermost."""
    for name in reversed(frames):
        if not name.startswith(("torch/", "<built-in")) and "/torch/" not in name:
            return name
    return frames[-1] if frames else "?"


def _waits_by_caller(events: list[dict], steps: int, rows: int) -> list[dict[str, Any]]:
    """Host waits on the device grouped by the Python code they were made from (per step: count and ms)."""
    by_tid: dict[Any, list[dict]] = {}
    for e in events:
        if e.get("cat") in ("python_function", "cpu_op", "cuda_runtime"):
            by_tid.setdefault(e.get("tid"), []).append(e)
    sites: dict[str, list[float]] = {}
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack: list[dict] = []
        for e in evs:
            end = float(e["ts"]) + float(e.get("dur", 0))
            while stack and float(stack[-1]["ts"]) + float(stack[-1].get("dur", 0)) < end:
                stack.pop()
            if e["name"] in SYNC_OPS:
                site = _caller([x["name"] for x in stack if x.get("cat") == "python_function"])
                acc = sites.setdefault(site, [0.0, 0.0])
                acc[0] += 1
                acc[1] += float(e.get("dur", 0))
            stack.append(e)
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:rows]
    return [{"caller": k, "waits_per_step": n / steps, "ms_per_step": us / 1000.0 / steps} for k, (n, us) in ranked]


def _markdown(s: dict[str, Any], title: str) -> str:
    def f(x: Any, p: int = 2) -> str:
        return "-" if x is None else f"{x:.{p}f}"

    idle = "-" if s["device_idle_share"] is None else f"{100 * s['device_idle_share']:.0f}%"
    lines = [f"# {title}", "", "| steps | wall ms / step | device busy ms / step | device idle | host waits on the "
             "device, ms / step | waits / step | scalar reads / step |", "|---|---|---|---|---|---|---|",
             f"| {s['steps']} | {f(s['wall_ms_per_step'])} | {f(s['device_busy_ms_per_step'])} | "
             f"{idle} | "
             f"{f(s['host_sync_ms_per_step'])} | {f(s['host_syncs_per_step'], 1)} | "
             f"{f(s['scalar_reads_per_step'], 1)} |"]
    for key, what in (("top_host_ops", "host (self) time"), ("top_device_kernels", "device time")):
        if s[key]:
            lines += ["", f"Top ops by {what}:", "", "| op | ms / step |", "|---|---|"]
            lines += [f"| `{r['name'][:100]}` | {r['ms_per_step']:.3f} |" for r in s[key]]
    return "\n".join(lines) + "\n"


class StepProfiler(Callback):
    """Profile `steps` training batches from global step `start_step` on; write the summary (module docstring).

    Args:
        start_step: the first profiled step (after the warm-up: compilation, autotuning, CUDA-graph capture).
        steps: how many batches to profile (>= 1).
        dirpath: where the files go (default `<trainer.default_root_dir>/profile`).
        trace: also write the Chrome / Perfetto trace.
        rows: ops listed per table.
        stack: record Python stacks (slower); the trace then says which code each host wait on the device came
            from (`benchmarks/trace_summary.py`: `host_waits_by_caller`).
    """

    def __init__(self, start_step: int = 100, steps: int = 10, dirpath: str | None = None, trace: bool = True,
                 rows: int = 15, stack: bool = False) -> None:
        if start_step < 0:
            raise ValueError(f"StepProfiler: start_step must be >= 0, got {start_step}")
        if steps < 1:
            raise ValueError(f"StepProfiler: steps must be >= 1, got {steps}")
        self.start_step, self.steps, self.dirpath, self.trace, self.rows = start_step, steps, dirpath, trace, rows
        self.stack = stack
        self._prof: profile | None = None
        self._t0 = 0.0
        self._seen = 0
        self.summary: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._prof is not None or self.summary is not None or not trainer.is_global_zero:
            return
        if trainer.global_step < self.start_step:
            return
        acts = [ProfilerActivity.CPU]
        if trainer.strategy.root_device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=acts, with_stack=self.stack)
        self._t0 = synced_clock(trainer)
        self._prof.__enter__()
        self._seen = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._prof is None:
            return
        self._seen += 1
        if self._seen < self.steps:
            return
        self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prof is not None:  # the fit ended inside the window: summarise what was profiled
            self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        wall = synced_clock(trainer) - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        steps = max(self._seen, 1)
        self.summary = summarize(prof.events(), steps, wall, self.rows)
        self.summary.update(start_step=self.start_step, device=str(trainer.strategy.root_device))
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "profile")
        out.mkdir(parents=True, exist_ok=True)
        (out / "step_profile.json").write_text(json.dumps(self.summary, indent=1))
        title = f"Training steps {self.start_step}-{self.start_step + steps - 1} ({self.summary['device']})"
        (out / "step_profile.md").write_text(_markdown(self.summary, title))
        if self.trace:
            prof.export_chrome_trace(str(out / "step_trace.json"))
        s = self.summary
        busy = s["device_busy_ms_per_step"]
        print(f"StepProfiler: {s['wall_ms_per_step']:.1f} ms a step over {steps} steps"
              + ("" if busy is None else f", device busy {busy:.1f} ms") +
              f", {s['host_syncs_per_step']:.1f} host waits ({s['host_sync_ms_per_step']:.1f} ms) and "
              f"{s['scalar_reads_per_step']:.1f} scalar reads a step -> {out}", flush=True)
