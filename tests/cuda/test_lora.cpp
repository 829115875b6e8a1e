// The fused LoRA linear on the GPU against the CPU kernel (kernels/lora.h) on the same
// dtype-rounded inputs: the dropout mask bit for bit (aligned, misaligned, in place; the accumulate
// to one rounding), the forward (y and the saved u) and every gradient (dx, dA, dB, and the subsets
// the op asks for), with and without dropout and bias, f32 / bf16 / f16, odd sizes; then the op
// with autograd.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "kernels/lora.h"
#include "kernels/matmul.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {


template <class F>
void for_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f32:
      f.template operator()<float>();
      return;
    case DType::bf16:
      f.template operator()<bf16>();
      return;
    case DType::f16:
      f.template operator()<f16>();
      return;
    default:
      FAIL();
  }
}

template <class T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

Tensor gpu_empty(const Shape& s, DType dt) { return Tensor::empty(s, dt, Device::cuda(0)); }

// ---- dropout mask
// ---------------------------------------------------------------------------------

TEST(CudaLora, DropoutMaskMatchesCpuExactly) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(1001), int64_t(4096 + 5)})
      for (double p : {0.1, 0.5})
        for (int offset : {0, 1}) {  // 1: pointers off the 16-byte grid (the scalar path)
          std::ostringstream tr;
          tr << dtype_name(dt) << " n=" << n << " p=" << p << " offset=" << offset;
          SCOPED_TRACE(tr.str());
          Generator gen(uint64_t(n) * 31 + offset);
          const uint64_t seed = 1234 + n;
          Tensor hx = rand_host({n + offset}, gen, dt), hacc = rand_host({n + offset}, gen, dt);
          // CPU reference in f32, then rounded to dt once, as the GPU rounds.
          Tensor ref = hx.clone(), ref_acc = hacc.clone();
          kernels::cpu::lora_dropout<float>(hx.data<float>() + offset, ref.data<float>() + offset,
                                            n, p, seed);
          kernels::cpu::lora_dropout_accumulate<float>(ref_acc.data<float>() + offset,
                                                       hx.data<float>() + offset, n, p, seed);
          ref = ref.to(dt).to(DType::f32);
          ref_acc = ref_acc.to(dt).to(DType::f32);
          Tensor dx = to_gpu(hx, dt), dout = to_gpu(hx, dt), dinplace = to_gpu(hx, dt);
          Tensor dacc = to_gpu(hacc, dt);
          for_dtype(dt, [&]<class T>() {
            kernels::cuda::lora_dropout<T>(ptr<T>(dx) + offset, ptr<T>(dout) + offset, n, p, seed);
            kernels::cuda::lora_dropout<T>(ptr<T>(dinplace) + offset, ptr<T>(dinplace) + offset, n,
                                           p, seed);
            kernels::cuda::lora_dropout_accumulate<T>(ptr<T>(dacc) + offset, ptr<T>(dx) + offset, n,
                                                      p, seed);
          });
          EXPECT_TRUE(all_close(to_host(dout), ref, 0, 0));
          EXPECT_TRUE(all_close(to_host(dinplace), ref, 0, 0));
          // acc + t * inv: the CPU compiler may contract it into an FMA (x86-64-v3), the GPU
          // kernel never does, so allow one rounding of difference.
          const double ulp = dt == DType::f32 ? 2e-7 : dt == DType::bf16 ? 1.0 / 128 : 1.0 / 1024;
          EXPECT_TRUE(all_close(to_host(dacc), ref_acc, 1e-6, ulp));
          if (n >= 1000) {  // the mask really drops about p of the elements
            auto v = to_host(dout).to_vector<double>();
            int64_t zeros = 0;
            for (int64_t i = offset; i < n + offset; ++i) zeros += v[i] == 0.0;
            EXPECT_NEAR(double(zeros) / double(n), p, 0.07);
          }
        }
}

