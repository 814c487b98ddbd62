#!/usr/bin/env bash
# The seeds' three claims (issue 19) measured on one checkpoint, one command per claim:
#   CK=outputs/retrieval_small_long_more/export OUT=/tmp/rr NAME=claims bash benchmarks/run_claims.sh
#   CLAIMS="budget kept consolidation"   which claims (default: all three, in this order)
#
#   budget         memsparse-eval --sweep 'budget=$BUDGET_SPECS' on $BUDGET_TASKS x $BUDGET_LENGTHS x $BUDGET_DEPTHS
#                  (one eval per task into $D/budget_<task>/; SPLIT=0: one eval of all tasks into $D/budget_all/),
#                  then benchmarks/plot_budget_pareto.py -> $D/pareto/ (pareto_<task>.png, pareto_points.csv,
#                  pareto_wins.csv, pareto_wins.md: which family wins at matched FLOPs, per task and length)
#   kept           benchmarks/kept_budget_vs_length.py --budget "$KEPT_BUDGETS" --lengths $KEPT_LENGTHS
#                  --window $KEPT_WINDOW -> $D/kept/ (kept_budget.json/.csv/.png: kept tokens per query against
#                  visible context, the c * sqrt(L) fit)
#   consolidation  memsparse-eval --sweep 'consolidation=$CONS_SPECS' on $CONS_TASKS x $CONS_LENGTHS x $CONS_DEPTHS
#                  (one eval per task into $D/cons_<task>/, or SPLIT=0), then
#                  benchmarks/plot_consolidation_sweep.py -> $D/consolidation/ (consolidation_<task>.png,
#                  consolidation_points.csv, schedule_vs_fixed.csv)
#
# Defaults are the issue's grid for the retrieval model (window 512, segment 256, block 64, 64 persistent tokens:
# a query block sees 10-13 key blocks, 2 of them forced; its own budget length_scaled:c=12,min_tokens=512 keeps 8):
#   fixed:3..11 and length_scaled c=6..24 (min_tokens=128) span from near the 2 forced blocks to about dense;
#   the schedules a=0.25 / a=0.5 (n_max=8) run 2,2,3 / 3,4,6 passes at 32K,128K,1M (window 512): about
#   fixed:2 / fixed:4 in total passes.
# Rough H200 cost, from the stage-3 evals (15-20K tokens/s at 16K-128K, 46K at 1M, ~0.3 s a sample at 1K):
#   budget ~10 min (12 settings x 4 tasks x 4 lengths x 2 depths x 1 sample), kept ~1-2 min, consolidation
#   ~6-15 min (1M prompts, 7 settings x 2 tasks; what 8 passes cost is what it measures): give each claim its own
#   device call (CLAIMS=budget, ...) and shrink with the overrides below.
# Overrides: BUDGET_TASKS, BUDGET_LENGTHS, BUDGET_DEPTHS, BUDGET_SAMPLES, BUDGET_SPECS (';'-separated);
#   KEPT_BUDGETS, KEPT_LENGTHS, KEPT_WINDOW (full | native | N), KEPT_TASK, KEPT_SAMPLES, KEPT_ARGS;
#   CONS_TASKS, CONS_LENGTHS, CONS_DEPTHS, CONS_SAMPLES, CONS_SPECS; EVAL_ARGS (extra memsparse-eval arguments,
#   e.g. "--device cpu --threads 1"); WANDB=1 logs the evals to W&B (default off: --no-wandb); PYTHON.
# WINDOW=64k: the budget and consolidation evals run with memsparse-eval --window 64k (an inference-time attention
#   window, a multiple of the segment; default: the checkpoint's), so that the budget policies choose among many
#   more key blocks than the trained window's 10-13 (a window the model was not trained with: docs/evaluation.md).
#   Use a fresh NAME per window; the results record it (meta.window, each cell's window). Measured 2026-12-02 on the
#   stage-2 retrieval model (trained with window 512): at 64K it found no key under any budget, dense included, so
#   the widened window needs a model trained with a long one (docs/results.md).
# CPU smoke run (tests/test_run_claims.py): tiny lengths, one task each, EVAL_ARGS/KEPT_ARGS="--device cpu ...".
# Results and logs go to $OUT/$NAME/ and are packed into $OUT/$NAME.tgz after every step, so a cut-off run still
# brings back what it did. Exit status: 0 when every step succeeded, 1 otherwise.
set -u
: "${CK:?set CK to the checkpoint (an export directory or a memsparse-train .ckpt)}"
OUT=${OUT:-benchmarks/results}
NAME=${NAME:-claims}
CLAIMS=${CLAIMS:-"budget kept consolidation"}
PY=${PYTHON:-python3}
SPLIT=${SPLIT:-1}
BUDGET_TASKS=${BUDGET_TASKS:-"passkey niah_multikey niah_multiquery variable_tracking"}
BUDGET_LENGTHS=${BUDGET_LENGTHS:-1k,4k,16k,64k}
BUDGET_DEPTHS=${BUDGET_DEPTHS:-0.25,0.75}
BUDGET_SAMPLES=${BUDGET_SAMPLES:-1}
BUDGET_SPECS=${BUDGET_SPECS:-"dense;fixed:3;fixed:5;fixed:8;fixed:11;length_scaled:c=6,min_tokens=128;\
length_scaled:c=12,min_tokens=128;length_scaled:c=24,min_tokens=128;length_scaled:c=12,min_tokens=512;\
top_p:p=0.5;top_p:p=0.8;top_p:p=0.95"}
KEPT_BUDGETS=${KEPT_BUDGETS:-"top_p:p=0.5;top_p:p=0.8;top_p:p=0.95"}
KEPT_LENGTHS=${KEPT_LENGTHS:-1k,2k,4k,8k,16k,32k,64k,128k}
KEPT_WINDOW=${KEPT_WINDOW:-full}
KEPT_TASK=${KEPT_TASK:-passkey}
KEPT_SAMPLES=${KEPT_SAMPLES:-1}
CONS_TASKS=${CONS_TASKS:-"passkey niah_multikey"}
CONS_LENGTHS=${CONS_LENGTHS:-32k,128k,1m}
CONS_DEPTHS=${CONS_DEPTHS:-0.5}
CONS_SAMPLES=${CONS_SAMPLES:-1}
CONS_SPECS=${CONS_SPECS:-"off;fixed:1;fixed:2;fixed:4;fixed:8;schedule:a=0.25,n_max=8;schedule:a=0.5,n_max=8"}
W=(); [ "${WANDB:-0}" = 1 ] || W=(--no-wandb)

