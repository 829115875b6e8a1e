// Targeted tests of the attention op and its CPU kernel: input checks, tile-size and thread-count
// invariance, isolation of packed sequences, and that memory grows linearly in T (never [T, T]).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>

#include "core/allocator.h"
#include "core/ops.h"
#include "core/rng.h"
#include "kernels/attention.h"

using namespace ftune;

namespace {

Tensor cu(std::vector<int32_t> v) { return Tensor::from_vector(v, {int64_t(v.size())}); }

// Expects fn to throw an ftune::Error whose message contains every string in parts.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown (expected: " << parts[0] << ")";
  } catch (const Error& e) {
    for (const auto& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

ops::AttentionOptions varlen_opts(std::vector<int32_t> q, std::vector<int32_t> k,
                                  bool causal = true) {
  ops::AttentionOptions o;
  o.causal = causal;
  o.cu_seqlens_q = cu(std::move(q));
  o.cu_seqlens_k = cu(std::move(k));
  return o;
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

struct KernelResult {
  std::vector<double> out, lse, dq, dk, dv;
};

// Runs the f64 kernel directly with the given tile sizes on packed q [Nq, H, D], k/v [Nk, Hkv, D].
KernelResult run_kernel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                        const std::vector<kernels::cpu::AttnSeq>& seqs, bool causal, int64_t bq,
                        int64_t bk) {
  kernels::cpu::AttnParams p;
  p.num_heads = q.size(1);
  p.num_kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.nq = q.size(0);
  p.nk = k.size(0);
  p.scale = 0.37;
  p.causal = causal;
  p.block_q = bq;
  p.block_k = bk;
  Tensor out = Tensor::empty(q.shape(), DType::f64),
         lse = Tensor::empty({p.num_heads, p.nq}, DType::f64);
  Tensor dq = Tensor::empty(q.shape(), DType::f64), dk = Tensor::empty(k.shape(), DType::f64),
         dv = Tensor::empty(k.shape(), DType::f64);
  kernels::cpu::attention_forward<double>(p, seqs, q.data<double>(), k.data<double>(),
                                          v.data<double>(), out.data<double>(), lse.data<double>());
  kernels::cpu::attention_backward<double>(p, seqs, q.data<double>(), k.data<double>(),
                                           v.data<double>(), out.data<double>(), lse.data<double>(),
                                           dout.data<double>(), dq.data<double>(),
                                           dk.data<double>(), dv.data<double>());
  return {out.to_vector<double>(), lse.to_vector<double>(), dq.to_vector<double>(),
          dk.to_vector<double>(), dv.to_vector<double>()};
}

}  // namespace

TEST(Attention, BadInputsThrowNamingTheOp) {
  Tensor q = Tensor::zeros({2, 5, 4, 8}), k = Tensor::zeros({2, 5, 2, 8});
  expect_error([&] { ops::attention(q.view({10, 4, 8}), k, k); }, {"[attention]", "[10, 4, 8]"});
  expect_error(
      [&] {
        ops::attention(q, Tensor::zeros({2, 5, 3, 8}), Tensor::zeros({2, 5, 3, 8}));
      },
      {"[attention]", "kv heads (3)"});
  expect_error(
      [&] {
        ops::attention(q, Tensor::zeros({2, 5, 2, 6}), Tensor::zeros({2, 5, 2, 6}));
      },
      {"[attention]", "head_dim", "[2, 5, 2, 6]"});
  expect_error(
      [&] {
        ops::attention(q, k, Tensor::zeros({2, 6, 2, 8}));
      },
      {"[attention]", "v ", "[2, 6, 2, 8]"});
  expect_error(
      [&] {
        ops::attention(q, Tensor::zeros({3, 5, 2, 8}), Tensor::zeros({3, 5, 2, 8}));
      },
      {"[attention]", "same B", "[3, 5, 2, 8]"});
  expect_error([&] { ops::attention(q, k.to(DType::f64), k.to(DType::f64)); },
               {"[attention]", "dtype", "f64"});
  expect_error([&] { ops::attention(q.to(DType::i32), k.to(DType::i32), k.to(DType::i32)); },
               {"[attention]", "i32"});
  expect_error([&] { ops::attention(q, k, Tensor()); }, {"[attention]", "v is undefined"});
  ops::AttentionOptions bad_scale;
  bad_scale.scale = NAN;
  expect_error([&] { ops::attention(q, k, k, bad_scale); }, {"[attention]", "scale"});
}

TEST(Attention, BadCuSeqlensThrow) {
  Tensor q = Tensor::zeros({1, 12, 2, 4}), k = Tensor::zeros({1, 12, 1, 4});
  auto run = [&](ops::AttentionOptions o) { return [=] { ops::attention(q, k, k, o); }; };
  ops::AttentionOptions only_q;
  only_q.cu_seqlens_q = cu({0, 12});
  expect_error(run(only_q), {"[attention]", "given together"});
  ops::AttentionOptions wrong_dtype = varlen_opts({0, 12}, {0, 12});
  wrong_dtype.cu_seqlens_q = Tensor::from_vector(std::vector<int64_t>{0, 12}, {2});
  expect_error(run(wrong_dtype), {"[attention]", "cu_seqlens_q must be i32", "i64"});
  expect_error(run(varlen_opts({1, 12}, {0, 12})), {"[attention]", "cu_seqlens_q[0] must be 0"});
  expect_error(run(varlen_opts({0, 7, 5, 12}, {0, 3, 8, 12})),
               {"[attention]", "non-decreasing", "7 then 5"});
  expect_error(run(varlen_opts({0, 3, 10}, {0, 3, 12})),
               {"[attention]", "cu_seqlens_q ends at 10", "12 tokens"});
  expect_error(run(varlen_opts({0, 3, 12}, {0, 3, 11})),
               {"[attention]", "cu_seqlens_k ends at 11"});
  expect_error(run(varlen_opts({0, 3, 12}, {0, 12})), {"[attention]", "same number of sequences"});
  expect_error(run(varlen_opts({0}, {0})), {"[attention]", "at least 2 entries"});
  // Packed inputs have one batch row.
  Tensor q2 = Tensor::zeros({2, 6, 2, 4}), k2 = Tensor::zeros({2, 6, 1, 4});
  expect_error(
      [&] {
        ops::attention(q2, k2, k2, varlen_opts({0, 12}, {0, 12}));
      },
      {"[attention]", "[1, N, heads, head_dim]", "[2, 6, 2, 4]"});
}

// The tile sizes only change the order of floating-point sums: results agree to rounding for
// tiles of one row/column, ragged tiles, and tiles bigger than any sequence.
TEST(Attention, KernelResultDoesNotDependOnTileSizes) {
  Generator g(3);
  // Packed GQA with a KV cache, an empty sequence, one with len_q > len_k, and long ones.
  std::vector<kernels::cpu::AttnSeq> seqs = {
      {0, 37, 0, 50}, {37, 0, 50, 4}, {37, 9, 54, 5}, {46, 70, 59, 70}};
  const int64_t nq = 116, nk = 129, H = 6, Hkv = 2, D = 9;
  Tensor q = randn({nq, H, D}, g, 0, 1, DType::f64), k = randn({nk, Hkv, D}, g, 0, 1, DType::f64);
  Tensor v = randn({nk, Hkv, D}, g, 0, 1, DType::f64),
         dout = randn({nq, H, D}, g, 0, 1, DType::f64);
  for (bool causal : {true, false}) {
    KernelResult ref = run_kernel(q, k, v, dout, seqs, causal, 64, 128);
    for (auto [bq, bk] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 7}, {8, 16}, {32, 32}, {256, 256}}) {
      KernelResult r = run_kernel(q, k, v, dout, seqs, causal, bq, bk);
      SCOPED_TRACE(testing::Message() << "causal " << causal << " tiles " << bq << "x" << bk);
      EXPECT_LT(max_diff(r.out, ref.out), 1e-12);
      EXPECT_EQ(r.lse.size(), ref.lse.size());
      for (size_t i = 0; i < r.lse.size(); ++i)
        if (std::isinf(ref.lse[i]))
          EXPECT_EQ(r.lse[i], ref.lse[i]);
        else
          EXPECT_NEAR(r.lse[i], ref.lse[i], 1e-12);
      EXPECT_LT(max_diff(r.dq, ref.dq), 1e-12);
      EXPECT_LT(max_diff(r.dk, ref.dk), 1e-12);
      EXPECT_LT(max_diff(r.dv, ref.dv), 1e-12);
    }
    if (causal) {  // sequence 2 has len_q 9 > len_k 5: its first 4 queries see nothing
      for (int64_t h = 0; h < H; ++h)
        for (int64_t r = 0; r < 9; ++r)
          EXPECT_EQ(std::isinf(ref.lse[h * nq + 37 + r]), r < 4) << h << " " << r;
      for (int64_t i = 37 * H * D; i < (37 + 4) * H * D; ++i) {
        EXPECT_EQ(ref.out[i], 0.0);
        EXPECT_EQ(ref.dq[i], 0.0);
      }
    }
  }
}

