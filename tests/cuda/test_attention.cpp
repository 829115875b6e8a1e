// Fused attention on the GPU (kernels/cuda/attention.cu) against the CPU kernel in f64 on the
// same (dtype-rounded) inputs: the output, the logsumexp and all three gradients, for f32, bf16
// and f16; head_dim 64 and 128 (the tensor-core path for bf16/f16) and 80 (the general path);
// causal and not; grouped-query (8 query heads over 2 kv heads); ragged packed sequences
// (lengths 1, 17, 128, 300 and a KV-cache-like layout with len_k != len_q, an empty sequence and
// rows that see no key); the decode path (one query per sequence) against the CPU and against the
// last row of the full forward. Plus the op (core/ops) in bf16 through autograd.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "kernels/attention.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

using kernels::cpu::AttnParams;
using kernels::cpu::AttnSeq;

struct Case {
  // Uniform batch (b > 0): b rows of tq queries and tk keys. Else packed: cu_q / cu_k.
  int64_t b = 0, tq = 0, tk = 0;
  std::vector<int> cu_q, cu_k;
  int64_t h = 8, hkv = 2, d = 64;
  bool causal = true;
  double scale = 0.0;  // 0: 1/sqrt(d)

  std::string name(DType dt) const {
    std::string s = b > 0 ? "b" + std::to_string(b) + "_tq" + std::to_string(tq) + "_tk" +
                                std::to_string(tk)
                          : "varlen" + std::to_string(cu_q.size() - 1);
    return s + "_h" + std::to_string(h) + "_kv" + std::to_string(hkv) + "_d" + std::to_string(d) +
           (causal ? "_causal_" : "_full_") + dtype_name(dt);
  }
  std::vector<AttnSeq> seqs() const {
    std::vector<AttnSeq> v;
    if (b > 0)
      for (int64_t i = 0; i < b; ++i) v.push_back({i * tq, tq, i * tk, tk});
    else
      for (size_t i = 0; i + 1 < cu_q.size(); ++i)
        v.push_back({cu_q[i], cu_q[i + 1] - cu_q[i], cu_k[i], cu_k[i + 1] - cu_k[i]});
    return v;
  }
  int64_t nq() const { return b > 0 ? b * tq : cu_q.back(); }
  int64_t nk() const { return b > 0 ? b * tk : cu_k.back(); }
  AttnParams params() const {
    AttnParams p;
    p.num_heads = h;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.nq = nq();
    p.nk = nk();
    p.scale = scale != 0.0 ? scale : 1.0 / std::sqrt(double(d));
    p.causal = causal;
    return p;
  }
};

struct Inputs {
  Tensor q, k, v, dout;  // host f32, rounded to the dtype under test
};

Inputs make_inputs(const Case& c, DType dt, uint64_t seed) {
  Generator g(seed);
  Inputs in;
  in.q = rand_host({c.nq(), c.h, c.d}, g, dt);
  in.k = rand_host({c.nk(), c.hkv, c.d}, g, dt);
  in.v = rand_host({c.nk(), c.hkv, c.d}, g, dt);
  in.dout = rand_host({c.nq(), c.h, c.d}, g, dt);
  return in;
}

struct Result {
  Tensor out, lse, dq, dk, dv;  // host
};

// The CPU kernel in f64. Small tiles, so its own ragged-tile logic is exercised too.
// gpu_out: when given, the backward uses it for O (D = rowsum(dO * O)), as the GPU uses its own
// rounded O: a 16-bit O differs from the exact one by a rounding, and D's cancellation would
// turn that into gradient errors the kernel did not make.
Result run_cpu(const Case& c, const Inputs& in, const Tensor* gpu_out = nullptr) {
  AttnParams p = c.params();
  p.block_q = 16;
  p.block_k = 32;
  auto seqs = c.seqs();
  Tensor q = in.q.to(DType::f64), k = in.k.to(DType::f64), v = in.v.to(DType::f64);
  Tensor g = in.dout.to(DType::f64);
  Result r;
  r.out = Tensor::empty(q.shape(), DType::f64);
  r.lse = Tensor::empty({c.h, c.nq()}, DType::f64);
  r.dq = Tensor::empty(q.shape(), DType::f64);
  r.dk = Tensor::empty(k.shape(), DType::f64);
  r.dv = Tensor::empty(v.shape(), DType::f64);
  kernels::cpu::attention_forward<double>(p, seqs, q.data<double>(), k.data<double>(),
                                          v.data<double>(), r.out.data<double>(),
                                          r.lse.data<double>());
  Tensor o_bwd = gpu_out ? gpu_out->to(DType::f64).contiguous() : r.out;
  kernels::cpu::attention_backward<double>(
      p, seqs, q.data<double>(), k.data<double>(), v.data<double>(), o_bwd.data<double>(),
      r.lse.data<double>(), g.data<double>(), r.dq.data<double>(), r.dk.data<double>(),
      r.dv.data<double>());
  return r;
}

