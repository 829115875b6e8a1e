#include "trainers/loss_scaler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "kernels/amp.h"

namespace ftune {

namespace {

bool valid_scale(double s) {
  return std::isfinite(s) && s > 0 && s <= double(std::numeric_limits<float>::max());
}

// The scale's reciprocal as the kernels take it (torch: scale.double().reciprocal().float()).
float inv_of(double scale) {
  FTUNE_CHECK(valid_scale(scale), "[loss_scale] cannot unscale by ", scale);
  return float(1.0 / scale);
}

// One gradient to unscale: `in` into `out` (the same tensor: in place).
struct Job {
  Tensor in, out;
};

// Runs the jobs (CPU ones with the twin, GPU ones in one launch); true when some input held an inf
// or NaN.
bool run(const std::vector<Job>& jobs, float inv) {
  bool found = false;
  std::vector<const Job*> gpu;
  for (const Job& j : jobs) {
    FTUNE_CHECK(j.in.is_contiguous() && j.out.is_contiguous(),
                "[loss_scale] non-contiguous gradient ", j.in.desc());
    if (!j.in.device().is_cpu()) {
      FTUNE_CHECK(gpu.empty() || gpu.front()->in.device() == j.in.device(),
                  "[loss_scale] gradients on two GPUs: ", gpu.front()->in.desc(), " and ",
                  j.in.desc());
      gpu.push_back(&j);
      continue;
    }
    j.out.bump_version();
    const int64_t n = j.in.numel();
    const DType di = j.in.dtype(), dout = j.out.dtype();
    if (di == DType::f32 && dout == DType::f32)
      found |= kernels::cpu::unscale_check(j.in.data<float>(), j.out.data<float>(), n, inv);
    else if (di == DType::bf16 && dout == DType::bf16)
      found |= kernels::cpu::unscale_check(j.in.data<bf16>(), j.out.data<bf16>(), n, inv);
    else if (di == DType::f16 && dout == DType::f16)
      found |= kernels::cpu::unscale_check(j.in.data<f16>(), j.out.data<f16>(), n, inv);
    else if (di == DType::bf16 && dout == DType::f32)
      found |= kernels::cpu::unscale_check(j.in.data<bf16>(), j.out.data<float>(), n, inv);
    else if (di == DType::f16 && dout == DType::f32)
      found |= kernels::cpu::unscale_check(j.in.data<f16>(), j.out.data<float>(), n, inv);
    else
      FTUNE_THROW("[loss_scale] cannot unscale an ", dtype_name(di), " gradient into ",
                  dtype_name(dout), " (gradients are f32, bf16 or f16)");
  }
  if (gpu.empty()) return found;
#ifdef FTUNE_HAVE_CUDA
  const Device dev = gpu.front()->in.device();
  cuda::set_device(dev.index);
  std::vector<kernels::cuda::UnscaleArray> arrays;
  for (const Job* j : gpu) {
    j->out.bump_version();
    arrays.push_back(
        {j->in.raw_data(), j->in.dtype(), j->out.raw_data(), j->out.dtype(), j->in.numel()});
  }
  Tensor flag = Tensor::zeros({1}, DType::i32, dev);
  kernels::cuda::unscale_check_multi(arrays, inv, static_cast<int32_t*>(flag.raw_data()));
  found |= flag.to(Device::cpu()).data<int32_t>()[0] != 0;  // waits for the kernel
#else
  FTUNE_THROW("[loss_scale] GPU gradient ", gpu.front()->in.desc(), " in a build without CUDA");
#endif
  return found;
}

}  // namespace

LossScaler::LossScaler(LossScalerOptions opt) : opt_(opt), scale_(opt.init_scale) {
  FTUNE_CHECK(valid_scale(opt_.init_scale),
              "[loss_scale] the initial scale must be a positive "
              "finite f32 value, got ",
              opt_.init_scale);
  FTUNE_CHECK(opt_.growth_factor > 1, "[loss_scale] growth_factor must be > 1, got ",
              opt_.growth_factor);
  FTUNE_CHECK(opt_.backoff_factor > 0 && opt_.backoff_factor < 1,
              "[loss_scale] backoff_factor must be in (0, 1), got ", opt_.backoff_factor);
  FTUNE_CHECK(opt_.growth_interval >= 1, "[loss_scale] growth_interval must be >= 1, got ",
              opt_.growth_interval);
}

void LossScaler::update(bool found_inf) {
  if (!opt_.dynamic) return;
  if (found_inf) {
    scale_ *= opt_.backoff_factor;
    growth_tracker_ = 0;
    return;
  }
  if (++growth_tracker_ == opt_.growth_interval) {
    const double grown = scale_ * opt_.growth_factor;
    if (valid_scale(grown)) scale_ = grown;
    growth_tracker_ = 0;
  }
}

nlohmann::json LossScaler::state() const {
  return {{"scale", scale_}, {"growth_tracker", growth_tracker_}, {"dynamic", opt_.dynamic}};
}

void LossScaler::load_state(const nlohmann::json& j) {
  FTUNE_CHECK(j.is_object() && j.contains("scale") && j["scale"].is_number() &&
                  j.contains("growth_tracker") && j["growth_tracker"].is_number_integer(),
              "[loss_scale] bad saved state ", j.dump(),
              " (expected {\"scale\": number, \"growth_tracker\": int, \"dynamic\": bool})");
  const double s = j["scale"].get<double>();
  const int64_t t = j["growth_tracker"].get<int64_t>();
  FTUNE_CHECK(valid_scale(s), "[loss_scale] saved scale ", s,
              " is not a positive finite f32 value");
  FTUNE_CHECK(t >= 0, "[loss_scale] saved growth_tracker ", t, " is negative");
  // A fixed scale is the recipe's; a dynamic one does not continue from a fixed one.
  if (!opt_.dynamic || !j.value("dynamic", true)) return;
  scale_ = s;
  // A resume with a smaller growth_interval grows at its next clean step.
  growth_tracker_ = std::min(t, opt_.growth_interval - 1);
}

bool unscale_grads(const std::vector<Tensor>& params, double scale) {
  const float inv = inv_of(scale);
  std::vector<Job> jobs;
  std::vector<std::pair<Tensor, Tensor>> replace;  // (param, its new f32 gradient)
  for (const Tensor& p : params) {
    if (!p.defined()) continue;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (g.dtype() == DType::f16) {
      Tensor out = Tensor::empty(g.shape(), DType::f32, g.device());
      jobs.push_back({g, out});
      replace.emplace_back(p, out);
    } else {
      jobs.push_back({g, g});
    }
  }
  const bool found = run(jobs, inv);
  for (auto& [p, g] : replace) Tensor(p).set_grad(g);
  return found;
}

bool unscale_buffers(const std::vector<Tensor>& grads, double scale) {
  const float inv = inv_of(scale);
  std::vector<Job> jobs;
  for (const Tensor& g : grads)
    if (g.defined() && g.numel() > 0) jobs.push_back({g, g});
  return run(jobs, inv);
}

}  // namespace ftune