// The backward splits grouped query heads over tasks depending on the thread count: every split
// must give the same gradients.
TEST(Attention, ThreadCountDoesNotChangeResults) {
  Generator g(5);
  // Big enough (B * T^2 * H * D = 4.3M multiply-adds) that the kernels run a parallel region.
  Tensor q = randn({2, 130, 8, 16}, g, 0, 1, DType::f64),
         k = randn({2, 130, 2, 16}, g, 0, 1, DType::f64);
  Tensor v = randn({2, 130, 2, 16}, g, 0, 1, DType::f64),
         w = randn({2, 130, 8, 16}, g, 0, 1, DType::f64);
  const int saved = omp_get_max_threads();
  std::vector<std::vector<double>> first;
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    Tensor qg = q.clone().set_requires_grad(true), kg = k.clone().set_requires_grad(true),
           vg = v.clone().set_requires_grad(true);
    Tensor out = ops::attention(qg, kg, vg);
    out.backward(w);
    std::vector<std::vector<double>> got = {out.to_vector<double>(), qg.grad().to_vector<double>(),
                                            kg.grad().to_vector<double>(),
                                            vg.grad().to_vector<double>()};
    if (first.empty()) first = got;
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_LT(max_diff(got[i], first[i]), 1e-12) << threads << " " << i;
  }
  omp_set_num_threads(saved);
}

