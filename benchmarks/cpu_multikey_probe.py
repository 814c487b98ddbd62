"""Can the neural memory recall the value of one key among several past the attention window? A CPU probe at toy
scale of niah_multikey.

The model, its training and its distance bands are `cpu_memory_probe.py`'s (MAC, window 32, segment 16, memory in
layer 1; keys 8-24, 40-90 and 112-160 tokens back; random lowercase filler), with one change: a sample states
`--pairs P` key-value pairs ("3=Q;" ... "7=B;": distinct digit names, values from 20 upper-case letters) at their
own distances, and the question "?7=" asks for one of them. The asked pair lies in the scored band; the others
(distractors) lie anywhere 8-160 back, inside the window or not, except in the band `all_beyond` (scored only),
where every pair lies 112-160 back: no value can be copied from the window there. At P = 1 this is the passkey probe
with a named key. The memory then has to store which value followed which name and answer by the name (an
associative recall), where the passkey probe only has to keep the one surprising letter. MemSparseLM with the memory
and without it are trained on the same samples (loss on the answer) and scored by greedy argmax at the question over
held-out samples. Chance is 1/20; a model that answers one of the sample's P values, not knowing which name it
followed, scores 1/P of its `any_<band>` (the share of answers that are one of the sample's values).

`--pairs 1,2,4` trains a pair of models for each count; `--no-baseline` trains the memory model only.
`--memory-conv K` gives the memory a short causal convolution of K taps on its q/k/v (`memory.conv`, Titans sec.
4.4): a memory key written at a value then sees the name just before it; `--memory-conv-init random` starts its
taps random (nn.Conv1d's init, as delta-rule models' short convolutions) instead of the identity. `--memory-depth 1`
makes the memory a linear fast-weight map (one matrix a head, as DeltaNet's state) instead of the 2-layer MLP;
`--memory-head-dim D` widens each memory head (16 in the committed runs); `--memory-layers 0,1` gives both layers a
memory (layer 1 in the committed runs). `--train-all-beyond` trains the far-asking two thirds of the steps on the
all_beyond placement, where no value can be copied from the window. `--key-match` then measures whether the
memory's query at the question points at the asked value's key more than at the others' (`key_match`). `--filler
sky` puts the pairs in a repeated sentence (predictable, so the memory's writes of it carry little) instead of
random letters. `--oracle-shift` (with `--memory-conv` >= 3) fixes the convolution so that keys hold the name 2
tokens back and queries the name 1 back: the memory then need not learn the addressing, only store and read
(with `--question-gap N` the queries hold the name N + 1 back).
`--variant mag|mal` feeds the memory's read to its layer as MAG or MAL does (MAC in the committed runs);
`--no-surprise-gate` writes every evicted token ungated. `--question-gap N` puts N fixed characters between the
asked name and the question's "=" ("?7 in t=" for N 5), as RULER's niah_multikey question puts ~6 tokens between its
key and the answer ("for {key} mentioned in the provided text is"): the question's memory query, read at "=", then
finds the name N + 1 tokens back, past a convolution of N + 1 taps or fewer; `--gap-ramp S` trains the gap up
from 0 over S steps (a curriculum; evaluation asks with the full gap throughout). `--memory-write-input embeddings`
takes the memory's keys, values and write rates from the token embeddings and only its queries from its layer's
input (`memory.write_input`): a memory in layer 1 then writes the pairs as a first-layer memory does, and reads with
a query that layer 0's attention can have filled with the asked name. `--memory-query-pool` (with `--memory-conv K`)
makes the queries a content-scored pick among the last K tokens (`memory.query_pool`) instead of fixed taps: the
asked name can enter the query whatever its lag. `--memory-lr-scale S` trains the memory model's memory parameters
(projections, convolution, gates) at S x `--lr` (`model.memory_lr_scale`).

    python benchmarks/cpu_multikey_probe.py --pairs 1,2,4 --steps 900 --out benchmarks/results/multikey
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("cpu_memory_probe", Path(__file__).with_name("cpu_memory_probe.py"))
probe = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cpu_memory_probe", probe)
_spec.loader.exec_module(probe)

NAMES = "0123456789"
VALUES = probe.KEYS  # 20 upper-case letters
FILLER = probe.RANDOM_FILLER
PAIR = 4  # "3=Q;"
TOP = 160  # the farthest a pair lies (distance: tokens between the pair's ";" and the question's "?")
# scored bands: (name, the asked pair's distances, the other pairs' distances); in "all_beyond" every pair lies
# beyond attention, so no other value can be copied from the window and only the memory can tell them apart
BANDS = [("in_window", 8, 24, (8, TOP)), ("relay", 40, 90, (8, TOP)), ("beyond_attention", 112, 160, (8, TOP)),
         ("all_beyond", 112, 160, (112, TOP))]
QUESTION_GAP = " in the text is mentioned here"  # --question-gap N: its first N characters
ALL_BEYOND = BANDS[-1][1:]  # (lo, hi, others) of the all_beyond placement: training and key_match draw it too


def min_length(gap: int = 0) -> int:
    """The shortest sample: a pair TOP tokens back, the question "?<name>" + `gap` characters + "=", the answer."""
    return TOP + PAIR + 4 + gap


def place(g: torch.Generator, pairs: int, asked: tuple[int, int], others: tuple[int, int]) -> list[int]:
    """Distances of `pairs` pairs, the first (the asked one) in `asked`, the rest in `others`, no two overlapping (a
    pair's 4 tokens and one filler token apart); [] when a pair finds no room after 50 draws."""
    taken: list[int] = []
    for k in range(pairs):
        a, b = asked if k == 0 else others
        for _ in range(50):
            d = int(torch.randint(a, b + 1, (1,), generator=g))
            if all(abs(d - t) > PAIR for t in taken):
                taken.append(d)
                break
        else:
            return []
    return taken


def fill(g: torch.Generator, n: int, filler: str = "random") -> list[str]:
    """n filler characters: "random" draws each from FILLER (lower case and spaces: every one a surprise to the
    memory), "sky" repeats `cpu_memory_probe.FILLER` ("the sky is blue. ") from a random start (predictable)."""
    if filler == "random":
        return [FILLER[i] for i in torch.randint(len(FILLER), (n,), generator=g).tolist()]
    if filler != "sky":
        raise ValueError(f"filler must be 'random' or 'sky', got {filler!r}")
    start = int(torch.randint(len(probe.FILLER), (1,), generator=g))
    return list((probe.FILLER * (n // len(probe.FILLER) + 2))[start:start + n])


def sample(g: torch.Generator, pairs: int, lo: int, hi: int, length: int,
           others: tuple[int, int] = (8, TOP), filler: str = "random",
           gap: int = 0) -> tuple[list[int], int, int, list[int]]:
    """(ids of `length` tokens, the answer's id, index of the question's last token, the ids of every pair's value):
    `pairs` key-value pairs in `filler` (`fill`), the asked one lo-hi tokens back, the others `others` back (no two
    overlapping), then "?<name>=" (with `gap` characters of QUESTION_GAP before the "=") and the value, padded
    with filler."""
    if not 0 <= gap <= len(QUESTION_GAP):
        raise ValueError(f"the question gap must be 0-{len(QUESTION_GAP)} characters, got {gap}")
    if length < min_length(gap):
        raise ValueError(f"length {length} cannot hold a pair {TOP} tokens back: use >= {min_length(gap)}")
    span = TOP + PAIR  # the text before the question: a pair d back ends d tokens before it
    text = fill(g, span, filler)
    names = [NAMES[i] for i in torch.randperm(len(NAMES), generator=g)[:pairs].tolist()]
    values = [VALUES[i] for i in torch.randint(len(VALUES), (pairs,), generator=g).tolist()]
    for _ in range(1000):  # placing pairs one by one can corner itself (8 pairs in 112-160): then start again
        taken = place(g, pairs, (lo, hi), others)
        if taken:
            break
    else:
        raise ValueError(f"cannot place {pairs} pairs {others[0]}-{others[1]} tokens back")
    for k, d in enumerate(taken):
        end = span - d
        text[end - PAIR:end] = list(f"{names[k]}={values[k]};")
    ids = [ord(c) for c in "".join(text) + f"?{names[0]}{QUESTION_GAP[:gap]}="]
    q = len(ids) - 1
    ans = ord(values[0])
    pad = fill(g, length - len(ids) - 1, filler)
    return ids + [ans] + [ord(c) for c in pad], ans, q, [ord(v) for v in values]


def batch(g, n: int, pairs: int, lo: int, hi: int, length: int, others: tuple[int, int] = (8, TOP),
          filler: str = "random", gap: int = 0):
    """n samples (`sample`): (ids (n, length), labels (n, length) with the answer at the question,
    [(answer, q, every value)])."""
    rows = [sample(g, pairs, lo, hi, length, others, filler, gap) for _ in range(n)]
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.full_like(ids, -100)
    for i, (_, ans, q, _) in enumerate(rows):
        labels[i, q] = ans  # the output at the question's last token predicts the value
    return ids, labels, [r[1:] for r in rows]


@torch.no_grad()
def accuracy(model, g, pairs: int, lo: int, hi: int, length: int, n: int,
             others: tuple[int, int] = (8, TOP), filler: str = "random", gap: int = 0) -> tuple[float, float]:
    """Greedy argmax at the question over `n` held-out samples, the asked pair lo-hi back: (the asked value's
    share, the share answering any of the sample's values). A model that recalls the values but not which name
    each followed scores about any / pairs."""
    model.eval()
    ids, _, ans = batch(g, n, pairs, lo, hi, length, others, filler, gap)
    pred = model(ids).logits.argmax(-1)
    model.train()
    got = [int(pred[i, q]) for i, (_, q, _) in enumerate(ans)]
    return (sum(p == a for p, (a, _, _) in zip(got, ans)) / n,
            sum(p in vals for p, (_, _, vals) in zip(got, ans)) / n)


@torch.no_grad()
def key_match(model, g, pairs: int, length: int, n: int, filler: str = "random", gap: int = 0) -> dict:
    """Does the memory address a value by its name? Over `n` all_beyond samples: per memory layer, the cosine of
    the question's memory query (at its "=") with the memory key written at the asked value, and with the keys at
    the other values, averaged over heads and samples: {"layer<i>": {"asked": c, "other": c}}. Keys that encode the
    names give asked != other (either sign: the binding runs differ by 0.13-0.37); keys that hold the values alone
    give asked ~ other (within 0.02)."""
    model.eval()
    lo, hi, others = ALL_BEYOND
    ids, _, ans = batch(g, n, pairs, lo, hi, length, others, filler, gap)
    seen: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, blk in enumerate(model.blocks) if blk.memory is not None]
    model(ids)
    for h in hooks:
        h.remove()
    model.train()
    out = {}
    emb = model.embed(ids)  # the memory's write input under memory.write_input: embeddings
    for i, x in seen.items():
        blk = model.blocks[i]
        # q, k (B, H, N, D), unit length per head with qk_norm
        inp = blk.memory.project(blk.norm1(x)) if blk.memory.config.write_input == "layer" else \
            blk.memory.project_stream(blk.norm1(x), src=blk.norm1(emb))[0]
        asked, other = [], []
        for b, (answer, q, _) in enumerate(ans):
            row = ids[b].tolist()
            spots = [p for p in range(2, q - 2) if row[p - 1] == ord("=") and chr(row[p - 2]).isdigit()]
            for p in spots:
                c = torch.nn.functional.cosine_similarity(inp.q[b, :, q], inp.k[b, :, p], dim=-1).mean()
                if row[p - 2] == row[q - 1 - gap]:  # the asked name
                    assert row[p] == answer, "the asked name's value is the answer"
                    asked.append(float(c))
                else:
                    other.append(float(c))
        out[f"layer{i}"] = {"asked": sum(asked) / len(asked), "other": sum(other) / max(len(other), 1)}
    return out


def oracle_shift(memories, query_back: int = 1) -> None:
    """Fix the convolution (`memory.conv` >= 3 taps) of each NeuralMemory in `memories` (a model's: `[b.memory for
    b in model.blocks if b.memory is not None]`) to read the name where a pair puts it: a query is
    the token 1 back (the name in the question "?7="), a key the token 2 back (the name in "7=B", written at the
    value), a value the token itself; frozen. The keys and queries then hold the names by construction, so the
    memory has only to store and read: whether it binds then separates the memory's store/read from the learning
    of the addressing. `query_back`: where the question's name is, counted back from its "=" (1 + the question
    gap)."""
    for mem in memories:
        w, hd = mem.conv_weight, mem.heads * mem.head_dim
        need = max(3, query_back + 1)
        if w is None or w.shape[1] < need:
            raise ValueError(f"the oracle shift needs a memory convolution of >= {need} taps "
                             f"(--memory-conv {need} or more)")
        K = w.shape[1]
        with torch.no_grad():
            w.zero_()
            w[:hd, K - 1 - query_back] = 1.0  # q: the question's name, query_back back
            w[hd:2 * hd, K - 3] = 1.0  # k: 2 back
            w[2 * hd:, K - 1] = 1.0  # v: the token itself
        w.requires_grad_(False)


def train_gap(step: int, gap: int, ramp: int) -> int:
    """The question gap a training step draws: `gap`, or with `ramp` > 0 one growing from 0 at step 1 by one
    character every ramp / (gap + 1) steps, `gap` from step ~ramp * gap / (gap + 1) on (evaluation keeps `gap`)."""
    return gap if ramp <= 0 else min(gap, (step - 1) * (gap + 1) // ramp)


def fit(memory: bool, pairs: int, args) -> dict:
    """Train one model on `pairs`-pair samples; return {"memory_layers", "pairs", "curve", "final"}: accuracy per
    band every `args.eval_every` steps. A third of the steps ask a pair inside the window, the rest one 8-160 back
    (as `cpu_memory_probe.py`), or with `args.train_all_beyond` one 112-160 back with every other pair there too."""
    model = probe.build(memory, args.seed, conv=args.memory_conv, memory_depth=args.memory_depth,
                        memory_head_dim=args.memory_head_dim, memory_layers=tuple(args.memory_layers),
                        conv_init=args.memory_conv_init, variant=args.variant,
                        surprise_gate=not args.no_surprise_gate, write_input=args.memory_write_input,
                        query_pool=getattr(args, "memory_query_pool", False))
    if memory and args.oracle_shift:
        oracle_shift([b.memory for b in model.blocks if b.memory is not None], query_back=1 + args.question_gap)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
              for g in probe.probe_groups(model, args.lr, getattr(args, "memory_lr_scale", 1.0) if memory else 1.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)  # the same samples for both models
    t0, curve = time.time(), []
    for step in range(1, args.steps + 1):
        gap = train_gap(step, args.question_gap, args.gap_ramp)
        if step % 3 == 0:
            ids, labels, _ = batch(g, args.batch, pairs, 8, 24, args.length, filler=args.filler, gap=gap)
        elif args.train_all_beyond:  # the all_beyond band's placement: only the memory can answer
            lo, hi, others = ALL_BEYOND
            ids, labels, _ = batch(g, args.batch, pairs, lo, hi, args.length, others, args.filler, gap)
        else:
            ids, labels, _ = batch(g, args.batch, pairs, 8, TOP, args.length, filler=args.filler, gap=gap)
        out = model(ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "loss": float(out.loss.detach()), "wall_s": round(time.time() - t0, 1)}
            ge = torch.Generator().manual_seed(10_000)
            for band, lo, hi, others in BANDS:
                row[f"acc_{band}"], row[f"any_{band}"] = accuracy(model, ge, pairs, lo, hi, args.length,
                                                                  args.eval_samples, others, args.filler,
                                                                  args.question_gap)
            curve.append(row)
            print(f"pairs {pairs} {'memory   ' if memory else 'no memory'}", json.dumps(row), flush=True)
    run = {"memory_layers": list(args.memory_layers) if memory else [], "pairs": pairs, "curve": curve,
           "final": curve[-1]}
    if memory and args.key_match:
        run["key_match"] = key_match(model, torch.Generator().manual_seed(20_000), pairs, args.length,
                                     args.eval_samples, args.filler, args.question_gap)
        print(f"pairs {pairs} key match", json.dumps(run["key_match"]), flush=True)
    return run


def table(runs: list[dict]) -> list[str]:
    """Markdown: one row per (pairs, model), the last evaluation's accuracy per band (and, in brackets, the share
    answering any of the sample's values)."""
    lines = ["| pairs | model | steps | " + " | ".join(f"{b} ({lo}-{hi})" for b, lo, hi, _ in BANDS) + " |",
             "|---|---|---|" + "---|" * len(BANDS)]
    for r in runs:
        f = r["final"]
        lines.append(f"| {r['pairs']} | {'memory' if r['memory_layers'] else 'no memory'} | {f['step']} | "
                     + " | ".join(f"{f[f'acc_{b}']:.2f} ({f[f'any_{b}']:.2f})" for b, *_ in BANDS) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    """One panel per band: accuracy (solid) and the share answering any of the sample's values (dotted) against
    training step, a line per (pairs, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BANDS), figsize=(4.2 * len(BANDS), 3.6), sharey=True)
    for ax, (band, lo, hi, others) in zip(axes, BANDS):
        for i, r in enumerate(result["runs"]):
            steps = [c["step"] for c in r["curve"]]
            model = "memory" if r["memory_layers"] else "no memory"
            label = f"{r['pairs']} pair{'s' if r['pairs'] > 1 else ''}, {model}"
            ax.plot(steps, [c[f"acc_{band}"] for c in r["curve"]], color=f"C{i}", label=label)
            ax.plot(steps, [c.get(f"any_{band}", float("nan")) for c in r["curve"]], color=f"C{i}", ls=":")
        ax.axhline(result["chance"], color="grey", lw=0.8)
        ax.set_title(f"{band}: asked pair {lo}-{hi} back" + (", all pairs" if others[0] > 8 else ""), fontsize=9)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("accuracy (dotted: answered any pair's value)")
    axes[0].legend(fontsize=7)
    conv = result["args"].get("memory_conv", 0)
    fig.suptitle(f"multi-key recall at toy scale (CPU, window 32){f', memory conv {conv}' if conv else ''}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_run_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The training and scoring options this probe shares with `cpu_memory_alone_probe.py`."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="1,2,4", help="comma-separated pair counts, a model pair trained for each")
    add_run_args(ap, steps=900)
    ap.add_argument("--memory-conv", type=int, default=0,
                    help="taps of the memory's short causal q/k/v convolution (memory.conv; 0: none)")
    ap.add_argument("--memory-conv-init", choices=["identity", "random", "box"], default="identity",
                    help="the convolution's start (memory.conv_init): identity (last tap 1), random (nn.Conv1d's) "
                         "or box (q/k taps all 1/sqrt(K), v identity)")
    ap.add_argument("--variant", choices=["mac", "mag", "mal"], default="mac",
                    help="how the memory's read reaches its layer: an extra key/value a token (mac), a gated sum "
                         "(mag) or the attention's input (mal)")
    ap.add_argument("--no-surprise-gate", action="store_true", help="write every evicted token ungated")
    ap.add_argument("--oracle-shift", action="store_true",
                    help="fix the memory's convolution so keys read the name 2 back, queries 1 back (`oracle_shift`)")
    ap.add_argument("--memory-depth", type=int, default=2,
                    help="MLP layers of the memory (memory.depth; 1: a linear fast-weight map)")
    ap.add_argument("--memory-head-dim", type=int, default=16, help="the memory's width a head (memory.head_dim)")
    ap.add_argument("--memory-layers", default="1", help="comma-separated layers with a memory (of the 2)")
    ap.add_argument("--memory-query-pool", action="store_true",
                    help="the memory's queries pick among the last --memory-conv tokens by a learned content score "
                         "(memory.query_pool) instead of the convolution's fixed taps")
    ap.add_argument("--memory-lr-scale", type=float, default=1.0,
                    help="the memory's parameters train at this multiple of --lr (model.memory_lr_scale; the "
                         "memory model only)")
    ap.add_argument("--memory-write-input", choices=["layer", "embeddings"], default="layer",
                    help="the memory's key / value input (memory.write_input): its layer's input or the embeddings")
    ap.add_argument("--train-all-beyond", action="store_true",
                    help="the two thirds of steps that ask far place every pair 112-160 back (the all_beyond band)")
    ap.add_argument("--key-match", action="store_true",
                    help="after training: the memory query's cosine with the asked value's key and the others'")
    ap.add_argument("--filler", choices=["random", "sky"], default="random",
                    help="the text around the pairs: random letters (the committed runs) or a repeated sentence")
    ap.add_argument("--question-gap", type=int, default=0,
                    help="fixed characters between the asked name and the question's '=' (0: '?7=')")
    ap.add_argument("--gap-ramp", type=int, default=0,
                    help="train the question gap from 0 up to --question-gap over this many steps (0: from the start)")
    ap.add_argument("--no-baseline", action="store_true", help="train only the memory model")
    ap.add_argument("--out", default=None, help="directory for multikey_probe.json / .md / .png")
    ap.add_argument("--plot-only", action="store_true", help="redraw --out's multikey_probe.png from its .json")
    args = ap.parse_args(argv)
    if args.plot_only:
        if not args.out or not (Path(args.out) / "multikey_probe.json").is_file():
            ap.error("--plot-only needs --out DIR holding a multikey_probe.json")
        result = json.loads((Path(args.out) / "multikey_probe.json").read_text())
        plot(result, Path(args.out) / "multikey_probe.png")
        return result
    try:
        counts = [int(x) for x in args.pairs.split(",")]
    except ValueError:
        ap.error(f"--pairs must be comma-separated integers, got {args.pairs!r}")
    if not counts or not all(1 <= c <= 8 for c in counts):
        ap.error(f"--pairs must be 1-8 each (distinct digit names, room 8-{TOP} back), got {args.pairs!r}")
    if not 0 <= args.question_gap <= len(QUESTION_GAP):
        ap.error(f"--question-gap must be 0-{len(QUESTION_GAP)}, got {args.question_gap}")
    if args.length < min_length(args.question_gap):
        ap.error(f"--length must be >= {min_length(args.question_gap)} (a pair {TOP} tokens back and the question), "
                 f"got {args.length}")
    if args.memory_lr_scale <= 0:
        ap.error(f"--memory-lr-scale must be > 0, got {args.memory_lr_scale}")
    if args.memory_conv < 0:
        ap.error(f"--memory-conv must be >= 0, got {args.memory_conv}")
    if args.memory_query_pool and args.memory_conv < 2:
        ap.error("--memory-query-pool pools the last --memory-conv tokens: needs --memory-conv >= 2, "
                 f"got {args.memory_conv}")
    if args.gap_ramp < 0 or (args.gap_ramp and not args.question_gap):
        ap.error(f"--gap-ramp must be >= 0, and needs --question-gap >= 1, got {args.gap_ramp}")
    if args.oracle_shift and args.memory_conv < max(3, args.question_gap + 2):
        ap.error(f"--oracle-shift needs --memory-conv {max(3, args.question_gap + 2)} or more (a key 2 tokens back, "
                 f"the question's name {args.question_gap + 1} back), got {args.memory_conv}")
    try:
        args.memory_layers = sorted({int(x) for x in args.memory_layers.split(",")})
    except ValueError:
        ap.error(f"--memory-layers must be comma-separated integers, got {args.memory_layers!r}")
    if not all(0 <= x <= 1 for x in args.memory_layers):
        ap.error(f"--memory-layers must name layers 0 and/or 1 (the model has 2), got {args.memory_layers}")
    if args.memory_depth < 1 or args.memory_head_dim < 1:
        ap.error(f"--memory-depth and --memory-head-dim must be >= 1, got {args.memory_depth}, {args.memory_head_dim}")
    if args.steps < 1 or args.eval_every < 1 or args.eval_samples < 1 or args.batch < 1:
        ap.error("--steps, --eval-every, --eval-samples and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    runs = []
    for p in counts:
        runs.append(fit(True, p, args))
        if not args.no_baseline:
            runs.append(fit(False, p, args))
    result = {"args": vars(args), "chance": 1 / len(VALUES), "bands": BANDS, "runs": runs,
              "torch": torch.__version__, "device": "cpu"}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "multikey_probe.json").write_text(json.dumps(result, indent=2))
        (out / "multikey_probe.md").write_text("\n".join(table(runs)) + "\n")
        plot(result, out / "multikey_probe.png")
    print("\n".join(table(runs)))
    return result


if __name__ == "__main__":
    main()
