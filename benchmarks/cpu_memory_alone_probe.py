"""The multi-key probe's samples through the neural memory alone: can the memory, without the language model around
it, learn to answer a name by its value? A CPU bisection step for `cpu_multikey_probe.py`.

The samples are `cpu_multikey_probe.py`'s all_beyond band (P key-value pairs "3=Q;" 112-160 tokens back in random
letters, "?3=" asks one). The model is byte embeddings -> `NeuralMemory` (linear, 4 heads of 16, a 4-tap q/k/v
convolution, chunks of 16) -> a linear head: every context token before the question is written into the memory,
and the memory is read once, by the query at the question's "=". No attention, no other layer. `--oracle-shift`
fixes the convolution as `cpu_multikey_probe.oracle_shift` does (keys the name 2 back, queries the name 1 back);
without it the convolution starts as `--conv-init` says and is learned. Chance is 1/20; a memory that keeps the
values but not their names scores about 1/P.

    python benchmarks/cpu_memory_alone_probe.py --oracle-shift --out benchmarks/results/memory_alone/oracle
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from memsparse.config import MemoryConfig
from memsparse.memory import NeuralMemory

_spec = importlib.util.spec_from_file_location("cpu_multikey_probe", Path(__file__).with_name("cpu_multikey_probe.py"))
mk = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cpu_multikey_probe", mk)
_spec.loader.exec_module(mk)


class MemoryAlone(nn.Module):
    """Byte embeddings (dim 64) -> NeuralMemory -> a linear head over the 256 bytes."""

    def __init__(self, conv_init: str = "identity", oracle: bool = False, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.memory = NeuralMemory(dim, MemoryConfig(heads=4, head_dim=16, depth=1, chunk_size=16, forget_init=1e-4,
                                                     conv=4, conv_init=conv_init))
        self.head = nn.Linear(dim, 256)
        if oracle:
            mk.oracle_shift([self.memory])

    def forward(self, ids: torch.Tensor, q: int) -> torch.Tensor:
        """ids `(B, N)` with the question's last token at index q (every row alike) -> logits `(B, 256)` there."""
        inp = self.memory.project(self.embed(ids))
        state, _ = self.memory.write(self.memory.init_state(ids.shape[0]), inp.slice(slice(0, q - 2)))  # before "?"
        return self.head(self.memory.merge_heads(self.memory.read(state, inp.q[:, :, q:q + 1])))[:, 0]


def draw(g: torch.Generator, n: int, pairs: int, length: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """n all_beyond samples: (ids (n, length), the question's index, answers (n,))."""
    lo, hi, others = mk.ALL_BEYOND
    ids, _, ans = mk.batch(g, n, pairs, lo, hi, length, others)
    (q,) = {a[1] for a in ans}  # every sample puts its question at the same index
    return ids, q, torch.tensor([a[0] for a in ans])


def fit(args) -> dict:
    """Train one MemoryAlone; {"curve": [{"step", "loss", "acc", "wall_s"}], "final": the last row}."""
    torch.manual_seed(args.seed)
    model = MemoryAlone(args.conv_init, args.oracle_shift)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g, t0, curve = torch.Generator().manual_seed(args.seed), time.time(), []
    for step in range(1, args.steps + 1):
        ids, q, ans = draw(g, args.batch, args.pairs, args.length)
        loss = F.cross_entropy(model(ids, q), ans)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                ids, q, ans = draw(torch.Generator().manual_seed(10_000), args.eval_samples, args.pairs, args.length)
                acc = (model(ids, q).argmax(-1) == ans).float().mean().item()
            curve.append({"step": step, "loss": round(loss.item(), 4), "acc": acc,
                          "wall_s": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
    return {"curve": curve, "final": curve[-1]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    mk.add_run_args(ap, steps=600)
    ap.add_argument("--conv-init", choices=["identity", "random"], default="identity")
    ap.add_argument("--oracle-shift", action="store_true", help="fix the convolution: keys 2 back, queries 1 back")
    ap.add_argument("--out", default=None, help="directory for memory_alone.json")
    args = ap.parse_args(argv)
    if not 1 <= args.pairs <= 8:
        ap.error(f"--pairs must be 1-8, got {args.pairs}")
    if args.length < mk.min_length():
        ap.error(f"--length must be >= {mk.min_length()} (a pair {mk.TOP} tokens back), got {args.length}")
    if min(args.steps, args.batch, args.eval_every, args.eval_samples) < 1:
        ap.error("--steps, --batch, --eval-every and --eval-samples must be >= 1")
    torch.set_num_threads(args.threads)
    result = {"args": vars(args), "chance": 1 / len(mk.VALUES), **fit(args), "torch": torch.__version__,
              "device": "cpu"}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "memory_alone.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
