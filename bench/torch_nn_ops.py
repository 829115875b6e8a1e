#!/usr/bin/env python3
"""PyTorch CPU timings of the nn-op bench cases of tests/ops/table_nn.cpp, measured the way
bench_ops measures them (median of N reps after one warm-up; fwd under no_grad; fwd+bwd is the
forward plus backward(ones) with grads cleared between reps), f32.

  python3 bench/torch_nn_ops.py [--reps N] [--filter SUBSTR]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def rms_norm_hf(x, w, eps=1e-6):
    # transformers LlamaRMSNorm.forward, as composed there.
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_hf(x, positions, theta):
    # transformers LlamaRotaryEmbedding + apply_rotary_pos_emb (unsqueeze_dim=2 for [B, T, H, D]).
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    return x * cos + rotate_half(x) * sin


def cases():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)
    yield ("embedding/bench_V32000_D2048_4096ids", lambda: [r(32000, 2048), torch.randint(0, 32000, (4096,), generator=g)],
           lambda w, ids: F.embedding(ids, w))
    yield ("layer_norm/bench_4096x4096", lambda: [r(4096, 4096), r(4096), r(4096)],
           lambda x, w, b: F.layer_norm(x, (4096,), w, b, 1e-5))
    yield ("rms_norm/bench_4096x4096 (HF composed)", lambda: [r(4096, 4096), r(4096)], rms_norm_hf)
    if hasattr(F, "rms_norm"):
        yield ("rms_norm/bench_4096x4096 (F.rms_norm)", lambda: [r(4096, 4096), r(4096)],
               lambda x, w: F.rms_norm(x, (4096,), w, 1e-6))
    yield ("rope/bench_8x512x32x128 (HF composed)", lambda: [r(8, 512, 32, 128), torch.arange(512)],
           lambda x, p: rope_hf(x, p, 500000.0))
    yield ("gelu/bench_8x512x11008", lambda: [r(8, 512, 11008)], lambda x: F.gelu(x, approximate="tanh"))
    yield ("silu/bench_8x512x11008", lambda: [r(8, 512, 11008)], F.silu)
    yield ("swiglu/bench_8x512x11008 (F.silu(g)*u)", lambda: [r(8, 512, 11008), r(8, 512, 11008)],
           lambda gt, up: F.silu(gt) * up)


def median_ms(reps, f):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':44s} {'fwd ms':>12s} {'fwd+bwd ms':>14s}")
    for name, make, fn in cases():
        if a.filter not in name:
            continue
        xs = make()
        with torch.no_grad():
            fwd = median_ms(a.reps, lambda: fn(*xs))
        xg = [x.clone().requires_grad_(x.is_floating_point()) for x in xs]
        ones = []  # made once, as bench_ops does

        def step():
            out = fn(*xg)
            if not ones:
                ones.append(torch.ones_like(out))
            out.backward(ones[0])
            for x in xg:
                x.grad = None

        both = median_ms(a.reps, step)
        print(f"{name:44s} {fwd:12.3f} {both:14.3f}", flush=True)


if __name__ == "__main__":
    main()
