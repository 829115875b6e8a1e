// The GPU unscale + non-finite check of loss scaling (kernels/cuda/amp.cu, one multi-tensor launch)
// against its CPU twin (kernels/cpu/amp.cpp), element for element (bits; NaN as NaN): f32, bf16
// and f16 in place, bf16 and f16 into f32, in one launch; sizes 1, 3, 4097, across several
// 16384-element chunks with ragged tails; pointers misaligned by one element (the scalar path);
// inf, -inf and NaN at the first element, on a chunk boundary and at the last element; the flag
// is only ever set, never cleared.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/amp.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

struct Spec {
  int64_t n;
  DType in, out;
  bool in_place;
  bool misaligned;  // the arrays start one element into their buffers
};
const Spec kSpecs[] = {
    {1, DType::f32, DType::f32, true, false},
    {3, DType::bf16, DType::bf16, true, false},
    {4097, DType::f16, DType::f16, true, false},
    {33000, DType::f32, DType::f32, true, true},
    {16384 * 2 + 5, DType::bf16, DType::f32, false, false},
    {70001, DType::f16, DType::f32, false, false},
    {16385, DType::f16, DType::f16, true, true},
    {5, DType::bf16, DType::f32, false, true},
    {16384 * 3, DType::bf16, DType::bf16, true, false},
};

// The value of element i of an f32 host tensor as the kernel's input dtype would hold it.
float round_to(DType dt, float v) {
  if (dt == DType::bf16) return float(bf16(v));
  if (dt == DType::f16) return float(f16(v));
  return v;
}

// Bits of element i of a host tensor of dtype dt (as a 32-bit pattern), and whether it is NaN.
std::pair<uint32_t, bool> elem(const Tensor& host, int64_t i) {
  switch (host.dtype()) {
    case DType::f32: {
      const float v = host.data<float>()[i];
      return {std::bit_cast<uint32_t>(v), std::isnan(v)};
    }
    case DType::bf16: {
      const bf16 v = host.data<bf16>()[i];
      return {v.bits, std::isnan(float(v))};
    }
    default: {
      const f16 v = host.data<f16>()[i];
      return {v.bits, std::isnan(float(v))};
    }
  }
}

// The CPU twin on host tensors (in: dtype in, values; out: dtype out). Returns found_inf.
bool cpu_twin(const Tensor& in, Tensor& out, float inv) {
  const int64_t n = in.numel();
  const DType a = in.dtype(), b = out.dtype();
  if (a == DType::f32 && b == DType::f32)
    return kernels::cpu::unscale_check(in.data<float>(), out.data<float>(), n, inv);
  if (a == DType::bf16 && b == DType::bf16)
    return kernels::cpu::unscale_check(in.data<bf16>(), out.data<bf16>(), n, inv);
  if (a == DType::f16 && b == DType::f16)
    return kernels::cpu::unscale_check(in.data<f16>(), out.data<f16>(), n, inv);
  if (a == DType::bf16 && b == DType::f32)
    return kernels::cpu::unscale_check(in.data<bf16>(), out.data<float>(), n, inv);
  return kernels::cpu::unscale_check(in.data<f16>(), out.data<float>(), n, inv);
}