// Padding as its own sequence: real tokens give what they give alone, whatever the pad holds.
TEST(Attention, PackedSequencesDoNotLeak) {
  Generator g(11);
  Tensor q = randn({8, 2, 4}, g), k = randn({8, 1, 4}, g), v = randn({8, 1, 4}, g);
  Tensor packed = ops::attention(q, k, v, varlen_opts({0, 5, 8}, {0, 5, 8}));
  Tensor alone = ops::attention(q.slice(0, 0, 5).unsqueeze(0), k.slice(0, 0, 5).unsqueeze(0),
                                v.slice(0, 0, 5).unsqueeze(0));
  auto a = packed.slice(0, 0, 5).contiguous().to_vector<double>(), b = alone.to_vector<double>();
  EXPECT_LT(max_diff(a, b), 1e-6);
  Tensor k2 = k.clone(), v2 = v.clone();
  k2.slice(0, 5, 8).fill_(100.0);
  v2.slice(0, 5, 8).fill_(-100.0);
  Tensor repacked = ops::attention(q, k2, v2, varlen_opts({0, 5, 8}, {0, 5, 8}));
  EXPECT_EQ(repacked.slice(0, 0, 5).contiguous().to_vector<double>(), a);
}

TEST(Attention, StridedInputsAndPartialGradients) {
  Generator g(13);
  // [B, H, T, D] transposed to [B, T, H, D]: a non-contiguous view.
  Tensor qh = randn({2, 4, 17, 8}, g, 0, 1, DType::f64),
         kh = randn({2, 2, 17, 8}, g, 0, 1, DType::f64);
  Tensor vh = randn({2, 2, 17, 8}, g, 0, 1, DType::f64);
  Tensor qs = qh.transpose(1, 2), ks = kh.transpose(1, 2), vs = vh.transpose(1, 2);
  ASSERT_FALSE(qs.is_contiguous());
  Tensor a = ops::attention(qs, ks, vs),
         b = ops::attention(qs.contiguous(), ks.contiguous(), vs.contiguous());
  EXPECT_EQ(a.to_vector<double>(), b.to_vector<double>());
  // Only k requires grad: q and v get none, k's matches the full backward.
  Tensor kg = ks.contiguous().set_requires_grad(true);
  ops::attention(qs, kg, vs).backward(Tensor::ones({2, 17, 4, 8}, DType::f64));
  Tensor qa = qs.contiguous().set_requires_grad(true), ka = ks.contiguous().set_requires_grad(true),
         va = vs.contiguous().set_requires_grad(true);
  ops::attention(qa, ka, va).backward(Tensor::ones({2, 17, 4, 8}, DType::f64));
  EXPECT_LT(max_diff(kg.grad().to_vector<double>(), ka.grad().to_vector<double>()), 1e-14);
}

