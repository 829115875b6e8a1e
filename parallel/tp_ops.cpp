// Tensor-parallel autograd ops (parallel/tp_ops.h). The forward collective of each op and the
// conjugate one of its backward run on the tp communicator; backward closures run under NoGrad.
#include "parallel/tp_ops.h"

#include <cmath>
#include <limits>
#include <vector>

#include "core/autograd.h"
#include "core/error.h"

namespace ftune::parallel {

namespace {

// A detached, contiguous copy that a collective may overwrite.
Tensor private_copy(const Tensor& t) {
  Tensor out = Tensor::empty(t.shape(), t.dtype(), t.device());
  out.copy_(t.detach());
  return out;
}

void check_input(const char* op, const Tensor& x, const std::shared_ptr<Communicator>& tp) {
  FTUNE_CHECK(tp != nullptr, "[", op, "] no tp communicator");
  FTUNE_CHECK(x.defined(), "[", op, "] undefined input");
}

// Every rank's value of n (one small all_gather).
std::vector<int64_t> gather_sizes(int64_t n, Communicator& tp) {
  Tensor mine = Tensor::full({1}, double(n), DType::i64);
  Tensor all = Tensor::empty({tp.size()}, DType::i64);
  tp.all_gather(mine, all);
  return all.to_vector<int64_t>();
}

// Rank pieces of dim 0: t [n_r, ...] contiguous; sizes[q] = n_q. Returns every rank's piece
// (views into one gathered buffer), padding the all_gather to the largest piece.
std::vector<Tensor> gather_dim0(const Tensor& t, const std::vector<int64_t>& sizes,
                                Communicator& tp) {
  int64_t nmax = 0;
  for (int64_t n : sizes) nmax = std::max(nmax, n);
  Shape padded_shape = t.shape();
  padded_shape[0] = nmax;
  const int64_t row = t.dim() > 1 ? shape_numel(Shape(t.shape().begin() + 1, t.shape().end())) : 1;
  Tensor padded = Tensor::zeros(padded_shape, t.dtype(), t.device());
  if (t.size(0) > 0) padded.slice(0, 0, t.size(0)).copy_(t);
  Tensor all = Tensor::empty({int64_t(sizes.size()) * nmax * row}, t.dtype(), t.device());
  Tensor flat = padded.view({nmax * row});
  tp.all_gather(flat, all);
  Shape all_shape = padded_shape;
  all_shape[0] = int64_t(sizes.size()) * nmax;
  all = all.view(all_shape);
  std::vector<Tensor> pieces;
  for (size_t q = 0; q < sizes.size(); ++q)
    pieces.push_back(all.slice(0, int64_t(q) * nmax, int64_t(q) * nmax + sizes[q]));
  return pieces;
}

// x [..., n_r] -> [..., sum n_q] (not recorded).
Tensor gather_last_raw(const Tensor& x, const std::vector<int64_t>& sizes, Communicator& tp) {
  const int64_t last = x.dim() - 1;
  Tensor front = x.detach().transpose(0, last).contiguous();  // [n_r, ..., lead0]
  std::vector<Tensor> pieces = gather_dim0(front, sizes, tp);
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  Shape out_shape = x.shape();
  out_shape[size_t(last)] = total;
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  int64_t off = 0;
  for (size_t q = 0; q < sizes.size(); ++q) {
    if (sizes[q] > 0) out.slice(last, off, off + sizes[q]).copy_(pieces[q].transpose(0, last));
    off += sizes[q];
  }
  return out;
}

}  // namespace

Tensor copy_to_tp(const Tensor& x, const std::shared_ptr<Communicator>& tp) {
  check_input("copy_to_tp", x, tp);
  Tensor out = x.detach();
  record("copy_to_tp", out, {x}, [tp](const Tensor& g, const std::vector<bool>&) {
    Tensor r = private_copy(g);
    tp->all_reduce(r);
    return std::vector<Tensor>{r};
  });
  return out;
}

Tensor reduce_from_tp(const Tensor& x, const std::shared_ptr<Communicator>& tp) {
  check_input("reduce_from_tp", x, tp);
  Tensor out = private_copy(x);
  tp->all_reduce(out);
  record("reduce_from_tp", out, {x},
         [](const Tensor& g, const std::vector<bool>&) { return std::vector<Tensor>{g}; });
  return out;
}

Tensor gather_last_dim(const Tensor& x, const std::shared_ptr<Communicator>& tp) {
  check_input("gather_last_dim", x, tp);
  FTUNE_CHECK(x.dim() >= 1, "[gather_last_dim] needs at least 1 dim, got ", x.desc());
  std::vector<int64_t> sizes = gather_sizes(x.size(-1), *tp);
  Tensor out = gather_last_raw(x, sizes, *tp);
  int64_t off = 0;
  for (int q = 0; q < tp->rank(); ++q) off += sizes[size_t(q)];
  const int64_t n = x.size(-1), last = x.dim() - 1;
  record("gather_last_dim", out, {x}, [off, n, last](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g.slice(last, off, off + n).contiguous()};
  });
  return out;
}

