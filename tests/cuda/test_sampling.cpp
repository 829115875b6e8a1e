// CUDA sampling kernel (kernels/sampling.h) against the CPU twin on the same rounded logits and the
// same Philox uniforms: the tokens must be EQUAL (the weights are f64 on both sides, so they differ
// only if u * total lands within f64 rounding of a cumulative sum). Greedy = argmax with the first
// maximum, top_k = 1, top_p with tokens tied at the boundary, bf16 ties, rejected rows' codes.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "kernels/sampling.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

using kernels::SampleParams;

// Draws with the GPU for rows of host f32 logits (values representable in dt) and compares every
// row with the CPU twin at the same (seed, stream, step).
void expect_same_tokens(const std::vector<float>& host, int64_t b, int64_t v, DType dt,
                        const SampleParams& p, uint64_t seed, uint64_t step,
                        const std::vector<uint64_t>& streams) {
  Tensor x = to_gpu(Tensor::from_vector(host, {b, v}), dt);
  Tensor st;
  if (!streams.empty())
    st = Tensor::from_vector(std::vector<int64_t>(streams.begin(), streams.end()), {b})
             .to(Device::cuda(0));
  Tensor out = Tensor::empty({b}, DType::i32, Device::cuda(0));
  kernels::cuda::sample_tokens(x.raw_data(), dt, b, v, p, seed, step,
                               st.defined() ? static_cast<const uint64_t*>(st.raw_data()) : nullptr,
                               out.data<int32_t>());
  std::vector<int32_t> got = out.to(Device::cpu()).to_vector<int32_t>();
  for (int64_t r = 0; r < b; ++r) {
    const uint64_t stream = streams.empty() ? uint64_t(r) : streams[size_t(r)];
    const float u = philox_uniform(seed, stream, step);
    const int32_t want = kernels::cpu::sample_row(host.data() + r * v, v, p, u);
    ASSERT_EQ(got[size_t(r)], want) << "row " << r << " " << dtype_name(dt) << " V " << v << " T "
                                    << p.temperature << " k " << p.top_k << " p " << p.top_p
                                    << " seed " << seed << " step " << step;
  }
}

std::vector<float> logits(int64_t b, int64_t v, DType dt, double scale, uint64_t seed) {
  Generator g(seed);
  return rand_host({b * v}, g, dt, scale).to_vector<float>();
}

TEST(CudaSampling, GreedyIsArgmaxFirstMaximum) {
  FTUNE_REQUIRE_GPU();
  uint64_t seed = 1;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int64_t v : {1000, 32003, 128256}) {
      const int64_t b = 5;
      std::vector<float> h = logits(b, v, dt, 2.0, ++seed);
      // row 1: the maximum twice (the lower id wins); row 2: every logit equal
      h[size_t(v + 17)] = 50.f;
      h[size_t(v + v - 3)] = 50.f;
      for (int64_t j = 0; j < v; ++j) h[size_t(2 * v + j)] = 0.5f;
      expect_same_tokens(h, b, v, dt, SampleParams{0.0, 0, 1.0}, 3, 0, {});
      // the CPU twin agrees with the plain definition
      EXPECT_EQ(kernels::cpu::argmax(h.data() + v, v), 17);
      EXPECT_EQ(kernels::cpu::argmax(h.data() + 2 * v, v), 0);
      // greedy ignores top_k / top_p
      expect_same_tokens(h, b, v, dt, SampleParams{0.0, 5, 0.3}, 3, 0, {});
    }
}

TEST(CudaSampling, TopK1IsArgmax) {
  FTUNE_REQUIRE_GPU();
  const int64_t b = 6, v = 32003;
  std::vector<float> h = logits(b, v, DType::f32, 2.0, 11);
  for (uint64_t step = 0; step < 8; ++step) {
    Tensor x = to_gpu(Tensor::from_vector(h, {b, v}), DType::f32);
    Tensor out = Tensor::empty({b}, DType::i32, Device::cuda(0));
    kernels::cuda::sample_tokens(x.raw_data(), DType::f32, b, v, SampleParams{1.3, 1, 1.0}, 9,
                                 step, nullptr, out.data<int32_t>());
    auto got = out.to(Device::cpu()).to_vector<int32_t>();
    for (int64_t r = 0; r < b; ++r)
      EXPECT_EQ(got[size_t(r)], kernels::cpu::argmax(h.data() + r * v, v)) << r;
  }
}

