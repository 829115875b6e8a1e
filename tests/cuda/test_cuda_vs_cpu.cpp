// The CUDA-vs-CPU driver. Every op-table case runs on the CPU (f32) and on the GPU (inputs copied,
// outputs poisoned) and the results are compared with a dtype-scaled tolerance; gradients too.
// Without a GPU every test skips with the reason; an op without a CUDA twin skips naming itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/ops.h"
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
    // Gradients are judged as OpGradF32 judges the CPU's f32 backward: against the f64 backward
    // on the same input values, element error relative to max(|g|, 1e-3 max|g|), within the
    // case's grad_rtol32 (doubled: another summation order than the CPU's). An ill-conditioned
    // case (a softmax peaked by scale 40) carries its own, wider grad_rtol32 in the op table.
    std::vector<Tensor> in64;
    for (const Tensor& t : cpu_in) {
      Tensor u = is_floating(t.dtype()) ? t.detach().to(DType::f64) : t.detach();
      if (t.requires_grad()) u.set_requires_grad(true);
      in64.push_back(u);
    }
    Tensor out64 = c_->run(in64);
    Generator g(11);
    Tensor w = randn(out_cpu.shape(), g, 0.0, 1.0, DType::f64);
    out64.backward(w);
    out_gpu.backward(w.to(DType::f32).to(Device::cuda(0)));
    for (size_t i = 0; i < cpu_in.size(); ++i) {
      if (!cpu_in[i].requires_grad()) continue;
      ASSERT_TRUE(gpu_in[i].grad().defined()) << "no GPU gradient for " << c_->inputs[i].name;
      auto got = gpu_in[i].grad().to_vector<double>(), ref = in64[i].grad().to_vector<double>();
      double mx = 0;
      for (double v : ref) mx = std::max(mx, std::fabs(v));
      double worst = 0;
      size_t wi = 0;
      for (size_t j = 0; j < got.size(); ++j) {
        double e = std::fabs(got[j] - ref[j]) / std::max({std::fabs(ref[j]), 1e-3 * mx, 1e-30});
        if (std::isnan(got[j]) != std::isnan(ref[j])) e = INFINITY;
        if (e > worst) worst = e, wi = j;
      }
      EXPECT_LE(worst, 2 * c_->grad_rtol32) << "gradient of " << c_->inputs[i].name << " element "
                                            << wi << ": GPU " << got[wi] << ", f64 " << ref[wi];
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

TEST(CudaRuntime, StridedCopiesMatchHost) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  cuda_set_alloc_poison(true);
  Generator g(9);
  Tensor h = randn({3, 5, 7, 11}, g);
  Tensor d = h.to(Device::cuda(0));
  // A permuted view made contiguous on the GPU, in f32 and converted to bf16.
  Tensor hp = h.permute({2, 0, 3, 1}).contiguous();
  Tensor dp = d.permute({2, 0, 3, 1}).contiguous();
  ASSERT_TRUE(dp.device().is_cuda());
  EXPECT_EQ(dp.to(Device::cpu()).to_vector<double>(), hp.to_vector<double>());
  Tensor db = Tensor::empty(hp.shape(), DType::bf16, Device::cuda(0));
  db.copy_(d.permute({2, 0, 3, 1}));
  EXPECT_EQ(db.to(Device::cpu()).to_vector<double>(), hp.to(DType::bf16).to_vector<double>());
  // Writes into a strided GPU view (the KV cache's slot update), from the GPU and from the host.
  Tensor dst = Tensor::zeros({2, 9, 4}, DType::f32, Device::cuda(0));
  Tensor src = randn({2, 3, 4}, g);
  dst.slice(1, 5, 8).copy_(src.to(Device::cuda(0)));
  dst.slice(1, 0, 3).copy_(src);
  auto out = dst.to(Device::cpu());
  EXPECT_EQ(out.slice(1, 5, 8).contiguous().to_vector<double>(), src.to_vector<double>());
  EXPECT_EQ(out.slice(1, 0, 3).contiguous().to_vector<double>(), src.to_vector<double>());
  EXPECT_EQ(out.slice(1, 3, 5).contiguous().to_vector<double>(), std::vector<double>(16, 0.0));
  // A strided GPU source copied to the host.
  Tensor ht = d.transpose(1, 3).to(Device::cpu());
  EXPECT_EQ(ht.to_vector<double>(), h.transpose(1, 3).contiguous().to_vector<double>());
  // Broadcast (stride-0) source.
  Tensor e = d.slice(0, 0, 1).expand({3, 5, 7, 11}).contiguous();
  EXPECT_EQ(e.to(Device::cpu()).to_vector<double>(),
            h.slice(0, 0, 1).expand({3, 5, 7, 11}).contiguous().to_vector<double>());
}

TEST(CudaRuntime, StreamsEventsAndPerStreamPools) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  cuda::Stream s(0);
  cuda::Event a, b;
  Generator g(4);
  Tensor h = randn({1 << 22}, g);
  Tensor d;
  {
    cuda::StreamGuard guard(s.handle());
    EXPECT_EQ(cuda::current_stream(), s.handle());
    a.record(s.handle());
    d = h.to(Device::cuda(0));
    Tensor e = ops::mul_scalar(d, 2.0);  // launched on s when the op has a GPU twin
    b.record(s.handle());
    b.synchronize();
    EXPECT_TRUE(b.query());
    EXPECT_GE(a.elapsed_ms(b), 0.0f);
  }
  EXPECT_EQ(cuda::current_stream(), nullptr);
  // A block freed by work on stream s is not handed to the default stream.
  auto before = cuda_allocator_stats(0);
  {
    cuda::StreamGuard guard(s.handle());
    Tensor t = Tensor::empty({9700001}, DType::f32, Device::cuda(0));
  }
  Tensor u = Tensor::empty({9700001}, DType::f32, Device::cuda(0));
  EXPECT_EQ(cuda_allocator_stats(0).cache_hits, before.cache_hits);
  {
    cuda::StreamGuard guard(s.handle());
    Tensor t = Tensor::empty({9700001}, DType::f32, Device::cuda(0));  // reuses the block of s
  }
  EXPECT_EQ(cuda_allocator_stats(0).cache_hits, before.cache_hits + 1);
  EXPECT_EQ(d.to(Device::cpu()).to_vector<float>(), h.to_vector<float>());
}

TEST(CudaRuntime, SelectsDeviceByLocalRank) {
  std::string why = no_gpu_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3", 1);
  EXPECT_EQ(cuda::local_rank_from_env(), 3);
  EXPECT_EQ(cuda::select_device_for_local_rank(), 3 % cuda_device_count());
  unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  EXPECT_EQ(cuda::select_device_for_local_rank(), 0);
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
