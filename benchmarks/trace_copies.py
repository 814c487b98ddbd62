"""Attribute every copy, cast and concatenation of one MAC training step to the forward source line behind it.

    python benchmarks/trace_copies.py --length 8192 [--device cpu] [--min-mib 1]

The GPU profile lists the backward's copies without a Python stack (the autograd engine runs them). Here a
TorchDispatchMode sees each aten copy/cast/cat/clone as it runs, forward and backward; a backward op is charged
to its autograd node, whose forward traceback anomaly mode records. Copies move bytes, so the table ranks sites
by bytes written (a bandwidth-bound proxy for time). On the CPU (bf16 autocast) it takes the GPU step's code paths
(`memory.compile`, `compile_pointwise`) but runs the compiled functions eagerly: their rows are marked, as are the
rows of the kernels' PyTorch references (the GPU runs the Triton kernels).
Writes `<out>/<name>.md`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import VOCAB, memsparse_mac  # noqa: E402

aten = torch.ops.aten
COPY_OPS = {aten._to_copy.default: "cast/_to_copy", aten.copy_.default: "copy_", aten.cat.default: "cat",
            aten.clone.default: "clone", aten.stack.default: "stack",
            aten.repeat_interleave.self_int: "repeat_interleave", aten.index_select.default: "index_select",
            aten.constant_pad_nd.default: "pad", aten.new_zeros.default: "new_zeros",
            aten.zeros_like.default: "zeros_like"}
# functions that run under torch.compile on the GPU (their copies are fused or planned by inductor there)
# (`memory.compile` and `compile_pointwise`, as the GPU recipes and benchmarks run)
COMPILED_ON_GPU = ("_write_step", "token_gradients", "_apply_chunk", "memory_forward", "apply_rope", "mac_merge",
                   "decayed_suffix_sums", "swiglu", "rms_norm_cast", "add_rms_norm_cast", "project_heads")
ROOT = str(Path(__file__).resolve().parent.parent)


def _site(frames: list[str]) -> tuple[str, str]:
    """The innermost project frame (file:line function) and what runs it on the GPU: "eager", "compiled" (inside
    a compiled function) or "kernel" (a kernel's PyTorch reference, which the CPU runs in the Triton kernel's
    place)."""
    ours = [f for f in frames if ROOT in f and "site-packages" not in f and "benchmarks" not in f]
    if not ours:
        return "(outside the project)", "eager"
    if any("_reference.py" in f for f in ours):
        kind = "kernel"
    elif any(name in f for f in ours for name in COMPILED_ON_GPU):
        kind = "compiled"
    else:
        kind = "eager"
    return ours[-1].replace(ROOT + "/", ""), kind


def _frames_from_traceback(tb) -> list[str]:
    """Anomaly mode's forward traceback (a formatted string, or a list of formatted frames) as file:line func."""
    out = []
    for line in ("".join(tb) if isinstance(tb, list) else tb).splitlines():
        line = line.strip()
        if line.startswith('File "'):
            path, rest = line[6:].split('", line ', 1)
            lineno, _, func = rest.partition(", in ")
            out.append(f"{path}:{lineno} {func}")
    return out


class CopyTracer(TorchDispatchMode):
    """Sums, per (phase, op, site), the calls and the bytes written by copy-like aten ops."""

    def __init__(self):
        super().__init__()
        self.rows = defaultdict(lambda: [0, 0, set()])  # key -> [calls, bytes, shapes]
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = COPY_OPS.get(func)
        if name is None:
            return out
        res = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(res, torch.Tensor):
            return out
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            tb = (node.metadata.get("traceback_", "") if node is not None else "")
            site, kind = _site(_frames_from_traceback(tb))
            site = f"[{node.name() if node is not None else '?'}] {site}"
        else:
            frames = [f"{fs.filename}:{fs.lineno} {fs.name}" for fs in traceback.extract_stack()[:-1]]
            site, kind = _site(frames)
        if name == "cast/_to_copy" and len(args) and isinstance(args[0], torch.Tensor):
            name = f"cast {str(args[0].dtype).replace('torch.', '')}->{str(res.dtype).replace('torch.', '')}"
        row = self.rows[(self.phase, name, site, kind)]
        row[0] += 1
        row[1] += res.numel() * res.element_size()
        if len(row[2]) < 3:
            row[2].add(tuple(res.shape))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-mib", type=float, default=1.0, help="list sites writing at least this many MiB")
    ap.add_argument("--name", default="trace_copies")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cpu":  # take the GPU's code paths (compiled functions run eagerly here, traced op by op)
        import memsparse.memory as memory_module
        import memsparse.model as model_module

        for mod in (memory_module, model_module):
            mod.use_compiled = lambda flag, x: flag and torch.is_grad_enabled()
            mod.compile_cached = lambda fn: fn
    model = memsparse_mac(args.length, 512, 2048, "length_scaled:c=12,min_tokens=256", memory_compile=True,
                          pointwise_compile=True).to(dev)
    ids = torch.randint(0, VOCAB, (1, args.length + 1), device=dev)
    tracer = CopyTracer()
    with torch.autograd.detect_anomaly(check_nan=False), tracer:
        with torch.autocast(dev.type, torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
        tracer.phase = "backward"
        loss.backward()
    rows = sorted(tracer.rows.items(), key=lambda kv: -kv[1][1])
    total = defaultdict(lambda: [0, 0])
    for (phase, _name, _, kind), (calls, nbytes, _) in rows:
        t = total[(phase, kind)]
        t[0] += calls
        t[1] += nbytes
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip() or "unknown"
    lines = [f"Copies, casts and concatenations of one MAC training step (dim 512, depth 8, memory in 3 layers, "
             f"segment 512, window 2048), L={args.length}, B=1, bf16 autocast, {dev.type}, torch {torch.__version__}, "
             f"code at {rev}"
             f"\n\n`python benchmarks/trace_copies.py --length {args.length} --device {args.device}`\n",
             "On the GPU, `eager` sites run as written, `compiled` ones inside a compiled function, `kernel` ones are "
             "a kernel's PyTorch reference (the GPU runs the Triton kernel instead).", "",
             "| phase | on the GPU | calls | MiB written |", "|---|---|---|---|"]
    lines += [f"| {p} | {c} | {n} | {b / 2**20:.1f} |" for (p, c), (n, b) in sorted(total.items())]
    lines += ["", f"Sites writing >= {args.min_mib} MiB (backward sites: [autograd node] forward line):", "",
              "| phase | op | site | on the GPU | calls | MiB | shapes |", "|---|---|---|---|---|---|---|"]
    for (phase, name, site, kind), (calls, nbytes, shapes) in rows:
        if nbytes / 2**20 >= args.min_mib:
            shp = "; ".join(str(list(s)) for s in sorted(shapes))
            lines.append(f"| {phase} | {name} | `{site}` | {kind} | {calls} | "
                         f"{nbytes / 2**20:.1f} | {shp} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
