#!/usr/bin/env bash
# A/B of the batched q/k/v (docs/lora.md "Batched q/k/v"): build/bench/bench_sft with
# FTUNE_FUSED_QKV=0 (three projections) and =1 (batched), alternating, PAIRS times each, every run
# its own process. Prints each run's ms/step, and the median and the minimum per side.
#   BUILD_DIR=build bench/sft/fused_qkv_ab.sh PAIRS [bench_sft args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
B="${BUILD_DIR:-build}/bench/bench_sft"
PAIRS="${1:-5}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); args: $*"
declare -A runs=([0]="" [1]="")
for ((i = 0; i < PAIRS; ++i)); do
  for f in 0 1; do
    ms=$(FTUNE_FUSED_QKV=$f "$B" "$@" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["ms_per_step"],1))')
    runs[$f]+="$ms "
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for f in 0 1; do
  stats=$(python3 -c 'import statistics,sys; v=list(map(float,sys.argv[1:])); print("median", statistics.median(v), "min", min(v))' ${runs[$f]})
  echo "FTUNE_FUSED_QKV=$f runs: ${runs[$f]}$stats"
done
