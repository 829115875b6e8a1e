"""PyTorch reference for bench_gpu's lora rows: the LoRA linear as PEFT composes it,
y = x @ W.T + s * (drop(x) @ A.T) @ B.T, forward + backward under autograd (W frozen; grads of x,
A and B), bf16, tokens 8192, d 4096 -> 4096, r 16. Prints median ms (CUDA events) per case."""
import torch
import torch.nn.functional as F


def bench(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        print("torch_lora: no GPU")
        return
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    M, d_in, d_out, r, s = 8192, 4096, 4096, 16, 2.0
    x = torch.randn(M, d_in, device=dev, dtype=dt).requires_grad_(True)
    w = (0.02 * torch.randn(d_out, d_in, device=dev, dtype=dt))  # frozen
    a = (0.02 * torch.randn(r, d_in, device=dev, dtype=dt)).requires_grad_(True)
    b = (0.02 * torch.randn(d_out, r, device=dev, dtype=dt)).requires_grad_(True)
    g = torch.randn(M, d_out, device=dev, dtype=dt)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    print("| case | torch ms |")
    print("|---|---|")
    for p in (0.0, 0.1):
        def step():
            xs = F.dropout(x, p=p, training=True) if p > 0 else x
            y = x @ w.t() + s * ((xs @ a.t()) @ b.t())
            x.grad = a.grad = b.grad = None
            y.backward(g)

        def fwd():
            with torch.no_grad():
                xs = F.dropout(x, p=p, training=True) if p > 0 else x
                return x @ w.t() + s * ((xs @ a.t()) @ b.t())

        print(f"| lora_linear fwd+bwd bf16 8192x4096x4096 r16 p={p:g} | {bench(step):.4f} |")
        print(f"| lora_linear fwd (no_grad) bf16 8192x4096x4096 r16 p={p:g} | {bench(fwd):.4f} |")
    base = bench(lambda: x.detach() @ w.t())
    print(f"| base GEMM x @ W.T bf16 8192x4096x4096 | {base:.4f} |")


if __name__ == "__main__":
    main()
