#include "core/ops/common.h"
#include "kernels/matmul.h"

namespace ftune::ops {

using namespace detail;

namespace {

// out[bt] = op(a[bt]) op(b[bt or 0]) for contiguous 3-D a [B, *, *], b [B or 1, *, *].
Tensor bmm_raw(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  int64_t batch = a.shape()[0];
  int64_t m = ta ? a.shape()[2] : a.shape()[1];
  int64_t k = ta ? a.shape()[1] : a.shape()[2];
  int64_t n = tb ? b.shape()[1] : b.shape()[2];
  Tensor out = Tensor::empty({batch, m, n}, a.dtype(), a.device());
#ifdef FTUNE_HAVE_CUDA
  if (a.device().is_cuda()) {  // one strided-batched cuBLASLt GEMM (bf16/f16 too)
    const bool shared_b = b.shape()[0] == 1;
    const bool fold = shared_b && !ta && batch > 1;  // the batch folded into m, as on the CPU
    kernels::cuda::GemmArgs g;
    g.trans_a = ta;
    g.trans_b = tb;
    g.m = fold ? batch * m : m;
    g.n = n;
    g.k = k;
    g.ab_dtype = g.c_dtype = a.dtype();
    g.a = a.raw_data();
    g.lda = a.shape()[2];
    g.b = b.raw_data();
    g.ldb = b.shape()[2];
    g.c = out.raw_data();
    g.ldc = n;
    g.batch = fold ? 1 : batch;
    g.stride_a = a.shape()[1] * a.shape()[2];
    g.stride_b = shared_b ? 0 : b.shape()[1] * b.shape()[2];
    g.stride_c = m * n;
    kernels::cuda::gemm(g);
    return out;
  }
#endif
  dispatch_float(a.dtype(), "matmul", [&]<class T>() {
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* po = out.data<T>();
    int64_t lda = a.shape()[2], ldb = b.shape()[2];
    bool shared_b = b.shape()[0] == 1;
    if (shared_b && !ta && batch > 1) {  // fold the batch into m: one big GEMM
      kernels::cpu::gemm<T>(false, tb, batch * m, n, k, T(1), pa, lda, pb, ldb, T(0), po, n);
      return;
    }
    for (int64_t i = 0; i < batch; ++i)
      kernels::cpu::gemm<T>(ta, tb, m, n, k, T(1), pa + i * a.shape()[1] * a.shape()[2], lda,
                            pb + (shared_b ? 0 : i * b.shape()[1] * b.shape()[2]), ldb, T(0),
                            po + i * m * n, n);
  });
  return out;
}

// One GPU GEMM on contiguous buffers of one dtype: c = op(a) op(b) (+ bias).
void linear_gpu(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const Tensor& a, int64_t lda,
                const Tensor& b, int64_t ldb, Tensor& c, int64_t ldc, const Tensor& bias,
                float beta = 0.f) {
#ifdef FTUNE_HAVE_CUDA
  kernels::cuda::GemmArgs g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.ab_dtype = g.c_dtype = c.dtype();
  g.a = a.raw_data();
  g.lda = lda;
  g.b = b.raw_data();
  g.ldb = ldb;
  g.c = c.raw_data();
  g.ldc = ldc;
  g.bias = bias.defined() ? bias.raw_data() : nullptr;
  g.beta = beta;
  kernels::cuda::gemm(g);
#else
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)b, (void)ldb, (void)c,
      (void)ldc, (void)bias, (void)beta;
  FTUNE_THROW("[linear] has no GPU implementation (built without CUDA)");
#endif
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  check_defined("matmul", a, "a");
  check_defined("matmul", b, "b");
  profiler::OpScope prof("matmul", b.shape());
  check_same_device("matmul", {&a, &b});
  check_same_dtype("matmul", {&a, &b});
  check_float("matmul", a, "a");
  FTUNE_CHECK(a.dim() >= 2 && b.dim() >= 2, "[matmul] needs >= 2-d inputs, got ", a.desc(), " @ ", b.desc());
  int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  FTUNE_CHECK(b.size(-2) == k, "[matmul] inner dims differ: ", a.desc(), " @ ", b.desc());
  Shape batch_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = shape_numel(batch_shape);
  bool shared_b = b.dim() == 2;
  if (!shared_b) {
    Shape bb(b.shape().begin(), b.shape().end() - 2);
    FTUNE_CHECK(bb == batch_shape, "[matmul] batch dims differ: ", a.desc(), " @ ", b.desc());
  }
  Tensor a3 = contig(a).view({batch, m, k});
  Tensor b3 = contig(b).view({shared_b ? 1 : batch, k, n});
  Shape out_shape = batch_shape;
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = bmm_raw(a3, false, b3, false).view(out_shape);
  if (!needs_record({&a, &b})) return out;
  Shape sa = a.shape(), sb = b.shape();
  Tensor sa_t = b.requires_grad() ? a3 : Tensor();
  Tensor sb_t = a.requires_grad() ? b3 : Tensor();
  record("matmul", out, {a, b},
         [sa, sb, sa_t, sb_t, batch, m, n, k, shared_b](const Tensor& g, const std::vector<bool>& need) {
           Tensor g3 = contig(g).view({batch, m, n});
           Tensor ga, gb;
           if (need[0]) ga = bmm_raw(g3, false, sb_t, true).view(sa);  // g @ b^T
           if (need[1]) {
             if (shared_b) {  // sum over batch: a^T g with the batch folded into the inner dim
               Tensor a2 = sa_t.view({1, batch * m, k});
               Tensor g2 = g3.view({1, batch * m, n});
               gb = bmm_raw(a2, true, g2, false).view(sb);
             } else {
               gb = bmm_raw(sa_t, true, g3, false).view(sb);
             }
           }
           return std::vector<Tensor>{ga, gb};
         });
  return out;
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  check_defined("linear", x, "x");
  check_defined("linear", w, "weight");
  profiler::OpScope prof("linear", w.shape());
  check_same_device("linear", {&x, &w, &b});
  check_same_dtype("linear", {&x, &w, &b});
  check_float("linear", x, "x");
  FTUNE_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "[linear] x ", x.desc(),
              " does not match weight ", w.desc(), " (expected weight [out, ", x.size(-1), "])");
  const int64_t in = w.size(1), outf = w.size(0);
  FTUNE_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == outf), "[linear] bias ", b.desc(),
              " for weight ", w.desc());
  const int64_t M = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));  // rows, even if in == 0
  Tensor x2 = contig(x), w2 = contig(w), b2 = b.defined() ? contig(b) : Tensor();
  Shape out_shape = x.shape();
  out_shape.back() = outf;
  Tensor y = Tensor::empty(out_shape, x.dtype(), x.device());
  if (x.device().is_cuda()) {
    linear_gpu(false, true, M, outf, in, x2, in, w2, in, y, outf, b2);  // bias in the epilogue
  } else {
    dispatch_float(x.dtype(), "linear", [&]<class T>() {
      T* py = y.data<T>();
      if (b2.defined()) {  // seed C with the bias, then beta = 1
        const T* pb = b2.data<T>();
#pragma omp parallel for schedule(static) if (M * outf > (1 << 16))
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = 0; j < outf; ++j) py[r * outf + j] = pb[j];
      }
      kernels::cpu::gemm<T>(false, true, M, outf, in, T(1), x2.data<T>(), in, w2.data<T>(), in,
                            b2.defined() ? T(1) : T(0), py, outf);
    });
  }
  if (!needs_record({&x, &w, &b})) return y;
  Tensor xs = w.requires_grad() ? x2 : Tensor();
  Tensor ws = x.requires_grad() ? w2 : Tensor();
  Shape xshape = x.shape();
  record("linear", y, {x, w, b}, [xs, ws, xshape, M, in, outf](const Tensor& g, const std::vector<bool>& need) {
    Tensor gc = contig(g);
    Tensor gx, gw, gb;
    // dX: into the gradient x's other consumers have summed already, when the engine offers it
    // (the GEMM adds with beta = 1: no separate pass summing two [M, in] gradients).
    bool into = false;
    if (need[0]) {
      Tensor acc = accumulation_target(0);
      into = acc.defined() && acc.shape() == xshape && acc.dtype() == gc.dtype() &&
             acc.device() == gc.device() && acc.is_contiguous();
      gx = into ? acc : Tensor::empty(xshape, gc.dtype(), gc.device());
    }
    if (gc.device().is_cuda()) {
      if (need[0])  // g W (+ the sum so far)
        linear_gpu(false, false, M, in, outf, gc, outf, ws, in, gx, in, Tensor(), into ? 1.f : 0.f);
      if (need[1]) {
        gw = Tensor::empty({outf, in}, gc.dtype(), gc.device());
        linear_gpu(true, false, outf, in, M, gc, outf, xs, in, gw, in, Tensor());  // g^T x
      }
      if (need[2]) {  // g^T 1: the column sums as one more GEMM (f32 accumulation)
        gb = Tensor::empty({outf}, gc.dtype(), gc.device());
        Tensor ones = Tensor::ones({M}, gc.dtype(), gc.device());
        linear_gpu(true, false, outf, 1, M, gc, outf, ones, 1, gb, 1, Tensor());
      }
      return std::vector<Tensor>{gx, gw, gb};
    }
    dispatch_float(gc.dtype(), "linear_backward", [&]<class T>() {
      const T* pg = gc.data<T>();
      if (need[0])
        kernels::cpu::gemm<T>(false, false, M, in, outf, T(1), pg, outf, ws.data<T>(), in,
                              into ? T(1) : T(0), gx.data<T>(), in);
      if (need[1]) {
        gw = Tensor::empty({outf, in}, gc.dtype(), gc.device());
        kernels::cpu::gemm<T>(true, false, outf, in, M, T(1), pg, outf, xs.data<T>(), in, T(0), gw.data<T>(), in);
      }
    });
    if (need[2]) gb = sum(gc.view({M, outf}), 0, false);
    return std::vector<Tensor>{gx, gw, gb};
  });
  return y;
}

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  profiler::OpScope prof("cat");
  FTUNE_CHECK(!xs.empty(), "[cat] no tensors");
  const Tensor& f = xs[0];
  int64_t d = wrap_dim("cat", dim, f.dim());
  Shape os = f.shape();
  os[d] = 0;
  for (const Tensor& t : xs) {
    FTUNE_CHECK(t.dim() == f.dim() && t.dtype() == f.dtype() && t.device() == f.device(), "[cat] ",
                t.desc(), " vs ", f.desc());
    for (int64_t i = 0; i < f.dim(); ++i)
      FTUNE_CHECK(i == d || t.shape()[i] == f.shape()[i], "[cat] ", t.desc(), " vs ", f.desc(), " along dim ", d);
    os[d] += t.shape()[d];
  }
  Tensor out = Tensor::empty(os, f.dtype(), f.device());
  std::vector<int64_t> starts;
  int64_t at = 0;
  for (const Tensor& t : xs) {
    starts.push_back(at);
    out.detach().slice(d, at, at + t.shape()[d]).copy_(t);
    at += t.shape()[d];
  }
  std::vector<int64_t> lens;
  for (const Tensor& t : xs) lens.push_back(t.shape()[d]);
  record("cat", out, xs, [d, starts, lens](const Tensor& g, const std::vector<bool>& need) {
    std::vector<Tensor> gs(lens.size());
    for (size_t i = 0; i < lens.size(); ++i)
      if (need[i]) gs[i] = g.slice(d, starts[i], starts[i] + lens[i]).contiguous();
    return gs;
  });
  return out;
}

}  // namespace ftune::ops
