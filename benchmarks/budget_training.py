"""Helpers of the budget-in-training comparison (issue 19; benchmarks/run_budget_training.sh): the attention cost a
budget has on a recipe's training rows, a budget matched to a measured cost, and the comparison table.

    python benchmarks/budget_training.py kept --config recipes/ablation_retrieval_no_memory_copy.yaml \\
        --config recipes/overlays/budget_training.yaml --budget 'fixed:8;length_scaled:c=10,min_tokens=128'
    python benchmarks/budget_training.py match --config ... --family fixed --target-metrics RUN/metrics.csv
    python benchmarks/budget_training.py table top_p_fm0=RUN_A fixed=RUN_B ... --reference top_p_fm0 --out D
    python benchmarks/budget_training.py spec --config ...    # the merged recipe's model.config.budget

`kept`: mean key blocks kept per query block over the recipe's training rows, exactly as the training logs it
(`train/attn_kept_blocks`: `MemSparseLM.forward`'s statistic, a mean over every query block of the batch, the
sink and the diagonal block included, padding included), for budgets whose count does not read the scores (dense,
fixed, length_scaled): a model of the recipe's attention geometry (block, segment, window, persistent tokens,
local blocks; dims shrunk to 8, one layer: the count reads none of them) runs one row per distinct sample length,
padded and split into documents as `memsparse.train.packing` builds them (the sample, then padding as its own
document), and the rows are weighted by the mixture's shares and each task's uniform draw over its lengths. The
recipe is the `--config` files deep-merged in order (a later file's lists replace earlier ones, as the CLI does);
a mixture with packed text (shares below 1) is refused, since text rows are packed documents, not modelled here.
Attention FLOPs per token = kept blocks x 4 x block x head_dim x heads x depth (memsparse-eval's AttentionStats).

`match`: the `--family` (fixed or length_scaled) budget whose `kept` value is nearest a target: `--target` kept
blocks, or `--target-metrics` a CSVLogger metrics.csv whose logged `train/attn_kept_blocks` is averaged over all
its logged steps (the whole run's training cost; a top_p budget's count follows the learned scores). fixed: the
integer k nearest; length_scaled: c by bisection (the count is monotone in c) at `--min-tokens` (default 128: two
blocks, the forced ones). Prints the spec; `--json` also writes the target, the achieved value and the relative
difference. Exit 3 when the nearest is more than `--tol` (default 0.10) away.

`table`: one row per trained model NAME=RUN (RUN: the script's per-budget directory holding `metrics_<NAME>.csv`
and `eval/results.json`): its budget spec, the training mean kept blocks and attention FLOPs per token (from the
metrics), its difference from the `--reference` model's, the eval's mean kept blocks and FLOPs per token, and the
decoded accuracy per (task, length) (mean over depths) and overall. Writes budget_training.md, budget_training.csv
(that table) and budget_training_cells.csv (every eval cell of every model) into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

TABLE_METRIC = "train/attn_kept_blocks"


# ------------------------------------------------------------------------------------------------- the recipe


def merge(a: dict, b: dict) -> dict:
    """Deep merge of two YAML mappings: b's keys win; nested mappings merge, lists and scalars are replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(paths: list[str]) -> dict:
    cfg: dict = {}
    for p in paths:
        cfg = merge(cfg, yaml.safe_load(Path(p).read_text()) or {})
    return cfg


def mixture(cfg: dict) -> tuple[int, list[tuple[float, list[int]]]]:
    """(seq_len, [(share, lengths), ...]) of the recipe's synthetic mixture, shares normalised to 1."""
    data = cfg.get("data") or {}
    seq_len = int(data.get("seq_len", 1024))
    parts = [(float(s["proportion"]), [int(n) for n in (s.get("lengths") or [seq_len])])
             for s in data.get("synthetic") or []]
    total = sum(p for p, _ in parts)
    if not parts or total < 1.0 - 1e-9:
        raise SystemExit(f"the recipe's synthetic shares sum to {total:g}: rows of packed text are not modelled "
                         "(budget_training.py kept needs a mixture of synthetic tasks only)")
    return seq_len, [(p / total, lengths) for p, lengths in parts]


