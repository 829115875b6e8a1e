// Fused attention (kernels/cuda/attention.cu), bf16: TFLOP/s of the forward and of forward +
// backward with FlashAttention's convention (forward 4 B H N^2 D, halved when causal; backward
// 2.5x the forward), head_dim 64 (32 heads) and 128 (16 heads), seq 512..8192 with B N = 16k
// tokens, causal and not; the forward also with 128-row CTAs, fwd+bwd also with backward variants
// 1, 3 and 5 (head_dim 64), 4 and (determinism off) 2 (set_attention_bwd_variant); and the
// "cudnn" rows, cuDNN's fused flash attention (the attention.backend: cudnn baseline) where this
// build has cuDNN. The torch SDPA numbers on the same shapes come from
// torch_attention.py. Plus one decode step over a long KV cache (GB/s: K and V read once).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench/gpu/gpu_bench.h"
#include "core/cuda_runtime.h"
#include "core/dtype.h"
#include "kernels/attention.h"

namespace {

using ftune::kernels::cpu::AttnParams;
using ftune::kernels::cpu::AttnSeq;

std::vector<AttnSeq> batch(int64_t B, int64_t tq, int64_t tk) {
  std::vector<AttnSeq> s;
  for (int64_t b = 0; b < B; ++b) s.push_back({b * tq, tq, b * tk, tk});
  return s;
}

// One shape of the TFLOP/s tables: B x N tokens of bf16, H heads of D (B N = 16k tokens), its
// forward and backward on random device buffers as closures, the forward's FLOPs
// (FlashAttention's convention) and the repetitions.
struct Shape {
  AttnParams p;
  std::vector<AttnSeq> seqs;
  std::string name;  // "bf16 d64 h32 b32 n512 [causal]"
  double fwd_flops = 0;
  int reps = 0;
  void *q, *k, *v, *go, *o, *dq, *dk, *dv;
  float* lse;
  void fwd() const {
    ftune::kernels::cuda::attention_forward(p, seqs, ftune::DType::bf16, q, k, v, o, lse);
  }
  void bwd() const {
    ftune::kernels::cuda::attention_backward(p, seqs, ftune::DType::bf16, q, k, v, o, lse, go, dq,
                                             dk, dv);
  }
};

// fn(shape) for head_dim 64 (32 heads) and 128 (16 heads), seq 512 .. 8192, non-causal then causal.
template <class F>
void for_each_shape(F&& fn) {
  using namespace ftune;
  const int64_t tokens = 16384;
  for (int64_t D : {64, 128}) {
    const int64_t H = 2048 / D;
    for (int64_t N : {512, 1024, 2048, 4096, 8192}) {
      const int64_t B = tokens / N, n = B * N * H * D;
      Shape sh;
      void** bufs[] = {&sh.q, &sh.k, &sh.v, &sh.go, &sh.o, &sh.dq, &sh.dk, &sh.dv};
      for (int i = 0; i < 8; ++i) *bufs[i] = bench::random_device(2, n, 1, 1.f, uint64_t(i + 1));
      sh.lse = static_cast<float*>(bench::random_device(4, H * B * N, 0, 1.f, 9));
      for (bool causal : {false, true}) {
        sh.p.num_heads = sh.p.num_kv_heads = H;
        sh.p.head_dim = D;
        sh.p.nq = sh.p.nk = B * N;
        sh.p.scale = 1.0 / std::sqrt(double(D));
        sh.p.causal = causal;
        sh.seqs = batch(B, N, N);
        sh.fwd_flops = 4.0 * B * H * N * N * D * (causal ? 0.5 : 1.0);
        sh.reps = N >= 4096 ? 10 : 20;
        sh.name = "bf16 d" + std::to_string(D) + " h" + std::to_string(H) + " b" +
                  std::to_string(B) + " n" + std::to_string(N) + (causal ? " causal" : "");
        fn(sh);
      }
      for (void** b : bufs) bench::free_device(*b);
      bench::free_device(sh.lse);
    }
  }
}

}  // namespace