// A column slice of the input (a row-parallel shard, LoraMaskCols): the GPU draws the CPU's mask.
TEST(CudaLora, ColumnSliceMaskMatchesCpuExactly) {
  FTUNE_REQUIRE_GPU();
  const double p = 0.3;
  const uint64_t seed = 99;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (kernels::LoraMaskCols cols : {kernels::LoraMaskCols{8, 8, 16},
                                       kernels::LoraMaskCols{5, 3, 11},
                                       kernels::LoraMaskCols{2501, 1, 2503}}) {
      SCOPED_TRACE(testing::Message() << dtype_name(dt) << " cols [" << cols.offset << ", +"
                                      << cols.width << ") of " << cols.full);
      const int64_t n = 3 * cols.width;
      Generator gen(uint64_t(cols.full));
      Tensor hx = rand_host({n}, gen, dt), hacc = rand_host({n}, gen, dt);
      Tensor ref = hx.clone(), ref_acc = hacc.clone();
      kernels::cpu::lora_dropout<float>(hx.data<float>(), ref.data<float>(), n, p, seed, cols);
      kernels::cpu::lora_dropout_accumulate<float>(ref_acc.data<float>(), hx.data<float>(), n, p,
                                                   seed, cols);
      ref = ref.to(dt).to(DType::f32);
      ref_acc = ref_acc.to(dt).to(DType::f32);
      Tensor dx = to_gpu(hx, dt), dout = to_gpu(hx, dt), dacc = to_gpu(hacc, dt);
      for_dtype(dt, [&]<class T>() {
        kernels::cuda::lora_dropout<T>(ptr<T>(dx), ptr<T>(dout), n, p, seed, cols);
        kernels::cuda::lora_dropout_accumulate<T>(ptr<T>(dacc), ptr<T>(dx), n, p, seed, cols);
      });
      EXPECT_TRUE(all_close(to_host(dout), ref, 0, 0));
      const double ulp = dt == DType::f32 ? 2e-7 : dt == DType::bf16 ? 1.0 / 128 : 1.0 / 1024;
      EXPECT_TRUE(all_close(to_host(dacc), ref_acc, 1e-6, ulp));
    }
}

// ---- forward and backward against the CPU kernel
// ----------------------------------------------------

struct Inputs {
  kernels::LoraDims d;
  Tensor x, w, bias, a, b, g;  // host f32, rounded to dt
};

Inputs make_inputs(const kernels::LoraDims& d, DType dt, uint64_t seed) {
  Generator gen(seed);
  Inputs in;
  in.d = d;
  in.x = rand_host({d.m, d.in}, gen, dt);
  in.w = rand_host({d.out, d.in}, gen, dt, 1.0 / std::sqrt(double(std::max<int64_t>(d.in, 1))));
  in.bias = rand_host({d.out}, gen, dt);
  in.a = rand_host({d.r, d.in}, gen, dt, 1.0 / std::sqrt(double(std::max<int64_t>(d.in, 1))));
  in.b = rand_host({d.out, d.r}, gen, dt, 1.0 / std::sqrt(double(d.r)));
  in.g = rand_host({d.m, d.out}, gen, dt);
  return in;
}

std::string describe(const kernels::LoraDims& d, DType dt, double p, bool bias) {
  std::ostringstream s;
  s << dtype_name(dt) << " m=" << d.m << " in=" << d.in << " out=" << d.out << " r=" << d.r
    << " p=" << p << (bias ? " bias" : "");
  return s.str();
}

const kernels::LoraDims kDims[] = {
    {1, 7, 5, 1}, {129, 1000, 7, 8}, {257, 129, 1000, 16}, {64, 256, 384, 4}, {0, 33, 17, 2}};
const float kScale = 0.5f;