// f32 (approximate exp, f32 accumulation) stays close to f64 on long rows.
TEST(Attention, Float32MatchesFloat64OnLongSequences) {
  Generator g(17);
  Tensor q = randn({1, 600, 2, 64}, g, 0, 1, DType::f64),
         k = randn({1, 600, 2, 64}, g, 0, 1, DType::f64);
  Tensor v = randn({1, 600, 2, 64}, g, 0, 1, DType::f64),
         w = randn({1, 600, 2, 64}, g, 0, 1, DType::f64);
  std::vector<std::vector<double>> res[2];
  for (int i = 0; i < 2; ++i) {
    DType dt = i == 0 ? DType::f64 : DType::f32;
    Tensor qg = q.to(dt).detach().set_requires_grad(true),
           kg = k.to(dt).detach().set_requires_grad(true),
           vg = v.to(dt).detach().set_requires_grad(true);
    Tensor out = ops::attention(qg, kg, vg);
    out.backward(w.to(dt));
    res[i] = {out.to_vector<double>(), qg.grad().to_vector<double>(), kg.grad().to_vector<double>(),
              vg.grad().to_vector<double>()};
  }
  for (size_t t = 0; t < 4; ++t) EXPECT_LT(max_diff(res[0][t], res[1][t]), 2e-5) << "tensor " << t;
}

namespace {

// Peak bytes the tracked CPU allocator hands out while fn runs, above what was live before. The
// peak counter is process-wide and never resets, so a ballast block first lifts the live bytes
// up to the old peak: from there every byte fn allocates raises the peak.
int64_t peak_growth(const std::function<void()>& fn) {
  AllocatorStats s0 = cpu_allocator_stats();
  Tensor ballast =
      Tensor::empty({std::max<int64_t>(s0.peak_bytes - s0.current_bytes, 0) / 4 + 1}, DType::f32);
  const int64_t base = cpu_allocator_stats().current_bytes;
  fn();
  return cpu_allocator_stats().peak_bytes - base;
}

int64_t attention_peak(int64_t T) {
  Generator g(1);
  Tensor q = randn({1, T, 1, 8}, g).set_requires_grad(true),
         k = randn({1, T, 1, 8}, g).set_requires_grad(true);
  Tensor v = randn({1, T, 1, 8}, g).set_requires_grad(true), w = randn({1, T, 1, 8}, g);
  return peak_growth([&] { ops::attention(q, k, v).backward(w); });
}

}  // namespace

TEST(Attention, MemoryGrowsLinearlyInT) {
  // The per-thread tile scratch is O(threads), not O(T): fix the team so the bound below holds
  // on any machine.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  const int64_t p2 = attention_peak(2048), p4 = attention_peak(4096), p8 = attention_peak(8192);
  const int64_t scores_4096 = int64_t(4096) * 4096 * 4;  // one f32 [T, T] matrix: 64 MiB
  RecordProperty("peak_bytes_t4096", std::to_string(p4));
  EXPECT_GT(p4, 0);
  EXPECT_LT(p4, scores_4096 / 16) << "forward+backward at T=4096 peaked at " << p4 << " bytes";
  // Allocation sizes are deterministic: a + b*T gives exactly 2 for this ratio, a [T, T] term 4.
  const double ratio = double(p8 - p4) / double(p4 - p2);
  EXPECT_NEAR(ratio, 2.0, 0.2) << "peaks " << p2 << ", " << p4 << ", " << p8;
  omp_set_num_threads(saved);
}
