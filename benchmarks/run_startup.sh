#!/usr/bin/env bash
# Where a GPU recipe's start-up goes (docs/performance.md, "What limits us now"), on the GPU machine:
#   bash benchmarks/run_startup.sh            (results under $OUT, default benchmarks/results)
# Three short runs of mac_small (CUDA graph, 30 optimizer steps, no validation after the sanity check), each
# timed by train.callbacks.PhaseTimes:
#   cold           fresh inductor and Triton caches (a first run on a machine)
#   cold_no_tune   fresh caches, sparse-attention autotuning off (MEMSPARSE_SPARSE_ATTENTION_AUTOTUNE=0)
#   warm           the caches `cold` left behind (a second run of the same recipe on the same machine)
set -u
OUT=${OUT:-benchmarks/results}
NAME=${NAME:-startup}
STEPS=${STEPS:-30}
mkdir -p "$OUT"
R=$(mktemp -d)

run() {  # label cache-dir [env...]
  local label=$1 cache=$2
  shift 2
  mkdir -p "$cache"
  env TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" "$@" \
    timeout 400 python3 -m memsparse.train.cli fit --config recipes/mac_small.yaml --overwrite true --trainer.callbacks '[{class_path: memsparse.train.callbacks.PhaseTimes}]' --model.cuda_graph true \
    --trainer.max_steps "$STEPS" --trainer.accumulate_grad_batches 1 --trainer.val_check_interval 1000 \
    --trainer.limit_val_batches 4 --trainer.default_root_dir "$R/$label" --trainer.logger false \
    > "$R/$label.log" 2>&1
  local rc=$?
  echo "== $label: exit $rc"
  grep -a "wall time" "$R/$label.log"
  [ $rc = 0 ] || tail -8 "$R/$label.log"
  cp "$R/$label.log" "$OUT/${NAME}_$label.log"
  cp "$R/$label/phase_times.json" "$R/$label.phase_times.json" 2>/dev/null || true
}

run cold "$R/cache_a"
run cold_no_tune "$R/cache_b" MEMSPARSE_SPARSE_ATTENTION_AUTOTUNE=0
run warm "$R/cache_a"

python3 - "$R" "$OUT" "$NAME" "$STEPS" <<'EOF'
import json, subprocess, sys
from pathlib import Path
r, out, name, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                        text=True).stdout.strip().splitlines()[:1] or ["?"]
runs = {}
for label in ("cold", "cold_no_tune", "warm"):
    f = r / f"{label}.phase_times.json"
    runs[label] = json.loads(f.read_text()) if f.is_file() else None
res = {"device": device[0], "command": f"bash benchmarks/run_startup.sh (mac_small, CUDA graph, {steps} steps)",
       "runs": runs}
(out / f"{name}.json").write_text(json.dumps(res, indent=1))
lines = [f"Start-up of `mac_small` (CUDA graph), {device[0]}, {steps} steps, train.callbacks.PhaseTimes", "",
         "| run | set-up s | to first batch s (sanity check) | first batch s | batches 2-5 s | fit s |",
         "|---|---|---|---|---|---|"]
for label, t in runs.items():
    if t is None or not t["first_batches_s"]:
        lines.append(f"| {label} | failed | | | | |")
        continue
    fb = t["first_batches_s"]
    lines.append(f"| {label} | {t['setup_s']:.1f} | {t['to_first_batch_s']:.1f} ({t['sanity_check_s']:.1f}) | "
                 f"{fb[0]:.1f} | {fb[-1] - fb[0]:.2f} | {t['fit_s']:.1f} |")
(out / f"{name}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
