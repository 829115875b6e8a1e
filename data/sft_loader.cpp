// SftLoader: per-epoch shuffle, best-fit-decreasing packing, batching, rank partition, state.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <set>

#include "core/error.h"
#include "data/sft_dataset.h"

namespace ftune {

using json = nlohmann::json;

namespace {

// Philox streams (the counter's high word) of the loader's two draws per epoch.
constexpr uint64_t kOrderStream = 0x4f52444552000000ull;  // "ORDER"
constexpr uint64_t kRowsStream = 0x524f575300000000ull;   // "ROWS"

uint64_t fnv1a(uint64_t h, const void* p, size_t n) {
  auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::vector<std::vector<int64_t>> pack_best_fit_decreasing(const std::vector<int64_t>& lengths,
                                                           int64_t capacity) {
  const int64_t n = int64_t(lengths.size());
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  // Longest first; equal lengths keep their given order.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[size_t(a)] > lengths[size_t(b)]; });
  std::vector<std::vector<int64_t>> bins;
  // Open bins by (space left, bin index): lower_bound finds the tightest fit, the earliest
  // opened bin among equally tight ones.
  std::set<std::pair<int64_t, int64_t>> open;
  for (int64_t i : order) {
    int64_t len = lengths[size_t(i)];
    FTUNE_CHECK(len >= 1 && len <= capacity, "[sft_loader] cannot pack a sequence of ", len,
                " tokens into rows of ", capacity);
    auto it = open.lower_bound({len, -1});
    int64_t bin, left;
    if (it == open.end()) {
      bin = int64_t(bins.size());
      bins.emplace_back();
      left = capacity;
    } else {
      bin = it->second;
      left = it->first;
      open.erase(it);
    }
    bins[size_t(bin)].push_back(i);
    if (left - len > 0) open.insert({left - len, bin});
  }
  return bins;
}

SftLoader::SftLoader(std::vector<SftExample> examples, SftLoaderOptions opt)
    : examples_(std::move(examples)), opt_(opt) {
  FTUNE_CHECK(opt_.batch_size >= 1, "[sft_loader] batch_size must be >= 1, got ", opt_.batch_size);
  FTUNE_CHECK(opt_.max_seq_len >= 1, "[sft_loader] max_seq_len must be >= 1, got ",
              opt_.max_seq_len);
  FTUNE_CHECK(opt_.world_size >= 1 && opt_.rank >= 0 && opt_.rank < opt_.world_size,
              "[sft_loader] rank ", opt_.rank, " is not in a world of ", opt_.world_size);
  FTUNE_CHECK(!examples_.empty(), "[sft_loader] the dataset has no examples");
  uint64_t h = 0xcbf29ce484222325ull;
  for (const SftExample& e : examples_) {
    FTUNE_CHECK(!e.ids.empty() && e.ids.size() == e.train_mask.size(), "[sft_loader] example of line ",
                e.line, " is empty or its mask does not match its ids");
    FTUNE_CHECK(int64_t(e.ids.size()) <= opt_.max_seq_len, "[sft_loader] example of line ", e.line,
                " has ", e.ids.size(), " tokens, more than max_seq_len ", opt_.max_seq_len);
    uint64_t sz = e.ids.size();
    h = fnv1a(h, &sz, sizeof sz);
    h = fnv1a(h, e.ids.data(), e.ids.size() * sizeof(int32_t));
    h = fnv1a(h, e.train_mask.data(), e.train_mask.size());
  }
  fingerprint_ = h;
  plan_epoch();
  FTUNE_CHECK(batches_per_epoch() > 0, "[sft_loader] ", rows_.size(), " rows in batches of ",
              opt_.batch_size, " over ", opt_.world_size,
              " ranks leave this rank no batch (drop_last)");
}

void SftLoader::plan_epoch() {
  if (planned_epoch_ == epoch_) return;
  const int64_t n = int64_t(examples_.size());
  std::vector<int64_t> order;
  if (opt_.shuffle) {
    order = philox_permutation(n, opt_.seed, kOrderStream ^ uint64_t(epoch_));
  } else {
    order.resize(size_t(n));
    std::iota(order.begin(), order.end(), int64_t(0));
  }
  rows_.clear();
  if (opt_.packed) {
    std::vector<int64_t> lengths(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) lengths[size_t(i)] = int64_t(examples_[size_t(order[size_t(i)])].ids.size());
    auto bins = pack_best_fit_decreasing(lengths, opt_.max_seq_len);
    std::vector<int64_t> row_order(bins.size());
    if (opt_.shuffle)
      row_order = philox_permutation(int64_t(bins.size()), opt_.seed, kRowsStream ^ uint64_t(epoch_));
    else
      std::iota(row_order.begin(), row_order.end(), int64_t(0));
    rows_.reserve(bins.size());
    for (int64_t b : row_order) {
      std::vector<int64_t> row;
      for (int64_t pos : bins[size_t(b)]) row.push_back(order[size_t(pos)]);
      rows_.push_back(std::move(row));
    }
  } else {
    rows_.reserve(size_t(n));
    for (int64_t i : order) rows_.push_back({i});
  }
  planned_epoch_ = epoch_;
}

int64_t SftLoader::total_batches() const {
  const int64_t rows = int64_t(rows_.size());
  return opt_.drop_last ? rows / opt_.batch_size : ceil_div(rows, opt_.batch_size);
}

int64_t SftLoader::positions_after(int64_t offset, int64_t world_size) const {
  // Every rank gets the same count, so data-parallel ranks step together.
  const int64_t left = total_batches() - offset;
  return opt_.drop_last ? left / world_size : ceil_div(left, world_size);
}

int64_t SftLoader::batches_per_epoch() const { return positions_after(0, opt_.world_size); }

int64_t SftLoader::batches_left_in_epoch() const {
  return std::max<int64_t>(0, positions_after(offset_, opt_.world_size) - position_);
}

bool SftLoader::next(SftBatch& out) {
  if (position_ >= positions_after(offset_, opt_.world_size)) {
    ++epoch_;
    position_ = 0;
    offset_ = 0;
    plan_epoch();
    return false;
  }
  // Ranks short of a batch at the end wrap around to the first ones (DistributedSampler pads
  // the same way); with drop_last no wrap is needed.
  const int64_t g = (offset_ + opt_.rank + position_ * opt_.world_size) % total_batches();
  ++position_;
  const int64_t r0 = g * opt_.batch_size;
  const int64_t r1 = std::min<int64_t>(r0 + opt_.batch_size, int64_t(rows_.size()));
  const int64_t B = r1 - r0;
  int64_t T = 1;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t len = 0;
    for (int64_t e : rows_[size_t(r)]) len += int64_t(examples_[size_t(e)].ids.size());
    T = std::max(T, len);
  }
  std::vector<int32_t> ids(size_t(B * T), opt_.pad_id), pos(size_t(B * T), 0);
  std::vector<int64_t> labels(size_t(B * T), -100);
  std::vector<int32_t> cu{0};
  int64_t targets = 0, tokens = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t base = b * T;
    int64_t t = 0, last_pos = -1;
    for (int64_t e : rows_[size_t(r0 + b)]) {
      const SftExample& ex = examples_[size_t(e)];
      const int64_t L = int64_t(ex.ids.size());
      for (int64_t i = 0; i < L; ++i) {
        ids[size_t(base + t + i)] = ex.ids[size_t(i)];
        pos[size_t(base + t + i)] = int32_t(i);
        if (i + 1 < L && ex.train_mask[size_t(i + 1)]) {
          labels[size_t(base + t + i)] = ex.ids[size_t(i + 1)];
          ++targets;
        }
      }
      t += L;
      last_pos = L - 1;
      cu.push_back(int32_t(base + t));
    }
    tokens += t;
    for (int64_t i = t; i < T; ++i) pos[size_t(base + i)] = int32_t(++last_pos);
    if (t < T) cu.push_back(int32_t(base + T));
  }
  out = SftBatch{};
  out.ids = Tensor::from_vector(ids, {B, T});
  out.labels = Tensor::from_vector(labels, {B, T});
  out.positions = Tensor::from_vector(pos, {B, T});
  if (opt_.packed) out.cu_seqlens = Tensor::from_vector(cu, {int64_t(cu.size())});
  out.num_targets = targets;
  out.num_tokens = tokens;
  return true;
}

json SftLoader::state() const {
  return json{{"epoch", epoch_},
              {"position", position_},
              {"offset", offset_},
              {"seed", opt_.seed},
              {"num_examples", int64_t(examples_.size())},
              {"fingerprint", hex64(fingerprint_)},
              {"batch_size", opt_.batch_size},
              {"world_size", opt_.world_size},
              {"packed", opt_.packed},
              {"max_seq_len", opt_.max_seq_len},
              {"drop_last", opt_.drop_last},
              {"shuffle", opt_.shuffle}};
}

void SftLoader::load_state(const json& s) {
  FTUNE_CHECK(s.is_object(), "[sft_loader] the sampler state is not an object: ", s.dump());
  for (const char* k : {"epoch", "position", "seed", "num_examples"})
    FTUNE_CHECK(s.contains(k), "[sft_loader] the sampler state has no \"", k, "\": ", s.dump());
  json mine = state();
  try {
    for (auto it = s.begin(); it != s.end(); ++it) {
      // The layout keys may differ: the position is converted below.
      if (it.key() == "epoch" || it.key() == "position" || it.key() == "offset" ||
          it.key() == "world_size")
        continue;
      FTUNE_CHECK(mine.contains(it.key()), "[sft_loader] unknown key \"", it.key(),
                  "\" in the sampler state");
      FTUNE_CHECK(mine[it.key()] == *it, "[sft_loader] the sampler state was saved with ",
                  it.key(), " = ", it->dump(), " but this loader has ", mine[it.key()].dump(),
                  it.key() == "num_examples" || it.key() == "fingerprint"
                      ? " (a different dataset, tokenizer or data options)"
                      : "");
    }
    const int64_t e = s.at("epoch").get<int64_t>(), p = s.at("position").get<int64_t>();
    const int64_t ws = s.value("world_size", int64_t(1)), off = s.value("offset", int64_t(0));
    FTUNE_CHECK(ws >= 1 && off >= 0 && off < ws && off < total_batches(),
                "[sft_loader] the sampler state's world_size ", ws, " / offset ", off,
                " is out of range");
    const int64_t end = positions_after(off, ws);  // the saved layout's positions in the epoch
    FTUNE_CHECK(e >= 0 && p >= 0 && p <= end, "[sft_loader] the sampler state's epoch ", e,
                " / position ", p, " is out of range (", end, " batches per epoch for ", ws,
                " ranks)");
    epoch_ = e;
    if (p == end) {
      // The epoch is over (at the saved layout, with its wrap-around or drop_last): it is over
      // at this one too, and the next call starts the next epoch.
      offset_ = 0;
      position_ = batches_per_epoch();
    } else {
      // The replicas consumed global batches [0, consumed) of the epoch; rank r continues with
      // batch consumed + r, then every world_size-th one, as one process would.
      const int64_t consumed = off + p * ws;
      offset_ = consumed % opt_.world_size;
      position_ = consumed / opt_.world_size;
    }
    plan_epoch();
  } catch (const json::exception& ex) {
    FTUNE_THROW("[sft_loader] bad sampler state ", s.dump(), ": ", ex.what());
  }
}

void SftLoader::set_epoch(int64_t e) {
  FTUNE_CHECK(e >= 0, "[sft_loader] epoch must be >= 0, got ", e);
  epoch_ = e;
  position_ = 0;
  offset_ = 0;
  plan_epoch();
}

SftPackingStats SftLoader::packing_stats() const {
  SftPackingStats s;
  s.rows = int64_t(rows_.size());
  for (const auto& row : rows_)
    for (int64_t e : row) {
      ++s.sequences;
      s.tokens += int64_t(examples_[size_t(e)].ids.size());
    }
  s.fill_ratio = s.rows ? double(s.tokens) / double(s.rows * opt_.max_seq_len) : 0.0;
  return s;
}

}  // namespace ftune
