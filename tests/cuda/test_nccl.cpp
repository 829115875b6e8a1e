// The NCCL communicator on one rank, without MPI: bootstrapped over make_single_communicator(),
// on device 0. Every collective of one rank is the identity (reduce_scatter / all_gather copy), in
// every dtype, blocking and async, on GPU tensors and on CPU tensors (staged through the GPU);
// a split works; the errors name the op. Multi-rank NCCL: tests/mpi/test_nccl_mpi.cpp.
#include <gtest/gtest.h>

#include "core/cuda_runtime.h"
#include "tests/cuda/cuda_test_util.h"

#ifdef FTUNE_HAVE_NCCL
#include "parallel/nccl/nccl_communicator.h"

namespace ftune {
namespace {

using parallel::ReduceOp;

std::shared_ptr<parallel::Communicator> one_rank_nccl() {
  return parallel::make_nccl_communicator(parallel::make_single_communicator(), 0);
}

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16, DType::f64, DType::i32, DType::i64};

// Random values in dt (integers: rounded), on the GPU, and the same values on the host in f64.
Tensor random_gpu(int64_t n, Generator& g, DType dt, Tensor* host) {
  Tensor h = test::rand_host({n}, g, is_floating(dt) ? dt : DType::f32, 4.0);
  if (!is_floating(dt)) h = h.to(DType::i64).to(DType::f32);  // whole numbers
  *host = h.to(DType::f64);
  return test::to_gpu(h, dt);
}

TEST(Nccl, OneRankCommunicator) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  EXPECT_EQ(c->backend(), "nccl");
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  EXPECT_NE(c->native_handle(), nullptr);
  EXPECT_GE(parallel::nccl_version(), 21800);
}

// all_reduce of one rank leaves every value as it was (exactly: no conversion on the way).
TEST(Nccl, AllReduceIsIdentityEveryDtypeAndOp) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  Generator g(11);
  for (DType dt : kDtypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min, ReduceOp::avg}) {
      if (op == ReduceOp::avg && !is_floating(dt)) continue;
      for (int64_t n : {1, 37, 4099, 1 << 20}) {
        Tensor host;
        Tensor t = random_gpu(n, g, dt, &host);
        c->all_reduce(t, op);
        EXPECT_EQ(t.device(), Device::cuda(0));
        EXPECT_TRUE(test::all_close(t.to(Device::cpu()).to(DType::f64), host, 0, 0))
            << dtype_name(dt) << " op " << int(op) << " n " << n;
      }
    }
  }
}

TEST(Nccl, AvgOfIntegersIsRefused) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  Tensor t = Tensor::zeros({4}, DType::i32, Device::cuda(0));
  try {
    c->all_reduce(t, ReduceOp::avg);
    FAIL() << "avg of i32 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_reduce"), std::string::npos) << e.what();
  }
}

TEST(Nccl, BroadcastReduceScatterAllGatherCopy) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  Generator g(12);
  for (DType dt : kDtypes) {
    for (int64_t n : {1, 1001, 300000}) {
      Tensor host;
      Tensor t = random_gpu(n, g, dt, &host);
      c->broadcast(t, 0);
      EXPECT_TRUE(test::all_close(t.to(Device::cpu()).to(DType::f64), host, 0, 0))
          << "broadcast " << dtype_name(dt) << " n " << n;

      Tensor out = Tensor::empty({n}, dt, Device::cuda(0));  // poisoned: must be written
      c->reduce_scatter(t, out, ReduceOp::sum);
      EXPECT_TRUE(test::all_close(out.to(Device::cpu()).to(DType::f64), host, 0, 0))
          << "reduce_scatter " << dtype_name(dt) << " n " << n;

      Tensor out2 = Tensor::empty({n}, dt, Device::cuda(0));
      c->all_gather(t, out2);
      EXPECT_TRUE(test::all_close(out2.to(Device::cpu()).to(DType::f64), host, 0, 0))
          << "all_gather " << dtype_name(dt) << " n " << n;
    }
  }
  Tensor t = Tensor::zeros({4}, DType::f32, Device::cuda(0));
  EXPECT_THROW(c->broadcast(t, 1), Error);  // root out of range
  Tensor small = Tensor::zeros({3}, DType::f32, Device::cuda(0));
  EXPECT_THROW(c->all_gather(t, small), Error);
}

