"""Does a long stream of memory writes before the key spoil a copy inside the attention window? CPU, toy scale.

The far-keys GPU model (docs/results.md, 2026-12-06) copies a passkey sitting next to the question at 0.8 up to 32K
tokens but 0.4 at 128K, where it writes near misses (" 34687" for 34618) that are the same whatever the key's depth:
after ~500 write steps of haystack the memory may have drifted where training (4-6K-token samples, ~20 write steps)
never took it, and its read may now override attention's copy. This probe trains the toy MAC model of
`benchmarks/cpu_memory_probe.py` (2 layers, window 32, memory in layer 1 writing every 16 tokens, random-letter
filler) on its usual 192-token samples, then scores keys inside the window (8-24 tokens back) behind a prefix of 0 to
N filler tokens, with the memory's writes on and off: if the prefix alone lowers the copy with the writes on and not
with them off, the memory's drift over long streams is what spoils it.

    python benchmarks/cpu_long_prefix_probe.py --steps 400 --prefixes 0,256,1024,4096 --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_memory_probe as cmp  # noqa: E402


def prefixed_batch(g: torch.Generator, n: int, prefix: int, length: int) -> tuple[torch.Tensor, list]:
    """n samples of `prefix` random filler tokens, then a probe sample of `length` with its key 8-24 tokens before
    the question: (ids (n, prefix + length), [(key ids, question index)])."""
    rows, ans = [], []
    chars = cmp.RANDOM_FILLER
    for _ in range(n):
        ids, key, q = cmp.sample(g, int(torch.randint(8, 25, (1,), generator=g)), length, 1, "random")
        pre = [ord(chars[i]) for i in torch.randint(len(chars), (prefix,), generator=g).tolist()]
        rows.append(pre + ids)
        ans.append((key, q + prefix))
    return torch.tensor(rows), ans


@torch.no_grad()
def copy_accuracy(model, prefix: int, length: int, n: int, seed: int, writes: bool) -> float:
    """Exact match of the key behind a `prefix`-token prefix (argmax at the question), memory writes on or off."""
    g = torch.Generator().manual_seed(seed)
    ids, ans = prefixed_batch(g, n, prefix, length)
    model.eval()
    with model.memory_writes_as(writes):
        hits = cmp.key_hits(model(ids).logits, ans)
    model.train()
    return sum(all(h) for h in hits) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--prefixes", default="0,256,1024,4096")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forget-init", type=float, default=1e-4,
                    help="the memory's initial forgetting rate (1e-4: the toy's; the GPU recipes 3e-6)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        prefixes = [int(p) for p in args.prefixes.split(",")]
    except ValueError:
        ap.error(f"--prefixes must be integers, got {args.prefixes!r}")
    if args.steps < 1 or args.samples < 1 or any(p < 0 for p in prefixes) or not 0 < args.forget_init < 1:
        ap.error("--steps and --samples must be >= 1, every prefix >= 0 and --forget-init in (0, 1)")
    torch.set_num_threads(args.threads)
    train_args = argparse.Namespace(steps=args.steps, lr=3e-3, batch=32, length=192, eval_every=args.steps,
                                    seed=args.seed, filler="random", eval_samples=args.samples,
                                    forget_init=args.forget_init)
    t0 = time.time()
    model, run = cmp.fit(True, train_args)
    train_s = time.time() - t0
    rows = []
    for prefix in prefixes:
        row = {"prefix": prefix, "writes_on": copy_accuracy(model, prefix, 192, args.samples, 10_000, True),
               "writes_off": copy_accuracy(model, prefix, 192, args.samples, 10_000, False)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"args": vars(args), "train": {"final": run["final"], "wall_s": round(train_s, 1)},
              "rows": rows, "chance": 1 / len(cmp.KEYS), "torch": torch.__version__, "device": "cpu"}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
