// CUDA twins of the elementwise, reduction, activation, RoPE, embedding and cast kernels against
// the CPU kernels (the reference, run in f32 on the same dtype-rounded inputs), in f32, bf16 and
// f16, at odd sizes (vector tails), unaligned views (the scalar paths), broadcast/strided views
// and large sizes. New device buffers are poisoned (NaN bytes), so an unwritten element fails.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "core/ops/common.h"
#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/rope.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

using kernels::BinaryOp;
using kernels::UnaryOp;

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

Tensor gpu_empty(const Shape& s, DType dt) { return Tensor::empty(s, dt, Device::cuda(0)); }
Tensor cpu_empty(const Shape& s) { return Tensor::empty(s, DType::f32, Device::cpu()); }

// Elementwise results: one rounding of an f32 result to dt, plus a few f32 ulps of math.
double ew_rtol(DType dt) { return std::max(dtype_rtol(dt), 1e-5); }

// Exact equality, NaN equal to NaN (max, argmax, copies).
::testing::AssertionResult same_values(const Tensor& got, const Tensor& ref) {
  if (got.shape() != ref.shape())
    return ::testing::AssertionFailure() << "shape " << shape_str(got.shape()) << " vs " << shape_str(ref.shape());
  auto g = got.to(Device::cpu()).to_vector<double>(), r = ref.to(Device::cpu()).to_vector<double>();
  for (size_t i = 0; i < g.size(); ++i) {
    const bool ok = (std::isnan(g[i]) && std::isnan(r[i])) || g[i] == r[i];
    if (!ok) return ::testing::AssertionFailure() << "element " << i << ": got " << g[i] << ", want " << r[i];
  }
  return ::testing::AssertionSuccess();
}

// A contiguous GPU view of n elements starting one element into its buffer (not 16-byte aligned).
Tensor unaligned_gpu(const Tensor& host_f32, DType dt) {
  const int64_t n = host_f32.numel();
  Tensor big = Tensor::empty({n + 1}, DType::f32, Device::cpu());
  big.fill_(0.0);
  big.slice(0, 1, n + 1).copy_(host_f32.reshape({n}));
  return to_gpu(big, dt).slice(0, 1, n + 1).view(host_f32.shape());
}

const char* bname(BinaryOp op) {
  switch (op) {
    case BinaryOp::add: return "add";
    case BinaryOp::sub: return "sub";
    case BinaryOp::mul: return "mul";
    case BinaryOp::div: return "div";
  }
  return "?";
}

// ---- binary -------------------------------------------------------------------------------------

void check_binary(BinaryOp op, const Shape& sa, const Shape& sb, DType dt, uint64_t seed, bool transpose_a = false,
                  bool unaligned = false) {
  Generator g(seed);
  Tensor a = rand_host(sa, g, dt);
  Tensor b = op == BinaryOp::div ? rand_host(sb, g, dt, 0.5, 2.0) : rand_host(sb, g, dt);
  Tensor ad = unaligned ? unaligned_gpu(a, dt) : to_gpu(a, dt), bd = unaligned ? unaligned_gpu(b, dt) : to_gpu(b, dt);
  if (transpose_a) {  // a strided view: the transpose of a contiguous [.., x, y]
    const int64_t d = a.dim();
    ad = to_gpu(a.transpose(d - 2, d - 1).contiguous(), dt).transpose(d - 2, d - 1);
    ASSERT_FALSE(ad.is_contiguous());
  }
  Shape so = ops::detail::broadcast_shapes("test", sa, sb);
  Tensor ref = cpu_empty(so);
  kernels::cpu::binary(op, a.expand(so), b.expand(so), ref);
  Tensor out = gpu_empty(so, dt);
  kernels::cuda::binary(op, ad.expand(so), bd.expand(so), out);
  EXPECT_TRUE(all_close(out, ref, 1e-6, ew_rtol(dt)))
      << bname(op) << " " << shape_str(sa) << " , " << shape_str(sb) << " " << dtype_name(dt)
      << (transpose_a ? " transposed" : "") << (unaligned ? " unaligned" : "");
}

TEST(CudaElementwise, BinarySameShapeOddSizes) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes)
    for (BinaryOp op : {BinaryOp::add, BinaryOp::sub, BinaryOp::mul, BinaryOp::div}) {
      check_binary(op, {1}, {1}, dt, 1);
      check_binary(op, {7}, {7}, dt, 2);
      check_binary(op, {1000003}, {1000003}, dt, 3);
      check_binary(op, {33, 65}, {33, 65}, dt, 4, false, true);  // unaligned: scalar path
    }
}

