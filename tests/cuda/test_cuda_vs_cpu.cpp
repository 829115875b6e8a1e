// The CUDA-vs-CPU driver. Every op-table case runs on the CPU (f32) and on the GPU (inputs copied,
// outputs poisoned) and the results are compared with a dtype-scaled tolerance; gradients too.
// Without a GPU every test skips with the reason; an op without a CUDA twin skips naming itself.
#include <gtest/gtest.h>

#include <cmath>

#include "core/allocator.h"
#include "tests/op_table.h"

namespace ftune::test {
namespace {

std::string no_gpu_reason() {
#ifndef FTUNE_HAVE_CUDA
  return "ftune was built without CUDA (FTUNE_CUDA=OFF)";
#else
  return cuda_available() ? "" : "no GPU is present on this machine (scripts/gpu_check.sh runs these on one)";
#endif
}

double worst_violation(const Tensor& got, const Tensor& ref, double atol, double rtol, size_t* where) {
  auto g = got.to_vector<double>(), r = ref.to_vector<double>();
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    double v = std::fabs(g[i] - r[i]) - (atol + rtol * std::fabs(r[i]));
    if (std::isnan(g[i]) != std::isnan(r[i]) || (!std::isfinite(g[i]) && std::isfinite(r[i]))) v = INFINITY;
    if (std::isnan(v)) v = 0;  // both NaN: they agree
    if (v > worst) {
      worst = v;
      *where = i;
    }
  }
  return worst;
}

class CudaVsCpu : public ::testing::Test {
 public:
  explicit CudaVsCpu(const OpCase* c) : c_(c) {}
  void TestBody() override {
    std::string why = no_gpu_reason();
    if (!why.empty()) GTEST_SKIP() << why;
    cuda_set_alloc_poison(true);
    auto cpu_in = make_inputs(*c_, DType::f32, 4321, true);
    std::vector<Tensor> gpu_in;
    for (size_t i = 0; i < cpu_in.size(); ++i) {
      Tensor t = cpu_in[i].detach().to(Device::cuda(0));
      if (cpu_in[i].requires_grad()) t.set_requires_grad(true);
      gpu_in.push_back(t);
    }
    Tensor out_cpu = c_->run(cpu_in);
    Tensor out_gpu;
    try {
      out_gpu = c_->run(gpu_in);
    } catch (const Error& e) {
      std::string m = e.what();
      if (m.find("no GPU implementation") != std::string::npos) GTEST_SKIP() << m;
      throw;
    }
    ASSERT_TRUE(out_gpu.device().is_cuda());
    size_t at = 0;
    double tol_a = c_->atol * 10, tol_r = c_->rtol * 10;  // different summation order than the CPU
    EXPECT_LE(worst_violation(out_gpu, out_cpu, tol_a, tol_r, &at), 0.0) << "output element " << at;
    if (!c_->gradcheck || !out_cpu.requires_grad()) return;
    Generator g(11);
    Tensor w = randn(out_cpu.shape(), g);
    out_cpu.backward(w);
    out_gpu.backward(w.to(Device::cuda(0)));
    for (size_t i = 0; i < cpu_in.size(); ++i) {
      if (!cpu_in[i].requires_grad()) continue;
      ASSERT_TRUE(gpu_in[i].grad().defined()) << "no GPU gradient for " << c_->inputs[i].name;
      EXPECT_LE(worst_violation(gpu_in[i].grad(), cpu_in[i].grad(), tol_a, tol_r, &at), 0.0)
          << "gradient of " << c_->inputs[i].name << " element " << at;
    }
  }

 private:
  const OpCase* c_;
};

TEST(CudaRuntime, CachingAllocatorReusesAndCounts) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  auto before = cuda_allocator_stats(0);
  {
    Tensor a = Tensor::empty({1 << 20}, DType::f32, Device::cuda(0));
    auto mid = cuda_allocator_stats(0);
    EXPECT_GE(mid.current_bytes - before.current_bytes, int64_t(4) << 20);
  }
  auto after_free = cuda_allocator_stats(0);
  EXPECT_EQ(after_free.current_bytes, before.current_bytes);
  Tensor b = Tensor::empty({1 << 20}, DType::f32, Device::cuda(0));
  EXPECT_GT(cuda_allocator_stats(0).cache_hits, after_free.cache_hits);
  b = Tensor();
  cuda_empty_cache();
  EXPECT_LT(cuda_allocator_stats(0).reserved_bytes, after_free.reserved_bytes);
}

TEST(CudaRuntime, CopiesRoundTripEveryDtype) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  Generator g(3);
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64}) {
    Tensor h = randn({3, 257}, g).to(dt);
    Tensor d = h.to(Device::cuda(0));
    EXPECT_EQ(d.to(Device::cpu()).to_vector<double>(), h.to_vector<double>()) << dtype_name(dt);
  }
}

TEST(CudaRuntime, DeviceFillAndCastMatchHost) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  Generator g(5);
  Tensor h = randn({1000}, g, 0.0, 100.0);
  Tensor d = h.to(Device::cuda(0));
  for (DType dt : {DType::bf16, DType::f16, DType::f64, DType::i32}) {
    Tensor on_dev = d.to(dt).to(Device::cpu());  // cast kernel on the device
    Tensor on_host = h.to(dt);                   // cast on the host
    EXPECT_EQ(on_dev.to_vector<double>(), on_host.to_vector<double>()) << dtype_name(dt);
  }
  Tensor f = Tensor::full({4097}, -1.5, DType::bf16, Device::cuda(0));
  for (double x : f.to_vector<double>()) ASSERT_EQ(x, -1.5);
}

}  // namespace

void register_cuda_tests() {
  for (const OpCase& c : op_table()) {
    if (c.bench) continue;
    const std::string name = test_id(c);
    const OpCase* cp = &c;
    ::testing::RegisterTest("CudaVsCpu", name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                            [cp]() -> ::testing::Test* { return new CudaVsCpu(cp); });
  }
}

}  // namespace ftune::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ftune::test::register_cuda_tests();
  return RUN_ALL_TESTS();
}