TEST(CudaLora, ForwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 1;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (const auto& d : kDims)
      for (double p : {0.0, 0.25})
        for (bool bias : {false, true}) {
          SCOPED_TRACE(describe(d, dt, p, bias));
          Inputs in = make_inputs(d, dt, seed++);
          const uint64_t dseed = 77 + seed;
          Tensor ry = Tensor::empty({d.m, d.out}), ru = Tensor::empty({d.m, d.r});
          Tensor rxd = Tensor::empty({d.m, d.in});
          kernels::cpu::lora_forward<float>(
              d, in.x.data<float>(), in.w.data<float>(), bias ? in.bias.data<float>() : nullptr,
              in.a.data<float>(), in.b.data<float>(), kScale, p, dseed, rxd.data<float>(),
              ru.data<float>(), ry.data<float>());
          Tensor x = to_gpu(in.x, dt), w = to_gpu(in.w, dt), bi = to_gpu(in.bias, dt);
          Tensor a = to_gpu(in.a, dt), b = to_gpu(in.b, dt);
          Tensor y = gpu_empty({d.m, d.out}, dt), u = gpu_empty({d.m, d.r}, dt);
          Tensor xd = p > 0 ? gpu_empty({d.m, d.in}, dt) : Tensor();
          for_dtype(dt, [&]<class T>() {
            kernels::cuda::lora_forward<T>(d, ptr<T>(x), ptr<T>(w), bias ? ptr<T>(bi) : nullptr,
                                           ptr<T>(a), ptr<T>(b), kScale, p, dseed, ptr<T>(xd),
                                           ptr<T>(u), ptr<T>(y));
          });
          EXPECT_TRUE(close_scaled(to_host(u), ru, dt)) << "u";
          EXPECT_TRUE(close_scaled(to_host(y), ry, dt)) << "y";
        }
}

// need: bit 0 dx, bit 1 dA, bit 2 dB. Inputs only the unneeded gradients use are passed null.
TEST(CudaLora, BackwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 1000;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (const auto& d : kDims)
      for (double p : {0.0, 0.25})
        for (int need : {7, 6, 1, 4}) {
          const bool ndx = need & 1, nda = need & 2, ndb = need & 4;
          SCOPED_TRACE(describe(d, dt, p, false) + " need=" + std::to_string(need));
          Inputs in = make_inputs(d, dt, seed++);
          const uint64_t dseed = 99 + seed;
          // u as the forward saves it (the CPU's, rounded to dt): both sides start from it.
          Tensor u_ref = Tensor::empty({d.m, d.r}), scratch = Tensor::empty({d.m, d.in});
          Tensor y_tmp = Tensor::empty({d.m, d.out});
          kernels::cpu::lora_forward<float>(d, in.x.data<float>(), in.w.data<float>(), nullptr,
                                            in.a.data<float>(), in.b.data<float>(), kScale, p,
                                            dseed, scratch.data<float>(), u_ref.data<float>(),
                                            y_tmp.data<float>());
          Tensor hu = u_ref.to(dt).to(DType::f32);

          Tensor rdx = Tensor::empty({d.m, d.in}), rda = Tensor::empty({d.r, d.in});
          Tensor rdb = Tensor::empty({d.out, d.r}), rdu = Tensor::empty({d.m, d.r});
          Tensor rxd = Tensor::empty({d.m, d.in});
          Tensor rkeep = Tensor::empty({d.m, d.in}, DType::b8);
          kernels::cpu::lora_backward<float>(
              d, in.g.data<float>(), nda ? in.x.data<float>() : nullptr,
              ndx ? in.w.data<float>() : nullptr, ndx ? in.a.data<float>() : nullptr,
              ndx || nda ? in.b.data<float>() : nullptr, ndb ? hu.data<float>() : nullptr, kScale,
              p, dseed, rdu.data<float>(), rxd.data<float>(),
              static_cast<uint8_t*>(rkeep.raw_data()), ndx ? rdx.data<float>() : nullptr,
              nda ? rda.data<float>() : nullptr, ndb ? rdb.data<float>() : nullptr);

          Tensor g = to_gpu(in.g, dt);
          Tensor x = nda ? to_gpu(in.x, dt) : Tensor(), w = ndx ? to_gpu(in.w, dt) : Tensor();
          Tensor a = ndx ? to_gpu(in.a, dt) : Tensor(),
                 b = ndx || nda ? to_gpu(in.b, dt) : Tensor();
          Tensor u = ndb ? to_gpu(hu, dt) : Tensor();
          Tensor dx = ndx ? gpu_empty({d.m, d.in}, dt) : Tensor();
          Tensor da = nda ? gpu_empty({d.r, d.in}, dt) : Tensor();
          Tensor db = ndb ? gpu_empty({d.out, d.r}, dt) : Tensor();
          Tensor du = ndx || nda ? gpu_empty({d.m, d.r}, dt) : Tensor();
          Tensor xd = p > 0 && (ndx || nda) ? gpu_empty({d.m, d.in}, dt) : Tensor();
          for_dtype(dt, [&]<class T>() {
            kernels::cuda::lora_backward<T>(
                d, ptr<T>(g), ptr<T>(x), ptr<T>(w), ptr<T>(a), ptr<T>(b), ptr<T>(u), kScale, p,
                dseed, ptr<T>(du), ptr<T>(xd), nullptr, ptr<T>(dx), ptr<T>(da), ptr<T>(db));
          });
          if (ndx) EXPECT_TRUE(close_scaled(to_host(dx), rdx, dt)) << "dx";
          if (nda) EXPECT_TRUE(close_scaled(to_host(da), rda, dt)) << "dA";
          if (ndb) EXPECT_TRUE(close_scaled(to_host(db), rdb, dt)) << "dB";
        }
}

