// The GPU AdamW (one multi-tensor launch, kernels/cuda/adamw.cu) through optim::AdamW against the
// same optimizer on the CPU: params of odd sizes (one element, less than a vector, across several
// chunks) in f32, bf16 and f16 with grads of their dtype or f32, all in one launch, two groups, a
// changing lr and a skipped gradient, over 3 steps; the exported state (m, v, f32 master) compared
// tightly. Then the global grad norm, clipping and the raw multi-tensor helpers.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "core/optim.h"
#include "kernels/adamw.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

using optim::AdamW;
using optim::AdamWOptions;
using optim::ParamGroup;

struct Spec {
  const char* name;
  Shape shape;
  DType param, grad;
};
// Sizes: 1, 3 (below a 4-wide vector), 1023, 4097, 49155 and 70001 (several 16384-element chunks,
// with a ragged tail).
const Spec kSpecs[] = {
    {"a", {1}, DType::f32, DType::f32},           {"b", {3}, DType::bf16, DType::bf16},
    {"c", {33, 31}, DType::f32, DType::f32},      {"d", {4097}, DType::bf16, DType::f32},
    {"e", {3, 16385}, DType::f16, DType::f16},    {"f", {70001}, DType::f16, DType::f32},
    {"g", {17, 4096}, DType::bf16, DType::bf16},  {"h", {5}, DType::f32, DType::f32},
    {"i", {70001}, DType::f32, DType::f32},
};

std::map<std::string, Tensor> state_map(const optim::OptimizerState& st) {
  std::map<std::string, Tensor> m;
  for (const auto& [name, t] : st.tensors) m[name] = t;
  return m;
}

TEST(CudaAdamW, MatchesCpuAdamWOverThreeSteps) {
  FTUNE_REQUIRE_GPU();
  Generator gen(42);
  optim::NamedTensors cpu_params, gpu_params;
  std::vector<Tensor> inits;
  for (const Spec& s : kSpecs) {
    Tensor init = rand_host(s.shape, gen, s.param);
    inits.push_back(init);
    cpu_params.emplace_back(s.name, init.clone().to(s.param).set_requires_grad());
    gpu_params.emplace_back(s.name, to_gpu(init, s.param).set_requires_grad());
  }
  AdamWOptions o;
  o.lr = 1e-2;
  o.beta1 = 0.85;
  o.beta2 = 0.99;
  o.weight_decay = 0.1;
  auto groups = [&](const optim::NamedTensors& ps) {
    std::vector<ParamGroup> g = optim::decay_groups(ps, 0.1);
    g.back().lr_scale = 0.5;  // the no-decay group (vectors) at half the lr
    return g;
  };
  AdamW cpu_opt(groups(cpu_params), o), gpu_opt(groups(gpu_params), o);
  for (int step = 0; step < 3; ++step) {
    const double lr = 1e-2 * (1.0 - 0.2 * step);
    for (size_t i = 0; i < std::size(kSpecs); ++i) {
      const Spec& s = kSpecs[i];
      if (step == 1 && i % 3 == 1) continue;  // no gradient: skipped, its step count lags
      Tensor g = rand_host(s.shape, gen, s.grad, 0.5 + 0.5 * step);
      cpu_params[i].second.set_grad(g.to(s.grad));
      gpu_params[i].second.set_grad(to_gpu(g, s.grad));
    }
    cpu_opt.set_lr(lr);
    gpu_opt.set_lr(lr);
    const double clip = step == 1 ? 0.37 : 1.0;  // the clipping coefficient inside the update
    cpu_opt.step(clip);
    gpu_opt.step(clip);
    cpu_opt.zero_grad();
    gpu_opt.zero_grad();
  }
  auto cs = state_map(cpu_opt.export_state()), gs = state_map(gpu_opt.export_state());
  ASSERT_EQ(cs.size(), gs.size());
  for (const auto& [name, ct] : cs) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(gs.count(name));
    const Tensor& gt = gs.at(name);
    EXPECT_TRUE(gt.device().is_cpu()) << "exported state is on the host";
    if (name.ends_with(".step")) {
      EXPECT_EQ(gt.item(), ct.item());
      continue;
    }
    // Same operations in the same order; only fused multiply-adds on the CPU side may differ
    // (an ulp or so per step).
    const double atol = name.ends_with(".exp_avg_sq") ? 1e-9 : 1e-6;
    EXPECT_TRUE(all_close(gt.to(DType::f32), ct.to(DType::f32), atol, 1e-5));
  }
  for (size_t i = 0; i < std::size(kSpecs); ++i) {
    const Spec& s = kSpecs[i];
    SCOPED_TRACE(s.name);
    const Tensor& cp = cpu_params[i].second;
    const Tensor& gp = gpu_params[i].second;
    ASSERT_EQ(gp.dtype(), s.param);
    ASSERT_TRUE(gp.device().is_cuda());
    if (s.param == DType::f32) {
      EXPECT_TRUE(all_close(to_host(gp), cp.to(DType::f32), 1e-6, 1e-5));
    } else {
      // The 16-bit param is its own master rounded once, and within an ulp of the CPU param.
      Tensor master = gs.at(std::string(s.name) + ".master");
      EXPECT_TRUE(all_close(to_host(gp), master.to(s.param).to(DType::f32), 0, 0));
      EXPECT_TRUE(all_close(to_host(gp), cp.to(DType::f32), 1e-7, dtype_rtol(s.param)));
    }
    // The update moved the param away from its start (lr 1e-2 over 3 steps: ~1e-2 relative).
    EXPECT_GT(rel_l2(to_host(gp), inits[i]), 1e-3);
  }
}

