#!/usr/bin/env bash
# Pretrains the embedded tiny Llama with ftune itself (recipes/pretrain_tiny.yaml: random init,
# full training on data/pretrain.jsonl) and writes assets/tiny-llama/model.safetensors.
# Reproducible: the same machine type and OMP_NUM_THREADS (2, as committed) give the same bytes;
# another thread count or CPU may round differently in the last bits, not in quality.
#   assets/make_model.sh            # ~6 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
[ -x "$BUILD_DIR/ftune" ] || BUILD_DIR="$BUILD_DIR" scripts/build.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY=passive
OUT="${OUT:-runs/pretrain_tiny}"
rm -rf "$OUT" "$OUT.hf"
mkdir -p "$(dirname "$OUT")"
"$BUILD_DIR/ftune" run recipes/pretrain_tiny.yaml output_dir="$OUT" | tee "$OUT.log"
"$BUILD_DIR/ftune" export "$OUT" --format hf -o "$OUT.hf"
cp "$OUT.hf/model.safetensors" assets/tiny-llama/model.safetensors
sha256sum assets/tiny-llama/model.safetensors