// Without dropout the LoRA gradient of x is part of dx: check it is really added (B != 0), and
// that dropout changes it (the mask reaches the backward).
TEST(CudaLora, AdapterReachesDx) {
  FTUNE_REQUIRE_GPU();
  const kernels::LoraDims d{64, 96, 80, 8};
  Inputs in = make_inputs(d, DType::f32, 5);
  Tensor g = to_gpu(in.g, DType::f32), w = to_gpu(in.w, DType::f32), a = to_gpu(in.a, DType::f32);
  Tensor b = to_gpu(in.b, DType::f32), du = gpu_empty({d.m, d.r}, DType::f32);
  Tensor xd = gpu_empty({d.m, d.in}, DType::f32);
  Tensor base = gpu_empty({d.m, d.in}, DType::f32), with0 = gpu_empty({d.m, d.in}, DType::f32);
  Tensor with_p = gpu_empty({d.m, d.in}, DType::f32);
  kernels::cuda::lora_backward<float>(d, ptr<float>(g), nullptr, ptr<float>(w), ptr<float>(a),
                                      ptr<float>(b), nullptr, 0.f, 0.0, 1, ptr<float>(du), nullptr,
                                      nullptr, ptr<float>(base), nullptr, nullptr);
  kernels::cuda::lora_backward<float>(d, ptr<float>(g), nullptr, ptr<float>(w), ptr<float>(a),
                                      ptr<float>(b), nullptr, kScale, 0.0, 1, ptr<float>(du),
                                      nullptr, nullptr, ptr<float>(with0), nullptr, nullptr);
  kernels::cuda::lora_backward<float>(
      d, ptr<float>(g), nullptr, ptr<float>(w), ptr<float>(a), ptr<float>(b), nullptr, kScale, 0.5,
      1, ptr<float>(du), ptr<float>(xd), nullptr, ptr<float>(with_p), nullptr, nullptr);
  EXPECT_GT(rel_l2(to_host(with0), to_host(base)), 1e-2);
  EXPECT_GT(rel_l2(to_host(with_p), to_host(with0)), 1e-3);
}

// ---- the fused low-rank kernels (lora_down_fused / lora_up_fused) ----------------------------

// Sets an environment variable for a scope (the kernels read FTUNE_LORA_FUSED per call).
struct ScopedEnv {
  std::string name;
  bool had = false;
  std::string old;
  ScopedEnv(const char* n, const char* v) : name(n) {
    if (const char* o = std::getenv(n)) {
      had = true;
      old = o;
    }
    if (v) ::setenv(n, v, 1);
    else ::unsetenv(n);
  }
  ~ScopedEnv() {
    if (had) ::setenv(name.c_str(), old.c_str(), 1);
    else ::unsetenv(name.c_str());
  }
};

