#include "core/optim.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <unordered_map>
#include <unordered_set>

#include "core/autograd.h"
#include "core/cuda_runtime.h"
#include "core/profiler.h"
#include "kernels/adamw.h"

namespace ftune::optim {

std::vector<ParamGroup> decay_groups(const NamedTensors& params, double weight_decay) {
  ParamGroup decay, no_decay;
  decay.weight_decay = weight_decay;
  no_decay.weight_decay = 0.0;
  for (const auto& [name, p] : params)
    (p.dim() >= 2 ? decay : no_decay).params.emplace_back(name, p);
  std::vector<ParamGroup> out;
  if (!decay.params.empty()) out.push_back(std::move(decay));
  if (!no_decay.params.empty()) out.push_back(std::move(no_decay));
  return out;
}

// ---------------------------------------------------------------- AdamW

namespace {

bool is_16bit(DType t) { return t == DType::bf16 || t == DType::f16; }

// A copy on the host (export_state hands out host tensors whatever the params' device).
Tensor host_copy(const Tensor& t) { return t.device().is_cpu() ? t.clone() : t.to(Device::cpu()); }

#ifdef FTUNE_HAVE_CUDA
kernels::cuda::AdamWTensor gpu_slot(const Tensor& param, const Tensor& master, const Tensor& grad,
                                    const Tensor& m, const Tensor& v,
                                    const kernels::AdamWConsts& c) {
  kernels::cuda::AdamWTensor t;
  const bool f32 = param.dtype() == DType::f32;
  t.master = static_cast<float*>(f32 ? param.raw_data() : master.raw_data());
  t.param = f32 ? nullptr : param.raw_data();
  t.param_dtype = param.dtype();
  t.grad = grad.raw_data();
  t.grad_dtype = grad.dtype();
  t.m = static_cast<float*>(m.raw_data());
  t.v = static_cast<float*>(v.raw_data());
  t.n = param.numel();
  t.c = c;
  return t;
}
#endif

// Runs the fused kernel for one parameter: P is the param's storage type, G the gradient's.
void update_param(const Tensor& param, Tensor& master, const Tensor& grad, Tensor& m, Tensor& v,
                  const kernels::AdamWConsts& c) {
  const int64_t n = param.numel();
  param.bump_version();  // the update writes the parameter in place
  float* pm = master.defined() ? master.data<float>() : param.data<float>();
  float* mm = m.data<float>();
  float* vv = v.data<float>();
  auto run = [&]<class G, class P>(P* p) {
    kernels::cpu::adamw_update<G, P>(pm, p, static_cast<const G*>(grad.raw_data()), mm, vv, n, c);
  };
  switch (param.dtype()) {
    case DType::f32:
      run.template operator()<float, float>(nullptr);
      break;
    case DType::bf16:
      if (grad.dtype() == DType::bf16)
        run.template operator()<bf16, bf16>(param.data<bf16>());
      else
        run.template operator()<float, bf16>(param.data<bf16>());
      break;
    case DType::f16:
      if (grad.dtype() == DType::f16)
        run.template operator()<f16, f16>(param.data<f16>());
      else
        run.template operator()<float, f16>(param.data<f16>());
      break;
    default:
      FTUNE_THROW("[adamw] unsupported parameter ", param.desc());
  }
}

// The per-step constants of one parameter's update, computed in double (kernels::AdamWConsts).
kernels::AdamWConsts adamw_consts(const AdamWOptions& opt, double lr, double wd, int64_t step) {
  const double t = double(step);
  kernels::AdamWConsts c;
  c.decay = float(1.0 - lr * wd);
  c.beta1 = float(opt.beta1);
  c.beta2 = float(opt.beta2);
  c.eps = float(opt.eps);
  c.step_size = float(lr / (1.0 - std::pow(opt.beta1, t)));
  c.bc2_sqrt = float(std::sqrt(1.0 - std::pow(opt.beta2, t)));
  return c;
}

}  // namespace

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions opt)
    : groups_(std::move(groups)), opt_(opt), lr_(opt.lr) {
  FTUNE_CHECK(opt_.lr >= 0 && opt_.eps >= 0 && opt_.weight_decay >= 0, "[adamw] bad options: lr ",
              opt_.lr, ", eps ", opt_.eps, ", weight_decay ", opt_.weight_decay);
  FTUNE_CHECK(opt_.beta1 >= 0 && opt_.beta1 < 1 && opt_.beta2 >= 0 && opt_.beta2 < 1,
              "[adamw] betas must be in [0, 1), got (", opt_.beta1, ", ", opt_.beta2, ")");
  std::unordered_set<std::string> names;
  std::unordered_set<const TensorImpl*> seen;
  NoGradGuard ng;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const ParamGroup& g = groups_[gi];
    FTUNE_CHECK(g.lr_scale >= 0 && g.weight_decay.value_or(0.0) >= 0, "[adamw] group ", gi,
                ": bad lr_scale ", g.lr_scale, " or weight_decay ", g.weight_decay.value_or(0.0));
    for (const auto& [name, p] : g.params) {
      FTUNE_CHECK(p.defined(), "[adamw] parameter '", name, "' is undefined");
      FTUNE_CHECK(p.dtype() == DType::f32 || is_16bit(p.dtype()), "[adamw] parameter '", name,
                  "' is ", p.desc(), "; parameters are f32, bf16 or f16");
      FTUNE_CHECK(p.is_contiguous() && p.is_leaf(), "[adamw] parameter '", name,
                  "' must be a contiguous leaf tensor, got ", p.desc());
      FTUNE_CHECK(names.insert(name).second, "[adamw] two parameters are named '", name, "'");
      FTUNE_CHECK(seen.insert(p.impl()).second, "[adamw] parameter '", name,
                  "' is already in the optimizer under another name or group");
      Slot s;
      s.name = name;
      s.param = p;
      s.m = Tensor::zeros(p.shape(), DType::f32, p.device());  // state lives with the param
      s.v = Tensor::zeros(p.shape(), DType::f32, p.device());
      s.group = gi;
      slots_.push_back(std::move(s));
    }
  }
}