Tensor scatter_last_dim(const Tensor& x, const std::shared_ptr<Communicator>& tp) {
  check_input("scatter_last_dim", x, tp);
  FTUNE_CHECK(x.dim() >= 1, "[scatter_last_dim] needs at least 1 dim, got ", x.desc());
  const int64_t last = x.dim() - 1;
  Range r = shard_range(x.size(-1), tp->size(), tp->rank());
  Tensor out = private_copy(x.slice(last, r.offset, r.offset + r.size));
  std::vector<int64_t> sizes;
  for (int q = 0; q < tp->size(); ++q) sizes.push_back(shard_range(x.size(-1), tp->size(), q).size);
  record("scatter_last_dim", out, {x}, [tp, sizes](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{gather_last_raw(g, sizes, *tp)};
  });
  return out;
}

Range shard_range(int64_t full, int parts, int rank) {
  FTUNE_CHECK(full >= 0 && parts >= 1 && rank >= 0 && rank < parts,
              "[tp] bad shard request: ", full, " elements over ", parts, " ranks, rank ", rank);
  const int64_t chunk = (full + parts - 1) / parts;
  Range r;
  r.offset = std::min(full, chunk * rank);
  r.size = std::min(full, r.offset + chunk) - r.offset;
  return r;
}

Tensor shard_slice(const Tensor& full, const ShardInfo& info) {
  FTUNE_CHECK(full.defined(), "[tp] shard_slice of an undefined tensor");
  if (info.replicated()) return full;
  FTUNE_CHECK(info.dim < full.dim() && full.size(info.dim) == info.full_size && info.blocks >= 1 &&
                  info.full_size % info.blocks == 0,
              "[tp] shard_slice: tensor ", full.desc(), " does not have ", info.full_size,
              " elements (", info.blocks, " blocks) along dim ", info.dim);
  const int64_t block = info.full_size / info.blocks;
  std::vector<Tensor> parts;
  for (int b = 0; b < info.blocks; ++b)
    parts.push_back(full.detach().slice(info.dim, b * block + info.offset,
                                        b * block + info.offset + info.size));
  if (parts.size() == 1) return private_copy(parts[0]);
  NoGradGuard no_grad;
  return ops::cat(parts, info.dim);
}

Tensor gather_shards(const Tensor& local, const ShardInfo& info,
                     const std::shared_ptr<Communicator>& tp) {
  FTUNE_CHECK(local.defined() && tp != nullptr, "[tp] gather_shards: undefined tensor or group");
  if (info.replicated()) return local.detach();
  const int n = tp->size();
  const int64_t block = info.full_size / info.blocks;
  FTUNE_CHECK(info.dim < local.dim() && local.size(info.dim) == info.size * info.blocks,
              "[tp] gather_shards: local tensor ", local.desc(), " is not a shard of ", info.blocks,
              " x ", info.size, " along dim ", info.dim);
  std::vector<int64_t> sizes;
  for (int q = 0; q < n; ++q) sizes.push_back(shard_range(block, n, q).size * info.blocks);
  Tensor front = local.detach().transpose(0, info.dim).contiguous();
  std::vector<Tensor> pieces = gather_dim0(front, sizes, *tp);
  Shape full_shape = front.shape();
  full_shape[0] = info.full_size;
  Tensor full = Tensor::empty(full_shape, local.dtype(), local.device());
  for (int q = 0; q < n; ++q) {
    Range r = shard_range(block, n, q);
    for (int b = 0; b < info.blocks; ++b)
      if (r.size > 0)
        full.slice(0, b * block + r.offset, b * block + r.offset + r.size)
            .copy_(pieces[size_t(q)].slice(0, b * r.size, (b + 1) * r.size));
  }
  return full.transpose(0, info.dim).contiguous();
}

