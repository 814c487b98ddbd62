#!/usr/bin/env bash
# Budget in training (issue 19, claim 1): models trained with a `fixed`, a `length_scaled` and a `top_p` attention
# budget at matched attention FLOPs per token (within TOL, default 10%), the same steps and data, each scored under its
# own budget on one retrieval grid, in one call on one GPU (checkpoints stay on the machine, under WORK):
#   OUT=/tmp/rr NAME=budget_training bash benchmarks/run_budget_training.sh
#
# The recipe: recipes/ablation_retrieval_no_memory_copy.yaml (stage 1 of the retrieval curriculum without memory:
# dim 512, 8 layers, the BPE it trains, passkey / niah mixture, loss on every token)
# + recipes/overlays/budget_training.yaml (window 2,048 tokens = 32 key blocks of 64 beside the sink; samples of
#   512-2K tokens, so every needle is inside the window and 0-32 blocks before the question; no memory: only the
#   budget decides what a query block sees; 1,200 steps)
# + one overlay per budget, recipes/overlays/budget_training_<name>.yaml:
#   top_p_fm0      top_p:p=0.8,min=2,max=16,forced_mass=0   (the mass over the candidate blocks only)
#   fixed          fixed:8                                   (replaced by the match below)
#   length_scaled  length_scaled:c=15.5,min_tokens=128       (replaced by the match below)
#   top_p          top_p:p=0.8,min=2,max=16                  (default forced_mass=1: expected to collapse onto the
#                                                             sink and diagonal blocks as the toy did; its own cost)
#   dense          dense                                     (the ceiling; not in the default list)
#
# Matching (MATCH=1, default): top_p's count follows the learned scores, so its cost is measured, not set: the
# MATCH_TO model (default top_p_fm0) trains first, and its training cost, the mean of its logged
# train/attn_kept_blocks over the whole run (key blocks per query block, sink and diagonal included, padding rows
# included: what the GPU computed), is the target. Each later fixed / length_scaled model gets the budget whose
# count on the same training rows is nearest it (benchmarks/budget_training.py match: fixed the nearest integer k,
# length_scaled the c at min_tokens=128; these counts do not read the scores, so they are computed exactly on the CPU
# from the recipe's rows; checked against the logged training means of two committed runs: 5.756 / 7.123 computed,
# 5.756 / 7.122 logged). A match more than TOL away is logged as a warning and used. Without the MATCH_TO model
# (MATCH=0, or not listed before them) the overlays' specs are used: fixed:8 and length_scaled:c=15.5,min_tokens=128
# keep 7.00 / 6.99 blocks on the training rows (-0.1%; dense 12.9). Attention FLOPs per token = kept blocks x 4 x
# block x head_dim x heads x depth (memsparse-eval's AttentionStats: 1.05e6 per block here).
#
# Order: every model is trained in turn (so the MATCH_TO model's cost is known before the others are set, and each
# fit has the GPU alone), then all are evaluated on the same grid at once (EVAL_PARALLEL=1: one memsparse-eval
# process per model side by side; an eval is mostly start-up and batch-1 latency, so they overlap well), then the
# table and plots. Per budget (results under $OUT/$NAME/<budget>/): budget.txt (the spec trained), match.json (when
# matched), train.log, metrics_<budget>.csv, phase_times.json, eval/ (memsparse-eval results.json/csv, heatmaps:
# accuracy and attn_kept_blocks / attn_flops_per_token per cell) and eval.log. Then, over all budgets:
#   budget_training.md / .csv       one row per budget: spec, training kept blocks and attention FLOPs per token,
#                                   their difference from MATCH_TO's, the eval's FLOPs per token, accuracy per
#                                   (task, length) (mean over depths) and overall (benchmarks/budget_training.py table)
#   budget_training_cells.csv       every eval cell of every model
#   pareto/                         benchmarks/plot_budget_pareto.py on the models' results (accuracy against FLOPs,
#                                   which family wins at matched FLOPs per task and length)
#   runs.md / runs.json / runs_*.png  benchmarks/compare_runs.py: loss curves, train/attn_kept_blocks (and the
#                                   validation answer-token accuracy) against the step, tokens/s
# Everything is packed into $OUT/$NAME.tgz after every step, so a cut-off run still brings back what it did.
#
# Time (one H100, 2026-12-06, benchmarks/results/budget_training_h100_2026-12-06/): a fit of 1,200 steps of 16 x 2K
# tokens took 119-129 s (~35 s of start-up, the first also trains the BPE; ~550K tokens/s), two evals side by side
# 94-107 s, so two budgets fit one 10-minute call and the third was skipped. The deadline (DEADLINE_S=540: a call may
# run 600 s, and its set-up comes first) starts a fit only when the time so far plus the last fit's plus
# EVAL_RESERVE_S (120) for the evals stays below it, so when time runs short the default top_p, listed last, is the
# one dropped. At 1,200 steps neither model copied the key: more STEPS, fewer BUDGETS a call.
#
# Overrides:
#   BUDGETS="top_p_fm0 fixed length_scaled top_p"  the models, in order (names of the overlays above)
#   STEPS=N                  steps of every model (and the cosine's length; default the overlay's 1,200)
#   MATCH=0 / MATCH_TO=NAME  no matching (the overlays' specs) / the model whose measured cost the others match
#   TOL=0.10                 the matching tolerance (relative, on kept blocks = FLOPs per token)
#   DEADLINE_S=540           a model is not trained (logged) when the time so far + the last fit's +
#   EVAL_RESERVE_S=120       EVAL_RESERVE_S would pass this many seconds since the start (0: no deadline)
#   EVAL_PARALLEL=0          evaluate the models one after the other (default 1: all at once)
#   EVAL_TASKS=passkey,niah_single EVAL_LENGTHS=512,1k,2k EVAL_DEPTHS=0,0.25,0.5,0.75,1 EVAL_SAMPLES=3 EVAL_SEED=0
#   TRAIN=0 / EVAL=0         evaluate the exports already under WORK without training / train without evaluating
#   WORK=outputs             where each model's run directory (WORK/budget_training_<name>: checkpoints, export,
#                            CSV logs) and the shared BPE (WORK/budget_training_tokenizer) go
#   CONFIGS="a.yaml b.yaml"  more overlays for every model, after recipes/overlays/budget_training.yaml (a change of
#                            the model's geometry or of the data goes here: the matching reads the --config files)
#   TRAIN_ARGS / EVAL_ARGS   extra memsparse-train fit / memsparse-eval arguments (not seen by the matching)
#   SMOKE=1                  CPU smoke run (tests/test_run_budget_training.py):
#                            recipes/overlays/budget_training_cpu_smoke.yaml (a tiny model, byte tokens, passkeys of
#                            256-512 tokens, 2 steps) and a tiny CPU eval grid
#   PYTHON                   the interpreter (default python3)
# Exit status: 0 when every step that ran succeeded, 1 otherwise, 2 for a bad setting.
set -u
OUT=${OUT:-benchmarks/results}
NAME=${NAME:-budget_training}
BUDGETS=${BUDGETS:-"top_p_fm0 fixed length_scaled top_p"}
MATCH=${MATCH:-1}
MATCH_TO=${MATCH_TO:-top_p_fm0}
TOL=${TOL:-0.10}
STEPS=${STEPS:-}
WORK=${WORK:-outputs}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
CFG_BASE=(--config recipes/ablation_retrieval_no_memory_copy.yaml --config recipes/overlays/budget_training.yaml)
for c in ${CONFIGS:-}; do
  [ -f "$c" ] || { echo "no config $c (CONFIGS)"; exit 2; }
  CFG_BASE+=(--config "$c")