TEST(CudaElementwise, BinaryBroadcastAndStrided) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes)
    for (BinaryOp op : {BinaryOp::add, BinaryOp::sub, BinaryOp::mul, BinaryOp::div}) {
      check_binary(op, {37, 129}, {129}, dt, 5);          // row bias
      check_binary(op, {37, 1}, {37, 129}, dt, 6);        // column broadcast, a on the left
      check_binary(op, {5, 1, 7}, {1, 17, 7}, dt, 7);     // both broadcast
      check_binary(op, {}, {1001}, dt, 8);                // scalar
      check_binary(op, {3, 4, 5, 6, 7}, {4, 1, 6, 1}, dt, 9);
      check_binary(op, {31, 45}, {31, 45}, dt, 10, true);  // a transposed
      check_binary(op, {2, 31, 45}, {45}, dt, 11, true);
      // Rows of a multiple of 8 elements: the 16-byte row-broadcast path (bias, per-row value,
      // scalar), and an unaligned bias, which must fall back to the strided path.
      check_binary(op, {37, 136}, {136}, dt, 14);
      check_binary(op, {37, 1}, {37, 136}, dt, 15);
      check_binary(op, {3, 5, 64}, {5, 64}, dt, 16);
      check_binary(op, {}, {1000}, dt, 17);
      check_binary(op, {33, 64}, {64}, dt, 18, false, true);
    }
}

TEST(CudaElementwise, BinaryLarge) {
  FTUNE_REQUIRE_GPU();
  check_binary(BinaryOp::add, {(1 << 24) + 5}, {(1 << 24) + 5}, DType::bf16, 12);
  check_binary(BinaryOp::mul, {4096, 4099}, {4099}, DType::f32, 13);
  check_binary(BinaryOp::add, {3000, 4096}, {4096}, DType::bf16, 19);  // many rows per thread
  check_binary(BinaryOp::sub, {4096, 1}, {4096, 2048}, DType::f32, 20);
}

// ---- unary --------------------------------------------------------------------------------------

const UnaryOp kUnary[] = {UnaryOp::neg,     UnaryOp::exp,  UnaryOp::log,    UnaryOp::sqrt,       UnaryOp::tanh,
                          UnaryOp::sigmoid, UnaryOp::relu, UnaryOp::square, UnaryOp::add_scalar, UnaryOp::mul_scalar};

Tensor unary_input(UnaryOp op, const Shape& s, Generator& g, DType dt) {
  Tensor x = rand_host(s, g, dt, 1.5);
  if (op == UnaryOp::log || op == UnaryOp::sqrt) x = ops::add_scalar(ops::relu(x), 0.25).to(dt).to(DType::f32);
  return x;
}

TEST(CudaElementwise, UnaryForwardAndBackward) {
  FTUNE_REQUIRE_GPU();
  const double s = 0.7;
  for (DType dt : kDtypes)
    for (UnaryOp op : kUnary)
      for (int64_t n : {int64_t(1), int64_t(13), int64_t(300007)}) {
        Generator g(100 + n);
        Tensor x = unary_input(op, {n}, g, dt);
        Tensor ref = cpu_empty({n});
        kernels::cpu::unary(op, x, ref, s);
        Tensor out = gpu_empty({n}, dt);
        kernels::cuda::unary(op, to_gpu(x, dt), out, s);
        EXPECT_TRUE(all_close(out, ref, 1e-6, ew_rtol(dt))) << "unary " << int(op) << " n " << n << " " << dtype_name(dt);

        // Backward from x, y = f(x) rounded to dt, and dy.
        Tensor y = ref.to(dt).to(DType::f32);
        Tensor dy = rand_host({n}, g, dt);
        Tensor dref = cpu_empty({n});
        kernels::cpu::unary_backward(op, x, y, dy, dref, s);
        Tensor dx = gpu_empty({n}, dt);
        kernels::cuda::unary_backward(op, to_gpu(x, dt), to_gpu(y, dt), to_gpu(dy, dt), dx, s);
        EXPECT_TRUE(all_close(dx, dref, 1e-5, ew_rtol(dt)))
            << "unary_backward " << int(op) << " n " << n << " " << dtype_name(dt);
      }
}

