#!/usr/bin/env python3
"""PyTorch CPU peer of bench_ops' attention cases (bench/results/cpu_attention.md).

Times F.scaled_dot_product_attention on the same shapes as tests/ops/table_attention.cpp's bench
cases, the way bench_ops does: f32, median of --reps after one warm-up, forward under no_grad and
forward+backward with a ones gradient.

    python3 bench/attention_torch.py [--threads N] [--reps 10] [--cpu-time]

--cpu-time (with --threads 1) reads the calling thread's CPU clock and keeps the minimum, like
build/bench/attention_cpu_time: on a shared machine that does not count time lost to others.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

# (name, B, T, H, Hkv, D, causal): keep in step with table_attention.cpp.
CASES = [
    ("bench_b8_t256_h8_d64_causal", 8, 256, 8, 8, 64, True),
    ("bench_b4_t1024_h8_d64_causal", 4, 1024, 8, 8, 64, True),
    ("bench_b1_t4096_h8_d64_causal", 1, 4096, 8, 8, 64, True),
    ("bench_b2_t1024_h8_kv2_d64_causal", 2, 1024, 8, 2, 64, True),
    ("bench_b1_t1024_h4_d64_noncausal", 1, 1024, 4, 4, 64, False),
    ("bench_b1_t4096_h4_kv1_d128_causal", 1, 4096, 4, 1, 128, True),
]


def time_ms(fn, reps, cpu_time):
    fn()
    clock = time.thread_time if cpu_time else time.perf_counter
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    ts.sort()
    return (ts[0] if cpu_time else ts[len(ts) // 2]) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cpu-time", action="store_true")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures one thread: use --threads 1")
    torch.set_num_threads(args.threads)
    what = "min CPU time of the thread" if args.cpu_time else "median wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {what}")
    print(f"{'case':<44} {'fwd ms':>12} {'fwd+bwd ms':>14} {'GFLOP/s':>10}")
    for name, B, T, H, Hkv, D, causal in CASES:
        g = torch.Generator().manual_seed(1)
        # SDPA's layout is [B, H, T, D]; ours is [B, T, H, D]. Same work either way.
        q = torch.randn(B, H, T, D, generator=g)
        k = torch.randn(B, Hkv, T, D, generator=g)
        v = torch.randn(B, Hkv, T, D, generator=g)
        gqa = H != Hkv

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def both():
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, enable_gqa=gqa)
            out.backward(torch.ones_like(out))
            qg.grad = kg.grad = vg.grad = None

        f = time_ms(fwd, args.reps, args.cpu_time)
        b = time_ms(both, args.reps, args.cpu_time)
        flops = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
        print(f"attention/{name:<34} {f:12.3f} {b:14.3f} {flops / (f * 1e6):10.1f}")


if __name__ == "__main__":
    main()
