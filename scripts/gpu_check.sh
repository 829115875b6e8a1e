#!/usr/bin/env bash
# The GPU check: every CUDA-vs-CPU test and the GPU benchmarks, on a lent H100/H200 (sm_90).
#
#   scripts/gpu_check.sh bundle      # here (no GPU needed): build for sm_90, then pack the test
#                                    # and benchmark binaries with the non-CUDA shared libraries
#                                    # they need into gpu_bundle/bundle.tar.xz (ignored by git)
#   scripts/gpu_check.sh run         # on the GPU machine: unpack, run the tests and benchmarks,
#                                    # logs under $OUT (default ./out), a short table last
#
# The device tool call (docs/gpu.md):  run(command="scripts/gpu_check.sh run", carry=["gpu_bundle"])
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
mode="${1:-}"

bundle() {
  set -e
  source scripts/env.sh
  local build="${FTUNE_GPU_BUILD:-build}"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    scripts/setup_deps.sh
    cmake -S . -B "$build" -G Ninja -DFTUNE_CUDA=ON -DFTUNE_CUDA_ARCHS=90 -DFTUNE_BUILD_BENCH=ON
  fi
  grep -q '^FTUNE_CUDA:BOOL=ON' "$build/CMakeCache.txt" || { echo "gpu_check: $build is not a CUDA build" >&2; exit 1; }
  cmake --build "$build" -j"$FTUNE_JOBS" --target test_cuda bench_gpu ftune test_launch bench_sft test_models
  rm -rf gpu_bundle && mkdir -p gpu_bundle/stage/bin gpu_bundle/stage/lib
  # Binaries keep their paths relative to the build dir: tests find ftune and the fixtures through
  # absolute paths compiled in (FTUNE_BINARY, FTUNE_SOURCE_DIR), which `run` recreates.
  local rel=(tests/test_cuda bench/bench_gpu ftune tests/test_launch bench/bench_sft tests/test_models)
  for r in "${rel[@]}"; do mkdir -p "gpu_bundle/stage/bin/$(dirname "$r")"; cp "$build/$r" "gpu_bundle/stage/bin/$r"; done
  (cd "$build" && pwd -P) > gpu_bundle/stage/BUILDDIR
  pwd -P > gpu_bundle/stage/SRCDIR
  # Every shared library the binaries load, except glibc's and the CUDA libraries (cuBLAS, cuDNN,
  # NCCL: the device image has its own, matching its driver).
  for r in "${rel[@]}"; do ldd "$build/$r"; done | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
      libcuda.so*|libcublas*|libcudnn*|libnccl*|libcudart*) ;;
      *) cp -L "$lib" gpu_bundle/stage/lib/ ;;
    esac
  done
  cp bench/gpu/*.py gpu_bundle/stage/ 2>/dev/null || true
  git rev-parse --short HEAD > gpu_bundle/stage/COMMIT 2>/dev/null || true
  tar -C gpu_bundle/stage -cJf gpu_bundle/bundle.tar.xz .
  rm -rf gpu_bundle/stage
  du -sh gpu_bundle/bundle.tar.xz
}

run() {
  OUT="${OUT:-$ROOT/out}"
  mkdir -p "$OUT"
  local B=/tmp/ftune_gpu
  rm -rf "$B" && mkdir -p "$B" && tar -C "$B" -xJf gpu_bundle/bundle.tar.xz || { echo "gpu_check: no gpu_bundle/bundle.tar.xz (run 'scripts/gpu_check.sh bundle' here first)"; exit 1; }
  # The device's CUDA libraries: the toolkit's, then torch's nvidia-* wheels.
  local cudalibs=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && cudalibs="$cudalibs:$d"; done
  local nv
  nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)/nvidia
  for d in "$nv"/*/lib "$nv"/cu13/lib; do [ -d "$d" ] && cudalibs="$cudalibs:$d"; done
  export LD_LIBRARY_PATH="$B/lib$cudalibs:${LD_LIBRARY_PATH:-}"
  export OMP_NUM_THREADS=8 OMP_WAIT_POLICY=passive
  # The absolute paths the tests were built with: the source dir (fixtures, recipes, assets) is
  # this checkout, the build dir gets the binaries.
  local src bld
  src=$(cat "$B/SRCDIR"); bld=$(cat "$B/BUILDDIR")
  if [ "$src" != "$ROOT" ] && [ ! -e "$src" ]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
  if [ ! -e "$bld" ]; then mkdir -p "$bld"; fi
  cp -r "$B/bin/." "$bld/"
  # At most 8 files come back from $OUT: test_cuda.log (environment first), test_trainer.log,
  # quickstart_gpu.log, bench_gpu.md, bench_gpu.log, torch_ref.log, e2e.jsonl, e2e.log (which
  # also holds bench_sft's op-profile tables).
  {
    echo "commit $(cat $B/COMMIT 2>/dev/null) on $(hostname), $(date -u)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    ldd "$B/bin/tests/test_cuda" "$B/bin/ftune" | grep -E "cublas|cudnn|not found" || true
  } > "$OUT/test_cuda.log"
  head -3 "$OUT/test_cuda.log"
  # GPU_CHECK_PART: all (default), core (tests, trainer, bench_gpu, torch reference: what
  # GPU_CHECK_E2E=0 runs) or e2e (the end-to-end steps only). The whole check can run past one
  # device call's 10 minutes; core then e2e, each in its own call, fits.
  local part="${GPU_CHECK_PART:-all}"
  [ "${GPU_CHECK_E2E:-1}" = 1 ] || part=core
  local t0=$SECONDS trc=0 lrc=0 qrc=0 brc=0 prc=0 t1 t15 t2 t3
  if [ "$part" != e2e ]; then
  timeout 240 "$bld/tests/test_cuda" >> "$OUT/test_cuda.log" 2>&1
  trc=$?
  t1=$SECONDS
  # The trainer on the GPU: the GPU-vs-CPU run test, then the quickstart recipe in bf16.
  local multi='SftRun.GpuTensorParallel*:SftRun.GpuDataParallel*'
  timeout 150 "$bld/tests/test_launch" --gtest_filter="SftRun.Gpu*:LossScaleRun.F16*:Cli.Gpu*:-$multi" > "$OUT/test_trainer.log" 2>&1
  lrc=$?
  # Two ranks as threads sharing the GPU (tp 2, dp 2 + ZeRO-1): apart, so a hang costs only them.
  timeout 120 "$bld/tests/test_launch" --gtest_filter="$multi" >> "$OUT/test_trainer.log" 2>&1 || lrc=$?
  # Model-level GPU tests (batched q/k/v LoRA on the GPU vs the CPU), in the same log.
  timeout 60 "$bld/tests/test_models" --gtest_filter='*Gpu*' >> "$OUT/test_trainer.log" 2>&1 || lrc=$?
  (cd "$ROOT" && timeout 120 "$bld/ftune" run recipes/quickstart_lora.yaml device=cuda dtype=bf16 \
      output_dir=/tmp/ftune_qs_gpu > "$OUT/quickstart_gpu.log" 2>&1)
  qrc=$?
  t15=$SECONDS
  timeout 240 "$bld/bench/bench_gpu" --out "$OUT/bench_gpu.md" > "$OUT/bench_gpu.log" 2>&1
  brc=$?
  t2=$SECONDS
  for py in "$B"/*.py; do
    [ -e "$py" ] || continue
    PYTHONUNBUFFERED=1 timeout 120 python3 "$py" >> "$OUT/torch_ref.log" 2>&1 || prc=$?
  done
  fi
  t1=${t1:-$t0}; t15=${t15:-$t0}; t2=${t2:-$t0}
  t3=$SECONDS
  # End to end (issue 7): one SFT step of a ~0.5B Llama-style model (Qwen2.5-0.5B's shapes: d 896,
  # 24 layers, 14 heads of 64, 2 kv heads, ffn 4864, vocab 151936 tied) at seq 2048, bf16, LoRA
  # and full, ftune vs transformers + peft on the same shapes. GPU_CHECK_E2E=0 skips it.
  # LoRA and full (no ckpt) also run 2 (+2) steps under the op-level profiler after their timed
  # steps (bench_sft --profile): the tables go to e2e.log (stderr), "== profile: ..." first.
  if [ "$part" != core ]; then
    local shape="--layers 24 --d 896 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936 --seq 2048 --batch 4 --steps 4 --warmup 2 --device cuda --dtype bf16"
    local prof
    for mode in "--lora-r 16" "--lora-r 0" "--lora-r 0 --ckpt 1"; do
      case "$mode" in *ckpt*) prof="" ;; *) prof="--profile 2" ;; esac
      timeout 150 "$bld/bench/bench_sft" $shape $mode $prof >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $mode failed: $?" >> "$OUT/e2e.log"
      (cd "$ROOT" && PYTHONUNBUFFERED=1 timeout 150 python3 bench/sft/peft_step.py $shape $mode >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log") || echo "peft_step $mode failed: $?" >> "$OUT/e2e.log"
    done
    # A/B rows, no profile: full with cuDNN's attention (attention.backend: cudnn); full with the
    # loss through linear then cross_entropy (--chunked-loss 0: the whole logits); full with the
    # GEMMs autotuned (gemm_autotune); LoRA without the batched q/k/v projection
    # (FTUNE_FUSED_QKV=0). They decide those defaults.
    for ab in "--lora-r 0 --attention cudnn" "--lora-r 0 --chunked-loss 0" "--lora-r 0 --gemm-autotune 1"; do
      timeout 150 "$bld/bench/bench_sft" $shape $ab >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $ab failed: $?" >> "$OUT/e2e.log"
    done
    FTUNE_FUSED_QKV=0 timeout 150 "$bld/bench/bench_sft" $shape --lora-r 16 >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft --lora-r 16 FTUNE_FUSED_QKV=0 failed: $?" >> "$OUT/e2e.log"
    # LoRA with dropout 0.05 (a common recipe setting): ftune (the fused low-rank kernels), the
    # peer with the same dropout, and ftune's unfused path (FTUNE_LORA_FUSED=0) as the A/B.
    local drop="--lora-r 16 --lora-dropout 0.05"
    timeout 150 "$bld/bench/bench_sft" $shape $drop >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $drop failed: $?" >> "$OUT/e2e.log"
    (cd "$ROOT" && PYTHONUNBUFFERED=1 timeout 150 python3 bench/sft/peft_step.py $shape $drop >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log") || echo "peft_step $drop failed: $?" >> "$OUT/e2e.log"
    FTUNE_LORA_FUSED=0 timeout 150 "$bld/bench/bench_sft" $shape $drop >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $drop FTUNE_LORA_FUSED=0 failed: $?" >> "$OUT/e2e.log"
  fi
  local t4=$SECONDS

  # The report: short, the most important last (the device tool returns the output's tail).
  echo
  echo "== torch reference (torch_ref.log, tail) =="
  tail -45 "$OUT/torch_ref.log" 2>/dev/null
  echo
  echo "== bench_gpu: rows below 80% of copy bandwidth (all in bench_gpu.md) =="
  grep -E "^\| [a-z]" "$OUT/bench_gpu.md" 2>/dev/null | grep -v "attn_fwd" | awk -F'|' '{gsub(/ /,"",$5); if ($5+0 < 80) print}' | cut -c1-110 | head -30
  tail -2 "$OUT/bench_gpu.log" 2>/dev/null
  echo
  echo "== end-to-end SFT step (e2e.jsonl) =="
  python3 - "$OUT/e2e.jsonl" <<'PY' 2>/dev/null || true
import json, sys
print("| impl | mode | ckpt | ms/step | tokens/s | MFU | peak GPU MiB |")
print("|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except Exception:
        continue
    impl = j.get('impl', 'ftune') + ('+' + j['attention'] if j.get('attention', 'ftune') != 'ftune' else '')
    impl += ' (unbatched qkv)' if j.get('mode') == 'lora' and j.get('fused_qkv') is False else ''
    impl += ' (whole logits)' if j.get('chunked_loss') is False else ''
    impl += ' (dropout %g)' % j['lora_dropout'] if j.get('lora_dropout') else ''
    impl += ' (FTUNE_LORA_FUSED=%s)' % j['lora_fused'] if j.get('lora_fused', 'auto') != 'auto' else ''
    print(f"| {impl} | {j['mode']} | {j.get('activation_checkpointing')} | {j['ms_per_step']:.1f} | "
          f"{j['tokens_per_s']:.0f} | {(j.get('mfu_vs_989tflops') or 0) * 100:.1f}% | {j.get('peak_gpu_mib') or 0:.0f} |")
PY
  grep -v -E "^== profile|^profile:|^step \(ms\)|^  with|^host issue|^attributed|^phase|^(forward|backward|clip|adamw|step) |^$|^ " "$OUT/e2e.log" 2>/dev/null | tail -3
  echo
  echo "== where the step's time goes: op profile, top rows (whole tables in e2e.log) =="
  grep -A26 "^== profile: " "$OUT/e2e.log" 2>/dev/null | cut -c1-120
  echo
  echo "== trainer =="
  grep -E "^\[  FAILED  \]|Failure|^\[       OK \]|Expected|Which is|actual" "$OUT/test_trainer.log" 2>/dev/null | head -12
  grep -E "^epoch|^eval|error" "$OUT/quickstart_gpu.log" 2>/dev/null | tail -4
  echo
  echo "== test_cuda failures (full log in test_cuda.log) =="
  grep -E "^\[  FAILED  \] [A-Za-z]" "$OUT/test_cuda.log" | grep -v " ms)" | sort -u | head -30
  grep -A3 "Failure$" "$OUT/test_cuda.log" | grep -E "Actual|Expected:|exception" | cut -c1-200 | head -14
  echo
  echo "== summary =="
  local pass fail skip
  pass=$(grep -c "^\[       OK \]" "$OUT/test_cuda.log")
  fail=$(grep -E "^\[  FAILED  \] [A-Za-z]" "$OUT/test_cuda.log" | grep -c " ms)")
  skip=$(grep -c "^\[  SKIPPED \] .* ms)" "$OUT/test_cuda.log")
  printf "| step | rc | seconds | result |\n|---|---|---|---|\n"
  printf "| test_cuda | %s | %s | %s passed, %s failed, %s skipped |\n" "$trc" $((t1 - t0)) "$pass" "$fail" "$skip"
  printf "| trainer test | %s | | %s |\n" "$lrc" "$(grep -c '^\[       OK \]' "$OUT/test_trainer.log" 2>/dev/null) ok"
  printf "| quickstart bf16 | %s | %s | %s |\n" "$qrc" $((t15 - t1)) "$(grep -E '^epoch' "$OUT/quickstart_gpu.log" 2>/dev/null | tail -1 | cut -c1-60)"
  printf "| bench_gpu | %s | %s | %s rows |\n" "$brc" $((t2 - t15)) "$(grep -c '^| [a-z]' "$OUT/bench_gpu.md" 2>/dev/null)"
  printf "| torch ref | %s | %s | |\n" "$prc" $((t3 - t2))
  printf "| e2e sft | | %s | %s rows |\n" $((t4 - t3)) "$(grep -c ms_per_step "$OUT/e2e.jsonl" 2>/dev/null)"
  [ "$trc" = 0 ] && [ "$brc" = 0 ] && [ "$lrc" = 0 ]
}

case "$mode" in
  bundle) bundle ;;
  run) run ;;
  *) echo "usage: scripts/gpu_check.sh bundle|run" >&2; exit 2 ;;
esac
