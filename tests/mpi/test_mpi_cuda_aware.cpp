// CUDA-aware MPI in the MPI backend: what the library here says, FTUNE_MPI_CUDA_AWARE deciding
// each new communicator (0: staging; 1: an error where the library says no), and GPU tensors
// through both paths: host staging and device pointers. The GPU tests skip on every rank unless
// every rank has a GPU (ranks may share one); the device-pointer one also needs a CUDA-aware
// library.
#include <gtest/gtest.h>
#include <mpi.h>  // OPEN_MPI

#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/ops.h"
#include "parallel/communicator.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using parallel::MpiCudaSupport;
using parallel::ReduceOp;
using testing::world;

// Sets FTUNE_MPI_CUDA_AWARE (nullptr: unsets it) for a scope, on this rank.
class EnvGuard {
 public:
  explicit EnvGuard(const char* v) {
    if (const char* old = std::getenv(kName)) old_ = old;
    set(v);
  }
  ~EnvGuard() { set(old_ ? old_->c_str() : nullptr); }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  static void set(const char* v) {
    if (v)
      setenv(kName, v, 1);
    else
      unsetenv(kName);
  }
  static constexpr const char* kName = "FTUNE_MPI_CUDA_AWARE";
  std::optional<std::string> old_;
};

std::shared_ptr<parallel::Communicator> fresh_comm() {
  auto& w = *world();
  return std::shared_ptr<parallel::Communicator>(w.split(0, w.rank()));
}

TEST(MpiCudaAware, LibraryAnswer) {
  const MpiCudaSupport lib = parallel::mpi_library_cuda_support();
  if (world()->rank() == 0) std::cout << "MPI library CUDA support: " << lib.detail << "\n";
#ifdef OPEN_MPI
  // Open MPI has the query (mpi-ext.h's cuda extension, in every release since 2.0): a yes/no.
  EXPECT_NE(lib.answer, MpiCudaSupport::Answer::unknown) << lib.detail;
  EXPECT_NE(lib.detail.find("MPIX_Query_cuda_support() = "), std::string::npos) << lib.detail;
#endif
  // The same answer on every rank (one library, one mpirun).
  const int64_t a = int64_t(lib.answer);
  EXPECT_EQ(world()->all_reduce_int(a, ReduceOp::max), a);
  EXPECT_EQ(world()->all_reduce_int(a, ReduceOp::min), a);
}

TEST(MpiCudaAware, EnvDecidesEachNewCommunicator) {
  const MpiCudaSupport lib = parallel::mpi_library_cuda_support();
  const bool lib_yes = lib.answer == MpiCudaSupport::Answer::yes;
  {
    EnvGuard env(nullptr);
    EXPECT_EQ(fresh_comm()->cuda_aware(), lib_yes);
  }
  {
    EnvGuard env("0");
    auto c = fresh_comm();
    EXPECT_FALSE(c->cuda_aware());
    EXPECT_FALSE(parallel::mpi_cuda_aware().aware);
    // ... and it still reduces (CPU tensors go to MPI as they are either way).
    Tensor t = Tensor::from_vector<float>({float(c->rank() + 1)}, {1});
    c->all_reduce(t);
    EXPECT_EQ(t.to_vector<float>()[0], float(c->size() * (c->size() + 1) / 2));
  }
  {
    EnvGuard env("1");
    if (lib.answer == MpiCudaSupport::Answer::no) {
      // Every rank throws before MPI_Comm_split (no rank is left in the collective).
      try {
        fresh_comm();
        ADD_FAILURE() << "FTUNE_MPI_CUDA_AWARE=1 must fail with " << lib.detail;
      } catch (const Error& e) {
        const std::string m = e.what();
        EXPECT_NE(m.find("FTUNE_MPI_CUDA_AWARE=1"), std::string::npos) << m;
        EXPECT_NE(m.find("not CUDA-aware"), std::string::npos) << m;
      }
    } else {
      EXPECT_TRUE(fresh_comm()->cuda_aware());
    }
  }
  {
    EnvGuard env("maybe");
    EXPECT_THROW(fresh_comm(), Error);
  }
  world()->barrier();
}

// "" when every rank has a GPU, else why not (the same on every rank, agreed over MPI).
std::string gpu_skip_reason() {
  const bool ok = cuda_available();
  if (world()->all_reduce_int(ok ? 0 : 1, ReduceOp::max) != 0)
    return "a rank has no GPU (or this build has no CUDA)";
  return "";
}

// Rank r's value at index i: small integers, exact in f32 and bf16 after the scaling below.
float value(int r, int64_t i) { return float((r + 1) * (i % 16 + 1)); }