done
if [ "$SMOKE" = 1 ]; then
  CFG_BASE+=(--config recipes/overlays/budget_training_cpu_smoke.yaml)
  EVAL_TASKS=${EVAL_TASKS:-passkey}; EVAL_LENGTHS=${EVAL_LENGTHS:-256,512}; EVAL_DEPTHS=${EVAL_DEPTHS:-0,1}
  EVAL_SAMPLES=${EVAL_SAMPLES:-1}; EVAL_ARGS=${EVAL_ARGS:-"--device cpu --threads 1 --no-cuda-graph"}
  DEADLINE_S=${DEADLINE_S:-0}
fi
EVAL_TASKS=${EVAL_TASKS:-passkey,niah_single}
EVAL_LENGTHS=${EVAL_LENGTHS:-512,1k,2k}
EVAL_DEPTHS=${EVAL_DEPTHS:-0,0.25,0.5,0.75,1}
EVAL_SAMPLES=${EVAL_SAMPLES:-3}
DEADLINE_S=${DEADLINE_S:-540}
EVAL_PARALLEL=${EVAL_PARALLEL:-1}
EVAL_RESERVE_S=${EVAL_RESERVE_S:-120}
[ "${EVAL:-1}" = 0 ] && EVAL_RESERVE_S=0
if [ -n "$STEPS" ] && { [[ ! "$STEPS" =~ ^[0-9]+$ ]] || [ "$STEPS" -lt 1 ]; }; then
  echo "STEPS must be a positive integer, got $STEPS"; exit 2
