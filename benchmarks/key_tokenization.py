"""How a tokenizer splits a retrieval task's keys, and which of memsparse-eval's sample keys are rare tokens.

A model trained on synthetic samples only ever produces a key token it has seen as an answer. With a byte-level
BPE whose merges follow the corpus, most 5-digit keys are 2-4 common tokens, but a few are one merged token
that a random key almost never contains: such a key is one the model cannot copy, and when memsparse-eval's
samples (the same seeds at every length and depth) hit one, every cell of that sample fails.

    python benchmarks/key_tokenization.py --tokenizer outputs/retrieval_small_copy/tokenizer --samples 5
    python benchmarks/key_tokenization.py --bpe-stdlib 100 --vocab 16384 --samples 10 --out key_tokens.json

`--bpe-stdlib N` trains the BPE the retrieval recipes train (stage 1: the first N stdlib modules, 5% held out,
seed 0, `--split-digits` as `data.bpe_split_digits`) instead of loading one. Prints one line per sample key and
the distribution over all keys; `--out` writes the same as JSON. `--balanced-draws N` adds, per sample key, how
often N draws of the training task `passkey_balanced` (`TokenBalancedNumbers`, `--balance` as its balance) are
expected to draw it: e.g. 6000 for stage 3 of the curriculum with `balanced_keys_stage3.yaml` (12 x 1,000 rows,
half of them passkey_balanced).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

THRESHOLDS = (1e-4, 1e-3, 1e-2)


def key_statistics(tokenizer, digits: int = 5) -> tuple[dict, dict[int, tuple[int, ...]], collections.Counter]:
    """Over every key of `digits` digits (as the answer " NNNNN" is encoded): tokens per key, distinct tokens,
    and the share of keys whose rarest token occurs in fewer than each threshold's share of keys."""
    keys = range(10 ** (digits - 1), 10**digits)
    enc = {k: tuple(tokenizer.encode(f" {k}")) for k in keys}
    share = collections.Counter(t for e in enc.values() for t in set(e))
    n = len(enc)
    rarest = [min(share[t] for t in e) / n for e in enc.values()]
    stats = {
        "keys": n,
        "tokens_per_key": {str(c): m for c, m in sorted(collections.Counter(len(e) for e in enc.values()).items())},
        "distinct_tokens": len(share),
        "single_token_keys": sum(len(e) == 1 for e in enc.values()),
        "share_rarest_below": {f"{t:g}": sum(r < t for r in rarest) / n for t in THRESHOLDS},
    }
    return stats, enc, share


def sample_keys(tokenizer, task_name: str, samples: int, seed: int, enc, share, n_keys: int) -> list[dict]:
    """memsparse-eval's keys for samples 0..samples-1 (the same at every length and depth) and their tokens."""
    from memsparse.eval.harness import sample_seed
    from memsparse.eval.tasks import get_task

    task = get_task(task_name)
    rows = []
    for i in range(samples):
        s = task.generate(1024, 0.5, sample_seed(seed, i), tokenizer)
        ids = enc.get(int(s.answer)) if s.answer.isdigit() else None
        ids = tuple(tokenizer.encode(f" {s.answer}")) if ids is None else ids
        rows.append({"sample": i, "key": s.answer, "tokens": [tokenizer.decode([t]) for t in ids],
                     "rarest_token_keys": min(share.get(t, 0) for t in ids),
                     "rarest_token_share": min(share.get(t, 0) for t in ids) / n_keys})
    return rows


def add_balanced_draws(rows: list[dict], tokenizer, digits: int, balance: float, draws: int) -> None:
    """Adds to each sample row the probability that one `TokenBalancedNumbers(digits, balance)` draw is its key
    (`balanced_p`) and the expected count in `draws` draws (`balanced_expected`)."""
    from memsparse.eval.tasks.kinds import TokenBalancedNumbers

    p = TokenBalancedNumbers(digits, balance).probabilities(tokenizer)
    lo = 10 ** (digits - 1)
    for r in rows:
        q = float(p[int(r["key"]) - lo]) if r["key"].isdigit() and len(r["key"]) == digits else 0.0
        r["balanced_p"], r["balanced_expected"] = q, q * draws


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="a saved tokenizer directory (e.g. a run's export or tokenizer dir)")
    src.add_argument("--bpe-stdlib", type=int, metavar="N", help="train the recipes' BPE on N stdlib modules")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--split-digits", action="store_true", help="as data.bpe_split_digits: true")
    ap.add_argument("--digit-group", type=int, default=0, help="as data.bpe_digit_group (runs of <= n digits)")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--digits", type=int, default=5, help="the task's key digits (passkey: 5)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="memsparse-eval's --seed")
    ap.add_argument("--balanced-draws", type=int, default=0, metavar="N",
                    help="add each sample key's expected count in N draws of passkey_balanced's keys")
    ap.add_argument("--balance", type=float, default=0.5, help="the balanced draw's balance (passkey_balanced: 0.5)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.balanced_draws < 0 or not 0.0 <= args.balance <= 1.0:
        raise SystemExit("--balanced-draws must be >= 0 and --balance in [0, 1]")

    from memsparse.tokenizer import load_tokenizer, train_bpe

    if args.tokenizer is not None:
        if not Path(args.tokenizer).exists():
            raise SystemExit(f"--tokenizer: {args.tokenizer} does not exist")
        tok, source = load_tokenizer(args.tokenizer), args.tokenizer
    else:
        from memsparse.train.data import default_documents, split_documents

        train_docs, _ = split_documents(default_documents(limit=args.bpe_stdlib), 0.05, seed=0)
        tok = train_bpe(iter(train_docs), args.vocab, split_digits=args.split_digits, digit_group=args.digit_group)
        source = (f"BPE {args.vocab} on {args.bpe_stdlib} stdlib modules, split_digits={args.split_digits}, "
                  f"digit_group={args.digit_group}")
    stats, enc, share = key_statistics(tok, args.digits)
    rows = sample_keys(tok, args.task, args.samples, args.seed, enc, share, stats["keys"])
    if args.balanced_draws:
        add_balanced_draws(rows, tok, args.digits, args.balance, args.balanced_draws)
    for r in rows:
        drawn = (f"; {r['balanced_expected']:.2f} expected in {args.balanced_draws} balanced draws"
                 if "balanced_expected" in r else "")
        print(f"sample {r['sample']}: {r['key']} -> {r['tokens']} (its rarest token is in {r['rarest_token_keys']} "
              f"of {stats['keys']} keys{drawn})")
    print(f"{stats['keys']} keys: tokens per key {stats['tokens_per_key']}, {stats['single_token_keys']} are one "
          f"token; rarest token in < 0.01% / 0.1% / 1% of keys: "
          + " / ".join(f"{v:.1%}" for v in stats["share_rarest_below"].values()))
    out = {"command": " ".join(["python benchmarks/key_tokenization.py", *(sys.argv[1:] if argv is None else argv)]),
           "python": sys.version.split()[0], "tokenizer": source, "task": args.task, "digits": args.digits,
           "seed": args.seed, "balanced_draws": args.balanced_draws, "balance": args.balance, **stats,
           "samples": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