void AdamW::step(double grad_scale) {
  profiler::OpScope prof("adamw");
  FTUNE_CHECK(std::isfinite(grad_scale) && grad_scale >= 0, "[adamw] grad_scale must be finite "
              "and >= 0, got ", grad_scale);
  NoGradGuard ng;
  // Validate every gradient first: a bad one must leave all parameters and the state untouched.
  for (const Slot& s : slots_) {
    Tensor g = s.param.grad();
    if (!g.defined()) continue;
    FTUNE_CHECK(g.shape() == s.param.shape(), "[adamw] gradient ", g.desc(), " of parameter '",
                s.name, "' ", s.param.desc());
    FTUNE_CHECK(g.dtype() == s.param.dtype() || g.dtype() == DType::f32, "[adamw] gradient ",
                g.desc(), " of parameter '", s.name, "' ", s.param.desc(), " (expected ",
                dtype_name(s.param.dtype()),
                s.param.dtype() == DType::f32 ? ")" : " or f32)");
    FTUNE_CHECK(g.device() == s.param.device(), "[adamw] gradient ", g.desc(), " of parameter '",
                s.name, "' ", s.param.desc(), " is on another device");
  }
  ++step_;
  // Each parameter with a gradient is one whole piece of adamw_update_pieces (GPU pieces in one
  // multi-tensor launch per device): the same update as ZeRO-1's shards.
  std::vector<AdamWPiece> pieces;
  for (Slot& s : slots_) {
    Tensor g = s.param.grad();
    if (!g.defined()) continue;
    // The master is taken on the param's device (a device cast for GPU params).
    if (is_16bit(s.param.dtype()) && !s.master.defined()) s.master = s.param.to(DType::f32);
    ++s.step;
    const ParamGroup& grp = groups_[s.group];
    AdamWPiece pc;
    pc.param = s.param;
    pc.master = s.master;
    pc.grad = g.is_contiguous() ? g : g.contiguous();  // alive in pieces until the launch
    pc.m = s.m;
    pc.v = s.v;
    pc.lr = lr_ * grp.lr_scale;
    pc.weight_decay = grp.weight_decay.value_or(opt_.weight_decay);
    pc.step = s.step;
    pieces.push_back(std::move(pc));
  }
  adamw_update_pieces(pieces, opt_, grad_scale);
}

