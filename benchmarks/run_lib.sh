# Shell helpers shared by the benchmark drivers (benchmarks/run_claims.sh, benchmarks/run_budget_training.sh):
# source it after setting OUT, NAME and D="$OUT/$NAME" (and FAIL=0).
#   pack                          $OUT/$NAME.tgz from $OUT/$NAME, written to a temporary name and moved into place,
#                                 so steps running at once never leave a torn archive
#   log MESSAGE...                a time-stamped line on stdout and in $D/steps.log
#   step LABEL LOGFILE CMD...     run CMD into LOGFILE, log its exit status and time, show its last ${TAIL:-12}
#                                 lines, set FAIL=1 when it failed, pack; returns CMD's exit status
#   newest_metrics DIR            the newest metrics.csv a CSVLogger wrote below DIR (empty if none)
pack() {
  local tmp="$OUT/.$NAME.tgz.$BASHPID"
  tar -czf "$tmp" -C "$OUT" "$NAME" 2>/dev/null
  mv -f "$tmp" "$OUT/$NAME.tgz"
}
log() { echo "[$(date +%T)] $*" | tee -a "$D/steps.log"; }
step() {
  local label=$1 logf=$2 t0 rc
  shift 2
  log "$label: $*"
  t0=$(date +%s)
  "$@" > "$logf" 2>&1
  rc=$?
  log "$label: exit $rc after $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-12}" "$logf"
  [ "$rc" = 0 ] || FAIL=1
  pack
  return "$rc"
}
newest_metrics() {
  find "$1" -name metrics.csv -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -1 | cut -d' ' -f2-
}
