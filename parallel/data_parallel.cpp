#include "parallel/data_parallel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <unordered_map>
#include <unordered_set>

#include "core/autograd.h"
#include "core/error.h"

namespace ftune::parallel {

// ---------------------------------------------------------------- GradReducer

struct GradReducer::State {
  std::vector<Tensor> params;
  std::shared_ptr<Communicator> comm;
  ReducerOptions opt;
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of;  // per param
  std::vector<Tensor> flat;       // per bucket [padded]: the flattened gradients on the wire
  std::vector<Tensor> shards;     // per bucket [shard] (shard mode)
  bool sync = true;

  // The current synced pass.
  bool in_pass = false;
  std::vector<uint8_t> ready;                // per param: its hook fired in this pass
  std::vector<int64_t> pending;              // per bucket: hooks still awaited
  size_t next_launch = 0;                    // buckets [0, next_launch) are launched
  std::vector<std::unique_ptr<Work>> works;  // per bucket, while in flight
  int64_t hooks = 0;
  std::vector<int64_t> launch_counts;

  // The result of the last finish().
  bool reduced = false;
  std::vector<uint8_t> defined;  // per param: some rank had a gradient

  void begin_pass() {
    in_pass = true;
    reduced = false;
    std::fill(ready.begin(), ready.end(), 0);
    for (size_t b = 0; b < buckets.size(); ++b) pending[b] = int64_t(buckets[b].params.size());
    next_launch = 0;
    hooks = 0;
    launch_counts.clear();
  }

  void on_ready(size_t i) {
    if (!sync) return;  // a non-final micro-batch: gradients accumulate locally
    if (!in_pass) begin_pass();
    FTUNE_CHECK(!ready[i], "[data_parallel] parameter ", i,
                " got a second gradient in one synced pass: call finish() after the final "
                "micro-batch's backward (and set_sync(false) before the others)");
    ready[i] = 1;
    ++hooks;
    --pending[bucket_of[i]];
    while (next_launch < buckets.size() && pending[next_launch] == 0) launch(next_launch, hooks);
    // MPI progresses non-blocking collectives only inside MPI calls: test the ones in flight.
    for (size_t b = 0; b < next_launch; ++b)
      if (works[b]) works[b]->done();
  }

  // Flattens bucket b (missing gradients as zeros) and starts its collective.
  void launch(size_t b, int64_t count) {
    NoGradGuard ng;
    const Bucket& bk = buckets[b];
    for (size_t k = 0; k < bk.params.size(); ++k) {
      const Tensor& p = params[bk.params[k]];
      Tensor dst = flat[b].slice(0, bk.offsets[k], bk.offsets[k] + p.numel()).view(p.shape());
      Tensor g = p.grad();
      if (g.defined())
        dst.copy_(g);
      else
        dst.zero_();
    }
    works[b] = opt.shard ? comm->reduce_scatter_async(flat[b], shards[b], ReduceOp::sum)
                         : comm->all_reduce_async(flat[b], ReduceOp::sum);
    launch_counts.push_back(count);
    next_launch = b + 1;
  }

