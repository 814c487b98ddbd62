#!/usr/bin/env bash
# Whole-model throughput with the CUDA-graph training step, on the GPU machine, in one call:
#   bash benchmarks/run_model_graph.sh            (results under $OUT, default benchmarks/results)
# Needs titans-pytorch and its dependencies importable (the `bench` extra, or wheels carried in .whl/).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
B="python3 benchmarks/bench_model.py --out $OUT --warmup 2 --steps 5"
# 8K: the comparison (titans-pytorch, dense GPT, memsparse eager and graphed); checks graph == eager
timeout 200 $B --systems memsparse-graph,memsparse,titans,dense --lengths 8192 --name model_graph_8k
# 32K: titans-pytorch runs out of memory here (model_throughput_h100.md), so it is left out
timeout 150 $B --systems memsparse-graph,memsparse,dense --lengths 32768 --check-length 0 --name model_graph_32k
# the memory chunk step under torch.compile inside the graph
timeout 150 $B --systems memsparse-graph --memory-compile --lengths 8192,32768 --name model_graph_memcompiled
# 128K: activation checkpointing per block, graphed
timeout 120 $B --systems memsparse-graph,dense --checkpointing --lengths 131072 --check-length 0 \
  --name model_graph_128k
