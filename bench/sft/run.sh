#!/usr/bin/env bash
# The SFT step, ftune (build/bench/bench_sft) against PyTorch + PEFT (bench/sft/peft_step.py), side
# by side: the quickstart model (assets/tiny-llama) and a 4-layer d=512 Llama, full fine-tuning
# against LoRA (r=8, and r=64 on d=512 to show the optimizer state growing with r). Every
# measurement is its own process (peak RSS is a process's high-water mark); for each config the
# two implementations alternate, ftune, peft, ftune, peft, and the table takes the better of the
# two medians for time and the larger of the two peaks for RSS. Prints markdown.
#   BUILD_DIR=build bench/sft/run.sh [steps] [warmup]
# Threads: OMP_NUM_THREADS (default 2) for both; OMP_WAIT_POLICY defaults to passive.
set -euo pipefail
cd "$(dirname "$0")/../.."
B="${BUILD_DIR:-build}/bench/bench_sft"
STEPS="${1:-8}"
WARMUP="${2:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
export TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
[ -x "$B" ] || { echo "run.sh: $B not found (cmake -DFTUNE_BUILD_BENCH=ON; ninja bench_sft)" >&2; exit 2; }
OUT="$(mktemp -d)"
if [ -z "${KEEP_RUNS:-}" ]; then trap 'rm -rf "$OUT"' EXIT; else echo "- raw JSON in $OUT"; fi

TINY="--model assets/tiny-llama --seq 256 --batch 8"
D512="--layers 4 --d 512 --heads 8 --kv-heads 8 --ffn 1376 --vocab 2048 --seq 256 --batch 8"
CONFIGS=(
  "tiny-llama full|$TINY --lora-r 0"
  "tiny-llama LoRA r=8|$TINY --lora-r 8"
  "4L d512 full|$D512 --lora-r 0"
  "4L d512 LoRA r=8|$D512 --lora-r 8"
  "4L d512 LoRA r=64|$D512 --lora-r 64"
)

echo "- OMP_NUM_THREADS=$OMP_NUM_THREADS OMP_WAIT_POLICY=$OMP_WAIT_POLICY, --steps $STEPS --warmup $WARMUP"
echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
i=0
for c in "${CONFIGS[@]}"; do
  args="${c#*|}"
  for rep in 1 2; do
    # shellcheck disable=SC2086
    "$B" $args --steps "$STEPS" --warmup "$WARMUP" > "$OUT/$i.ftune.$rep.json"
    # shellcheck disable=SC2086
    python3 bench/sft/peft_step.py $args --steps "$STEPS" --warmup "$WARMUP" \
      > "$OUT/$i.peft.$rep.json" 2> "$OUT/$i.peft.$rep.err" \
      || { cat "$OUT/$i.peft.$rep.err" >&2; exit 1; }
  done
  i=$((i + 1))
done
echo "- load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

printf '%s\n' "${CONFIGS[@]}" > "$OUT/configs.txt"
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
configs = [l.split("|", 1) for l in open(f"{out}/configs.txt").read().splitlines()]
def load(i, impl):
    return [json.loads(open(f"{out}/{i}.{impl}.{r}.json").read().strip().splitlines()[-1])
            for r in (1, 2)]
print("| config | trainable params | ftune ms/step | peft ms/step | ratio ftune/peft "
      "| ftune peak RSS MiB | peft peak RSS MiB | ftune AdamW state MiB | peft AdamW state MiB |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
warnings, raw, state_ok = [], [], True
for i, (name, _) in enumerate(configs):
    f, p = load(i, "ftune"), load(i, "peft")
    fm, pm = min(j["ms_per_step"] for j in f), min(j["ms_per_step"] for j in p)
    fr, pr = max(j["peak_rss_mib"] for j in f), max(j["peak_rss_mib"] for j in p)
    fs, ps = f[0]["adamw_state_mib"], p[0]["adamw_state_mib"]
    ft, pt = f[0]["trainable"], p[0]["trainable"]
    if ft != pt:
        warnings.append(f"WARNING: {name}: trainable params differ: ftune {ft:,}, peft {pt:,}")
    for impl, js in (("ftune", f), ("peft", p)):
        for j in js:  # AdamW keeps exp_avg and exp_avg_sq in f32: 8 bytes per trainable param
            extra = j["adamw_state_mib"] * 2**20 - 8 * j["trainable"]
            if not 0 <= extra <= 64 * 1024:
                state_ok = False
                warnings.append(f"WARNING: {name} {impl}: AdamW state {j['adamw_state_mib']:.3f} "
                                f"MiB is not 8 B x {j['trainable']:,} trainable")
    trainable = f"{ft:,}" if ft == pt else f"{ft:,} / {pt:,}"
    print(f"| {name} | {trainable} | {fm:.1f} | {pm:.1f} | {fm / pm:.2f} | {fr:.0f} | {pr:.0f} "
          f"| {fs:.2f} | {ps:.2f} |")
    raw.append(f"{name}: ftune " + ", ".join(f"{j['ms_per_step']:.1f}" for j in f)
               + "; peft " + ", ".join(f"{j['ms_per_step']:.1f}" for j in p)
               + f"; peft RSS after imports {p[0]['rss_base_mib']:.0f} MiB")
print()
print("Ratio < 1: ftune is faster. ms/step: the better of two per-process medians. Peak RSS: the "
      "larger of two (VmHWM for ftune, ru_maxrss for python; both the whole process).")
if state_ok:
    print("AdamW state = 8 bytes x trainable params (exp_avg + exp_avg_sq, f32; plus step "
          "counters) in every run.")
print()
print("Medians of each run (ms/step, in run order):")
print()
for r in raw:
    print(f"- {r}")
for w in warnings:
    print(w)
    print(w, file=sys.stderr)
EOF
