// The decoder-only transformer of GPT-2 and the Llama family, built on the fused ops. Submodules
// mirror transformers' module tree so that named_parameters() are the checkpoint's names:
//   GPT-2: transformer.{wte, wpe, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2, mlp.{c_fc, c_proj}},
//   ln_f} Llama/Mistral/Qwen2: model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj,
//     mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm}
//   lm_head (tied: the embedding tensor itself, listed once under the embedding's name).
// GPT-2's Conv1D weights keep the checkpoint layout [in, out] and are applied as x @ W + b, so the
// parameters (and their gradients) are the checkpoint's tensors, shape for shape.
#include "models/transformer.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>
#include <unordered_map>

#include "core/error.h"
#include "core/rng.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "models/proj.h"

namespace ftune {

namespace {

// Set while from_pretrained_sharded builds its model: parameters are then zero-stride views of
// one element (no memory), sliced by shard_for_tp and allocated at their shard's size only.
thread_local bool t_defer_params = false;

Tensor new_param(const Shape& s, double fill = 0.0) {
  if (t_defer_params) return Tensor::full(Shape{}, fill).expand(s).set_requires_grad(true);
  return Tensor::full(s, fill).set_requires_grad(true);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// What one forward call needs beyond the activations.
struct Step {
  int64_t B = 0, T = 0;
  Tensor positions;   // i32|i64 [T] or [B, T]
  Tensor cu_q, cu_k;  // i32 varlen boundaries (packing, or the cache layout), else undefined
  KVCache* cache = nullptr;
  int64_t start = 0;  // first cache slot written by this call
};

}  // namespace

// ---------------------------------------------------------------- Proj (models/proj.h)

Proj::Proj(int64_t in, int64_t out, bool has_bias, bool conv1d)
    : in_(in), out_(out), full_in_(in), full_out_(out), conv1d_(conv1d) {
  weight = new_param(conv1d ? Shape{in, out} : Shape{out, in});
  register_parameter("weight", &weight);
  if (has_bias) bias = new_param({out});
  register_parameter("bias", &bias);
}

Tensor Proj::forward(const Tensor& x) const {
  if (split_ != TpSplit::none) {
    const bool col = split_ == TpSplit::column;
    // Column: the replicated input's gradient is partial per rank; row: the output is.
    const Tensor xin = col ? parallel::copy_to_tp(x, tp_) : x;
    Tensor y;
    if (has_lora()) {
      const Tensor w = conv1d_ ? weight.transpose(0, 1) : weight;
      const double p = is_training() ? lora_dropout_ : 0.0;
      // The replicated adapter matrix sees only this rank's part of the product.
      const Tensor a = col ? parallel::copy_to_tp(lora_A_->weight, tp_) : lora_A_->weight;
      const Tensor b = col ? lora_B_->weight : parallel::copy_to_tp(lora_B_->weight, tp_);
      // A row-parallel rank holds input features [offset, offset + in) of full_in: its dropout
      // mask is that slice of the one-process mask (a column-parallel one sees the full input).
      const int64_t off = col ? 0 : lora_A_shard().offset, full = col ? 0 : full_in_;
      y = ops::lora_linear(xin, w, col ? bias : Tensor(), a, b, lora_scale_, p, lora_seed_, off,
                           full);
    } else if (conv1d_) {
      y = ops::matmul(xin, weight);
      if (col && bias.defined()) y = ops::add(y, bias);
    } else {
      y = ops::linear(xin, weight, col ? bias : Tensor());
    }
    if (col) return y;
    y = parallel::reduce_from_tp(y, tp_);
    return bias.defined() ? ops::add(y, bias) : y;  // once, after the sum
  }
  if (has_lora()) {
    // The fused op takes W [out, in]: a Conv1D weight is passed as its transposed view, which the
    // op copies once per call (O(in * out), small next to the GEMM; see docs/lora.md).
    const Tensor w = conv1d_ ? weight.transpose(0, 1) : weight;
    const double p = is_training() ? lora_dropout_ : 0.0;
    return ops::lora_linear(x, w, bias, lora_A_->weight, lora_B_->weight, lora_scale_, p,
                            lora_seed_);
  }
  if (!conv1d_) return ops::linear(x, weight, bias);
  Tensor y = ops::matmul(x, weight);
  return bias.defined() ? ops::add(y, bias) : y;
}

parallel::ShardInfo Proj::split_info(int64_t full, int dim) const {
  parallel::ShardInfo si;
  si.dim = dim;
  si.full_size = full;
  si.blocks = blocks_;
  parallel::Range r = parallel::shard_range(full / blocks_, tp_->size(), tp_->rank());
  si.offset = r.offset;
  si.size = r.size;
  return si;
}

// Weight [out, in] (Conv1D [in, out]); bias [out]; A [r, in]; B [out, r].
parallel::ShardInfo Proj::weight_shard() const {
  if (split_ == TpSplit::column) return split_info(full_out_, conv1d_ ? 1 : 0);
  if (split_ == TpSplit::row) return split_info(full_in_, conv1d_ ? 0 : 1);
  return {};
}
parallel::ShardInfo Proj::bias_shard() const {
  return split_ == TpSplit::column ? split_info(full_out_, 0) : parallel::ShardInfo{};
}
parallel::ShardInfo Proj::lora_A_shard() const {
  return split_ == TpSplit::row ? split_info(full_in_, 1) : parallel::ShardInfo{};
}
parallel::ShardInfo Proj::lora_B_shard() const {
  return split_ == TpSplit::column ? split_info(full_out_, 0) : parallel::ShardInfo{};
}

void Proj::shard_for_tp(TpSplit split, std::shared_ptr<parallel::Communicator> tp, int blocks) {
  FTUNE_CHECK(split_ == TpSplit::none && split != TpSplit::none && tp,
              "[tp] a projection is sharded once, column or row, over a communicator");
  FTUNE_CHECK(!has_lora(), "[tp] shard the model before adding LoRA adapters");
  const int64_t full = split == TpSplit::column ? full_out_ : full_in_;
  FTUNE_CHECK(blocks >= 1 && full % (blocks * tp->size()) == 0, "[tp] a projection of ", full,
              " features (", blocks, " blocks) does not split evenly over ", tp->size(),
              " tp ranks");
  split_ = split;
  tp_ = std::move(tp);
  blocks_ = split == TpSplit::column ? blocks : 1;
  auto reslice = [](Tensor& t, const parallel::ShardInfo& si) {
    if (!t.defined() || si.replicated()) return;
    const bool rg = t.requires_grad();
    t = parallel::shard_slice(t, si).set_requires_grad(rg);
  };
  reslice(weight, weight_shard());
  reslice(bias, bias_shard());
  if (split == TpSplit::column)
    out_ = full_out_ / tp_->size();
  else
    in_ = full_in_ / tp_->size();
}

void Proj::add_lora_full(const Tensor& a, const Tensor& b, double scale, double dropout) {
  FTUNE_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == full_in_ && b.size(0) == full_out_,
              "[lora] adapter A ", a.desc(), " / B ", b.desc(), " must be [r, ", full_in_, "] / [",
              full_out_, ", r]");
  if (split_ == TpSplit::none) return add_lora(a, b, scale, dropout);
  const bool ra = a.requires_grad(), rb = b.requires_grad();
  add_lora(parallel::shard_slice(a, lora_A_shard()).detach().set_requires_grad(ra),
           parallel::shard_slice(b, lora_B_shard()).detach().set_requires_grad(rb), scale, dropout);
}

void Proj::add_lora(Tensor a, Tensor b, double scale, double dropout) {
  FTUNE_CHECK(!has_lora(), "[lora] this projection already has an adapter");
  const int64_t r = a.size(0);
  FTUNE_CHECK(
      a.dim() == 2 && b.dim() == 2 && a.shape() == Shape({r, in_}) && b.shape() == Shape({out_, r}),
      "[lora] adapter A ", a.desc(), " / B ", b.desc(), " must be [r, ", in_, "] / [", out_,
      ", r]");
  if (!lora_A_) {
    lora_A_ = register_module("lora_A", std::make_shared<LoraWeight>());
    lora_B_ = register_module("lora_B", std::make_shared<LoraWeight>());
  }
  lora_A_->weight = std::move(a);
  lora_B_->weight = std::move(b);
  lora_A_->train(is_training());
  lora_B_->train(is_training());
  lora_scale_ = scale;
  lora_dropout_ = dropout;
}

void Proj::remove_lora() {
  if (!lora_A_) return;
  lora_A_->weight = Tensor();
  lora_B_->weight = Tensor();
}

namespace {

// LayerNorm (weight and bias) or RMSNorm (weight).
class Norm : public nn::Module {
 public:
  Norm(int64_t dim, double eps, bool layer_norm) : eps_(eps), layer_norm_(layer_norm) {
    weight = new_param({dim}, 1.0);
    register_parameter("weight", &weight);
    if (layer_norm) bias = new_param({dim});
    register_parameter("bias", &bias);
  }
  Tensor forward(const Tensor& x) const {
    return layer_norm_ ? ops::layer_norm(x, weight, bias, eps_) : ops::rms_norm(x, weight, eps_);
  }
  Tensor weight, bias;