void adamw_update_pieces(const std::vector<AdamWPiece>& pieces, const AdamWOptions& opt,
                         double grad_scale) {
  NoGradGuard ng;
  FTUNE_CHECK(std::isfinite(grad_scale) && grad_scale >= 0, "[adamw] grad_scale must be finite "
              "and >= 0, got ", grad_scale);
  for (const AdamWPiece& p : pieces) {
    FTUNE_CHECK(p.param.defined() && p.grad.defined() && p.m.defined() && p.v.defined(),
                "[adamw] adamw_update_pieces: undefined tensor in a piece");
    const bool half = is_16bit(p.param.dtype());
    FTUNE_CHECK(p.param.dtype() == DType::f32 || half, "[adamw] piece ", p.param.desc());
    FTUNE_CHECK(half == p.master.defined(), "[adamw] piece ", p.param.desc(),
                half ? " needs an f32 master" : " takes no master");
    FTUNE_CHECK(p.grad.dtype() == p.param.dtype() || p.grad.dtype() == DType::f32,
                "[adamw] piece gradient ", p.grad.desc(), " of ", p.param.desc());
    for (const Tensor* t : {&p.master, &p.grad, &p.m, &p.v}) {
      if (!t->defined()) continue;
      FTUNE_CHECK(t->numel() == p.param.numel() && t->device() == p.param.device() &&
                      t->is_contiguous(),
                  "[adamw] piece tensor ", t->desc(), " does not match ", p.param.desc());
    }
    for (const Tensor* t : {&p.master, &p.m, &p.v})
      FTUNE_CHECK(!t->defined() || t->dtype() == DType::f32, "[adamw] piece state ", t->desc(),
                  " is not f32");
    FTUNE_CHECK(p.param.is_contiguous(), "[adamw] piece ", p.param.desc(), " is not contiguous");
  }
#ifdef FTUNE_HAVE_CUDA
  std::vector<kernels::cuda::AdamWTensor> on_gpu;
  int gpu_dev = -1;
  auto flush_gpu = [&] {
    if (on_gpu.empty()) return;
    ftune::cuda::set_device(gpu_dev);
    kernels::cuda::adamw_update_multi(on_gpu);
    on_gpu.clear();
  };
#endif
  for (const AdamWPiece& p : pieces) {
    if (p.param.numel() == 0) continue;
    kernels::AdamWConsts c = adamw_consts(opt, p.lr, p.weight_decay, p.step);
    c.grad_scale = float(grad_scale);
    if (p.param.device().is_cpu()) {
      Tensor master = p.master, m = p.m, v = p.v;
      update_param(p.param, master, p.grad, m, v, c);
      continue;
    }
#ifdef FTUNE_HAVE_CUDA
    if (p.param.device().index != gpu_dev) flush_gpu();
    gpu_dev = p.param.device().index;
    p.param.bump_version();  // the update writes the parameter in place
    on_gpu.push_back(gpu_slot(p.param, p.master, p.grad, p.m, p.v, c));
#endif
  }
#ifdef FTUNE_HAVE_CUDA
  flush_gpu();
#endif
}

void AdamW::zero_grad() {
  for (Slot& s : slots_) s.param.zero_grad();
}

OptimizerState AdamW::export_state() const {
  NoGradGuard ng;
  OptimizerState st;
  st.step = step_;
  for (const Slot& s : slots_) {
    st.tensors.emplace_back(s.name + ".exp_avg", host_copy(s.m));
    st.tensors.emplace_back(s.name + ".exp_avg_sq", host_copy(s.v));
    st.tensors.emplace_back(s.name + ".step", Tensor::full({}, double(s.step), DType::i64));
    if (is_16bit(s.param.dtype()))  // before the first update the master is the param itself
      st.tensors.emplace_back(s.name + ".master",
                              s.master.defined() ? host_copy(s.master)
                                                 : s.param.to(DType::f32).to(Device::cpu()));
  }
  return st;
}