// The CUDA kernels on device copies in dt; outputs start poisoned (NaN bytes).
Result run_gpu(const Case& c, const Inputs& in, DType dt, bool grads = true) {
  AttnParams p = c.params();
  auto seqs = c.seqs();
  const Device dev = Device::cuda(0);
  Tensor q = to_gpu(in.q, dt), k = to_gpu(in.k, dt), v = to_gpu(in.v, dt);
  Tensor out = Tensor::empty(q.shape(), dt, dev);
  Tensor lse = Tensor::empty({c.h, c.nq()}, DType::f32, dev);
  kernels::cuda::attention_forward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                   out.raw_data(), lse.data<float>());
  Result r;
  r.out = to_host(out);
  r.lse = to_host(lse);
  if (!grads) return r;
  Tensor g = to_gpu(in.dout, dt);
  Tensor dq = Tensor::empty(q.shape(), dt, dev), dk = Tensor::empty(k.shape(), dt, dev),
         dv = Tensor::empty(v.shape(), dt, dev);
  kernels::cuda::attention_backward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                    out.raw_data(), lse.data<float>(), g.raw_data(),
                                    dq.raw_data(), dk.raw_data(), dv.raw_data());
  r.dq = to_host(dq);
  r.dk = to_host(dk);
  r.dv = to_host(dv);
  return r;
}

double rms(const Tensor& t) {
  auto v = t.to_vector<double>();
  double s = 0;
  size_t n = 0;
  for (double x : v)
    if (std::isfinite(x)) {
      s += x * x;
      ++n;
    }
  return n ? std::sqrt(s / double(n)) : 1.0;
}

// Elementwise: |got - ref| <= atol_rel * rms(ref) + rtol * |ref|; and the relative L2 error.
// f32 runs in f32 against f64; bf16/f16 are rounded on output (and P is rounded to the input
// type before the P V product on the tensor-core path, as in FlashAttention).
// Gradients (what = "dq", "dk", "dv", ...) of 16-bit inputs get a wider elementwise bound: the
// tensor-core backward rounds P and dS to the input type before their products (as FlashAttention
// does), so single elements of rows with cancellation land a few percent of the rms away; seen on
// an H200 at up to 2.6x the output's bound while the L2 error stayed under 1e-2. The L2 bound is
// the same for outputs and gradients.
void expect_close(const Tensor& got, const Tensor& ref, DType dt, const std::string& what) {
  double atol_rel, rtol, l2;
  const bool grad = !what.empty() && what[0] == 'd' && what.size() >= 2 &&
                    (what[1] == 'q' || what[1] == 'k' || what[1] == 'v');
  switch (dt) {
    case DType::bf16: atol_rel = grad ? 1e-1 : 3e-2, rtol = 2e-2, l2 = 1e-2; break;
    case DType::f16: atol_rel = grad ? 2e-2 : 5e-3, rtol = 5e-3, l2 = 2.5e-3; break;
    default: atol_rel = 1e-4, rtol = 1e-4, l2 = 2e-5; break;
  }
  const Tensor r = ref.to(DType::f64);
  EXPECT_TRUE(all_close(got, r, atol_rel * rms(r), rtol)) << what;
  EXPECT_LT(rel_l2(got, r), l2) << what;
}

void check_case(const Case& c, DType dt, uint64_t seed = 1) {
  SCOPED_TRACE(c.name(dt));
  Inputs in = make_inputs(c, dt, seed);
  Result got = run_gpu(c, in, dt);
  Result ref = run_cpu(c, in, &got.out);
  expect_close(got.out, ref.out, dt, "out");
  // The logsumexp is f32 for every dtype, from the same rounded inputs: tight. +inf rows match.
  EXPECT_TRUE(all_close(got.lse, ref.lse, 1e-4, 1e-5)) << "lse";
  expect_close(got.dq, ref.dq, dt, "dq");
  expect_close(got.dk, ref.dk, dt, "dk");
  expect_close(got.dv, ref.dv, dt, "dv");
}

// Puts every process-wide attention hook (row blocks, backward variant, split over query heads,
// the wgmma kernels) back to its default, and determinism to what it was, when a test ends.
struct AttentionHooks {
  bool deterministic = cuda::deterministic();
  ~AttentionHooks() {
    cuda::set_deterministic(deterministic);
    kernels::cuda::set_attention_fwd_row_blocks(-1);
    kernels::cuda::set_attention_bwd_variant(-1);
    kernels::cuda::set_attention_bwd_split_heads(-1);
    kernels::cuda::set_attention_fwd_wgmma(-1);
    kernels::cuda::set_attention_bwd_wgmma(-1);
  }
};

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

