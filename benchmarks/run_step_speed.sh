#!/usr/bin/env bash
# Training-step speed of a recipe under each AdamW implementation, on one GPU in one call (a like-for-like timing):
#   bash benchmarks/run_step_speed.sh                       stage 1 of the retrieval curriculum, fused then foreach
#   RECIPE=recipes/retrieval_small.yaml IMPLS="fused" STEPS=300 bash benchmarks/run_step_speed.sh
# Each fit takes the recipe with recipes/overlays/profile_steps.yaml (its callbacks replaced by StepProfiler: the step
# time does not depend on the weights), trains STEPS steps (default 400) and profiles 5 steps ending 5 before the
# last; CSV logger. Then benchmarks/compare_runs.py gives each run's median train/tokens_per_s (after the first fifth
# of its steps: compilation and capture stay out) and benchmarks/trace_summary.py its profiled steps' host waits on
# the device. Results (metrics, step profiles, traces' summaries, logs) go to $OUT/$NAME/ and $OUT/$NAME.tgz.
set -u
OUT=${OUT:-benchmarks/results}
NAME=${NAME:-step_speed}
RECIPE=${RECIPE:-recipes/retrieval_small_copy.yaml}
IMPLS=${IMPLS:-"fused foreach"}
STEPS=${STEPS:-400}
PY=${PYTHON:-python3}
[[ "$STEPS" =~ ^[0-9]+$ ]] && [ "$STEPS" -ge 20 ] || { echo "STEPS must be an integer >= 20, got '$STEPS'"; exit 2; }
for impl in $IMPLS; do
  case $impl in fused|foreach|auto) ;; *) echo "unknown optimizer_impl $impl (fused, foreach or auto)"; exit 2 ;; esac
done
[ -f "$RECIPE" ] || { echo "no recipe $RECIPE"; exit 2; }
D="$OUT/$NAME"
FAIL=0
mkdir -p "$D"
# shellcheck source=benchmarks/run_lib.sh
. "$(dirname "$0")/run_lib.sh"
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
ROOT=${WORK:-outputs/$NAME}  # the fits' own directories (checkpoints stay there)
RUNS=()
for impl in $IMPLS; do
  step "fit $impl" "$D/train_$impl.log" "$PY" -m memsparse.train.cli fit --config "$RECIPE" \
    --config recipes/overlays/profile_steps.yaml --trainer.max_steps "$STEPS" \
    --trainer.callbacks.init_args.start_step $(( STEPS - 10 )) --model.optimizer_impl "$impl" \
    --trainer.default_root_dir "$ROOT/$impl" --overwrite true --trainer.enable_progress_bar false \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir "$ROOT/$impl/csv"
  m=$(newest_metrics "$ROOT/$impl/csv")
  [ -n "$m" ] && cp "$m" "$D/metrics_$impl.csv" && RUNS+=("$impl=$D/metrics_$impl.csv")
  for f in step_profile.json step_profile.md; do cp "$ROOT/$impl/profile/$f" "$D/${f%.*}_$impl.${f##*.}" 2>/dev/null; done
  if [ -f "$ROOT/$impl/profile/step_trace.json" ]; then
    gzip -c "$ROOT/$impl/profile/step_trace.json" > "$D/step_trace_$impl.json.gz"
    step "trace $impl" "$D/trace_$impl.log" "$PY" benchmarks/trace_summary.py "$D/step_trace_$impl.json.gz" \
      --steps 5 --name "trace_summary_$impl" --out "$D"
  fi
  cp "$ROOT/$impl/phase_times.json" "$D/phase_times_$impl.json" 2>/dev/null
done
if [ "${#RUNS[@]}" -gt 0 ]; then
  step "compare" "$D/compare.log" "$PY" benchmarks/compare_runs.py "${RUNS[@]}" --name step_speed --out "$D" \
    --device "$DEV" --command "RECIPE=$RECIPE IMPLS='$IMPLS' STEPS=$STEPS bash benchmarks/run_step_speed.sh"
fi
pack
exit "$FAIL"
