#!/usr/bin/env bash
# Stage 2 of the retrieval curriculum (or stages 2-4) once per data seed, all from one stage-1 export, one seed after
# the other (PARALLEL=1: side by side on one GPU, no faster: a stage-2 run alone keeps an H100 busy, two side by side
# made 0.23 s a step each against 0.12 alone, benchmarks/results/retrieval_stage2_steps_h100_2026-12-06/; their wall
# times are then not a solo run's):
#   STAGES=1 EVALS= bash benchmarks/run_retrieval.sh          stage 1 once (its export stays in outputs/)
#   SEEDS="0 1" bash benchmarks/run_retrieval_seeds.sh        then stage 2 with --data.seed 0 and --data.seed 1
# Every other variable goes to benchmarks/run_retrieval.sh (STAGES, default 2; STEPS2, TRAIN_ARGS2, EVALS, MEM, ...);
# each seed's TRAIN_ARGS2 starts with "--data.seed <s>". Stages 2-4 are deterministic given the export and data.seed
# (docs/results.md), so the seeds are what varies. Each seed runs in its own directory ($WORK/data_seed<s>, holding
# links to recipes/, benchmarks/ and stage 1's outputs) so the runs' outputs/ do not collide; results go to
# $OUT/${NAME}_data_seed<s>/ (and .tgz) as run_retrieval.sh writes them, its log to $OUT/${NAME}_data_seed<s>.log.
# RESUME=1 keeps those directories: with TRAIN_ARGS2="--ckpt_path last" and a larger STEPS2 each seed's run goes on.
# FROM=2: stage 3 (STAGES default 3; or "3 4") once per data seed from one stage-2 export instead, the seed going to
# TRAIN_ARGS3 (stage 3's spread by data seed alone is wide: passkey 0.68-1.00 at 32K, docs/results.md):
#   STAGES="1 2" EVALS= bash benchmarks/run_retrieval.sh    then   FROM=2 SEEDS="1 2 3" EVALS=passkey bash benchmarks/run_retrieval_seeds.sh
set -u
ROOT=$(pwd)
SEEDS=${SEEDS:-"0 1"}
FROM=${FROM:-1}
case $FROM in 1) FIRST=2 ;; 2) FIRST=3 ;; *) echo "FROM is 1 (stages 2-4 from stage 1's export) or 2 (stages 3-4 from stage 2's)"; exit 2 ;; esac
STAGES=${STAGES:-$FIRST}
NAME=${NAME:-retrieval_small}
WORK=${WORK:-/tmp/memsparse_seeds}
if [ "${MEM:-1}" = 1 ]; then C1=retrieval_small_copy; C2=retrieval_small; else
  C1=ablation_retrieval_no_memory_copy; C2=ablation_retrieval_no_memory; fi
if [ "$FROM" = 1 ]; then CF=$C1; BEFORE="STAGES=1"; else CF=$C2; BEFORE='STAGES="1 2"'; fi
for s in $STAGES; do
  if [ "$s" -lt "$FIRST" ] 2>/dev/null; then
    echo "run_retrieval_seeds.sh (FROM=$FROM) repeats stages $FIRST-4 from stage $FROM's export: run $BEFORE bash benchmarks/run_retrieval.sh first"
    exit 2
  fi
done
[ -d "outputs/$CF/export" ] || { echo "no outputs/$CF/export here: run $BEFORE bash benchmarks/run_retrieval.sh first"; exit 2; }
mkdir -p "${OUT:-benchmarks/results}"
OUT=$(cd "${OUT:-benchmarks/results}" && pwd)  # absolute: each run starts in its own directory

for s in $SEEDS; do
  [[ "$s" =~ ^[0-9]+$ ]] || { echo "SEEDS holds '$s': data seeds are non-negative integers"; exit 2; }
  [ "${RESUME:-0}" != 1 ] || [ -d "$WORK/data_seed$s/outputs" ] || { echo "RESUME=1: no earlier run in $WORK/data_seed$s"; exit 2; }
done

SEED_ARGS="TRAIN_ARGS$FIRST"  # the first repeated stage takes the seed
run() {  # run SEED: run_retrieval.sh in the seed's directory
  (cd "$WORK/data_seed$1" && env OUT="$OUT" STAGES="$STAGES" NAME="${NAME}_data_seed$1" \
    "$SEED_ARGS=--data.seed $1 ${!SEED_ARGS:-}" bash benchmarks/run_retrieval.sh > "$OUT/${NAME}_data_seed$1.log" 2>&1)
}
pids=()
rc=0
for s in $SEEDS; do
  W="$WORK/data_seed$s"
  if [ "${RESUME:-0}" != 1 ]; then  # RESUME=1: the seeds' earlier runs go on (TRAIN_ARGS2="--ckpt_path last")
    rm -rf "$W" && mkdir -p "$W/outputs"
    ln -s "$ROOT/recipes" "$ROOT/benchmarks" "$W/"
    ln -s "$ROOT/outputs/$C1" "$W/outputs/$C1"  # stage 1's export or, with FROM=2, its tokenizer
    [ "$FROM" = 2 ] && ln -s "$ROOT/outputs/$C2" "$W/outputs/$C2"
  fi
  echo "data seed $s: $W, log $OUT/${NAME}_data_seed$s.log"
  if [ "${PARALLEL:-0}" = 1 ]; then run "$s" & pids+=($!); else run "$s" || rc=1; fi
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