 private:
  double eps_;
  bool layer_norm_;
};

class Embed : public nn::Module {
 public:
  Embed(int64_t num, int64_t dim) : num_(num) {
    weight = new_param({num, dim});
    register_parameter("weight", &weight);
  }
  Tensor forward(const Tensor& ids) const {
    return tp_ ? parallel::vocab_parallel_embedding(weight, ids, shard_.offset, tp_)
               : ops::embedding(weight, ids);
  }
  // Vocab-parallel: this rank keeps its rows (shard_range: the last shard may be smaller).
  void shard_for_tp(std::shared_ptr<parallel::Communicator> tp) {
    parallel::Range r = parallel::shard_range(num_, tp->size(), tp->rank());
    shard_ = {0, num_, r.offset, r.size, 1};
    tp_ = std::move(tp);
    weight = parallel::shard_slice(weight, shard_).set_requires_grad(weight.requires_grad());
  }
  parallel::ShardInfo shard() const { return shard_; }
  Tensor weight;

 private:
  int64_t num_;
  std::shared_ptr<parallel::Communicator> tp_;
  parallel::ShardInfo shard_;
};

// lm_head: its own [vocab, hidden] weight, or (tied) the embedding tensor.
class LmHead : public nn::Module {
 public:
  explicit LmHead(Tensor w) : weight(std::move(w)) { register_parameter("weight", &weight); }
  Tensor weight;
};

class SelfAttention : public nn::Module {
 public:
  SelfAttention(const ModelConfig& c, int64_t layer)
      : H_(c.num_attention_heads),
        Hkv_(c.num_key_value_heads),
        D_(c.head_dim),
        rope_(!c.has_learned_positions()),
        theta_(c.rope_theta),
        layer_(layer) {
    const int64_t C = c.hidden_size, H = H_, Hkv = Hkv_, D = D_;
    if (c.family == ModelFamily::gpt2) {
      c_attn_ = register_module("c_attn", std::make_shared<Proj>(C, 3 * C, true, true));
      c_proj_ = register_module("c_proj", std::make_shared<Proj>(C, C, true, true));
    } else {
      q_proj_ =
          register_module("q_proj", std::make_shared<Proj>(C, H * D, c.attention_bias, false));
      k_proj_ =
          register_module("k_proj", std::make_shared<Proj>(C, Hkv * D, c.attention_bias, false));
      v_proj_ =
          register_module("v_proj", std::make_shared<Proj>(C, Hkv * D, c.attention_bias, false));
      o_proj_ =
          register_module("o_proj", std::make_shared<Proj>(H * D, C, c.attention_out_bias, false));
    }
  }

  // x [B, T, C] -> [B, T, C]
  Tensor forward(const Tensor& x, const Step& s) const {
    const int64_t B = s.B, T = s.T, H = H_, Hkv = Hkv_, D = D_;
    Tensor q, k, v;
    if (c_attn_) {  // fused [q | k | v] along the features, each split into heads as HF does
      Tensor qkv = c_attn_->forward(x);
      const int64_t Q = H * D, K = Hkv * D;  // C and C, or this rank's heads under TP
      q = qkv.slice(2, 0, Q).reshape({B, T, H, D});
      k = qkv.slice(2, Q, Q + K).reshape({B, T, Hkv, D});
      v = qkv.slice(2, Q + K, Q + 2 * K).reshape({B, T, Hkv, D});
    } else if (fuse_ && base_frozen()) {    // one batched op over [W_q; W_k; W_v] (set_fused_qkv)
      if (!views_intact()) fuse_weights();  // the model was moved (to_) since: fuse again
      Tensor qkv = fused_forward(x);
      const int64_t Q = H * D, K = Hkv * D;
      q = qkv.slice(2, 0, Q).reshape({B, T, H, D});
      k = qkv.slice(2, Q, Q + K).reshape({B, T, Hkv, D});
      v = qkv.slice(2, Q + K, Q + 2 * K).reshape({B, T, Hkv, D});
    } else {
      q = q_proj_->forward(x).view({B, T, H, D});
      k = k_proj_->forward(x).view({B, T, Hkv, D});
      v = v_proj_->forward(x).view({B, T, Hkv, D});
    }
    if (rope_) {
      q = ops::rope(q, s.positions, theta_);
      k = ops::rope(k, s.positions, theta_);
    }
    ops::AttentionOptions ao;  // causal, scale 1/sqrt(head_dim) (GPT-2's scale_attn_weights)
    Tensor o;
    if (s.cache) {
      // This step's K/V go into their slots; the queries then read the whole cache row, laid out
      // as varlen sequences that keep padding and unfilled slots apart (see Transformer).
      Tensor& kc = s.cache->k[size_t(layer_)];
      Tensor& vc = s.cache->v[size_t(layer_)];
      kc.slice(1, s.start, s.start + T).copy_(k);
      vc.slice(1, s.start, s.start + T).copy_(v);
      const int64_t M = s.cache->max_len;
      ao.cu_seqlens_q = s.cu_q;
      ao.cu_seqlens_k = s.cu_k;
      o = ops::attention(q.reshape({B * T, H, D}), kc.view({B * M, Hkv, D}),
                         vc.view({B * M, Hkv, D}), ao);
    } else if (s.cu_q.defined()) {
      ao.cu_seqlens_q = ao.cu_seqlens_k = s.cu_q;
      o = ops::attention(q.reshape({B * T, H, D}), k.reshape({B * T, Hkv, D}),
                         v.reshape({B * T, Hkv, D}), ao);
    } else {
      o = ops::attention(q, k, v, ao);
    }
    o = o.reshape({B, T, H * D});
    return c_proj_ ? c_proj_->forward(o) : o_proj_->forward(o);
  }