// The packed KV-cache layout of PackedKvCacheLayout: (len_q, len_k) = (5, 70), (0, 9), (40, 30),
// (130, 130), (1, 1), (66, 200).
Case kv_cache_case(int64_t d, bool causal) {
  Case c;
  c.cu_q = {0, 5, 5, 45, 175, 176, 242};
  c.cu_k = {0, 70, 79, 109, 239, 240, 440};
  c.d = d;
  c.causal = causal;
  return c;
}
// b rows of tq queries over tk keys.
Case uniform_case(int64_t b, int64_t tq, int64_t tk, int64_t d, bool causal) {
  Case c;
  c.b = b;
  c.tq = tq;
  c.tk = tk;
  c.d = d;
  c.causal = causal;
  return c;
}

TEST(CudaAttention, UniformBatchAllPaths) {
  FTUNE_REQUIRE_GPU();
  // T = 300 is no multiple of the 64 (tensor-core) or 32 (general) tiles.
  for (int64_t d : {64, 128, 80})
    for (bool causal : {true, false})
      for (DType dt : kDtypes) {
        Case c;
        c.b = 2;
        c.tq = c.tk = 300;
        c.d = d;
        c.causal = causal;
        check_case(c, dt);
      }
}

TEST(CudaAttention, PackedRaggedSequences) {
  FTUNE_REQUIRE_GPU();
  for (int64_t d : {64, 128, 80})
    for (bool causal : {true, false})
      for (DType dt : kDtypes) {
        Case c;
        c.cu_q = c.cu_k = {0, 1, 18, 146, 446};  // lengths 1, 17, 128, 300
        c.d = d;
        c.causal = causal;
        check_case(c, dt, 2);
      }
}

TEST(CudaAttention, PackedKvCacheLayout) {
  FTUNE_REQUIRE_GPU();
  // Per sequence (len_q, len_k): (5, 70) queries behind a cache, (0, 9) keys without queries,
  // (40, 30) more queries than keys (causal: the first 10 rows see no key: lse +inf, out 0),
  // (130, 130), (1, 1), (66, 200).
  for (int64_t d : {64, 128, 80})
    for (bool causal : {true, false})
      for (DType dt : kDtypes) {
        Case c;
        c.cu_q = {0, 5, 5, 45, 175, 176, 242};
        c.cu_k = {0, 70, 79, 109, 239, 240, 440};
        c.d = d;
        c.causal = causal;
        check_case(c, dt, 3);
      }
}

TEST(CudaAttention, HeadDimsAndGroupsOfTheGeneralPath) {
  FTUNE_REQUIRE_GPU();
  // Odd and tiny head dims, 256 (the largest), multi-query, a scale that peaks the softmax.
  struct Shape {
    int64_t d, h, hkv;
    double scale;
  };
  for (Shape s : {Shape{5, 4, 1, 0.0}, Shape{33, 3, 3, 0.0}, Shape{256, 4, 2, 0.0},
                  Shape{96, 6, 2, 0.0}, Shape{64, 4, 1, 3.0}})
    for (DType dt : {DType::f32, DType::bf16}) {
      Case c;
      c.b = 3;
      c.tq = 45;
      c.tk = 77;
      c.d = s.d;
      c.h = s.h;
      c.hkv = s.hkv;
      c.scale = s.scale;
      c.causal = true;
      check_case(c, dt, 4);
    }
}

TEST(CudaAttention, LargeTensorCoreCase) {
  FTUNE_REQUIRE_GPU();
  for (int64_t d : {64, 128}) {
    Case c;
    c.b = 1;
    c.tq = c.tk = 1500;
    c.h = 4;
    c.hkv = 1;
    c.d = d;
    c.causal = true;
    check_case(c, DType::bf16, 5);
  }
}

// Deterministic off: the tensor-core backward forms dQ with f32 atomics inside the dK/dV kernel.
TEST(CudaAttention, AtomicDqWhenNotDeterministic) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  cuda::set_deterministic(false);
  for (int64_t d : {64, 128})
    for (bool causal : {true, false})
      for (DType dt : {DType::bf16, DType::f16}) {
        Case c;
        c.cu_q = {0, 5, 5, 45, 175, 176, 242};
        c.cu_k = {0, 70, 79, 109, 239, 240, 440};
        c.d = d;
        c.causal = causal;
        check_case(c, dt, 10);
        Case u;
        u.b = 2;
        u.tq = u.tk = 300;
        u.d = d;
        u.causal = causal;
        check_case(u, dt, 11);
      }
}

// Backward variant 2 with determinism off: the leaner atomic dQ (dS staged before the dK product,
// its fragments read once, float2 atomics); with determinism on, variant 2 is the default path.
TEST(CudaAttention, AtomicDqVariant2) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  kernels::cuda::set_attention_bwd_variant(2);
  cuda::set_deterministic(false);
  for (int64_t d : {64, 128})
    for (bool causal : {true, false})
      for (DType dt : {DType::bf16, DType::f16}) {
        Case c;
        c.cu_q = {0, 5, 5, 45, 175, 176, 242};
        c.cu_k = {0, 70, 79, 109, 239, 240, 440};
        c.d = d;
        c.causal = causal;
        check_case(c, dt, 20);
        Case r;
        r.cu_q = r.cu_k = {0, 1, 18, 146, 446};
        r.d = d;
        r.causal = causal;
        check_case(r, dt, 21);
        Case u;
        u.b = 2;
        u.tq = u.tk = 300;
        u.d = d;
        u.causal = causal;
        check_case(u, dt, 22);
      }
  for (int64_t d : {64, 128}) {
    Case c;
    c.b = 1;
    c.tq = c.tk = 1500;
    c.h = 4;
    c.hkv = 1;
    c.d = d;
    c.causal = true;
    check_case(c, DType::bf16, 23);
  }
  cuda::set_deterministic(true);
  Case c;
  c.cu_q = c.cu_k = {0, 1, 18, 146, 446};
  c.d = 128;
  check_case(c, DType::bf16, 24);
}