D="$OUT/$NAME"
mkdir -p "$D"
FAIL=0
# shellcheck source=benchmarks/run_lib.sh
source "$(dirname "$0")/run_lib.sh"  # pack, log, step
groups() {  # groups "t1 t2": one group per task, or with SPLIT=0 one group of all (comma-joined)
  if [ "$SPLIT" = 1 ]; then printf '%s\n' $1; else echo "$1" | tr -s ' ' ','; fi
}
sweep() {  # sweep KIND PREFIX TASKS LENGTHS DEPTHS SAMPLES SPECS: one memsparse-eval per group; FILES = results
  local kind=$1 prefix=$2 tasks=$3 lengths=$4 depths=$5 samples=$6 specs=$7 g name
  FILES=()
  for g in $(groups "$tasks"); do
    if [ "$SPLIT" = 1 ]; then name=$prefix$g; else name=${prefix}all; fi
    rm -rf "${D:?}/$name"  # a failed eval must not leave an earlier run's results behind
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
    step "$kind $g" "$D/$name.log" "$PY" -m memsparse.eval.cli --checkpoint "$CK" --no-progress "${W[@]}" \
      --out "$D/$name" --tasks "$g" --lengths "$lengths" --depths "$depths" --samples "$samples" \
      --sweep "$kind=$specs" ${WINDOW:+--window "$WINDOW"} ${EVAL_ARGS:-}
    [ -f "$D/$name/results.json" ] && FILES+=("$D/$name/results.json")
  done
}

for c in $CLAIMS; do
  case $c in
    budget)
      sweep budget budget_ "$BUDGET_TASKS" "$BUDGET_LENGTHS" "$BUDGET_DEPTHS" "$BUDGET_SAMPLES" "$BUDGET_SPECS"
      if [ "${#FILES[@]}" -gt 0 ]; then
        rm -rf "${D:?}/pareto"
        step "budget plots" "$D/pareto.log" "$PY" benchmarks/plot_budget_pareto.py "${FILES[@]}" --out "$D/pareto"
      else log "budget: no results to plot"; FAIL=1; fi ;;
    kept)
      # shellcheck disable=SC2086  # KEPT_ARGS is a list of arguments
      rm -rf "${D:?}/kept"
      step kept "$D/kept.log" "$PY" benchmarks/kept_budget_vs_length.py --checkpoint "$CK" --budget "$KEPT_BUDGETS" \
        --lengths "$KEPT_LENGTHS" --window "$KEPT_WINDOW" --task "$KEPT_TASK" --samples "$KEPT_SAMPLES" \
        --out "$D/kept" ${KEPT_ARGS:-} ;;
    consolidation)
      sweep consolidation cons_ "$CONS_TASKS" "$CONS_LENGTHS" "$CONS_DEPTHS" "$CONS_SAMPLES" "$CONS_SPECS"
      if [ "${#FILES[@]}" -gt 0 ]; then
        rm -rf "${D:?}/consolidation"
        step "consolidation plots" "$D/consolidation.log" "$PY" benchmarks/plot_consolidation_sweep.py "${FILES[@]}" \
          --out "$D/consolidation"
      else log "consolidation: no results to plot"; FAIL=1; fi ;;
    *) echo "unknown claim $c (budget, kept or consolidation)"; exit 2 ;;
  esac
done
log "done (exit $FAIL)"
pack
exit "$FAIL"