  // By heads: H / tp query heads and Hkv / tp kv heads per rank (the caller checked both
  // divide); the groups of grouped-query attention stay whole on a rank.
  void shard_for_tp(const std::shared_ptr<parallel::Communicator>& tp) {
    if (c_attn_) {
      c_attn_->shard_for_tp(TpSplit::column, tp, 3);
      c_proj_->shard_for_tp(TpSplit::row, tp);
    } else {
      for (auto* p : {&q_proj_, &k_proj_, &v_proj_}) (*p)->shard_for_tp(TpSplit::column, tp);
      o_proj_->shard_for_tp(TpSplit::row, tp);
    }
    H_ /= tp->size();
    Hkv_ /= tp->size();
  }

  // Batched q/k/v (Transformer::set_fused_qkv): the three weights (and biases) become row blocks
  // of one buffer [W_q; W_k; W_v], so one GEMM computes all three with no copy of the weights.
  // Used while the three are frozen (LoRA); GPT-2's c_attn is fused already.
  void set_fused_qkv(bool on) {
    fuse_ = on && q_proj_ != nullptr;
    if (fuse_ && !views_intact()) fuse_weights();
  }
  bool fused_qkv_active() const { return fuse_ && base_frozen() && views_intact(); }

 private:
  std::array<Proj*, 3> qkv() const { return {q_proj_.get(), k_proj_.get(), v_proj_.get()}; }

  bool base_frozen() const {
    for (const Proj* p : qkv())
      if (p->weight.requires_grad() || (p->bias.defined() && p->bias.requires_grad())) return false;
    return true;
  }

  // Whether q/k/v's weights (biases) are still consecutive row blocks of qkv_w_ (qkv_b_): a
  // parameter replaced since (Module::to_, a load that assigns) breaks this, and the fused
  // buffers are then rebuilt from the parameters, never the other way round.
  bool views_intact() const {
    if (!qkv_w_.defined()) return false;
    const int64_t C = qkv_w_.size(1);
    const size_t es = dtype_size(qkv_w_.dtype());
    auto at = [&](const Tensor& buf, const Tensor& t, int64_t row, int64_t width) {
      return t.defined() && t.dtype() == buf.dtype() && t.device() == buf.device() &&
             t.is_contiguous() && t.dim() == (width ? 2 : 1) && (!width || t.size(1) == width) &&
             t.raw_data() ==
                 static_cast<char*>(buf.raw_data()) + size_t(row * (width ? width : 1)) * es;
    };
    int64_t row = 0;
    for (const Proj* p : qkv()) {
      if (!at(qkv_w_, p->weight, row, C)) return false;
      if (p->bias.defined() != qkv_b_.defined()) return false;
      if (qkv_b_.defined() && !at(qkv_b_, p->bias, row, 0)) return false;
      row += p->weight.size(0);
    }
    return row == qkv_w_.size(0) && (!qkv_b_.defined() || row == qkv_b_.size(0));
  }

  // Copies q/k/v's weights (biases) into one buffer and makes the parameters views of it (the
  // separate tensors are released: no weight is held twice). Names and requires_grad are kept.
  void fuse_weights() const {
    NoGradGuard no_grad;
    const Tensor& wq = q_proj_->weight;
    int64_t rows = 0;
    for (const Proj* p : qkv()) rows += p->weight.size(0);
    const bool has_bias = q_proj_->bias.defined();
    qkv_w_ = Tensor::empty({rows, wq.size(1)}, wq.dtype(), wq.device());
    qkv_b_ = has_bias ? Tensor::empty({rows}, wq.dtype(), wq.device()) : Tensor();
    auto repoint = [](Tensor& param, const Tensor& buf, int64_t r0, int64_t r1) {
      buf.slice(0, r0, r1).copy_(param);
      Tensor view = buf.slice(0, r0, r1).detach();
      view.set_name(param.name());
      view.set_requires_grad(param.requires_grad());
      param = view;
    };
    int64_t row = 0;
    for (Proj* p : qkv()) {
      const int64_t n = p->weight.size(0);
      repoint(p->weight, qkv_w_, row, row + n);
      if (has_bias) repoint(p->bias, qkv_b_, row, row + n);
      row += n;
    }
  }

  // [B, T, C] -> [B, T, Q + 2K]: q | k | v, each with its adapter if it has one. Under tensor
  // parallelism the three are column-parallel (this rank's heads): the input and the replicated
  // A matrices enter through copy_to_tp, as in Proj::forward.
  Tensor fused_forward(const Tensor& x) const {
    const bool col = q_proj_->tp_split() == TpSplit::column;
    const auto& tp = q_proj_->tp_group();
    std::vector<ops::LoraSegment> segs;
    for (const Proj* p : qkv()) {
      ops::LoraSegment s;
      s.out = p->out_features();
      if (p->has_lora()) {
        s.a = col ? parallel::copy_to_tp(p->lora_A(), tp) : p->lora_A();
        s.b = p->lora_B();
        s.scale = p->lora_scale();
        s.dropout = p->is_training() ? p->lora_dropout() : 0.0;
        s.seed = p->lora_seed();
      }
      segs.push_back(std::move(s));
    }
    const Tensor xin = col ? parallel::copy_to_tp(x, tp) : x;
    return ops::lora_linear_multi(xin, qkv_w_, qkv_b_, segs);
  }