  void finish() {
    NoGradGuard ng;
    if (!in_pass) begin_pass();  // no parameter got a gradient on this rank
    while (next_launch < buckets.size()) launch(next_launch, -1);
    // Which parameters got a gradient on any rank: those get one everywhere (zeros where a rank
    // had none), the others stay undefined, as in one process over the global batch.
    Tensor flags = Tensor::zeros({int64_t(params.size())}, DType::i32);
    int32_t* f = flags.data<int32_t>();
    for (size_t i = 0; i < params.size(); ++i) f[i] = params[i].grad().defined() ? 1 : 0;
    comm->all_reduce(flags, ReduceOp::max);
    for (auto& w : works) {
      if (w) w->wait();
      w.reset();
    }
    for (size_t i = 0; i < params.size(); ++i) defined[i] = f[i] != 0;
    for (size_t b = 0; b < buckets.size(); ++b) {
      const Bucket& bk = buckets[b];
      for (size_t k = 0; k < bk.params.size(); ++k) {
        Tensor& p = params[bk.params[k]];
        if (opt.shard || !defined[bk.params[k]]) {
          p.zero_grad();  // shard mode: the optimizer reads grad_shard()
          continue;
        }
        Tensor src = flat[b].slice(0, bk.offsets[k], bk.offsets[k] + p.numel()).view(p.shape());
        Tensor g = p.grad();
        if (g.defined() && g.is_contiguous() && g.dtype() == p.dtype())
          g.copy_(src);
        else
          p.set_grad(src.clone());
      }
    }
    in_pass = false;
    reduced = true;
  }
};

GradReducer::GradReducer(std::vector<Tensor> params, std::shared_ptr<Communicator> comm,
                         ReducerOptions opt)
    : s_(std::make_shared<State>()) {
  FTUNE_CHECK(comm != nullptr, "[data_parallel] GradReducer: no communicator");
  FTUNE_CHECK(opt.bucket_mb > 0, "[data_parallel] bucket_mb must be > 0, got ", opt.bucket_mb);
  FTUNE_CHECK(!params.empty(), "[data_parallel] GradReducer: no parameters");
  State& s = *s_;
  s.params = std::move(params);
  s.comm = std::move(comm);
  s.opt = opt;
  std::unordered_set<TensorImpl*> seen;
  for (size_t i = 0; i < s.params.size(); ++i) {
    const Tensor& p = s.params[i];
    FTUNE_CHECK(p.defined() && p.requires_grad() && p.is_leaf() && p.is_contiguous(),
                "[data_parallel] parameter ", i, " (", p.defined() ? p.desc() : "undefined",
                ") must be a contiguous leaf that requires grad");
    FTUNE_CHECK(seen.insert(p.impl()).second, "[data_parallel] parameter ", i, " is listed twice");
    FTUNE_CHECK(p.device() == s.params[0].device(), "[data_parallel] parameters on ",
                "different devices: ", p.desc(), " and ", s.params[0].desc());
  }
  // Buckets in reverse parameter order; a new one when the next parameter would overflow the
  // size or has another dtype (one flat buffer has one dtype).
  const double cap = opt.bucket_mb * 1024.0 * 1024.0;
  s.bucket_of.assign(s.params.size(), 0);
  double bytes = 0;
  for (size_t r = s.params.size(); r-- > 0;) {
    const Tensor& p = s.params[r];
    const double pb = double(p.numel()) * double(dtype_size(p.dtype()));
    bool fresh = s.buckets.empty() || (bytes > 0 && bytes + pb > cap) ||
                 s.params[s.buckets.back().params.front()].dtype() != p.dtype();
    if (fresh) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    Bucket& b = s.buckets.back();
    b.params.push_back(r);
    b.offsets.push_back(b.numel);
    b.numel += p.numel();
    bytes += pb;
    s.bucket_of[r] = s.buckets.size() - 1;
  }
  const int64_t n = s.comm->size();
  for (Bucket& b : s.buckets) {
    b.padded = (b.numel + n - 1) / n * n;
    b.shard = b.padded / n;
    const Tensor& p0 = s.params[b.params.front()];
    s.flat.push_back(Tensor::zeros({b.padded}, p0.dtype(), p0.device()));
    s.shards.push_back(opt.shard ? Tensor::zeros({b.shard}, p0.dtype(), p0.device()) : Tensor());
  }
  s.ready.assign(s.params.size(), 0);
  s.defined.assign(s.params.size(), 0);
  s.pending.assign(s.buckets.size(), 0);
  s.works.resize(s.buckets.size());
  // The hooks hold the state weakly: once the reducer is gone they do nothing.
  std::weak_ptr<State> w = s_;
  for (size_t i = 0; i < s.params.size(); ++i) {
    s.params[i].add_ready_hook([w, i](const Tensor&) {
      if (auto st = w.lock()) st->on_ready(i);
    });
  }
}

GradReducer::~GradReducer() {
  for (auto& w : s_->works)
    if (w) w->wait();
}

void GradReducer::set_sync(bool sync) {
  FTUNE_CHECK(!s_->in_pass || sync,
              "[data_parallel] set_sync(false) in the middle of a synced "
              "pass: call finish() first");
  s_->sync = sync;
}
bool GradReducer::sync() const { return s_->sync; }
void GradReducer::finish() { s_->finish(); }
void GradReducer::reset() {
  FTUNE_CHECK(!s_->in_pass, "[data_parallel] reset() during a synced pass: call finish() first");
  s_->reduced = false;
  std::fill(s_->defined.begin(), s_->defined.end(), 0);
}
const std::vector<Tensor>& GradReducer::params() const { return s_->params; }
const std::vector<Bucket>& GradReducer::buckets() const { return s_->buckets; }
const Communicator& GradReducer::comm() const { return *s_->comm; }
std::shared_ptr<Communicator> GradReducer::comm_ptr() const { return s_->comm; }
bool GradReducer::sharded() const { return s_->opt.shard; }
bool GradReducer::grad_defined(size_t i) const { return s_->reduced && s_->defined.at(i); }
bool GradReducer::reduced() const { return s_->reduced; }
Tensor& GradReducer::grad_shard(size_t b) {
  FTUNE_CHECK(s_->opt.shard, "[data_parallel] grad_shard() of a reducer that does not shard");
  return s_->shards.at(b);
}
const std::vector<int64_t>& GradReducer::launch_hook_counts() const { return s_->launch_counts; }
int64_t GradReducer::hooks_in_pass() const { return s_->hooks; }

// ---------------------------------------------------------------- ShardedAdamW

namespace {
bool is_16bit(DType t) { return t == DType::bf16 || t == DType::f16; }
// Elements [start, start + n) of a contiguous tensor, flattened: a view (GPU tensors too).
Tensor flat_part(const Tensor& t, int64_t start, int64_t n) {
  return t.view({-1}).slice(0, start, start + n);
}
// A host copy (the exported state is host memory whatever the device).
Tensor host_copy(const Tensor& t) { return t.device().is_cpu() ? t.clone() : t.to(Device::cpu()); }
}  // namespace

// The part of the parameter [offset, offset + numel) that lies in this rank's shard
// [rank * shard, (rank + 1) * shard) of its bucket, relative to both; count 0 when they do not
// meet.
ShardedAdamW::Span ShardedAdamW::span_of(const Slot& s) const {
  const Bucket& bk = red_.buckets()[s.bucket];
  const int64_t n = red_.params()[s.param].numel();
  const int64_t lo = int64_t(red_.comm().rank()) * bk.shard;
  const int64_t a = std::max(s.offset, lo), b = std::min(s.offset + n, lo + bk.shard);
  if (b <= a) return {};
  return {a - s.offset, a - lo, b - a};
}

ShardedAdamW::ShardedAdamW(std::vector<optim::ParamGroup> groups, optim::AdamWOptions opt,
                           GradReducer& reducer)
    : red_(reducer), opt_(opt), lr_(opt.lr) {
  FTUNE_CHECK(red_.sharded(), "[zero] ShardedAdamW needs a reducer built with shard = true");
  const auto& params = red_.params();
  std::unordered_map<TensorImpl*, size_t> index;
  for (size_t i = 0; i < params.size(); ++i) {
    index[params[i].impl()] = i;
    FTUNE_CHECK(params[i].dtype() == DType::f32 || is_16bit(params[i].dtype()),
                "[zero] ShardedAdamW: parameter ", i, " is ", params[i].desc(),
                "; parameters are f32, bf16 or f16");
  }
  slots_.resize(params.size());
  std::vector<uint8_t> got(params.size(), 0);
  for (const optim::ParamGroup& g : groups) {
    for (const auto& [name, p] : g.params) {
      auto it = index.find(p.impl());
      FTUNE_CHECK(it != index.end(), "[zero] parameter '", name, "' is not the reducer's");
      FTUNE_CHECK(!got[it->second], "[zero] parameter '", name, "' is in two groups");
      got[it->second] = 1;
      Slot& s = slots_[it->second];
      s.name = name;
      s.param = it->second;
      s.lr_scale = g.lr_scale;
      s.weight_decay = g.weight_decay.value_or(opt.weight_decay);
    }
  }
  for (size_t i = 0; i < params.size(); ++i)
    FTUNE_CHECK(got[i], "[zero] the reducer's parameter ", i, " (", params[i].desc(),
                ") is in no group");
  const auto& buckets = red_.buckets();
  const Device dev = params.front().device();  // the reducer checked: one device
  for (size_t b = 0; b < buckets.size(); ++b) {
    for (size_t k = 0; k < buckets[b].params.size(); ++k) {
      slots_[buckets[b].params[k]].bucket = b;
      slots_[buckets[b].params[k]].offset = buckets[b].offsets[k];
    }
    m_.push_back(Tensor::zeros({buckets[b].shard}, DType::f32, dev));
    v_.push_back(Tensor::zeros({buckets[b].shard}, DType::f32, dev));
    // A bucket holds one dtype (the reducer splits them).
    const bool half = is_16bit(params[buckets[b].params.front()].dtype());
    master_.push_back(half ? Tensor::zeros({buckets[b].shard}, DType::f32, dev) : Tensor());
  }
}

void ShardedAdamW::step(double grad_scale) {
  NoGradGuard ng;
  ++step_;
  const auto& params = red_.params();
  const auto& buckets = red_.buckets();
  if (red_.reduced()) {
    std::vector<optim::AdamWPiece> pieces;
    for (Slot& s : slots_) {
      if (!red_.grad_defined(s.param)) continue;  // as torch: skipped, its step does not advance
      ++s.step;  // every rank counts every parameter, so the counts stay replicated
      const Tensor& master = master_[s.bucket];
      const bool take_master = master.defined() && !s.has_master;
      s.has_master = master.defined();  // on every rank, so that exports agree
      const Span sp = span_of(s);
      if (sp.count == 0) continue;
      optim::AdamWPiece pc;
      pc.param = flat_part(params[s.param], sp.in_param, sp.count);
      if (master.defined()) {
        pc.master = flat_part(master, sp.in_shard, sp.count);
        if (take_master) pc.master.copy_(pc.param);  // as optim::AdamW, at the first update
      }
      pc.grad = flat_part(red_.grad_shard(s.bucket), sp.in_shard, sp.count);
      pc.m = flat_part(m_[s.bucket], sp.in_shard, sp.count);
      pc.v = flat_part(v_[s.bucket], sp.in_shard, sp.count);
      pc.lr = lr_ * s.lr_scale;
      pc.weight_decay = s.weight_decay;
      pc.step = s.step;
      pieces.push_back(std::move(pc));
    }
    optim::adamw_update_pieces(pieces, opt_, grad_scale);
  }
  // Every rank's updated shard to every rank: the shard of each bucket, flattened, gathered in
  // the parameters' dtype on their device.
  std::vector<Tensor> in(buckets.size()), out(buckets.size());
  std::vector<std::unique_ptr<Work>> works(buckets.size());
  for (size_t b = 0; b < buckets.size(); ++b) {
    const Bucket& bk = buckets[b];
    const Tensor& p0 = params[bk.params.front()];
    in[b] = Tensor::zeros({bk.shard}, p0.dtype(), p0.device());
    out[b] = Tensor::empty({bk.padded}, p0.dtype(), p0.device());
    for (size_t k = 0; k < bk.params.size(); ++k) {
      const Slot& s = slots_[bk.params[k]];
      const Span sp = span_of(s);
      if (sp.count == 0) continue;
      flat_part(in[b], sp.in_shard, sp.count)
          .copy_(flat_part(params[s.param], sp.in_param, sp.count));
    }
    works[b] = red_.comm_ptr()->all_gather_async(in[b], out[b]);
  }
  for (size_t b = 0; b < buckets.size(); ++b) {
    works[b]->wait();
    const Bucket& bk = buckets[b];
    for (size_t k = 0; k < bk.params.size(); ++k) {
      Tensor p = params[bk.params[k]];
      p.copy_(flat_part(out[b], bk.offsets[k], p.numel()).view(p.shape()));  // bumps the version
    }
  }
}

void ShardedAdamW::zero_grad() {
  for (const Tensor& p : red_.params()) const_cast<Tensor&>(p).zero_grad();
  red_.reset();
}

namespace {
std::vector<Tensor> all_shards(GradReducer& red) {
  std::vector<Tensor> gs;
  for (size_t b = 0; b < red.num_buckets(); ++b) gs.push_back(red.grad_shard(b));
  return gs;
}
}  // namespace

double ShardedAdamW::grad_sum_squares() {
  // The padding of the shards is zeros: it adds nothing.
  const double local = red_.reduced() ? optim::sum_squares(all_shards(red_)) : 0.0;
  return red_.comm_ptr()->all_reduce_scalar(local);
}

double ShardedAdamW::clip_grad_norm(double max_norm) {
  const double norm = std::sqrt(grad_sum_squares());
  if (!std::isfinite(norm) || !red_.reduced()) return norm;
  const double coef = max_norm / (norm + 1e-6);  // torch's clip_grad_norm_
  if (coef < 1.0) optim::scale_(all_shards(red_), coef);
  return norm;
}

std::pair<double, double> ShardedAdamW::grad_sum_squares_split(const std::vector<bool>& select) {
  const auto& params = red_.params();
  FTUNE_CHECK(select.size() == params.size(), "[zero] grad_sum_squares_split: ", select.size(),
              " flags for ", params.size(), " parameters");
  Tensor sums = Tensor::zeros({2}, DType::f64);
  if (red_.reduced()) {
    // Each parameter's part of this rank's shard (the padding is zeros and belongs to none).
    std::vector<Tensor> parts[2];
    for (const Slot& s : slots_) {
      const Span sp = span_of(s);
      if (sp.count == 0) continue;
      parts[select[s.param] ? 0 : 1].push_back(
          flat_part(red_.grad_shard(s.bucket), sp.in_shard, sp.count));
    }
    sums.data<double>()[0] = optim::sum_squares(parts[0]);
    sums.data<double>()[1] = optim::sum_squares(parts[1]);
  }
  red_.comm_ptr()->all_reduce(sums, ReduceOp::sum);
  return {sums.data<double>()[0], sums.data<double>()[1]};
}

void ShardedAdamW::scale_grads(double coef) {
  if (red_.reduced()) optim::scale_(all_shards(red_), coef);
}

optim::OptimizerState ShardedAdamW::export_state() {
  NoGradGuard ng;
  const auto& params = red_.params();
  const auto& buckets = red_.buckets();
  // Per bucket, gathered: exp_avg, exp_avg_sq and (16-bit buckets) the master.
  std::vector<std::array<Tensor, 3>> full(buckets.size());
  for (size_t b = 0; b < buckets.size(); ++b) {
    const std::array<const Tensor*, 3> mine{&m_[b], &v_[b], &master_[b]};
    std::vector<std::unique_ptr<Work>> works;
    for (size_t j = 0; j < 3; ++j) {
      if (!mine[j]->defined()) continue;
      full[b][j] = Tensor::empty({buckets[b].padded}, DType::f32, mine[j]->device());
      works.push_back(red_.comm_ptr()->all_gather_async(*mine[j], full[b][j]));
    }
    for (auto& w : works) w->wait();
  }
  optim::OptimizerState st;
  st.step = step_;
  for (const Slot& s : slots_) {  // reducer (model) order, as optim::AdamW by group order
    const Tensor& p = params[s.param];
    auto part = [&](const Tensor& f) {
      return host_copy(flat_part(f, s.offset, p.numel()).view(p.shape()));
    };
    st.tensors.emplace_back(s.name + ".exp_avg", part(full[s.bucket][0]));
    st.tensors.emplace_back(s.name + ".exp_avg_sq", part(full[s.bucket][1]));
    st.tensors.emplace_back(s.name + ".step", Tensor::full({}, double(s.step), DType::i64));
    if (master_[s.bucket].defined())  // before the first update the master is the param itself
      st.tensors.emplace_back(s.name + ".master", s.has_master
                                                      ? part(full[s.bucket][2])
                                                      : p.to(DType::f32).to(Device::cpu()));
  }
  return st;
}

ShardedAdamW::LocalState ShardedAdamW::export_local_state() const {
  NoGradGuard ng;
  const auto& params = red_.params();
  LocalState ls;
  ls.state.step = step_;
  for (const Slot& s : slots_) {
    const Span sp = span_of(s);
    for (auto [key, src] : {std::pair{".exp_avg", &m_[s.bucket]}, {".exp_avg_sq", &v_[s.bucket]}}) {
      ls.state.tensors.emplace_back(s.name + key,
                                    host_copy(flat_part(*src, sp.in_shard, sp.count)));
      ls.flat_offset.push_back(sp.in_param);
    }
    ls.state.tensors.emplace_back(s.name + ".step", Tensor::full({}, double(s.step), DType::i64));
    ls.flat_offset.push_back(-1);
    if (master_[s.bucket].defined()) {
      Tensor mine = s.has_master ? flat_part(master_[s.bucket], sp.in_shard, sp.count)
                                 : flat_part(params[s.param], sp.in_param, sp.count);
      ls.state.tensors.emplace_back(s.name + ".master", host_copy(mine.to(DType::f32)));
      ls.flat_offset.push_back(sp.in_param);
    }
  }
  return ls;
}

namespace {

// A state's tensors by name, each defined and named once, after checking its step.
std::unordered_map<std::string, const Tensor*> state_by_name(const optim::OptimizerState& state) {
  FTUNE_CHECK(state.step >= 0, "[zero] state with negative step ", state.step);
  std::unordered_map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : state.tensors) {
    FTUNE_CHECK(t.defined(), "[zero] state tensor '", name, "' is undefined");
    FTUNE_CHECK(by_name.emplace(name, &t).second, "[zero] state has tensor '", name, "' twice");
  }
  return by_name;
}

}  // namespace

