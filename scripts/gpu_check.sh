#!/usr/bin/env bash
# The GPU check: every CUDA-vs-CPU test and the GPU benchmarks, on a lent H100/H200 (sm_90).
#
#   scripts/gpu_check.sh bundle      # here (no GPU needed): build for sm_90, then pack the test
#                                    # and benchmark binaries with the non-CUDA shared libraries
#                                    # they need into gpu_bundle/bundle.tar.xz (ignored by git)
#   scripts/gpu_check.sh run         # on the GPU machine: unpack, run the tests and benchmarks,
#                                    # logs under $OUT (default ./out), a short table last
#
# The device tool call (docs/gpu.md):
#   run(command="scripts/gpu_check.sh run", carry=["gpu_bundle"], timeout_s=600)
# It runs against one deadline (GPU_CHECK_BUDGET, 540 s), the most important steps first; the
# report names the steps cut and the call that runs them (GPU_CHECK_STEPS=...).
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
    cmake -S . -B "$build" -G Ninja -DFTUNE_CUDA=ON -DFTUNE_CUDA_ARCHS=90a -DFTUNE_BUILD_BENCH=ON
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

# ---- the run's steps, most important first (run() calls them in GPU_CHECK_STEPS order) ----------
kReserve=10          # seconds kept for the report after the last step
declare -A rc        # step -> the first non-zero exit status of its commands ("skipped": no time)
declare -A cut       # step -> 1 when some of its commands were not started (no time left)
# min(CAP, the seconds left before the deadline less the report's reserve)
tmo() { local left=$((deadline - SECONDS - kReserve)); if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi; }
# go CAP STEP CMD...: CMD under timeout (CAP or what is left); not started with under 20 s left.
go() {
  local cap step=$2
  cap=$(tmo "$1")
  shift 2
  if [ "$cap" -lt 20 ]; then
    echo "gpu_check: no time left for: ${*##*/}" >&2
    rc[$step]=${rc[$step]:-skipped}
    cut[$step]=1
    return 124
  fi
  timeout "$cap" "$@"
  local r=$?
  if [ "$r" != 0 ] && [ "${rc[$step]:-0}" = 0 ]; then rc[$step]=$r; fi
  return $r
}
# Every CUDA kernel against its CPU twin (~1 min on the H200 in session 3, 182 tests then).
# The wgmma forward (never run on a GPU before) in a process of its own: a faulting kernel takes
# its process's CUDA context with it, and no other test.
step_test_cuda() {
  go 240 test_cuda "$bld/tests/test_cuda" --gtest_filter='-CudaAttentionWgmma.*' >> "$OUT/test_cuda.log" 2>&1
  go 120 test_cuda "$bld/tests/test_cuda" --gtest_filter='CudaAttentionWgmma.*' >> "$OUT/test_cuda.log" 2>&1
}
# The trainer on the GPU: the GPU-vs-CPU run tests, f16 loss scaling, `ftune generate` on the GPU,
# the model-level GPU tests (batched q/k/v LoRA vs the CPU), then the quickstart recipe in bf16.
step_trainer() {
  local multi='SftRun.GpuTensorParallel*:SftRun.GpuDataParallel*'
  go 150 trainer "$bld/tests/test_launch" --gtest_filter="SftRun.Gpu*:LossScaleRun.F16*:Cli.Gpu*:-$multi" > "$OUT/test_trainer.log" 2>&1
  go 60 trainer "$bld/tests/test_models" --gtest_filter='*Gpu*' >> "$OUT/test_trainer.log" 2>&1
  go 120 trainer "$bld/ftune" run recipes/quickstart_lora.yaml device=cuda dtype=bf16 \
    output_dir=/tmp/ftune_qs_gpu > "$OUT/quickstart_gpu.log" 2>&1
}
# Every kernel benchmark (bench_gpu.md is rewritten after each family: a timeout keeps the rows).
step_bench_gpu() { go 240 bench_gpu "$bld/bench/bench_gpu" --out "$OUT/bench_gpu.md" > "$OUT/bench_gpu.log" 2>&1; }
# The torch references of bench_gpu's attention and LoRA rows (SDPA flash / cuDNN; the PyTorch
# LoRA composition under autograd).
step_torch_ref() {
  local py
  for py in "$B"/torch_*.py; do
    [ -e "$py" ] || continue
    PYTHONUNBUFFERED=1 go 120 torch_ref python3 "$py" >> "$OUT/torch_ref.log" 2>&1
  done
}
# End to end (issue 7): one SFT step of a ~0.5B Llama-style model (Qwen2.5-0.5B's shapes: d 896,
# 24 layers, 14 heads of 64, 2 kv heads, ffn 4864, vocab 151936 tied) at seq 2048, bf16, ftune
# vs transformers + peft on the same shapes: LoRA, then full. ftune's runs also take 2 (+2)
# steps under the op-level profiler after their timed ones (bench_sft --profile): the tables go
# to e2e.log (stderr), "== profile: ..." first.
kShape="--layers 24 --d 896 --heads 14 --kv-heads 2 --ffn 4864 --vocab 151936 --seq 2048 --batch 4 --steps 4 --warmup 2 --device cuda --dtype bf16"
e2e_pair() {  # STEP MODE [PROFILE]: ftune, then the peer, with the same shape and mode
  local step=$1 mode=$2 prof=${3:-}
  # shellcheck disable=SC2086
  go 150 "$step" "$bld/bench/bench_sft" $kShape $mode $prof >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $mode failed: $?" >> "$OUT/e2e.log"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 go 150 "$step" python3 bench/sft/peft_step.py $kShape $mode >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "peft_step $mode failed: $?" >> "$OUT/e2e.log"
}
step_e2e() {
  e2e_pair e2e "--lora-r 16" "--profile 2"
  e2e_pair e2e "--lora-r 0" "--profile 2"
}
# Two ranks as threads sharing the GPU (tp 2, dp 2 + ZeRO-1): apart, so a hang costs only them.
step_multi_rank() {
  go 120 multi_rank "$bld/tests/test_launch" --gtest_filter='SftRun.GpuTensorParallel*:SftRun.GpuDataParallel*' >> "$OUT/test_trainer.log" 2>&1
}
# The A/B rows that decide defaults, no profile: full with the wgmma attention kernels
# (FTUNE_ATTN_WGMMA=1, and =2: the pipelined forward, two warpgroups per backward CTA); full
# with cuDNN's attention (attention.backend: cudnn); full with the loss through linear then
# cross_entropy (--chunked-loss 0: the whole logits); full with the GEMMs autotuned (gemm_autotune); LoRA without the batched q/k/v
# projection (FTUNE_FUSED_QKV=0); LoRA with dropout 0.05 (a common recipe setting): ftune, the
# peer, and ftune's unfused path (FTUNE_LORA_FUSED=0); full with activation checkpointing, and
# its peer.
step_e2e_ab() {
  local ab wg drop="--lora-r 16 --lora-dropout 0.05"
  for wg in 1 2; do
    # shellcheck disable=SC2086
    go 150 e2e_ab env FTUNE_ATTN_WGMMA=$wg "$bld/bench/bench_sft" $kShape --lora-r 0 >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft --lora-r 0 FTUNE_ATTN_WGMMA=$wg failed: $?" >> "$OUT/e2e.log"
  done
  for ab in "--lora-r 0 --attention cudnn" "--lora-r 0 --chunked-loss 0" "--lora-r 0 --gemm-autotune 1"; do
    # shellcheck disable=SC2086
    go 150 e2e_ab "$bld/bench/bench_sft" $kShape $ab >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $ab failed: $?" >> "$OUT/e2e.log"
  done
  # shellcheck disable=SC2086
  go 150 e2e_ab env FTUNE_FUSED_QKV=0 "$bld/bench/bench_sft" $kShape --lora-r 16 >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft --lora-r 16 FTUNE_FUSED_QKV=0 failed: $?" >> "$OUT/e2e.log"
  e2e_pair e2e_ab "$drop"
  # shellcheck disable=SC2086
  go 150 e2e_ab env FTUNE_LORA_FUSED=0 "$bld/bench/bench_sft" $kShape $drop >> "$OUT/e2e.jsonl" 2>> "$OUT/e2e.log" || echo "bench_sft $drop FTUNE_LORA_FUSED=0 failed: $?" >> "$OUT/e2e.log"
  e2e_pair e2e_ab "--lora-r 0 --ckpt 1"
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
  local src
  src=$(cat "$B/SRCDIR"); bld=$(cat "$B/BUILDDIR")
  if [ "$src" != "$ROOT" ] && [ ! -e "$src" ]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
  if [ ! -e "$bld" ]; then mkdir -p "$bld"; fi
  cp -r "$B/bin/." "$bld/"
  # At most 8 files come back from $OUT: test_cuda.log (environment first, each step's seconds
  # last), test_trainer.log, quickstart_gpu.log, bench_gpu.md, bench_gpu.log, torch_ref.log,
  # e2e.jsonl, e2e.log (which also holds bench_sft's op-profile tables).
  {
    echo "commit $(cat $B/COMMIT 2>/dev/null) on $(hostname), $(date -u)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    ldd "$B/bin/tests/test_cuda" "$B/bin/ftune" | grep -E "cublas|cudnn|not found" || true
  } > "$OUT/test_cuda.log"
  head -3 "$OUT/test_cuda.log"

  # A lent machine gives a session 15 minutes of device time, its start included, so the check
  # runs against one deadline (GPU_CHECK_BUDGET seconds, default 540: one call of at most 600 s)
  # and its steps go most important first. Each command's timeout is its own cap or what is
  # left, whichever is less; a step that would get under 20 s is not started, and the report
  # names the steps left over with the call that runs them (GPU_CHECK_STEPS: a comma list).
  local all_steps="test_cuda,trainer,bench_gpu,torch_ref,e2e,multi_rank,e2e_ab"
  local steps="${GPU_CHECK_STEPS:-$all_steps}"
  case "${GPU_CHECK_PART:-}" in  # the older split, kept for the commands in old notes
    core) steps="test_cuda,trainer,bench_gpu,torch_ref,multi_rank" ;;
    e2e) steps="e2e,e2e_ab" ;;
  esac
  [ "${GPU_CHECK_E2E:-1}" = 1 ] || steps=$(echo "$steps" | tr ',' '\n' | grep -v '^e2e' | paste -sd,)
  deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
  left_over=""
  : > "$B/steps"
  local st
  for st in ${steps//,/ }; do
    case ",$all_steps," in *",$st,"*) ;; *) echo "gpu_check: unknown step '$st' (steps: $all_steps)" | tee -a "$B/steps"; continue ;; esac
    if [ $((deadline - SECONDS - kReserve)) -lt 20 ]; then left_over="$left_over,$st"; continue; fi
    local t=$SECONDS
    "step_$st"
    printf "| %s | %s | %s |\n" "$st" "${rc[$st]:-0}" $((SECONDS - t)) >> "$B/steps"
    if [ -n "${cut[$st]:-}" ]; then left_over="$left_over,$st"; fi  # cut short: again, whole
  done
  left_over=${left_over#,}
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
    impl += ' (FTUNE_ATTN_WGMMA=%s)' % j['attn_wgmma'] if j.get('attn_wgmma', 'auto') != 'auto' else ''
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
  echo "test_cuda: $pass passed, $fail failed, $skip skipped"
  echo "trainer tests: $(grep -c '^\[       OK \]' "$OUT/test_trainer.log" 2>/dev/null) ok, $(grep -E "^\[  FAILED  \] [A-Za-z]" "$OUT/test_trainer.log" 2>/dev/null | grep -c " ms)") failed"
  echo "quickstart bf16: $(grep -E '^epoch' "$OUT/quickstart_gpu.log" 2>/dev/null | tail -1 | cut -c1-90)"
  echo "bench_gpu: $(grep -c '^| [a-z]' "$OUT/bench_gpu.md" 2>/dev/null) rows; e2e: $(grep -c ms_per_step "$OUT/e2e.jsonl" 2>/dev/null) rows"
  { echo; echo "== steps (gpu_check.sh, budget ${GPU_CHECK_BUDGET:-540} s) =="; printf "| step | rc | seconds |\n|---|---|---|\n"; cat "$B/steps"; } | tee -a "$OUT/test_cuda.log"
  if [ -n "$left_over" ]; then
    echo "NOT RUN (no time left): $left_over"
    echo "next call: run(command=\"GPU_CHECK_STEPS=$left_over scripts/gpu_check.sh run\", carry=[\"gpu_bundle\"])"
  fi
  [ "${rc[test_cuda]:-0}" = 0 ] && [ "${rc[trainer]:-0}" = 0 ] && [ "${rc[bench_gpu]:-0}" = 0 ] && [ "${rc[multi_rank]:-0}" = 0 ]
}

case "$mode" in
  bundle) bundle ;;
  run) run ;;
  *) echo "usage: scripts/gpu_check.sh bundle|run" >&2; exit 2 ;;
esac
