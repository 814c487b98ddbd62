#!/usr/bin/env bash
# The mac_small recipe trained with the CUDA-graph step, on the GPU machine (about 4 minutes):
#   bash benchmarks/run_recipe_graph.sh            (results under $OUT, default benchmarks/results)
#   SECS=140 NAME=mac_small_graph_140s bash benchmarks/run_recipe_graph.sh   (training time, results file stem)
# Same settings as the committed mac_small_compiled_h100 run (memory step compiled, accumulation 1,
# validation every 100 steps on 4 batches), plus model.cuda_graph=true.
set -u
OUT=${OUT:-benchmarks/results}
SECS=${SECS:-105}
NAME=${NAME:-mac_small_graph_h100}   # results file stem
R=$(mktemp -d)
DUR=$(printf '00:00:%02d:%02d' $((SECS / 60)) $((SECS % 60)))
CMD="memsparse-train fit --config recipes/mac_small.yaml --trainer.callbacks '[{class_path: memsparse.train.callbacks.PhaseTimes}]' --model.cuda_graph true --trainer.max_time $DUR \
--trainer.accumulate_grad_batches 1 --trainer.val_check_interval 100 --trainer.limit_val_batches 4 (CSVLogger)"
timeout $((SECS + 150)) python3 -m memsparse.train.cli fit --config recipes/mac_small.yaml --overwrite true --trainer.callbacks '[{class_path: memsparse.train.callbacks.PhaseTimes}]' --model.cuda_graph true \
  --trainer.max_time "$DUR" --trainer.accumulate_grad_batches 1 --trainer.val_check_interval 100 \
  --trainer.limit_val_batches 4 --trainer.default_root_dir "$R" \
  --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir "$R" 2>&1 | tail -25
python3 benchmarks/plot_train_run.py "$(find "$R" -name metrics.csv | head -1)" --name "$NAME" \
  --out "$OUT" --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --command "$CMD"
# where the run's wall time went (start-up, first steps, validation; train.callbacks.PhaseTimes)
cp "$R/phase_times.json" "$OUT/${NAME}_phase_times.json" 2>/dev/null || echo "no phase_times.json in $R"
