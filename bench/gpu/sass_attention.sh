#!/usr/bin/env bash
# Static SASS comparison of the tensor-core attention kernels between a git revision and the
# working tree, no GPU needed: instructions per key tile (per warp) of each default kernel's
# main loop, on its unmasked path. The backward kernels branch on a uniform need_mask inside the
# loop, so their unmasked path is measured on a copy with that branch removed (if (false)).
#
#   bench/gpu/sass_attention.sh [BASE_REV] [BUILD_DIR]    (defaults: HEAD~1, build)
#
# Needs a configured CUDA build (for the nvcc command line) and bench/gpu/sass_loops.py's tools.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:-HEAD~1}
build=${2:-build}
obj=CMakeFiles/ftune_core.dir/kernels/cuda/attention.cu.o
cmd=$(cd "$build" && ninja -t commands "$obj" | tail -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
compile() {  # source -> object, with the build's nvcc line (ccache and dependency files dropped)
  local c=${cmd#/usr/bin/ccache }
  c=$(sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -x cu -c [^ ]+ -o [^ ]+$//; s/ -c [^ ]+ -o [^ ]+$//' <<<"$c")
  (cd "$build" && eval "$c -diag-suppress 177 -x cu -c $1 -o $2")
}
git show "$base:kernels/cuda/attention.cu" >"$tmp/base.cu"
cp kernels/cuda/attention.cu "$tmp/new.cu"
sed 's/if (need_mask)/if (false)/' kernels/cuda/attention.cu >"$tmp/nomask.cu"
for v in base new nomask; do
  # The copies include their headers from the source tree.
  sed -i "s|#include \"kernels/|#include \"$PWD/kernels/|" "$tmp/$v.cu"
  compile "$tmp/$v.cu" "$tmp/$v.o" &
done
wait
# The default kernels (a name missing at one revision leaves its cells empty): the d64 dQ kernel
# became fa_bwd_dq_kernel_occ4, and under grouped-query attention with few kv heads the dK/dV
# kernels run split over the query heads (the <..., 3> and <..., 64, 3> instances).
kernels=("fa_fwd_kernel<__nv_bfloat16, 64, 2>" "fa_fwd_kernel<__nv_bfloat16, 128, 2>"
         "fa_bwd_dkdv_kernel_occ3<__nv_bfloat16, 64>" "fa_bwd_dkdv_kernel_occ3<__nv_bfloat16, 64, 0>"
         "fa_bwd_dkdv_kernel_occ3<__nv_bfloat16, 64, 3>"
         "fa_bwd_dq_kernel<__nv_bfloat16, 64>" "fa_bwd_dq_kernel_occ4<__nv_bfloat16, 64>"
         "fa_bwd_dkdv_kernel<__nv_bfloat16, 128, 0>" "fa_bwd_dkdv_kernel<__nv_bfloat16, 128, 3>"
         "fa_bwd_dq_ma2_kernel<__nv_bfloat16, 128>")
# First loop with MMAs = the main loop (the forward's unmasked loop comes first).
loop() { python3 bench/gpu/sass_loops.py "$1" "$2" | grep -m1 'HMMA' | sed -E 's/^ *loop [^:]+: //'; }
regs() { python3 bench/gpu/sass_loops.py "$1" "$2" | head -1 | sed -E 's/^[^:]+: [0-9]+ instructions, //'; }
printf '| kernel | %s: loop | %s: regs | working tree (unmasked path): loop | regs |\n' "$base" "$base"
echo '|---|---|---|---|---|'
for k in "${kernels[@]}"; do
  [ -z "$(loop "$tmp/base.o" "$k")$(loop "$tmp/nomask.o" "$k")" ] && continue
  new=$tmp/nomask.o
  printf '| %s | %s | %s | %s | %s |\n' "$k" "$(loop "$tmp/base.o" "$k")" "$(regs "$tmp/base.o" "$k")" \
    "$(loop "$new" "$k")" "$(regs "$tmp/new.o" "$k")"
done