TEST(CudaElementwise, UnaryStridedInput) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes) {
    Generator g(21);
    Tensor x = rand_host({37, 53}, g, dt);
    Tensor xt = x.transpose(0, 1);  // [53, 37] strided
    Tensor ref = cpu_empty({53, 37});
    kernels::cpu::unary(UnaryOp::tanh, xt, ref, 0.0);
    Tensor out = gpu_empty({53, 37}, dt);
    kernels::cuda::unary(UnaryOp::tanh, to_gpu(x, dt).transpose(0, 1), out, 0.0);
    EXPECT_TRUE(all_close(out, ref, 1e-6, ew_rtol(dt))) << dtype_name(dt);
    // A broadcast input materialized by x * 1 (the sum backward's copy): exact.
    Tensor row = rand_host({1, 53}, g, dt);
    Tensor out2 = gpu_empty({19, 53}, dt);
    kernels::cuda::unary(UnaryOp::mul_scalar, to_gpu(row, dt).expand({19, 53}), out2, 1.0);
    EXPECT_TRUE(same_values(out2, row.expand({19, 53}).contiguous())) << dtype_name(dt);
  }
}

TEST(CudaElementwise, AxpyAndScale) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes)
    for (int64_t n : {int64_t(3), int64_t(1000003)}) {
      Generator g(31);
      Tensor a = rand_host({n}, g, dt), b = rand_host({n}, g, dt);
      Tensor ref = a.clone();
      kernels::cpu::axpy(ref, b, -0.375);
      Tensor ad = to_gpu(a, dt);
      kernels::cuda::axpy(ad, to_gpu(b, dt), -0.375);
      EXPECT_TRUE(all_close(ad, ref, 1e-6, ew_rtol(dt))) << "axpy " << n << " " << dtype_name(dt);
      Tensor ref2 = a.clone();
      kernels::cpu::scale_(ref2, 1.75);
      Tensor ad2 = unaligned_gpu(a, dt);
      kernels::cuda::scale_(ad2, 1.75);
      EXPECT_TRUE(all_close(ad2, ref2, 1e-6, ew_rtol(dt))) << "scale_ " << n << " " << dtype_name(dt);
    }
}

// ops::add_ into a strided destination (a slice along the last dim of a wider tensor), and the
// slice backward that uses it: the q | k | v split's gradients summed into one tensor on the GPU,
// against the same graph on the CPU.
TEST(CudaElementwise, StridedAddInPlaceAndSliceGradients) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes) {
    Generator g(37);
    Tensor w = rand_host({5, 11}, g, dt), b = rand_host({5, 4}, g, dt);
    Tensor ref = w.clone();
    {
      Tensor r = ref.slice(1, 6, 10);
      ops::add_(r, b, 0.3);
    }
    Tensor wd = to_gpu(w, dt);
    Tensor rd = wd.slice(1, 6, 10);
    Tensor same = rd.contiguous();  // the contiguous path, for the bits
    ops::add_(same, to_gpu(b, dt), 0.3);
    ops::add_(rd, to_gpu(b, dt), 0.3);
    EXPECT_TRUE(all_close(wd, ref, 1e-6, ew_rtol(dt))) << "add_ strided " << dtype_name(dt);
    EXPECT_EQ(rd.contiguous().to(Device::cpu()).to(DType::f64).to_vector<double>(),
              same.to(Device::cpu()).to(DType::f64).to_vector<double>());
    EXPECT_EQ(wd.slice(1, 0, 6).contiguous().to(Device::cpu()).to(DType::f32).to_vector<float>(),
              w.slice(1, 0, 6).contiguous().to(DType::f32).to_vector<float>());
    // A middle-dim slice of a 3-d tensor (dims that do not merge), against the CPU.
    Tensor w3 = rand_host({3, 5, 6}, g, dt), b3 = rand_host({3, 2, 6}, g, dt);
    Tensor ref3 = w3.clone();
    {
      Tensor r = ref3.slice(1, 2, 4);
      ops::add_(r, b3, -1.25);
    }
    Tensor w3d = to_gpu(w3, dt);
    {
      Tensor r = w3d.slice(1, 2, 4);
      ops::add_(r, to_gpu(b3, dt), -1.25);
    }
    EXPECT_TRUE(all_close(w3d, ref3, 1e-6, ew_rtol(dt))) << "add_ 3-d " << dtype_name(dt);

    Tensor x = rand_host({3, 7, 12}, g, dt), gq = rand_host({3, 7, 8}, g, dt),
           gk = rand_host({3, 7, 2}, g, dt), gv = rand_host({3, 7, 2}, g, dt);
    auto grad_of = [&](Device dev) {
      Tensor xl = (dev.is_cuda() ? to_gpu(x, dt) : x.clone()).set_requires_grad(true);
      Tensor y = ops::mul_scalar(xl, 2.0);
      auto term = [&](int64_t s, int64_t e, const Tensor& gt) {
        return ops::sum(ops::mul(y.slice(2, s, e), dev.is_cuda() ? to_gpu(gt, dt) : gt));
      };
      ops::add(ops::add(term(0, 8, gq), term(8, 10, gk)), term(10, 12, gv)).backward();
      return xl.grad();
    };
    EXPECT_TRUE(all_close(grad_of(Device::cuda(0)), grad_of(Device::cpu()), 1e-6, ew_rtol(dt)))
        << "slice gradients " << dtype_name(dt);
  }
}

