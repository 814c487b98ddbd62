"""Does the neural memory carry a key past the attention window? A CPU probe at toy scale.

A one-letter key is stated once ("K=X;"), then predictable filler pushes it out of the attention window (window
32, segment 16: after ~48 tokens a token is in the memory only), then the question "?K=" asks for it. MemSparseLM
with a MAC memory layer and the same model without memory are trained the same way (same samples, steps, lr,
seed, loss on the answer token) and scored by greedy argmax at the question, on held-out samples with the key
inside the window (distance 8-24), beyond one window but within reach of attention relayed through both layers
(40-90: layer 0 at a position inside the question's window still saw the key), and beyond any attention path
(112-160: only the memory holds it). Chance is 1/20.

    python benchmarks/cpu_memory_probe.py --steps 600 --out benchmarks/results/cpu_memory_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM

KEYS = "ABCDEFGHIJKLMNOPQRSU"
FILLER = "the sky is blue. "
VOCAB = 128  # ASCII


def sample(g: torch.Generator, distance: int, length: int) -> tuple[list[int], int, int]:
    """(ids of `length` tokens, answer id, index of the question's last token): key at the start, filler of
    `distance` characters, then the question; padded with filler so that every sample is `length` long."""
    key = KEYS[int(torch.randint(len(KEYS), (1,), generator=g))]
    start = int(torch.randint(len(FILLER), (1,), generator=g))
    fill = (FILLER * (distance // len(FILLER) + 2))[start:start + distance]
    text = f"K={key};" + fill + "?K="
    ids = [ord(c) for c in text]
    q = len(ids) - 1
    ids = ids + [ord(key)] + [ord(c) for c in (FILLER * (length // len(FILLER) + 1))][: max(0, length - len(ids) - 1)]
    return ids[:length], ord(key), q


def batch(g, n: int, lo: int, hi: int, length: int):
    rows = [sample(g, int(torch.randint(lo, hi + 1, (1,), generator=g)), length) for _ in range(n)]
    ids = torch.tensor([r[0] for r in rows])
    labels = torch.full_like(ids, -100)
    for i, (_, ans, q) in enumerate(rows):
        labels[i, q] = ans  # the model's output at position q predicts token q + 1: the answer
    return ids, labels, [(ans, q) for _, ans, q in rows]


def build(memory: bool, seed: int, train_passes: int = 0) -> MemSparseLM:
    """The probe's model (MAC, memory in layer 1 when `memory`); `train_passes` consolidation passes in training."""
    torch.manual_seed(seed)
    return MemSparseLM(ModelConfig(
        vocab_size=VOCAB, dim=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_hidden=128, block_size=8,
        segment=16, window=32, persistent_tokens=8, budget="dense", variant="mac",
        memory_layers=[1] if memory else [],
        memory=MemoryConfig(heads=4, head_dim=16, chunk_size=16, forget_init=1e-4),
        consolidation=ConsolidationConfig(train_passes=train_passes)))


@torch.no_grad()
def accuracy(model, g, lo: int, hi: int, length: int, n: int = 200) -> float:
    model.eval()
    ids, _, ans = batch(g, n, lo, hi, length)
    logits = model(ids).logits
    model.train()
    return sum(int(logits[i, q].argmax()) == a for i, (a, q) in enumerate(ans)) / n


def train(memory: bool, args) -> dict:
    """Train one model (`fit`) and return its curve: {"memory_layers", "curve", "final"}."""
    return fit(memory, args)[1]


def fit(memory: bool, args) -> tuple[MemSparseLM, dict]:
    """(the trained model, {"memory_layers", "curve", "final"}): `args.steps` AdamW steps on the probe's samples,
    a third of them with the key inside the window; accuracy per distance band every `args.eval_every` steps."""
    model = build(memory, args.seed, getattr(args, "train_passes", 0))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)  # the same samples for both models
    t0, curve = time.time(), []
    for step in range(1, args.steps + 1):
        # a third of the samples inside the window: the copy is learned there, then needed beyond it
        ids, labels, _ = batch(g, args.batch, 8, 160, args.length) if step % 3 else batch(g, args.batch, 8, 24,
                                                                                           args.length)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            ge = torch.Generator().manual_seed(10_000)
            n = getattr(args, "eval_samples", 200)
            row = {"step": step, "loss": float(loss.detach()), "wall_s": round(time.time() - t0, 1),
                   "acc_in_window": accuracy(model, ge, 8, 24, args.length, n),
                   "acc_relay": accuracy(model, ge, 40, 90, args.length, n),
                   "acc_beyond_attention": accuracy(model, ge, 112, 160, args.length, n)}
            curve.append(row)
            print(("memory   " if memory else "no memory"), json.dumps(row), flush=True)
    return model, {"memory_layers": [1] if memory else [], "curve": curve, "final": curve[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [train(True, args), train(False, args)]
    result = {"args": vars(args), "chance": 1 / len(KEYS), "runs": runs, "torch": torch.__version__,
              "device": "cpu"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