Tensor vocab_parallel_embedding(const Tensor& weight_shard, const Tensor& ids, int64_t vocab_offset,
                                const std::shared_ptr<Communicator>& tp) {
  const char* op = "vocab_parallel_embedding";
  check_input(op, ids, tp);
  FTUNE_CHECK(weight_shard.defined() && weight_shard.dim() == 2 && weight_shard.size(0) > 0, "[",
              op, "] weight shard must be [V_r > 0, D], got ",
              weight_shard.defined() ? weight_shard.desc() : "undefined");
  FTUNE_CHECK(ids.dtype() == DType::i32 || ids.dtype() == DType::i64, "[", op,
              "] ids must be i32|i64, got ", ids.desc());
  const int64_t vr = weight_shard.size(0);
  std::vector<int64_t> v = ids.to_vector<int64_t>();
  std::vector<int64_t> local(v.size());
  std::vector<float> keep(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const bool mine = v[i] >= vocab_offset && v[i] < vocab_offset + vr;
    local[i] = mine ? v[i] - vocab_offset : 0;
    keep[i] = mine ? 1.0f : 0.0f;
  }
  Shape mask_shape = ids.shape();
  mask_shape.push_back(1);
  Tensor local_ids = Tensor::from_vector(local, ids.shape(), ids.device());
  Tensor mask = Tensor::from_vector(keep, mask_shape, ids.device()).to(weight_shard.dtype());
  // Rows of other ranks' ids are looked up at row 0 and zeroed: their gradient is zero too.
  Tensor e = ops::mul(ops::embedding(weight_shard, local_ids), mask);
  return reduce_from_tp(e, tp);
}