def geometry_model(cfg: dict, budget: str):
    """A one-layer model of the recipe's attention geometry under `budget` (dims shrunk: the count reads none)."""
    from memsparse.config import ModelConfig
    from memsparse.model import MemSparseLM

    mc = ((cfg.get("model") or {}).get("config")) or {}
    keys = ("block_size", "segment", "window", "persistent_tokens", "local_blocks")
    geo = {k: int(mc[k]) for k in keys if k in mc}
    return MemSparseLM(ModelConfig(vocab_size=8, dim=8, depth=1, heads=1, kv_heads=1, head_dim=8, mlp_hidden=8,
                                   memory_layers=[], budget=budget, **geo)).eval()


def attention_flops_per_block(cfg: dict) -> float:
    """Attention FLOPs per token per kept block, summed over layers (memsparse-eval's AttentionStats)."""
    mc = ((cfg.get("model") or {}).get("config")) or {}
    return 4.0 * int(mc.get("block_size", 16)) * int(mc.get("head_dim", 32)) * int(mc.get("heads", 4)) * \
        int(mc.get("depth", 2))


def kept_per_length(cfg: dict, budget: str, lengths: list[int], seq_len: int) -> dict[int, float]:
    """Mean kept blocks per query block of one training row per sample length (the sample + padding)."""
    import numpy as np
    import torch
    from memsparse.kernels.budget import parse_policy
    from memsparse.train.packing import _item

    if parse_policy(budget).reads_scores:
        raise SystemExit(f"{budget}: its count follows the learned scores; measure it (train/attn_kept_blocks)")
    model = geometry_model(cfg, budget)
    pad, eos, tok = 0, 1, 2
    out = {}
    with torch.no_grad():
        for n in sorted(set(lengths)):
            tokens = np.full(n + 1, tok, dtype=np.int64)
            tokens[-1] = eos  # prompt + answer (n tokens) + eos, as SyntheticTaskDataset builds a row
            item = _item(tokens, seq_len, pad, eos, 1)
            res = model(item["input_ids"][None], doc_ids=item["doc_ids"][None], return_logits=False)
            out[n] = float(res.stats["attn_kept_blocks"])
    return out


def training_kept(cfg: dict, budget: str) -> float:
    """The recipe's expected `train/attn_kept_blocks` under `budget` (rows weighted by the mixture)."""
    seq_len, parts = mixture(cfg)
    per = kept_per_length(cfg, budget, [n for _, ls in parts for n in ls], seq_len)
    return sum(share * statistics.fmean(per[n] for n in ls) for share, ls in parts)


def match(cfg: dict, family: str, target: float, min_tokens: int = 128) -> tuple[str, float]:
    """(spec, its training kept blocks) of the `family` budget nearest `target` kept blocks."""
    if family == "fixed":
        mc = ((cfg.get("model") or {}).get("config")) or {}
        top = (int(mc.get("persistent_tokens", 16)) + int(mc.get("window", 128)) + int(mc.get("segment", 64))) // \
            int(mc.get("block_size", 16)) + 1
        best = None
        for k in range(1, top + 1):
            v = training_kept(cfg, f"fixed:{k}")
            if best is None or abs(v - target) < abs(best[1] - target):
                best = (f"fixed:{k}", v)
            if v > target:
                break
        return best
    if family == "length_scaled":
        spec = lambda c: f"length_scaled:c={c:.3f},min_tokens={min_tokens}"  # noqa: E731
        lo, hi = 0.01, 1.0
        while training_kept(cfg, spec(hi)) < target and hi < 1e4:
            hi *= 2
        for _ in range(30):  # the count is a step function of c: bisect to a c at the step nearest the target
            mid = (lo + hi) / 2
            if training_kept(cfg, spec(mid)) < target:
                lo = mid
            else:
                hi = mid
        cands = [(spec(c), training_kept(cfg, spec(c))) for c in (lo, hi)]
        return min(cands, key=lambda sv: abs(sv[1] - target))
    raise SystemExit(f"match: --family must be fixed or length_scaled, got {family!r}")