  int64_t H_, Hkv_, D_;
  bool rope_;
  double theta_;
  int64_t layer_;
  std::shared_ptr<Proj> c_attn_, c_proj_, q_proj_, k_proj_, v_proj_, o_proj_;
  bool fuse_ = false;
  mutable Tensor qkv_w_, qkv_b_;  // the fused buffers; not parameters (q/k/v's views are)
};

class Mlp : public nn::Module {
 public:
  explicit Mlp(const ModelConfig& c) {
    const int64_t C = c.hidden_size, I = c.intermediate_size;
    if (c.family == ModelFamily::gpt2) {
      c_fc_ = register_module("c_fc", std::make_shared<Proj>(C, I, true, true));
      c_proj_ = register_module("c_proj", std::make_shared<Proj>(I, C, true, true));
    } else {
      gate_ = register_module("gate_proj", std::make_shared<Proj>(C, I, c.mlp_bias, false));
      up_ = register_module("up_proj", std::make_shared<Proj>(C, I, c.mlp_bias, false));
      down_ = register_module("down_proj", std::make_shared<Proj>(I, C, c.mlp_bias, false));
    }
  }
  Tensor forward(const Tensor& x) const {
    if (c_fc_) return c_proj_->forward(ops::gelu(c_fc_->forward(x)));
    return down_->forward(ops::swiglu(gate_->forward(x), up_->forward(x)));
  }
  // By features: the activation is elementwise, so each rank's intermediate slice is exact.
  void shard_for_tp(const std::shared_ptr<parallel::Communicator>& tp) {
    if (c_fc_) {
      c_fc_->shard_for_tp(TpSplit::column, tp);
      c_proj_->shard_for_tp(TpSplit::row, tp);
    } else {
      gate_->shard_for_tp(TpSplit::column, tp);
      up_->shard_for_tp(TpSplit::column, tp);
      down_->shard_for_tp(TpSplit::row, tp);
    }
  }

 private:
  std::shared_ptr<Proj> c_fc_, c_proj_, gate_, up_, down_;
};

// Pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)). Submodules registered in
// transformers' order (the order of its state dict).
class Block : public nn::Module {
 public:
  Block(const ModelConfig& c, int64_t layer) {
    const bool ln = c.uses_layer_norm();
    auto norm1 = std::make_shared<Norm>(c.hidden_size, c.norm_eps, ln);
    auto norm2 = std::make_shared<Norm>(c.hidden_size, c.norm_eps, ln);
    auto attn = std::make_shared<SelfAttention>(c, layer);
    auto mlp = std::make_shared<Mlp>(c);
    if (c.family == ModelFamily::gpt2) {
      norm1_ = register_module("ln_1", norm1);
      attn_ = register_module("attn", attn);
      norm2_ = register_module("ln_2", norm2);
      mlp_ = register_module("mlp", mlp);
    } else {
      attn_ = register_module("self_attn", attn);
      mlp_ = register_module("mlp", mlp);
      norm1_ = register_module("input_layernorm", norm1);
      norm2_ = register_module("post_attention_layernorm", norm2);
    }
  }
  Tensor forward(const Tensor& x, const Step& s) const {
    Tensor h = ops::add(x, attn_->forward(norm1_->forward(x), s));
    return ops::add(h, mlp_->forward(norm2_->forward(h)));
  }
  void shard_for_tp(const std::shared_ptr<parallel::Communicator>& tp) {
    attn_->shard_for_tp(tp);
    mlp_->shard_for_tp(tp);
  }

 private:
  std::shared_ptr<Norm> norm1_, norm2_;
  std::shared_ptr<SelfAttention> attn_;
  std::shared_ptr<Mlp> mlp_;
};

// GPT2Model ("transformer") or LlamaModel ("model").
class Body : public nn::Module {
 public:
  explicit Body(const ModelConfig& c) {
    const bool gpt2 = c.family == ModelFamily::gpt2;
    embed = register_module(gpt2 ? "wte" : "embed_tokens",
                            std::make_shared<Embed>(c.vocab_size, c.hidden_size));
    if (gpt2)
      wpe =
          register_module("wpe", std::make_shared<Embed>(c.max_position_embeddings, c.hidden_size));
    layers_ = register_module(gpt2 ? "h" : "layers", std::make_shared<nn::ModuleList>());
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      blocks_.push_back(layers_->push_back(std::make_shared<Block>(c, l)));
    norm_ = register_module(gpt2 ? "ln_f" : "norm",
                            std::make_shared<Norm>(c.hidden_size, c.norm_eps, c.uses_layer_norm()));
  }
  Tensor forward(const Tensor& ids, const Step& s) const {
    Tensor x = embed->forward(ids);
    if (wpe) x = ops::add(x, wpe->forward(s.positions));  // [B, T, C] + [B, T, C] or [T, C]
    const bool ckpt = checkpointing && is_training() && grad_enabled() && !s.cache;
    for (const auto& b : blocks_) {
      if (ckpt) {
        // The closure outlives this call (it runs in the backward): Step and block by value.
        x = checkpoint([b, s](const Tensor& in) { return b->forward(in, s); }, x, b->parameters());
      } else {
        x = b->forward(x, s);
      }
    }
    return norm_->forward(x);
  }
  void shard_for_tp(const std::shared_ptr<parallel::Communicator>& tp) {
    embed->shard_for_tp(tp);  // wpe stays replicated
    for (auto& b : blocks_) b->shard_for_tp(tp);
  }
  std::shared_ptr<Embed> embed, wpe;
  bool checkpointing = false;

 private:
  std::shared_ptr<nn::ModuleList> layers_;
  std::vector<std::shared_ptr<Block>> blocks_;
  std::shared_ptr<Norm> norm_;
};

// Refuses configurations hf_config accepts but this model cannot compute exactly.
void check_supported(const ModelConfig& c) {
  FTUNE_CHECK(
      c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 && c.num_hidden_layers > 0 &&
          c.num_attention_heads > 0 && c.num_key_value_heads > 0 && c.head_dim > 0 &&
          c.num_attention_heads % c.num_key_value_heads == 0 && c.max_position_embeddings > 0,
      "[transformer] bad sizes in the config of ", c.architecture, ": vocab ", c.vocab_size,
      ", hidden ", c.hidden_size, ", intermediate ", c.intermediate_size, ", layers ",
      c.num_hidden_layers, ", heads ", c.num_attention_heads, ", kv heads ", c.num_key_value_heads,
      ", head_dim ", c.head_dim);
  if (c.family == ModelFamily::gpt2) {
    FTUNE_CHECK(c.hidden_act == "gelu_new" || c.hidden_act == "gelu_pytorch_tanh",
                "[transformer] GPT-2 activation_function '", c.hidden_act,
                "' is not supported: ftune's GELU is the tanh approximation (gelu_new, "
                "gelu_pytorch_tanh); the exact erf GELU has no op yet");
    FTUNE_CHECK(c.num_key_value_heads == c.num_attention_heads &&
                    c.head_dim * c.num_attention_heads == c.hidden_size,
                "[transformer] GPT-2 needs head_dim * heads == n_embd (", c.head_dim, " * ",
                c.num_attention_heads, " vs ", c.hidden_size, ")");
  } else {
    FTUNE_CHECK(c.hidden_act == "silu", "[transformer] ", c.architecture, " hidden_act '",
                c.hidden_act, "' is not supported (only silu: SwiGLU)");
    FTUNE_CHECK(c.head_dim % 2 == 0, "[transformer] head_dim ", c.head_dim,
                " must be even (RoPE rotates pairs)");
  }
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::bf16:
      return "bfloat16";
    case DType::f16:
      return "float16";
    case DType::f64:
      return "float64";
    default:
      return "";
  }
}

// Tensors transformers keeps in some checkpoints that are not parameters: GPT-2's causal-mask
// buffers and the rotary inv_freq of older Llama saves. Both are recomputed, so they are skipped.
bool is_known_buffer(const ModelConfig& c, const std::string& name) {
  if (c.family == ModelFamily::gpt2)
    return ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias");
  return ends_with(name, "rotary_emb.inv_freq");
}

std::string list_names(const std::vector<std::string>& names) {
  std::string s;
  const size_t shown = std::min<size_t>(names.size(), 16);
  for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > shown) s += str_cat(", ... (", names.size() - shown, " more)");
  return s;
}

}  // namespace