// The decision of which path a call takes happens on the host, before anything is launched: it
// runs without a GPU. Each declined case would otherwise read or write out of bounds, or draw a
// mask the kernels cannot (a column slice off the Philox block grid).
TEST(CudaLora, FusedKernelsDeclineWhatTheyDoNotCover) {
  // With a GPU the buffers are device memory (large enough for the calls), so a regression that
  // launches fails here rather than with a sticky illegal address in a later test.
  const bool gpu = cuda_available();
  alignas(16) static bf16 hbuf[64 * 128];
  alignas(16) static float hfbuf[64 * 128];
  Tensor dbuf = gpu ? gpu_empty({64 * 128}, DType::bf16) : Tensor();
  Tensor dfbuf = gpu ? gpu_empty({64 * 128}, DType::f32) : Tensor();
  bf16* buf = gpu ? dbuf.data<bf16>() : hbuf;
  float* fbuf = gpu ? dfbuf.data<float>() : hfbuf;
  bf16* x = buf;
  const kernels::LoraDims ok{64, 64, 32, 8};
  auto down = [&](const kernels::LoraDims& d, double p, const bf16* xp) {
    return kernels::cuda::lora_down_fused<bf16>(d, xp, buf, p, 1, buf, d.r);
  };
  auto up = [&](const kernels::LoraDims& d, double p, const bf16* xp) {
    return kernels::cuda::lora_up_fused<bf16>(d, xp, buf, d.r, buf, p, 1, buf, buf, false);
  };
  {
    ScopedEnv env("FTUNE_LORA_FUSED", nullptr);  // auto: only with dropout
    EXPECT_FALSE(down(ok, 0.0, x));
    EXPECT_FALSE(up(ok, 0.0, x));
    EXPECT_FALSE(kernels::cuda::lora_down_fused<float>(ok, fbuf, fbuf, 0.1, 1, fbuf, 8));
    EXPECT_FALSE(kernels::cuda::lora_up_fused<float>(ok, fbuf, fbuf, 8, fbuf, 0.1, 1, fbuf, fbuf,
                                                     false));
    EXPECT_FALSE(down({64, 64, 32, 65}, 0.1, x)) << "rank above 64";
    EXPECT_FALSE(up({64, 64, 32, 65}, 0.1, x)) << "rank above 64";
    EXPECT_FALSE(down({64, 60, 32, 8}, 0.1, x)) << "rows of x not whole 16-byte chunks";
    EXPECT_FALSE(up({64, 60, 32, 8}, 0.1, x)) << "rows of x not whole 16-byte chunks";
    EXPECT_FALSE(down({0, 64, 32, 8}, 0.1, x)) << "no rows";
    EXPECT_FALSE(down(ok, 0.1, x + 1)) << "x off the 16-byte grid";
    EXPECT_FALSE(up(ok, 0.1, x + 1)) << "x off the 16-byte grid";
    EXPECT_FALSE(down({64, 64, 32, 8, 2, 128}, 0.1, x)) << "slice offset not a multiple of 4";
    EXPECT_FALSE(up({64, 64, 32, 8, 4, 70}, 0.1, x)) << "full width not a multiple of 4";
    EXPECT_FALSE(kernels::cuda::lora_up_fused<bf16>(ok, x, buf, 8, buf, 0.1, 1, nullptr, nullptr,
                                                    false))
        << "no output asked for";
  }
  {
    ScopedEnv env("FTUNE_LORA_FUSED", "0");  // never
    EXPECT_FALSE(down(ok, 0.1, x));
    EXPECT_FALSE(up(ok, 0.1, x));
  }
  EXPECT_THROW(down(ok, 1.0, x), Error);
}

// Row-major host GEMM in f32: c [m, n] = a [m, k] b^T (tb) or a b.
Tensor host_mm(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  const int64_t m = ta ? a.size(1) : a.size(0), k = ta ? a.size(0) : a.size(1);
  const int64_t n = tb ? b.size(0) : b.size(1);
  Tensor c = Tensor::empty({m, n});
  kernels::cpu::gemm<float>(ta, tb, m, n, k, 1.f, a.data<float>(), a.size(1), b.data<float>(),
                            b.size(1), 0.f, c.data<float>(), n);
  return c;
}

// drop(t) on the host as the GPU rounds it: the mask's product rounded to dt.
Tensor host_drop(const Tensor& t, double p, uint64_t seed, const kernels::LoraMaskCols& cols,
                 DType dt) {
  if (p == 0) return t.clone();
  Tensor out = Tensor::empty(t.shape());
  kernels::cpu::lora_dropout<float>(t.data<float>(), out.data<float>(), t.numel(), p, seed, cols);
  return out.to(dt).to(DType::f32);
}

