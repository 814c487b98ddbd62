"""Whole-model training throughput, side by side in one run: memsparse MAC vs titans-pytorch MAC vs a dense GPT.

Same shape as BENCHMARKS.md section 2 (dim 512, depth 8, memory in 3 layers), B=1 (`--batch`), AdamW, bf16
autocast; tokens/s (median of timed steps, B x L tokens a step) and peak GPU memory per sequence length.
titans-pytorch comes from the `bench` extra (carried as wheels to the GPU machine); a system that runs out of
memory is recorded as OOM.

    python benchmarks/bench_model.py --lengths 2048,8192,32768 --out benchmarks/results
    python benchmarks/bench_model.py --systems memsparse-graph --lengths 2048 --batch 16,32,64 --vocab 16384 \
        --segment 256 --window 512 --budget length_scaled:c=12,min_tokens=512    # the retrieval recipes' step

System `memsparse-graph` is the same model trained through `memsparse.cuda_graph.GraphedLoss` (forward +
backward replayed as one CUDA graph); before timing it, the graphed step is checked against the eager one on
the GPU (loss and gradients on two different batches, so the static-input copy is exercised too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import memsparse.memory as memory_module
from memsparse.config import MemoryConfig, ModelConfig
from memsparse.cuda_graph import GraphedLoss
from memsparse.model import MemSparseLM

VOCAB = 256  # --vocab sets it


class DenseGPT(nn.Module):
    """Plain pre-norm GPT with SDPA (flash) causal attention and a SwiGLU MLP."""

    def __init__(self, dim=512, depth=8, heads=8, hidden=1408):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict(dict(n1=nn.RMSNorm(dim), qkv=nn.Linear(dim, 3 * dim, bias=False),
                                                  o=nn.Linear(dim, dim, bias=False), n2=nn.RMSNorm(dim),
                                                  w12=nn.Linear(dim, 2 * hidden, bias=False),
                                                  w3=nn.Linear(hidden, dim, bias=False))))
        self.norm = nn.RMSNorm(dim)

    def forward(self, ids):
        x = self.embed(ids)
        B, L, D = x.shape
        for ly in self.layers:
            q, k, v = ly["qkv"](ly["n1"](x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + ly["o"](a.transpose(1, 2).reshape(B, L, D))
            g, u = ly["w12"](ly["n2"](x)).chunk(2, -1)
            x = x + ly["w3"](F.silu(g) * u)
        return self.norm(x) @ self.embed.weight.t()


def parse_inductor(spec: str) -> dict:
    """'combo_kernels=1,max_autotune_gemm=0' -> {'combo_kernels': True, ...}; keys must be inductor config names."""
    import torch._inductor.config as inductor_config

    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor: {item!r} is not KEY=VALUE with KEY an inductor config option")
        cur = getattr(inductor_config, key)
        out[key] = val not in ("0", "false", "False") if isinstance(cur, bool) else type(cur)(val)
    return out


def memsparse_mac(L: int, segment: int, window: int, budget: str, checkpointing: bool = False,
                  memory_compile: bool = False, variant: str = "mac", pointwise_compile: bool = False,
                  kv_heads: int = 8) -> MemSparseLM:
    """The benchmark's memsparse model: dim 512, depth 8, 8 query heads (`kv_heads` key/value heads: 8, or 4 as
    the retrieval recipes), memories in layers 1/3/5."""
    cfg = ModelConfig(vocab_size=VOCAB, dim=512, depth=8, heads=8, kv_heads=kv_heads, head_dim=64, mlp_hidden=1408,
                      block_size=64, segment=segment, window=window, persistent_tokens=64, budget=budget,
                      variant=variant, memory_layers=[1, 3, 5],
                      memory=MemoryConfig(heads=8, head_dim=64, depth=2, expansion=4, chunk_size=segment,
                                          compile=memory_compile),
                      activation_checkpointing=checkpointing, compile_pointwise=pointwise_compile)
    return MemSparseLM(cfg)


def step_fns(name: str, L: int, args):
    """Returns (model, loss_fn(ids) -> loss)."""
    if name == "dense GPT (SDPA flash)":
        model = DenseGPT()

        def loss_fn(ids):
            return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
    elif name.startswith("titans-pytorch"):
        from titans_pytorch import MemoryAsContextTransformer

        model = MemoryAsContextTransformer(num_tokens=VOCAB, dim=512, depth=8, segment_len=128,
                                           num_persist_mem_tokens=4, num_longterm_mem_tokens=16,
                                           neural_memory_layers=(2, 4, 6), use_flex_attn=True,
                                           sliding_window_attn=True)

        def loss_fn(ids):
            return model(ids, return_loss=True)
    else:
        model = memsparse_mac(L, args.segment, args.window, args.budget, args.checkpointing, args.memory_compile,
                          args.variant, args.pointwise_compile, args.kv_heads)
        run = GraphedLoss(model.cuda()) if name.startswith("memsparse-graph") else model

        def loss_fn(ids):
            x = ids[:, :-1]
            return run(x, ids[:, 1:]).loss if run is not model else run(x, labels=ids[:, 1:], return_logits=False).loss
    return model, loss_fn


def check_graph(L: int, args) -> dict:
    """GraphedLoss vs the eager step on the GPU: loss and gradients on two batches (bf16 autocast)."""
    torch.manual_seed(0)
    model = memsparse_mac(L, args.segment, args.window, args.budget, args.checkpointing, args.memory_compile,
                          args.variant, args.pointwise_compile, args.kv_heads).cuda()
    step = GraphedLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    res = {"L": L, "batches": []}
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (1, L + 1), device="cuda")
        x, y = ids[:, :-1], ids[:, 1:]
        # graphed first: the capture must not run while an eager graph of the model (built on another
        # stream, holding the parameters' gradient accumulators) is alive
        with torch.autocast("cuda", torch.bfloat16):
            out = step(x, y)
        got_g = torch.autograd.grad(out.loss, params, allow_unused=True)
        got_loss = float(out.loss)
        del out
        with torch.autocast("cuda", torch.bfloat16):
            ref = model(x, labels=y, return_logits=False).loss
        ref_g = torch.autograd.grad(ref, params, allow_unused=True)
        ref_loss = float(ref)
        del ref
        num = sum(float((a.float() - r.float()).square().sum()) for a, r in zip(got_g, ref_g) if r is not None)
        den = sum(float(r.float().square().sum()) for r in ref_g if r is not None)
        res["batches"].append({"loss_eager": ref_loss, "loss_graph": got_loss,
                               "grad_rel_err": (num / max(den, 1e-30)) ** 0.5,
                               "grads_none_match": all((a is None) == (r is None) for a, r in zip(got_g, ref_g))})
    res["ok"] = all(abs(r["loss_eager"] - r["loss_graph"]) <= 1e-3 * abs(r["loss_eager"]) and r["grad_rel_err"] < 1e-2
                    and r["grads_none_match"] for r in res["batches"])
    res["losses_differ"] = res["batches"][0]["loss_graph"] != res["batches"][1]["loss_graph"]
    print("graph check:", res, flush=True)
    return res


def _status_of(e: BaseException) -> str:
    """OOM also when it comes wrapped (titans-pytorch's TorchScript re-raises CUDA OOM as RuntimeError)."""
    msg = str(e)
    if "out of memory" in msg.lower():
        return "OOM"
    return f"error: {type(e).__name__}: {' '.join(msg.split())[:200]}"


def write_table(out: dict, path: Path) -> None:
    """The markdown table of a results dict (also used by --retable on an existing JSON)."""
    for r in out["rows"]:  # results from before OOM was recognised inside wrapped errors
        if r["status"].startswith("error") and "out of memory" in r["status"].lower():
            r["status"] = "OOM"
    lines = [f"Training step (fwd+bwd+AdamW), bf16 autocast, vocabulary {out.get('vocab', 256)}, {out['device']}, "
             f"torch {out['torch']}, "
             f"memsparse budget {out['budget']}, float32 matmuls {out.get('float32_matmul_precision', 'highest')}",
             *([f"Kernel-path overrides: {', '.join(f'{k}={v}' for k, v in out['environment'].items())}"]
               if out.get("environment") else []),
             "", "| system | L | B | params (M) | step ms | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if r["status"] == "ok":
            lines.append(f"| {r['system']} | {r['L']} | {r.get('batch', 1)} | {r['params_M']:.1f} | "
                         f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |")
        else:
            lines.append(f"| {r['system']} | {r['L']} | {r.get('batch', 1)} | {r.get('params_M', float('nan')):.1f} "
                         f"| | {r['status']} | |")
    chk = out.get("graph_check")
    if chk:
        errs = ", ".join(f"{b['grad_rel_err']:.1e}" for b in chk["batches"])
        lines += ["", f"CUDA-graph step vs eager step at L={chk['L']} (two batches): "
                      f"{'pass' if chk['ok'] and chk['losses_differ'] else 'FAIL'}; losses "
                      + ", ".join(f"{b['loss_graph']:.4f} vs {b['loss_eager']:.4f}" for b in chk["batches"])
                      + f"; gradient relative error {errs}"]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench(name, L, args, B=1):
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"system": name, "L": L, "batch": B}
    try:
        t_build = time.perf_counter()
        model, loss_fn = step_fns(name, L, args)
        model = model.cuda()
        row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times, warm = [], []
        t_start = time.perf_counter()
        for i in range(args.warmup + args.steps):
            ids = torch.randint(0, VOCAB, (B, L + 1), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = loss_fn(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            (times if i >= args.warmup else warm).append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        # start-up: model build + the warm-up steps (compilation, graph capture, autotuning), seconds
        row.update(status="ok", step_s=t, tokens_per_s=B * L / t, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   loss=float(loss), warmup_steps_s=[round(w, 3) for w in warm],
                   startup_s=round(t_start - t_build + sum(warm), 3))
    except torch.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as e:  # record and keep going (e.g. a missing optional package)
        row.update(status=_status_of(e))
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--systems", default="memsparse,titans,dense")
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--budget", default="length_scaled:c=12,min_tokens=256")
    ap.add_argument("--variant", default="mac", choices=["mac", "mag", "mal"], help="memsparse memory variant")
    ap.add_argument("--checkpointing", action="store_true", help="memsparse: activation checkpointing per block")
    ap.add_argument("--memory-compile", action="store_true", help="memsparse: memory chunk step under torch.compile")
    ap.add_argument("--pointwise-compile", action="store_true",
                    help="memsparse: rotary embeddings and the MAC merge under torch.compile (model.compile_pointwise)")
    ap.add_argument("--check-length", type=int, default=4096, help="length of the graphed-vs-eager check (0: skip)")
    ap.add_argument("--name", default="model_throughput", help="results file stem")
    ap.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (memory MLPs)")
    ap.add_argument("--inductor", default="", help="inductor options of the compiled functions (memory, pointwise), "
                    "KEY=VALUE,... (e.g. combo_kernels=1); recorded in the results")
    ap.add_argument("--batch", default="1", help="sequences a step, comma-separated for several (e.g. 16,32,64)")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size (the retrieval recipes: 16384)")
    ap.add_argument("--kv-heads", type=int, default=8,
                    help="memsparse: key/value heads of the 8 query heads (the retrieval recipes: 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--retable", default="", help="only rewrite the markdown table of this results JSON")
    args = ap.parse_args(argv)
    if args.retable:
        p = Path(args.retable)
        write_table(json.loads(p.read_text()), p.with_suffix(".md"))
        return
    global VOCAB
    VOCAB = args.vocab
    batches = [int(b) for b in args.batch.split(",")]
    if args.vocab < 2 or min(batches) < 1:
        raise SystemExit(f"--vocab must be >= 2 and --batch >= 1, got {args.vocab} and {args.batch}")
    if args.kv_heads < 1 or 8 % args.kv_heads:
        raise SystemExit(f"--kv-heads must divide the 8 query heads (1, 2, 4 or 8), got {args.kv_heads}")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    memory_module.INDUCTOR_OPTIONS.update(parse_inductor(args.inductor))
    ckpt = ((", checkpointed" if args.checkpointing else "") + (", memory compiled" if args.memory_compile else "")
            + (", pointwise compiled" if args.pointwise_compile else "") + (", TF32" if args.tf32 else ""))
    V = args.variant.upper() + (f", 8/{args.kv_heads} heads" if args.kv_heads != 8 else "")
    names = {"memsparse": f"memsparse {V} (segment {args.segment}, window {args.window}{ckpt})",
             "memsparse-graph": f"memsparse-graph {V}, CUDA graph (segment {args.segment}, window {args.window}{ckpt})",
             "titans": "titans-pytorch 0.5.5 MAC", "dense": "dense GPT (SDPA flash)"}
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in names]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {sorted(names)}")
    check = check_graph(args.check_length, args) if "memsparse-graph" in systems and args.check_length else None
    rows = [bench(names[s], int(L), args, B) for L in args.lengths.split(",") for B in batches for s in systems]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "budget": args.budget,
           "batch": batches, "vocab": VOCAB, "kv_heads": args.kv_heads, "precision": "bf16 autocast, AdamW",
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "command": " ".join(sys.argv),
           "inductor_options": dict(memory_module.INDUCTOR_OPTIONS),
           # kernel-path overrides in force (MEMSPARSE_*_IMPL and friends), so a table says which path it timed
           "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MEMSPARSE_")},
           "graph_check": check, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    write_table(out, Path(args.out) / f"{args.name}.md")


if __name__ == "__main__":
    main()
