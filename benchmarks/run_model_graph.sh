#!/usr/bin/env bash
# The whole-model tables of docs/performance.md ("Whole model with the CUDA-graph step"), on the GPU machine:
#   bash benchmarks/run_model_graph.sh            (results under $OUT, default benchmarks/results)
# Needs titans-pytorch and its dependencies importable (the `bench` extra, or wheels carried in .whl/).
# Each command is one run (systems side by side); each results JSON records its command line.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
B="python3 benchmarks/bench_model.py --out $OUT --memory-compile --tf32"
# 8K against titans-pytorch. titans-pytorch goes first: started after our compiled, graphed model in the same
# process it did not get through its first steps within 200-310 s (twice, not investigated). Its first steps
# are slow even so: this command took 6.4 min on the H100 (a 300 s limit killed it once).
timeout 480 $B --warmup 1 --steps 6 --systems titans,memsparse-graph,dense --lengths 8192 --check-length 0 \
  --name model_graph_8k_s3
# 8K and 32K beside the dense GPT, current settings (rotary embeddings and MAC merge compiled, the GPU recipes'
# model.compile_pointwise; memory-gradient kernels, the default on CUDA); checks the graphed step against eager first
timeout 240 $B --pointwise-compile --systems memsparse-graph,dense --lengths 8192,32768 --name model_graph_kernels
# 128K with activation checkpointing
timeout 240 $B --pointwise-compile --checkpointing --systems memsparse-graph,dense --lengths 131072 \
  --check-length 0 --name model_128k_kernels
# one memory write step alone: graph-replay time and its kernels, on the kernels and on the PyTorch path
python3 benchmarks/bench_write_step.py --tf32 --out $OUT --name write_step_kernels_fn
python3 benchmarks/bench_write_step.py --tf32 --grads-impl reference --out $OUT --name write_step_blocked_torch
