// An in-process communicator for tests: `n` ranks as `n` threads of one process, whose collectives
// meet in shared host memory. It lets a test run a multi-rank scenario (tensor parallelism on the
// GPU, above all) where no MPI launcher is at hand: the GPU machine of scripts/gpu_check.sh has
// one GPU and no MPI, and NCCL refuses two ranks on one device. Not a product backend: every
// collective copies through the host and reduces in f64 (exact for the test sizes), in rank
// order, so every rank gets the same bits.
//
//   run_ranks(2, [&](int rank, std::shared_ptr<parallel::Communicator> comm) { ... });
//
// runs the function on 2 threads, each with its rank's communicator, and rethrows the first
// exception of any rank (after all have stopped; a rank that throws out of a collective leaves the
// others waiting, so the group is aborted and every waiting collective throws too; so does a rank
// that returns while another waits in a collective it will never join).
// gtest's EXPECT_* are thread-safe; ASSERT_* returns from the function of that rank only.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "parallel/communicator.h"

namespace ftune::test {

class ThreadGroupState {
 public:
  explicit ThreadGroupState(int n) : n_(n), slots_(size_t(n)) {}
  int size() const { return n_; }

  // Every rank posts its contribution; each gets all of them, in rank order.
  std::vector<Tensor> exchange(int rank, Tensor mine) {
    slots_[size_t(rank)] = std::move(mine);
    barrier();
    std::vector<Tensor> all = slots_;
    barrier();  // nobody posts the next collective's value before every rank has read this one
    return all;
  }

  void barrier() {
    std::unique_lock<std::mutex> lk(mu_);
    check_live();
    const uint64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return generation_ != gen || aborted_ || finished_; });
    if (generation_ == gen) check_live();
  }

  // A rank failed: every waiting and later collective of every group throws.
  void abort() {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_ = true;
    cv_.notify_all();
    for (auto& [k, child] : children_) child->abort();
  }
  // A member of this group returned from its function: a collective of this group still waiting
  // (or started later) can never complete (the ranks called different collectives), so it throws
  // instead of hanging. Groups the rank is not in are not told.
  void finish() {
    std::lock_guard<std::mutex> lk(mu_);
    finished_ = true;
    cv_.notify_all();
  }

  // The state of split number `seq`'s group of `color` (made by whichever member asks first).
  std::shared_ptr<ThreadGroupState> child(uint64_t seq, int color, int members) {
    std::lock_guard<std::mutex> lk(mu_);
    auto& c = children_[{seq, color}];
    if (!c) c = std::make_shared<ThreadGroupState>(members);
    if (aborted_) c->abort();
    return c;
  }

 private:
  void check_live() const {
    FTUNE_CHECK(!aborted_, "[thread group] another rank failed");
    FTUNE_CHECK(!finished_,
                "[thread group] another rank returned while this one is in a "
                "collective (the ranks called different collectives)");
  }

  const int n_;
  std::vector<Tensor> slots_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false, finished_ = false;
  std::map<std::pair<uint64_t, int>, std::shared_ptr<ThreadGroupState>> children_;
};

class ThreadCommunicator : public parallel::Communicator {
 public:
  // `joined`: every group this rank's thread belongs to (its world and the splits made from it),
  // shared by the rank's communicators, for run_ranks to tell them when the rank returns.
  using Joined = std::vector<std::shared_ptr<ThreadGroupState>>;
  ThreadCommunicator(std::shared_ptr<ThreadGroupState> g, int rank, std::shared_ptr<Joined> joined)
      : g_(std::move(g)), rank_(rank), joined_(std::move(joined)) {
    joined_->push_back(g_);
  }
  int rank() const override { return rank_; }
  int size() const override { return g_->size(); }
  std::string backend() const override { return "thread"; }

