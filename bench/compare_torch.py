#!/usr/bin/env python3
"""Training-step benchmark: ftune's CPU backend (bench_step) against PyTorch on the CPU.

Both sides train the same Llama-style decoder stack, from bit-identical initial weights and the
same random tokens (the ftune Philox generator is re-implemented here in numpy), for the same
number of steps with the same thread count. One step = forward + backward + AdamW over every
parameter. The table shows ms/step (median after warm-up), model GFLOP/s (one formula, see
step_flops) and ftune/torch (<= 1.0: ftune is faster); the losses of both sides are compared too.

  python3 bench/compare_torch.py [build/bench/bench_step] [--threads N] [--steps 10]
      [--profile 3] [--out bench/results/cpu_step_vs_torch.md]

--profile N adds a per-op breakdown, forward and backward, for both sides (ftune: timers around
each op and backward closure; torch: torch.profiler, backward nodes mapped to the forward op that
made them through their autograd sequence number).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- config and FLOP count


def default_ffn(d):
    """Llama's MLP width: 8/3 d rounded up to a multiple of 16 (d = 256 -> 688), as bench_step."""
    return (8 * d // 3 + 15) // 16 * 16


def matmul_params(c):
    """Every weight that enters a GEMM: q, k, v, o, gate, up, down per layer, and the LM head."""
    kv_dim = c.kv_heads * (c.d // c.heads)
    return c.layers * (2 * c.d * c.d + 2 * c.d * kv_dim + 3 * c.d * c.ffn) + c.vocab * c.d


def step_flops(c):
    """6 * n_matmul * tokens + 12 * L * B * T^2 * d (the full T^2, no credit for causal)."""
    tokens = c.batch * c.seq
    return 6.0 * matmul_params(c) * tokens + 12.0 * c.layers * c.batch * c.seq * c.seq * c.d


# ---------------------------------------------------------------- ftune's RNG (core/rng.cpp)
M32 = np.uint64(0xFFFFFFFF)
STREAM_NORMAL, STREAM_INT = 0x5EED0002, 0x5EED0003


def philox4x32(seed, ctr_lo, ctr_hi):
    """Philox-4x32-10 on a vector of low counters (np.uint64) and a scalar high counter."""
    u = np.uint64
    c0 = ctr_lo & M32
    c1 = ctr_lo >> u(32)
    c2 = np.full_like(ctr_lo, ctr_hi & 0xFFFFFFFF)
    c3 = np.full_like(ctr_lo, ctr_hi >> 32)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0 = u(0xD2511F53) * c0
        p1 = u(0xCD9E8D57) * c2
        n0 = (p1 >> u(32)) ^ c1 ^ u(k0)
        n2 = (p0 >> u(32)) ^ c3 ^ u(k1)
        c1, c3, c0, c2 = p1 & M32, p0 & M32, n0, n2
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3])  # [4, n]