struct Transformer::Impl {
  std::shared_ptr<Body> body;
  std::shared_ptr<LmHead> head;
  std::shared_ptr<parallel::Communicator> tp;  // set by shard_for_tp
  parallel::ShardInfo head_shard;              // lm_head rows of this rank (untied or tied)
};

Transformer::Transformer(const ModelConfig& cfg) : cfg_(cfg), impl_(std::make_shared<Impl>()) {
  check_supported(cfg_);
  const char* body_name = cfg_.family == ModelFamily::gpt2 ? "transformer" : "model";
  impl_->body = register_module(body_name, std::make_shared<Body>(cfg_));
  Tensor head_w = cfg_.tie_word_embeddings ? impl_->body->embed->weight
                                           : new_param({cfg_.vocab_size, cfg_.hidden_size});
  impl_->head = register_module("lm_head", std::make_shared<LmHead>(head_w));
}

KVCache Transformer::make_cache(int64_t batch, int64_t max_len, std::vector<int64_t> pad) const {
  return KVCache::make(cfg_.num_hidden_layers, batch, max_len, cfg_.num_key_value_heads / tp_size(),
                       cfg_.head_dim, std::move(pad), impl_->body->embed->weight.dtype(),
                       impl_->body->embed->weight.device());
}

Tensor Transformer::hidden_states(const Tensor& ids, const ForwardOptions& opt) {
  FTUNE_CHECK(
      ids.defined() && ids.dim() == 2 && (ids.dtype() == DType::i32 || ids.dtype() == DType::i64),
      "[transformer] ids must be i32|i64 [B, T], got ", ids.defined() ? ids.desc() : "undefined");
  Step s;
  s.B = ids.size(0);
  s.T = ids.size(1);
  FTUNE_CHECK(s.B > 0 && s.T > 0, "[transformer] empty batch ", ids.desc());
  const int64_t B = s.B, T = s.T;

  // A cached forward is for generation: K/V live in the cache, outside any graph, so nothing is
  // recorded (a gradient through it would silently miss the cached keys).
  std::optional<NoGradGuard> no_grad;
  if (opt.cache) {
    KVCache& c = *opt.cache;
    FTUNE_CHECK(!opt.cu_seqlens.defined(), "[transformer] cu_seqlens (packing) and a KV cache ",
                "cannot be used together");
    FTUNE_CHECK(c.batch == B && int64_t(c.pad.size()) == B, "[transformer] the KV cache holds ",
                c.batch, " rows (", c.pad.size(), " pads) but ids are ", ids.desc());
    FTUNE_CHECK(int64_t(c.k.size()) == cfg_.num_hidden_layers &&
                    int64_t(c.v.size()) == cfg_.num_hidden_layers,
                "[transformer] the KV cache has ", c.k.size(), " layers, the model ",
                cfg_.num_hidden_layers);
    const Shape want{B, c.max_len, cfg_.num_key_value_heads / tp_size(), cfg_.head_dim};
    for (size_t l = 0; l < c.k.size(); ++l)
      FTUNE_CHECK(c.k[l].defined() && c.v[l].defined() && c.k[l].shape() == want &&
                      c.v[l].shape() == want && c.k[l].is_contiguous() && c.v[l].is_contiguous(),
                  "[transformer] KV cache layer ", l, " must be contiguous ", shape_str(want),
                  ", got k ", c.k[l].defined() ? c.k[l].desc() : "undefined");
    FTUNE_CHECK(c.length >= 0 && c.length + T <= c.max_len,
                "[transformer] KV cache full: ", c.length, " slots filled + ", T,
                " new tokens > max_len ", c.max_len);
    FTUNE_CHECK(B * c.max_len <= INT32_MAX, "[transformer] KV cache of ", B, " x ", c.max_len,
                " slots exceeds the i32 token index of the attention op");
    for (int64_t r = 0; r < B; ++r)
      FTUNE_CHECK(c.pad[size_t(r)] >= 0 && c.pad[size_t(r)] <= c.max_len,
                  "[transformer] KV cache pad[", r, "] = ", c.pad[size_t(r)], " is outside [0, ",
                  c.max_len, "]");
    s.cache = &c;
    s.start = c.length;
    no_grad.emplace();
    // Row r of the flattened cache [B * max_len] is three varlen sequences: its padding (with the
    // pad queries of this step, whose output is never used), its real tokens (with this step's
    // real queries; bottom-right causal alignment gives query t the slots <= start + t), and the
    // unfilled tail (no queries). Padding thus never leaks into real tokens.
    std::vector<int32_t> cq{0}, ck{0};
    const int64_t end = s.start + T;
    for (int64_t r = 0; r < B; ++r) {
      const int64_t pad = c.pad[size_t(r)];
      const int64_t q_pad = std::clamp<int64_t>(pad - s.start, 0, T);
      const int64_t k_pad = std::min(pad, end);
      const int64_t base_q = r * T, base_k = r * c.max_len;
      cq.push_back(int32_t(base_q + q_pad));
      cq.push_back(int32_t(base_q + T));
      cq.push_back(int32_t(base_q + T));
      ck.push_back(int32_t(base_k + k_pad));
      ck.push_back(int32_t(base_k + end));
      ck.push_back(int32_t(base_k + c.max_len));
    }
    s.cu_q = Tensor::from_vector(cq, {int64_t(cq.size())});
    s.cu_k = Tensor::from_vector(ck, {int64_t(ck.size())});
  }

  if (opt.positions.defined()) {
    const Tensor& p = opt.positions;
    FTUNE_CHECK((p.dtype() == DType::i32 || p.dtype() == DType::i64) &&
                    (p.shape() == Shape{T} || p.shape() == Shape{B, T}),
                "[transformer] positions must be i32|i64 [", T, "] or [", B, ", ", T, "] for ids ",
                ids.desc(), ", got ", p.desc());
    s.positions = p;
  } else if (opt.cache) {
    // Slot s of row r has position s - pad[r]; pad slots get 0 (their output is unused).
    std::vector<int64_t> pos(size_t(B * T));
    for (int64_t r = 0; r < B; ++r)
      for (int64_t t = 0; t < T; ++t)
        pos[size_t(r * T + t)] = std::max<int64_t>(0, s.start + t - opt.cache->pad[size_t(r)]);
    s.positions = Tensor::from_vector(pos, {B, T});
  } else {
    FTUNE_CHECK(!opt.cu_seqlens.defined(), "[transformer] packed sequences (cu_seqlens) need ",
                "their positions: ForwardOptions.positions is undefined");
    s.positions = Tensor::arange(T, DType::i64);
  }
  // Learned positions stop at n_positions; a sliding window (accepted only when it masks nothing
  // up to max_seq_len()) would start masking past it.
  if (cfg_.has_learned_positions() || cfg_.sliding_window) {
    const int64_t limit = cfg_.max_seq_len();
    for (int64_t p : s.positions.to_vector<int64_t>())
      FTUNE_CHECK(p >= 0 && p < limit, "[transformer] position ", p, " is outside [0, ", limit,
                  ") for ", cfg_.architecture,
                  cfg_.has_learned_positions()
                      ? " (learned positions: n_positions)"
                      : " (sliding_window: longer needs windowed attention)");
  }

  if (opt.cu_seqlens.defined()) {
    const Tensor& cu = opt.cu_seqlens;
    FTUNE_CHECK(cu.dim() == 1 && (cu.dtype() == DType::i32 || cu.dtype() == DType::i64),
                "[transformer] cu_seqlens must be i32|i64 [n + 1], got ", cu.desc());
    s.cu_q = cu.dtype() == DType::i32 ? cu : cu.to(DType::i32);
  }

  // Inputs follow the model: ids and positions built on the host (generation, evaluation) go to
  // the GPU of a model that lives there. cu_seqlens stay where they are (the attention op reads
  // the boundaries on the host to size its grid).
  const Device dev = impl_->body->embed->weight.device();
  if (s.positions.device() != dev) s.positions = s.positions.to(dev);
  Tensor h = impl_->body->forward(ids.device() == dev ? ids : ids.to(dev), s);
  if (opt.cache) opt.cache->length += T;
  return h;
}

