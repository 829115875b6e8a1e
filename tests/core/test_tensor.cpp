#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/allocator.h"
#include "core/ops.h"
#include "core/rng.h"

using namespace ftune;

TEST(Tensor, FactoriesAndItem) {
  Tensor z = Tensor::zeros({2, 3});
  EXPECT_EQ(z.numel(), 6);
  EXPECT_EQ(z.dtype(), DType::f32);
  Tensor f = Tensor::full({2}, 2.5, DType::f64);
  EXPECT_DOUBLE_EQ(f.to_vector<double>()[1], 2.5);
  EXPECT_DOUBLE_EQ(Tensor::scalar(3.0).item(), 3.0);
  auto a = Tensor::arange(5).to_vector<int64_t>();
  EXPECT_EQ(a, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(Tensor, AllDtypesRoundTrip) {
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::b8}) {
    Tensor t = Tensor::from_vector(std::vector<double>{0, 1, 2, -3}, {4}).to(dt);
    EXPECT_EQ(t.dtype(), dt);
    auto v = t.to_vector<double>();
    if (dt == DType::b8)
      EXPECT_EQ(v, (std::vector<double>{0, 1, 1, 1}));
    else
      EXPECT_EQ(v, (std::vector<double>{0, 1, 2, -3})) << dtype_name(dt);
  }
}

TEST(Tensor, HalfConversionsRound) {
  // bf16 keeps 8 bits of mantissa; 1 + 2^-9 rounds to even (1.0), 1 + 3*2^-9 rounds up.
  EXPECT_EQ(float(bf16(1.0f + 1.0f / 512)), 1.0f);
  EXPECT_EQ(float(bf16(1.0f + 3.0f / 512)), 1.0f + 1.0f / 128);
  EXPECT_EQ(float(f16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(float(f16(1e6f))));
  EXPECT_EQ(float(f16(5.960464477539063e-08f)), 5.960464477539063e-08f);  // smallest subnormal
  EXPECT_EQ(float(f16(0.1f)), 0.0999755859375f);
  EXPECT_TRUE(std::isnan(float(bf16(NAN))));
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor tt = t.transpose(0, 1);
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.shape(), (Shape{3, 2}));
  EXPECT_EQ(tt.contiguous().to_vector<float>(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  Tensor s = t.slice(1, 1, 3);
  EXPECT_EQ(s.contiguous().to_vector<float>(), (std::vector<float>{1, 2, 4, 5}));
  s.fill_(9);
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{0, 9, 9, 3, 9, 9}));
  EXPECT_EQ(t.view({3, 2}).shape(), (Shape{3, 2}));
  EXPECT_EQ(t.view({-1}).shape(), (Shape{6}));
  EXPECT_THROW(tt.view({6}), Error);  // transposed: not viewable
  EXPECT_EQ(tt.reshape({6}).to_vector<float>(), (std::vector<float>{0, 3, 9, 9, 9, 9}));
  Tensor e = Tensor::from_vector(std::vector<float>{1, 2}, {2, 1}).expand({2, 3});
  EXPECT_EQ(e.contiguous().to_vector<float>(), (std::vector<float>{1, 1, 1, 2, 2, 2}));
  EXPECT_EQ(t.unsqueeze(0).shape(), (Shape{1, 2, 3}));
  EXPECT_EQ(t.unsqueeze(0).squeeze(0).shape(), (Shape{2, 3}));
  EXPECT_EQ(t.permute({1, 0}).shape(), (Shape{3, 2}));
}

TEST(Tensor, BadInputThrowsNamingOpShapesAndDtypes) {
  Tensor a = Tensor::zeros({2, 3});
  Tensor b = Tensor::zeros({4, 5});
  try {
    ops::matmul(a, b);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("[matmul]"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
    EXPECT_NE(m.find("f32"), std::string::npos) << m;
  }
  Tensor c = Tensor::zeros({2, 3}, DType::f64);
  try {
    ops::add(a, c);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("[add]"), std::string::npos) << m;
    EXPECT_NE(m.find("f64"), std::string::npos) << m;
  }
  EXPECT_THROW(ops::add(a, b), Error);  // no broadcast
  EXPECT_THROW(ops::exp(Tensor::zeros({2}, DType::i32)), Error);
  EXPECT_THROW(ops::exp(Tensor::zeros({2}, DType::bf16)), Error);  // CPU computes in f32/f64
  EXPECT_THROW(a.view({7}), Error);
  EXPECT_THROW(a.size(3), Error);
  EXPECT_THROW(Tensor::zeros({-1}), Error);
  EXPECT_THROW(a.data<double>(), Error);
}

