#!/usr/bin/env bash
# Issue 9 in one call on two GPUs of one host (device kind nvidia-h200-x2):
#   bash benchmarks/run_multi_gpu.sh                    (results under $OUT, default benchmarks/results)
# Three runs of the same recipe through `memsparse-train`, with the same global batch (2 GPUs x accumulation 1 =
# 1 GPU x accumulation 2) and validation at the same optimizer steps on the same batches:
#   1gpu   one GPU, the recipe as it is (CUDA graph)           -> the baseline
#   ddp2   --trainer.devices 2 --trainer.strategy ddp          -> scaling (bar: >= 1.8x the baseline's tokens/s)
#   fsdp2  --trainer.devices 2 --trainer.strategy fsdp         (eager: FSDP gathers parameters, no CUDA graph)
# then loads fsdp2's last.ckpt on one GPU, exports it and evaluates it (passkey), and writes the comparison
# (benchmarks/compare_runs.py: table, JSON, loss-curve plot). Each run's log is kept as ${NAME}_<run>.log.
#
# The DDP part also runs on CPU processes (gloo), which is how the script itself is checked without GPUs:
#   ACCEL=cpu RECIPE=recipes/quickstart.yaml STEPS=20 VAL_EVERY=10 SKIP_FSDP=1 NAME=multi_gpu_cpu_smoke \
#     OUT=/tmp/mg bash benchmarks/run_multi_gpu.sh
set -euo pipefail
# NVLink multicast stays off on the lent machines (their KINDS.md); harmless elsewhere
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
RECIPE=${RECIPE:-recipes/mac_small.yaml}
STEPS=${STEPS:-300}           # optimizer steps per run
VAL_EVERY=${VAL_EVERY:-50}    # optimizer steps between validations
VAL_BATCHES=${VAL_BATCHES:-8} # validation batches in all (split over the ranks)
NAME=${NAME:-multi_gpu}
ACCEL=${ACCEL:-gpu}
SKIP_FSDP=${SKIP_FSDP:-0}
LIMIT_S=${LIMIT_S:-420}       # wall-clock limit of each run
mkdir -p "$OUT"
R=$(mktemp -d)
DEVICE=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "$ACCEL") | head -1)

train() {  # label devices accumulation extra-args...: one run, its log under $OUT, its metrics under $R/label
  local label=$1 devices=$2 accum=$3
  shift 3
  local cmd=(memsparse-train fit --config "$RECIPE" --overwrite true --trainer.accelerator "$ACCEL" --trainer.devices "$devices"
    --trainer.accumulate_grad_batches "$accum" --trainer.max_steps "$STEPS" --trainer.callbacks "[{class_path: memsparse.train.callbacks.PhaseTimes}]"
    --trainer.val_check_interval $((VAL_EVERY * accum)) --trainer.limit_val_batches $((VAL_BATCHES / devices))
    --trainer.default_root_dir "$R/$label" --trainer.logger lightning.pytorch.loggers.CSVLogger
    --trainer.logger.init_args.save_dir "$R/$label" "$@")
  echo "== $label: ${cmd[*]}"
  echo "${cmd[*]}" > "$OUT/${NAME}_${label}.log"
  local t0=$SECONDS rc=0
  timeout "$LIMIT_S" "${cmd[@]}" >> "$OUT/${NAME}_${label}.log" 2>&1 || rc=$?
  echo "== $label: exit $rc after $((SECONDS - t0)) s"
  tail -4 "$OUT/${NAME}_${label}.log"
  cp "$R/$label/phase_times.json" "$OUT/${NAME}_${label}_phase_times.json" 2>/dev/null || true
  return $rc
}

metrics() { find "$R/$1" -name metrics.csv | head -1; }

train 1gpu 1 2
train ddp2 2 1 --trainer.strategy ddp
RUNS=("1gpu=$(metrics 1gpu)" "ddp2=$(metrics ddp2)")
if [ "$SKIP_FSDP" != 1 ]; then
  train fsdp2 2 1 --trainer.strategy fsdp --model.cuda_graph false
  RUNS+=("fsdp2=$(metrics fsdp2)")
  # the checkpoint saved under FSDP, loaded on one GPU: exported and evaluated
  CUDA_VISIBLE_DEVICES=0 python3 -c "import sys; from memsparse.train.module import export_checkpoint; \
print(export_checkpoint(sys.argv[1], sys.argv[2]))" "$R/fsdp2/checkpoints/last.ckpt" "$R/fsdp2_export"
  CUDA_VISIBLE_DEVICES=0 memsparse-eval --checkpoint "$R/fsdp2_export" --tasks passkey --lengths 2k,8k \
    --depths 0,0.5,1 --samples 2 --no-wandb --no-progress --out "$OUT/${NAME}_fsdp2_eval" 2>&1 | tail -6
fi
python3 benchmarks/compare_runs.py "${RUNS[@]}" --baseline 1gpu --name "$NAME" --out "$OUT" --device "$DEVICE" \
  --command "bash benchmarks/run_multi_gpu.sh (RECIPE=$RECIPE STEPS=$STEPS VAL_EVERY=$VAL_EVERY ACCEL=$ACCEL)"