Tensor Transformer::forward(const Tensor& ids, const ForwardOptions& opt) {
  std::optional<NoGradGuard> no_grad;  // a cached forward records nothing (see hidden_states)
  if (opt.cache) no_grad.emplace();
  Tensor logits = forward_logits_shard(ids, opt);
  return impl_->tp ? parallel::gather_last_dim(logits, impl_->tp) : logits;
}

Tensor Transformer::forward_logits_shard(const Tensor& ids, const ForwardOptions& opt) {
  std::optional<NoGradGuard> no_grad;
  if (opt.cache) no_grad.emplace();
  Tensor h = hidden_states(ids, opt);
  // lm_head is column-parallel over the vocabulary: h is replicated, its gradient partial.
  if (impl_->tp) h = parallel::copy_to_tp(h, impl_->tp);
  return ops::linear(h, impl_->head->weight);
}

const std::shared_ptr<parallel::Communicator>& Transformer::tp_group() const { return impl_->tp; }

const Tensor& Transformer::lm_head_weight() const { return impl_->head->weight; }

void Transformer::set_activation_checkpointing(bool on) { impl_->body->checkpointing = on; }
bool Transformer::activation_checkpointing() const { return impl_->body->checkpointing; }

void Transformer::set_fused_qkv(bool on) {
  for (auto& [name, m] : named_modules())
    if (auto* a = dynamic_cast<SelfAttention*>(m)) a->set_fused_qkv(on);
}
bool Transformer::fused_qkv() const {
  bool any = false;
  for (auto& [name, m] : const_cast<Transformer*>(this)->named_modules())
    if (auto* a = dynamic_cast<SelfAttention*>(m)) {
      if (!a->fused_qkv_active()) return false;
      any = true;
    }
  return any;
}

int Transformer::tp_size() const { return impl_->tp ? impl_->tp->size() : 1; }

void Transformer::shard_for_tp(std::shared_ptr<parallel::Communicator> tp) {
  FTUNE_CHECK(tp != nullptr, "[tp] shard_for_tp: no tp communicator");
  FTUNE_CHECK(!impl_->tp, "[tp] shard_for_tp: the model is already sharded");
  const int n = tp->size();
  const ModelConfig& c = cfg_;
  for (auto& [name, m] : named_modules())
    if (auto* p = dynamic_cast<Proj*>(m))
      FTUNE_CHECK(!p->has_lora(), "[tp] shard_for_tp: ", name,
                  " has a LoRA adapter; shard first, then apply_lora (it shards the adapters)");
  FTUNE_CHECK(c.num_attention_heads % n == 0, "[tp] tensor parallel size ", n,
              " does not divide num_attention_heads ", c.num_attention_heads, " of ",
              c.architecture);
  FTUNE_CHECK(c.num_key_value_heads % n == 0, "[tp] tensor parallel size ", n,
              " does not divide num_key_value_heads ", c.num_key_value_heads, " of ",
              c.architecture,
              n > c.num_key_value_heads
                  ? " (tp larger than the kv heads would need replicated kv heads, which ftune "
                    "does not do: use tp <= num_key_value_heads)"
                  : "");
  FTUNE_CHECK(c.intermediate_size % n == 0, "[tp] tensor parallel size ", n,
              " does not divide intermediate_size ", c.intermediate_size, " of ", c.architecture);
  FTUNE_CHECK(c.vocab_size >= n && parallel::shard_range(c.vocab_size, n, n - 1).size > 0,
              "[tp] vocab_size ", c.vocab_size, " is too small for ", n, " vocab shards");
  impl_->tp = tp;
  impl_->body->shard_for_tp(tp);
  impl_->head_shard = impl_->body->embed->shard();
  Tensor& hw = impl_->head->weight;
  if (c.tie_word_embeddings)
    hw = impl_->body->embed->weight;  // the tie survives: one tensor, two names
  else
    hw = parallel::shard_slice(hw, impl_->head_shard).set_requires_grad(hw.requires_grad());
}

std::map<std::string, parallel::ShardInfo> Transformer::shard_infos() const {
  std::map<std::string, parallel::ShardInfo> out;
  if (!impl_->tp) return out;
  auto put = [&](const std::string& name, const parallel::ShardInfo& si) {
    if (!si.replicated()) out[name] = si;
  };
  for (auto& [name, m] : const_cast<Transformer*>(this)->named_modules()) {
    const std::string pre = name.empty() ? "" : name + ".";
    if (auto* p = dynamic_cast<Proj*>(m)) {
      put(pre + "weight", p->weight_shard());
      if (p->bias.defined()) put(pre + "bias", p->bias_shard());
      if (p->has_lora()) {
        put(pre + "lora_A.weight", p->lora_A_shard());
        put(pre + "lora_B.weight", p->lora_B_shard());
      }
    } else if (auto* e = dynamic_cast<Embed*>(m); e && e == impl_->body->embed.get()) {
      put(pre + "weight", e->shard());
    }
  }
  if (!cfg_.tie_word_embeddings) put("lm_head.weight", impl_->head_shard);
  return out;
}

