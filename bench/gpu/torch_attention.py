"""torch SDPA (flash and cuDNN backends) on the shapes of bench/gpu/attention.cu: bf16, head_dim
64 (32 heads) and 128 (16 heads), seq 512..8192 with B*N = 16k tokens, causal and not. TFLOP/s
with FlashAttention's convention (forward 4*B*H*N^2*D, halved when causal; fwd+bwd 3.5x that).
Median of CUDA-event timings after warm-up, random inputs. Prints one short table."""
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def median_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    if not torch.cuda.is_available():
        print("torch_attention: no GPU")
        return 0
    t_start = time.time()
    dev = torch.device("cuda")
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    rows = []
    for D in (64, 128):
        H = 2048 // D
        for N in (512, 1024, 2048, 4096, 8192):
            B = 16384 // N
            g = torch.Generator(device=dev).manual_seed(N + D)
            # [B, N, H, D] storage as the ftune kernels take it, seen as [B, H, N, D] by SDPA.
            mk = lambda: torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16,
                                     generator=g).transpose(1, 2).requires_grad_(True)
            q, k, v = mk(), mk(), mk()
            go = torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16,
                             generator=g).transpose(1, 2)
            for causal in (False, True):
                flops = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
                res = []
                for name, be in backends:
                    try:
                        with sdpa_kernel([be]):
                            def fwd():
                                with torch.no_grad():
                                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                            def fwd_bwd():
                                q.grad = k.grad = v.grad = None  # no accumulation kernels
                                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                o.backward(go)

                            reps = 5 if N >= 4096 else 10
                            f = flops / (median_ms(fwd, 3, reps) * 1e9)
                            fb = 3.5 * flops / (median_ms(fwd_bwd, 2, reps) * 1e9)
                            q.grad = k.grad = v.grad = None
                            res += [f, fb]
                    except Exception as e:  # a backend that refuses the shape
                        print(f"{name} d{D} n{N} causal={causal}: {type(e).__name__}: {e}",
                              file=sys.stderr)
                        res += [float("nan"), float("nan")]
                rows.append((D, H, B, N, causal, *res))
            del q, k, v, go
            torch.cuda.empty_cache()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{time.time() - t_start:.0f} s")
    print("| shape (bf16) | flash fwd | flash fwd+bwd | cudnn fwd | cudnn fwd+bwd |  TFLOP/s")
    print("|---|---|---|---|---|")
    for D, H, B, N, causal, f1, fb1, f2, fb2 in rows:
        shape = f"d{D} h{H} b{B} n{N}{' causal' if causal else ''}"
        print(f"| {shape} | {f1:.0f} | {fb1:.0f} | {f2:.0f} | {fb2:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