// Every collective of the backend on GPU tensors, against what each rank computes alone. The
// inputs are last written by kernels queued on a side stream just before each call, so a
// collective that handed MPI the buffer without synchronizing that stream would read stale data.
void check_gpu_collectives(parallel::Communicator& c) {
  const int dev = cuda::select_device_for_local_rank();
  const Device gpu = Device::cuda(dev);
  const int n = c.size(), r = c.rank();
  const int64_t N = int64_t(1) << 20;  // 4 MiB of f32: kernels long enough to race with MPI
  const float rank_sum = float(n * (n + 1) / 2);
  cuda::Stream side(dev);
  cuda::StreamGuard guard(side.handle());

  // base * 2^8, written by eight kernels on the side stream.
  auto make = [&](DType dt, int64_t len, int rank) {
    std::vector<float> h(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) h[size_t(i)] = value(rank, i) / 256.0f;
    Tensor t = Tensor::from_vector<float>(h, {len}).to(dt).to(gpu);
    for (int k = 0; k < 8; ++k) ops::mul_(t, 2.0);
    return t;
  };
  auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::f32).to_vector<float>(); };

  for (DType dt : {DType::f32, DType::bf16}) {
    const std::string what = std::string(dtype_name(dt)) + (c.cuda_aware() ? ", aware" : ", staged");
    {  // blocking sum
      Tensor t = make(dt, N, r);
      c.all_reduce(t, ReduceOp::sum);
      EXPECT_TRUE(t.device() == gpu);
      std::vector<float> got = host(t);
      int64_t bad = 0;
      for (int64_t i = 0; i < N; ++i) bad += got[size_t(i)] != rank_sum * float(i % 16 + 1);
      EXPECT_EQ(bad, 0) << "all_reduce sum " << what;
    }
    {  // async avg and max
      Tensor a = make(dt, N, r), m = make(dt, N, r);
      auto wa = c.all_reduce_async(a, ReduceOp::avg);
      auto wm = c.all_reduce_async(m, ReduceOp::max);
      wa->wait();
      wm->wait();
      std::vector<float> ga = host(a), gm = host(m);
      int64_t bad = 0;
      for (int64_t i = 0; i < N; ++i) {
        bad += ga[size_t(i)] != rank_sum / float(n) * float(i % 16 + 1);
        bad += gm[size_t(i)] != value(n - 1, i);
      }
      EXPECT_EQ(bad, 0) << "all_reduce_async avg/max " << what;
    }
    {  // broadcast from the last rank
      Tensor t = make(dt, N, r);
      c.broadcast(t, n - 1);
      std::vector<float> got = host(t);
      int64_t bad = 0;
      for (int64_t i = 0; i < N; ++i) bad += got[size_t(i)] != value(n - 1, i);
      EXPECT_EQ(bad, 0) << "broadcast " << what;
    }
    {  // reduce_scatter then all_gather: every rank ends with the whole sum
      const int64_t per = N / n;
      Tensor in = make(dt, per * n, r);
      Tensor part = Tensor::zeros({per}, dt, gpu);
      c.reduce_scatter(in, part, ReduceOp::sum);
      Tensor all = Tensor::zeros({per * n}, dt, gpu);
      c.all_gather_async(part, all)->wait();
      std::vector<float> gp = host(part), ga = host(all);
      int64_t bad = 0;
      for (int64_t i = 0; i < per; ++i)
        bad += gp[size_t(i)] != rank_sum * float((r * per + i) % 16 + 1);
      for (int64_t i = 0; i < per * n; ++i) bad += ga[size_t(i)] != rank_sum * float(i % 16 + 1);
      EXPECT_EQ(bad, 0) << "reduce_scatter + all_gather " << what;
    }
  }
}

TEST(MpiCudaAware, GpuTensorsThroughHostStaging) {
  const std::string why = gpu_skip_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  EnvGuard env("0");
  auto c = fresh_comm();
  ASSERT_FALSE(c->cuda_aware());
  check_gpu_collectives(*c);
  world()->barrier();
}

TEST(MpiCudaAware, GpuTensorsAsDevicePointers) {
  const std::string why = gpu_skip_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  const MpiCudaSupport lib = parallel::mpi_library_cuda_support();
  if (lib.answer != MpiCudaSupport::Answer::yes)
    GTEST_SKIP() << "this MPI library is not CUDA-aware: " << lib.detail;
  EnvGuard env("1");
  auto c = fresh_comm();
  ASSERT_TRUE(c->cuda_aware());
  check_gpu_collectives(*c);
  world()->barrier();
}

}  // namespace
}  // namespace ftune
