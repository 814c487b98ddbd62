"""One memory write step (the model's hot loop body) on its own: forward + backward, CUDA-graphed, per kernel.

The whole-model profile (docs/performance.md) puts ~40% of a 32K training step in the memory's chunk step:
`_write_step` (token gradients, soft surprise gate, closed-form update) under torch.compile, called once per
segment and memory layer. This times that function alone at the benchmark model's shape (B=1, 8 heads of 64,
depth-2 MLP, expansion 4, chunk 512), forward + backward:
- replayed as a CUDA graph (as in training): median microseconds per step;
- one profiled eager call: every GPU kernel of the step with its time (what to fuse next);
- compiled (with the Triton per-token-gradient kernels unless --grads-impl reference) against eager PyTorch on
  the same inputs, values and gradients: the GPU compiler and kernels can differ from what the CPU tests check.

    python benchmarks/bench_write_step.py --tf32 --name write_step_h100     # on a CUDA machine
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch


def make_inputs(B: int, H: int, D: int, hidden: int, C: int, depth: int, device) -> dict:
    """Random leaf tensors shaped as the model feeds `_write_step` (all that get gradients require them)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    dims = [D] + [hidden] * (depth - 1) + [D]
    leaf = dict(
        weights=[rnd(B, H, dims[i], dims[i + 1], scale=dims[i] ** -0.5) for i in range(depth)],
        momentum=[rnd(B, H, dims[i], dims[i + 1], scale=1e-3) for i in range(depth)],
        k=torch.nn.functional.normalize(rnd(B, H, C, D), dim=-1),
        v=rnd(B, H, C, D),
        r_eta=rnd(B, H, C, scale=0.1) + 2.2, r_theta=rnd(B, H, C, scale=0.1) - 2.0,
        r_alpha=rnd(B, H, C, scale=0.1) - 4.0,
        gain=torch.full((H, D), D ** -0.5, device=device), gate_scale=torch.full((H,), 0.5, device=device),
        gate_bias=torch.zeros(H, device=device),
    )
    for t in _tensors(leaf):
        t.requires_grad_(True)
    return leaf


def _tensors(leaf: dict) -> list:
    out = []
    for v in leaf.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def step(fn, leaf: dict, probes: list, impl: tuple | None):
    """Forward + backward of one write step (its path arguments `impl`: per-token gradients [and update
    coefficients]; None: a version of the function without the choice); returns (outputs, gradients of every
    leaf)."""
    new_w, new_s, *_ = fn(leaf["weights"], leaf["momentum"], leaf["k"], leaf["v"], torch.sigmoid(leaf["r_eta"]),
                          0.1 * torch.sigmoid(leaf["r_theta"]), torch.sigmoid(leaf["r_alpha"]), None, leaf["gain"],
                          leaf["gate_scale"], leaf["gate_bias"], "silu", 1.0, *(impl or ()))
    outs = [*new_w, *new_s]
    loss = sum((o * p).sum() for o, p in zip(outs, probes))
    grads = torch.autograd.grad(loss, _tensors(leaf))
    return [o.detach() for o in outs], list(grads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores")
    ap.add_argument("--reps", type=int, default=200, help="graph replays timed")
    ap.add_argument("--memory-module", default="memsparse.memory",
                    help="module providing _write_step and compile_cached (to time another version of it)")
    ap.add_argument("--grads-impl", default="auto", choices=["auto", "triton", "reference"],
                    help="per-token gradients: the Triton kernels or the PyTorch code (auto: kernels on CUDA)")
    ap.add_argument("--coef-impl", default="auto", choices=["auto", "triton", "reference"],
                    help="update coefficients: the Triton kernels or the PyTorch code (auto: the PyTorch code)")
    ap.add_argument("--name", default="write_step")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_write_step needs a CUDA device")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    mem = importlib.import_module(args.memory_module)
    dev = torch.device("cuda")
    H, D, C = args.heads, args.head_dim, args.chunk
    leaf = make_inputs(args.batch, H, D, D * args.expansion, C, args.depth, dev)
    gen = torch.Generator(device="cpu").manual_seed(1)
    probes = [torch.randn(w.shape, generator=gen).to(dev) for w in leaf["weights"] + leaf["momentum"]]
    compiled = mem.compile_cached(mem._write_step)
    has_impl = hasattr(mem, "grads_impl")
    impl = (mem.grads_impl(leaf["weights"], leaf["k"], "silu", args.grads_impl),) if has_impl else None
    if hasattr(mem, "resolve_coefficients_impl"):
        impl = (*impl, mem.resolve_coefficients_impl(leaf["k"], args.coef_impl))
    eager = None if impl is None else ("reference",) * len(impl)

    # compiled (on `impl`) vs eager PyTorch, same inputs: the GPU compiler and the kernels are checked here
    out_e, grad_e = step(mem._write_step, leaf, probes, eager)
    out_c, grad_c = step(compiled, leaf, probes, impl)
    check = {"outputs_max_rel_err": max(rel_err(a, b) for a, b in zip(out_c, out_e)),
             "grads_max_rel_err": max(rel_err(a, b) for a, b in zip(grad_c, grad_e))}
    check["ok"] = check["outputs_max_rel_err"] < 1e-2 and check["grads_max_rel_err"] < 1e-2
    print("compiled vs eager PyTorch:", check)

    # CUDA graph of forward + backward, replayed
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(compiled, leaf, probes, impl)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(compiled, leaf, probes, impl)
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(args.reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3)
    times.sort()
    graph_us = times[len(times) // 2]

    # every kernel of one (eager-launched, compiled) step
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(compiled, leaf, probes, impl)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            kernels[e.name].append(e.device_time)
    rows = sorted(([n, len(t), sum(t)] for n, t in kernels.items()), key=lambda r: -r[2])
    n_kernels = sum(r[1] for r in rows)
    kernel_us = sum(r[2] for r in rows)

    paths = "pytorch" if impl is None else ", ".join(f"{n}: {i}" for n, i in zip(("per-token gradients",
                                                                                 "update coefficients"), impl))
    desc = (f"_write_step ({args.memory_module}, {paths}), B={args.batch}, "
            f"H={H}, head_dim={D}, depth {args.depth}, "
            f"expansion {args.expansion}, chunk {C}, fp32{' (TF32 matmuls)' if args.tf32 else ''}, compiled, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(desc)
    print(f"graph replay: {graph_us:.1f} us per step (median of {args.reps}); {n_kernels} kernels, "
          f"{kernel_us:.1f} us summed in one profiled step")
    out = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "description": desc, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "host": platform.node(), "graph_us_median": graph_us, "graph_us_p10_p90": [times[len(times) // 10],
                                                                                   times[9 * len(times) // 10]],
           "kernels": n_kernels, "kernel_us_sum": kernel_us, "check": check,
           "kernel_table": [{"name": n, "calls": c, "us": round(t, 2)} for n, c, t in rows]}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = [desc, "", f"CUDA-graph replay of forward + backward: **{graph_us:.1f} us** per step (median of "
             f"{args.reps}); compiled vs eager PyTorch: outputs rel err {check['outputs_max_rel_err']:.1e}, gradients "
             f"{check['grads_max_rel_err']:.1e}", "",
             f"One profiled step: {n_kernels} kernels, {kernel_us:.1f} us of kernel time", "",
             "| kernel | calls | us |", "|---|---|---|"]
    lines += [f"| `{n[:90]}` | {c} | {t:.1f} |" for n, c, t in rows]
    (outdir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:40]))
    if not check["ok"]:
        sys.exit("compiled write step differs from eager")


if __name__ == "__main__":
    main()
