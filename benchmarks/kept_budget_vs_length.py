"""Tokens a budget policy keeps per query as the visible context grows, with a least-squares fit of c * sqrt(L).

    python benchmarks/kept_budget_vs_length.py --checkpoint outputs/retrieval_small_long_more/export \\
        --budget 'top_p:p=0.5;top_p:p=0.8;top_p:p=0.95' --lengths 1k,2k,4k,8k,16k,32k,64k,128k --out RUN/kept
    python benchmarks/kept_budget_vs_length.py --tiny --lengths 256,512,1k --device cpu --out /tmp/kept   # CPU check

How it is measured (the model's own numbers, nothing re-implemented): per sample, one prompt of the longest length
(memsparse-eval's task generator, `--task`, or `--task random` token ids) is streamed through `MemSparseLM.stream`
one segment at a time under the budget (`memsparse.eval.harness.overrides`). Each layer's `_attend` adds the kept
key blocks of its query blocks to the stream's running statistics (`attn_kept_blocks`, `attn_kept_fraction`: the
same numbers memsparse-eval's AttentionStats turns into `attn_kept_fraction` / `attn_flops_per_token`); the
difference of those statistics across one segment is that segment's mean over its query blocks, kv heads and
layers. Kept tokens per query = kept blocks * block_size (whole blocks: the sinks and the diagonal block count in
full, as the attention FLOPs do). The visible context of a query block is what the selection counts
(`select_blocks`' visible_tokens): the persistent tokens plus the tokens from the window start to the block's end;
a segment's value is its mean over the segment's query blocks. At length L the point is the segment ending at L
(its queries see about L tokens); every other segment is kept as the dense curve of the JSON and the plot.
Each length is the prefix of the longest prompt (the question sits at the end of the longest only).

The window: the model's attention sees at most persistent + window + segment tokens (832 for the retrieval
recipes: window 512, segment 256, 64 persistent), whatever the prompt length. `--window full` (default) lifts the
window at inference to the longest length, so that the visible context grows with L as the claim needs; the
model never attended that far in training (its scores there are out of its training distribution) and nothing is
evicted into the memory then (the memory stays at its initial weights). `--window native` keeps the checkpoint's
window: the visible context then stops growing at window + segment + persistent, and so does any budget.
`--window N` sets N tokens (a multiple of the segment).

Fit (`fit_sqrt`): c = argmin sum_i (kept_i - c * sqrt(L_i))^2 = sum kept_i sqrt(L_i) / sum L_i over the points of
`--lengths` at or above `--fit-min-length`, with L_i the mean visible tokens of the point; reported with the
relative errors (kept_i - c sqrt(L_i)) / kept_i (root mean square and largest) and, for comparison, a free power
law kept = a * L^b fitted in log-log space (b = 0.5 is the c * sqrt(L) shape, b = 1 a constant kept fraction).

Writes into --out: kept_budget.json (meta, points, per-segment curves, fits), kept_budget.csv (points with the fit)
and kept_budget.png (kept tokens and kept fraction against visible context, log-log, the fits dashed, and the
Sparse Frontier's kept tokens at 16K/32K/64K, about 12 * sqrt(L), for reference when the points reach 8K).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

# The Sparse Frontier (arXiv 2504.17768), as quoted in memsparse.kernels.budget: kept tokens at ~0.2 relative error
SPARSE_FRONTIER = {16384: 1600, 32768: 2200, 65536: 3300}


def fit_sqrt(visible: list[float], kept: list[float]) -> dict:
    """Least-squares c of kept ~ c * sqrt(visible), its relative errors, and a free power law a * visible**b."""
    if len(visible) != len(kept) or not visible:
        raise ValueError("fit_sqrt needs as many kept values as visible lengths, at least one")
    if any(v <= 0 for v in visible) or any(k <= 0 for k in kept):
        raise ValueError("fit_sqrt needs positive visible lengths and kept counts")
    c = sum(k * math.sqrt(v) for v, k in zip(visible, kept)) / sum(visible)
    rel = [(k - c * math.sqrt(v)) / k for v, k in zip(visible, kept)]
    out = {"c": c, "rms_rel_err": math.sqrt(sum(r * r for r in rel) / len(rel)), "max_abs_rel_err": max(map(abs, rel)),
           "n_points": len(visible), "power_a": None, "power_b": None}
    if len(visible) >= 2 and len(set(visible)) >= 2:
        xs, ys = [math.log(v) for v in visible], [math.log(k) for k in kept]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out.update(power_a=math.exp(my - b * mx), power_b=b)
    return out


def segment_visible_tokens(seg_start: int, segment: int, block_size: int, window: int, persistent: int) -> float:
    """Mean over the segment's query blocks of the tokens `select_blocks` counts as visible (one document):
    persistent + block end - window start, the window starting at max(0, seg_start - window)."""
    win_start = max(0, seg_start - window)
    ends = range(seg_start + block_size, seg_start + segment + 1, block_size)
    return sum(persistent + e - win_start for e in ends) / len(ends)


@contextlib.contextmanager
def window_override(model, window: int | None):
    """Set the attention window of `model` (every block shares its config) for the duration; None: unchanged."""
    cfgs = list({id(c): c for c in [model.config, *(b.cfg for b in model.blocks)]}.values())
    old = [c.window for c in cfgs]
    try:
        if window is not None:
            for c in cfgs:
                c.window = int(window)
        yield
    finally:
        for c, w in zip(cfgs, old):
            c.window = w


def tiny_model(seed: int = 0):
    """A tiny random MemSparseLM (byte vocabulary, block 8, segment 32, window 64, 8 persistent) + byte tokenizer."""
    import torch

    from memsparse.config import MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM
    from memsparse.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                      segment=32, window=64, persistent_tokens=8,
                      memory=MemoryConfig(heads=2, head_dim=8, chunk_size=32))
    return MemSparseLM(cfg), ByteTokenizer()


def prompt_ids(task: str, length: int, depth: float, seed: int, tokenizer, vocab: int) -> list[int]:
    if task == "random":
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (length,), generator=g).tolist()
    from memsparse.eval.tasks import get_task

    return list(get_task(task).generate(length, depth, seed, tokenizer).prompt_ids)


def measure(model, ids, window: int) -> dict:
    """Stream `ids` (1, L) segment by segment; per segment the mean kept blocks / kept fraction (the stream's own
    statistics, differenced across the segment) and visible tokens. Returns {'visible', 'kept_blocks',
    'kept_fraction', 'end'} lists, one entry per segment."""
    cfg = model.config
    S, bs, P = cfg.segment, cfg.block_size, cfg.persistent_tokens
    state = model.init_state(1, total_length=ids.shape[1])
    sums, ends = [], []
    for a in range(0, ids.shape[1], S):
        before = dict(state.stats)
        _, state = model.stream(ids[:, a:a + S], state, return_logits="none")
        after = state.stats
        row = []
        for key in ("attn_kept_blocks", "attn_kept_fraction"):
            if key not in after:
                raise SystemExit("the model records no attention statistics (attn_kept_blocks): nothing to measure")
            t1, n1 = after[key]
            t0, n0 = before.get(key, (0.0, 0))
            row.append((t1 - t0) / (n1 - n0))
        sums.append(row)
        ends.append(a + S)
    import torch

    vals = torch.tensor([[float(x) for x in r] for r in sums]) if sums else torch.zeros(0, 2)
    return {"end": ends, "visible": [segment_visible_tokens(e - S, S, bs, window, P) for e in ends],
            "kept_blocks": vals[:, 0].tolist(), "kept_fraction": vals[:, 1].tolist()}


def plot(points: list[dict], curves: dict, fits: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axf) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (budget, curve) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(curve["visible"], curve["kept_tokens"], lw=0.7, alpha=0.5, color=color)
        axf.plot(curve["visible"], curve["kept_fraction"], lw=0.7, alpha=0.5, color=color)
        pts = [p for p in points if p["budget"] == budget]
        f = fits[budget]
        ax.plot([p["visible_tokens"] for p in pts], [p["kept_tokens"] for p in pts], "o", color=color,
                label=f"{budget}: c={f['c']:.3g}, rms rel err {f['rms_rel_err']:.2f}" +
                (f", b={f['power_b']:.2f}" if f.get("power_b") is not None else ""))
        axf.plot([p["visible_tokens"] for p in pts], [p["kept_fraction"] for p in pts], "o", color=color, label=budget)
        xs = sorted(p["visible_tokens"] for p in pts)
        ax.plot(xs, [f["c"] * math.sqrt(x) for x in xs], "--", color=color, lw=1)
    if max((p["visible_tokens"] for p in points), default=0) >= 8192:  # within the measured range only
        ax.plot(list(SPARSE_FRONTIER), list(SPARSE_FRONTIER.values()), "x", color="grey", ms=8,
                label="Sparse Frontier (~12 sqrt(L))")
    for a in (ax, axf):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("visible context per query (tokens)")
        a.grid(alpha=0.3, which="both")
    ax.set_ylabel("kept tokens per query (kept blocks x block size)")
    axf.set_ylabel("kept fraction of visible key blocks")
    ax.legend(fontsize=6)
    axf.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="export directory (MemSparseLM.save_pretrained) or a memsparse-train .ckpt")
    src.add_argument("--tiny", action="store_true", help="a tiny random model and the byte tokenizer (CPU checks)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir or 'byte' (default: the checkpoint's)")
    ap.add_argument("--budget", default="top_p:p=0.9", help="budget spec(s), ';'-separated (memsparse parse_policy)")
    ap.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k,64k,128k",
                    help="prompt lengths of the points (1k = 1024), multiples of the segment")
    ap.add_argument("--window", default="full", help="full (the longest length) | native | N tokens")
    ap.add_argument("--task", default="passkey", help="task whose prompt is streamed, or 'random' token ids")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth of the task prompt")
    ap.add_argument("--samples", type=int, default=1, help="prompts per budget (averaged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-min-length", default="0", help="fit only the points at or above this length")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    from memsparse.eval.harness import (
        EvalInputError,
        environment,
        load_checked_tokenizer,
        overrides,
        parse_budget,
        parse_length,
        parse_lengths,
        resolve_checkpoint,
        resolve_device,
        sample_seed,
    )

    try:
        budgets = [parse_budget(b) for b in args.budget.split(";") if b.strip()]
        lengths = parse_lengths(args.lengths)
        fit_min = parse_length(args.fit_min_length) if args.fit_min_length.strip() not in ("", "0") else 0
        device = resolve_device(args.device)
        ckpt = None if args.tiny else resolve_checkpoint(args.checkpoint, args.tokenizer)
    except EvalInputError as e:
        raise SystemExit(f"kept_budget_vs_length: {e}") from None
    if not budgets or len(set(budgets)) != len(budgets):
        raise SystemExit(f"kept_budget_vs_length: --budget {args.budget!r} names no budget or repeats one")
    if args.samples < 1:
        raise SystemExit("kept_budget_vs_length: --samples must be >= 1")

    import torch

    from memsparse.model import MemSparseLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        model, tokenizer = tiny_model(args.seed)
    else:
        try:
            tokenizer = load_checked_tokenizer(ckpt)
            model = MemSparseLM.from_pretrained(ckpt.path, map_location="cpu")
        except (EvalInputError, OSError, ValueError) as e:
            raise SystemExit(f"kept_budget_vs_length: cannot load {args.checkpoint}: {e}") from None
    model = model.to(device).eval()
    cfg = model.config
    S = cfg.segment
    bad = [n for n in lengths if n % S]
    if bad:
        raise SystemExit(f"kept_budget_vs_length: lengths must be multiples of the segment ({S}): {bad}")
    native = cfg.window
    longest = lengths[-1]
    if args.window == "native":
        window = native
    elif args.window == "full":
        window = max(native, -(-longest // S) * S)
    else:
        try:
            window = parse_length(args.window)
        except EvalInputError as e:
            raise SystemExit(f"kept_budget_vs_length: --window: {e}") from None
        if window % S:
            raise SystemExit(f"kept_budget_vs_length: --window {window} is not a multiple of the segment ({S})")
    if args.task != "random":
        from memsparse.eval.tasks import get_task, list_tasks

        if args.task not in list_tasks():
            raise SystemExit(f"kept_budget_vs_length: unknown task {args.task!r}; known: random, "
                             + ", ".join(list_tasks()))
        need = get_task(args.task).min_length(tokenizer)
        if longest < need:
            raise SystemExit(f"kept_budget_vs_length: {args.task} needs >= {need} tokens, the longest length is "
                             f"{longest}")

    t0 = time.time()
    prompts = [torch.tensor([prompt_ids(args.task, longest, args.depth, sample_seed(args.seed, i), tokenizer,
                                        cfg.vocab_size)], dtype=torch.long, device=device)
               for i in range(args.samples)]
    curves, points, fits = {}, [], {}
    with torch.inference_mode(), window_override(model, window):
        for budget in budgets:
            with overrides(model, budget=budget):
                runs = [measure(model, ids, window) for ids in prompts]
            curve = {"end": runs[0]["end"], "visible": runs[0]["visible"]}
            for key in ("kept_blocks", "kept_fraction"):
                curve[key] = [sum(r[key][i] for r in runs) / len(runs) for i in range(len(curve["end"]))]
            curve["kept_tokens"] = [k * cfg.block_size for k in curve["kept_blocks"]]
            curves[budget] = curve
            for n in lengths:
                i = curve["end"].index(n)
                points.append({"budget": budget, "length": n, "visible_tokens": curve["visible"][i],
                               "kept_blocks": curve["kept_blocks"][i], "kept_tokens": curve["kept_tokens"][i],
                               "kept_fraction": curve["kept_fraction"][i], "in_fit": n >= fit_min})
            used = [p for p in points if p["budget"] == budget and p["in_fit"]]
            if not used:
                raise SystemExit(f"kept_budget_vs_length: no length >= --fit-min-length {args.fit_min_length}")
            fits[budget] = fit_sqrt([p["visible_tokens"] for p in used], [p["kept_tokens"] for p in used])
            for p in points:
                if p["budget"] == budget:
                    p["fit_kept_tokens"] = fits[budget]["c"] * math.sqrt(p["visible_tokens"])
                    p["rel_err"] = (p["kept_tokens"] - p["fit_kept_tokens"]) / p["kept_tokens"]
    floor = (cfg.persistent_tokens // cfg.block_size + cfg.local_blocks) * cfg.block_size
    meta = {"checkpoint": "tiny" if args.tiny else str((ckpt.exported_from or ckpt.path).resolve()),
            "task": args.task, "depth": args.depth, "samples": args.samples, "seed": args.seed, "lengths": lengths,
            "budgets": budgets, "window_mode": args.window, "window": window, "native_window": native,
            "max_visible_tokens_native": cfg.persistent_tokens + native + S,
            "forced_tokens": floor, "block_size": cfg.block_size, "segment": S, "persistent_tokens":
            cfg.persistent_tokens, "fit_min_length": fit_min, "device": str(device), "wall_s": time.time() - t0,
            "model_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
            "argv": list(sys.argv[1:] if argv is None else argv), "environment": environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "points": points, "fits": fits, "curves": curves}
    (out / "kept_budget.json").write_text(json.dumps(result, indent=2))
    cols = ["budget", "length", "visible_tokens", "kept_blocks", "kept_tokens", "kept_fraction", "fit_kept_tokens",
            "rel_err", "in_fit"]
    with open(out / "kept_budget.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    title = (f"{meta['checkpoint']}: {args.task}, window {window} ({args.window}; native {native}), "
             f"forced {floor} tokens, {args.samples} sample(s)")
    plot(points, curves, fits, out / "kept_budget.png", title)
    for b, f in fits.items():
        pb = "" if f["power_b"] is None else f"; free power law exponent {f['power_b']:.2f}"
        print(f"{b}: kept ~ {f['c']:.3g} * sqrt(L), rms relative error {f['rms_rel_err']:.3f} "
              f"(max {f['max_abs_rel_err']:.3f}) over {f['n_points']} lengths{pb}")
    if window == native and longest + cfg.persistent_tokens > meta["max_visible_tokens_native"]:
        print(f"note: native window: the visible context stops at {meta['max_visible_tokens_native']} tokens")
    print(f"wrote kept_budget.json, kept_budget.csv and kept_budget.png to {out}")
    return result


if __name__ == "__main__":
    main()