Tensor vocab_parallel_cross_entropy(const Tensor& logits_shard, const Tensor& targets,
                                    const std::shared_ptr<Communicator>& tp, int64_t ignore_index,
                                    ops::Reduction reduction, int64_t vocab_size) {
  const char* op = "vocab_parallel_cross_entropy";
  check_input(op, logits_shard, tp);
  const Tensor& x = logits_shard;
  FTUNE_CHECK(x.dim() >= 1 && is_floating(x.dtype()), "[", op,
              "] logits shard must be floating point with a vocabulary dim, got ", x.desc());
  FTUNE_CHECK(targets.defined() && (targets.dtype() == DType::i32 || targets.dtype() == DType::i64),
              "[", op, "] targets must be i32|i64, got ",
              targets.defined() ? targets.desc() : "undefined");
  const int64_t vr = x.size(-1);
  Shape lead(x.shape().begin(), x.shape().end() - 1);
  const int64_t n = shape_numel(lead);
  FTUNE_CHECK(targets.shape() == lead || (targets.dim() == 1 && targets.numel() == n), "[", op,
              "] targets ", targets.desc(), " do not match logits rows ", shape_str(lead));
  const int nr = tp->size();
  std::vector<int64_t> sizes;
  if (vocab_size > 0) {  // shard_range's split: no collective
    for (int q = 0; q < nr; ++q) sizes.push_back(shard_range(vocab_size, nr, q).size);
    FTUNE_CHECK(sizes[size_t(tp->rank())] == vr, "[", op, "] rank ", tp->rank(), " of ", nr,
                " holds ", vr, " vocabulary columns, not its shard of ", vocab_size, " (",
                sizes[size_t(tp->rank())], ")");
  } else {
    sizes = gather_sizes(vr, *tp);
  }
  std::vector<int64_t> offsets(size_t(nr) + 1, 0);
  for (int q = 0; q < nr; ++q) offsets[size_t(q) + 1] = offsets[size_t(q)] + sizes[size_t(q)];
  const int64_t vocab = offsets.back(), off = offsets[size_t(tp->rank())];
  FTUNE_CHECK(vocab > 0, "[", op, "] the vocabulary is empty on every rank");
  const std::vector<int64_t> tgt = targets.to_vector<int64_t>();  // [N] ids: a small host copy
  // Each row's target column in this shard, kIgnored, or kElsewhere when another rank holds it.
  // The kernels never see the caller's ignore_index: a value >= 0 would be some shard's column.
  constexpr int64_t kIgnored = -1, kElsewhere = -2;
  std::vector<int64_t> local(static_cast<size_t>(n));
  int64_t counted = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tgt[size_t(i)];
    if (t == ignore_index) {
      local[size_t(i)] = kIgnored;
      continue;
    }
    FTUNE_CHECK(t >= 0 && t < vocab, "[", op, "] target ", t, " at row ", i,
                " is out of range [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
    local[size_t(i)] = t >= off && t < off + vr ? t - off : kElsewhere;
    ++counted;
  }
  // This shard's row statistics and the nll of the rows whose target it holds, from the loss
  // kernels (the GPU's in f32, the CPU's in the logits' dtype), as [(m, ls) per row | nll] per
  // rank; one all_gather brings every rank's, and each rank combines them in f64 on the host.
  const bool gpu = x.device().is_cuda();
  const DType sdt = gpu ? DType::f32 : x.dtype();
  const Tensor x2 = x.detach().contiguous().view({n, vr});
  const Tensor tl = Tensor::from_vector(local, {n}, x.device());
  Tensor mine;
  if (vr > 0 && n > 0) {
    ops::ShardNll f = ops::cross_entropy_shard_forward(x2, tl, kIgnored);
    mine = Tensor::empty({3 * n}, sdt, x.device());
    mine.slice(0, 0, 2 * n).copy_(f.stat.view({2 * n}));
    mine.slice(0, 2 * n, 3 * n).copy_(f.nll);
  } else {  // an empty shard adds nothing to any row: m = -inf
    std::vector<double> none(size_t(3 * n), 0.0);
    for (int64_t i = 0; i < n; ++i) none[size_t(2 * i)] = -std::numeric_limits<double>::infinity();
    mine = Tensor::from_vector(none, {3 * n}).to(sdt).to(x.device());
  }
  Tensor all = Tensor::empty({int64_t(nr) * 3 * n}, sdt, x.device());
  tp->all_gather(mine, all);
  const std::vector<double> a = all.to_vector<double>();
  auto m_of = [&](int q, int64_t i) { return a[size_t(int64_t(q) * 3 * n + 2 * i)]; };
  auto ls_of = [&](int q, int64_t i) { return a[size_t(int64_t(q) * 3 * n + 2 * i + 1)]; };
  auto nll_of = [&](int q, int64_t i) { return a[size_t(int64_t(q) * 3 * n + 2 * n + i)]; };
  // Per row: the whole vocabulary's (M, LS) (M the largest shard max: an exact logit) for the
  // backward, and the nll from the owner's: nll_o + (lse - lse_o), lse = M + LS the whole row's,
  // lse_o = m_o + ls_o the owner shard's (no exp of a difference of shards: another shard may
  // lie hundreds above the owner's).
  std::vector<double> stat(size_t(2 * n), 0.0), nll(size_t(n), 0.0);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = tgt[size_t(i)];
    if (t == ignore_index) continue;
    int o = 0;
    while (t >= offsets[size_t(o) + 1]) ++o;
    double mx = -std::numeric_limits<double>::infinity();
    for (int q = 0; q < nr; ++q)
      if (sizes[size_t(q)] > 0) mx = std::max(mx, m_of(q, i));
    double s = 0.0;
    for (int q = 0; q < nr; ++q)
      if (sizes[size_t(q)] > 0) s += std::exp((m_of(q, i) - mx) + ls_of(q, i));
    const double ls = std::log(s);
    stat[size_t(2 * i)] = mx;
    stat[size_t(2 * i + 1)] = ls;
    nll[size_t(i)] = nll_of(o, i) + ((mx - m_of(o, i)) + (ls - ls_of(o, i)));
    total += nll[size_t(i)];
  }
  Tensor out;
  if (reduction == ops::Reduction::none) {
    out = Tensor::from_vector(nll, lead).to(x.dtype()).to(x.device());
  } else {  // as ops::cross_entropy: f32 on the GPU whatever the logits' dtype
    if (reduction == ops::Reduction::mean) total = counted > 0 ? total / double(counted) : 0.0;
    out = Tensor::scalar(total, gpu ? DType::f32 : x.dtype(), x.device());
  }
  const Tensor stat_g = Tensor::from_vector(stat, {n, 2}).to(sdt).to(x.device());
  const Shape shape = x.shape();
  record(op, out, {x},
         [x2, tl, stat_g, shape, reduction, counted](const Tensor& g, const std::vector<bool>&) {
           if (x2.numel() == 0)
             return std::vector<Tensor>{Tensor::zeros(shape, x2.dtype(), x2.device())};
           double scale = 1.0;
           if (reduction == ops::Reduction::mean) scale = counted > 0 ? 1.0 / double(counted) : 0.0;
           const bool per_row = reduction == ops::Reduction::none;
           Tensor gr = per_row ? g.contiguous().view({x2.size(0)}) : g;
           Tensor dx = ops::cross_entropy_shard_backward(x2, tl, stat_g, gr, per_row ? 1 : 0,
                                                         scale, kIgnored);
           return std::vector<Tensor>{dx.view(shape)};
         });
  return out;
}

}  // namespace ftune::parallel