// u = drop(x) A^T, dA = du^T drop(x) and dx (=|+=) drop'(du A) from the fused kernels against
// the same products on the host, over ranks that pad (1, 5, 24, 33), one that fills the tile
// (64), row counts around the 64-row tile and over many splits, strided u / du (ldu > r), column
// slices of a row-parallel input, and without dropout (FTUNE_LORA_FUSED=1). The kernels must
// take each case (they return whether they did).
TEST(CudaLora, FusedLowRankKernelsMatchCpu) {
  FTUNE_REQUIRE_GPU();
  struct Case {
    int64_t m, in, r, ldu;
    kernels::LoraMaskCols cols;  // width is set to in below
  };
  const Case cases[] = {{1, 8, 1, 1, {}},          {63, 64, 4, 4, {}},
                        {200, 72, 8, 12, {}},  // du by 4-byte copies (ldu not a multiple of 8)
                        {64, 72, 5, 13, {}},        {65, 200, 8, 8, {0, 8, 216}},
                        {300, 1024, 16, 24, {}},    {129, 520, 24, 24, {0, 4, 528}},
                        {1000, 136, 33, 40, {}},    {257, 256, 64, 64, {}},
                        {4100, 64, 16, 16, {}},     {700, 2048, 48, 48, {0, 2048, 4096}}};
  uint64_t seed = 7;
  for (DType dt : {DType::bf16, DType::f16})
    for (const Case& c : cases)
      for (double p : {0.0, 0.3}) {
        ScopedEnv env("FTUNE_LORA_FUSED", p == 0 ? "1" : nullptr);
        kernels::LoraDims d{c.m, c.in, 32, c.r};
        if (c.cols.full) {
          d.in_offset = c.cols.offset;
          d.in_full = c.cols.full;
        }
        SCOPED_TRACE(describe(d, dt, p, false) + " ldu=" + std::to_string(c.ldu) + " cols " +
                     std::to_string(d.in_offset) + "/" + std::to_string(d.in_full));
        Generator gen(seed++);
        const uint64_t dseed = 1000 + seed;
        Tensor hx = rand_host({c.m, c.in}, gen, dt);
        Tensor ha = rand_host({c.r, c.in}, gen, dt, 1.0 / std::sqrt(double(c.in)));
        Tensor hdu = rand_host({c.m, c.ldu}, gen, dt);  // du in its first r columns
        Tensor hdx0 = rand_host({c.m, c.in}, gen, dt);
        Tensor du_r = hdu.slice(1, 0, c.r).contiguous();
        // Host reference in f32 from the same dt-rounded values.
        const kernels::LoraMaskCols cols = d.mask_cols();
        Tensor xd = host_drop(hx, p, dseed, cols, dt);
        Tensor u_ref = host_mm(xd, ha, false, true);
        Tensor da_ref = host_mm(du_r, xd, true, false);
        Tensor share = host_drop(host_mm(du_r, ha, false, false).to(dt).to(DType::f32), p, dseed,
                                 cols, dt);
        Tensor dx_ref = share, dxacc_ref = hdx0.clone();
        ops::add_(dxacc_ref, share);

        Tensor x = to_gpu(hx, dt), a = to_gpu(ha, dt), du = to_gpu(hdu, dt);
        Tensor u = gpu_empty({c.m, c.ldu}, dt), da = gpu_empty({c.r, c.in}, dt);
        Tensor da2 = gpu_empty({c.r, c.in}, dt), dx = gpu_empty({c.m, c.in}, dt);
        Tensor dxacc = to_gpu(hdx0, dt), dx_only = gpu_empty({c.m, c.in}, dt);
        Tensor da_only = gpu_empty({c.r, c.in}, dt);
        for_dtype(dt, [&]<class T>() {
          EXPECT_TRUE(kernels::cuda::lora_down_fused<T>(d, ptr<T>(x), ptr<T>(a), p, dseed,
                                                        ptr<T>(u), c.ldu));
          EXPECT_TRUE(kernels::cuda::lora_up_fused<T>(d, ptr<T>(x), ptr<T>(du), c.ldu, ptr<T>(a),
                                                      p, dseed, ptr<T>(da), ptr<T>(dx), false));
          EXPECT_TRUE(kernels::cuda::lora_up_fused<T>(d, ptr<T>(x), ptr<T>(du), c.ldu, ptr<T>(a),
                                                      p, dseed, ptr<T>(da2), ptr<T>(dxacc), true));
          EXPECT_TRUE(kernels::cuda::lora_up_fused<T>(d, nullptr, ptr<T>(du), c.ldu, ptr<T>(a), p,
                                                      dseed, nullptr, ptr<T>(dx_only), false));
          EXPECT_TRUE(kernels::cuda::lora_up_fused<T>(d, ptr<T>(x), ptr<T>(du), c.ldu, nullptr, p,
                                                      dseed, ptr<T>(da_only), nullptr, false));
        });
        EXPECT_TRUE(close_scaled(to_host(u).slice(1, 0, c.r).contiguous(), u_ref, dt)) << "u";
        EXPECT_TRUE(close_scaled(to_host(da), da_ref, dt)) << "dA";
        EXPECT_TRUE(close_scaled(to_host(dx), dx_ref, dt)) << "dx";
        EXPECT_TRUE(close_scaled(to_host(dxacc), dxacc_ref, dt)) << "dx accumulated";
        // The same pass with fewer outputs, and dA again: bit for bit (fixed summation order).
        EXPECT_TRUE(all_close(to_host(dx_only), to_host(dx), 0, 0)) << "dx alone";
        EXPECT_TRUE(all_close(to_host(da_only), to_host(da), 0, 0)) << "dA alone";
        EXPECT_TRUE(all_close(to_host(da2), to_host(da), 0, 0)) << "dA again";
        if (p > 0) {  // dropped elements of dx are exactly 0 where the mask drops
          auto v = to_host(dx).to_vector<double>();
          int64_t zeros = 0;
          for (double e : v) zeros += e == 0.0;
          if (c.m * c.in >= 10000) EXPECT_NEAR(double(zeros) / double(v.size()), p, 0.05);
        }
      }
}