// ---- reductions -----------------------------------------------------------------------------------

TEST(CudaElementwise, SumDim) {
  FTUNE_REQUIRE_GPU();
  struct C {
    int64_t outer, n, inner;
  };
  const C cases[] = {{1, 1, 1},     {1, 1000003, 1}, {3, 777, 1},      {513, 4097, 1}, {2, 4096, 1},
                     {5, 300, 129}, {2, 100000, 3},  {1000, 7, 33},    {1, 5, 4096},   {4, 0, 3},
                     {1, 20000, 1}, {7, 1, 9},       {1, 300000, 40},  {3, 5000, 264}, {2, 64, 8}};
  for (DType dt : kDtypes)
    for (const C& c : cases) {
      Generator g(41 + c.n);
      Tensor a = rand_host({c.outer, c.n, c.inner}, g, dt);
      Tensor ref = cpu_empty({c.outer, c.inner});
      kernels::cpu::sum_dim(a, c.outer, c.n, c.inner, ref);
      Tensor out = gpu_empty({c.outer, c.inner}, dt);
      kernels::cuda::sum_dim(to_gpu(a, dt), c.outer, c.n, c.inner, out);
      // f32 accumulation against the CPU's f64: a few ulps of the partial sums' magnitude.
      const double atol = 1e-5 * std::sqrt(double(std::max<int64_t>(c.n, 1)));
      EXPECT_TRUE(all_close(out, ref, atol, dtype_rtol(dt)))
          << "[" << c.outer << ", " << c.n << ", " << c.inner << "] " << dtype_name(dt);
    }
}

TEST(CudaElementwise, AmaxArgmaxTiesAndNaN) {
  FTUNE_REQUIRE_GPU();
  struct C {
    int64_t outer, n, inner;
  };
  // 70000, 4096, 2000 over dim 1: the vector row kernel with 1, 2 and 4 (partial) loads a thread.
  const C cases[] = {{1, 1, 1},   {37, 1001, 1}, {3, 70000, 1}, {5, 300, 129},
                     {64, 9, 7},  {2, 3, 1000},  {41, 4096, 1}, {9, 2000, 1}};
  for (DType dt : kDtypes)
    for (const C& c : cases)
      for (int mode = 0; mode < 3; ++mode) {  // 0: random, 1: few levels (ties), 2: ties and NaNs
        Generator g(51 + c.n + mode);
        Tensor a = rand_host({c.outer, c.n, c.inner}, g, dt);
        float* p = a.data<float>();
        if (mode >= 1)  // a few integer levels: many ties, exact in every dtype
          for (int64_t i = 0; i < a.numel(); ++i) p[i] = std::round(p[i] * 1.5f);
        if (mode == 2)
          for (int64_t i = 0; i < a.numel(); i += 97) p[(i * 31) % a.numel()] = NAN;
        if (mode == 1 && a.numel() > 5) p[3] = -INFINITY;
        Tensor ref = cpu_empty({c.outer, c.inner});
        Tensor ridx = Tensor::empty({c.outer, c.inner}, DType::i64);
        kernels::cpu::amax_dim(a, c.outer, c.n, c.inner, ref, &ridx);
        Tensor out = gpu_empty({c.outer, c.inner}, dt);
        Tensor idx = gpu_empty({c.outer, c.inner}, DType::i64);
        kernels::cuda::amax_dim(to_gpu(a, dt), c.outer, c.n, c.inner, out, &idx);
        EXPECT_TRUE(same_values(to_host(out), ref))
            << "amax [" << c.outer << ", " << c.n << ", " << c.inner << "] mode " << mode << " " << dtype_name(dt);
        EXPECT_TRUE(same_values(idx, ridx))
            << "argmax [" << c.outer << ", " << c.n << ", " << c.inner << "] mode " << mode << " " << dtype_name(dt);
        Tensor out2 = gpu_empty({c.outer, c.inner}, dt);
        kernels::cuda::amax_dim(to_gpu(a, dt), c.outer, c.n, c.inner, out2, nullptr);
        EXPECT_TRUE(same_values(to_host(out2), ref));
      }
}