void ShardedAdamW::import_local_state(const optim::OptimizerState& state) {
  NoGradGuard ng;
  const auto by_name = state_by_name(state);
  auto get = [&](const std::string& name, int64_t numel) -> const Tensor& {
    auto it = by_name.find(name);
    FTUNE_CHECK(it != by_name.end(), "[zero] state has no tensor '", name, "'");
    FTUNE_CHECK(it->second->numel() == numel && (numel == 1 || it->second->dim() == 1),
                "[zero] state tensor '", name, "' is ", it->second->desc(), ", expected this rank's ",
                numel, " element(s)");
    return *it->second;
  };
  std::unordered_set<std::string> expected;
  for (const Slot& s : slots_) {
    const int64_t n = span_of(s).count;
    get(s.name + ".exp_avg", n);
    get(s.name + ".exp_avg_sq", n);
    FTUNE_CHECK(get(s.name + ".step", 1).item() >= 0, "[zero] negative step for '", s.name, "'");
    if (by_name.count(s.name + ".master") && master_[s.bucket].defined())
      get(s.name + ".master", n);
    for (const char* k : {".exp_avg", ".exp_avg_sq", ".step", ".master"})
      expected.insert(s.name + k);
  }
  for (const auto& [name, t] : state.tensors)
    FTUNE_CHECK(expected.count(name), "[zero] state tensor '", name,
                "' belongs to no parameter of this optimizer");
  const auto& params = red_.params();
  for (size_t b = 0; b < m_.size(); ++b) {
    m_[b].zero_();
    v_[b].zero_();
    if (master_[b].defined()) master_[b].zero_();
  }
  for (Slot& s : slots_) {
    Tensor p = params[s.param];
    s.step = int64_t(get(s.name + ".step", 1).item());
    const Span sp = span_of(s);
    auto take = [&](const std::string& key, Tensor& dst) {
      if (sp.count == 0) return;
      flat_part(dst, sp.in_shard, sp.count).copy_(get(s.name + key, sp.count).view({sp.count}));
    };
    take(".exp_avg", m_[s.bucket]);
    take(".exp_avg_sq", v_[s.bucket]);
    s.has_master = master_[s.bucket].defined() && by_name.count(s.name + ".master");
    if (s.has_master) {
      take(".master", master_[s.bucket]);
      // This rank's part of the parameter, rounded from its master, as import_state does for the
      // whole (the other ranks set theirs; the model's weights come from the checkpoint anyway).
      if (sp.count > 0)
        flat_part(p, sp.in_param, sp.count)
            .copy_(get(s.name + ".master", sp.count).view({sp.count}));
    }
  }
  step_ = state.step;
}