TEST(Tensor, CudaTensorsThrowOrWorkClearly) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: tests/cuda covers device tensors";
  try {
    Tensor::zeros({2}, DType::f32, Device::cuda(0));
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GPU"), std::string::npos) << e.what();
  }
}

TEST(Rng, CounterBasedAndReproducible) {
  Generator g1(42), g2(42), g3(43);
  Tensor a = randn({1000}, g1), b = randn({1000}, g2), c = randn({1000}, g3);
  EXPECT_EQ(a.to_vector<float>(), b.to_vector<float>());
  EXPECT_NE(a.to_vector<float>(), c.to_vector<float>());
  // The same numbers in f64 and f32 (f32 is a rounding of f64), and independent of draw sizes:
  // value i of a draw depends only on (seed, offset + i).
  Generator g4(42);
  Tensor d = randn({1000}, g4, 0, 1, DType::f64);
  auto va = a.to_vector<double>(), vd = d.to_vector<double>();
  for (int i = 0; i < 1000; ++i) EXPECT_NEAR(va[i], vd[i], 1e-6);
  // Moments.
  double m = 0, s2 = 0;
  Generator g5(1);
  auto big = randn({200000}, g5, 0, 1, DType::f64).to_vector<double>();
  for (double x : big) m += x;
  m /= double(big.size());
  for (double x : big) s2 += (x - m) * (x - m);
  s2 /= double(big.size());
  EXPECT_NEAR(m, 0.0, 0.01);
  EXPECT_NEAR(s2, 1.0, 0.02);
  auto u = rand({100000}, g5, 2.0, 3.0, DType::f64).to_vector<double>();
  double mn = 10, mx = -10, um = 0;
  for (double x : u) mn = std::min(mn, x), mx = std::max(mx, x), um += x;
  EXPECT_GE(mn, 2.0);
  EXPECT_LT(mx, 3.0);
  EXPECT_NEAR(um / 1e5, 2.5, 0.01);
  auto ri = randint({10000}, g5, 3, 7).to_vector<int64_t>();
  for (auto x : ri) EXPECT_TRUE(x >= 3 && x < 7);
}

TEST(Rng, GeneratorStateResumes) {
  Generator g(5);
  randn({10}, g);
  uint64_t off = g.offset();
  Tensor next = randn({10}, g);
  Generator h(0);
  h.set_state(5, off);
  EXPECT_EQ(randn({10}, h).to_vector<float>(), next.to_vector<float>());
}

TEST(Allocator, HostCacheReusesLargeBlocksAndCountsBytes) {
  auto s0 = cpu_allocator_stats();
  void* first = nullptr;
  {
    Tensor a = Tensor::empty({1 << 20});  // 4 MiB: cached on release
    first = a.raw_data();
    EXPECT_EQ(cpu_allocator_stats().current_bytes - s0.current_bytes, int64_t(4) << 20);
  }
  EXPECT_EQ(cpu_allocator_stats().current_bytes, s0.current_bytes);
  Tensor b = Tensor::empty({(1 << 20) - 7});  // same size class
  EXPECT_EQ(b.raw_data(), first);
  EXPECT_GT(cpu_allocator_stats().cache_hits, s0.cache_hits);
  b = Tensor();
  EXPECT_GE(cpu_allocator_stats().reserved_bytes - cpu_allocator_stats().current_bytes, int64_t(4) << 20);
  cpu_empty_cache();
  EXPECT_EQ(cpu_allocator_stats().reserved_bytes, cpu_allocator_stats().current_bytes);
  // Alignment holds for small and cached blocks alike.
  for (int64_t n : {1, 3, 1000, 70000, 1 << 18}) {
    Tensor t = Tensor::empty({n});
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u) << n;
  }
}

TEST(Tensor, HugeOrNegativeShapesThrow) {
  EXPECT_THROW(Tensor::empty({int64_t(1) << 33, int64_t(1) << 33}), Error);  // numel overflows
  EXPECT_THROW(Tensor::empty({int64_t(1) << 31, int64_t(1) << 31}, DType::f64), Error);  // bytes overflow
  Tensor t = Tensor::zeros({2, 3});
  EXPECT_THROW(t.view({-2, -3}), Error);
  EXPECT_THROW(t.expand({-2, 3}), Error);
  EXPECT_EQ(t.expand({4, -1, -1}).shape(), (Shape{4, 2, 3}));  // -1 keeps the size, as in torch
}