fi
for b in $BUDGETS; do
  OV="recipes/overlays/budget_training_$b.yaml"
  [ -f "$OV" ] || { echo "unknown budget $b (no $OV)"; exit 2; }
done
[ -n "${BUDGETS// /}" ] || { echo "BUDGETS is empty"; exit 2; }

D="$OUT/$NAME"
mkdir -p "$D"
FAIL=0
T0=$(date +%s)
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
TAIL=${TAIL:-6}
# shellcheck source=benchmarks/run_lib.sh
source "$(dirname "$0")/run_lib.sh"  # pack, log, step
log "run_budget_training.sh: BUDGETS='$BUDGETS' STEPS=${STEPS:-recipe} MATCH=$MATCH MATCH_TO=$MATCH_TO" \
  "SMOKE=$SMOKE device='$DEV'"

REF_METRICS=""   # the MATCH_TO model's metrics.csv once trained (or found)
LAST_S=0         # the last fit's wall time (the deadline's estimate for the next)
DONE=()
for b in $BUDGETS; do  # 1. train each model in turn
  R="$D/$b"; ROOT="$WORK/budget_training_$b"
  now=$(( $(date +%s) - T0 ))
  if [ "${TRAIN:-1}" != 0 ] && [ "$DEADLINE_S" -gt 0 ] && [ "$LAST_S" -gt 0 ] && \
     [ $(( now + LAST_S + EVAL_RESERVE_S )) -gt "$DEADLINE_S" ]; then
    log "$b: skipped: ${now} s so far + ~${LAST_S} s to train it + ${EVAL_RESERVE_S} s for the evals would pass" \
      "DEADLINE_S=$DEADLINE_S"
    continue
  fi
  tb=$(date +%s)
  mkdir -p "$R"
  CFG=("${CFG_BASE[@]}" --config "recipes/overlays/budget_training_$b.yaml")
  if [ "${TRAIN:-1}" != 0 ]; then
    if ! SPEC=$("$PY" benchmarks/budget_training.py spec "${CFG[@]}"); then
      log "$b: cannot read its budget"; FAIL=1; continue
    fi
    FAM=${SPEC%%:*}
    if [ "$MATCH" = 1 ] && [ "$b" != "$MATCH_TO" ] && { [ "$FAM" = fixed ] || [ "$FAM" = length_scaled ]; }; then
      if [ -n "$REF_METRICS" ]; then
        M=$("$PY" benchmarks/budget_training.py match "${CFG[@]}" --family "$FAM" --target-metrics "$REF_METRICS" \
          --tol "$TOL" --json "$R/match.json" 2> "$R/match.log"); rc=$?
        if [ -n "$M" ] && { [ "$rc" = 0 ] || [ "$rc" = 3 ]; }; then
          SPEC=$M
          log "$b: matched to $MATCH_TO: $(tail -1 "$R/match.log")"
          [ "$rc" = 3 ] && log "$b: warning: the nearest $FAM budget is more than TOL=$TOL away from $MATCH_TO's cost"
        else
          log "$b: matching failed (exit $rc; $(tail -1 "$R/match.log")): the overlay's $SPEC"; FAIL=1
        fi
      else
        log "$b: $MATCH_TO not trained before it: the overlay's $SPEC (not matched to a measured cost)"
      fi
    fi
    echo "$SPEC" > "$R/budget.txt"
    CAP=(); [ -n "$STEPS" ] && CAP=(--trainer.max_steps "$STEPS" --model.total_steps "$STEPS")
    rm -rf "${ROOT:?}" "${R:?}/metrics_$b.csv" "$R/phase_times.json"  # a failed fit must not leave an older export
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
    step "$b: train" "$R/train.log" "$PY" -m memsparse.train.cli fit "${CFG[@]}" --overwrite true \
      --trainer.enable_progress_bar false --trainer.default_root_dir "$ROOT" \
      --data.tokenizer_dir "$WORK/budget_training_tokenizer" --model.config.budget "$SPEC" "${CAP[@]}" \
      ${TRAIN_ARGS:-} --trainer.logger lightning.pytorch.loggers.CSVLogger \
      --trainer.logger.init_args.save_dir "$ROOT/csv"
  fi
  m=$(newest_metrics "$ROOT/csv")
  [ -n "$m" ] && cp "$m" "$R/metrics_$b.csv"
  cp "$ROOT/phase_times.json" "$R/phase_times.json" 2>/dev/null
  "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("ended_by") != "max_time")' \
    "$R/phase_times.json" 2>/dev/null && log "$b: warning: stopped by trainer.max_time before max_steps (fewer steps)"
  [ "$b" = "$MATCH_TO" ] && [ -f "$R/metrics_$b.csv" ] && REF_METRICS="$R/metrics_$b.csv"
  DONE+=("$b")
  LAST_S=$(( $(date +%s) - tb ))
  pack
