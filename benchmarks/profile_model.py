"""Profile memsparse MAC training steps with torch.profiler: where the time goes (top CUDA kernels / ops).

    python benchmarks/profile_model.py --length 8192 --out benchmarks/results
Writes `profile_model.md` (top ops by CUDA time and by CPU time, step wall time, launch count).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import VOCAB, memsparse_mac, parse_inductor  # noqa: E402

import memsparse.memory as memory_module  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--memory-compile", action="store_true")
    ap.add_argument("--pointwise-compile", action="store_true",
                    help="model.compile_pointwise (the GPU recipes' setting)")
    ap.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (memory MLPs)")
    ap.add_argument("--inductor", default="", help="inductor options of the compiled functions (memory, pointwise), "
                    "KEY=VALUE,... (e.g. combo_kernels=1); recorded in the results")
    ap.add_argument("--name", default="", help="results file stem (default profile_model[_compiled])")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--stacks", default="", help="ops (e.g. aten::copy_,aten::mul) whose calling Python stacks "
                    "to list, with their CUDA time")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    memory_module.INDUCTOR_OPTIONS.update(parse_inductor(args.inductor))
    model = memsparse_mac(args.length, 512, 2048, "length_scaled:c=12,min_tokens=256",
                          memory_compile=args.memory_compile, pointwise_compile=args.pointwise_compile).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        ids = torch.randint(0, VOCAB, (1, args.length + 1), device="cuda")
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=bool(args.stacks),
                 record_shapes=bool(args.stacks)) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy = sum(e.time_range.elapsed_us() for e in kernels)  # microseconds of kernel execution
    head = (f"memsparse MAC (dim 512, depth 8, memory in 3 layers, segment 512, window 2048"
            f"{', memory compiled' if args.memory_compile else ''}"
            f"{', pointwise compiled' if args.pointwise_compile else ''}{', TF32' if args.tf32 else ''}), "
            f"one training step at L={args.length}, "
            f"B=1, bf16 autocast, {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
            f"step wall time {wall * 1e3:.1f} ms; {len(kernels)} GPU kernels launched; ")
    lines = [head + f"GPU kernel time summed {gpu_busy / 1e3:.1f} ms (busy fraction ~{gpu_busy / 1e6 / wall:.0%})",
             "", "Top by CUDA time:", "", "```",
             ev.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60), "```", "",
             "Top by CPU time (self):", "", "```",
             ev.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60), "```"]
    for op in filter(None, args.stacks.split(",")):
        rows = [e for e in prof.key_averages(group_by_stack_n=8) if e.key == op]
        rows.sort(key=lambda e: -e.device_time_total)
        lines += ["", f"Where {op} comes from (top stacks by CUDA time):", "", "```"]
        for e in rows[:8]:
            stack = [f for f in e.stack if "memsparse" in f or "benchmarks" in f] or e.stack[:3]
            where = " <- ".join(stack) or "(no Python stack: run by the autograd engine in backward, or inside a " \
                                           "compiled graph)"
            lines.append(f"{e.count:6d} calls {e.device_time_total / 1e3:8.2f} ms  {where}")
        lines.append("```")
        shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == op]
        shaped.sort(key=lambda e: -e.device_time_total)
        lines += ["", f"{op} by input shapes:", "", "```"]
        lines += [f"{e.count:6d} calls {e.device_time_total / 1e3:8.2f} ms  {e.input_shapes}" for e in shaped[:8]]
        lines.append("```")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = (args.name or ("profile_model_compiled" if args.memory_compile else "profile_model")) + ".md"
    (Path(args.out) / name).write_text("\n".join(lines) + "\n")
    print(lines[0])


if __name__ == "__main__":
    main()
