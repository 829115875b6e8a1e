#!/usr/bin/env bash
# Runs bench_sft once per configuration (own process: peak RSS is per process) and prints a
# markdown table: the quickstart model (assets/tiny-llama) and a 4-layer d=512 Llama, full
# fine-tuning against LoRA r=8 on every linear layer.
#   BUILD_DIR=build bench/sft/run.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/../.."
B="${BUILD_DIR:-build}/bench/bench_sft"
STEPS="${1:-8}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
echo "| model | mode | trainable params | seq x batch | ms/step | tokens/s | peak RSS MiB | AdamW state MiB |"
echo "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"
run() {
  local name="$1"; shift
  "$B" --steps "$STEPS" "$@" | python3 -c '
import json,sys
j=json.loads(sys.stdin.read()); n=sys.argv[1]
print(f"| {n} | {j[\"mode\"]} | {j[\"trainable\"]:,} | {j[\"seq\"]}x{j[\"batch\"]} | {j[\"ms_per_step\"]:.1f} | {j[\"tokens_per_s\"]:.0f} | {j[\"peak_rss_mib\"]:.0f} | {j[\"adamw_state_mib\"]:.2f} |")' "$name"
}
run "tiny-llama (quickstart)" --model assets/tiny-llama --seq 256 --batch 8 --lora-r 0
run "tiny-llama (quickstart)" --model assets/tiny-llama --seq 256 --batch 8 --lora-r 8
run "llama 4L d512" --layers 4 --d 512 --heads 8 --kv-heads 8 --ffn 1376 --vocab 2048 --seq 256 --batch 8 --lora-r 0
run "llama 4L d512" --layers 4 --d 512 --heads 8 --kv-heads 8 --ffn 1376 --vocab 2048 --seq 256 --batch 8 --lora-r 8
