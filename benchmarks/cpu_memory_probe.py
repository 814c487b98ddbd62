"""Does the neural memory carry a key past the attention window? A CPU probe at toy scale.

A one-letter key is stated once ("K=X;"), then predictable filler pushes it out of the attention window (window
32, segment 16: after ~48 tokens a token is in the memory only), then the question "?K=" asks for it. MemSparseLM
with a MAC memory layer and the same model without memory are trained the same way (same samples, steps, lr,
seed, loss on the answer token) and scored by greedy argmax at the question, on held-out samples with the key
inside the window (distance 8-24), beyond one window but within reach of attention relayed through both layers
(40-90: layer 0 at a position inside the question's window still saw the key), and beyond any attention path
(112-160: only the memory holds it). Chance is 1/20.

`--far LO,HI` adds a band of keys LO-HI tokens back (training distances then reach HI; `--length` must hold them),
and `--filler random` replaces the repeated sentence by random lowercase letters and spaces (every filler token
unpredictable, as a real haystack is: the memory's surprise-driven writes then see noise at every step).

`--key-length N` makes the key N letters ("K=QDAIS;", answered by N tokens, each labelled): a cell's accuracy is
then the exact match of all N letters by argmax at each answer position given the true letters before it
(teacher-forced, as the training loss sees them), and `tok_*` is the per-letter accuracy.

`--alphabet N` draws the key's letters from the first N of the 20 (fewer: a key repeats letters more often, as
digits do in a number; a letter then has different successors inside one key). `--memory-conv K` gives the
memory a short causal convolution of K taps on its q/k/v (`memory.conv`, Titans sec. 4.4): a memory key then sees
the letters just before it.

`--depth N` gives the model N layers instead of 2 (memory still in layer 1): attention relayed through N layers
reaches about N windows back, so a band the 2-layer model can answer only from its memory may be within
attention's reach, as the GPU curriculum's 2K samples are for its 8 layers of 512-token windows.

`--memory-lr-scale S` trains the memory's parameters (projections, rate heads, initial fast weights, surprise
gate) at S x `--lr`, the rest at `--lr` (`model.memory_lr_scale` of memsparse-train).

`--chunk-size C` writes the memory in steps of C tokens (default 16, the segment): a key in a step of C tokens
gets about 1/C of the write's gradient, so smaller steps should carry it sooner if dilution limits the memory
(the GPU recipes write 256 tokens a step). `--scale S` multiplies the window, the segment (and so the default write
step), the bands' distances and the sample length by S: at S = 4 a write step of the whole segment holds 64 tokens,
and `--scale 4 --chunk-size 16` is the same model writing in steps of 16.

`--copy-steps N` trains N steps on keys inside the window only before the `--steps` of the mixed schedule (as
stage 1 of the GPU curriculum teaches the copy before stage 2 needs the memory): does a longer copying start
slow the memory's carry? Steps in the curve count from the first copy step.

`--relay-steps N` then trains N steps whose keys lie at most as far back as attention relays (the relay band,
40-90, beside the window's): a model that first learns to reach its keys by attention alone, as the GPU
curriculum's stage 2 can (keys 512-2K back, all within reach of 8 layers of 512-token windows), before the full
mix needs the memory. Does such a start keep the memory from taking over the keys beyond attention?

`--unseen N` keeps the alphabet's last N letters out of every training key and scores keys made of them in bands
of their own (`unseen_in_window`, `unseen_beyond_attention`): can the model copy a token it was never trained to
output, as a merged BPE's rare number token? `--unseen-in-filler` (with `--filler random`) lets those letters
appear in the filler, as input tokens only (and as targets too with `--loss all`, which labels every next token).
`--unseen-share P` makes those letters rare instead of unseen: about P of the training keys' letters.
`--balanced-from N` (with `--unseen`) draws every training key letter uniformly from the whole alphabet from step N
on, the unseen letters included, as a last stage of token-balanced keys (`KEYS=balanced KEYS_STAGES=3` on the GPU):
can a model that has learned its copy and the memory's carry on the common letters learn the rare ones late,
without losing the carry? `--balanced-share P` (with `--balanced-from`) makes that stage draw the unseen letters as
about P of the key letters instead of their uniform share (N / alphabet): fewer draws each, as the GPU's stage 3
gives its one-token key (about 15-25 rows in 1,000 steps).

`--beyond-share X` sets the share of the full mix's keys that lie beyond attention (112-160 back; the rest 8-40,
within its reach, since attention alone answers only ~2/3 of the 40-90 band) instead of drawing every distance
uniformly from 8-160 (where about half the keys lie beyond attention's reach); `--near-max N` moves the near keys
bound from 40 to N (90: the relay band, whose farther third attention does not reach). The GPU
curriculum's stage 2 put 5-13% of its needles beyond attention's reach and its memory carried nothing, 19-28% and
it did (2026-12-06). Does the share decide whether, or how soon, the toy memory learns the carry?

`--copy-loss all` labels every next token during the `--copy-steps` start and `--loss` after it (the GPU
curriculum: stage 1 on every token, stage 2 on the answers).

`--logit-adjust TAU` trains on the logit-adjusted loss (`model.logit_adjust` of memsparse-train); with
`--logit-adjust-from N` the plain loss runs up to step N and the adjusted one after it, its prior counted from step
N + 1 (a plain start, then the adjustment, as a GPU curriculum's stage 2 from a plain stage 1).

`--eval-no-writes` scores every band again with the memory's writes off (`acc_<band>_no_writes`, the same prompts):
a key found then is reached by attention, one found only with the writes on is carried by the memory.

Each curve row also holds the memory's write rates on that step's training batch (`memory_lr`, `memory_forget`,
`memory_keep_1k`: the statistics `memsparse-train` logs as `train/memory_*`).

    python benchmarks/cpu_memory_probe.py --steps 600 --out benchmarks/results/cpu_memory_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM, logit_adjustment

KEYS = "ABCDEFGHIJKLMNOPQRSU"
FILLER = "the sky is blue. "
RANDOM_FILLER = "abcdefghijklmnopqrstuvwxyz  "  # --filler random draws from these (keys are upper case)
VOCAB = 128  # ASCII
STOP = ";"  # --stop: every answer ends with it


def sample(g: torch.Generator, distance: int, length: int, key_length: int = 1,
           filler: str = "sky", letters: str = KEYS, filler_extra: str = "",
           stop: bool = False) -> tuple[list[int], list[int], int]:
    """(ids of `length` tokens, the key's ids, index of the question's last token): key at the start, filler of
    `distance` characters, then the question and the key; padded with filler so that every sample is `length`
    long. The key is `key_length` letters (with repeats); `filler` "sky" repeats FILLER, "random" draws each
    character from RANDOM_FILLER + `filler_extra`. The key's letters are drawn uniformly from `letters` (`--alphabet
    N`: the first N of KEYS). `stop`: the answer ends with STOP (";", as the key's statement does), labelled like
    the key's letters: an end-of-answer token in every answer, as the GPU tasks' stop."""
    key = "".join(letters[int(torch.randint(len(letters), (1,), generator=g))] for _ in range(key_length))
    if filler == "random":
        chars = RANDOM_FILLER + filler_extra

        def fill_text(n: int) -> str:
            return "".join(chars[i] for i in torch.randint(len(chars), (n,), generator=g).tolist())
    else:
        start = int(torch.randint(len(FILLER), (1,), generator=g))

        def fill_text(n: int) -> str:
            return (FILLER * (n // len(FILLER) + 2))[start:start + n]
    text = f"K={key};" + fill_text(distance) + "?K="
    ids = [ord(c) for c in text]
    q = len(ids) - 1
    ans = [ord(c) for c in key + (STOP if stop else "")]
    pad = max(0, length - len(ids) - len(ans))
    if filler == "random":
        ids = ids + ans + [ord(c) for c in fill_text(pad)]
    else:  # the committed runs' padding, unchanged
        ids = ids + ans + [ord(c) for c in (FILLER * (length // len(FILLER) + 1))][:pad]
    return ids[:length], ans, q


def batch(g, n: int, lo: int, hi: int, length: int, key_length: int = 1, filler: str = "sky",
          letters: str = KEYS, filler_extra: str = "", beyond: tuple[int, int, float] | None = None,
          stop: bool = False):
    """n samples, keys lo-hi tokens back (uniform); with `beyond` = (LO, HI, share), each key instead lies LO-HI
    back with probability `share`. Returns (ids, labels, [(answer, question position)])."""

    def distance() -> int:
        a, b = lo, hi
        if beyond is not None and float(torch.rand((1,), generator=g)) < beyond[2]:
            a, b = beyond[0], beyond[1]
        return int(torch.randint(a, b + 1, (1,), generator=g))

    rows = [sample(g, distance(), length, key_length, filler, letters, filler_extra, stop) for _ in range(n)]
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.full_like(ids, -100)
    for i, (_, ans, q) in enumerate(rows):
        # the model's output at position q + j predicts token q + j + 1: the key's letter j
        labels[i, q:q + len(ans)] = torch.tensor(ans)
    return ids, labels, [(ans, q) for _, ans, q in rows]


def rare_mix(seen: str, rare: str, share: float) -> str:
    """The letters a training key draws from (uniformly, so repeats weight them): `seen` only for share 0, else
    `seen` repeated so that the `rare` letters make up about `share` of the draws."""
    if share <= 0 or not rare:
        return seen
    k = max(1, round((len(rare) / share - len(rare)) / len(seen)))
    return seen * k + rare


def training_labels(ids: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """The labels a training step uses: the batch's (the key's letters) for "answer", every next token for "all"
    (label at position t = token t + 1, as the key's are)."""
    if loss == "answer":
        return labels
    out = torch.full_like(ids, -100)
    out[:, :-1] = ids[:, 1:]
    return out


def adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                           tau: float) -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021, "Long-tail learning via logit adjustment", eq. 10): the
    loss on `logits + tau * log(prior)`, prior = the labelled tokens' frequencies so far (`counts`, add-one
    smoothed; `memsparse.model.logit_adjustment`, as memsparse-train's `model.logit_adjust`), so the raw logits,
    which decode, need not hold the prior of the answers. logits `(B, L, V)`,
    labels `(B, L)` (-100 ignored), counts `(V,)`; returns the mean loss over labelled positions."""
    return torch.nn.functional.cross_entropy((logits + logit_adjustment(counts, tau)).flatten(0, 1).float(),
                                             labels.flatten(), ignore_index=-100)


def build(memory: bool, seed: int, train_passes: int = 0, conv: int = 0, depth: int = 2,
          chunk: int = 16, scale: int = 1, forget_init: float = 1e-4, memory_depth: int = 2,
          memory_head_dim: int = 16, memory_layers: tuple[int, ...] = (1,), conv_init: str = "identity",
          variant: str = "mac", surprise_gate: bool = True, write_input: str = "layer",
          query_pool: bool = False) -> MemSparseLM:
    """The probe's model (MAC, a memory in `memory_layers` when `memory`); `train_passes` consolidation passes;
    `conv` taps of the memory's short q/k/v convolution (0: none, the committed runs); `depth` layers (2: the
    committed runs; more layers relay attention further back, as the GPU recipes' 8 do); `chunk` tokens a write
    step of the memory (16, the segment: the committed runs); `forget_init` the memory's initial forgetting rate
    (1e-4: the committed runs; the GPU recipes 3e-6); `memory_depth` MLP layers of the memory (2; 1 is a linear
    fast-weight map) and `memory_head_dim` its width a head (16); `memory_layers` the layers with a memory ((1,));
    `conv_init` the convolution's start (`memory.conv_init`: identity, the committed runs, or random); `variant`
    how the memory's read reaches the layer (mac, the committed runs; mag; mal); `surprise_gate` the learned gate on
    each evicted token's write (on in the committed runs); `write_input` the memory's key / value input
    (`memory.write_input`: layer, the committed runs, or embeddings); `query_pool` the queries' content-scored pick
    among the last `conv` tokens (`memory.query_pool`)."""
    torch.manual_seed(seed)
    return MemSparseLM(ModelConfig(
        vocab_size=VOCAB, dim=64, depth=depth, heads=4, kv_heads=2, head_dim=16, mlp_hidden=128, block_size=8,
        segment=16 * scale, window=32 * scale, persistent_tokens=8, budget="dense", variant=variant,
        surprise_gate=surprise_gate,
        memory_layers=list(memory_layers) if memory else [],
        memory=MemoryConfig(heads=4, head_dim=memory_head_dim, depth=memory_depth, chunk_size=chunk,
                            forget_init=forget_init, conv=conv, conv_init=conv_init, write_input=write_input,
                            query_pool=query_pool),
        consolidation=ConsolidationConfig(train_passes=train_passes)))


def probe_groups(model: MemSparseLM, lr: float, memory_lr_scale: float = 1.0) -> list[dict]:
    """The probe's AdamW groups: every parameter at `lr` (the committed runs), or with `memory_lr_scale` != 1 the
    memory's parameters (`memory_parameter_names`) at `lr * memory_lr_scale`, as `model.memory_lr_scale` does in
    memsparse-train."""
    if memory_lr_scale == 1.0:
        return [{"params": list(model.parameters())}]
    memory = model.memory_parameter_names()
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n not in memory]},
            {"params": [p for n, p in named if n in memory], "lr": lr * memory_lr_scale}]


def key_hits(logits, ans) -> list[list[bool]]:
    """Per sample, per key letter: is the argmax at the answer position right (teacher-forced)? `logits` (n, L, V)
    of a batch's `ids`, `ans` its [(key ids, question index)]."""
    pred = logits.argmax(-1)
    return [[int(pred[i, q + j]) == t for j, t in enumerate(a)] for i, (a, q) in enumerate(ans)]


@torch.no_grad()
def accuracy(model, g, lo: int, hi: int, length: int, n: int = 200, key_length: int = 1,
             per_token: bool = False, filler: str = "sky", letters: str = KEYS, filler_extra: str = "",
             stop: bool = False):
    """Exact match of the whole key (argmax at each answer position, teacher-forced) over `n` held-out samples;
    with `per_token`, (exact match, per-letter accuracy)."""
    model.eval()
    ids, _, ans = batch(g, n, lo, hi, length, key_length, filler, letters, filler_extra, stop=stop)
    hits = key_hits(model(ids).logits, ans)
    model.train()
    exact = sum(all(h) for h in hits) / n
    return (exact, sum(map(sum, hits)) / sum(map(len, hits))) if per_token else exact


def train(memory: bool, args) -> dict:
    """Train one model (`fit`) and return its curve: {"memory_layers", "curve", "final"}."""
    return fit(memory, args)[1]


def fit(memory: bool, args) -> tuple[MemSparseLM, dict]:
    """(the trained model, {"memory_layers", "curve", "final"}): `args.steps` AdamW steps on the probe's samples,
    a third of them with the key inside the window; accuracy per distance band every `args.eval_every` steps."""
    model = build(memory, args.seed, getattr(args, "train_passes", 0), getattr(args, "memory_conv", 0),
                  getattr(args, "depth", 2), getattr(args, "chunk_size", None) or 16 * getattr(args, "scale", 1),
                  getattr(args, "scale", 1), getattr(args, "forget_init", 1e-4))
    opt = torch.optim.AdamW(probe_groups(model, args.lr, getattr(args, "memory_lr_scale", 1.0)), lr=args.lr,
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)  # the same samples for both models
    t0, curve = time.time(), []
    kl = getattr(args, "key_length", 1)
    fl, far = getattr(args, "filler", "sky"), getattr(args, "far", None)
    ab = getattr(args, "alphabet", len(KEYS))
    # --unseen N: the alphabet's last N letters never appear in a training key; scored in bands of their own
    unseen = getattr(args, "unseen", 0)
    seen_letters, unseen_letters = KEYS[:ab - unseen], KEYS[ab - unseen:ab]
    train_letters = rare_mix(seen_letters, unseen_letters, getattr(args, "unseen_share", 0.0))
    balanced_from = getattr(args, "balanced_from", 0)  # from this step on, keys over the whole alphabet
    extra = unseen_letters if getattr(args, "unseen_in_filler", False) else ""
    sc = getattr(args, "scale", 1)  # --scale S: window, segment and the bands' distances S times the committed runs'
    bands = [("in_window", 8 * sc, 24 * sc), ("relay", 40 * sc, 90 * sc), ("beyond_attention", 112 * sc, 160 * sc)]
    if far:
        bands.append(("far", *far))
    top = max(hi for _, _, hi in bands)
    copy, relay = getattr(args, "copy_steps", 0), getattr(args, "relay_steps", 0)
    share = getattr(args, "beyond_share", None)
    relay_top = max(hi for b, _, hi in bands if b == "relay")
    total = copy + relay + args.steps
    tau, seen_counts = getattr(args, "logit_adjust", 0.0), torch.zeros(VOCAB)
    tau_from = getattr(args, "logit_adjust_from", 0)  # plain loss up to this step; the prior counted after it
    stop = getattr(args, "stop", False)
    for step in range(1, total + 1):
        # a third of the samples inside the window: the copy is learned there, then needed beyond it (all of
        # them during the --copy-steps first steps; during the --relay-steps after them the others reach only
        # as far back as attention relays)
        mixed = step > copy and (step - copy) % 3
        hi = relay_top if step <= copy + relay else top
        # --beyond-share X: the full mix's keys lie beyond attention (112-160) with probability X, else 8-40 back
        # (within attention's reach: attention alone answers only ~2/3 of the 40-90 band), instead of uniform over
        # 8-160
        beyond = None
        if balanced_from and step == balanced_from:
            bshare = getattr(args, "balanced_share", None)
            train_letters = KEYS[:ab] if bshare is None else rare_mix(seen_letters, unseen_letters, bshare)
        if mixed and step > copy + relay and share is not None:
            hi, beyond = getattr(args, "near_max", 40) * sc, (112 * sc, 160 * sc, share)
        ids, labels, _ = (batch(g, args.batch, 8 * sc, hi, args.length, kl, fl, train_letters, extra, beyond, stop)
                          if mixed else batch(g, args.batch, 8 * sc, 24 * sc, args.length, kl, fl, train_letters,
                                              extra, stop=stop))
        kind = getattr(args, "loss", "answer")
        if step <= copy:  # --copy-loss: the copying start's own loss (as the GPU stage 1's loss on every token)
            kind = getattr(args, "copy_loss", None) or kind
        lab = training_labels(ids, labels, kind)
        if tau and step > tau_from:  # --logit-adjust: loss on logits + tau * log(prior so far)
            out = model(ids)
            seen_counts += torch.bincount(lab[lab != -100], minlength=VOCAB).float()
            loss = adjusted_cross_entropy(out.logits, lab, seen_counts, tau)
        else:
            out = model(ids, labels=lab)
            loss = out.loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == total:
            n = getattr(args, "eval_samples", 200)
            row = {"step": step, "loss": float(loss.detach()), "wall_s": round(time.time() - t0, 1)}
            # the memory's learned write rates on this step's batch (train/memory_* of memsparse-train)
            row.update({k: float(out.stats[k]) for k in ("memory_lr", "memory_forget", "memory_keep_1k")
                        if k in out.stats})
            scored = [(b, lo, hi, seen_letters) for b, lo, hi in bands]
            if unseen:
                scored += [(f"unseen_{b}", lo, hi, unseen_letters) for b, lo, hi in bands if b != "relay"]
            # --eval-no-writes: the same prompts again with the memory's writes off (acc_<band>_no_writes)
            passes = [("", True)] + ([("_no_writes", False)] if memory and getattr(args, "eval_no_writes", False)
                                     else [])
            for suffix, writes in passes:
                ge = torch.Generator().manual_seed(10_000)
                with model.memory_writes_as(writes):
                    for band, lo, hi, letters in scored:
                        acc = accuracy(model, ge, lo, hi, args.length, n, kl, kl > 1 or stop, fl, letters, extra,
                                       stop)
                        if kl > 1 or stop:  # per-letter accuracy beside the exact match (a 1-letter key: the same)
                            row[f"acc_{band}{suffix}"] = acc[0]
                            if writes:
                                row[f"tok_{band}"] = acc[1]
                        else:
                            row[f"acc_{band}{suffix}"] = acc
            curve.append(row)
            print(("memory   " if memory else "no memory"), json.dumps(row), flush=True)
    return model, {"memory_layers": [1] if memory else [], "curve": curve, "final": curve[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--copy-steps", type=int, default=0,
                    help="steps on in-window keys only, before the --steps of the mixed schedule")
    ap.add_argument("--relay-steps", type=int, default=0,
                    help="steps after --copy-steps whose keys lie at most as far back as attention relays (the "
                         "relay band), before the --steps of the full mix")
    ap.add_argument("--beyond-share", type=float, default=None,
                    help="share of the full mix's keys beyond attention (112-160 back), the rest within its reach "
                         "(8-40); default: uniform over 8-160")
    ap.add_argument("--near-max", type=int, default=40,
                    help="with --beyond-share: the other keys lie 8 to this many tokens back (x --scale; default 40)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=None, help="tokens a sample (default 192 x --scale)")
    ap.add_argument("--scale", type=int, default=1,
                    help="window, segment, the bands' distances and the default length S times the committed runs' "
                         "(32 / 16 / 8-160 / 192): a write step of the whole segment then holds 16 x S tokens")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--key-length", type=int, default=1, help="letters in the key (each one a labelled token)")
    ap.add_argument("--far", default=None, help="LO,HI: a band of keys LO-HI tokens back, trained and scored")
    ap.add_argument("--filler", default="sky", choices=["sky", "random"],
                    help="the haystack: a repeated sentence (sky) or random lowercase letters (random)")
    ap.add_argument("--no-baseline", action="store_true", help="train only the memory model")
    ap.add_argument("--alphabet", type=int, default=len(KEYS),
                    help=f"draw the key's letters from the first N of {KEYS} (default all {len(KEYS)}; fewer: more "
                         "repeated letters in a key)")
    ap.add_argument("--memory-conv", type=int, default=0,
                    help="taps of the memory's short causal q/k/v convolution (memory.conv; 0: none)")
    ap.add_argument("--depth", type=int, default=2,
                    help="layers (memory in layer 1); each relays attention one window further back")
    ap.add_argument("--memory-lr-scale", type=float, default=1.0,
                    help="the memory's parameters train at this multiple of --lr (model.memory_lr_scale)")
    ap.add_argument("--unseen", type=int, default=0,
                    help="the alphabet's last N letters never appear in a training key (scored in unseen_* bands)")
    ap.add_argument("--unseen-in-filler", action="store_true",
                    help="with --filler random, the unseen letters appear in the filler (as input tokens only)")
    ap.add_argument("--unseen-share", type=float, default=0.0,
                    help="with --unseen N: those letters are rare instead, about this share of training key letters")
    ap.add_argument("--balanced-from", type=int, default=0,
                    help="with --unseen N: from this step on, training keys draw every letter of the alphabet "
                         "uniformly (a last stage of balanced keys)")
    ap.add_argument("--balanced-share", type=float, default=None,
                    help="with --balanced-from: the unseen letters make up about this share of that stage's key "
                         "letters (default: their uniform share)")
    ap.add_argument("--loss", default="answer", choices=["answer", "all"],
                    help="train on the key's letters only (default), or on every next token (filler included)")
    ap.add_argument("--copy-loss", default=None, choices=["answer", "all"],
                    help="the loss of the --copy-steps start (default: --loss): all, then the answer only, is the "
                         "GPU curriculum's stage 1 then stage 2")
    ap.add_argument("--logit-adjust", type=float, default=0.0,
                    help="TAU > 0: train on logits + TAU * log(prior of the labelled tokens so far), decode the raw "
                         "logits (logit adjustment against the answers' prior; 0: plain cross-entropy)")
    ap.add_argument("--logit-adjust-from", type=int, default=0,
                    help="with --logit-adjust: the plain loss up to step N, the adjusted one after it with the prior "
                         "counted from step N + 1 (a plain start, then the adjustment, as a GPU curriculum's stage 2 "
                         "started from a plain stage 1 with fresh counts)")
    ap.add_argument("--stop", action="store_true",
                    help="every answer ends with a labelled stop token (';'), scored with the key (exact match): an "
                         "end-of-answer token as frequent as the answers, as the GPU tasks' stop")
    ap.add_argument("--eval-no-writes", action="store_true",
                    help="also score every band with the memory's writes off (acc_<band>_no_writes; the same "
                         "prompts): what attention alone finds, as RetrievalEval's no_writes on the GPU")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="tokens a write step of the memory takes (a divisor of the segment, 16 x --scale; default: "
                         "the segment; the GPU recipes write 256-token segments in one step)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.logit_adjust < 0:
        ap.error(f"--logit-adjust must be >= 0, got {args.logit_adjust}")
    if args.logit_adjust_from < 0 or (args.logit_adjust_from and not args.logit_adjust):
        ap.error(f"--logit-adjust-from needs --logit-adjust TAU and a step >= 0, got {args.logit_adjust_from}")
    if not 0 <= args.unseen < args.alphabet:
        ap.error(f"--unseen must be in [0, --alphabet), got {args.unseen}")
    if not 0.0 <= args.unseen_share < 1.0 or (args.unseen_share and not args.unseen):
        ap.error(f"--unseen-share needs --unseen N and a share in [0, 1), got {args.unseen_share}")
    if args.balanced_from < 0 or (args.balanced_from and not args.unseen):
        ap.error(f"--balanced-from needs --unseen N and a step >= 1, got {args.balanced_from}")
    if args.balanced_share is not None and (not args.balanced_from or not 0.0 < args.balanced_share < 1.0):
        ap.error(f"--balanced-share needs --balanced-from N and a share in (0, 1), got {args.balanced_share}")
    if args.unseen_in_filler and (args.filler != "random" or not args.unseen):
        ap.error("--unseen-in-filler needs --filler random and --unseen N")
    if not 2 <= args.alphabet <= len(KEYS):
        ap.error(f"--alphabet must be in [2, {len(KEYS)}], got {args.alphabet}")
    if args.memory_conv < 0:
        ap.error(f"--memory-conv must be >= 0, got {args.memory_conv}")
    if args.memory_lr_scale <= 0:
        ap.error(f"--memory-lr-scale must be > 0, got {args.memory_lr_scale}")
    if args.depth < 2:
        ap.error(f"--depth must be >= 2 (the memory sits in layer 1), got {args.depth}")
    if args.scale < 1:
        ap.error(f"--scale must be >= 1, got {args.scale}")
    args.length = args.length or 192 * args.scale
    args.chunk_size = args.chunk_size or 16 * args.scale
    if args.chunk_size < 1 or (16 * args.scale) % args.chunk_size:
        ap.error(f"--chunk-size must divide the segment ({16 * args.scale}), got {args.chunk_size}")
    if args.copy_steps < 0:
        ap.error(f"--copy-steps must be >= 0, got {args.copy_steps}")
    if args.copy_loss and not args.copy_steps:
        ap.error("--copy-loss needs --copy-steps N")
    if args.relay_steps < 0:
        ap.error(f"--relay-steps must be >= 0, got {args.relay_steps}")
    if args.beyond_share is not None and not (0.0 <= args.beyond_share <= 1.0 and not args.far):
        ap.error(f"--beyond-share must be in [0, 1] (and not with --far), got {args.beyond_share}")
    if not 8 <= args.near_max < 112:
        ap.error(f"--near-max must be in [8, 112), got {args.near_max}")
    if args.key_length < 1:
        ap.error(f"--key-length must be >= 1, got {args.key_length}")
    if args.far:
        try:
            args.far = [int(x) for x in args.far.split(",")]
            ok = len(args.far) == 2 and 0 < args.far[0] <= args.far[1]
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"--far must be LO,HI with 0 < LO <= HI, got {args.far!r}")
        need = 3 + args.key_length + args.far[1] + 3 + args.key_length  # K=<key>; filler ?K=<key>
        if args.length < need:
            ap.error(f"--length {args.length} cannot hold a key {args.far[1]} tokens back: use --length >= {need}")
    torch.set_num_threads(args.threads)
    runs = [train(True, args)] + ([] if args.no_baseline else [train(False, args)])
    result = {"args": vars(args), "chance": 1 / args.alphabet ** args.key_length, "runs": runs,
              "torch": torch.__version__, "device": "cpu"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