TEST(Tensor, UndefinedTensorsThrowInsteadOfCrashing) {
  Tensor u;
  EXPECT_THROW(u.shape(), Error);
  EXPECT_THROW(u.squeeze(0), Error);
  EXPECT_THROW(ops::amax(u, 0), Error);
  EXPECT_THROW(ops::mean(u), Error);
  EXPECT_THROW(ops::cat({u}, 0), Error);
  Tensor a = Tensor::zeros({2});
  EXPECT_THROW(ops::add_(a, u), Error);
  EXPECT_THROW(ops::where_mask(u, a, 0.0), Error);
}

TEST(Tensor, ReductionEdgeCases) {
  EXPECT_THROW(ops::argmax(Tensor::zeros({3, 0}), 1), Error);
  Tensor x = Tensor::from_vector(std::vector<float>{1.0f, NAN, 5.0f}, {1, 3});
  EXPECT_TRUE(std::isnan(ops::amax(x, 1).item()));  // NaN propagates, as in torch.amax
  EXPECT_EQ(ops::argmax(x, 1).to_vector<int64_t>()[0], 1);
  auto big = Tensor::arange(20000000, DType::i64).to_vector<int64_t>();
  EXPECT_EQ(big[16777217], 16777217);  // integers past 2^24 stay exact
}

TEST(Tensor, LinearWithEmptyInnerDimIsBiasOnly) {
  Tensor x = Tensor::zeros({3, 0});
  Tensor w = Tensor::zeros({2, 0});
  Tensor b = Tensor::from_vector(std::vector<float>{1.5f, -2.0f}, {2});
  EXPECT_EQ(ops::linear(x, w, b).to_vector<float>(), (std::vector<float>{1.5f, -2.0f, 1.5f, -2.0f, 1.5f, -2.0f}));
  EXPECT_EQ(ops::linear(x, w).to_vector<float>(), std::vector<float>(6, 0.0f));
  Tensor a = Tensor::zeros({1, 0});
  Tensor bb = Tensor::zeros({2, 1});
  EXPECT_EQ(ops::lora_linear(x, w, b, a, bb, 2.0).to_vector<float>(),
            (std::vector<float>{1.5f, -2.0f, 1.5f, -2.0f, 1.5f, -2.0f}));
}

// ops::add_ into a strided destination (a slice along a middle or last dim): the same axpy as on
// a contiguous tensor, written back through the strides; the rest of the wider tensor untouched,
// the storage's version bumped. A view that repeats elements (expand) is refused.
TEST(Tensor, AddInPlaceIntoAStridedView) {
  Generator g(21);
  Tensor wide = randn({4, 7}, g);
  const std::vector<float> before = wide.to_vector<float>();
  Tensor b = randn({4, 3}, g);
  Tensor r = wide.slice(1, 2, 5);
  ASSERT_FALSE(r.is_contiguous());
  Tensor want = r.contiguous();
  ops::add_(want, b, 0.3);  // the contiguous path (axpy)
  const uint64_t v0 = wide.impl()->storage->version;
  ops::add_(r, b, 0.3);
  EXPECT_GT(wide.impl()->storage->version, v0);
  const std::vector<float> got = wide.to_vector<float>(), w = want.to_vector<float>();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < 7; ++j) {
      const float expect = j >= 2 && j < 5 ? w[size_t(i * 3 + j - 2)] : before[size_t(i * 7 + j)];
      EXPECT_EQ(got[size_t(i * 7 + j)], expect) << i << "," << j;
    }
  Tensor e = Tensor::zeros({3}).expand({2, 3});
  EXPECT_THROW(ops::add_(e, Tensor::ones({2, 3})), Error);
}

namespace ftune {
namespace {

// The GPU allocator's out-of-memory error (it cannot be provoked without a GPU): the sizes in
// GiB, the device's free and total when known, and the recipe keys that lower the peak.
TEST(Allocator, OutOfMemoryMessageSaysWhatAndHowToFit) {
  AllocatorStats st;
  st.current_bytes = int64_t(10) << 30;
  st.peak_bytes = int64_t(12) << 30;
  const std::string m = cuda_oom_message(size_t(3) << 29, 1, st, int64_t(1) << 29, int64_t(80) << 30);
  for (const char* want : {"out of GPU memory on cuda:1", "asked for 1.50 GiB", "10.00 GiB held",
                           "peak 12.00 GiB", "80.00 GiB (512.0 MiB free)",
                           "enable_activation_checkpointing: true", "batch_size",
                           "gradient_accumulation_steps", "max_seq_len", "parallel.zero: 1"})
    EXPECT_NE(m.find(want), std::string::npos) << want << " not in: " << m;
  const std::string unknown = cuda_oom_message(size_t(3) << 20, 0, st, -1, -1);
  EXPECT_EQ(unknown.find("device's"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("asked for 3.0 MiB"), std::string::npos) << unknown;
}

}  // namespace
}  // namespace ftune