nn::NamedTensors Transformer::gather_full_parameters() const {
  nn::NamedTensors out;
  const auto infos = shard_infos();
  for (auto& [name, t] : named_parameters()) {
    auto it = infos.find(name);
    out.emplace_back(
        name, it == infos.end() ? t.detach() : parallel::gather_shards(t, it->second, impl_->tp));
  }
  return out;
}

void Transformer::init_random(uint64_t seed, double std) {
  FTUNE_CHECK(std::isfinite(std) && std >= 0.0, "[transformer] init std must be >= 0, got ", std);
  FTUNE_CHECK(!impl_->tp, "[transformer] init_random on a tensor-parallel shard: initialise the ",
              "full model, then shard_for_tp");
  Generator gen(seed);
  NoGradGuard no_grad;
  // GPT-2 scales its residual projections by 1/sqrt(2 * n_layer) (GPT2PreTrainedModel).
  const double proj_std = cfg_.family == ModelFamily::gpt2
                              ? std / std::sqrt(2.0 * double(cfg_.num_hidden_layers))
                              : std;
  for (auto& [name, m] : named_modules()) {
    if (auto* p = dynamic_cast<Proj*>(m)) {
      const bool residual = p->conv1d() && ends_with(name, "c_proj");
      p->weight.copy_(randn(p->weight.shape(), gen, 0.0, residual ? proj_std : std));
      if (p->bias.defined()) p->bias.zero_();
    } else if (auto* e = dynamic_cast<Embed*>(m)) {
      e->weight.copy_(randn(e->weight.shape(), gen, 0.0, std));
    } else if (auto* n = dynamic_cast<Norm*>(m)) {
      n->weight.fill_(1.0);
      if (n->bias.defined()) n->bias.zero_();
    } else if (auto* h = dynamic_cast<LmHead*>(m); h && !cfg_.tie_word_embeddings) {
      h->weight.copy_(randn(h->weight.shape(), gen, 0.0, std));
    }
  }
}

// ---------------------------------------------------------------- loading and saving

namespace {

// The checkpoint tensor each parameter loads from, validated against the model's full shapes.
struct WeightSource {
  std::unordered_map<std::string, std::string> source;  // our name -> checkpoint name
  bool tied_copy = false;  // lm_head.weight stored although tied: must equal the embedding
};

WeightSource match_weights(const ModelConfig& cfg, const nn::NamedTensors& params,
                           const SafetensorsModel& st, const std::string& dir,
                           const std::string& cfg_path) {
  // Match the checkpoint's names to ours. A base-model save (GPT2Model: "h.0.attn...",
  // LlamaModel: "layers.0...") lacks the "transformer." / "model." prefix.
  const std::string prefix = cfg.family == ModelFamily::gpt2 ? "transformer." : "model.";
  std::unordered_map<std::string, Tensor> want;
  for (auto& [n, t] : params) want.emplace(n, t);
  WeightSource ws;
  std::vector<std::string> unexpected, duplicate;
  for (const std::string& name : st.names()) {
    std::string ours = want.count(name) ? name : want.count(prefix + name) ? prefix + name : "";
    if (!ours.empty()) {
      if (!ws.source.emplace(ours, name).second) duplicate.push_back(name);
    } else if (cfg.tie_word_embeddings && name == "lm_head.weight") {
      ws.tied_copy = true;
    } else if (!is_known_buffer(cfg, name)) {
      unexpected.push_back(str_cat(name, " (", st.shard_path(name), ")"));
    }
  }
  std::vector<std::string> missing;
  for (const auto& [n, t] : params)
    if (!ws.source.count(n)) missing.push_back(n);
  if (!missing.empty() || !unexpected.empty() || !duplicate.empty()) {
    std::string msg = str_cat("[from_pretrained] ", dir, ": the weights do not match ", cfg_path,
                              " (", cfg.architecture, ", ", cfg.num_hidden_layers, " layers)");
    if (!missing.empty())
      msg += str_cat("; missing tensors (", missing.size(), "): ", list_names(missing));
    if (!unexpected.empty())
      msg += str_cat("; unexpected tensors (", unexpected.size(), "): ", list_names(unexpected));
    if (!duplicate.empty())
      msg += str_cat("; stored both with and without the '", prefix,
                     "' prefix: ", list_names(duplicate));
    FTUNE_THROW(msg);
  }

  auto check_entry = [&](const std::string& name, const Shape& shape) {
    const SafetensorsEntry& e = st.info(name);
    const auto dt = st_to_dtype(e.dtype);
    FTUNE_CHECK(dt && is_floating(*dt), "[from_pretrained] ", st.shard_path(name), ": tensor '",
                name, "' is ", st_dtype_name(e.dtype),
                "; weights must be F32, F16, BF16 or F64 (they are converted to f32)");
    FTUNE_CHECK(e.shape == shape, "[from_pretrained] ", st.shard_path(name), ": tensor '", name,
                "' has shape ", shape_str(e.shape), " but ", cfg_path, " needs ", shape_str(shape));
  };
  for (auto& [n, t] : params) check_entry(ws.source.at(n), t.shape());
  if (ws.tied_copy) check_entry("lm_head.weight", Shape{cfg.vocab_size, cfg.hidden_size});
  return ws;
}

// This rank's slice of checkpoint tensor `name` (shard_slice of the whole one), reading only the
// slice's bytes: one range per block along info.dim.
Tensor read_shard(const SafetensorsModel& st, const std::string& name,
                  const parallel::ShardInfo& info) {
  if (info.replicated()) return st.get(name);
  const SafetensorsEntry& e = st.info(name);
  FTUNE_CHECK(info.dim < int(e.shape.size()) && e.shape[size_t(info.dim)] == info.full_size &&
                  info.blocks >= 1 && info.full_size % info.blocks == 0,
              "[from_pretrained] ", st.shard_path(name), ": tensor '", name, "' of shape ",
              shape_str(e.shape), " does not have ", info.full_size, " elements along dim ",
              info.dim);
  const int64_t block = info.full_size / info.blocks;
  std::vector<Tensor> parts;
  for (int b = 0; b < info.blocks; ++b)
    parts.push_back(
        st.get_range(name, info.dim, b * block + info.offset, b * block + info.offset + info.size));
  if (parts.size() == 1) return parts[0];
  NoGradGuard no_grad;
  return ops::cat(parts, info.dim);
}

// Compares a stored lm_head (tied config) with the embedding it must equal.
void check_tied_copy(const Tensor& head, const Tensor& emb, const SafetensorsModel& st,
                     const std::string& cfg_path) {
  FTUNE_CHECK(ops::max_abs_diff(head.to(DType::f32), emb) == 0.0, "[from_pretrained] ",
              st.shard_path("lm_head.weight"), ": tie_word_embeddings is true in ", cfg_path,
              " but lm_head.weight differs from the input embedding; set "
              "tie_word_embeddings to false to load it as a separate head");
}

std::string embed_name(const ModelConfig& cfg) {
  return cfg.family == ModelFamily::gpt2 ? "transformer.wte.weight" : "model.embed_tokens.weight";
}

}  // namespace

