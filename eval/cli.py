"""`memsparse-eval`: long-context retrieval of a checkpoint over tasks x lengths x depths, with sweeps.

    memsparse-eval --checkpoint runs/x/export --tasks passkey,niah_single --lengths 1k,4k,16k,64k,256k,1m \
        --depths 0,0.25,0.5,0.75,1 --samples 4 --out eval_out [--budget-policy top_p:p=0.9,min=2] \
        [--consolidation schedule:a=1,n_max=8] [--sweep 'budget=dense;fixed:8;top_p:p=0.9'] [--window 16k] \
        [--device cuda]

Writes results.json, results.csv, heatmap_<task>.png (and sweep_<kind>.png) into --out and logs the same to
W&B (offline unless WANDB_MODE / WANDB_API_KEY say otherwise). Bad input fails before the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .harness import (
    CSV_COLUMNS,
    EvalInputError,
    EvalPlan,
    check_plan,
    environment,
    format_length,
    load_checked_tokenizer,
    parse_budget,
    parse_consolidation,
    parse_depths,
    parse_length,
    parse_lengths,
    parse_sweep,
    parse_tasks,
    parse_window,
    resolve_checkpoint,
    resolve_device,
    run_eval,
    summarize,
    write_results,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memsparse-eval",
        description="Long-context retrieval eval of a memsparse checkpoint (streaming: flat memory at any length).",
        epilog="Lengths: plain integers or binary k/m suffixes (1k = 1024, 64k = 65536, 1m = 1048576). "
               "Quote sweeps in the shell: --sweep 'budget=dense;fixed:8'.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="directory with config.json + model.safetensors (MemSparseLM.save_pretrained), or a "
                        "memsparse-train .ckpt file (exported on the fly to a temporary directory)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir or 'byte' (default: the checkpoint dir, else its tokenizer/ subdir, else byte)")
    p.add_argument("--tasks", default="passkey,niah_single", help="comma-separated task names, or 'all'")
    p.add_argument("--lengths", default="1k,4k,16k", help="comma-separated prompt lengths in tokens (1k = 1024)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=1, help="samples per (task, length, depth) cell")
    p.add_argument("--batch", type=int, default=1,
                   help="stream up to this many prompts together: a cell's samples, and beyond --samples whole cells "
                        "of one task and length (the same results up to float rounding, fewer launches; peak memory "
                        "is then that of what ran together)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--budget-policy", default=None,
                   help="override the attention budget: dense | fixed:K | length_scaled:c=12,min_tokens=256 | "
                        "top_p:p=0.9,min=2,max=64")
    p.add_argument("--consolidation", default=None,
                   help="override consolidation: off | fixed:N | schedule:a=1,n_max=8 "
                        "(+ replay=segment|surprising, replay_tokens=K)")
    p.add_argument("--window", default=None,
                   help="attention window in tokens for this run (1k = 1024), a multiple of the model's segment "
                        "(default: the checkpoint's): lets the budget policies choose among more key blocks; a "
                        "window the model was not trained with is outside its training distribution")
    p.add_argument("--memory-writes", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-memory-writes: nothing evicted is written to the memory (an ablation of what it carries)")
    p.add_argument("--sweep", default=None,
                   help="budget=SPEC1;SPEC2;... or consolidation=off;fixed:1;... : one combined table + line plot")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="stream prompts through CUDA graphs (memsparse.cuda_graph.GraphedStream; same results, "
                        "~10x faster prefill). Default: on when the device is CUDA")
    p.add_argument("--seed", type=int, default=0, help="base seed of the generated samples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="log to Weights & Biases (offline unless WANDB_MODE/WANDB_API_KEY configure online)")
    p.add_argument("--wandb-project", default="memsparse-eval")
    p.add_argument("--wandb-name", default=None, help="W&B run name (default: checkpoint dir name + time)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    p.add_argument("--token-progress", default="16k",
                   help="a second bar counts the prompt tokens inside each sample at least this long (1k = 1024; "
                        "0: never); shown only with --progress and when stderr is a terminal")
    return p


def prepare(args: argparse.Namespace):
    """Validate everything cheap (no weights loaded): (plan, checkpoint, tokenizer, device)."""
    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    if args.samples < 1:
        raise EvalInputError(f"--samples must be >= 1, got {args.samples}")
    if args.batch < 1:
        raise EvalInputError(f"--batch must be >= 1, got {args.batch}")
    budget = parse_budget(args.budget_policy) if args.budget_policy is not None else None
    cons = args.consolidation
    if cons is not None:
        parse_consolidation(cons)
    kind, specs = parse_sweep(args.sweep) if args.sweep else (None, [])
    if kind == "budget" and budget is not None:
        raise EvalInputError("--sweep budget=... and --budget-policy conflict: give one")
    if kind == "consolidation" and cons is not None:
        raise EvalInputError("--sweep consolidation=... and --consolidation conflict: give one")
    if args.threads is not None and args.threads < 1:
        raise EvalInputError(f"--threads must be >= 1, got {args.threads}")
    if str(args.token_progress).strip() not in ("0", ""):
        try:
            parse_length(args.token_progress)
        except EvalInputError as e:
            raise EvalInputError(f"--token-progress: {e}") from None
    ckpt = resolve_checkpoint(args.checkpoint, args.tokenizer)
    window = None
    if args.window is not None:
        from memsparse.config import ModelConfig

        seg = ckpt.config.get("segment", ModelConfig.segment)
        # a malformed segment fails when the model is loaded; the window is checked against it again in run_eval
        window = parse_window(args.window, seg) if isinstance(seg, int) and seg > 0 else parse_length(args.window)
    tokenizer = load_checked_tokenizer(ckpt)
    check_plan(tasks, lengths, tokenizer)
    device = resolve_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise EvalInputError(f"--cuda-graph needs a CUDA device, but the device is {device}")
    plan = EvalPlan(tasks, lengths, depths, args.samples, args.seed, budget, cons, kind, specs, window, args.batch)
    return plan, ckpt, tokenizer, device


def token_progress(args: argparse.Namespace) -> int | None:
    """The prompt length from which a token-level bar is shown: None when --no-progress, `--token-progress 0`, or
    stderr is not a terminal (a log file gets no bar redraws)."""
    if not args.progress or str(args.token_progress).strip() in ("0", "") or not sys.stderr.isatty():
        return None
    return parse_length(args.token_progress)


def tokenizer_source(ckpt) -> str:
    """Where the tokenizer came from, as recorded: a `.ckpt`'s own tokenizer is named by the `.ckpt`, not by the
    temporary export directory."""
    src = ckpt.tokenizer_source
    if ckpt.exported_from is not None and src.startswith(str(ckpt.path)):
        return str(ckpt.exported_from.resolve())
    return src


def wandb_mode() -> str:
    """WANDB_MODE if set, else online when an API key is configured, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def log_wandb(args, out_dir: Path, rows: list[dict], summary: list[dict], meta: dict, images: list[Path]) -> str | None:
    """Log the results table, summary, images and config to W&B; failures warn and never lose the files."""
    try:
        import wandb

        mode = wandb_mode()
        name = args.wandb_name or f"{Path(args.checkpoint).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = wandb.init(project=args.wandb_project, name=name, dir=str(out_dir), mode=mode, job_type="eval",
                         config={k: v for k, v in meta.items() if k != "environment"}, reinit="finish_previous")
        table = wandb.Table(columns=CSV_COLUMNS, data=[[r.get(c) for c in CSV_COLUMNS] for r in rows])
        scols = ["sweep_value", "task", "length", "accuracy", "tf_token_acc", "tf_exact", "tf_stop",
                 "attn_flops_per_token", "consolidation_passes"]
        stable = wandb.Table(columns=scols, data=[[s.get(c) for c in scols] for s in summary])
        run.log({"results": table, "summary": stable, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images}})
        for s in summary:
            suffix = f"/{s['task']}/{format_length(s['length'])}"
            if s["sweep_value"] is not None:
                suffix += f"/{s['sweep_value']}"
            for metric in ("accuracy", "tf_token_acc", "tf_exact", "tf_stop"):
                if s.get(metric) is not None:
                    run.summary[metric + suffix] = s[metric]
        run_dir = getattr(run, "dir", None)
        run.finish()
        if hasattr(wandb, "teardown"):
            wandb.teardown()  # drop the per-process settings so a later run in this process starts clean
        return run_dir
    except Exception as e:  # W&B is a mirror of the files on disk: never fail the eval over it
        print(f"memsparse-eval: warning: W&B logging failed ({type(e).__name__}: {e}); results are in {out_dir}",
              file=sys.stderr)
        return None


