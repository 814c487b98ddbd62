"""How often a training stage showed each key as an answer: the stage's own rows, in the order it trained them.

A model writes a key token only after training on it as an answer, and a one-token key (" 32684" under the
retrieval recipes' BPE) comes up a handful of times a stage. This replays a stage's data exactly as
`memsparse-train fit` drew it (the recipe and overlays as given to the stage, its data seed, the tokenizer it
trained with, the sampler's order, `max_steps` x `batch_size` rows on one process) and counts the keys of its
passkey-like rows, without a model or a GPU:

    python benchmarks/key_exposure.py --tokenizer RUN/tokenizer --config recipes/retrieval_small_long.yaml \\
        --config recipes/overlays/balanced_keys_stage3.yaml --data-seed 1 --keys 32684,34618 --out exposure.json

`--tokenizer`: the BPE the stage trained with (`run_retrieval.sh` copies stage 1's into its results as
`tokenizer/`). `--steps`: the rows of that many steps (default: the recipe's `trainer.max_steps`). Prints one line
per asked key (the rows and the steps that held it) and the passkey rows in all; `--out` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import warnings
from pathlib import Path

import yaml


def resolved_config(configs: list[str], extra: list[str]) -> dict:
    """The stage's configuration as `memsparse-train fit --config ... --print_config` resolves it."""
    cmd = [sys.executable, "-m", "memsparse.train.cli", "fit"]
    for c in configs:
        cmd += ["--config", c]
    p = subprocess.run([*cmd, *extra, "--print_config"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"key_exposure: the configuration does not resolve: {p.stderr.strip().splitlines()[-1:]}")
    return yaml.safe_load(p.stdout)


def stage_answers(data_cfg: dict, tokenizer_dir: str, steps: int, tasks: tuple[str, ...] = ("passkey",)):
    """Yields (step, task name, answer text) for every row of the first `steps` steps whose task name starts with
    one of `tasks`, in the order the stage's sampler dealt them (one process)."""
    from memsparse.train.data import MemSparseDataModule
    from memsparse.train.packing import SyntheticTaskDataset
    from memsparse.train.sampler import ResumableDistributedSampler

    cfg = {k: v for k, v in data_cfg.items() if k not in ("num_workers", "persistent_workers", "pin_memory")}
    cfg["tokenizer_dir"] = tokenizer_dir
    dm = MemSparseDataModule(**cfg)
    with warnings.catch_warnings():  # a later stage reuses stage 1's BPE, as the stage itself did
        warnings.filterwarnings("ignore", message="reusing the BPE saved")
        dm.setup("fit")
    ds, tok = dm.train_dataset, dm.tokenizer
    sampler = ResumableDistributedSampler(ds, dm.batch_size, num_replicas=1, rank=0, shuffle=True, seed=dm.seed,
                                          epoch_indices=True)
    rows, epoch = steps * dm.batch_size, 0
    n = 0
    while n < rows:
        sampler.set_epoch(epoch)
        for index in sampler:
            if n >= rows:
                break
            step = n // dm.batch_size
            n += 1
            part, local = ds.locate(index)
            if not isinstance(part, SyntheticTaskDataset) or not part.name.startswith(tasks):
                continue
            length, depth, seed = part.params(local)
            _, answer = part.generate(length, depth, seed)
            yield step, part.name, tok.decode(answer).strip()
        epoch += 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the tokenizer directory the stage trained with")
    ap.add_argument("--config", action="append", required=True, help="the stage's recipe, then its overlays")
    ap.add_argument("--data-seed", type=int, default=None, help="--data.seed as given to the stage")
    ap.add_argument("--steps", type=int, default=None, help="rows of this many steps (default: trainer.max_steps)")
    ap.add_argument("--keys", default="", help="comma-separated keys to report (default: the 5 most drawn)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not Path(args.tokenizer).is_dir():
        raise SystemExit(f"--tokenizer: {args.tokenizer} is not a directory")
    extra = [] if args.data_seed is None else ["--data.seed", str(args.data_seed)]
    cfg = resolved_config(args.config, extra)
    steps = args.steps if args.steps is not None else int(cfg["trainer"]["max_steps"])
    if steps <= 0:
        raise SystemExit("--steps must be > 0 (or the recipe's trainer.max_steps)")
    data = cfg["data"]["init_args"] if "init_args" in cfg["data"] else cfg["data"]
    counts: collections.Counter = collections.Counter()
    at: dict[str, list[int]] = collections.defaultdict(list)
    by_task: collections.Counter = collections.Counter()
    for step, task, key in stage_answers(data, args.tokenizer, steps):
        counts[key] += 1
        at[key].append(step)
        by_task[task] += 1
    wanted = [k.strip() for k in args.keys.split(",") if k.strip()] or [k for k, _ in counts.most_common(5)]
    report = {k: {"rows": counts[k], "steps": at[k]} for k in wanted}
    for k, r in report.items():
        print(f"{k}: {r['rows']} rows, at steps {r['steps'][:20]}{' ...' if len(r['steps']) > 20 else ''}")
    print(f"{sum(by_task.values())} passkey rows in {steps} steps x {data['batch_size']}: {dict(by_task)}; "
          f"{len(counts)} distinct keys")
    out = {"command": " ".join(["python benchmarks/key_exposure.py", *(sys.argv[1:] if argv is None else argv)]),
           "steps": steps, "batch_size": data["batch_size"], "data_seed": data["seed"], "rows_by_task": dict(by_task),
           "distinct_keys": len(counts), "keys": report}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
