// The NCCL communicator under mpirun, bootstrapped over the MPI world, one GPU per rank: every
// collective against values each rank can compute alone, in every dtype, async, splits and the
// tp x dp grid, and the gradient reducer on GPU parameters. Never run yet (docs/distributed.md
// "NCCL"): every test skips unless this build has NCCL and every rank of the node has its own
// GPU (all ranks agree over MPI on skipping, so none is left waiting in a collective).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "core/allocator.h"
#include "core/autograd.h"
#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "core/rng.h"
#include "parallel/data_parallel.h"
#include "parallel/nccl/nccl_communicator.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using parallel::ReduceOp;
using testing::world;

// Ranks on this node, from the launcher (Open MPI, else Slurm); 1 when unknown.
int local_size() {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v)) return std::max(1, std::atoi(s));
  return 1;
}

// "" when every rank can have its own GPU, else why not (the same answer on every rank).
std::string skip_reason() {
  if (!parallel::nccl_support()) return "this build has no NCCL";
  // Either this node shows every rank all its GPUs (select_device_for_local_rank picks distinct
  // ones), or the launcher gave each rank its own (CUDA_VISIBLE_DEVICES, launch/examples/).
  const bool ok = cuda_available() && (cuda_device_count() >= local_size() ||
                                       std::getenv("CUDA_VISIBLE_DEVICES") != nullptr);
  if (world()->all_reduce_int(ok ? 0 : 1, ReduceOp::max) != 0)
    return "a rank has no GPU of its own (NCCL needs one GPU per rank)";
  return "";
}

#define REQUIRE_GPU_PER_RANK()                  \
  do {                                          \
    std::string why_ = skip_reason();           \
    if (!why_.empty()) GTEST_SKIP() << why_;    \
  } while (0)

#ifdef FTUNE_HAVE_NCCL
// A NCCL communicator over the MPI world, one per test: not a static, so every ncclComm is
// destroyed before MPI_Finalize and the CUDA runtime's teardown at exit.
std::shared_ptr<parallel::Communicator> nccl_world() {
  return parallel::make_nccl_communicator(world(), cuda::select_device_for_local_rank());
}
Device dev() { return Device::cuda(cuda::current_device()); }

// Rank r's value at index i: distinct per rank and index, exact in every dtype (small integers).
double val(int r, int64_t i) { return double((r + 1) * 3 + (i % 7)) - 4.0; }

Tensor values_on_gpu(int r, int64_t n, DType dt) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = val(r, i);
  return Tensor::from_vector<double>(v, {n}).to(dt).to(dev());
}
#endif

TEST(NcclMpi, AllReduceEveryDtypeAndOp) {
  REQUIRE_GPU_PER_RANK();
#ifdef FTUNE_HAVE_NCCL
  auto c = nccl_world();
  const int n = c->size(), r = c->rank();
  ASSERT_EQ(n, world()->size());
  ASSERT_EQ(r, world()->rank());
  EXPECT_EQ(c->backend(), "nccl");
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
      Tensor t = values_on_gpu(r, 1037, dt);
      c->all_reduce(t, op);
      std::vector<double> got = t.to(Device::cpu()).to_vector<double>();
      for (int64_t i = 0; i < 1037; ++i) {
        double want = op == ReduceOp::sum ? 0 : val(0, i);
        for (int q = 0; q < n; ++q) {
          double v = val(q, i);
          want = op == ReduceOp::sum ? want + v : op == ReduceOp::max ? std::max(want, v)
                                                                      : std::min(want, v);
        }
        ASSERT_EQ(got[size_t(i)], want) << dtype_name(dt) << " op " << int(op) << " i " << i;
      }
    }
  }
  Tensor a = Tensor::full({5}, double(r + 1), DType::f32, dev());
  c->all_reduce(a, ReduceOp::avg);
  for (float v : a.to(Device::cpu()).to_vector<float>()) EXPECT_FLOAT_EQ(v, float(n + 1) / 2.0f);
  // CPU tensors through the GPU.
  EXPECT_EQ(c->all_reduce_int(r), int64_t(n) * (n - 1) / 2);
