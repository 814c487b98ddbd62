"""Summarise a StepProfiler Chrome trace (`<root>/profile/step_trace.json[.gz]`): device busy, span and idle ms a
step, kernels a step, host waits on the device and scalar reads a step, top kernels.

    python benchmarks/trace_summary.py step_trace.json.gz --steps 5 --out DIR --name trace_summary
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memsparse.train.step_profiler import summarize_trace  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, required=True, help="steps the trace holds (the StepProfiler's steps)")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--name", default="trace_summary")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    try:
        s = summarize_trace(args.trace, args.steps, args.rows)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"trace_summary: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(s, indent=1))
    lines = [f"# {Path(args.trace).name}: {args.steps} steps", "",
             "| device span ms / step | device busy ms / step | device idle ms / step | kernels / step | host waits "
             "on the device ms / step (count) | scalar reads / step |", "|---|---|---|---|---|---|",
             f"| {s['device_span_ms_per_step']:.2f} | {s['device_busy_ms_per_step']:.2f} | "
             f"{s['device_idle_ms_per_step']:.2f} | {s['device_kernels_per_step']:.0f} | "
             f"{s['host_sync_ms_per_step']:.2f} ({s['host_syncs_per_step']:.1f}) | {s['scalar_reads_per_step']:.1f} |",
             "", "| kernel | ms / step |", "|---|---|"]
    lines += [f"| `{r['name'][:110]}` | {r['ms_per_step']:.3f} |" for r in s["top_device_kernels"]]
    if "host_waits_by_caller" in s:  # traces recorded with StepProfiler(stack=True)
        lines += ["", "Host waits on the device by the Python code that made them:", "",
                  "| caller | waits / step | ms / step |", "|---|---|---|"]
        lines += [f"| `{r['caller'][:110]}` | {r['waits_per_step']:.1f} | {r['ms_per_step']:.2f} |"
                  for r in s["host_waits_by_caller"]]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return s


if __name__ == "__main__":
    main()