def print_summary(summary: list[dict]) -> None:
    """Mean over depths per (setting, task, length): decoded accuracy, and beside it the teacher-forced exact match
    and token accuracy at the answer positions, and how often the model ends a complete answer (`tf_stop`). High
    teacher-forced with low decoded accuracy: the model does not stop after the answer (low tf_stop: the decoded
    answer runs on, "555443" for 55544) or the decoding path differs from training; both low: the model did not
    learn the task."""
    for s in summary:
        setting = f"[{s['sweep_value']}] " if s["sweep_value"] is not None else ""
        flops = f"  attn FLOPs/token {s['attn_flops_per_token']:.3g}" if s["attn_flops_per_token"] else ""
        tf = ""
        if s.get("tf_exact") is not None:
            tf = f"  tf_exact {s['tf_exact']:.3f}  tf_token_acc {s['tf_token_acc']:.3f}"
            if s.get("tf_stop") is not None:
                tf += f"  tf_stop {s['tf_stop']:.3f}"
        print(f"{setting}{s['task']:<22} {format_length(s['length']):>6}  acc {s['accuracy']:.3f}{tf}"
              f"  passes {s['consolidation_passes']}{flops}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `memsparse-eval`; returns 0 on success (argparse exits with 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan, ckpt, tokenizer, device = prepare(args)
    except EvalInputError as e:
        parser.error(str(e))

    import torch
    from memsparse.eval.plots import write_plots

    from memsparse.model import MemSparseLM

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = MemSparseLM.from_pretrained(ckpt.path, map_location="cpu")
    except (OSError, ValueError) as e:
        parser.error(f"cannot load checkpoint {ckpt.path}: {e}")
    model = model.to(device).eval()
    if not args.memory_writes:
        if not model.config.memory_layer_ids():
            parser.error("--no-memory-writes: the checkpoint has no memory layers")
        model.set_memory_writes(False)

    model_window = model.config.window
    if plan.window is not None and plan.window != model_window:
        print(f"memsparse-eval: attention window {plan.window} tokens (the checkpoint's: {model_window}): outside "
              "the model's training distribution", file=sys.stderr)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cuda_graph = device.type == "cuda" if args.cuda_graph is None else args.cuda_graph
    rows = run_eval(model, tokenizer, plan, device, progress=args.progress, cuda_graph=cuda_graph,
                    token_progress=token_progress(args))
    meta = {
        "checkpoint": str((ckpt.exported_from or ckpt.path).resolve()), "tokenizer": tokenizer_source(ckpt),
        "device": str(device),
        "cuda_graph": cuda_graph,
        "tasks": plan.tasks, "lengths": plan.lengths, "depths": plan.depths, "samples": plan.samples,
        "batch": plan.batch, "seed": plan.seed, "budget_policy": plan.budget, "consolidation": plan.consolidation,
        "model_budget": model.config.budget, "memory_writes": args.memory_writes,
        "window": model_window if plan.window is None else plan.window, "model_window": model_window,
        "sweep_kind": plan.sweep_kind, "sweep_specs": plan.sweep_specs,
        "mem_measure": rows[0]["mem_measure"] if rows else None, "model_config": ckpt.config,
        "total_wall_s": time.time() - t0, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        "argv": list(sys.argv[1:] if argv is None else argv), "environment": environment(),
    }
    summary = summarize(rows)
    jpath, cpath = write_results(out_dir, rows, meta)
    images = write_plots(rows, summary, out_dir, plan.sweep_kind)
    print_summary(summary)
    print(f"wrote {jpath}, {cpath} and {len(images)} plot(s) to {out_dir}")
    if args.wandb:
        run_dir = log_wandb(args, out_dir, rows, summary, meta, images)
        if run_dir:
            print(f"W&B ({wandb_mode()}): {run_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