// ---- activations --------------------------------------------------------------------------------

using Fwd = void (*)(const Tensor&, Tensor&);
using Bwd = void (*)(const Tensor&, const Tensor&, Tensor&);

void check_act(const char* name, Fwd cpu_f, Fwd gpu_f, Bwd cpu_b, Bwd gpu_b) {
  for (DType dt : kDtypes)
    for (int64_t n : {int64_t(1), int64_t(9), int64_t(1000003)})
      for (bool unaligned : {false, true}) {
        Generator g(61 + n);
        Tensor x = rand_host({n}, g, dt, 3.0), dy = rand_host({n}, g, dt);
        if (n > 8) {  // the saturated tails and the clamp
          x.data<float>()[0] = 12.f;
          x.data<float>()[1] = -12.f;
          x.data<float>()[2] = 90.f;
          x.data<float>()[3] = -90.f;
        }
        Tensor xd = unaligned ? unaligned_gpu(x, dt) : to_gpu(x, dt);
        Tensor ref = cpu_empty({n}), out = gpu_empty({n}, dt);
        cpu_f(x, ref);
        gpu_f(xd, out);
        EXPECT_TRUE(all_close(out, ref, 1e-6, ew_rtol(dt))) << name << " n " << n << " " << dtype_name(dt);
        Tensor dref = cpu_empty({n}), dx = gpu_empty({n}, dt);
        cpu_b(x, dy, dref);
        gpu_b(xd, unaligned ? unaligned_gpu(dy, dt) : to_gpu(dy, dt), dx);
        EXPECT_TRUE(all_close(dx, dref, 1e-5, ew_rtol(dt))) << name << "_backward n " << n << " " << dtype_name(dt);
      }
}

TEST(CudaActivation, GeluSilu) {
  FTUNE_REQUIRE_GPU();
  check_act("gelu", kernels::cpu::gelu_forward, kernels::cuda::gelu_forward, kernels::cpu::gelu_backward,
            kernels::cuda::gelu_backward);
  check_act("silu", kernels::cpu::silu_forward, kernels::cuda::silu_forward, kernels::cpu::silu_backward,
            kernels::cuda::silu_backward);
}

TEST(CudaActivation, Swiglu) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes)
    for (int64_t n : {int64_t(5), int64_t(4099), int64_t(1 << 22) + 3}) {
      Generator g(71 + n);
      Tensor gate = rand_host({n}, g, dt, 2.0), up = rand_host({n}, g, dt), dy = rand_host({n}, g, dt);
      Tensor gd = to_gpu(gate, dt), ud = to_gpu(up, dt), dyd = to_gpu(dy, dt);
      Tensor ref = cpu_empty({n}), out = gpu_empty({n}, dt);
      kernels::cpu::swiglu_forward(gate, up, ref);
      kernels::cuda::swiglu_forward(gd, ud, out);
      EXPECT_TRUE(all_close(out, ref, 1e-6, ew_rtol(dt))) << "swiglu n " << n << " " << dtype_name(dt);
      Tensor rg = cpu_empty({n}), ru = cpu_empty({n});
      kernels::cpu::swiglu_backward(gate, up, dy, rg, ru);
      for (int which = 0; which < 3; ++which) {  // both, dgate only, dup only
        Tensor dg = which != 2 ? gpu_empty({n}, dt) : Tensor();
        Tensor du = which != 1 ? gpu_empty({n}, dt) : Tensor();
        kernels::cuda::swiglu_backward(gd, ud, dyd, dg, du);
        if (dg.defined())
          EXPECT_TRUE(all_close(dg, rg, 1e-5, ew_rtol(dt))) << "dgate n " << n << " case " << which << " " << dtype_name(dt);
        if (du.defined())
          EXPECT_TRUE(all_close(du, ru, 1e-5, ew_rtol(dt))) << "dup n " << n << " case " << which << " " << dtype_name(dt);
      }
    }
}