#endif
}

TEST(NcclMpi, BroadcastReduceScatterAllGatherAsync) {
  REQUIRE_GPU_PER_RANK();
#ifdef FTUNE_HAVE_NCCL
  auto c = nccl_world();
  const int n = c->size(), r = c->rank();
  Tensor b = Tensor::full({3, 4}, double(r == 1 ? 42 : -1), DType::bf16, dev());
  c->broadcast(b, 1);
  for (float v : b.to(Device::cpu()).to_vector<float>()) EXPECT_EQ(v, 42.0f);

  const int64_t chunk = 1001;
  Tensor tin = values_on_gpu(r, chunk * n, DType::f32);
  Tensor tout = Tensor::zeros({chunk}, DType::f32, dev());
  auto w1 = c->reduce_scatter_async(tin, tout);
  Tensor mine = Tensor::full({chunk}, double(r * 10), DType::i64, dev());
  Tensor all = Tensor::zeros({n * chunk}, DType::i64, dev());
  auto w2 = c->all_gather_async(mine, all);
  w2->wait();
  w1->wait();
  std::vector<double> got = tout.to(Device::cpu()).to_vector<double>();
  for (int64_t i = 0; i < chunk; ++i) {
    double want = 0;
    for (int q = 0; q < n; ++q) want += val(q, r * chunk + i);
    ASSERT_EQ(got[size_t(i)], want) << i;
  }
  std::vector<int64_t> g = all.to(Device::cpu()).to_vector<int64_t>();
  for (int q = 0; q < n; ++q)
    for (int64_t i = 0; i < chunk; ++i) ASSERT_EQ(g[size_t(q * chunk + i)], int64_t(q * 10));
  c->barrier();
#endif
}

TEST(NcclMpi, GridSplitsTpMajor) {
  REQUIRE_GPU_PER_RANK();
#ifdef FTUNE_HAVE_NCCL
  auto w = nccl_world();
  const int n = w->size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  parallel::ProcessGrid g = parallel::make_grid(w, 2);
  EXPECT_EQ(g.tp_group->backend(), "nccl");
  EXPECT_EQ(g.tp_group->size(), 2);
  EXPECT_EQ(g.dp_group->size(), n / 2);
  EXPECT_EQ(g.tp_group->rank(), w->rank() % 2);
  Tensor t = Tensor::full({7}, double(w->rank()), DType::f32, dev());
  g.tp_group->all_reduce(t);
  for (float v : t.to(Device::cpu()).to_vector<float>()) EXPECT_EQ(v, float(4 * g.dp_rank + 1));
#endif
}

// The gradient reducer over the NCCL communicator, parameters on the GPU: loss = sum(p * x_r)
// with x_r = r + 1 everywhere, so every gradient element sums to n (n + 1) / 2.
TEST(NcclMpi, GradReducerOnGpuParameters) {
  REQUIRE_GPU_PER_RANK();
#ifdef FTUNE_HAVE_NCCL
  auto c = nccl_world();
  const int n = c->size(), r = c->rank();
  std::vector<Tensor> ps;
  for (Shape s : {Shape{5, 3}, Shape{700}, Shape{4, 4}}) {
    ps.push_back(Tensor::ones(s, DType::f32, dev()));
    ps.back().set_requires_grad(true);
  }
  parallel::GradReducer red(ps, c, parallel::ReducerOptions{0.001, false});
  Tensor loss;
  for (auto& p : ps) {
    Tensor t = ops::sum(ops::mul_scalar(p, double(r + 1)));
    loss = loss.defined() ? ops::add(loss, t) : t;
  }
  loss.backward();
  red.finish();
  for (auto& p : ps) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_EQ(p.grad().device(), dev());
    for (float v : p.grad().to(Device::cpu()).to_vector<float>())
      ASSERT_EQ(v, float(n * (n + 1) / 2));
  }
#endif
}

}  // namespace
}  // namespace ftune