// The state survives export/import across devices: a GPU optimizer resumed from a CPU one's state
// continues exactly as the CPU one does.
TEST(CudaAdamW, ResumesFromCpuState) {
  FTUNE_REQUIRE_GPU();
  Generator gen(8);
  Tensor init = rand_host({1000, 3}, gen, DType::bf16);
  Tensor cp = init.to(DType::bf16).set_requires_grad();
  Tensor gp = to_gpu(init, DType::bf16).set_requires_grad();
  AdamWOptions o;
  o.lr = 3e-3;
  AdamW cpu_opt({ParamGroup{{{"w", cp}}}}, o);
  Tensor g0 = rand_host({1000, 3}, gen, DType::bf16);
  cp.set_grad(g0.to(DType::bf16));
  cpu_opt.step();
  AdamW gpu_opt({ParamGroup{{{"w", gp}}}}, o);
  gpu_opt.import_state(cpu_opt.export_state());
  EXPECT_TRUE(all_close(to_host(gp), cp.to(DType::f32), 0, 0)) << "param set from the master";
  Tensor g1 = rand_host({1000, 3}, gen, DType::bf16);
  cp.set_grad(g1.to(DType::bf16));
  gp.set_grad(to_gpu(g1, DType::bf16));
  cpu_opt.step();
  gpu_opt.step();
  auto cs = state_map(cpu_opt.export_state()), gs = state_map(gpu_opt.export_state());
  EXPECT_TRUE(all_close(gs.at("w.master"), cs.at("w.master"), 1e-6, 1e-5));
  EXPECT_TRUE(all_close(gs.at("w.exp_avg"), cs.at("w.exp_avg"), 1e-6, 1e-5));
  EXPECT_TRUE(all_close(gs.at("w.exp_avg_sq"), cs.at("w.exp_avg_sq"), 1e-9, 1e-5));
}

// Grads of every dtype and odd sizes, one of them larger than many chunks.
std::vector<std::pair<Tensor, Tensor>> make_grads(Generator& gen) {  // (cpu param, gpu param)
  const std::pair<Shape, DType> specs[] = {
      {{1}, DType::f32},          {{7}, DType::bf16},      {{1000, 3}, DType::f16},
      {{3, 1000001}, DType::f32}, {{65537}, DType::bf16},  {{33}, DType::f64},
      {{4096, 129}, DType::f16},  {{16384}, DType::f32}};
  std::vector<std::pair<Tensor, Tensor>> out;
  for (const auto& [shape, dt] : specs) {
    Tensor g = rand_host(shape, gen, dt, 0.1);
    Tensor cp = Tensor::zeros(shape, dt), gp = Tensor::zeros(shape, dt, Device::cuda(0));
    cp.set_grad(g.to(dt));
    gp.set_grad(g.to(dt).to(Device::cuda(0)));
    out.emplace_back(cp, gp);
  }
  return out;
}