// ---- RoPE -----------------------------------------------------------------------------------------

TEST(CudaRope, ForwardInverseMatchCpu) {
  FTUNE_REQUIRE_GPU();
  struct C {
    int64_t B, T, H, D;
    bool per_batch;
    double theta;
  };
  const C cases[] = {{2, 33, 3, 64, false, 10000.0},
                     {3, 17, 5, 6, true, 10000.0},     // half = 3: the scalar path
                     {1, 129, 8, 128, true, 1e6},     // large positions below
                     {2, 5, 1, 2, false, 500000.0}};
  for (DType dt : kDtypes)
    for (const C& c : cases)
      for (bool inverse : {false, true}) {
        Generator g(81 + c.D);
        Tensor x = rand_host({c.B, c.T, c.H, c.D}, g, dt);
        Tensor pos = c.per_batch ? randint({c.B, c.T}, g, 0, 40000, DType::i32)
                                 : randint({c.T}, g, 0, 100, DType::i64);
        Tensor ref = cpu_empty(x.shape());
        kernels::cpu::rope(x, pos, c.theta, inverse, ref);
        Tensor out = gpu_empty(x.shape(), dt);
        kernels::cuda::rope(to_gpu(x, dt), pos.to(Device::cuda(0)), c.theta, inverse, out);
        EXPECT_TRUE(all_close(out, ref, 2e-6, ew_rtol(dt)))
            << "rope " << shape_str(x.shape()) << (inverse ? " inverse " : " ") << dtype_name(dt);
      }
}

// ---- embedding ------------------------------------------------------------------------------------

TEST(CudaEmbedding, FirstBadId) {
  FTUNE_REQUIRE_GPU();
  std::vector<int64_t> v(5000, 3);
  EXPECT_EQ(kernels::cuda::first_bad_id(Tensor::from_vector(v, {5000}).to(Device::cuda(0)), 10), -1);
  v[3000] = 10;
  v[4000] = -1;
  EXPECT_EQ(kernels::cuda::first_bad_id(Tensor::from_vector(v, {5000}).to(Device::cuda(0)), 10), 3000);
  v[7] = -5;
  EXPECT_EQ(kernels::cuda::first_bad_id(Tensor::from_vector(v, {5000}).to(Device::cuda(0)), 10), 7);
  std::vector<int32_t> w(100, 0);
  w[99] = 1 << 30;
  EXPECT_EQ(kernels::cuda::first_bad_id(Tensor::from_vector(w, {10, 10}).to(Device::cuda(0)), 1000), 99);
  // Through the op: the message names the id and its position.
  Tensor weight = Tensor::zeros({10, 4}, DType::f32, Device::cuda(0));
  try {
    ops::embedding(weight, Tensor::from_vector(w, {10, 10}).to(Device::cuda(0)));
    FAIL() << "no error for an id out of range";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1073741824"), std::string::npos) << e.what();
  }
}

// ids with many repeats (a few hot ids) plus a spread over the vocabulary.
Tensor hot_ids(int64_t n, int64_t V, DType idt, uint64_t seed) {
  Generator g(seed);
  Tensor hot = randint({n}, g, 0, 5, DType::i64), any = randint({n}, g, 0, V, DType::i64);
  Tensor pick = randint({n}, g, 0, 3, DType::i64);
  std::vector<int64_t> h = hot.to_vector<int64_t>(), a = any.to_vector<int64_t>(), p = pick.to_vector<int64_t>();
  std::vector<int64_t> ids(static_cast<size_t>(n), 0);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = p[i] == 0 ? a[i] : h[i] * (V / 5);
  return Tensor::from_vector(ids, {n}).to(idt);
}

