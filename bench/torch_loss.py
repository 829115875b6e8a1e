#!/usr/bin/env python3
"""PyTorch CPU twin of the loss bench cases of bench_ops (tests/ops/table_loss.cpp).

Times forward and forward+backward the way bench_ops does: one warm-up, then the median of
--reps runs; the backward starts from ones like the output and the gradients are dropped after
each run (so each run allocates them afresh, as ftune's does).

  python3 bench/torch_loss.py [--reps N] [--threads T]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def kl_rows(s, t, kind, beta=0.5, temperature=1.0):
    """Per-row divergences with ftune's conventions (TRL generalized_jsd_loss for jsd)."""
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)
    if kind == "forward":  # KL(teacher || student)
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=s.dtype)
    lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
    kt = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    ks = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return beta * kt + (1 - beta) * ks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':44s} {'fwd ms':>12s} {'fwd+bwd ms':>14s}")
    cases = []
    for n, v in [(2048, 32000), (512, 128256)]:
        x = torch.randn(n, v)
        tg = torch.randint(0, v, (n,))
        cases.append((f"cross_entropy/bench_{n}x{v}", [x],
                      lambda xs, tg=tg: F.cross_entropy(xs[0], tg)))
    for kind in ["forward", "jsd"]:
        s, t = torch.randn(512, 32000), torch.randn(512, 32000)
        cases.append((f"kl_div/bench_{kind}_512x32000", [s, t],
                      lambda xs, kind=kind: kl_rows(xs[0], xs[1], kind)))
    for name, xs, fn in cases:
        with torch.no_grad():
            fwd = median_ms(lambda: fn(xs), args.reps)
        xg = [x.clone().requires_grad_(True) for x in xs]

        def step():
            out = fn(xg)
            out.backward(torch.ones_like(out))
            for x in xg:
                x.grad = None

        both = median_ms(step, args.reps)
        print(f"{name:44s} {fwd:12.3f} {both:14.3f}")


if __name__ == "__main__":
    main()
