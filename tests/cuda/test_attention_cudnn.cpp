// cuDNN's fused attention (kernels/cuda/attention_cudnn.cpp, the `attention.backend: cudnn`
// alternative) against the CPU kernel in f64 on the same dtype-rounded inputs: output, logsumexp
// (in ftune's [H, Nq] layout, also for B > 1 where it is converted from cuDNN's [B, H, T]) and
// dQ / dK / dV, for bf16 and f16, head_dim 64 and 128, causal and not, grouped-query and not, odd
// sequence lengths. Plus: the shapes it refuses (and that the op falls back to ftune's kernel for
// them), the plan cache (a repeated call is bitwise the same), and the op through autograd with
// the backend set. Tolerances as tests/cuda/test_attention.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/ops.h"
#include "kernels/attention.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

using kernels::cpu::AttnParams;
using kernels::cpu::AttnSeq;

// Skips unless this build has cuDNN (after the GPU check).
#define FTUNE_REQUIRE_CUDNN()                                                 \
  do {                                                                        \
    FTUNE_REQUIRE_GPU();                                                      \
    if (!ops::cudnn_attention_built()) GTEST_SKIP() << "built without cuDNN"; \
  } while (0)

struct Case {
  int64_t b = 2, tq = 77, tk = 77, h = 8, hkv = 2, d = 64;
  bool causal = true;
  std::string name(DType dt) const {
    return "b" + std::to_string(b) + "_tq" + std::to_string(tq) + "_tk" + std::to_string(tk) +
           "_h" + std::to_string(h) + "_kv" + std::to_string(hkv) + "_d" + std::to_string(d) +
           (causal ? "_causal_" : "_full_") + dtype_name(dt);
  }
  std::vector<AttnSeq> seqs() const {
    std::vector<AttnSeq> v;
    for (int64_t i = 0; i < b; ++i) v.push_back({i * tq, tq, i * tk, tk});
    return v;
  }
  AttnParams params() const {
    AttnParams p;
    p.num_heads = h;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.nq = b * tq;
    p.nk = b * tk;
    p.scale = 1.0 / std::sqrt(double(d));
    p.causal = causal;
    return p;
  }
};

struct Inputs {
  Tensor q, k, v, dout;  // host f32, rounded to the dtype under test
};
struct Result {
  Tensor out, lse, dq, dk, dv;  // host
};

Inputs make_inputs(const Case& c, DType dt, uint64_t seed) {
  Generator g(seed);
  Inputs in;
  in.q = rand_host({c.b * c.tq, c.h, c.d}, g, dt);
  in.k = rand_host({c.b * c.tk, c.hkv, c.d}, g, dt);
  in.v = rand_host({c.b * c.tk, c.hkv, c.d}, g, dt);
  in.dout = rand_host({c.b * c.tq, c.h, c.d}, g, dt);
  return in;
}

// The CPU kernel in f64; the backward uses the GPU's rounded O (see test_attention.cpp: D =
// rowsum(dO * O) would otherwise turn O's rounding into gradient differences cuDNN did not make).
Result run_cpu(const Case& c, const Inputs& in, const Tensor& gpu_out) {
  AttnParams p = c.params();
  auto seqs = c.seqs();
  Tensor q = in.q.to(DType::f64), k = in.k.to(DType::f64), v = in.v.to(DType::f64);
  Tensor g = in.dout.to(DType::f64);
  Result r;
  r.out = Tensor::empty(q.shape(), DType::f64);
  r.lse = Tensor::empty({c.h, c.b * c.tq}, DType::f64);
  r.dq = Tensor::empty(q.shape(), DType::f64);
  r.dk = Tensor::empty(k.shape(), DType::f64);
  r.dv = Tensor::empty(v.shape(), DType::f64);
  kernels::cpu::attention_forward<double>(p, seqs, q.data<double>(), k.data<double>(),
                                          v.data<double>(), r.out.data<double>(),
                                          r.lse.data<double>());
  Tensor o = gpu_out.to(DType::f64).contiguous();
  kernels::cpu::attention_backward<double>(p, seqs, q.data<double>(), k.data<double>(),
                                           v.data<double>(), o.data<double>(),
                                           r.lse.data<double>(), g.data<double>(),
                                           r.dq.data<double>(), r.dk.data<double>(),
                                           r.dv.data<double>());
  return r;
}

