"""Does a small MemSparseLM learn a registered task at short lengths, on CPU, through the training data path and the
eval path? The "simpler model on the same data" check before a GPU recipe is blamed or changed.

    python benchmarks/cpu_task_probe.py --task niah_multikey --tokenizer RUN/tokenizer --lengths 256,320 \
        --steps 1500 --eval-every 250 --out benchmarks/results/cpu_task_probe_multikey

Training rows come from `SyntheticTaskDataset` (what `memsparse-train` builds from a recipe's `synthetic:` entry:
prompt + answer + eos, `--loss answer` or `all`), batches of `--batch`, AdamW at `--lr` with a 5% warmup and cosine;
every `--eval-every` steps the held-out prompts (`--eval-lengths` x `--eval-depths` x `--eval-samples`, seeds
apart from training's) are decoded greedily by `memsparse.eval.harness.run_cells` (the path of memsparse-eval),
which also gives the teacher-forced answer-token accuracy. The model: `--dim`, `--depth`, `--heads` (kv heads half),
a dense budget and a `--window` of 512 tokens (longer than every prompt: all of it is in attention's reach),
no memory unless `--memory-layers`. `--distractors N` (niah_multikey): N distractor needles instead of 3.
`--first TASK:STEPS`: a two-step curriculum, the first STEPS of `--steps` on TASK's rows (e.g.
`niah_multikey_pair:2000` before `--task niah_multikey`), the rest on `--task`'s, under one learning-rate schedule;
each evaluation then also scores TASK (`eval_first` in the curve).
Writes task_probe.json (the arguments and the curve), task_probe.md and
task_probe.png (accuracy and tf_token_acc against steps) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from memsparse.eval.harness import EvalInputError, PeakMemory, parse_depths, parse_lengths, run_cells
from memsparse.eval.tasks import get_task
from memsparse.eval.tasks.niah_multikey import NiahMultiKey
from memsparse.train.module import WarmupCosine, param_groups
from memsparse.train.packing import SyntheticTaskDataset

from memsparse.config import ModelConfig
from memsparse.model import MemSparseLM
from memsparse.tokenizer import load_tokenizer

EVAL_SEED = 10_007  # held-out prompts: memsparse-eval's sample seeds from here, training's come from the dataset


def build(args, vocab: int) -> MemSparseLM:
    """The probe's model (MAC layout, dense budget; memory in `args.memory_layers`, none by default)."""
    torch.manual_seed(args.seed)
    heads = args.heads
    return MemSparseLM(ModelConfig(
        vocab_size=vocab, dim=args.dim, depth=args.depth, heads=heads, kv_heads=max(1, heads // 2),
        head_dim=args.dim // heads, mlp_hidden=args.dim * 11 // 4, block_size=32, segment=128, window=args.window,
        persistent_tokens=32, budget="dense", memory_layers=list(args.memory_layers)))


def evaluate(model, tok, task, args) -> dict:
    """{"<length>": {"accuracy", "tf_token_acc"}}: means over the eval depths' prompts."""
    out = {}
    model.eval()
    with torch.inference_mode():
        for n in args.eval_lengths:
            rows = run_cells(model, tok, task, n, args.eval_depths, args.eval_samples, EVAL_SEED,
                             torch.device("cpu"), PeakMemory(torch.device("cpu")), teacher_forced=True,
                             batch=len(args.eval_depths) * args.eval_samples)
            out[str(n)] = {"accuracy": round(sum(r["accuracy"] for r in rows) / len(rows), 4),
                           "tf_token_acc": round(sum(r["tf_token_acc"] for r in rows) / len(rows), 4)}
    model.train()
    return out


def make_task(args):
    """The registered task, or with `--distractors N` a niah_multikey of N distractor needles (3 registered)."""
    if args.distractors is None:
        return get_task(args.task)
    return NiahMultiKey(f"niah_multikey_{args.distractors}d", num_distractors=args.distractors)


def fit(args) -> dict:
    """Train and evaluate; returns {"args", "curve": [{step, loss, wall_s, eval[, eval_first]}]}."""
    tok, task = load_tokenizer(args.tokenizer), make_task(args)
    data = SyntheticTaskDataset(task, args.steps * args.batch, args.lengths, max(args.lengths), tok,
                                seed=args.seed, source=0, loss=args.loss)
    first, first_steps = (None, 0) if args.first is None else (get_task(args.first[0]), args.first[1])
    if first is not None:  # the curriculum's first rows: another source, so other draws than the target's (indices
        # past its length are the next epoch's draws, fresh samples: SyntheticTaskDataset varies them by epoch)
        first_data = SyntheticTaskDataset(first, first_steps * args.batch, args.lengths, max(args.lengths), tok,
                                          seed=args.seed, source=1, loss=args.loss)
    model = build(args, tok.vocab_size)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(max(1, args.steps // 20), args.steps, 0.1))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        src = first_data if step <= first_steps else data
        items = [src[i] for i in order[(step - 1) * args.batch: step * args.batch]]
        ids = torch.stack([it["input_ids"] for it in items])
        labels = torch.stack([it["labels"] for it in items])
        loss = model(ids, labels, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "loss": round(float(loss.detach()), 4), "wall_s": round(time.time() - t0, 1),
                   "eval": evaluate(model, tok, task, args)}
            if first is not None:
                row["eval_first"] = evaluate(model, tok, first, args)
            curve.append(row)
            print(json.dumps(row), flush=True)
    return {"args": {k: v for k, v in vars(args).items() if k != "out"}, "curve": curve}


def table(result: dict) -> str:
    lengths = list(result["curve"][0]["eval"]) if result["curve"] else []
    first = result["args"].get("first")
    cols = [("eval", n, f"{n}: exact / tf_token_acc") for n in lengths] + (
        [("eval_first", n, f"{first[0]} {n}: exact / tf_token_acc") for n in lengths] if first else [])
    head = ["step", "loss"] + [c[2] for c in cols] + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["curve"]:
        cells = [f"{r[k][n]['accuracy']:.2f} / {r[k][n]['tf_token_acc']:.2f}" for k, n, _ in cols]
        lines.append("| " + " | ".join([str(r["step"]), f"{r['loss']:.3f}", *cells, str(r["wall_s"])]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in result["curve"]]
    first = result["args"].get("first")
    for key, name in [("eval", result["args"]["task"])] + ([("eval_first", first[0])] if first else []):
        for n in (result["curve"][0][key] if result["curve"] else {}):
            line, = ax.plot(steps, [r[key][n]["accuracy"] for r in result["curve"]], marker="o",
                            label=f"{name} {n}: exact match")
            ax.plot(steps, [r[key][n]["tf_token_acc"] for r in result["curve"]], ls="--", color=line.get_color(),
                    label=f"{name} {n}: teacher-forced answer tokens")
    if first:
        ax.axvline(first[1], color="grey", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(-0.02, 1.02), title=f"{result['args']['task']} (CPU probe)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(text: str, name: str, ap) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{name} must be comma-separated integers, got {text!r}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="a registered task (memsparse.eval.tasks)")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a saved tokenizer directory (a run's export)")
    ap.add_argument("--lengths", default="256", help="training lengths in tokens (comma-separated)")
    ap.add_argument("--distractors", type=int, default=None,
                    help="niah_multikey only: this many distractor needles instead of the registered 3")
    ap.add_argument("--loss", choices=["answer", "all"], default="answer")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-lengths", default=None, help="held-out lengths (default: the largest training length)")
    ap.add_argument("--eval-depths", default="0,0.5,1")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--memory-layers", default="", help="comma-separated layers with a memory (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first", default=None, metavar="TASK:STEPS",
                    help="a curriculum: the first STEPS steps on this registered task's rows, then --task's")
    ap.add_argument("--out", default=None, help="directory for task_probe.json / .md / .png")
    args = ap.parse_args(argv)
    if args.first is not None:
        name, _, n = args.first.rpartition(":")
        if not name or not n.isdigit() or not 0 < int(n) < args.steps:
            ap.error(f"--first must be TASK:STEPS with 0 < STEPS < --steps ({args.steps}), got {args.first!r}")
        args.first = [name, int(n)]
    args.lengths = ints(args.lengths, "--lengths", ap)
    args.memory_layers = ints(args.memory_layers, "--memory-layers", ap)
    try:  # memsparse-eval's own parsing of its grid (training lengths keep their repeats: they weight the draws)
        args.eval_lengths = parse_lengths(args.eval_lengths) if args.eval_lengths else [max(args.lengths or [0])]
        args.eval_depths = parse_depths(args.eval_depths)
    except EvalInputError as e:
        ap.error(f"--eval-lengths / --eval-depths: {e}")
    if min(args.steps, args.batch, args.eval_every, args.eval_samples) < 1 or args.lr <= 0:
        ap.error("--steps, --batch, --eval-every and --eval-samples must be >= 1, --lr > 0")
    if not args.lengths or max(args.lengths + args.eval_lengths) > args.window:
        ap.error(f"--lengths and --eval-lengths must be given and <= --window ({args.window}): the probe asks "
                 "whether attention learns the task with the whole prompt in reach")
    if args.heads < 1 or args.dim % (2 * args.heads):
        ap.error(f"--dim ({args.dim}) must be a multiple of 2 x --heads ({args.heads}): an even head width")
    if args.distractors is not None and (args.task != "niah_multikey" or args.distractors < 0):
        ap.error(f"--distractors needs --task niah_multikey and a count >= 0, got {args.task} {args.distractors}")
    torch.set_num_threads(args.threads)
    try:
        make_task(args)
        if args.first is not None:
            get_task(args.first[0])
        result = fit(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        ap.error(str(e).strip("'\""))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "task_probe.json").write_text(json.dumps(result, indent=1))
        (out / "task_probe.md").write_text(f"`python benchmarks/cpu_task_probe.py {' '.join(argv or sys.argv[1:])}`"
                                           f"\n\n{table(result)}\n")
        plot(result, out / "task_probe.png")
    print(table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