std::unique_ptr<Transformer> Transformer::from_pretrained(const std::string& dir,
                                                          const HfConfigOptions& opt) {
  FTUNE_CHECK(dir_exists(dir), "[from_pretrained] model folder ", dir, " does not exist");
  const std::string cfg_path = path_join(dir, "config.json");
  ModelConfig cfg = load_hf_config(cfg_path, opt);
  auto model = std::make_unique<Transformer>(cfg);
  SafetensorsModel st = SafetensorsModel::open_folder(dir);
  nn::NamedTensors params = model->named_parameters();
  const WeightSource ws = match_weights(cfg, params, st, dir, cfg_path);
  for (auto& [n, t] : params) t.copy_(st.get(ws.source.at(n)));  // converts f16/bf16/f64 to f32
  if (ws.tied_copy)
    check_tied_copy(st.get("lm_head.weight"), model->parameter(embed_name(cfg)), st, cfg_path);
  return model;
}

std::unique_ptr<Transformer> Transformer::from_pretrained_sharded(
    const std::string& dir, std::shared_ptr<parallel::Communicator> tp_group,
    const HfConfigOptions& opt) {
  if (!tp_group || tp_group->size() == 1) return from_pretrained(dir, opt);
  FTUNE_CHECK(dir_exists(dir), "[from_pretrained] model folder ", dir, " does not exist");
  const std::string cfg_path = path_join(dir, "config.json");
  ModelConfig cfg = load_hf_config(cfg_path, opt);
  std::unique_ptr<Transformer> model;
  {
    struct Defer {  // reset even when the constructor throws
      Defer() { t_defer_params = true; }
      ~Defer() { t_defer_params = false; }
    } defer;
    model = std::make_unique<Transformer>(cfg);
  }
  SafetensorsModel st = SafetensorsModel::open_folder(dir);
  // Names and full shapes are checked before sharding, as from_pretrained does.
  const WeightSource ws = match_weights(cfg, model->named_parameters(), st, dir, cfg_path);
  model->shard_for_tp(std::move(tp_group));
  // Split parameters now own their slices; the replicated ones are still one-element views.
  auto own = [](Tensor& t) {
    if (t.defined() && !t.is_contiguous())
      t = Tensor::empty(t.shape(), t.dtype()).set_requires_grad(true);
  };
  for (auto& [name, m] : model->named_modules()) {
    if (auto* p = dynamic_cast<Proj*>(m)) {
      own(p->weight);
      own(p->bias);
    } else if (auto* n = dynamic_cast<Norm*>(m)) {
      own(n->weight);
      own(n->bias);
    } else if (auto* e = dynamic_cast<Embed*>(m)) {
      own(e->weight);
    } else if (auto* h = dynamic_cast<LmHead*>(m)) {
      own(h->weight);
    }
  }
  const auto infos = model->shard_infos();
  NoGradGuard no_grad;
  for (auto& [n, t] : model->named_parameters()) {
    auto it = infos.find(n);
    const parallel::ShardInfo si = it == infos.end() ? parallel::ShardInfo{} : it->second;
    FTUNE_CHECK(t.is_contiguous(), "[from_pretrained] internal: ", n, " was not allocated");
    t.copy_(read_shard(st, ws.source.at(n), si));
  }
  if (ws.tied_copy) {
    const std::string emb = embed_name(cfg);
    check_tied_copy(read_shard(st, "lm_head.weight", infos.at(emb)), model->parameter(emb), st,
                    cfg_path);
  }
  return model;
}

void Transformer::save_pretrained(const std::string& dir, uint64_t max_shard_bytes) const {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  FTUNE_CHECK(!ec && dir_exists(dir), "[save_pretrained] cannot create folder ", dir, ": ",
              ec.message());
  // Adapter tensors are not part of a HF model: transformers would refuse them as unexpected.
  for (auto& [name, m] : const_cast<Transformer*>(this)->named_modules())
    if (auto* p = dynamic_cast<Proj*>(m))
      FTUNE_CHECK(!p->has_lora(), "[save_pretrained] ", dir, ": ", name,
                  " has a LoRA adapter; merge_lora first, or save_peft_adapter (models/lora.h)");
  FTUNE_CHECK(!impl_->tp, "[save_pretrained] ", dir, ": the model is a tensor-parallel shard; ",
              "gather_full_parameters() and save the full tensors from one rank");
  nn::NamedTensors params = named_parameters();
  ModelConfig c = cfg_;
  c.torch_dtype = torch_dtype_name(params.front().second.dtype());  // what the file holds
  save_hf_config(c, path_join(dir, "config.json"));
  save_safetensors_model(dir, params, max_shard_bytes);
}

// ---------------------------------------------------------------- ScalarHead

ScalarHead::ScalarHead(int64_t hidden, bool has_bias) {
  FTUNE_CHECK(hidden > 0, "[scalar_head] hidden size must be positive, got ", hidden);
  weight = Tensor::zeros({1, hidden}).set_requires_grad(true);
  register_parameter("weight", &weight);
  if (has_bias) bias = Tensor::zeros({1}).set_requires_grad(true);
  register_parameter("bias", &bias);
}

void ScalarHead::init_random(uint64_t seed, double std) {
  Generator gen(seed);
  NoGradGuard no_grad;
  weight.copy_(randn(weight.shape(), gen, 0.0, std));
  if (bias.defined()) bias.zero_();
}

Tensor ScalarHead::forward(const Tensor& hidden, const Tensor& lengths) {
  FTUNE_CHECK(hidden.defined() && hidden.dim() == 3 && hidden.size(2) == weight.size(1),
              "[scalar_head] hidden must be [B, T, ", weight.size(1), "], got ",
              hidden.defined() ? hidden.desc() : "undefined");
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  FTUNE_CHECK(lengths.defined() && lengths.shape() == Shape{B} &&
                  (lengths.dtype() == DType::i32 || lengths.dtype() == DType::i64),
              "[scalar_head] lengths must be i32|i64 [", B, "], got ",
              lengths.defined() ? lengths.desc() : "undefined");
  std::vector<int64_t> len = lengths.to_vector<int64_t>();
  std::vector<Tensor> last;
  for (int64_t b = 0; b < B; ++b) {
    FTUNE_CHECK(len[size_t(b)] >= 1 && len[size_t(b)] <= T, "[scalar_head] lengths[", b,
                "] = ", len[size_t(b)], " must be in [1, ", T, "]");
    last.push_back(hidden.slice(0, b, b + 1).slice(1, len[size_t(b)] - 1, len[size_t(b)]));
  }
  Tensor x = (B == 1 ? last[0] : ops::cat(last, 0)).reshape({B, H});
  return ops::linear(x, weight, bias).reshape({B});
}

}  // namespace ftune
