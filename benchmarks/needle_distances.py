"""How far back a recipe's synthetic samples put their needles: the share of samples whose needle lies at least D
tokens before the question, per task and over the mixture (weighted by the tasks' proportions).

    python benchmarks/needle_distances.py recipes/retrieval_small.yaml
    python benchmarks/needle_distances.py recipes/retrieval_small.yaml recipes/overlays/near_keys_stage2.yaml \
        --distances 1024,1200,1500 --samples 400 --out x.json

The last given file that sets `data.synthetic` defines the mixture (an overlay replaces the list). Samples are
generated exactly as training draws them (`SyntheticTaskDataset`: lengths, depths, seeds), with the byte tokenizer:
lengths and depths are in tokens, so the distances are those of any tokenizer up to the needles' own lengths.
Distance = tokens from the needle's end to the prompt's end; a task with several needles (niah_multikey) counts its
nearest and its farthest needle (the one asked lies between). Attention relayed through the retrieval recipes'
layers reaches keys ~1K back (never 1.5K in a measured stage 2), so the share past 1.5K is what only the memory
can answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def mixture(paths: list[str]) -> tuple[list[dict], int, int]:
    """(data.synthetic, data.seq_len, data.seed) of the last files that set them."""
    synthetic, seq_len, seed = None, None, 0
    for p in paths:
        data = (yaml.safe_load(Path(p).read_text()) or {}).get("data") or {}
        synthetic = data.get("synthetic", synthetic)
        seq_len = data.get("seq_len", seq_len)
        seed = data.get("seed", seed)
    if not synthetic or not seq_len:
        raise ValueError(f"no data.synthetic / data.seq_len in {paths}")
    return synthetic, int(seq_len), int(seed)


def distances(spec: dict, k: int, seq_len: int, seed: int, n: int) -> list[tuple[int, int]]:
    """(nearest, farthest) needle distance of the first `n` training samples of mixture entry `k`."""
    from memsparse.train.packing import SyntheticTaskDataset

    from memsparse.tokenizer import ByteTokenizer

    depths = spec.get("depths", [0.0, 1.0])
    ds = SyntheticTaskDataset(spec["task"], n, spec.get("lengths") or [seq_len], seq_len, ByteTokenizer(), seed,
                              source=1 + k, depths=(float(depths[0]), float(depths[1])))
    out = []
    for i in range(n):
        length, depth, task_seed = ds.params(i)
        prompt, _, meta = ds._generate(length, depth, task_seed)
        ends = [p + m for p, m in zip(meta["needle_positions"], meta["needle_lengths"])]
        d = [len(prompt) - e for e in ends]
        out.append((min(d), max(d)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="recipe YAML, then overlays (the last data.synthetic counts)")
    ap.add_argument("--distances", default="1024,1200,1500", help="D values (tokens), comma-separated")
    ap.add_argument("--samples", type=int, default=400, help="samples per mixture entry")
    ap.add_argument("--out", default=None, help="also write the shares as JSON")
    a = ap.parse_args(argv)
    try:
        synthetic, seq_len, seed = mixture(a.configs)
        ds = [int(x) for x in a.distances.split(",")]
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"needle_distances: {e}", file=sys.stderr)
        return 2
    rows, total = [], {d: [0.0, 0.0] for d in ds}
    weight = sum(float(s["proportion"]) for s in synthetic)
    for k, spec in enumerate(synthetic):
        dist = distances(spec, k, seq_len, seed, a.samples)
        row = {"entry": k, "task": spec["task"], "proportion": float(spec["proportion"]),
               "depths": spec.get("depths", [0.0, 1.0]), "lengths": spec.get("lengths") or [seq_len]}
        for d in ds:
            near = sum(x[0] >= d for x in dist) / len(dist)
            far = sum(x[1] >= d for x in dist) / len(dist)
            row[f"share_ge_{d}"] = [round(near, 4), round(far, 4)]
            total[d][0] += row["proportion"] / weight * near
            total[d][1] += row["proportion"] / weight * far
        rows.append(row)
    head = "| entry | task | proportion | " + " | ".join(f">= {d} back" for d in ds) + " |"
    print(head + "\n|" + "---|" * (3 + len(ds)))
    fmt = lambda v: f"{v[0]:.3f}" if v[0] == v[1] else f"{v[0]:.3f}-{v[1]:.3f}"  # noqa: E731
    for r in rows:
        print(f"| {r['entry']} | {r['task']} | {r['proportion']:g} | "
              + " | ".join(fmt(r[f'share_ge_{d}']) for d in ds) + " |")
    print("| all | mixture | " + f"{weight:g} | " + " | ".join(fmt(total[d]) for d in ds) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"configs": a.configs, "samples": a.samples, "rows": rows,
                                           "mixture": {str(d): [round(v, 4) for v in total[d]] for d in ds}},
                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
