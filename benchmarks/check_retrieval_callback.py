"""RetrievalEval beside the CUDA-graph training step, on a GPU: a recipe's model and step (mac_small by default:
bf16-mixed, `cuda_graph`, the compiled memory step and pointwise chains) trained for a few steps with the callback
every K steps, then the same fit without it. Checks and records: the training step is captured once and replayed
after every evaluation, the losses of the two fits, the callback's time per invocation (the first includes Triton
autotuning for the streaming shapes), the step times right after an evaluation, and that `run_eval` on the final
weights (the `memsparse-eval` path, inference mode) predicts what the callback's last evaluation predicted.

    python benchmarks/check_retrieval_callback.py --steps 40 --every 10 --out benchmarks/results/x.json

The byte tokenizer stands in for the recipe's 16K BPE (no BPE training on the machine); the model keeps the
recipe's vocabulary size, so the output layer costs what it costs in the recipe.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from memsparse.eval.harness import run_eval
from memsparse.train.callbacks import RetrievalEval
from memsparse.train.data import MemSparseDataModule
from memsparse.train.module import MemSparseLightningModule

from memsparse.config import ModelConfig, from_dict


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimes(pl.Callback):
    """Wall time of every training batch (synchronised), and the graph's captures / replays at the end."""

    def __init__(self):
        self.times, self._t = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self.times.append(time.perf_counter() - self._t)


class Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def fit(recipe: dict, steps: int, every: int | None, root: Path, vocab: int) -> dict:
    pl.seed_everything(0)  # the same initial weights and data order in every fit
    mc = copy.deepcopy(recipe["model"]["config"])
    mc["vocab_size"] = vocab
    m = recipe["model"]
    module = MemSparseLightningModule(from_dict(ModelConfig, mc), lr=m["lr"], warmup_steps=10, total_steps=steps,
                                      min_lr=m["min_lr"], cuda_graph=m.get("cuda_graph", False),
                                      float32_matmul_precision=m.get("float32_matmul_precision"))
    d = recipe["data"]
    dm = MemSparseDataModule(stdlib_limit=200, tokenizer="byte", seq_len=d["seq_len"], batch_size=d["batch_size"],
                             val_fraction=0.0, seed=0)
    grid = next(c["init_args"] for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("RetrievalEval"))
    cb = RetrievalEval(**{**grid, "every_n_steps": every}) if every else None
    times, losses = StepTimes(), Losses()
    t = recipe["trainer"]
    trainer = pl.Trainer(accelerator=t["accelerator"], devices=1, precision=t["precision"], max_steps=steps,
                         gradient_clip_val=t["gradient_clip_val"], limit_val_batches=0, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root), logger=CSVLogger(str(root), name="csv"),
                         callbacks=[c for c in (times, losses, cb) if c is not None])  # timers before the eval
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    out = {"fit_s": time.perf_counter() - t0, "step_s": times.times, "loss": losses.losses,
           "graph_captures": getattr(module._graphed, "captures", None),
           "graph_replays": getattr(module._graphed, "replays", None)}
    if cb is not None:
        cells = [json.loads(x) for x in (root / "retrieval" / "cells.jsonl").read_text().splitlines()]
        walls = {}
        for c in cells:
            walls.setdefault(c["step"], 0.0)
            walls[c["step"]] += c["wall_s"]
        out["evaluations"] = sorted(walls)
        out["cells_wall_s_per_evaluation"] = [walls[s] for s in sorted(walls)]
        metrics = next((root / "csv").glob("**/metrics.csv"))
        logged = [r for r in csv.DictReader(open(metrics)) if r.get("retrieval/wall_s")]
        out["callback_wall_s"] = [float(r["retrieval/wall_s"]) for r in logged]
        out["logged_keys"] = sorted(k for k in logged[-1] if k.startswith("retrieval/") and logged[-1][k])
        last = [r for r in cells if r["step"] == max(walls)]
        out["last_evaluation"] = [{k: r[k] for k in ("task", "length", "depth", "accuracy", "tf_token_acc",
                                                     "tf_exact", "wall_s", "tf_wall_s")} for r in last]
        after = [s for s in range(len(times.times)) if s in set(out["evaluations"])]  # batch index == step
        out["step_s_after_evaluation"] = [times.times[s] for s in after]
        # memsparse-eval's path (inference mode, eval) on the final weights: the same predictions?
        model = module.model.eval()
        with torch.no_grad():
            again = run_eval(model, dm.tokenizer, cb.plan, module.device, progress=False, warmup=False)
        same = sum(a["prediction"] == b["prediction"] and a.get("tf_prediction") == b.get("tf_prediction")
                   for ra, rb in zip(last, again) for a, b in zip(ra["samples"], rb["samples"]))
        out["run_eval_same_predictions"] = f"{same}/{sum(len(r['samples']) for r in last)}"
    steady = times.times[5:]
    out["median_step_s"] = statistics.median(steady) if steady else None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="recipes/mac_small.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: the recipe's data.vocab_size)")
    p.add_argument("--out", default="benchmarks/results/retrieval_callback.json")
    p.add_argument("--root", default="/tmp/retrieval_callback")
    args = p.parse_args()
    recipe = yaml.safe_load(open(args.recipe))
    vocab = args.vocab or recipe["data"].get("vocab_size", 259)
    res = {"recipe": args.recipe, "steps": args.steps, "every": args.every, "vocab": vocab,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    res["with_callback"] = fit(recipe, args.steps, args.every, Path(args.root) / "with", vocab)
    res["without_callback"] = fit(recipe, args.steps, None, Path(args.root) / "without", vocab)
    res["without_callback_again"] = fit(recipe, args.steps, None, Path(args.root) / "again", vocab)
    a, b, c = (res[k]["loss"] for k in ("with_callback", "without_callback", "without_callback_again"))
    res["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
    res["max_abs_loss_diff_two_fits_without"] = max(abs(x - y) for x, y in zip(b, c))  # the GPU's own run-to-run
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    res["first_step_with_a_loss_difference"] = first
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    w = res["with_callback"]
    print(json.dumps({k: w[k] for k in ("callback_wall_s", "graph_captures", "graph_replays", "median_step_s",
                                        "step_s_after_evaluation", "run_eval_same_predictions")}, indent=1))
    print("without:", res["without_callback"]["graph_captures"], res["without_callback"]["median_step_s"],
          "max |loss diff| with/without", res["max_abs_loss_diff"], "without/without",
          res["max_abs_loss_diff_two_fits_without"], "first differing step", first)


if __name__ == "__main__":
    main()
