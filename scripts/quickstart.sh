#!/usr/bin/env bash
# Installs what is missing, builds, then fine-tunes the embedded tiny model (assets/tiny-llama)
# with LoRA on the synthetic instruction data (recipes/quickstart_lora.yaml): the run prints the
# eval loss and sample generations before and after, then exports the result as a PEFT adapter
# and as a merged Hugging Face folder. Output: runs/quickstart_lora (override with OUT=...).
# A few minutes on 2 CPU cores, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_deps.sh
BUILD_DIR=build scripts/build.sh
source scripts/env.sh
OUT="${OUT:-runs/quickstart_lora}"
rm -rf "$OUT"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
./build/ftune validate recipes/quickstart_lora.yaml
start=$(date +%s)
./build/ftune run recipes/quickstart_lora.yaml output_dir="$OUT"
echo "training took $(( $(date +%s) - start )) s"
./build/ftune export "$OUT" --format peft -o "$OUT/export_peft"
./build/ftune export "$OUT" --format hf -o "$OUT/export_hf"
./build/ftune generate --model "$OUT/export_hf" --chat -n 24 \
  --prompt "Which color is the flag of Doulax?"
echo "quickstart: done. Metrics: $OUT/metrics.jsonl; checkpoints and exports in $OUT"