// The same token as the CPU for the same seed, stream and step, over the warper combinations.
TEST(CudaSampling, SameSeedSameTokenAsCpu) {
  FTUNE_REQUIRE_GPU();
  const SampleParams combos[] = {
      {1.0, 0, 1.0},  {0.7, 0, 1.0},  {1.0, 50, 1.0},  {1.0, 0, 0.9},  {0.8, 40, 0.8},
      {1.5, 0, 0.5},  {1.0, 0, 0.0},  {1.0, 1000, 0.95}, {0.3, 0, 0.99}, {2.0, 7, 1.0},
  };
  uint64_t seed = 100;
  for (DType dt : {DType::f32, DType::bf16})
    for (int64_t v : {1000, 32003, 128256}) {
      const int64_t b = 4;
      std::vector<float> h = logits(b, v, dt, 3.0, ++seed);
      for (const SampleParams& p : combos)
        for (uint64_t step = 0; step < 3; ++step) {
          expect_same_tokens(h, b, v, dt, p, 1234, step, {});
          expect_same_tokens(h, b, v, dt, p, 99, step, {7, 3, 1ull << 40, 0});
        }
    }
}

// top_p boundary inside a run of equal logits: all V tokens equal, top_p 0.5 keeps the lowest
// half of the ids (ties ranked by id), and the draw must match the CPU for many uniforms.
TEST(CudaSampling, TopPTiesKeptInIdOrder) {
  FTUNE_REQUIRE_GPU();
  const int64_t b = 3, v = 1000;
  std::vector<float> h(size_t(b * v), 0.25f);
  for (int64_t j = 0; j < 10; ++j) h[size_t(v + 100 * j)] = 1.0f;  // row 1: 10 leaders, then ties
  for (uint64_t step = 0; step < 64; ++step) {
    expect_same_tokens(h, b, v, DType::f32, SampleParams{1.0, 0, 0.5}, 5, step, {});
    expect_same_tokens(h, b, v, DType::bf16, SampleParams{0.5, 20, 0.3}, 6, step, {});
  }
  // the kept set really is the low half: no draw above id 499 in row 0
  Tensor x = to_gpu(Tensor::from_vector(h, {b, v}), DType::f32);
  Tensor out = Tensor::empty({b}, DType::i32, Device::cuda(0));
  for (uint64_t step = 0; step < 64; ++step) {
    kernels::cuda::sample_tokens(x.raw_data(), DType::f32, b, v, SampleParams{1.0, 0, 0.5}, 5,
                                 step, nullptr, out.data<int32_t>());
    EXPECT_LT(out.to(Device::cpu()).to_vector<int32_t>()[0], 500);
  }
}

TEST(CudaSampling, RejectedRowsGetCodes) {
  FTUNE_REQUIRE_GPU();
  const int64_t b = 4, v = 300;
  std::vector<float> h = logits(b, v, DType::f32, 1.0, 3);
  h[size_t(7)] = NAN;                                        // row 0
  h[size_t(v + 9)] = INFINITY;                               // row 1
  for (int64_t j = 0; j < v; ++j) h[size_t(2 * v + j)] = -INFINITY;  // row 2
  Tensor x = to_gpu(Tensor::from_vector(h, {b, v}), DType::f32);
  Tensor out = Tensor::empty({b}, DType::i32, Device::cuda(0));
  kernels::cuda::sample_tokens(x.raw_data(), DType::f32, b, v, SampleParams{1.0, 0, 1.0}, 1, 0,
                               nullptr, out.data<int32_t>());
  auto got = out.to(Device::cpu()).to_vector<int32_t>();
  EXPECT_EQ(got[0], kernels::cuda::kSampleNaN);
  EXPECT_EQ(got[1], kernels::cuda::kSamplePosInf);
  EXPECT_EQ(got[2], kernels::cuda::kSampleAllNegInf);
  EXPECT_EQ(got[3], kernels::cpu::sample_row(h.data() + 3 * v, v, SampleParams{1.0, 0, 1.0},
                                             philox_uniform(1, 3, 0)));
  // greedy: NaN still rejected; +inf wins; an all -inf row gives 0 (torch.argmax)
  kernels::cuda::sample_tokens(x.raw_data(), DType::f32, b, v, SampleParams{0.0, 0, 1.0}, 1, 0,
                               nullptr, out.data<int32_t>());
  got = out.to(Device::cpu()).to_vector<int32_t>();
  EXPECT_EQ(got[0], kernels::cuda::kSampleNaN);
  EXPECT_EQ(got[1], 9);
  EXPECT_EQ(got[2], 0);
}

}  // namespace
}  // namespace ftune::test
