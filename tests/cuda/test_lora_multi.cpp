// lora_linear_multi (batched q/k/v) on the GPU against the same op on the CPU in f32, on the same
// dtype-rounded inputs: y and every gradient (dx, each dA and dB), f32 / bf16 / f16, GQA-like
// segment sizes with an unadapted segment, different ranks, with and without dropout (per-adapter
// masks, one adapter at p = 0 among them), odd sizes (pointers into u and y off the 16-byte grid),
// and the fused low-rank kernels' du loads (16-byte and 4-byte) at the adapters' column offsets.
// The f32 CUDA-vs-CPU driver runs the op-table cases (tests/ops/table_lora_multi.cpp) too.
#include <gtest/gtest.h>

#include <cmath>

#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {


struct Seg {
  int64_t out, r;  // r 0: no adapter
  double scale, p;
  uint64_t seed;
};

TEST(CudaLoraMulti, MatchesCpuForwardAndGradients) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  const int64_t B = 3, T = 37, in = 136;
  const std::vector<std::vector<Seg>> configs{
      // q 128 rows, k 32 (unadapted), v 32; no dropout: the packed A path.
      {{128, 8, 2.0, 0, 0}, {32, 0, 0, 0, 0}, {32, 8, 2.0, 0, 0}},
      // odd ranks and rows; dropout on two adapters (own seeds), none on the third.
      {{72, 5, 1.5, 0.1, 11}, {24, 3, 1.5, 0.0, 12}, {24, 7, 1.5, 0.25, 13}},
      // dropout on every adapter, ranks the fused kernels load 16 bytes at a time (u, du of row
      // stride 32 at column offsets 0, 8, 24), then 4 bytes at a time (row stride 30).
      {{64, 8, 2.0, 0.1, 21}, {32, 16, 2.0, 0.2, 22}, {32, 8, 2.0, 0.05, 23}},
      {{64, 8, 2.0, 0.1, 31}, {32, 16, 2.0, 0.2, 32}, {32, 6, 2.0, 0.05, 33}},
  };
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (size_t ci = 0; ci < configs.size(); ++ci)
      for (bool bias : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " config " + std::to_string(ci) +
                     (bias ? " bias" : ""));
        const auto& segs = configs[ci];
        int64_t N = 0;
        for (const Seg& s : segs) N += s.out;
        Generator gen(100 + ci);
        Tensor hx = rand_host({B, T, in}, gen, dt), hw = rand_host({N, in}, gen, dt, 0.1);
        Tensor hb = rand_host({N}, gen, dt), hg = rand_host({B, T, N}, gen, dt);
        std::vector<Tensor> ha, hbm;
        for (const Seg& s : segs) {
          ha.push_back(s.r ? rand_host({s.r, in}, gen, dt, 0.1) : Tensor());
          hbm.push_back(s.r ? rand_host({s.out, s.r}, gen, dt, 0.1) : Tensor());
        }
        auto run = [&](bool gpu, std::vector<Tensor>& leaves) {
          auto put = [&](const Tensor& h) {
            Tensor t = gpu ? to_gpu(h, dt) : h.clone();
            return t.set_requires_grad(true);
          };
          Tensor x = put(hx);
          leaves.push_back(x);
          std::vector<ops::LoraSegment> ls;
          for (size_t i = 0; i < segs.size(); ++i) {
            ops::LoraSegment l;
            l.out = segs[i].out;
            if (segs[i].r) {
              l.a = put(ha[i]);
              l.b = put(hbm[i]);
              leaves.push_back(l.a);
              leaves.push_back(l.b);
              l.scale = segs[i].scale;
              l.dropout = segs[i].p;
              l.seed = segs[i].seed;
            }
            ls.push_back(l);
          }
          Tensor w = gpu ? to_gpu(hw, dt) : hw, b = gpu ? to_gpu(hb, dt) : hb;
          Tensor y = ops::lora_linear_multi(x, w, bias ? b : Tensor(), ls);
          y.backward(gpu ? to_gpu(hg, dt) : hg);
          return y;
        };
        std::vector<Tensor> cl, gl;
        Tensor cy = run(false, cl), gy = run(true, gl);
        ASSERT_TRUE(gy.device().is_cuda());
        EXPECT_TRUE(close_scaled(to_host(gy), cy, dt)) << "y";
        ASSERT_EQ(cl.size(), gl.size());
        for (size_t i = 0; i < cl.size(); ++i) {
          ASSERT_TRUE(gl[i].grad().defined()) << "leaf " << i;
          EXPECT_TRUE(gl[i].grad().device().is_cuda());
          EXPECT_TRUE(close_scaled(to_host(gl[i].grad()), cl[i].grad(), dt))
              << "grad of leaf " << i;
        }
      }
}

}  // namespace
}  // namespace ftune::test