  void all_reduce(Tensor& t, parallel::ReduceOp op) override {
    Tensor r = reduce(t, op);
    t.copy_(r.to(t.dtype()).to(t.device()));
  }
  std::unique_ptr<parallel::Work> all_reduce_async(Tensor& t, parallel::ReduceOp op) override {
    all_reduce(t, op);
    return done();
  }
  void broadcast(Tensor& t, int root) override {
    std::vector<Tensor> all = g_->exchange(rank_, host_copy(t));
    FTUNE_CHECK(root >= 0 && root < size(), "[thread group] broadcast from rank ", root);
    t.copy_(all[size_t(root)].to(t.device()));
  }
  void reduce_scatter(const Tensor& in, Tensor& out, parallel::ReduceOp op) override {
    FTUNE_CHECK(in.numel() == out.numel() * size(), "[thread group] reduce_scatter: ", in.desc(),
                " into ", out.desc(), " over ", size(), " ranks");
    Tensor r = reduce(in, op).view({in.numel()});
    const int64_t n = out.numel();
    out.copy_(
        r.slice(0, rank_ * n, (rank_ + 1) * n).to(out.dtype()).to(out.device()).view(out.shape()));
  }
  std::unique_ptr<parallel::Work> reduce_scatter_async(const Tensor& in, Tensor& out,
                                                       parallel::ReduceOp op) override {
    reduce_scatter(in, out, op);
    return done();
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    FTUNE_CHECK(out.numel() == in.numel() * size(), "[thread group] all_gather: ", in.desc(),
                " into ", out.desc(), " over ", size(), " ranks");
    std::vector<Tensor> all = g_->exchange(rank_, host_copy(in));
    Tensor cat = Tensor::empty({out.numel()}, in.dtype());
    for (int q = 0; q < size(); ++q)
      cat.slice(0, q * in.numel(), (q + 1) * in.numel()).copy_(all[size_t(q)].view({in.numel()}));
    out.copy_(cat.to(out.device()).view(out.shape()));
  }
  std::unique_ptr<parallel::Work> all_gather_async(const Tensor& in, Tensor& out) override {
    all_gather(in, out);
    return done();
  }
  void barrier() override { g_->barrier(); }
  std::unique_ptr<parallel::Communicator> split(int color, int key) override {
    Tensor mine = Tensor::from_vector<int64_t>({color, key}, {2});
    std::vector<Tensor> all = g_->exchange(rank_, mine);
    std::vector<std::pair<int64_t, int>> members;  // (key, old rank) of this color
    for (int q = 0; q < size(); ++q) {
      std::vector<int64_t> ck = all[size_t(q)].to_vector<int64_t>();
      if (ck[0] == color) members.push_back({ck[1], q});
    }
    std::sort(members.begin(), members.end());
    int new_rank = 0;
    while (members[size_t(new_rank)].second != rank_) ++new_rank;
    auto state = g_->child(splits_++, color, int(members.size()));
    return std::make_unique<ThreadCommunicator>(state, new_rank, joined_);
  }

  ThreadGroupState& state() { return *g_; }
  // This rank returned: every group it is in stops waiting for it.
  void finish_rank() {
    for (auto& g : *joined_) g->finish();
  }

 private:
  struct Done : parallel::Work {
    void wait() override {}
    bool done() override { return true; }
  };
  static std::unique_ptr<parallel::Work> done() { return std::make_unique<Done>(); }
  static Tensor host_copy(const Tensor& t) {
    return t.detach().contiguous().to(Device::cpu()).clone();
  }

  // op over the ranks' values, in f64 on the host, in rank order; shape of t.
  Tensor reduce(const Tensor& t, parallel::ReduceOp op) {
    std::vector<Tensor> all = g_->exchange(rank_, host_copy(t));
    std::vector<double> acc = all[0].to_vector<double>();
    for (int q = 1; q < size(); ++q) {
      std::vector<double> v = all[size_t(q)].to_vector<double>();
      for (size_t i = 0; i < acc.size(); ++i) {
        switch (op) {
          case parallel::ReduceOp::sum:
          case parallel::ReduceOp::avg:
            acc[i] += v[i];
            break;
          case parallel::ReduceOp::max:
            acc[i] = std::max(acc[i], v[i]);
            break;
          case parallel::ReduceOp::min:
            acc[i] = std::min(acc[i], v[i]);
            break;
        }
      }
    }
    if (op == parallel::ReduceOp::avg)
      for (double& a : acc) a /= double(size());
    return Tensor::from_vector(acc, t.shape());
  }

  std::shared_ptr<ThreadGroupState> g_;
  int rank_;
  std::shared_ptr<Joined> joined_;
  uint64_t splits_ = 0;
};

inline std::vector<std::shared_ptr<parallel::Communicator>> make_thread_group(int n) {
  auto g = std::make_shared<ThreadGroupState>(n);
  std::vector<std::shared_ptr<parallel::Communicator>> out;
  for (int r = 0; r < n; ++r)
    out.push_back(
        std::make_shared<ThreadCommunicator>(g, r, std::make_shared<ThreadCommunicator::Joined>()));
  return out;
}

// Runs fn(rank, comm) on n threads, one per rank of a fresh thread group; rethrows the first
// rank's exception once every thread has stopped.
inline void run_ranks(int n,
                      const std::function<void(int, std::shared_ptr<parallel::Communicator>)>& fn) {
  auto comms = make_thread_group(n);
  auto& state = static_cast<ThreadCommunicator&>(*comms[0]).state();
  std::mutex mu;
  std::exception_ptr first;  // the first failure, not the "another rank failed" that follow it
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r, comms[size_t(r)]);
        // A failed ASSERT_* returned from this rank only: the others would wait for it forever.
        if (::testing::Test::HasFatalFailure()) state.abort();
        static_cast<ThreadCommunicator&>(*comms[size_t(r)]).finish_rank();
      } catch (...) {
        {
          std::lock_guard<std::mutex> lk(mu);
          if (!first) first = std::current_exception();
        }
        state.abort();
      }
    });
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace ftune::test