def logged_mean(metrics_csv: str | Path, key: str = TABLE_METRIC) -> float | None:
    """Mean of a metric over every step a CSVLogger metrics.csv logged it (None when it never did)."""
    vals = []
    with open(metrics_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r.get(key) not in (None, ""):
                vals.append(float(r[key]))
    return statistics.fmean(vals) if vals else None


# ------------------------------------------------------------------------------------------------- the table


def _mean(vals) -> float | None:
    vals = [float(v) for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def run_row(name: str, run: Path) -> tuple[dict, list[dict]]:
    """One model's row (training and eval cost, spec) and its eval cells."""
    res_path, met_path = run / "eval" / "results.json", run / f"metrics_{name}.csv"
    row: dict = {"budget": name, "spec": None, "train_kept_blocks": None, "train_attn_flops_per_token": None,
                 "eval_kept_blocks": None, "eval_attn_flops_per_token": None}
    spec_file = run / "budget.txt"
    if spec_file.is_file():
        row["spec"] = spec_file.read_text().strip()
    cells: list[dict] = []
    per_block = None
    if res_path.is_file():
        data = json.loads(res_path.read_text())
        meta = data.get("meta") or {}
        row["spec"] = meta.get("model_budget") or row["spec"]
        mc = meta.get("model_config") or {}
        if mc:
            per_block = attention_flops_per_block({"model": {"config": mc}})
        for c in data.get("cells") or []:
            cells.append({"budget": name, "spec": row["spec"], **{k: c.get(k) for k in (
                "task", "length", "depth", "n", "accuracy", "tf_exact", "tf_token_acc", "attn_kept_blocks",
                "attn_kept_fraction", "attn_flops_per_token")}})
        row["eval_kept_blocks"] = _mean(c["attn_kept_blocks"] for c in cells)
        row["eval_attn_flops_per_token"] = _mean(c["attn_flops_per_token"] for c in cells)
        if per_block is None and row["eval_kept_blocks"] and row["eval_attn_flops_per_token"]:
            per_block = row["eval_attn_flops_per_token"] / row["eval_kept_blocks"]
    if met_path.is_file():
        row["train_kept_blocks"] = logged_mean(met_path)
        if row["train_kept_blocks"] is not None and per_block:
            row["train_attn_flops_per_token"] = row["train_kept_blocks"] * per_block
    return row, cells


def table(runs: list[tuple[str, Path]], reference: str | None, out: Path, tol: float = 0.10) -> list[dict]:
    rows, cells = [], []
    for name, run in runs:
        r, c = run_row(name, run)
        rows.append(r)
        cells += c
    ref = next((r for r in rows if r["budget"] == reference), None)
    ref_kept = ref["train_kept_blocks"] if ref else None
    keys = sorted({(c["task"], int(c["length"])) for c in cells}, key=lambda tl: (tl[0], tl[1]))
    for r in rows:
        mine = [c for c in cells if c["budget"] == r["budget"]]
        v = r["train_kept_blocks"]
        r["train_vs_reference"] = (v / ref_kept - 1.0) if (v is not None and ref_kept) else None
        r["matched"] = (abs(r["train_vs_reference"]) <= tol) if r["train_vs_reference"] is not None else None
        for task, length in keys:
            here = [c for c in mine if c["task"] == task and int(c["length"]) == length]
            r[f"{task}@{length}"] = _mean(c["accuracy"] for c in here)
        r["accuracy_mean"] = _mean(c["accuracy"] for c in mine)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "budget_training.csv", rows)
    _write_csv(out / "budget_training_cells.csv", cells)
    (out / "budget_training.md").write_text(_markdown(rows, keys, reference, tol))
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["budget"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows])


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _markdown(rows: list[dict], keys: list[tuple[str, int]], reference: str | None, tol: float) -> str:
    from memsparse.eval.harness import format_length as _fmt_len

    head = ["budget", "spec", "train kept blocks", "train attn FLOPs/token", f"vs {reference or '-'}",
            "eval attn FLOPs/token"] + [f"{t} {_fmt_len(n)}" for t, n in keys] + ["mean"]
    lines = [f"Models trained under each budget (same steps and data), scored under their own budget on one grid: "
             f"decoded accuracy, mean over depths. Training cost: the mean of the logged {TABLE_METRIC} over the "
             f"run, in FLOPs per token (x 4 x block x head_dim x heads x depth); matched = within {tol:.0%} of "
             f"{reference or 'the reference'}'s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rel = r["train_vs_reference"]
        rel_s = "-" if rel is None else f"{rel:+.1%}" + ("" if r["matched"] else " (not matched)")
        lines.append("| " + " | ".join([
            r["budget"], f"`{r['spec']}`" if r["spec"] else "-", _num(r["train_kept_blocks"], ".2f"),
            _num(r["train_attn_flops_per_token"], ".3g"), rel_s, _num(r["eval_attn_flops_per_token"], ".3g"),
            *[_num(r[f"{t}@{n}"], ".2f") for t, n in keys], _num(r["accuracy_mean"], ".2f")]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- the CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kept", help="a budget's training kept blocks and attention FLOPs per token on the recipe")
    k.add_argument("--config", action="append", required=True, help="the recipe's YAML files, in order")
    k.add_argument("--budget", required=True, help="';'-separated budget specs (dense, fixed, length_scaled)")
    m = sub.add_parser("match", help="the fixed / length_scaled budget nearest a target kept-blocks value")
    m.add_argument("--config", action="append", required=True)
    m.add_argument("--family", required=True, choices=("fixed", "length_scaled"))
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", type=float, help="kept blocks per query block")
    g.add_argument("--target-metrics", help="a metrics.csv whose mean train/attn_kept_blocks is the target")
    m.add_argument("--min-tokens", type=int, default=128)
    m.add_argument("--tol", type=float, default=0.10)
    m.add_argument("--json", default=None, help="also write the match here")
    s = sub.add_parser("spec", help="print the budget spec (model.config.budget) of the merged recipe")
    s.add_argument("--config", action="append", required=True)
    t = sub.add_parser("table", help="the comparison table of the trained models")
    t.add_argument("runs", nargs="+", help="NAME=RUN_DIR (metrics_NAME.csv, eval/results.json, budget.txt)")
    t.add_argument("--reference", default=None, help="the model whose training cost the others are matched to")
    t.add_argument("--tol", type=float, default=0.10)
    t.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    if args.cmd == "spec":
        spec = ((load_recipe(args.config).get("model") or {}).get("config") or {}).get("budget")
        if not spec:
            raise SystemExit("the recipe sets no model.config.budget")
        print(spec)
        return 0
    if args.cmd == "kept":
        cfg = load_recipe(args.config)
        per_block = attention_flops_per_block(cfg)
        for spec in [s.strip() for s in args.budget.split(";") if s.strip()]:
            v = training_kept(cfg, spec)
            print(f"{spec}\tkept blocks {v:.3f}\tattn FLOPs/token {v * per_block:.4g}")
        return 0
    if args.cmd == "match":
        cfg = load_recipe(args.config)
        target = args.target
        if target is None:
            target = logged_mean(args.target_metrics)
            if target is None:
                raise SystemExit(f"{args.target_metrics} logged no {TABLE_METRIC}")
        spec, got = match(cfg, args.family, target, args.min_tokens)
        rel = got / target - 1.0 if target else math.inf
        if args.json:
            Path(args.json).write_text(json.dumps({"family": args.family, "target_kept_blocks": target,
                                                   "target_metrics": args.target_metrics, "spec": spec,
                                                   "kept_blocks": got, "relative": rel, "tol": args.tol}, indent=1))
        print(spec)
        print(f"{spec}: {got:.3f} kept blocks against the target {target:.3f} ({rel:+.1%})", file=sys.stderr)
        return 0 if abs(rel) <= args.tol else 3
    runs = []
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"table: expected NAME=RUN_DIR, got {item!r}")
        runs.append((name, Path(path)))
    rows = table(runs, args.reference, Path(args.out), args.tol)
    print((Path(args.out) / "budget_training.md").read_text(), end="")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