// The default (deterministic) backward gives the same bits on every run.
TEST(CudaAttention, DeterministicBackwardIsBitwiseRepeatable) {
  FTUNE_REQUIRE_GPU();
  ASSERT_TRUE(cuda::deterministic());
  for (DType dt : {DType::bf16, DType::f32}) {
    Case c;
    c.cu_q = c.cu_k = {0, 1, 18, 146, 446};
    c.d = 128;
    Inputs in = make_inputs(c, dt, 12);
    Result a = run_gpu(c, in, dt), b = run_gpu(c, in, dt);
    EXPECT_EQ(a.dq.to_vector<float>(), b.dq.to_vector<float>()) << dtype_name(dt);
    EXPECT_EQ(a.dk.to_vector<float>(), b.dk.to_vector<float>()) << dtype_name(dt);
    EXPECT_EQ(a.dv.to_vector<float>(), b.dv.to_vector<float>()) << dtype_name(dt);
  }
}

// The tensor-core forward with 64-row and 128-row CTAs (one or two 64-row blocks per warp group;
// a benchmark option) gives the same answers.
TEST(CudaAttention, ForwardWith64And128RowBlocks) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  for (int blocks : {1, 2})
    for (int64_t d : {64, 128})
      for (bool causal : {true, false})
        for (DType dt : {DType::bf16, DType::f16}) {
          SCOPED_TRACE("row blocks " + std::to_string(blocks));
          kernels::cuda::set_attention_fwd_row_blocks(blocks);
          check_case(kv_cache_case(d, causal), dt, 13);
          check_case(uniform_case(2, 300, 300, d, causal), dt, 14);
        }
}

// Backward variant 1 (more resident CTAs per SM: dK/dV at d64 with capped registers, dQ at d128
// with single K/V buffers; Delta with 16-byte loads), variant 3 (as 1, dK/dV at d64 by 128-key
// CTAs, 32 keys per warp), variant 4 (as 3, dQ by 128-row CTAs over 32-key tiles), variant 5 (as
// 4, that dQ kernel at d64 capped at 168 registers) and the forward's auto row blocks: the same
// cases as the default paths (fwd and all grads; bf16/f16; d64/d128; causal and not; GQA 8/2;
// ragged packed sequences; a KV-cache layout; a long uniform batch where auto picks 128-row CTAs
// at d64).
TEST(CudaAttention, BackwardVariants0To5AndAutoForwardRowBlocks) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  ASSERT_TRUE(cuda::deterministic());
  kernels::cuda::set_attention_fwd_row_blocks(-1);
  // One CPU reference per case for all variants: the forward (auto row blocks) is the same
  // kernel for each, so its O, which the reference's Delta uses, is too.
  auto check_variants = [](const Case& c, DType dt, uint64_t seed) {
    SCOPED_TRACE(c.name(dt));
    Inputs in = make_inputs(c, dt, seed);
    Result ref;
    bool have_ref = false;
    for (int variant : {0, 1, 2, 3, 4, 5}) {
      SCOPED_TRACE("backward variant " + std::to_string(variant));
      kernels::cuda::set_attention_bwd_variant(variant);
      Result got = run_gpu(c, in, dt);
      if (!have_ref) {
        ref = run_cpu(c, in, &got.out);
        have_ref = true;
      }
      expect_close(got.out, ref.out, dt, "out");
      EXPECT_TRUE(all_close(got.lse, ref.lse, 1e-4, 1e-5)) << "lse";
      expect_close(got.dq, ref.dq, dt, "dq");
      expect_close(got.dk, ref.dk, dt, "dk");
      expect_close(got.dv, ref.dv, dt, "dv");
    }
  };
  for (int64_t d : {64, 128})
    for (bool causal : {true, false})
      for (DType dt : {DType::bf16, DType::f16}) {
        Case c;
        c.cu_q = {0, 5, 5, 45, 175, 176, 242};
        c.cu_k = {0, 70, 79, 109, 239, 240, 440};
        c.d = d;
        c.causal = causal;
        check_variants(c, dt, 15);
        Case r;
        r.cu_q = r.cu_k = {0, 1, 18, 146, 446};
        r.d = d;
        r.causal = causal;
        check_variants(r, dt, 16);
        Case u;
        u.b = 2;
        u.tq = u.tk = 300;
        u.d = d;
        u.causal = causal;
        check_variants(u, dt, 17);
      }
  for (int64_t d : {64, 128}) {
    Case c;
    c.b = 1;
    c.tq = c.tk = 1500;
    c.h = 4;
    c.hkv = 1;
    c.d = d;
    c.causal = true;
    check_variants(c, DType::bf16, 18);
    // Plain multi-head attention (one query head per kv head): no dK/dV split, so the unsplit
    // dK/dV kernels of every variant run (the grouped cases above take the split by default).
    Case m;
    m.b = 2;
    m.tq = m.tk = 300;
    m.h = m.hkv = 4;
    m.d = d;
    m.causal = true;
    check_variants(m, DType::bf16, 19);
    m.causal = false;
    check_variants(m, DType::f16, 20);
  }
}