Result run_cudnn(const Case& c, const Inputs& in, DType dt) {
  AttnParams p = c.params();
  auto seqs = c.seqs();
  const Device dev = Device::cuda(0);
  Tensor q = to_gpu(in.q, dt), k = to_gpu(in.k, dt), v = to_gpu(in.v, dt);
  Tensor out = Tensor::empty(q.shape(), dt, dev);  // poisoned: NaN bytes until written
  Tensor lse = Tensor::empty({c.h, c.b * c.tq}, DType::f32, dev);
  kernels::cuda::cudnn_attention_forward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                         out.raw_data(), lse.data<float>());
  Tensor g = to_gpu(in.dout, dt);
  Tensor dq = Tensor::empty(q.shape(), dt, dev), dk = Tensor::empty(k.shape(), dt, dev),
         dv = Tensor::empty(v.shape(), dt, dev);
  kernels::cuda::cudnn_attention_backward(p, seqs, dt, q.raw_data(), k.raw_data(), v.raw_data(),
                                          out.raw_data(), lse.data<float>(), g.raw_data(),
                                          dq.raw_data(), dk.raw_data(), dv.raw_data());
  Result r;
  r.out = to_host(out);
  r.lse = to_host(lse);
  r.dq = to_host(dq);
  r.dk = to_host(dk);
  r.dv = to_host(dv);
  return r;
}

double rms(const Tensor& t) {
  auto v = t.to_vector<double>();
  double s = 0;
  for (double x : v) s += x * x;
  return v.empty() ? 1.0 : std::sqrt(s / double(v.size()));
}

// test_attention.cpp's bounds: |got - ref| <= atol_rel * rms(ref) + rtol * |ref| elementwise and
// a relative L2 bound; gradients of 16-bit inputs get the wider elementwise bound (P and dS are
// rounded to the input type before their products, in cuDNN as in ftune's kernel).
void expect_close(const Tensor& got, const Tensor& ref, DType dt, bool grad,
                  const std::string& what) {
  const double atol_rel = dt == DType::bf16 ? (grad ? 1e-1 : 3e-2) : (grad ? 2e-2 : 5e-3);
  const double rtol = dt == DType::bf16 ? 2e-2 : 5e-3;
  const double l2 = dt == DType::bf16 ? 1e-2 : 2.5e-3;
  const Tensor r = ref.to(DType::f64);
  EXPECT_TRUE(all_close(got, r, atol_rel * rms(r), rtol)) << what;
  EXPECT_LT(rel_l2(got, r), l2) << what;
}

void check_case(const Case& c, DType dt, uint64_t seed = 1) {
  SCOPED_TRACE(c.name(dt));
  ASSERT_EQ(kernels::cuda::cudnn_attention_unsupported(c.params(), c.seqs(), dt), "");
  Inputs in = make_inputs(c, dt, seed);
  Result got = run_cudnn(c, in, dt);
  Result ref = run_cpu(c, in, got.out);
  expect_close(got.out, ref.out, dt, false, "out");
  // f32 statistics from the same rounded inputs: tight (as for ftune's kernel).
  EXPECT_TRUE(all_close(got.lse, ref.lse, 1e-4, 1e-5)) << "lse";
  expect_close(got.dq, ref.dq, dt, true, "dq");
  expect_close(got.dk, ref.dk, dt, true, "dk");
  expect_close(got.dv, ref.dv, dt, true, "dv");
}

TEST(CudnnAttention, MatchesCpuAcrossHeadDimsMasksGroupsAndDtypes) {
  FTUNE_REQUIRE_CUDNN();
  for (int64_t d : {64, 128})
    for (bool causal : {true, false})
      for (int64_t hkv : {2, 8})  // grouped-query (8 over 2) and plain multi-head
        for (DType dt : {DType::bf16, DType::f16}) {
          Case c;
          c.d = d;
          c.causal = causal;
          c.hkv = hkv;
          check_case(c, dt);
        }
}

TEST(CudnnAttention, OddAndEdgeSequenceLengths) {
  FTUNE_REQUIRE_CUDNN();
  // 129 and 300 (no multiple of 64 or 128), B = 1 (lse needs no conversion) and B = 3; a
  // non-causal Tq != Tk. Tk not a multiple of 128 is refused (before the forward) on cuDNN <= 9.15.
  for (auto [b, tq, tk, causal] : std::vector<std::tuple<int64_t, int64_t, int64_t, bool>>{
           {3, 129, 129, true}, {1, 300, 300, true}, {2, 33, 200, false}}) {
    Case c;
    c.b = b;
    c.tq = tq;
    c.tk = tk;
    c.causal = causal;
    const std::string why =
        kernels::cuda::cudnn_attention_unsupported(c.params(), c.seqs(), DType::bf16);
    if (why.find("not a multiple of 128 with cuDNN") != std::string::npos) continue;  // <= 9.15
    check_case(c, DType::bf16, 7);
  }
  // T = 1: cuDNN's SDPA graphs refuse it, so the op must know before the forward.
  Case one;
  one.b = 1;
  one.tq = one.tk = 1;
  EXPECT_NE(kernels::cuda::cudnn_attention_unsupported(one.params(), one.seqs(), DType::bf16)
                .find("Tq = Tk = 1"),
            std::string::npos);
}