void ShardedAdamW::import_state(const optim::OptimizerState& state) {
  NoGradGuard ng;
  const auto by_name = state_by_name(state);
  const auto& params = red_.params();
  auto get = [&](const std::string& name, const Shape& shape) -> const Tensor& {
    auto it = by_name.find(name);
    FTUNE_CHECK(it != by_name.end(), "[zero] state has no tensor '", name, "'");
    FTUNE_CHECK(it->second->shape() == shape, "[zero] state tensor '", name, "' is ",
                it->second->desc(), ", expected shape ", shape_str(shape));
    return *it->second;
  };
  // Check everything first so that a bad state changes nothing. ".master" is optional both ways,
  // as for optim::AdamW: an f32 parameter ignores it, a 16-bit one without it takes its master
  // from the parameter at its next update.
  std::unordered_set<std::string> expected;
  for (const Slot& s : slots_) {
    const Shape& sh = params[s.param].shape();
    get(s.name + ".exp_avg", sh);
    get(s.name + ".exp_avg_sq", sh);
    FTUNE_CHECK(get(s.name + ".step", {}).item() >= 0, "[zero] negative step for '", s.name, "'");
    if (by_name.count(s.name + ".master")) get(s.name + ".master", sh);
    for (const char* k : {".exp_avg", ".exp_avg_sq", ".step", ".master"})
      expected.insert(s.name + k);
  }
  for (const auto& [name, t] : state.tensors)
    FTUNE_CHECK(expected.count(name), "[zero] state tensor '", name,
                "' belongs to no parameter of this optimizer");
  for (size_t b = 0; b < m_.size(); ++b) {
    m_[b].zero_();
    v_[b].zero_();
    if (master_[b].defined()) master_[b].zero_();
  }
  for (Slot& s : slots_) {
    Tensor p = params[s.param];
    s.step = int64_t(get(s.name + ".step", {}).item());
    const Span sp = span_of(s);
    auto take = [&](const std::string& key, Tensor& dst) {  // this rank's elements of a state
      if (sp.count == 0) return;
      Tensor src = get(s.name + key, p.shape()).contiguous();
      flat_part(dst, sp.in_shard, sp.count).copy_(flat_part(src, sp.in_param, sp.count));
    };
    take(".exp_avg", m_[s.bucket]);
    take(".exp_avg_sq", v_[s.bucket]);
    s.has_master = master_[s.bucket].defined() && by_name.count(s.name + ".master");
    if (s.has_master) {
      take(".master", master_[s.bucket]);
      p.copy_(get(s.name + ".master", p.shape()));  // the whole parameter, rounded, as AdamW
    }
  }
  step_ = state.step;
}

}  // namespace ftune::parallel