// The cases of the wgmma kernels' tests (seeds seed .. seed + 6): the KV-cache layout (an empty
// sequence, len_q < len_k and > len_k, rows that see no key), a uniform ragged batch and packed
// ragged sequences (lengths 1, 17, 128, 300), causal and not; causal with len_q != len_k both
// ways; a long GQA row (many unmasked key tiles, 4 heads on 1); plain multi-head attention.
void check_wgmma_cases(int64_t d, DType dt, uint64_t seed) {
  for (bool causal : {true, false}) {
    check_case(kv_cache_case(d, causal), dt, seed);
    check_case(uniform_case(2, 300, 300, d, causal), dt, seed + 1);
    Case r;
    r.cu_q = r.cu_k = {0, 1, 18, 146, 446};
    r.d = d;
    r.causal = causal;
    check_case(r, dt, seed + 2);
  }
  check_case(uniform_case(2, 300, 200, d, true), dt, seed + 3);
  check_case(uniform_case(2, 100, 300, d, true), dt, seed + 4);
  Case c = uniform_case(1, 1500, 1500, d, true);
  c.h = 4;
  c.hkv = 1;
  check_case(c, dt, seed + 5);
  Case m = uniform_case(2, 300, 300, d, false);
  m.h = m.hkv = 4;
  check_case(m, dt, seed + 6);
}

// The layouts under the wgmma kernels, one warpgroup MMA at a time (kernels::cuda::wgmma_probe):
// each kind (A in registers with B K-major, B transposed, A and B from shared memory) at reduction
// steps 0 and 3, on small integers (exact in bf16 and f32) against the CPU. On a mismatch it says
// which elements the hardware read instead: with one operand one-hot and the other holding its
// row (then column) indices, each output names the element it came from. First in the suite: if
// a layout is wrong, this says how, and the kernels' tests below fail for that reason.
TEST(CudaAttentionWgmma, LayoutProbe) {
  FTUNE_REQUIRE_GPU();
  if (!kernels::cuda::attention_wgmma_available())
    GTEST_SKIP() << "the wgmma kernels need an sm_90a build and a compute capability 9.0 GPU";
  // B as the product reads it: (n, k) of B^T for which 0 and 2, (k, n) of B for which 1.
  auto bidx = [](int which, int n, int k) { return which == 1 ? k * 64 + n : n * 64 + k; };
  auto product = [&](int which, int kk, const std::vector<float>& a, const std::vector<float>& b) {
    std::vector<float> d(64 * 64, 0.f);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n)
        for (int k = 16 * kk; k < 16 * kk + 16; ++k)
          d[m * 64 + n] += a[m * 64 + k] * b[bidx(which, n, k)];
    return d;
  };
  uint64_t seed = 7;
  auto small = [&] {  // -3..3
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    return float(int((seed >> 33) % 7) - 3);
  };
  const char* kinds[] = {"A regs, B K-major (S = Q K^T)", "A regs, B transposed (O += P V)",
                         "A and B from shared memory (S^T = K Q^T)"};
  for (int which = 0; which < 3; ++which)
    for (int kk : {0, 3}) {
      SCOPED_TRACE(std::string(kinds[which]) + ", k-step " + std::to_string(kk));
      std::vector<float> a(64 * 64), b(64 * 64);
      for (float& x : a) x = small();
      for (float& x : b) x = small();
      const std::vector<float> got = kernels::cuda::wgmma_probe(which, kk, a, b);
      const std::vector<float> want = product(which, kk, a, b);
      int bad = 0;
      for (int i = 0; i < 64 * 64; ++i) bad += got[i] != want[i];
      EXPECT_EQ(bad, 0) << bad << " of 4096 outputs differ";
      if (bad == 0) continue;
      // Which B element each output read: A one-hot (A[m][16 kk + m % 16] = 1), so D[m][n] is the
      // B element (n, 16 kk + m % 16); B filled with its n, then its k, index. Then which A
      // element: B one-hot on (n, 16 kk + n % 16), A filled with its m, then its k.
      std::vector<float> onehot_a(64 * 64, 0.f), onehot_b(64 * 64, 0.f), bn(64 * 64), bk(64 * 64),
          am(64 * 64), ak(64 * 64);
      for (int m = 0; m < 64; ++m) onehot_a[m * 64 + 16 * kk + m % 16] = 1.f;
      for (int n = 0; n < 64; ++n) onehot_b[bidx(which, n, 16 * kk + n % 16)] = 1.f;
      for (int n = 0; n < 64; ++n)
        for (int k = 0; k < 64; ++k) {
          bn[bidx(which, n, k)] = float(n);
          bk[bidx(which, n, k)] = float(k);
          am[n * 64 + k] = float(n);
          ak[n * 64 + k] = float(k);
        }
      const auto rn = kernels::cuda::wgmma_probe(which, kk, onehot_a, bn);
      const auto rk = kernels::cuda::wgmma_probe(which, kk, onehot_a, bk);
      const auto rm = kernels::cuda::wgmma_probe(which, kk, am, onehot_b);
      const auto rak = kernels::cuda::wgmma_probe(which, kk, ak, onehot_b);
      int shown = 0;
      for (int m = 0; m < 64 && shown < 12; ++m)
        for (int n = 0; n < 64 && shown < 12; ++n) {
          const int i = m * 64 + n;
          const bool b_ok = rn[i] == n && rk[i] == 16 * kk + m % 16;
          const bool a_ok = rm[i] == m && rak[i] == 16 * kk + n % 16;
          if (b_ok && a_ok) continue;
          ++shown;
          ADD_FAILURE() << "D(" << m << "," << n << "): B element read (n " << rn[i] << ", k "
                        << rk[i] << "), expected (n " << n << ", k " << 16 * kk + m % 16
                        << "); A element read (m " << rm[i] << ", k " << rak[i] << "), expected (m "
                        << m << ", k " << 16 * kk + n % 16 << ")";
        }
    }
}

