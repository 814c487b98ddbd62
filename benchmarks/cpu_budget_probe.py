"""Must the attention budget adapt? A CPU probe at toy scale (issue 19): models trained with a `fixed`, a
`length_scaled` and a `top_p` budget at about equal attention FLOPs per token, and a `dense` model as the ceiling:
does the adaptive one retrieve better, and where (short or long prompts)?

The model has no memory (`memory_layers=[]`) and an attention window that covers the longest prompt, so only the
budget limits what a query sees: 2 layers, dim 64, 4 heads (2 kv heads) of 16, blocks of 8 tokens, one block of
persistent tokens, byte tokens. The task is key-value recall: `--pairs` pairs (default one: a passkey-like lookup;
four were learned by no model, dense included, in 2,500 steps) "3=Q;" (a digit names the key, an
upper-case letter is its value; each pair inside one attention block) lie in random lower-case filler, then one
block "?3333333" asks for one of them and the next block starts with "=", whose output must be the value (greedy
argmax, one token; chance 1/20). The question fills a whole block because a query block's key blocks are chosen
with the mean query of the block before it (`causal_selection_queries`).

Every model is trained the same way (same samples, seed, steps, lr; loss on the answer token; each step's prompt
length drawn from `--train-lengths`) under its own `--budgets` spec, then scored under that budget on the same
`--samples` prompts per `--eval-lengths` length. The budgets' cost is the model's own statistic: `attn_kept_blocks`
of `MemSparseLM.forward` (key blocks kept per query block, mean over query blocks, kv heads and layers; the sink
and the diagonal block count) and memsparse-eval's attention FLOPs per token (`AttentionStats`: kept blocks x 4 x
block x head_dim x heads x layers). It is measured on a fixed set of training prompts (`--calib-samples` per
training length, weighted by tokens) before training and after it (top_p's count follows the scores, so it moves
as the model learns), and on each training batch (the curve). The default budgets were calibrated so that the three
sparse ones keep about the same number of blocks on the training prompts (see `matching` in the JSON).

    python benchmarks/cpu_budget_probe.py --out benchmarks/results/cpu_budget_probe_2026-12-06

writes budget_probe.json (config, per model: training curve, kept blocks before / during / after training,
accuracy and kept blocks / FLOPs per token per eval length), budget_probe.md (the tables) and budget_probe.png
(accuracy against prompt length, one line per budget; kept blocks per query block against length). `--name`
changes the files' stem.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import torch
from memsparse.eval.harness import AttentionStats, overrides
from memsparse.kernels.budget import parse_policy

from memsparse.config import ModelConfig
from memsparse.model import MemSparseLM

_spec = importlib.util.spec_from_file_location("cpu_memory_probe", Path(__file__).with_name("cpu_memory_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

VALUES = probe.KEYS  # the 20 upper-case letters a value is drawn from
NAMES = "0123456789"  # a key's name
FILLER = "abcdefghijklmnopqrstuvwxyz "
BLOCK, SEGMENT, PERSISTENT = 8, 64, 8
DENSE = "dense"
# on the training prompts (64-256 tokens, blocks of 8) before training, fixed:5 keeps 4.70 blocks per query block,
# length_scaled c=3.5 4.81; top_p's count follows the learned scores (bounded to 2-8 blocks): two p bracket it
BUDGETS = (DENSE, "fixed:5", "length_scaled:c=3.5,min_tokens=0", "top_p:p=0.5,min=2,max=8",
           "top_p:p=0.8,min=2,max=8")


def sample(g: torch.Generator, length: int, pairs: int, block: int = BLOCK) -> tuple[list[int], int, int]:
    """(ids of `length` tokens, the answer's id, the index of the "=" whose output is the answer): `pairs` pairs
    "N=V;" each inside its own block among the blocks before the question, at a random offset, in random filler;
    the second-to-last block is "?" + the asked name repeated, the last "=" + the value + filler."""
    nb = length // block
    text = [FILLER[i] for i in torch.randint(len(FILLER), (length,), generator=g).tolist()]
    where = torch.randperm(nb - 2, generator=g)[:pairs].tolist()
    names = torch.randperm(len(NAMES), generator=g)[:pairs].tolist()
    vals = torch.randint(len(VALUES), (pairs,), generator=g).tolist()
    for b, n, v in zip(where, names, vals):
        off = b * block + int(torch.randint(block - 3, (1,), generator=g))
        text[off:off + 4] = [NAMES[n], "=", VALUES[v], ";"]
    ask = int(torch.randint(pairs, (1,), generator=g))
    qb = (nb - 2) * block
    text[qb:qb + block] = ["?"] + [NAMES[names[ask]]] * (block - 1)
    text[qb + block:qb + block + 2] = ["=", VALUES[vals[ask]]]
    return [ord(c) for c in text], ord(VALUES[vals[ask]]), qb + block


def batch(g: torch.Generator, n: int, length: int, pairs: int, block: int = BLOCK):
    """n samples: (ids (n, length), labels (the answer at its "="; -100 elsewhere), [([answer], index)] as
    `cpu_memory_probe.key_hits` scores them)."""
    rows = [sample(g, length, pairs, block) for _ in range(n)]
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.full_like(ids, -100)
    for i, (_, a, q) in enumerate(rows):
        labels[i, q] = a
    return ids, labels, [([a], q) for _, a, q in rows]


def build(budget: str, seed: int, window: int, persistent: int = PERSISTENT) -> MemSparseLM:
    """The probe's model: no memory, a window of `window` tokens (the longest prompt: only the budget limits what a
    query sees), `budget` as its attention budget, `persistent` persistent tokens (a multiple of the block: that
    many sink blocks, always kept)."""
    torch.manual_seed(seed)
    return MemSparseLM(ModelConfig(
        vocab_size=probe.VOCAB, dim=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_hidden=128, block_size=BLOCK,
        segment=SEGMENT, window=window, persistent_tokens=persistent, budget=budget, local_blocks=1,
        memory_layers=[]))


def window_for(lengths) -> int:
    """The smallest window (a multiple of the segment) that covers the longest prompt."""
    return -(-max(lengths) // SEGMENT) * SEGMENT


def calibration_set(lengths, n: int, pairs: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """`n` training-distribution prompts per length (the same for every model: seeded by `seed`)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return [batch(g, n, length, pairs) for length in lengths]