void AdamW::import_state(const OptimizerState& state) {
  NoGradGuard ng;
  FTUNE_CHECK(state.step >= 0, "[adamw] state with negative step ", state.step);
  std::unordered_map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : state.tensors) {
    FTUNE_CHECK(t.defined(), "[adamw] state tensor '", name, "' is undefined");
    FTUNE_CHECK(by_name.emplace(name, &t).second, "[adamw] state has tensor '", name, "' twice");
  }
  // Check everything first so that a bad state changes nothing.
  auto get = [&](const std::string& name, const Shape& shape) -> const Tensor& {
    auto it = by_name.find(name);
    FTUNE_CHECK(it != by_name.end(), "[adamw] state has no tensor '", name, "'");
    FTUNE_CHECK(it->second->shape() == shape, "[adamw] state tensor '", name, "' is ",
                it->second->desc(), ", expected shape ", shape_str(shape));
    return *it->second;
  };
  // ".master" is optional both ways, so a run may resume with its params in another dtype: an
  // f32 param ignores it, a 16-bit param without one takes its master from the param.
  std::unordered_set<std::string> expected;
  for (const Slot& s : slots_) {
    get(s.name + ".exp_avg", s.param.shape());
    get(s.name + ".exp_avg_sq", s.param.shape());
    FTUNE_CHECK(get(s.name + ".step", {}).item() >= 0, "[adamw] negative step for '", s.name, "'");
    if (by_name.count(s.name + ".master")) get(s.name + ".master", s.param.shape());
    for (const char* k : {".exp_avg", ".exp_avg_sq", ".step", ".master"})
      expected.insert(s.name + k);
  }
  for (const auto& [name, t] : state.tensors)
    FTUNE_CHECK(expected.count(name), "[adamw] state tensor '", name,
                "' belongs to no parameter of this optimizer");
  for (Slot& s : slots_) {
    s.m.copy_(get(s.name + ".exp_avg", s.param.shape()));
    s.v.copy_(get(s.name + ".exp_avg_sq", s.param.shape()));
    s.step = int64_t(get(s.name + ".step", {}).item());
    s.master = Tensor();
    if (is_16bit(s.param.dtype()) && by_name.count(s.name + ".master")) {
      s.master = Tensor::empty(s.param.shape(), DType::f32, s.param.device());
      s.master.copy_(get(s.name + ".master", s.param.shape()));
      s.param.copy_(s.master);
    }
  }
  step_ = state.step;
}

// ---------------------------------------------------------------- schedules

ScheduleKind schedule_kind_from_name(const std::string& name) {
  if (name == "constant") return ScheduleKind::constant;
  if (name == "linear") return ScheduleKind::linear;
  if (name == "cosine") return ScheduleKind::cosine;
  FTUNE_THROW("[lr_schedule] unknown schedule '", name, "' (expected constant, linear or cosine)");
}

LRSchedule::LRSchedule(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps,
                       double min_lr_ratio)
    : kind_(kind),
      base_lr_(base_lr),
      warmup_(warmup_steps),
      total_(total_steps),
      min_ratio_(min_lr_ratio) {
  FTUNE_CHECK(warmup_steps >= 0, "[lr_schedule] negative warmup_steps ", warmup_steps);
  FTUNE_CHECK(min_lr_ratio >= 0 && min_lr_ratio <= 1, "[lr_schedule] min_lr_ratio ", min_lr_ratio,
              " is not in [0, 1]");
  FTUNE_CHECK(kind == ScheduleKind::constant || total_steps >= warmup_steps, "[lr_schedule] ",
              "total_steps ", total_steps, " is less than warmup_steps ", warmup_steps);
}

double LRSchedule::multiplier(int64_t step) const {
  if (step < warmup_) return double(step) / double(std::max<int64_t>(1, warmup_));
  if (kind_ == ScheduleKind::constant) return 1.0;
  const double span = double(std::max<int64_t>(1, total_ - warmup_));
  const double progress = std::min(1.0, double(step - warmup_) / span);
  const double f = kind_ == ScheduleKind::linear
                       ? 1.0 - progress
                       : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return min_ratio_ + (1.0 - min_ratio_) * f;
}

// ---------------------------------------------------------------- gradient norm