// poison: 0 none; 1 inf at element 0 of array 0; 2 -inf at element 16384 of the 33000-element
// array (a chunk boundary); 3 NaN at the last element of the last array; 4 all three.
void run_case(int poison, float inv) {
  SCOPED_TRACE("poison case " + std::to_string(poison) + ", inv_scale " + std::to_string(inv));
  Generator gen(17 + poison);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<Tensor> host_in, dev_buf_in, dev_buf_out;
  std::vector<kernels::cuda::UnscaleArray> arrays;
  const size_t last = std::size(kSpecs) - 1;
  for (size_t a = 0; a < std::size(kSpecs); ++a) {
    const Spec& s = kSpecs[a];
    // Scaled gradients: normal values times 2^12 (inside f16's range) and some tiny ones.
    Tensor v = randn({s.n}, gen, 0.0, 4096.0);
    float* pv = v.data<float>();
    for (int64_t i = 0; i < s.n; i += 7) pv[i] *= 1e-6f;
    if ((poison == 1 || poison == 4) && a == 0) pv[0] = inf;
    if ((poison == 2 || poison == 4) && s.n == 33000) pv[16384] = -inf;
    if ((poison == 3 || poison == 4) && a == last) pv[s.n - 1] = std::nanf("");
    for (int64_t i = 0; i < s.n; ++i) pv[i] = round_to(s.in, pv[i]);
    host_in.push_back(v.to(s.in));
    const int64_t off = s.misaligned ? 1 : 0;
    Tensor din = Tensor::zeros({s.n + off}, s.in, Device::cuda(0));
    din.slice(0, off, off + s.n).copy_(host_in.back().to(Device::cuda(0)));
    dev_buf_in.push_back(din);
    kernels::cuda::UnscaleArray arr;
    arr.in = din.slice(0, off, off + s.n).raw_data();
    arr.in_dtype = s.in;
    arr.out_dtype = s.out;
    arr.n = s.n;
    if (s.in_place) {
      arr.out = const_cast<void*>(arr.in);
      dev_buf_out.push_back(Tensor());
    } else {
      Tensor dout = Tensor::empty({s.n + off}, s.out, Device::cuda(0));  // poisoned (NaN bytes)
      arr.out = dout.slice(0, off, off + s.n).raw_data();
      dev_buf_out.push_back(dout);
    }
    arrays.push_back(arr);
  }
  Tensor flag = Tensor::zeros({1}, DType::i32, Device::cuda(0));
  kernels::cuda::unscale_check_multi(arrays, inv, static_cast<int32_t*>(flag.raw_data()));
  const bool gpu_found = flag.to(Device::cpu()).data<int32_t>()[0] != 0;

  bool cpu_found = false;
  for (size_t a = 0; a < std::size(kSpecs); ++a) {
    const Spec& s = kSpecs[a];
    SCOPED_TRACE("array " + std::to_string(a) + " n " + std::to_string(s.n));
    Tensor want = Tensor::empty({s.n}, s.out);
    cpu_found |= cpu_twin(host_in[a], want, inv);
    const int64_t off = s.misaligned ? 1 : 0;
    const Tensor& buf = s.in_place ? dev_buf_in[a] : dev_buf_out[a];
    Tensor got = buf.slice(0, off, off + s.n).to(Device::cpu()).contiguous();
    ASSERT_EQ(got.dtype(), want.dtype());
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < s.n; ++i) {
      auto [gb, gnan] = elem(got, i);
      auto [wb, wnan] = elem(want, i);
      if (gnan != wnan || (!wnan && gb != wb)) {
        if (first < 0) first = i;
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0) << "first mismatch at " << first << ": gpu bits "
                      << (first >= 0 ? elem(got, first).first : 0) << ", cpu bits "
                      << (first >= 0 ? elem(want, first).first : 0);
    // The misaligned arrays' leading element is not touched.
    if (s.misaligned && s.in_place) {
      Tensor lead = buf.slice(0, 0, 1).to(Device::cpu()).to(DType::f32);
      EXPECT_EQ(lead.data<float>()[0], 0.0f);
    }
  }
  EXPECT_EQ(gpu_found, cpu_found);
  EXPECT_EQ(gpu_found, poison > 0);
}

TEST(CudaAmp, UnscaleMatchesTheCpuTwin) {
  FTUNE_REQUIRE_GPU();
  for (int poison = 0; poison <= 4; ++poison) {
    run_case(poison, 1.0f / 65536.0f);
    run_case(poison, 1.0f / 3000.0f);  // not a power of two: every product rounds
  }
}

TEST(CudaAmp, TheFlagIsOnlySet) {
  FTUNE_REQUIRE_GPU();
  Tensor x = Tensor::from_vector<float>({1.0f, 2.0f, 3.0f}, {3}).to(Device::cuda(0));
  Tensor flag = Tensor::from_vector<int32_t>({1}, {1}).to(Device::cuda(0));
  kernels::cuda::UnscaleArray a{x.raw_data(), DType::f32, x.raw_data(), DType::f32, 3};
  kernels::cuda::unscale_check_multi({a}, 0.5f, static_cast<int32_t*>(flag.raw_data()));
  EXPECT_EQ(flag.to(Device::cpu()).data<int32_t>()[0], 1);  // a finite pass leaves a set flag
  EXPECT_EQ(x.to(Device::cpu()).to_vector<float>(), (std::vector<float>{0.5f, 1.0f, 1.5f}));
  // Nothing to do: no launch, the flag untouched; a bad pairing or in-place widening throws.
  Tensor zero = Tensor::zeros({1}, DType::i32, Device::cuda(0));
  kernels::cuda::unscale_check_multi({}, 0.5f, static_cast<int32_t*>(zero.raw_data()));
  EXPECT_EQ(zero.to(Device::cpu()).data<int32_t>()[0], 0);
  kernels::cuda::UnscaleArray widen{x.raw_data(), DType::f16, x.raw_data(), DType::f32, 3};
  EXPECT_THROW(
      kernels::cuda::unscale_check_multi({widen}, 0.5f, static_cast<int32_t*>(zero.raw_data())),
      Error);
  kernels::cuda::UnscaleArray narrow{x.raw_data(), DType::f32, x.raw_data(), DType::f16, 3};
  EXPECT_THROW(
      kernels::cuda::unscale_check_multi({narrow}, 0.5f, static_cast<int32_t*>(zero.raw_data())),
      Error);
}

}  // namespace
}  // namespace ftune::test