@torch.no_grad()
def kept(model: MemSparseLM, batches, chunk: int = 32) -> dict:
    """Mean kept key blocks per query block, kept fraction, and attention FLOPs per token over `batches` (each
    (ids, ...); weighted by tokens), as the model's forward reports them (`attn_kept_blocks`,
    `attn_kept_fraction`) and memsparse-eval turns them into FLOPs (`AttentionStats.per_query_flops`); with the
    exact match of the answers."""
    was = model.training
    model.eval()
    blocks = frac = tokens = right = n = 0.0
    for ids, _, ans in batches:
        for i in range(0, ids.shape[0], chunk):
            out = model(ids[i:i + chunk])
            w = ids[i:i + chunk].numel()
            blocks += float(out.stats["attn_kept_blocks"]) * w
            frac += float(out.stats["attn_kept_fraction"]) * w
            tokens += w
            right += sum(all(h) for h in probe.key_hits(out.logits, ans[i:i + chunk]))
            n += len(ans[i:i + chunk])
    model.train(was)
    kb = blocks / tokens
    return {"attn_kept_blocks": kb, "attn_kept_fraction": frac / tokens,
            "attn_flops_per_token": kb * AttentionStats(model).per_query_flops, "accuracy": right / n, "n": int(n)}


def matching(runs: list[dict], when: str) -> dict:
    """Each sparse budget's kept blocks (`kept_<when>`) relative to the mean over the sparse budgets."""
    sparse = {r["budget"]: r[f"kept_{when}"]["attn_kept_blocks"] for r in runs if r["budget"] != DENSE}
    if not sparse:
        return {}
    mean = sum(sparse.values()) / len(sparse)
    return {"mean_kept_blocks": mean, "relative": {b: v / mean - 1 for b, v in sparse.items()},
            "max_abs_relative": max(abs(v / mean - 1) for v in sparse.values())}