FTUNE_GPU_BENCH(attention) {
  using namespace ftune;
  for_each_shape([&](const Shape& sh) {
    const int reps = sh.reps, vreps = reps / 2;  // the variant rows: fewer repetitions
    auto fwd = [&] { sh.fwd(); };
    auto fb = [&] {
      sh.fwd();
      sh.bwd();
    };
    // One row: fn timed after `warm` calls over `n`, its FLOPs the forward's times `x`.
    auto row = [&](const std::string& name, const std::function<void()>& fn, int warm, int n,
                   double x) {
      bench::Row r;
      r.name = name;
      r.ms = ctx.time_ms(fn, warm, n);
      r.flops = x * sh.fwd_flops;
      ctx.add(r);
    };
    const std::string fwd_name = "attn_fwd " + sh.name, fb_name = "attn_fwd+bwd " + sh.name;
    // The plain rows are the original kernels (64-row forward, backward variant 0); the
    // default (auto: bm128 forward, bwd-v1 at d64 / bwd-v4 at d128) is among the rows below.
    kernels::cuda::set_attention_fwd_row_blocks(0);
    kernels::cuda::set_attention_bwd_variant(0);
    row(fwd_name, fwd, 3, reps, 1.0);
    // The same with 128-row CTAs (the default is 64): which one should be the default.
    kernels::cuda::set_attention_fwd_row_blocks(2);
    row(fwd_name + " bm128", fwd, 3, reps, 1.0);
    kernels::cuda::set_attention_fwd_row_blocks(0);
    fwd();  // a real lse for the backward
    row(fb_name, fb, 2, reps, 3.5);
    // Backward variants, the forward at the 64-row default: 1 (more resident CTAs per SM), 3
    // and 5 (differ from 1 and 4 only at head_dim 64), 4.
    for (int variant : {1, 3, 4, 5}) {
      if ((variant == 3 || variant == 5) && sh.p.head_dim != 64) continue;
      kernels::cuda::set_attention_bwd_variant(variant);
      row(fb_name + " bwd-v" + std::to_string(variant), fb, 1, vreps, 3.5);
    }
    // Determinism off, backward variant 2: dQ by float2 atomics inside the dK/dV kernel.
    cuda::set_deterministic(false);
    kernels::cuda::set_attention_bwd_variant(2);
    row(fb_name + " atomic-dq-v2", fb, 1, vreps, 3.5);
    kernels::cuda::set_attention_bwd_variant(0);
    cuda::set_deterministic(true);
    // The baseline: cuDNN's fused flash attention on the same buffers (attention.backend:
    // cudnn), same FLOP convention. Its first call builds and caches the plan (warm-up).
    if (kernels::cuda::cudnn_attention_unsupported(sh.p, sh.seqs, DType::bf16).empty()) {
      auto cfwd = [&] {
        kernels::cuda::cudnn_attention_forward(sh.p, sh.seqs, DType::bf16, sh.q, sh.k, sh.v, sh.o,
                                               sh.lse);
      };
      auto cfb = [&] {
        cfwd();
        kernels::cuda::cudnn_attention_backward(sh.p, sh.seqs, DType::bf16, sh.q, sh.k, sh.v, sh.o,
                                                sh.lse, sh.go, sh.dq, sh.dk, sh.dv);
      };
      row(fwd_name + " cudnn", cfwd, 3, reps, 1.0);
      cfwd();
      row(fb_name + " cudnn", cfb, 2, reps, 3.5);
    }
  });
  kernels::cuda::set_attention_fwd_row_blocks(-1);  // back to the defaults
  kernels::cuda::set_attention_bwd_variant(-1);

  // Grouped-query attention at the end-to-end benchmark's shape (Qwen2.5-0.5B: 14 query heads on
  // 2 kv heads, d64, 4 x 2048, causal), the defaults: dK/dV split over the query heads (auto)
  // against not split (set_attention_bwd_split_heads(0)), and cuDNN.
  {
    const int64_t B = 4, N = 2048, H = 14, Hkv = 2, D = 64;
    const int64_t nq = B * N * H * D, nk = B * N * Hkv * D;
    void* q = bench::random_device(2, nq, 1, 1.f, 31);
    void* k = bench::random_device(2, nk, 1, 1.f, 32);
    void* v = bench::random_device(2, nk, 1, 1.f, 33);
    void* go = bench::random_device(2, nq, 1, 1.f, 34);
    void* o = bench::random_device(2, nq, 1, 1.f, 35);
    void* dq = bench::random_device(2, nq, 1, 1.f, 36);
    void* dk = bench::random_device(2, nk, 1, 1.f, 37);
    void* dv = bench::random_device(2, nk, 1, 1.f, 38);
    float* lse = static_cast<float*>(bench::random_device(4, H * B * N, 0, 1.f, 39));
    AttnParams p;
    p.num_heads = H;
    p.num_kv_heads = Hkv;
    p.head_dim = D;
    p.nq = p.nk = B * N;
    p.scale = 1.0 / std::sqrt(double(D));
    p.causal = true;
    const auto seqs = batch(B, N, N);
    const double fwd_flops = 4.0 * B * H * N * N * D * 0.5;
    const std::string shape = "bf16 d64 h14/2 b4 n2048 causal";
    auto fwd = [&] { kernels::cuda::attention_forward(p, seqs, DType::bf16, q, k, v, o, lse); };
    auto bwd = [&] {
      kernels::cuda::attention_backward(p, seqs, DType::bf16, q, k, v, o, lse, go, dq, dk, dv);
    };
    bench::Row r;
    r.name = "attn_fwd " + shape;
    r.ms = ctx.time_ms(fwd, 3, 20);
    r.flops = fwd_flops;
    ctx.add(r);
    fwd();
    bench::Row rb;
    rb.name = "attn_fwd+bwd " + shape;
    rb.ms = ctx.time_ms(
        [&] {
          fwd();
          bwd();
        },
        2, 20);
    rb.flops = 3.5 * fwd_flops;
    ctx.add(rb);
    kernels::cuda::set_attention_bwd_split_heads(0);
    bench::Row rn;
    rn.name = "attn_fwd+bwd " + shape + " nosplit";
    rn.ms = ctx.time_ms(
        [&] {
          fwd();
          bwd();
        },
        2, 20);
    rn.flops = 3.5 * fwd_flops;
    ctx.add(rn);
    kernels::cuda::set_attention_bwd_split_heads(-1);
    if (kernels::cuda::cudnn_attention_unsupported(p, seqs, DType::bf16).empty()) {
      auto cfwd = [&] {
        kernels::cuda::cudnn_attention_forward(p, seqs, DType::bf16, q, k, v, o, lse);
      };
      auto cbwd = [&] {
        kernels::cuda::cudnn_attention_backward(p, seqs, DType::bf16, q, k, v, o, lse, go, dq, dk,
                                                dv);
      };
      bench::Row c1;
      c1.name = "attn_fwd " + shape + " cudnn";
      c1.ms = ctx.time_ms(cfwd, 3, 20);
      c1.flops = fwd_flops;
      ctx.add(c1);
      cfwd();
      bench::Row c2;
      c2.name = "attn_fwd+bwd " + shape + " cudnn";
      c2.ms = ctx.time_ms(
          [&] {
            cfwd();
            cbwd();
          },
          2, 20);
      c2.flops = 3.5 * fwd_flops;
      ctx.add(c2);
    }
    for (void* ptr : {q, k, v, go, o, dq, dk, dv, static_cast<void*>(lse)}) bench::free_device(ptr);
  }

  // Decode: one query per sequence over the cached tokens; 32 query heads on 8 kv heads. Many
  // short caches, and a few long ones (keys split across CTAs, then merged).
  for (auto [B, T] : {std::pair<int64_t, int64_t>{64, 4096}, {4, 32768}}) {
    const int64_t H = 32, Hkv = 8, D = 128;
    void* q = bench::random_device(2, B * H * D, 1, 1.f, 11);
    void* k = bench::random_device(2, B * T * Hkv * D, 1, 1.f, 12);
    void* v = bench::random_device(2, B * T * Hkv * D, 1, 1.f, 13);
    void* o = bench::random_device(2, B * H * D, 1, 1.f, 14);
    float* lse = static_cast<float*>(bench::random_device(4, H * B, 0, 1.f, 15));
    AttnParams p;
    p.num_heads = H;
    p.num_kv_heads = Hkv;
    p.head_dim = D;
    p.nq = B;
    p.nk = B * T;
    p.scale = 1.0 / std::sqrt(double(D));
    const auto seqs = batch(B, 1, T);
    bench::Row r;
    r.name = "attn_decode bf16 d128 h32/8 b" + std::to_string(B) + " kv" + std::to_string(T);
    r.ms = ctx.time_ms(
        [&] { kernels::cuda::attention_forward(p, seqs, DType::bf16, q, k, v, o, lse); }, 3, 20);
    r.bytes = 2.0 * B * T * Hkv * D * 2;
    r.note = "K, V read once";
    ctx.add(r);
    for (void* ptr : {q, k, v, o, static_cast<void*>(lse)}) bench::free_device(ptr);
  }
}