done

if [ "${EVAL:-1}" != 0 ]; then  # 2. evaluate every trained model on the same grid (at once with EVAL_PARALLEL=1)
  PIDS=()
  for b in "${DONE[@]}"; do
    R="$D/$b"; ROOT="$WORK/budget_training_$b"
    rm -rf "${R:?}/eval"
    if [ ! -f "$ROOT/export/config.json" ]; then
      log "$b: no export at $ROOT/export: not evaluated"; FAIL=1; continue
    fi
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
    EV=("$PY" -m memsparse.eval.cli --checkpoint "$ROOT/export" --no-progress --no-wandb --seed "${EVAL_SEED:-0}" \
      --out "$R/eval" --tasks "$EVAL_TASKS" --lengths "$EVAL_LENGTHS" --depths "$EVAL_DEPTHS" \
      --samples "$EVAL_SAMPLES" ${EVAL_ARGS:-})
    if [ "$EVAL_PARALLEL" = 1 ]; then
      step "$b: eval" "$R/eval.log" "${EV[@]}" &
      PIDS+=($!)
    else
      step "$b: eval" "$R/eval.log" "${EV[@]}"
    fi
  done
  for p in "${PIDS[@]}"; do wait "$p" || FAIL=1; done
  pack
fi

RUNS=(); RESULTS=(); METRICS=()
for b in "${DONE[@]}"; do
  RUNS+=("$b=$D/$b")
  [ -f "$D/$b/eval/results.json" ] && RESULTS+=("$D/$b/eval/results.json")
  [ -f "$D/$b/metrics_$b.csv" ] && METRICS+=("$b=$D/$b/metrics_$b.csv")
done
if [ "${#RUNS[@]}" -gt 0 ]; then
  step table "$D/table.log" "$PY" benchmarks/budget_training.py table "${RUNS[@]}" --reference "$MATCH_TO" \
    --tol "$TOL" --out "$D"
fi
if [ "${#RESULTS[@]}" -gt 0 ]; then
  rm -rf "${D:?}/pareto"
  step pareto "$D/pareto.log" "$PY" benchmarks/plot_budget_pareto.py "${RESULTS[@]}" --out "$D/pareto"
fi
if [ "${#METRICS[@]}" -gt 0 ]; then
  EXTRA=(--metric train/attn_kept_blocks)
  all_val=1
  for mm in "${METRICS[@]}"; do head -1 "${mm#*=}" | grep -q 'val/answer_token_acc' || all_val=0; done
  [ "$all_val" = 1 ] && EXTRA+=(--metric val/answer_token_acc)
  step "training curves" "$D/runs.log" "$PY" benchmarks/compare_runs.py "${METRICS[@]}" --name runs --out "$D" \
    --device "${DEV:-cpu}" --command "bash benchmarks/run_budget_training.sh (BUDGETS='$BUDGETS')" "${EXTRA[@]}"
fi
log "done after $(( $(date +%s) - T0 )) s (exit $FAIL)"
pack
exit "$FAIL"