// The forward on Hopper's warpgroup MMAs (set_attention_fwd_wgmma; sm_90a build, H100/H200), plain
// and pipelined, 64- and 128-row CTAs (one or two warpgroups): out, lse, and the backward (the
// mma.sync kernels) from its out and lse, against the CPU. The cases of the variants test above
// (ragged packed sequences, a KV-cache layout with empty sequences and rows that see no key, GQA
// 8/2, causal and not), causal with len_q != len_k both ways, a long GQA row (many unmasked key
// tiles) and plain multi-head attention. Its own suite: gpu_check runs it in a process of its own
// (a kernel that faults would take the process's CUDA context with it).
TEST(CudaAttentionWgmma, ForwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  if (!kernels::cuda::attention_wgmma_available())
    GTEST_SKIP() << "the wgmma forward needs an sm_90a build and a compute capability 9.0 GPU";
  AttentionHooks restore;
  for (int mode : {1, 2})  // 2: pipelined (fa_fwd_wgmma_kernel with kPipe)
    for (int blocks : {1, 2})
      for (int64_t d : {64, 128})
        for (DType dt : {DType::bf16, DType::f16}) {
          SCOPED_TRACE("wgmma forward" + std::string(mode == 2 ? " (pipelined)" : "") +
                       ", row blocks " + std::to_string(blocks));
          kernels::cuda::set_attention_fwd_wgmma(mode);
          kernels::cuda::set_attention_fwd_row_blocks(blocks);
          check_wgmma_cases(d, dt, 31);
        }
}

// The deterministic backward on warpgroup MMAs (set_attention_bwd_wgmma), one and two warpgroups
// per CTA: dK/dV, with the split over query heads off and on, and dQ, from the mma.sync forward's
// out and lse; then forward and backward both on wgmma. The same cases as the forward test above.
TEST(CudaAttentionWgmma, BackwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  if (!kernels::cuda::attention_wgmma_available())
    GTEST_SKIP() << "the wgmma kernels need an sm_90a build and a compute capability 9.0 GPU";
  AttentionHooks restore;
  ASSERT_TRUE(cuda::deterministic());
  kernels::cuda::set_attention_fwd_wgmma(0);
  for (int wgs : {1, 2})  // warpgroups per CTA: 64 or 128 keys (dK/dV) and rows (dQ)
    for (int split : {0, 1})
      for (int64_t d : {64, 128})
        for (DType dt : {DType::bf16, DType::f16}) {
          if (wgs == 2 && dt == DType::f16)
            continue;  // the same code as bf16 but for the MMA's type
          SCOPED_TRACE("wgmma backward, " + std::to_string(wgs) +
                       " warpgroups, split over query heads " + std::to_string(split));
          kernels::cuda::set_attention_bwd_wgmma(wgs);
          kernels::cuda::set_attention_bwd_split_heads(split);
          check_wgmma_cases(d, dt, 41);
        }
  kernels::cuda::set_attention_bwd_split_heads(-1);
  kernels::cuda::set_attention_fwd_wgmma(1);
  for (int wgs : {1, 2})
    for (int64_t d : {64, 128}) {
      SCOPED_TRACE("wgmma forward and backward, " + std::to_string(wgs) + " warpgroups");
      kernels::cuda::set_attention_bwd_wgmma(wgs);
      check_case(kv_cache_case(d, true), DType::bf16, 48);
      check_case(uniform_case(2, 300, 300, d, false), DType::f16, 49);
      check_case(kv_cache_case(d, true), DType::f16, 50);  // f16 causal (the loop above: bf16 at 2)
    }
}

