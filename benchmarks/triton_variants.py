"""How many compiled variants of each Triton kernel a training run and its retrieval evaluations need.

Triton compiles a kernel once per signature: the arguments' dtypes, each integer's specialisation (equal to 1, a
multiple of 16, or neither; 32 or 64 bits), each pointer's 16-byte alignment, the constexprs and the launch options.
Training runs fixed shapes; an evaluation streams prompts of many lengths and decodes one token at a time, in
float32 (`RetrievalEval`, `memsparse-eval`), so its first call may compile many more variants: on a fresh GPU machine
the first in-training RetrievalEval took 64 s of a 142 s stage-1 fit (2026-12-06). This counts them on CPU, through
the Triton interpreter, by recording every launch's signature: (a) training steps (forward + backward under bf16
autocast) of a recipe's model and rows, then (b) the recipe's RetrievalEval grid as the callback runs it. Under the
interpreter the tiles are fixed; on a GPU an autotuned kernel compiles each of its configs for every new autotune key
(dtypes, D, BS, G, CAUSAL, DOC), so the counts here are a floor there.

    python benchmarks/triton_variants.py recipes/retrieval_small_copy.yaml --dim 128 --depth 2 \\
        --name triton_variants_stage1 --out DIR

`--dim` / `--depth` shrink the model for the CPU (the kernels' constexprs depend on the head sizes and block,
which stay the recipe's); `--rows` / `--steps` the training part; `--lengths` replaces the grid's lengths.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
IMPL_VARS = ("MEMSPARSE_SPARSE_ATTENTION_IMPL", "MEMSPARSE_MEMORY_GRADS_IMPL", "MEMSPARSE_UPDATE_COEFFICIENTS_IMPL")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memsparse.config import ModelConfig, from_dict  # noqa: E402
from memsparse.model import MemSparseLM  # noqa: E402
from memsparse.tokenizer import load_tokenizer  # noqa: E402

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _constexprs(fn) -> set[str]:
    """Names of the kernel's tl.constexpr parameters."""
    try:
        params = inspect.signature(fn.fn).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def specialisation(value, constexpr: bool):
    """One argument's part of a Triton signature (what a GPU compile is keyed on)."""
    if constexpr:
        return ("c", value if isinstance(value, (int, float, bool, str, type(None))) else repr(value))
    if torch.is_tensor(value):
        return ("p", str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        kind = "1" if value == 1 else ("16" if value % 16 == 0 else "i")
        return ("i", kind, "i64" if not -2**31 <= value < 2**31 else "i32")
    if isinstance(value, float):
        return ("f",)
    return ("?", type(value).__name__)


class Recorder:
    """Records the signature of every interpreted Triton launch, by phase."""

    def __init__(self) -> None:
        self.phase = "train"
        self.seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
        self.launches: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def __enter__(self) -> Recorder:
        """Record every interpreted launch (the kernels' Triton paths forced on) until the block ends."""
        from triton.runtime.interpreter import InterpretedFunction

        self._saved_env = {v: os.environ.get(v) for v in IMPL_VARS}
        os.environ.update({v: "triton" for v in IMPL_VARS})
        self._original = original = InterpretedFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            names = list(fn.arg_names)
            consts = _constexprs(fn)
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            sig = tuple((n, specialisation(bound[n], n in consts)) for n in names if n in bound)
            sig += tuple((k, ("c", kwargs[k])) for k in LAUNCH_OPTIONS if k in kwargs)
            name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"  # kernels of two files share names
            recorder.seen[recorder.phase][name].add(sig)
            recorder.launches[recorder.phase][name] += 1
            return original(fn, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._original
        for v, val in self._saved_env.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val

    def table(self) -> list[dict]:
        """Per kernel: variants in training, in the evaluation, and those the evaluation adds."""
        train, ev = self.seen.get("train", {}), self.seen.get("eval", {})
        rows = []
        for name in sorted(set(train) | set(ev)):
            t, e = train.get(name, set()), ev.get(name, set())
            rows.append({"kernel": name, "train_variants": len(t), "eval_variants": len(e),
                         "eval_new_variants": len(e - t), "train_launches": self.launches["train"].get(name, 0),
                         "eval_launches": self.launches["eval"].get(name, 0)})
        return rows


def load_recipe(path: str) -> tuple[dict, dict, dict | None]:
    """(model config dict, data section, the RetrievalEval callback's init_args or None) of a recipe."""
    cfg = yaml.safe_load(Path(path).read_text())
    model = cfg["model"]["config"]
    data = cfg.get("data", {})
    retrieval = None
    for cb in (cfg.get("trainer", {}) or {}).get("callbacks", []) or []:
        if isinstance(cb, dict) and cb.get("class_path", "").endswith("RetrievalEval"):
            retrieval = cb.get("init_args", {}) or {}
    return model, data, retrieval


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--dim", type=int, default=None, help="model width (default: the recipe's)")
    ap.add_argument("--depth", type=int, default=None, help="layers (default: the recipe's; memory in layer 1)")
    ap.add_argument("--rows", type=int, default=2, help="training rows a step")
    ap.add_argument("--steps", type=int, default=1, help="training steps")
    ap.add_argument("--lengths", default=None, help="the eval grid's lengths (default: the recipe's RetrievalEval)")
    ap.add_argument("--name", default="triton_variants")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)

    from memsparse.eval.harness import EvalPlan, parse_depths, parse_lengths, parse_tasks, run_eval

    model_cfg, data, retrieval = load_recipe(args.recipe)
    if retrieval is None and args.lengths is None:
        raise SystemExit(f"triton_variants: {args.recipe} has no RetrievalEval callback: give --lengths")
    retrieval = retrieval or {}
    tok = load_tokenizer("byte")
    model_cfg = {**model_cfg, "vocab_size": tok.vocab_size}
    if args.dim:
        model_cfg["dim"] = args.dim
        model_cfg["mlp_hidden"] = 2 * args.dim
    if args.depth:
        model_cfg["depth"] = args.depth
        model_cfg["memory_layers"] = [1] if model_cfg.get("memory_layers") else []
    model_cfg["compile_pointwise"] = False
    model_cfg.setdefault("memory", {})
    if isinstance(model_cfg["memory"], dict):
        model_cfg["memory"] = {**model_cfg["memory"], "compile": False}
    config = from_dict(ModelConfig, model_cfg).validate()
    torch.manual_seed(0)
    model = MemSparseLM(config)

    plan = EvalPlan(parse_tasks(retrieval.get("tasks", "passkey")),
                    parse_lengths(args.lengths or retrieval.get("lengths", "1k,4k")),
                    parse_depths(retrieval.get("depths", "0,0.5,1")), int(retrieval.get("samples", 2)),
                    int(retrieval.get("seed", 0)))
    passes = [True] + ([False] if retrieval.get("no_writes") and config.memory_layer_ids() else [])
    seq = int(data.get("seq_len", 1024))
    with Recorder() as rec:
        t0 = time.perf_counter()
        model.train()
        for _ in range(args.steps):
            ids = torch.randint(0, tok.vocab_size, (args.rows, seq))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, ids, return_logits=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        rec.phase = "eval"  # then the grid as RetrievalEval runs it: float32, no grad, no graphs
        t0 = time.perf_counter()
        for writes in passes:
            with model.memory_writes_as(writes):
                run_eval(model, tok, plan, torch.device("cpu"), progress=False, warmup=False, cuda_graph=False,
                         teacher_forced=True, inference_mode=False, measure_memory=False)
        eval_s = time.perf_counter() - t0

    rows = rec.table()
    result = {"recipe": args.recipe, "model": {k: model_cfg[k] for k in ("dim", "depth", "heads", "kv_heads",
                                                                          "head_dim", "block_size", "window",
                                                                          "segment", "memory_layers")},
              "train": {"rows": args.rows, "seq_len": seq, "steps": args.steps, "wall_s": round(train_s, 1)},
              "eval": {"tasks": plan.tasks, "lengths": plan.lengths, "depths": plan.depths,
                       "samples": plan.samples, "memory_writes_off_too": len(passes) > 1,
                       "wall_s": round(eval_s, 1)},
              "kernels": rows,
              "totals": {k: sum(r[k] for r in rows) for k in ("train_variants", "eval_variants",
                                                              "eval_new_variants")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Triton kernel variants: `{args.recipe}` (CPU, interpreter; model {result['model']})", "",
             f"Training: {args.steps} step(s) of {args.rows} x {seq} tokens, bf16 autocast. Evaluation: "
             f"{plan.tasks} at {plan.lengths} x depths {plan.depths} x {plan.samples} samples"
             f"{', again with the memory writes off' if len(passes) > 1 else ''}, float32.", "",
             "| kernel | variants in training | in the evaluation | new in the evaluation | launches (train / eval) |",
             "|---|---|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['train_variants']} | {r['eval_variants']} | {r['eval_new_variants']} | "
              f"{r['train_launches']} / {r['eval_launches']} |" for r in rows]
    t = result["totals"]
    lines += [f"| all | {t['train_variants']} | {t['eval_variants']} | {t['eval_new_variants']} | |"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
