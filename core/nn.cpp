#include "core/nn.h"

#include <cmath>
#include <unordered_set>

namespace ftune::nn {

// ---------------------------------------------------------------- Module

void Module::register_parameter(const std::string& name, Tensor* member) {
  FTUNE_CHECK(!name.empty() && name.find('.') == std::string::npos, "[nn] bad parameter name '",
              name, "'");
  for (const auto& [n, p] : params_)
    FTUNE_CHECK(n != name, "[nn] parameter '", name, "' registered twice");
  for (const auto& [n, c] : children_)
    FTUNE_CHECK(n != name, "[nn] parameter '", name, "' has the name of a submodule");
  params_.emplace_back(name, member);
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> m) {
  FTUNE_CHECK(m != nullptr, "[nn] submodule '", name, "' is null");
  FTUNE_CHECK(!name.empty() && name.find('.') == std::string::npos, "[nn] bad submodule name '",
              name, "'");
  for (const auto& [n, c] : children_)
    FTUNE_CHECK(n != name, "[nn] submodule '", name, "' registered twice");
  for (const auto& [n, p] : params_)
    FTUNE_CHECK(n != name, "[nn] submodule '", name, "' has the name of a parameter");
  children_.emplace_back(name, std::move(m));
}

void Module::collect(const std::string& prefix, NamedTensors& out) const {
  for (const auto& [n, p] : params_)
    if (p->defined()) out.emplace_back(prefix + n, *p);
  for (const auto& [n, c] : children_) c->collect(prefix + n + ".", out);
}

void Module::move_params(Device dev, std::optional<DType> dt,
                         std::unordered_map<const TensorImpl*, Tensor>& moved) {
  for (auto& [n, p] : params_) {
    if (!p->defined()) continue;
    auto it = moved.find(p->impl());
    if (it != moved.end()) {  // tied: the same new tensor
      *p = it->second;
      continue;
    }
    const bool convert = dt && is_floating(p->dtype()) && p->dtype() != *dt;
    if (!convert && p->device() == dev) {
      p->zero_grad();
      moved.emplace(p->impl(), *p);
      continue;
    }
    const bool rg = p->requires_grad();
    Tensor t = p->detach();
    if (convert) t = t.to(*dt);
    if (t.device() != dev) t = t.to(dev);
    t.set_requires_grad(rg);
    t.set_name(p->name());
    moved.emplace(p->impl(), t);
    *p = t;
  }
  for (auto& [n, c] : children_) c->move_params(dev, dt, moved);
}

void Module::to_(Device dev, std::optional<DType> float_dtype) {
  std::unordered_map<const TensorImpl*, Tensor> moved;
  move_params(dev, float_dtype, moved);
}

NamedTensors Module::named_parameters() const {
  NamedTensors all, out;
  collect("", all);
  std::unordered_set<const TensorImpl*> seen;
  for (auto& [n, t] : all)
    if (seen.insert(t.impl()).second) out.emplace_back(std::move(n), std::move(t));
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [n, t] : named_parameters()) out.push_back(t);
  return out;
}

Tensor Module::parameter(const std::string& name) const {
  for (auto& [n, t] : named_parameters())
    if (n == name) return t;
  FTUNE_THROW("[nn] no parameter '", name, "'");
}

int64_t Module::num_parameters(bool trainable_only) const {
  int64_t n = 0;
  for (const auto& [name, t] : named_parameters())
    if (!trainable_only || t.requires_grad()) n += t.numel();
  return n;
}

std::vector<std::pair<std::string, Module*>> Module::named_modules() {
  std::vector<std::pair<std::string, Module*>> out{{"", this}};
  for (const auto& [n, c] : children_)
    for (auto& [sub, m] : c->named_modules()) out.emplace_back(sub.empty() ? n : n + "." + sub, m);
  return out;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [n, c] : children_) c->train(on);
}

void Module::requires_grad_(bool on) {
  for (auto& [n, p] : params_)
    if (p->defined()) p->set_requires_grad(on);
  for (auto& [n, c] : children_) c->requires_grad_(on);
}

void Module::zero_grad() {
  for (auto& [n, p] : params_)
    if (p->defined()) p->zero_grad();
  for (auto& [n, c] : children_) c->zero_grad();
}

// ---------------------------------------------------------------- layers

Linear::Linear(int64_t in_features, int64_t out_features, bool bias, Generator& gen, DType dtype)
    : in_(in_features), out_(out_features) {
  FTUNE_CHECK(in_features > 0 && out_features > 0, "[nn.Linear] bad sizes in ", in_features,
              ", out ", out_features);
  const double bound = 1.0 / std::sqrt(double(in_features));
  weight_ = rand({out_features, in_features}, gen, -bound, bound, dtype).set_requires_grad(true);
  register_parameter("weight", &weight_);
  if (bias) bias_ = rand({out_features}, gen, -bound, bound, dtype).set_requires_grad(true);
  register_parameter("bias", &bias_);
}

Embedding::Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double init_std,
                     DType dtype) {
  FTUNE_CHECK(num_embeddings > 0 && dim > 0, "[nn.Embedding] bad sizes ", num_embeddings, " x ",
              dim);
  weight_ = randn({num_embeddings, dim}, gen, 0.0, init_std, dtype).set_requires_grad(true);
  register_parameter("weight", &weight_);
}

LayerNorm::LayerNorm(int64_t dim, double eps, bool bias, DType dtype) : eps_(eps) {
  FTUNE_CHECK(dim > 0 && eps >= 0, "[nn.LayerNorm] bad dim ", dim, " or eps ", eps);
  weight_ = Tensor::ones({dim}, dtype).set_requires_grad(true);
  register_parameter("weight", &weight_);
  if (bias) bias_ = Tensor::zeros({dim}, dtype).set_requires_grad(true);
  register_parameter("bias", &bias_);
}

RMSNorm::RMSNorm(int64_t dim, double eps, DType dtype) : eps_(eps) {
  FTUNE_CHECK(dim > 0 && eps >= 0, "[nn.RMSNorm] bad dim ", dim, " or eps ", eps);
  weight_ = Tensor::ones({dim}, dtype).set_requires_grad(true);
  register_parameter("weight", &weight_);
}

}  // namespace ftune::nn