// ---- the op with autograd
// ---------------------------------------------------------------------------

TEST(CudaLora, OpBf16WithDropoutAndGradients) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    const kernels::LoraDims d{2 * 33, 200, 150, 8};
    Inputs in = make_inputs(d, dt, 42);
    const double scale = 0.5, p = 0.2;
    const uint64_t seed = 2024;
    Tensor hx = in.x.view({2, 33, d.in});
    Tensor hg = in.g.view({2, 33, d.out});
    Tensor cx = hx.clone().set_requires_grad(true), ca = in.a.clone().set_requires_grad(true);
    Tensor cb = in.b.clone().set_requires_grad(true);
    Tensor gx = to_gpu(hx, dt).set_requires_grad(true),
           ga = to_gpu(in.a, dt).set_requires_grad(true);
    Tensor gb = to_gpu(in.b, dt).set_requires_grad(true);
    Tensor cy = ops::lora_linear(cx, in.w, in.bias, ca, cb, scale, p, seed);
    Tensor gy = ops::lora_linear(gx, to_gpu(in.w, dt), to_gpu(in.bias, dt), ga, gb, scale, p, seed);
    ASSERT_TRUE(gy.device().is_cuda());
    EXPECT_TRUE(close_scaled(to_host(gy), cy, dt)) << "y";
    cy.backward(hg);
    gy.backward(to_gpu(hg, dt));
    ASSERT_TRUE(gx.grad().defined() && ga.grad().defined() && gb.grad().defined());
    EXPECT_TRUE(gx.grad().device().is_cuda());
    EXPECT_TRUE(close_scaled(to_host(gx.grad()), cx.grad(), dt)) << "dx";
    EXPECT_TRUE(close_scaled(to_host(ga.grad()), ca.grad(), dt)) << "dA";
    EXPECT_TRUE(close_scaled(to_host(gb.grad()), cb.grad(), dt)) << "dB";
  }
}

}  // namespace
}  // namespace ftune::test