def u01_53(a, b):
    x = (a << np.uint64(21)) ^ (b >> np.uint64(11))
    return ((x & np.uint64((1 << 53) - 1)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)


class Generator:
    """ftune::Generator: each draw reserves a fresh, 4-aligned range of counters."""

    def __init__(self, seed):
        self.seed, self.offset = seed, 0

    def take(self, n):
        o = self.offset
        self.offset += (n + 3) & ~3
        return o

    def randn(self, shape, std):
        n = math.prod(shape)
        base = self.take(n * 4)
        r = philox4x32(self.seed, np.uint64(base // 4) + np.arange(n, dtype=np.uint64), STREAM_NORMAL)
        u1, u2 = u01_53(r[0], r[1]), u01_53(r[2], r[3])
        x = std * np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2)
        return x.astype(np.float32).reshape(shape)

    def randint(self, shape, lo, hi):
        n = math.prod(shape)
        base = self.take(n * 2)
        c = np.uint64(base) + np.uint64(2) * np.arange(n, dtype=np.uint64)
        r = philox4x32(self.seed, c >> np.uint64(2), STREAM_INT)
        j = (c & np.uint64(3)).astype(np.int64)
        idx = np.arange(n)
        x = (r[j, idx] << np.uint64(32)) | r[j + 1, idx]
        return (lo + (x % np.uint64(hi - lo)).astype(np.int64)).reshape(shape)


# ---------------------------------------------------------------- the torch model


class Region:
    """record_function labels for the profiled steps, nothing otherwise."""

    on = False

    def __call__(self, label):
        return torch.profiler.record_function("ftune::" + label) if self.on else nullcontext()


region = Region()


def rms_norm(x, w, eps, builtin):
    if builtin:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # HF LlamaRMSNorm in f32


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Llama(torch.nn.Module):
    """The bench_step model: weights drawn in bench_step's order from ftune's generator."""

    def __init__(self, c, gen):
        super().__init__()
        self.c = c
        kv_dim = c.kv_heads * (c.d // c.heads)

        def normal(*shape):
            return torch.nn.Parameter(torch.from_numpy(gen.randn(shape, 0.02)))

        def ones(n):
            return torch.nn.Parameter(torch.ones(n))

        self.embed = normal(c.vocab, c.d)
        self.layers = torch.nn.ModuleList()
        for _ in range(c.layers):
            L = torch.nn.Module()
            L.attn_norm = ones(c.d)
            L.wq, L.wk, L.wv, L.wo = normal(c.d, c.d), normal(kv_dim, c.d), normal(kv_dim, c.d), normal(c.d, c.d)
            L.mlp_norm = ones(c.d)
            L.w_gate, L.w_up, L.w_down = normal(c.ffn, c.d), normal(c.ffn, c.d), normal(c.d, c.ffn)
            self.layers.append(L)
        self.final_norm = ones(c.d)
        self.lm_head = normal(c.vocab, c.d)
        hd = c.d // c.heads
        self.inv_freq = 1.0 / (c.theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def forward(self, ids, targets):
        c = self.c
        B, T, H, Hkv, hd = c.batch, c.seq, c.heads, c.kv_heads, c.d // c.heads
        builtin = c.rmsnorm == "builtin"
        with region("embedding"):
            x = F.embedding(ids, self.embed)
        with region("rope"):  # cos/sin once per forward, as HF's LlamaRotaryEmbedding
            freqs = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()  # [T, hd]
        for L in self.layers:
            with region("rms_norm"):
                h = rms_norm(x, L.attn_norm, c.eps, builtin)
            with region("linear q/k/v"):
                q = F.linear(h, L.wq).view(B, T, H, hd).transpose(1, 2)
                k = F.linear(h, L.wk).view(B, T, Hkv, hd).transpose(1, 2)
                v = F.linear(h, L.wv).view(B, T, Hkv, hd).transpose(1, 2)
            with region("rope"):
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            with region("attention"):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
                a = a.transpose(1, 2).reshape(B, T, c.d)
            with region("linear o"):
                o = F.linear(a, L.wo)
            with region("residual add"):
                x = x + o
            with region("rms_norm"):
                h = rms_norm(x, L.mlp_norm, c.eps, builtin)
            with region("linear gate/up"):
                g = F.linear(h, L.w_gate)
                u = F.linear(h, L.w_up)
            with region("swiglu"):
                s = F.silu(g) * u
            with region("linear down"):
                dn = F.linear(s, L.w_down)
            with region("residual add"):
                x = x + dn
        with region("rms_norm"):
            x = rms_norm(x, self.final_norm, c.eps, builtin)
        with region("linear lm_head"):
            logits = F.linear(x, self.lm_head)
        with region("cross_entropy"):
            return F.cross_entropy(logits.view(B * T, c.vocab), targets.view(B * T))


def torch_step(model, opt, ids, targets):
    opt.zero_grad(set_to_none=True)
    with region("forward"):
        loss = model(ids, targets)
    with region("backward"):
        loss.backward()
    with region("optimizer"):
        opt.step()
    return loss.item()


def run_torch(c):
    gen = Generator(c.seed)
    model = Llama(c, gen)
    ids = torch.from_numpy(gen.randint((c.batch, c.seq), 0, c.vocab))
    targets = torch.from_numpy(gen.randint((c.batch, c.seq), 0, c.vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=c.wd)
    losses, times, cpu_times = [], [], []
    for s in range(c.warmup + c.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(torch_step(model, opt, ids, targets))
        dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        if s >= c.warmup:
            times.append(dt)
            cpu_times.append(dc)
    res = {"impl": "torch", "ms_per_step": statistics.median(times), "ms_all": times,
           "cpu_ms_per_step": statistics.median(cpu_times), "cpu_ms_all": cpu_times, "losses": losses,
           "n_params": sum(p.numel() for p in model.parameters())}
    if c.profile > 0:
        res["profile"] = profile_torch(c, model, opt, ids, targets)
    return res


# ---------------------------------------------------------------- torch per-op breakdown


def profile_torch(c, model, opt, ids, targets):
    """ms/step per label, forward and backward.

    Forward: the wall time of each record_function region. Backward: each autograd node
    ("autograd::engine::evaluate_function: XBackward0") carries the sequence number of the forward
    op that created it; that op sits inside one region, which names the backward node.
    """
    region.on = True
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(c.profile):
            torch_step(model, opt, ids, targets)
    region.on = False
    evs = list(prof.events())
    # Innermost ftune:: region of each forward op -> label, keyed by (thread, sequence_nr).
    seq_label = {}
    fwd, bwd, totals = {}, {}, {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    order = []
    for e in evs:
        if e.name.startswith("ftune::"):
            label = e.name[len("ftune::"):]
            t = e.cpu_time_total / 1e3
            if label in totals:
                totals[label] += t
            else:
                if label not in order:
                    order.append(label)
                fwd[label] = fwd.get(label, 0.0) + t
            continue
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith("autograd::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("ftune::"):
            p = p.cpu_parent
        if p is not None and p.name[len("ftune::"):] not in totals:
            seq_label.setdefault((e.fwd_thread if e.fwd_thread else e.thread, e.sequence_nr), p.name[7:])
    other_bwd = {}
    for e in evs:
        if not e.name.startswith("autograd::engine::evaluate_function:"):
            continue
        key = (e.fwd_thread if e.fwd_thread else e.thread, e.sequence_nr)
        label = seq_label.get(key)
        if label is None:  # try any thread: the backward thread differs from the forward thread
            label = next((v for (th, sq), v in seq_label.items() if sq == e.sequence_nr), None)
        t = e.cpu_time_total / 1e3
        if label is None:
            name = "(" + e.name.split(":")[-1].strip() + ")"
            other_bwd[name] = other_bwd.get(name, 0.0) + t
        else:
            bwd[label] = bwd.get(label, 0.0) + t
    k = 1.0 / c.profile
    ops = [{"op": l, "fwd_ms": fwd.get(l, 0.0) * k, "bwd_ms": bwd.get(l, 0.0) * k} for l in order]
    ops += [{"op": n, "fwd_ms": 0.0, "bwd_ms": t * k} for n, t in sorted(other_bwd.items(), key=lambda x: -x[1])]
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"steps": c.profile, "forward_ms": totals["forward"] * k, "backward_ms": totals["backward"] * k,
            "optimizer_ms": totals["optimizer"] * k, "ops": ops, "top_self": top}


# ---------------------------------------------------------------- ftune side


def run_ftune(c, binary):
    with tempfile.TemporaryDirectory() as tmp:
        js = os.path.join(tmp, "ftune.json")
        cmd = [binary, "--layers", c.layers, "--d", c.d, "--heads", c.heads, "--kv-heads", c.kv_heads,
               "--ffn", c.ffn, "--seq", c.seq, "--batch", c.batch, "--vocab", c.vocab, "--steps", c.steps,
               "--warmup", c.warmup, "--threads", c.threads, "--seed", c.seed, "--json", js]
        if c.profile > 0:
            cmd += ["--profile", c.profile]
        cmd = [str(x) for x in cmd]
        env = dict(os.environ, OMP_NUM_THREADS=str(c.threads), OPENBLAS_NUM_THREADS=str(c.threads))
        env.update(kv.split("=", 1) for kv in c.ftune_env)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"compare_torch: {shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
        with open(js) as f:
            res = json.load(f)
    res["cmd"] = shlex.join([f"{kv}" for kv in c.ftune_env] + cmd)
    res["stdout"] = p.stdout
    return res


# ---------------------------------------------------------------- report


def machine():
    model, cores = platform.processor() or "?", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                model = v.strip()
    except OSError:
        pass
    return model, cores, len(os.sched_getaffinity(0))


def breakdown_table(ft, to):
    """Markdown rows: label, ftune fwd/bwd, torch fwd/bwd (ms/step)."""
    fo = {o["op"]: o for o in ft["ops"]} if ft else {}
    tor = {o["op"]: o for o in to["ops"]} if to else {}
    labels = [o["op"] for o in (ft["ops"] if ft else [])]
    labels += [l for l in tor if l not in fo]
    rows = ["| op | ftune fwd | ftune bwd | torch fwd | torch bwd | ftune/torch (fwd+bwd) |",
            "|---|---:|---:|---:|---:|---:|"]

    def cell(d, l, k):
        return f"{d[l][k]:.2f}" if l in d else "-"

    for l in labels:
        ratio = "-"
        if l in fo and l in tor:
            a, b = fo[l]["fwd_ms"] + fo[l]["bwd_ms"], tor[l]["fwd_ms"] + tor[l]["bwd_ms"]
            ratio = f"{a / b:.2f}" if b > 0 else "-"
        rows.append(f"| {l} | {cell(fo, l, 'fwd_ms')} | {cell(fo, l, 'bwd_ms')} | {cell(tor, l, 'fwd_ms')} "
                    f"| {cell(tor, l, 'bwd_ms')} | {ratio} |")
    for k, name in (("forward_ms", "forward total"), ("backward_ms", "backward total"),
                    ("optimizer_ms", "optimizer (AdamW)")):
        a = ft[k] if ft else float("nan")
        b = to[k] if to else float("nan")
        rows.append(f"| **{name}** | {a:.2f} | | {b:.2f} | | {a / b:.2f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", nargs="?", default="build/bench/bench_step", help="ftune's bench_step")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    ap.add_argument("--ffn", type=int, default=0, help="default: 8/3 d rounded up to a multiple of 16")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--profile", type=int, default=0, help="N instrumented steps for a per-op breakdown")
    ap.add_argument("--rmsnorm", choices=["builtin", "hf"], default="builtin",
                    help="torch RMSNorm: F.rms_norm, or HF LlamaRMSNorm's composite")
    ap.add_argument("--ftune-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the ftune binary only (e.g. OMP_WAIT_POLICY=passive)")
    ap.add_argument("--skip-ftune", action="store_true", help="torch side only")
    ap.add_argument("--out", help="write a markdown report here")
    ap.add_argument("--json", help="write both raw results here")
    c = ap.parse_args()
    c.kv_heads = c.kv_heads or c.heads
    c.ffn = c.ffn or default_ffn(c.d)
    c.eps, c.theta, c.lr, c.wd = 1e-5, 10000.0, 1e-4, 0.01
    if c.d % c.heads or (c.d // c.heads) % 2 or c.heads % c.kv_heads:
        sys.exit("compare_torch: --d must be heads * an even head_dim, --heads a multiple of --kv-heads")
    torch.set_num_threads(c.threads)
    torch.manual_seed(0)

    flops = step_flops(c)
    ft = None if c.skip_ftune else run_ftune(c, c.binary)
    to = run_torch(c)
    res = [r for r in (ft, to) if r]

    cfg = (f"L={c.layers} d={c.d} heads={c.heads} kv_heads={c.kv_heads} ffn={c.ffn} T={c.seq} B={c.batch} "
           f"V={c.vocab} f32, AdamW(lr={c.lr}, wd={c.wd}), threads={c.threads}")
    print(cfg)
    print(f"model FLOP/step: {flops / 1e9:.2f} G (6 * {matmul_params(c)} matmul params * {c.batch * c.seq} "
          f"tokens + 12 * L * B * T^2 * d)")
    print(f"{'impl':<8} {'ms/step':>10} {'min ms':>10} {'cpu ms':>10} {'GFLOP/s':>10} {'loss[0]':>10} "
          f"{'loss[-1]':>10}")
    for r in res:
        print(f"{r['impl']:<8} {r['ms_per_step']:>10.2f} {min(r['ms_all']):>10.2f} {r['cpu_ms_per_step']:>10.2f} "
              f"{flops / (r['ms_per_step'] * 1e6):>10.2f} {r['losses'][0]:>10.5f} {r['losses'][-1]:>10.5f}")
    ratio = None
    if ft:
        ratio = ft["ms_per_step"] / to["ms_per_step"]
        dl = max(abs(a - b) for a, b in zip(ft["losses"], to["losses"]))
        print(f"ftune/torch time ratio: {ratio:.3f} ({'ftune faster' if ratio <= 1 else 'torch faster'}); "
              f"process CPU time ratio: {ft['cpu_ms_per_step'] / to['cpu_ms_per_step']:.3f}")
        print(f"max |loss_ftune - loss_torch| over {len(ft['losses'])} steps: {dl:.2e}")
    if c.profile:
        print("\nper-op breakdown, ms/step (torch: profiler, which adds its own overhead)")
        print(breakdown_table(ft and ft.get("profile"), to["profile"]))

    if c.json:
        with open(c.json, "w") as f:
            json.dump({"config": vars(c), "flop_per_step": flops, "results": res}, f, indent=1, default=str)
    if c.out:
        write_report(c, flops, ft, to, ratio)


def write_report(c, flops, ft, to, ratio):
    cpu, cores, avail = machine()
    lines = [
        "# CPU training step: ftune vs PyTorch",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu}, {cores} logical CPUs ({avail} usable), {platform.platform()}",
        f"- torch {torch.__version__} (CPU; BLAS: MKL, oneDNN), numpy {np.__version__}, python "
        f"{platform.python_version()}",
        f"- command: `python3 {shlex.join(sys.argv)}`",
    ]
    if ft:
        lines.append(f"- ftune command (run by the script): `{ft['cmd']}`")
    lines += [
        f"- config: {c.layers} layers, d_model={c.d}, {c.heads} heads (head_dim {c.d // c.heads}, "
        f"{c.kv_heads} kv heads), SwiGLU ffn={c.ffn} (8/3 d rounded up to a multiple of 16), RMSNorm eps "
        f"1e-5, RoPE theta 1e4, vocab {c.vocab} (embedding + untied LM head), seq {c.seq}, batch {c.batch}, "
        f"f32; step = forward + backward + AdamW(lr 1e-4, wd 0.01, all params); {c.threads} threads "
        f"(torch.set_num_threads / OpenMP + OpenBLAS); median of {c.steps} steps after {c.warmup} warm-up",
        f"- model FLOP/step = 6 * n_matmul * B*T + 12 * L * B * T^2 * d = 6 * {matmul_params(c)} * "
        f"{c.batch * c.seq} + 12 * {c.layers} * {c.batch} * {c.seq}^2 * {c.d} = {flops / 1e9:.3f} GFLOP "
        "(n_matmul counts q,k,v,o,gate,up,down and the LM head; the embedding, norms, RoPE, softmax, loss and "
        "AdamW are not counted; attention counts the full T^2 for both sides)",
        "",
        "| impl | ms/step (median) | min ms | process CPU ms/step | GFLOP/s | loss step 0 | loss last |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (x for x in (ft, to) if x):
        lines.append(f"| {r['impl']} | {r['ms_per_step']:.2f} | {min(r['ms_all']):.2f} | "
                     f"{r['cpu_ms_per_step']:.2f} | {flops / (r['ms_per_step'] * 1e6):.2f} | "
                     f"{r['losses'][0]:.5f} | {r['losses'][-1]:.5f} |")
    if ratio is not None:
        lines += ["", f"**ftune/torch = {ratio:.3f}** (<= 1.0 means ftune is faster); process CPU time "
                  f"ftune/torch = {ft['cpu_ms_per_step'] / to['cpu_ms_per_step']:.3f}."]
    if c.profile:
        lines += ["", f"## Per-op breakdown (ms/step, mean of {c.profile} instrumented steps)", "",
                  "ftune: a timer around every op call (forward) and every backward closure, labelled by "
                  "the forward call that recorded it; labels in parentheses are nodes without a label "
                  "(views). torch: torch.profiler record_function regions for the forward; each "
                  "backward node is attributed to the region of the forward op with the same sequence "
                  "number. Profiled steps are separate from the timed ones.", "",
                  breakdown_table(ft and ft.get("profile"), to["profile"]), "",
                  "<details><summary>torch.profiler, top ops by self CPU time</summary>", "", "```",
                  to["profile"]["top_self"], "```", "</details>"]
        if ft:
            lines += ["", "<details><summary>bench_step output</summary>", "", "```", ft["stdout"].rstrip(),
                      "```", "</details>"]
    os.makedirs(os.path.dirname(os.path.abspath(c.out)), exist_ok=True)
    with open(c.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {c.out}")


if __name__ == "__main__":
    main()
