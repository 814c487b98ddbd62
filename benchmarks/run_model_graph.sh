#!/usr/bin/env bash
# The whole-model tables of docs/performance.md ("Whole model with the CUDA-graph step"), on the GPU machine:
#   bash benchmarks/run_model_graph.sh            (results under $OUT, default benchmarks/results)
# Needs titans-pytorch and its dependencies importable (the `bench` extra, or wheels carried in .whl/).
# Each command is one run (systems side by side); each results JSON records its command line. Together they take
# more than one 10-minute device call: split them over several (the titans-pytorch run alone ~6 min).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
B="python3 benchmarks/bench_model.py --out $OUT --memory-compile --tf32"
# one memory write step alone: graph-replay time and its kernels, update coefficients by PyTorch and by the kernels
python3 benchmarks/bench_write_step.py --tf32 --out $OUT --name write_step_71875c8
python3 benchmarks/bench_write_step.py --tf32 --coef-impl triton --out $OUT --name write_step_coef_kernels
# 8K and 32K beside the dense GPT, current settings (the GPU recipes' model.compile_pointwise; memory-gradient
# kernels, the default on CUDA); checks the graphed step against eager first
timeout 260 $B --pointwise-compile --systems memsparse-graph,dense --lengths 8192,32768 --name model_graph_71875c8
# 8K against titans-pytorch. titans-pytorch goes first: started after our compiled, graphed model in the same
# process it did not get through its first steps within 200-310 s (twice, not investigated).
timeout 500 $B --pointwise-compile --warmup 1 --steps 6 --systems titans,memsparse-graph,dense --lengths 8192 \
  --check-length 0 --name model_graph_8k_titans_71875c8
# 32K twice more, alternating with the dense GPT
timeout 300 $B --pointwise-compile --systems dense,memsparse-graph --lengths 32768,32768 --steps 10 --check-length 0 \
  --name model_graph_32k_repeat_71875c8
# 128K with activation checkpointing
timeout 280 $B --pointwise-compile --checkpointing --systems memsparse-graph,dense --lengths 131072 \
  --check-length 0 --name model_128k_71875c8
# the opt-in update-coefficient kernels in the whole model
MEMSPARSE_UPDATE_COEFFICIENTS_IMPL=triton timeout 200 $B --pointwise-compile --systems memsparse-graph,dense \
  --lengths 8192,32768 --name model_graph_coef_71875c8