TEST(CudnnAttention, RepeatedCallIsBitwiseTheSameForward) {
  FTUNE_REQUIRE_CUDNN();
  Case c;
  c.tq = c.tk = 256;
  Inputs in = make_inputs(c, DType::bf16, 3);
  Result a = run_cudnn(c, in, DType::bf16), b = run_cudnn(c, in, DType::bf16);  // cached plan
  EXPECT_EQ(a.out.to_vector<float>(), b.out.to_vector<float>());
  EXPECT_EQ(a.lse.to_vector<float>(), b.lse.to_vector<float>());
}

TEST(CudnnAttention, RefusesWhatItDoesNotServeByName) {
  FTUNE_REQUIRE_CUDNN();
  auto why = [](Case c, DType dt, std::vector<AttnSeq> seqs = {}) {
    return kernels::cuda::cudnn_attention_unsupported(c.params(), seqs.empty() ? c.seqs() : seqs,
                                                      dt);
  };
  Case c;
  EXPECT_NE(why(c, DType::f32).find("dtype f32"), std::string::npos);
  Case d80 = c;
  d80.d = 80 + 4;
  EXPECT_NE(why(d80, DType::bf16).find("head_dim"), std::string::npos);
  Case cross = c;
  cross.tq = 10;
  cross.tk = 20;
  EXPECT_NE(why(cross, DType::bf16).find("causal"), std::string::npos);
  // Packed sequences of different lengths (nq = nk = 154 = 77 + 77 -> split 50 + 104).
  EXPECT_NE(why(c, DType::bf16, {{0, 50, 0, 50}, {50, 104, 50, 104}}).find("variable-length"),
            std::string::npos);
  // The kernel entry point throws an ftune::Error naming the reason.
  Tensor q = Tensor::empty({c.b * c.tq, c.h, c.d}, DType::f32, Device::cuda(0));
  try {
    kernels::cuda::cudnn_attention_forward(c.params(), c.seqs(), DType::f32, q.raw_data(),
                                           q.raw_data(), q.raw_data(), q.raw_data(), nullptr);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[attention:cudnn]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("dtype f32"), std::string::npos) << e.what();
  }
}

// The op with the backend set: batched (cuDNN) and packed varlen (falls back to ftune's kernel),
// bf16, through autograd, against the op on the CPU in f32.
TEST(CudnnAttention, OpWithBackendCudnnThroughAutograd) {
  FTUNE_REQUIRE_CUDNN();
  ops::set_attention_backend("cudnn");
  struct Reset {
    ~Reset() { ops::set_attention_backend("ftune"); }
  } reset;
  Generator gen(11);
  const int64_t B = 2, T = 128, H = 8, Hkv = 2, D = 128;
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed (ftune fallback)" : "batched (cuDNN)");
    Tensor q = rand_host({B, T, H, D}, gen, DType::bf16);
    Tensor k = rand_host({B, T, Hkv, D}, gen, DType::bf16);
    Tensor v = rand_host({B, T, Hkv, D}, gen, DType::bf16);
    Tensor w = rand_host({B, T, H, D}, gen, DType::bf16);
    ops::AttentionOptions o;
    if (packed) {
      o.cu_seqlens_q = o.cu_seqlens_k = Tensor::from_vector(std::vector<int32_t>{0, 100, 256}, {3});
      q = q.reshape({B * T, H, D});
      k = k.reshape({B * T, Hkv, D});
      v = v.reshape({B * T, Hkv, D});
      w = w.reshape({B * T, H, D});
    }
    if (!packed) {  // cuDNN must really serve the batched call (not a silent fallback)
      AttnParams p;
      p.num_heads = H;
      p.num_kv_heads = Hkv;
      p.head_dim = D;
      p.nq = p.nk = B * T;
      p.causal = o.causal;
      p.scale = 1.0 / std::sqrt(double(D));
      std::vector<AttnSeq> seqs = {{0, T, 0, T}, {T, T, T, T}};
      ASSERT_EQ(kernels::cuda::cudnn_attention_unsupported(p, seqs, DType::bf16), "");
    }
    Tensor qc = q.detach(), kc = k.detach(), vc = v.detach();
    for (Tensor* t : {&qc, &kc, &vc}) t->set_requires_grad(true);
    Tensor ref = ops::attention(qc, kc, vc, o);
    ref.backward(w);
    Tensor qg = to_gpu(q, DType::bf16), kg = to_gpu(k, DType::bf16), vg = to_gpu(v, DType::bf16);
    for (Tensor* t : {&qg, &kg, &vg}) t->set_requires_grad(true);
    Tensor out = ops::attention(qg, kg, vg, o);
    out.backward(to_gpu(w, DType::bf16));
    expect_close(to_host(out), ref, DType::bf16, false, "out");
    expect_close(to_host(qg.grad()), qc.grad(), DType::bf16, true, "dq");
    expect_close(to_host(kg.grad()), kc.grad(), DType::bf16, true, "dk");
    expect_close(to_host(vg.grad()), vc.grad(), DType::bf16, true, "dv");
  }
}

}  // namespace
}  // namespace ftune::test
