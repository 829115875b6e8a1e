// nn modules: a minimal Module (named parameters with HF-style dotted names, submodules,
// train/eval, freezing) and the leaf layers Linear, Embedding, LayerNorm, RMSNorm.
// Modules are held by shared_ptr and are neither copied nor moved (the parameter registry points
// at their members).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <unordered_map>
#include <string>
#include <utility>
#include <vector>

#include "core/ops.h"
#include "core/rng.h"

namespace ftune::nn {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Parameters in registration order, a module's own before its submodules', named by the dotted
  // path ("layers.0.self_attn.q_proj.weight"). Undefined ones (an absent bias) are left out; a
  // tensor registered under two names (tied weights) is listed once, under the first.
  NamedTensors named_parameters() const;
  std::vector<Tensor> parameters() const;
  // The parameter of that dotted name; throws when there is none.
  Tensor parameter(const std::string& name) const;
  int64_t num_parameters(bool trainable_only = false) const;  // elements, tied ones counted once

  // This module ("") and every submodule, depth first in registration order.
  std::vector<std::pair<std::string, Module*>> named_modules();
  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& named_children() const {
    return children_;
  }

  void train(bool on = true);  // this module and its submodules
  void eval() { train(false); }
  bool is_training() const { return training_; }
  // Freezes (false) or unfreezes every parameter of this module and its submodules.
  void requires_grad_(bool on);
  void zero_grad();  // drops the gradients of every parameter
  // Moves every parameter to dev and, when float_dtype is given, converts floating-point
  // parameters to it (bf16 training: the optimizer keeps the f32 masters). Tied parameters stay
  // tied, requires_grad is kept, gradients are dropped. Tensors held outside the registry (an
  // optimizer's state) are not touched: move the model before making its optimizer.
  void to_(Device dev, std::optional<DType> float_dtype = std::nullopt);

 protected:
  // Registers a member tensor; the registry follows the member if it is later reassigned (tying).
  void register_parameter(const std::string& name, Tensor* member);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    add_child(name, m);
    return m;
  }

 private:
  void add_child(const std::string& name, std::shared_ptr<Module> m);
  void collect(const std::string& prefix, NamedTensors& out) const;
  void move_params(Device dev, std::optional<DType> dt,
                   std::unordered_map<const TensorImpl*, Tensor>& moved);

  std::vector<std::pair<std::string, Tensor*>> params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// Submodules named "0", "1", ... (HF's "layers.0.").
class ModuleList : public Module {
 public:
  template <class M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> m) {
    register_module(std::to_string(items_.size()), m);
    items_.push_back(m);
    return m;
  }
  size_t size() const { return items_.size(); }
  const std::shared_ptr<Module>& operator[](size_t i) const { return items_.at(i); }
  template <class M>
  std::shared_ptr<M> at(size_t i) const {
    return std::dynamic_pointer_cast<M>(items_.at(i));
  }

 private:
  std::vector<std::shared_ptr<Module>> items_;
};

// y = x W^T + b, weight [out, in], bias [out]. Initialised like torch.nn.Linear: weight and bias
// uniform in +-1/sqrt(in) (kaiming_uniform with a = sqrt(5)).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias, Generator& gen,
         DType dtype = DType::f32);
  Tensor forward(const Tensor& x) const { return ops::linear(x, weight_, bias_); }
  Tensor& weight() { return weight_; }
  Tensor& bias() { return bias_; }  // undefined without bias
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

 private:
  int64_t in_, out_;
  Tensor weight_, bias_;
};

// weight [num, dim]; forward(ids [...]) -> [..., dim]. Initialised N(0, init_std^2): torch's
// nn.Embedding uses 1.0 (the default); HF models use their initializer_range, usually 0.02.
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double init_std = 1.0,
            DType dtype = DType::f32);
  Tensor forward(const Tensor& ids) const { return ops::embedding(weight_, ids); }
  Tensor& weight() { return weight_; }

 private:
  Tensor weight_;
};

// Over the last dim; weight 1, bias 0 (torch.nn.LayerNorm, eps 1e-5 like torch).
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool bias = true, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) const { return ops::layer_norm(x, weight_, bias_, eps_); }
  Tensor& weight() { return weight_; }
  Tensor& bias() { return bias_; }
  double eps() const { return eps_; }

 private:
  double eps_;
  Tensor weight_, bias_;
};

// Over the last dim; weight 1 (Llama's RMSNorm; eps 1e-6, the usual rms_norm_eps).
class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6, DType dtype = DType::f32);
  Tensor forward(const Tensor& x) const { return ops::rms_norm(x, weight_, eps_); }
  Tensor& weight() { return weight_; }
  double eps() const { return eps_; }

 private:
  double eps_;
  Tensor weight_;
};

}  // namespace ftune::nn