// A negative scale (the op maps 0 to 1/sqrt(d)): the tensor-core forward folds the scale into
// its softmax's max, so it leaves scale <= 0 to the general kernel; the backward stays on tensor
// cores. Both must match the CPU.
TEST(CudaAttention, NegativeScale) {
  FTUNE_REQUIRE_GPU();
  for (int64_t d : {64, 128})
    for (bool causal : {true, false})
      for (DType dt : {DType::bf16, DType::f16}) {
        Case c = kv_cache_case(d, causal);
        c.scale = -1.0 / std::sqrt(double(d));
        check_case(c, dt, 21);
        Case u = uniform_case(2, 300, 300, d, causal);
        u.scale = c.scale;
        check_case(u, dt, 22);
      }
}

// Causal with more queries than keys (off = len_k - len_q < 0: the first rows see no key, later
// query tiles have unmasked key tiles) and fewer (off > 0), under 64- and 128-row forward CTAs:
// the forward's split into unmasked and masked key tiles, and the backward's masks.
TEST(CudaAttention, CausalWithUnequalQueryAndKeyLengths) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  for (int blocks : {1, 2})
    for (auto [tq, tk] : {std::pair<int64_t, int64_t>{300, 200}, {100, 300}})
      for (int64_t d : {64, 128})
        for (DType dt : {DType::bf16, DType::f16}) {
          SCOPED_TRACE("row blocks " + std::to_string(blocks));
          kernels::cuda::set_attention_fwd_row_blocks(blocks);
          check_case(uniform_case(2, tq, tk, d, true), dt, 23);
        }
}

// Grouped-query dK/dV split over the query heads (each head's share in f32, summed per group:
// set_attention_bwd_split_heads) and not split: both match the CPU, including Qwen2.5-0.5B's
// 14 / 2 heads and MQA (SomeGradientsOnly has dK or dV alone under the auto choice).
TEST(CudaAttention, DkDvSplitOverQueryHeadsOnAndOff) {
  FTUNE_REQUIRE_GPU();
  AttentionHooks restore;
  ASSERT_TRUE(cuda::deterministic());
  for (int split : {0, 1})
    for (int64_t d : {64, 128})
      for (bool causal : {true, false})
        for (DType dt : {DType::bf16, DType::f16}) {
          SCOPED_TRACE("split over query heads " + std::to_string(split));
          kernels::cuda::set_attention_bwd_split_heads(split);
          check_case(kv_cache_case(d, causal), dt, 24);
          Case q = uniform_case(2, 300, 300, d, causal);
          q.h = 14;
          q.hkv = 2;
          check_case(q, dt, 25);
          Case m = q;
          m.h = 4;
          m.hkv = 1;
          check_case(m, dt, 26);
        }
}

TEST(CudaAttention, SomeGradientsOnly) {
  FTUNE_REQUIRE_GPU();
  Case c;
  c.cu_q = c.cu_k = {0, 17, 145};
  c.d = 64;
  const DType dt = DType::bf16;
  Inputs in = make_inputs(c, dt, 6);
  Result full = run_gpu(c, in, dt);
  Result ref = run_cpu(c, in, &full.out);
  AttnParams p = c.params();
  auto seqs = c.seqs();
  const Device dev = Device::cuda(0);
  Tensor q = to_gpu(in.q, dt), k = to_gpu(in.k, dt), v = to_gpu(in.v, dt), g = to_gpu(in.dout, dt);
  Tensor out = to_gpu(full.out, dt), lse = full.lse.to(Device::cuda(0));
  AttentionHooks restore;
  for (int variant : {0, 1, 3, 4, 5}) {  // every backward variant of the deterministic path
    SCOPED_TRACE("backward variant " + std::to_string(variant));
    kernels::cuda::set_attention_bwd_variant(variant);
    Tensor dq = Tensor::empty(q.shape(), dt, dev), dv = Tensor::empty(v.shape(), dt, dev);
    kernels::cuda::attention_backward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                      out.raw_data(), lse.data<float>(), g.raw_data(),
                                      dq.raw_data(), nullptr, nullptr);
    expect_close(to_host(dq), ref.dq, dt, "dq alone");
    kernels::cuda::attention_backward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                      out.raw_data(), lse.data<float>(), g.raw_data(), nullptr,
                                      nullptr, dv.raw_data());
    expect_close(to_host(dv), ref.dv, dt, "dv alone");
    // dK alone (under the dK/dV split over query heads, the auto choice for these 8 / 2 heads
    // at variants 0 and 1, the scratch holds only the dK share).
    Tensor dk = Tensor::empty(k.shape(), dt, dev);
    kernels::cuda::attention_backward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                      out.raw_data(), lse.data<float>(), g.raw_data(), nullptr,
                                      dk.raw_data(), nullptr);
    expect_close(to_host(dk), ref.dk, dt, "dk alone");
  }
}