def fit(budget: str, args, calib) -> dict:
    """Train one model under `budget` and score it: {"budget", "kept_before", "curve", "kept_during",
    "kept_after", "eval", "train_wall_s"}."""
    model = build(budget, args.seed, window_for(args.train_lengths + args.eval_lengths), args.persistent)
    before = kept(model, calib, args.chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)  # the same samples for every model
    t0, curve, during, during_w = time.time(), [], 0.0, 0
    for step in range(1, args.steps + 1):
        length = args.train_lengths[int(torch.randint(len(args.train_lengths), (1,), generator=g))]
        ids, labels, _ = batch(g, args.batch, length, args.pairs)
        out = model(ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        kb = float(out.stats["attn_kept_blocks"])
        during, during_w = during + kb * ids.numel(), during_w + ids.numel()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "length": length, "loss": float(out.loss.detach()), "attn_kept_blocks": kb,
                   "wall_s": round(time.time() - t0, 1)}
            curve.append(row)
            print(f"{budget:>34}", json.dumps(row), file=sys.stderr, flush=True)
    train_s = time.time() - t0
    after = kept(model, calib, args.chunk)
    rows = []
    for length in args.eval_lengths:
        ev = kept(model, [eval_batch(args, length)], args.chunk)
        rows.append({"length": length, **ev})
        print(f"{budget:>34}", json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sweep = []
    for spec in args.sweep:  # the trained model scored under other budgets (inference only), same prompts
        with overrides(model, budget=spec):
            for length in args.eval_lengths:
                sweep.append({"budget": spec, "length": length, **kept(model, [eval_batch(args, length)], args.chunk)})
                print(f"{budget:>34} under {spec}", json.dumps(sweep[-1]), file=sys.stderr, flush=True)
    return {"budget": budget, "sweep": sweep, "policy": parse_policy(budget).spec(), "kept_before": before,
            "curve": curve,
            "kept_during": {"attn_kept_blocks": during / during_w,
                            "attn_flops_per_token": during / during_w * AttentionStats(model).per_query_flops},
            "kept_after": after, "eval": rows, "train_wall_s": round(train_s, 1),
            "eval_wall_s": round(time.time() - t0 - train_s, 1)}


def eval_batch(args, length: int):
    """The eval prompts of one length: the same for every model and every budget it is scored under."""
    return batch(torch.Generator().manual_seed(args.seed + 100_003 + length), args.samples, length, args.pairs)


def sweep_results(result: dict) -> dict:
    """The `--sweep` scores as a memsparse-eval budget-sweep results.json (`benchmarks/plot_budget_pareto.py` reads
    it): one cell per (trained model, length, budget), the task named after the model's training budget, depth 0
    (the probe places its key at random)."""
    cells = []
    for run in result["runs"]:
        task = "recall_trained_" + re.sub(r"[^A-Za-z0-9.]+", "_", run["budget"]).strip("_")
        for r in run["sweep"]:
            cells.append({"task": task, "length": r["length"], "depth": 0.0, "n": r["n"], "accuracy": r["accuracy"],
                          "attn_kept_blocks": r["attn_kept_blocks"], "attn_kept_fraction": r["attn_kept_fraction"],
                          "attn_flops_per_token": r["attn_flops_per_token"], "sweep_kind": "budget",
                          "sweep_value": r["budget"], "budget": r["budget"]})
    return {"cells": cells, "meta": {"source": "benchmarks/cpu_budget_probe.py --sweep", "args": result["args"]}}


def table(result: dict) -> str:
    """Markdown: accuracy per budget and eval length (kept blocks per query block in brackets), then the matching
    of the budgets' cost on the training prompts."""
    runs, lengths = result["runs"], result["args"]["eval_lengths"]
    lines = ["| budget | " + " | ".join(f"acc @ {n} (kept blocks)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for r in runs:
        cells = {e["length"]: e for e in r["eval"]}
        lines.append(f"| {r['budget']} | " + " | ".join(
            f"{cells[n]['accuracy']:.2f} ({cells[n]['attn_kept_blocks']:.1f})" for n in lengths) + " |")
    lines += ["", f"Chance {result['chance']:.2f}; {result['args']['samples']} prompts per length, the same for every "
              f"model; trained on lengths {result['args']['train_lengths']}.", "",
              "| budget | kept blocks before training | during (training batches) | after training | "
              "attn FLOPs/token after | final loss | train wall s |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['budget']} | {r['kept_before']['attn_kept_blocks']:.2f} | "
                     f"{r['kept_during']['attn_kept_blocks']:.2f} | {r['kept_after']['attn_kept_blocks']:.2f} | "
                     f"{r['kept_after']['attn_flops_per_token']:.0f} | {r['curve'][-1]['loss']:.3f} | "
                     f"{r['train_wall_s']:.0f} |")
    for when in ("before", "during", "after"):
        m = result["matching"].get(when)
        if m:
            lines.append("")
            lines.append(f"Sparse budgets' kept blocks {when} training, relative to their mean "
                         f"({m['mean_kept_blocks']:.2f}): " +
                         ", ".join(f"{b} {v:+.1%}" for b, v in m["relative"].items()) + ".")
    for r in runs:
        if r.get("sweep"):
            cells = {(e["budget"], e["length"]): e for e in r["sweep"]}
            lines += ["", f"Trained with `{r['budget']}`, scored under other budgets (`--sweep`, inference only, the "
                      "same prompts): accuracy (kept blocks per query block)", "",
                      "| scored under | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
            for spec in dict.fromkeys(e["budget"] for e in r["sweep"]):
                lines.append(f"| {spec} | " + " | ".join(
                    f"{cells[spec, n]['accuracy']:.2f} ({cells[spec, n]['attn_kept_blocks']:.1f})" for n in lengths)
                    + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(result["runs"]):
        xs = [e["length"] for e in r["eval"]]
        style = dict(color=f"C{i}", marker="o", ls="--" if r["budget"] == DENSE else "-", label=r["budget"])
        a1.plot(xs, [e["accuracy"] for e in r["eval"]], **style)
        a2.plot(xs, [e["attn_kept_blocks"] for e in r["eval"]], **style)
    lo, hi = min(result["args"]["train_lengths"]), max(result["args"]["train_lengths"])
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.axvspan(lo, hi, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
    a1.axhline(result["chance"], color="0.5", lw=0.8, ls=":")
    a1.set_ylim(-0.03, 1.03)
    a1.set_ylabel("exact match (greedy)")
    a1.set_title("recall of one of the key-value pairs (shaded: training lengths)", fontsize=9)
    a2.set_yscale("log", base=2)
    a2.set_ylabel("kept key blocks per query block (mean)")
    a2.set_title(f"attention cost (blocks of {BLOCK} tokens; FLOPs/token = blocks x "
                 f"{result['per_query_flops']:.0f})", fontsize=9)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lengths(text: str, what: str, ap: argparse.ArgumentParser, pairs: int) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(n % BLOCK or n < (pairs + 2) * BLOCK for n in out):
        _fail(ap, f"{what} must be comma-separated multiples of {BLOCK} of at least {(pairs + 2) * BLOCK} tokens "
                  f"(--pairs {pairs} + the question), got {text!r}")
    return out


def _fail(ap: argparse.ArgumentParser, msg: str) -> None:
    """A bad argument: one line on stderr, status 2 (no usage block, no traceback)."""
    print(f"{ap.prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="cpu_budget_probe.py", description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default=";".join(BUDGETS),
                    help="budget specs separated by ';' (dense | fixed:k | length_scaled:... | top_p:...)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--pairs", type=int, default=1,
                    help="key-value pairs a prompt (<= 10; 4 at 2,500 steps: no model learned the lookup)")
    ap.add_argument("--train-lengths", default="64,128,192,256",
                    help="a training step's prompt length is drawn from these")
    ap.add_argument("--eval-lengths", default="128,256,512,1024")
    ap.add_argument("--samples", type=int, default=200, help="prompts per eval length (the same for every model)")
    ap.add_argument("--calib-samples", type=int, default=16,
                    help="prompts per training length on which kept blocks are measured before / after training")
    ap.add_argument("--eval-every", type=int, default=100, help="a curve row every N steps")
    ap.add_argument("--chunk", type=int, default=25, help="prompts per forward when measuring")
    ap.add_argument("--persistent", type=int, default=PERSISTENT,
                    help=f"persistent tokens, a multiple of {BLOCK} (0: no sink block; top_p's mass then has no "
                         "forced share but the diagonal's)")
    ap.add_argument("--sweep", default="",
                    help="budget specs separated by ';': every trained model is also scored under each (inference "
                         "only, the same prompts); written as <name>_sweep.json for benchmarks/plot_budget_pareto.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="budget_probe")
    args = ap.parse_args(argv)
    args.budgets = [b.strip() for b in args.budgets.split(";") if b.strip()]
    if not args.budgets:
        _fail(ap, "--budgets names no budget")
    for b in args.budgets:
        try:
            parse_policy(b)
        except ValueError as e:
            _fail(ap, f"--budgets: {b!r}: {e}")
    args.sweep = [b.strip() for b in args.sweep.split(";") if b.strip()]
    for b in args.sweep:
        try:
            parse_policy(b)
        except ValueError as e:
            _fail(ap, f"--sweep: {b!r}: {e}")
    if args.persistent < 0 or args.persistent % BLOCK:
        _fail(ap, f"--persistent must be a multiple of {BLOCK} >= 0, got {args.persistent}")
    if not 1 <= args.pairs <= len(NAMES):
        _fail(ap, f"--pairs must be 1-{len(NAMES)}, got {args.pairs}")
    for name in ("steps", "batch", "samples", "calib_samples", "eval_every", "chunk", "threads"):
        if getattr(args, name) < 1:
            _fail(ap, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.train_lengths = _lengths(args.train_lengths, "--train-lengths", ap, args.pairs)
    args.eval_lengths = _lengths(args.eval_lengths, "--eval-lengths", ap, args.pairs)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    calib = calibration_set(args.train_lengths, args.calib_samples, args.pairs, args.seed)
    runs = [fit(b, args, calib) for b in args.budgets]
    model = build(DENSE, args.seed, window_for(args.train_lengths + args.eval_lengths), args.persistent)
    result = {"args": vars(args), "config": dataclasses.asdict(model.config), "chance": 1 / len(VALUES),
              "per_query_flops": AttentionStats(model).per_query_flops, "runs": runs,
              "matching": {w: matching(runs, w) for w in ("before", "during", "after")},
              "wall_s": round(time.time() - t0, 1), "torch": torch.__version__, "device": "cpu",
              "threads": args.threads}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{args.name}.md").write_text(table(result))
        plot(result, out / f"{args.name}.png")
        if args.sweep:
            (out / f"{args.name}_sweep.json").write_text(json.dumps(sweep_results(result), indent=2))
    return result


if __name__ == "__main__":
    main()
