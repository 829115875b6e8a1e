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


def wall_ms():
    return time.perf_counter() * 1e3


def cpu_ms():
    return time.process_time() * 1e3


class Profiler:
    """The per-op profiler of bench_step, mirrored: a timer around each op call (forward), and a
    pre-hook/hook pair on every autograd node (backward), labelled by the forward call that made
    it. Wall and process CPU time. AccumulateGrad nodes are left to the engine, as in ftune."""

    def __init__(self):
        self.on = False
        self.order, self.stats, self.labels = [], {}, {}
        self.totals = {k: 0.0 for k in ("forward_ms", "backward_ms", "optimizer_ms", "forward_cpu_ms",
                                        "backward_cpu_ms", "optimizer_cpu_ms")}
        self.steps = 0

    def stat(self, label):
        if label not in self.stats:
            self.order.append(label)
            self.stats[label] = {"fwd_ms": 0.0, "bwd_ms": 0.0, "fwd_cpu_ms": 0.0, "bwd_cpu_ms": 0.0, "calls": 0}
        return self.stats[label]

    def op(self, label, fn):
        if not self.on:
            return fn()
        t0, c0 = wall_ms(), cpu_ms()
        out = fn()
        s = self.stat(label)
        s["fwd_ms"] += wall_ms() - t0
        s["fwd_cpu_ms"] += cpu_ms() - c0
        s["calls"] += 1
        stack = [out.grad_fn] if out.grad_fn is not None else []
        while stack:  # the nodes this call made: reachable from out, not labelled before
            n = stack.pop()
            if n in self.labels or type(n).__name__ == "AccumulateGrad":
                continue
            self.labels[n] = label
            stack += [m for m, _ in n.next_functions if m is not None]
        return out

    def instrument(self):
        """Hooks every labelled node of this step's graph (call after the forward)."""
        start = {}
        for n, label in self.labels.items():
            s = self.stat(label)

            def pre(grad_outputs, n=n):
                start[n] = (wall_ms(), cpu_ms())

            def post(grad_inputs, grad_outputs, n=n, s=s):
                t0, c0 = start.pop(n)
                s["bwd_ms"] += wall_ms() - t0
                s["bwd_cpu_ms"] += cpu_ms() - c0

            n.register_prehook(pre)
            n.register_hook(post)
        self.labels = {}


prof = Profiler()


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
        c, P = self.c, prof
        B, T, H, Hkv, hd = c.batch, c.seq, c.heads, c.kv_heads, c.d // c.heads
        builtin = c.rmsnorm == "builtin"

        def rope(x):  # x [B, h, T, hd]; cos/sin [T, hd], once per call as in bench_step's op
            freqs = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return x * emb.cos() + rotate_half(x) * emb.sin()

        x = P.op("embedding", lambda: F.embedding(ids, self.embed))
        for L in self.layers:
            h = P.op("rms_norm", lambda: rms_norm(x, L.attn_norm, c.eps, builtin))
            q = P.op("linear q/k/v", lambda: F.linear(h, L.wq).view(B, T, H, hd).transpose(1, 2))
            k = P.op("linear q/k/v", lambda: F.linear(h, L.wk).view(B, T, Hkv, hd).transpose(1, 2))
            v = P.op("linear q/k/v", lambda: F.linear(h, L.wv).view(B, T, Hkv, hd).transpose(1, 2))
            q = P.op("rope", lambda: rope(q))
            k = P.op("rope", lambda: rope(k))
            a = P.op("attention", lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=Hkv != H).transpose(1, 2).reshape(B, T, c.d))
            o = P.op("linear o", lambda: F.linear(a, L.wo))
            x = P.op("residual add", lambda: x + o)
            h = P.op("rms_norm", lambda: rms_norm(x, L.mlp_norm, c.eps, builtin))
            g = P.op("linear gate/up", lambda: F.linear(h, L.w_gate))
            u = P.op("linear gate/up", lambda: F.linear(h, L.w_up))
            s = P.op("swiglu", lambda: F.silu(g) * u)
            dn = P.op("linear down", lambda: F.linear(s, L.w_down))
            x = P.op("residual add", lambda: x + dn)
        x = P.op("rms_norm", lambda: rms_norm(x, self.final_norm, c.eps, builtin))
        logits = P.op("linear lm_head", lambda: F.linear(x, self.lm_head))
        return P.op("cross_entropy", lambda: F.cross_entropy(logits.view(B * T, c.vocab), targets.view(B * T)))