namespace {
// The defined gradients of the defined parameters.
std::vector<Tensor> grads_of(const std::vector<Tensor>& params) {
  std::vector<Tensor> gs;
  for (const Tensor& p : params) {
    if (!p.defined()) continue;
    Tensor g = p.grad();
    if (g.defined()) gs.push_back(g);
  }
  return gs;
}

// Calls f on each non-empty CPU tensor, and collects the GPU ones (all on one device) in gpu.
template <class F>
void for_each_tensor(const std::vector<Tensor>& xs, F&& f, std::vector<Tensor>* gpu) {
  for (const Tensor& g : xs) {
    FTUNE_CHECK(g.defined(), "[clip_grad_norm] undefined tensor");
    if (g.numel() == 0) continue;
    FTUNE_CHECK(is_floating(g.dtype()), "[clip_grad_norm] gradient ", g.desc());
    FTUNE_CHECK(g.is_contiguous(), "[clip_grad_norm] non-contiguous gradient ", g.desc());
    if (g.device().is_cpu()) {
      f(g);
      continue;
    }
    FTUNE_CHECK(gpu->empty() || gpu->front().device() == g.device(), "[clip_grad_norm] gradients ",
                "on two GPUs: ", gpu->empty() ? "" : gpu->front().desc(), " and ", g.desc());
    gpu->push_back(g);
  }
}

#ifdef FTUNE_HAVE_CUDA
std::vector<kernels::cuda::DeviceArray> device_arrays(const std::vector<Tensor>& gs) {
  std::vector<kernels::cuda::DeviceArray> out;
  for (const Tensor& g : gs) out.push_back({g.raw_data(), g.dtype(), g.numel()});
  if (!gs.empty()) ftune::cuda::set_device(gs.front().device().index);
  return out;
}
#endif

template <class F>
void dispatch_grad(const Tensor& g, F&& f) {
  switch (g.dtype()) {
    case DType::f32:
      f.template operator()<float>();
      break;
    case DType::f64:
      f.template operator()<double>();
      break;
    case DType::bf16:
      f.template operator()<bf16>();
      break;
    case DType::f16:
      f.template operator()<f16>();
      break;
    default:
      FTUNE_THROW("[clip_grad_norm] gradient ", g.desc());
  }
}
}  // namespace

double grad_sum_squares(const std::vector<Tensor>& params) {
  profiler::OpScope prof("grad_norm");
  return sum_squares(grads_of(params));
}

void scale_grads(const std::vector<Tensor>& params, double s) { scale_(grads_of(params), s); }

double sum_squares(const std::vector<Tensor>& xs) {
  double acc = 0.0;
  std::vector<Tensor> gpu;
  for_each_tensor(
      xs,
      [&](const Tensor& g) {
        dispatch_grad(
            g, [&]<class T>() { acc += kernels::cpu::sum_squares<T>(g.data<T>(), g.numel()); });
      },
      &gpu);
#ifdef FTUNE_HAVE_CUDA
  if (!gpu.empty()) acc += kernels::cuda::sum_squares_multi(device_arrays(gpu));  // one launch
#endif
  return acc;
}

void scale_(const std::vector<Tensor>& xs, double s) {
  std::vector<Tensor> gpu;
  for_each_tensor(
      xs,
      [&](const Tensor& g) {
        dispatch_grad(
            g, [&]<class T>() { kernels::cpu::scale_inplace<T>(g.data<T>(), g.numel(), s); });
      },
      &gpu);
#ifdef FTUNE_HAVE_CUDA
  if (!gpu.empty()) kernels::cuda::scale_inplace_multi(device_arrays(gpu), s);
#endif
}

double clip_coefficient(double norm, double max_norm) {
  if (!(max_norm > 0) || !std::isfinite(norm)) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));  // torch's clip_grad_norm_
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  profiler::OpScope prof("clip_grad_norm");
  FTUNE_CHECK(max_norm > 0, "[clip_grad_norm] max_norm must be positive, got ", max_norm);
  const double norm = std::sqrt(grad_sum_squares(params));
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) scale_grads(params, coef);
  return norm;
}

}  // namespace ftune::optim