TEST(CudaAdamW, GradNormMatchesCpuAndIsDeterministic) {
  FTUNE_REQUIRE_GPU();
  Generator gen(77);
  auto pairs = make_grads(gen);
  std::vector<Tensor> cpu, gpu;
  for (auto& [c, g] : pairs) {
    cpu.push_back(c);
    gpu.push_back(g);
  }
  cpu.push_back(Tensor());  // undefined params and params without grads are skipped
  gpu.push_back(Tensor::zeros({5}, DType::f32, Device::cuda(0)));
  const double ref = optim::grad_sum_squares(cpu);
  const double got = optim::grad_sum_squares(gpu);
  EXPECT_NEAR(got, ref, 1e-6 * ref);
  EXPECT_EQ(optim::grad_sum_squares(gpu), got) << "same inputs, same sum, bit for bit";
  EXPECT_EQ(optim::grad_sum_squares({}), 0.0);
}

TEST(CudaAdamW, ClipGradNormScalesLikeCpu) {
  FTUNE_REQUIRE_GPU();
  Generator gen(78);
  auto pairs = make_grads(gen);
  std::vector<Tensor> cpu, gpu;
  for (auto& [c, g] : pairs) {
    cpu.push_back(c);
    gpu.push_back(g);
  }
  // Large max_norm: nothing changes.
  const double n0 = optim::clip_grad_norm(gpu, 1e9);
  EXPECT_NEAR(n0, optim::clip_grad_norm(cpu, 1e9), 1e-6 * n0);
  for (size_t i = 0; i < cpu.size(); ++i)
    EXPECT_TRUE(all_close(gpu[i].grad().to(Device::cpu()), cpu[i].grad(), 0, 0)) << i;
  // Clip to a tenth: every grad scaled by the same factor, as on the CPU (an ulp apart at most:
  // the factors come from norms that may differ in the last bits).
  const double max_norm = n0 / 10;
  const double nc = optim::clip_grad_norm(cpu, max_norm);
  const double ng = optim::clip_grad_norm(gpu, max_norm);
  EXPECT_NEAR(ng, nc, 1e-6 * nc);
  for (size_t i = 0; i < cpu.size(); ++i) {
    const DType dt = cpu[i].grad().dtype();
    EXPECT_TRUE(all_close(gpu[i].grad().to(Device::cpu()), cpu[i].grad(), 1e-12,
                          dt == DType::f32 || dt == DType::f64 ? 1e-6 : dtype_rtol(dt)))
        << i << " " << dtype_name(dt);
  }
  EXPECT_NEAR(std::sqrt(optim::grad_sum_squares(gpu)), max_norm, 1e-3 * max_norm);
}

// The raw helpers on misaligned views (element-wise path) next to aligned arrays.
TEST(CudaAdamW, MultiTensorHelpersOnUnalignedArrays) {
  FTUNE_REQUIRE_GPU();
  Generator gen(9);
  Tensor host = rand_host({40003}, gen, DType::bf16);
  Tensor dev = to_gpu(host, DType::bf16);
  // Elements [1, 40003) start 2 bytes into the buffer: not 16-byte aligned.
  kernels::cuda::DeviceArray whole{dev.raw_data(), DType::bf16, 40003};
  kernels::cuda::DeviceArray tail{static_cast<char*>(dev.raw_data()) + 2, DType::bf16, 40002};
  auto hv = host.to_vector<double>();
  double ref_whole = 0, ref_tail = 0;
  for (size_t i = 0; i < hv.size(); ++i) {
    ref_whole += hv[i] * hv[i];
    if (i > 0) ref_tail += hv[i] * hv[i];
  }
  EXPECT_NEAR(kernels::cuda::sum_squares_multi({whole, tail}), ref_whole + ref_tail,
              1e-6 * (ref_whole + ref_tail));
  kernels::cuda::scale_inplace_multi({tail}, 0.5);
  auto got = to_host(dev).to_vector<double>();
  EXPECT_EQ(got[0], hv[0]) << "element before the view untouched";
  for (size_t i = 1; i < hv.size(); ++i) ASSERT_EQ(got[i], hv[i] * 0.5) << i;  // exact in bf16
}

}  // namespace
}  // namespace ftune::test