TEST(CudaAttention, DecodeMatchesCpuAndFullForwardLastRow) {
  FTUNE_REQUIRE_GPU();
  // d 33: rows that the lanes' vector loads cannot take (the element-by-element decode kernel).
  for (int64_t d : {64, 128, 80, 33})
    for (DType dt : kDtypes)
      for (int64_t tk : {37, 3000}) {  // 3000 keys: split across CTAs, merged by the combiner
        // Full causal forward over tk tokens; the decode step is its last query alone.
        Case full;
        full.b = 2;
        full.tq = full.tk = tk;
        full.d = d;
        Inputs in = make_inputs(full, dt, 7);
        Result f = run_gpu(full, in, dt, false);

        Case dec = full;
        dec.tq = 1;
        Inputs din = in;
        Tensor qv = in.q.reshape({2, tk, full.h, d});
        din.q = qv.slice(1, tk - 1, tk).contiguous().reshape({2, full.h, d});
        Result r = run_gpu(dec, din, dt, false);
        Result ref = run_cpu(dec, din);
        SCOPED_TRACE(dec.name(dt));
        expect_close(r.out, ref.out, dt, "decode out vs CPU");
        EXPECT_TRUE(all_close(r.lse, ref.lse, 1e-4, 1e-5)) << "decode lse vs CPU";
        Tensor last = f.out.reshape({2, tk, full.h, d}).slice(1, tk - 1, tk).contiguous();
        expect_close(r.out.reshape({2, 1, full.h, d}), last, dt, "decode vs full forward");
      }
}

TEST(CudaAttention, DecodeOverCacheLayout) {
  FTUNE_REQUIRE_GPU();
  // As models/transformer.cpp lays out a decode step over a left-padded cache of 64 slots for
  // 3 rows: per row (padding: 0 queries), (real tokens: 1 query), (unfilled tail: 0 queries).
  Case c;
  c.cu_q = {0, 0, 1, 1, 1, 2, 2, 2, 3, 3};
  c.cu_k = {0, 4, 30, 64, 64, 90, 128, 140, 150, 192};
  c.d = 128;
  for (DType dt : kDtypes) {
    SCOPED_TRACE(c.name(dt));
    Inputs in = make_inputs(c, dt, 8);
    Result ref = run_cpu(c, in);
    Result got = run_gpu(c, in, dt, false);
    expect_close(got.out, ref.out, dt, "out");
    EXPECT_TRUE(all_close(got.lse, ref.lse, 1e-4, 1e-5)) << "lse";
  }
}

// Through core/ops and autograd in bf16 on the GPU against the f32 op on the CPU.
TEST(CudaAttention, OpBf16Autograd) {
  FTUNE_REQUIRE_GPU();
  Generator gen(9);
  const int64_t B = 2, T = 130, H = 8, Hkv = 2, D = 128;
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "batched");
    Tensor q = rand_host({B, T, H, D}, gen, DType::bf16);
    Tensor k = rand_host({B, T, Hkv, D}, gen, DType::bf16);
    Tensor v = rand_host({B, T, Hkv, D}, gen, DType::bf16);
    Tensor w = rand_host({B, T, H, D}, gen, DType::bf16);
    ops::AttentionOptions o;
    if (packed) {
      o.cu_seqlens_q = o.cu_seqlens_k = Tensor::from_vector(std::vector<int32_t>{0, 100, 260}, {3});
      q = q.reshape({B * T, H, D});
      k = k.reshape({B * T, Hkv, D});
      v = v.reshape({B * T, Hkv, D});
      w = w.reshape({B * T, H, D});
    }
    Tensor qc = q.detach(), kc = k.detach(), vc = v.detach();
    for (Tensor* t : {&qc, &kc, &vc}) t->set_requires_grad(true);
    Tensor ref = ops::attention(qc, kc, vc, o);
    ref.backward(w);
    Tensor qg = to_gpu(q, DType::bf16), kg = to_gpu(k, DType::bf16), vg = to_gpu(v, DType::bf16);
    for (Tensor* t : {&qg, &kg, &vg}) t->set_requires_grad(true);
    Tensor out = ops::attention(qg, kg, vg, o);
    ASSERT_TRUE(out.device().is_cuda());
    ASSERT_EQ(out.dtype(), DType::bf16);
    out.backward(to_gpu(w, DType::bf16));
    expect_close(to_host(out), ref, DType::bf16, "out");
    expect_close(to_host(qg.grad()), qc.grad(), DType::bf16, "dq");
    expect_close(to_host(kg.grad()), kc.grad(), DType::bf16, "dk");
    expect_close(to_host(vg.grad()), vc.grad(), DType::bf16, "dv");
  }
}

}  // namespace
}  // namespace ftune::test