// n distinct ids out of [0, V) (n <= V), shuffled.
Tensor unique_ids(int64_t n, int64_t V, DType idt, uint64_t seed) {
  Generator g(seed);
  std::vector<int64_t> ids(static_cast<size_t>(V), 0);
  for (int64_t i = 0; i < V; ++i) ids[size_t(i)] = (i * 7919) % V;  // a permutation when gcd(7919, V) = 1
  std::vector<int64_t> r = randint({V}, g, 0, 1 << 30, DType::i64).to_vector<int64_t>();
  for (int64_t i = V - 1; i > 0; --i) std::swap(ids[size_t(i)], ids[size_t(r[size_t(i)] % (i + 1))]);
  ids.resize(size_t(n));
  return Tensor::from_vector(ids, {n}).to(idt);
}

void check_embedding_cases();

TEST(CudaEmbedding, ForwardBackwardMatchCpu) {
  FTUNE_REQUIRE_GPU();
  check_embedding_cases();
}

// FTUNE_EMB_SHFL=0: the backward's tile kernel that loads ids and positions itself.
TEST(CudaEmbedding, ForwardBackwardMatchCpuPlainTileKernel) {
  FTUNE_REQUIRE_GPU();
  ::setenv("FTUNE_EMB_SHFL", "0", 1);
  check_embedding_cases();
  ::unsetenv("FTUNE_EMB_SHFL");
}

void check_embedding_cases() {
  ASSERT_TRUE(ftune::cuda::deterministic());
  struct C {
    int64_t V, D, n;
    int kind;  // 0: hot ids (long runs crossing tiles), 1: distinct ids, 2: one id everywhere
  };
  const C cases[] = {{1000, 129, 5000, 0}, {777, 256, 3001, 0}, {50, 3, 10, 0},   {32000, 64, 20000, 0},
                     {7, 1, 1, 0},         {5003, 72, 4001, 1}, {101, 16, 63, 1}, {9, 40, 1000, 2},
                     {9, 8, 64, 2},        {9, 8, 65, 2}};
  for (DType dt : kDtypes)
    for (DType idt : {DType::i32, DType::i64})
      for (const C& c : cases) {
        Generator g(91 + c.D);
        Tensor w = rand_host({c.V, c.D}, g, dt);
        Tensor ids = c.kind == 0   ? hot_ids(c.n, c.V, idt, 92 + c.n)
                     : c.kind == 1 ? unique_ids(c.n, c.V, idt, 93 + c.n)
                                   : Tensor::full({c.n}, 4.0, idt);
        const std::string what = std::to_string(c.V) + "x" + std::to_string(c.D) + " n " + std::to_string(c.n) +
                                 " kind " + std::to_string(c.kind) + " " + dtype_name(dt) + " ids " + dtype_name(idt);
        Tensor ref = cpu_empty({c.n, c.D});
        kernels::cpu::embedding_forward(w, ids, ref);
        Tensor out = gpu_empty({c.n, c.D}, dt);
        Tensor idd = ids.to(Device::cuda(0));
        kernels::cuda::embedding_forward(to_gpu(w, dt), idd, out);
        EXPECT_TRUE(same_values(to_host(out), ref)) << "forward " << what;

        Tensor dy = rand_host({c.n, c.D}, g, dt);
        Tensor dref = cpu_empty({c.V, c.D});
        kernels::cpu::embedding_backward(dy, ids, dref);
        Tensor dyd = to_gpu(dy, dt);
        Tensor dw = gpu_empty({c.V, c.D}, dt), dw2 = gpu_empty({c.V, c.D}, dt);
        kernels::cuda::embedding_backward(dyd, idd, dw);
        kernels::cuda::embedding_backward(dyd, idd, dw2);
        EXPECT_TRUE(same_values(dw, dw2)) << "two runs differ: " << what;
        if (c.kind == 1) {
          // Runs of one: the CPU's f32 value rounded once, bitwise.
          EXPECT_TRUE(same_values(to_host(dw), dref.to(dt).to(DType::f32))) << "backward " << what;
        } else {
          // Long runs are summed per tile, then across tiles: f32 rounding differs from the CPU's.
          EXPECT_TRUE(all_close(dw, dref, 2e-5 * std::sqrt(double(c.n)), dtype_rtol(dt))) << "backward " << what;
        }
        // Added into a gradient that holds values (a tied LM head's): the overwrite then the
        // engine's add, bit for bit; rows no id names keep their values.
        Tensor init = to_gpu(rand_host({c.V, c.D}, g, dt), dt);
        Tensor acc = init.clone();
        kernels::cuda::embedding_backward(dyd, idd, acc, true);
        EXPECT_TRUE(same_values(acc, ops::add(init, dw))) << "accumulate " << what;
      }
}

