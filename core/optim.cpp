#include "core/optim.h"

#include <cmath>
#include <numbers>
#include <unordered_map>
#include <unordered_set>

#include "core/autograd.h"
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
      FTUNE_CHECK(p.device().is_cpu(), "[adamw] has no GPU implementation yet (parameter '", name,
                  "' is ", p.desc(), ")");
      FTUNE_CHECK(p.is_contiguous() && p.is_leaf(), "[adamw] parameter '", name,
                  "' must be a contiguous leaf tensor, got ", p.desc());
      FTUNE_CHECK(names.insert(name).second, "[adamw] two parameters are named '", name, "'");
      FTUNE_CHECK(seen.insert(p.impl()).second, "[adamw] parameter '", name,
                  "' is already in the optimizer under another name or group");
      Slot s;
      s.name = name;
      s.param = p;
      s.m = Tensor::zeros(p.shape());
      s.v = Tensor::zeros(p.shape());
      s.group = gi;
      slots_.push_back(std::move(s));
    }
  }
}

void AdamW::step() {
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
    FTUNE_CHECK(g.device().is_cpu(), "[adamw] has no GPU implementation yet (gradient of '", s.name,
                "' is ", g.desc(), ")");
  }
  ++step_;
  for (Slot& s : slots_) {
    Tensor g = s.param.grad();
    if (!g.defined()) continue;
    if (!g.is_contiguous()) g = g.contiguous();
    if (is_16bit(s.param.dtype()) && !s.master.defined()) s.master = s.param.to(DType::f32);
    ++s.step;
    const ParamGroup& grp = groups_[s.group];
    const double lr = lr_ * grp.lr_scale;
    const double wd = grp.weight_decay.value_or(opt_.weight_decay);
    const double t = double(s.step);
    kernels::AdamWConsts c;
    c.decay = float(1.0 - lr * wd);
    c.beta1 = float(opt_.beta1);
    c.beta2 = float(opt_.beta2);
    c.eps = float(opt_.eps);
    c.step_size = float(lr / (1.0 - std::pow(opt_.beta1, t)));
    c.bc2_sqrt = float(std::sqrt(1.0 - std::pow(opt_.beta2, t)));
    update_param(s.param, s.master, g, s.m, s.v, c);
  }
}

void AdamW::zero_grad() {
  for (Slot& s : slots_) s.param.zero_grad();
}

OptimizerState AdamW::export_state() const {
  NoGradGuard ng;
  OptimizerState st;
  st.step = step_;
  for (const Slot& s : slots_) {
    st.tensors.emplace_back(s.name + ".exp_avg", s.m.clone());
    st.tensors.emplace_back(s.name + ".exp_avg_sq", s.v.clone());
    st.tensors.emplace_back(s.name + ".step", Tensor::full({}, double(s.step), DType::i64));
    if (is_16bit(s.param.dtype()))  // before the first update the master is the param itself
      st.tensors.emplace_back(s.name + ".master",
                              s.master.defined() ? s.master.clone() : s.param.to(DType::f32));
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
      s.master = Tensor::empty(s.param.shape());
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
template <class F>
void for_each_grad(const std::vector<Tensor>& params, F&& f) {
  for (const Tensor& p : params) {
    if (!p.defined()) continue;
    Tensor g = p.grad();
    if (!g.defined()) continue;
    FTUNE_CHECK(g.device().is_cpu(), "[clip_grad_norm] has no GPU implementation yet (", g.desc(),
                ")");
    FTUNE_CHECK(is_floating(g.dtype()), "[clip_grad_norm] gradient ", g.desc());
    FTUNE_CHECK(g.is_contiguous(), "[clip_grad_norm] non-contiguous gradient ", g.desc());
    f(g);
  }
}

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
  double acc = 0.0;
  for_each_grad(params, [&](const Tensor& g) {
    dispatch_grad(g,
                  [&]<class T>() { acc += kernels::cpu::sum_squares<T>(g.data<T>(), g.numel()); });
  });
  return acc;
}

void scale_grads(const std::vector<Tensor>& params, double s) {
  for_each_grad(params, [&](const Tensor& g) {
    dispatch_grad(g, [&]<class T>() { kernels::cpu::scale_inplace<T>(g.data<T>(), g.numel(), s); });
  });
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  FTUNE_CHECK(max_norm > 0, "[clip_grad_norm] max_norm must be positive, got ", max_norm);
  const double norm = std::sqrt(grad_sum_squares(params));
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) scale_grads(params, coef);
  return norm;
}

}  // namespace ftune::optim