// The async forms: the kernel that writes the input runs on the current stream just before the
// collective (the NCCL stream must wait for it), and a kernel after wait() must see the result.
// Run on a non-default current stream so the stream handoff is exercised.
TEST(Nccl, AsyncOrdersAgainstTheCurrentStream) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  cuda::Stream s(0);
  cuda::StreamGuard guard(s.handle());
  Generator g(13);
  for (DType dt : {DType::f32, DType::bf16, DType::i64}) {
    const int64_t n = 1 << 22;  // large: a race would show
    Tensor host;
    Tensor src = random_gpu(n, g, dt, &host);
    Tensor t = Tensor::empty({n}, dt, Device::cuda(0));
    t.copy_(src);  // on the current stream, not waited for by the host
    auto w = c->all_reduce_async(t, ReduceOp::sum);
    w->wait();
    Tensor after = Tensor::empty({n}, dt, Device::cuda(0));
    after.copy_(t);  // current stream: ordered after the collective by wait()
    EXPECT_TRUE(test::all_close(after.to(Device::cpu()).to(DType::f64), host, 0, 0))
        << "all_reduce_async " << dtype_name(dt);

    Tensor rs = Tensor::empty({n}, dt, Device::cuda(0));
    auto w2 = c->reduce_scatter_async(t, rs, ReduceOp::max);
    Tensor ag = Tensor::empty({n}, dt, Device::cuda(0));
    auto w3 = c->all_gather_async(t, ag);
    w3->wait();
    w2->wait();
    EXPECT_TRUE(w2->done());
    EXPECT_TRUE(test::all_close(rs.to(Device::cpu()).to(DType::f64), host, 0, 0))
        << "reduce_scatter_async " << dtype_name(dt);
    EXPECT_TRUE(test::all_close(ag.to(Device::cpu()).to(DType::f64), host, 0, 0))
        << "all_gather_async " << dtype_name(dt);
  }
  // done() turns true without wait() once the collective finished.
  Tensor t = Tensor::ones({1000}, DType::f32, Device::cuda(0));
  auto w = c->all_reduce_async(t, ReduceOp::sum);
  s.synchronize();
  cuda::stream_synchronize(nullptr);
  c->barrier();  // the NCCL stream has drained
  EXPECT_TRUE(w->done());
  w->wait();
}

// CPU tensors go through the GPU and come back (the trainer's metric scalars are CPU tensors).
TEST(Nccl, CpuTensorsAreStagedThroughTheGpu) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  EXPECT_DOUBLE_EQ(c->all_reduce_scalar(2.5, ReduceOp::max), 2.5);
  EXPECT_EQ(c->all_reduce_int(-7), -7);
  Tensor t = Tensor::from_vector<float>({1.f, -2.f, 3.5f}, {3});
  c->broadcast(t, 0);
  EXPECT_EQ(t.device(), Device::cpu());
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1.f, -2.f, 3.5f}));
  Tensor out = Tensor::zeros({3});
  auto w = c->all_gather_async(t, out);
  w->wait();
  EXPECT_EQ(out.to_vector<float>(), (std::vector<float>{1.f, -2.f, 3.5f}));
}

TEST(Nccl, UnsupportedInputsNameTheOp) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  Tensor b = Tensor::zeros({4}, DType::b8, Device::cuda(0));
  try {
    c->all_reduce(b);
    FAIL() << "b8 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_reduce"), std::string::npos) << e.what();
  }
  Tensor nc = Tensor::zeros({4, 4}, DType::f32, Device::cuda(0)).transpose(0, 1);
  try {
    c->broadcast(nc, 0);
    FAIL() << "non-contiguous tensor accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("broadcast"), std::string::npos) << e.what();
  }
}

TEST(Nccl, SplitMakesAOneRankNcclCommunicator) {
  FTUNE_REQUIRE_GPU();
  auto c = one_rank_nccl();
  auto sub = c->split(3, 0);
  EXPECT_EQ(sub->backend(), "nccl");
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->rank(), 0);
  EXPECT_NE(sub->native_handle(), c->native_handle());
  Generator g(14);
  Tensor host;
  Tensor t = random_gpu(513, g, DType::f32, &host);
  sub->all_reduce(t, ReduceOp::sum);
  EXPECT_TRUE(test::all_close(t.to(Device::cpu()).to(DType::f64), host, 0, 0));
  sub->barrier();
  // The parent still works after the split.
  c->all_reduce(t, ReduceOp::max);
  EXPECT_TRUE(test::all_close(t.to(Device::cpu()).to(DType::f64), host, 0, 0));
  // A grid of tp 1 over it (the trainer's make_grid path).
  auto grid = parallel::make_grid(std::shared_ptr<parallel::Communicator>(std::move(sub)), 1);
  EXPECT_EQ(grid.dp_group->backend(), "nccl");
}

TEST(Nccl, WorldBackendNccl) {
  FTUNE_REQUIRE_GPU();
  auto w = parallel::make_world_communicator("nccl");  // not under mpirun: single bootstrap
  EXPECT_EQ(w->backend(), "nccl");
  EXPECT_EQ(w->size(), 1);
  EXPECT_THROW(parallel::make_world_communicator("gloo"), Error);
}

}  // namespace
}  // namespace ftune

#else
TEST(Nccl, NotBuilt) {
  FTUNE_REQUIRE_GPU();
  GTEST_SKIP() << "this build has no NCCL (FTUNE_CUDA=ON and NCCL at configure time)";
}
#endif