def torch_step(model, opt, ids, targets):
    P = prof
    opt.zero_grad(set_to_none=True)
    t1, c1 = wall_ms(), cpu_ms()
    loss = model(ids, targets)
    t2, c2 = wall_ms(), cpu_ms()
    if P.on:
        P.instrument()
    t3, c3 = wall_ms(), cpu_ms()
    loss.backward()
    t4, c4 = wall_ms(), cpu_ms()
    opt.step()
    t5, c5 = wall_ms(), cpu_ms()
    if P.on:
        tot = P.totals
        tot["forward_ms"] += t2 - t1
        tot["backward_ms"] += t4 - t3
        tot["optimizer_ms"] += t5 - t4
        tot["forward_cpu_ms"] += c2 - c1
        tot["backward_cpu_ms"] += c4 - c3
        tot["optimizer_cpu_ms"] += c5 - c4
        P.steps += 1
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
    """Per-op breakdown with the hook profiler (ms/step), plus one step under torch.profiler for
    its table of the heaviest kernels."""
    prof.on = True
    for _ in range(c.profile):
        torch_step(model, opt, ids, targets)
    prof.on = False
    k = 1.0 / prof.steps
    ops = [dict(op=l, **{key: v * k for key, v in prof.stats[l].items() if key != "calls"},
                calls=prof.stats[l]["calls"] // prof.steps) for l in prof.order]
    res = {"steps": prof.steps, "ops": ops, **{key: v * k for key, v in prof.totals.items()}}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        torch_step(model, opt, ids, targets)
    res["top_self"] = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return res


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
    res["cmd"] = shlex.join([f"{kv}" for kv in c.ftune_env] + [x if x != js else "OUT.json" for x in cmd])
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


def cpu_pressure():
    """Linux PSI: share of the last 10 s / 60 s in which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            kv = dict(x.split("=") for x in f.readline().split()[1:])
        return f"{float(kv['avg10']):.0f} % (10 s), {float(kv['avg60']):.0f} % (60 s)"
    except (OSError, KeyError, ValueError):
        return "n/a"


def git_describe():
    """Commit of the checkout the script sits in, with '+dirty' for uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return (rev or "?") + ("+dirty" if dirty else "")
    except OSError:
        return "?"


THREAD_ENV = ("OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "LD_LIBRARY_PATH", "LD_PRELOAD")


def breakdown_table(ft, to, cpu=False):
    """Markdown rows per op label: ftune fwd/bwd, torch fwd/bwd (ms/step), wall or process CPU time.
    The "(engine)" row is what the step spent outside every timed op (autograd engine, gradient
    accumulation, python glue)."""
    fk, bk = ("fwd_cpu_ms", "bwd_cpu_ms") if cpu else ("fwd_ms", "bwd_ms")
    sfx = "_cpu_ms" if cpu else "_ms"

    def with_engine(p):
        if not p:
            return {}, []
        d = {o["op"]: o for o in p["ops"]}
        d["(engine)"] = {fk: p["forward" + sfx] - sum(o[fk] for o in p["ops"]),
                         bk: p["backward" + sfx] - sum(o[bk] for o in p["ops"])}
        return d, [o["op"] for o in p["ops"]] + ["(engine)"]

    fo, forder = with_engine(ft)
    tor, torder = with_engine(to)
    labels = forder + [l for l in torder if l not in fo]
    rows = ["| op | ftune fwd | ftune bwd | torch fwd | torch bwd | ftune/torch (fwd+bwd) |",
            "|---|---:|---:|---:|---:|---:|"]

    def cell(d, l, k):
        return f"{d[l][k]:.2f}" if l in d else "-"

    for l in labels:
        ratio = "-"
        if l in fo and l in tor:
            a, b = fo[l][fk] + fo[l][bk], tor[l][fk] + tor[l][bk]
            ratio = f"{a / b:.2f}" if b > 0.005 else "-"
        rows.append(f"| {l} | {cell(fo, l, fk)} | {cell(fo, l, bk)} | {cell(tor, l, fk)} | {cell(tor, l, bk)} "
                    f"| {ratio} |")
    nan = float("nan")
    fw = (ft["forward" + sfx], ft["backward" + sfx], ft["optimizer" + sfx]) if ft else (nan, nan, nan)
    tw = (to["forward" + sfx], to["backward" + sfx], to["optimizer" + sfx]) if to else (nan, nan, nan)
    rows.append(f"| **forward + backward** | {fw[0]:.2f} | {fw[1]:.2f} | {tw[0]:.2f} | {tw[1]:.2f} | "
                f"{(fw[0] + fw[1]) / (tw[0] + tw[1]):.2f} |")
    rows.append(f"| **optimizer (AdamW)** | {fw[2]:.2f} | | {tw[2]:.2f} | | {fw[2] / tw[2]:.2f} |")
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
    c.pressure_before = cpu_pressure()

    flops = step_flops(c)
    ft = None if c.skip_ftune else run_ftune(c, c.binary)
    to = run_torch(c)
    res = [r for r in (ft, to) if r]
    c.pressure_after = cpu_pressure()

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
        for cpu in (False, True):
            print(f"\nper-op breakdown, ms/step, {'process CPU' if cpu else 'wall'} time "
                  f"(mean of {c.profile} instrumented steps)")
            print(breakdown_table(ft and ft.get("profile"), to["profile"], cpu))

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
        f"- ftune tree: {git_describe()}",
        "- thread environment: " + (", ".join(f"`{k}={v}`" for k, v in sorted(os.environ.items())
                                             if k.startswith(THREAD_ENV)) or "none set"),
        f"- CPU pressure (/proc/pressure/cpu, some): {c.pressure_before} before, {c.pressure_after} after "
        "(near 0 on a quiet machine)",
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
                  "Both sides are measured the same way: a timer around every op call in the forward, and "
                  "around every autograd node's backward (ftune: its backward closure, wrapped; torch: a "
                  "pre-hook/hook pair on the node), each node labelled by the forward call that created "
                  "it. `(engine)` is the rest of the forward/backward time (autograd engine, leaf "
                  "gradient accumulation, glue). Profiled steps come after the timed ones and are not "
                  "part of them. Process CPU time counts every thread (spin-waiting included) but not "
                  "time spent waiting for a core.", "",
                  "### Wall time", "", breakdown_table(ft and ft.get("profile"), to["profile"]), "",
                  "### Process CPU time", "", breakdown_table(ft and ft.get("profile"), to["profile"], True), "",
                  "<details><summary>torch.profiler, one step, top ops by self CPU time</summary>", "", "```",
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