// The forward on Hopper's warpgroup MMAs (set_attention_fwd_wgmma), beside the rows above: the
// forward, plain and pipelined ("wgmma-pipe"), with 64- and 128-row CTAs, forward + backward (the
// default backward) with it, and both passes on wgmma (set_attention_bwd_wgmma: "wgmma-all", one
// warpgroup per backward CTA; "wgmma-all wg2", two). A family of its own, run after every other
// (bench/gpu/main.cu), so a fault in it costs no other rows. Skipped where
// attention_wgmma_available() is false.
FTUNE_GPU_BENCH(attention_wgmma) {
  using namespace ftune;
  if (!kernels::cuda::attention_wgmma_available()) return;
  for_each_shape([&](const Shape& sh) {
    auto fwd = [&] { sh.fwd(); };
    auto fb = [&] {
      sh.fwd();
      sh.bwd();
    };
    auto row = [&](const std::string& name, const std::function<void()>& fn, int warm, double x) {
      bench::Row r;
      r.name = name;
      r.ms = ctx.time_ms(fn, warm, sh.reps);
      r.flops = x * sh.fwd_flops;
      ctx.add(r);
    };
    for (int mode : {2, 1})  // the pipelined forward, then the plain one (left on below)
      for (int blocks : {1, 2}) {
        kernels::cuda::set_attention_fwd_wgmma(mode);
        kernels::cuda::set_attention_fwd_row_blocks(blocks);
        row("attn_fwd " + sh.name + (mode == 2 ? " wgmma-pipe" : " wgmma") +
                (blocks == 2 ? " bm128" : ""),
            fwd, 3, 1.0);
      }
    kernels::cuda::set_attention_fwd_row_blocks(-1);
    fwd();
    row("attn_fwd+bwd " + sh.name + " wgmma", fb, 2, 3.5);
    // Both passes on wgmma (the deterministic backward: dK/dV and dQ kernels), one and two
    // warpgroups per backward CTA.
    for (int wgs : {1, 2}) {
      kernels::cuda::set_attention_bwd_wgmma(wgs);
      row("attn_fwd+bwd " + sh.name + (wgs == 2 ? " wgmma-all wg2" : " wgmma-all"), fb, 2, 3.5);
    }
    kernels::cuda::set_attention_bwd_wgmma(-1);
    kernels::cuda::set_attention_fwd_wgmma(-1);
  });
}