TEST(CudaEmbedding, BackwardUnalignedAndNonDeterministicPath) {
  FTUNE_REQUIRE_GPU();
  Generator g(101);
  const int64_t V = 300, D = 40, n = 4000;
  Tensor w = rand_host({V, D}, g, DType::f32);
  Tensor ids = hot_ids(n, V, DType::i64, 102);
  Tensor dy = rand_host({n, D}, g, DType::f32);
  Tensor dref = cpu_empty({V, D});
  kernels::cpu::embedding_backward(dy, ids, dref);
  // dy one element into its buffer: the scalar column path.
  Tensor dw = gpu_empty({V, D}, DType::f32), dw1 = gpu_empty({V, D}, DType::f32);
  kernels::cuda::embedding_backward(unaligned_gpu(dy, DType::f32), ids.to(Device::cuda(0)), dw);
  kernels::cuda::embedding_backward(to_gpu(dy, DType::f32), ids.to(Device::cuda(0)), dw1);
  EXPECT_TRUE(all_close(dw, dref, 1e-4, 1e-5));
  EXPECT_TRUE(same_values(dw, dw1)) << "the scalar and vector paths sum in the same order";
  // Float atomics: any order, so only close.
  ftune::cuda::set_deterministic(false);
  Tensor dw2 = gpu_empty({V, D}, DType::f32);
  kernels::cuda::embedding_backward(to_gpu(dy, DType::f32), ids.to(Device::cuda(0)), dw2);
  // Accumulating (a tied LM head's gradient): the atomics add onto its values.
  Tensor init = to_gpu(rand_host({V, D}, g, DType::f32), DType::f32), acc = init.clone();
  kernels::cuda::embedding_backward(to_gpu(dy, DType::f32), ids.to(Device::cuda(0)), acc, true);
  ftune::cuda::set_deterministic(true);
  EXPECT_TRUE(all_close(dw2, dref, 1e-4, 1e-5));
  EXPECT_TRUE(all_close(acc, ops::add(init, dw1), 1e-4, 1e-5));
  // The scalar column path accumulating: the overwrite then the add, bit for bit.
  Tensor acc1 = init.clone();
  kernels::cuda::embedding_backward(unaligned_gpu(dy, DType::f32), ids.to(Device::cuda(0)), acc1, true);
  EXPECT_TRUE(same_values(acc1, ops::add(init, dw)));
}

// ---- cast -----------------------------------------------------------------------------------------

TEST(CudaCast, FloatPairsVectorAndTail) {
  FTUNE_REQUIRE_GPU();
  const DType pairs[][2] = {{DType::f32, DType::bf16}, {DType::bf16, DType::f32}, {DType::f32, DType::f16},
                            {DType::f16, DType::f32},  {DType::bf16, DType::f16}, {DType::f16, DType::bf16}};
  for (auto& p : pairs)
    for (int64_t n : {int64_t(1), int64_t(8), int64_t(1000003)})
      for (bool unaligned : {false, true}) {
        Generator g(111 + n);
        Tensor x = randn({n}, g, 0.0, 100.0).to(p[0]);  // wide range: every rounding case
        Tensor xd = unaligned ? unaligned_gpu(x.to(DType::f32), p[0]) : x.to(Device::cuda(0));
        if (unaligned) x = xd.to(Device::cpu());
        Tensor got = xd.to(p[1]);
        ASSERT_TRUE(got.device().is_cuda());
        EXPECT_TRUE(same_values(got, x.to(p[1])))
            << dtype_name(p[0]) << " -> " << dtype_name(p[1]) << " n " << n << (unaligned ? " unaligned" : "");
      }
}

// More elements than the capped grid covers in one sweep of 4 units of 8 a thread: the grid-stride
// loop of the vector cast runs more than once.
TEST(CudaCast, LargeBf16ToF32) {
  FTUNE_REQUIRE_GPU();
  const int64_t n = (int64_t(1) << 25) + (int64_t(1) << 22) + 5;
  Generator g(7);
  Tensor x = randn({n}, g, 0.0, 10.0).to(DType::bf16);
  Tensor got = x.to(Device::cuda(0)).to(DType::f32);
  EXPECT_TRUE(same_values(got, x.to(DType::f32)));
}

}  // namespace
}  // namespace ftune::test
