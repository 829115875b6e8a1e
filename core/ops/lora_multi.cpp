// lora_linear_multi (core/ops.h): several LoRA linears on one input (q, k, v) as one fused op.
// The algorithm is written once over a kernel set (the CPU's, or the GPU's cuBLASLt GEMM and
// dropout kernels of kernels/cuda/lora.cu), so both devices run the same sequence of GEMMs;
// with dropout the GPU's fused low-rank kernels (lora_down_fused / lora_up_fused) stand in for
// an adapter's GEMMs and dropout passes where they apply.
#include <cmath>

#include "core/ops/common.h"
#include "kernels/lora.h"
#include "kernels/matmul.h"

namespace ftune::ops {

using namespace detail;

namespace {


// The CPU kernels (T = float, double).
template <class T>
struct CpuKernels {
  static void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    kernels::cpu::gemm<T>(ta, tb, m, n, k, T(alpha), a, lda, b, ldb, T(beta), c, ldc);
  }
  // y [m, n] = x [m, k] w^T + bias: y is seeded with the bias, the GEMM accumulates onto it.
  static void base(int64_t m, int64_t n, int64_t k, const T* x, const T* w, const T* bias, T* y) {
    if (bias) {
#pragma omp parallel for schedule(static) if (m * n > (1 << 16))
      for (int64_t i = 0; i < m; ++i) std::copy(bias, bias + n, y + i * n);
    }
    kernels::cpu::gemm<T>(false, true, m, n, k, T(1), x, k, w, k, bias ? T(1) : T(0), y, n);
  }
  static void drop(const T* x, T* out, int64_t n, double p, uint64_t seed) {
    kernels::cpu::lora_dropout<T>(x, out, n, p, seed);
  }
  static void drop_acc(T* acc, const T* t, int64_t n, double p, uint64_t seed) {
    kernels::cpu::lora_dropout_accumulate<T>(acc, t, n, p, seed);
  }
  // The fused low-rank GEMMs with their dropout (kernels/lora.h): GPU only.
  static bool down(const kernels::LoraDims&, const T*, const T*, double, uint64_t, T*, int64_t) {
    return false;
  }
  static bool up(const kernels::LoraDims&, const T*, const T*, int64_t, const T*, double, uint64_t,
                 T*, T*, bool) {
    return false;
  }
};

#ifdef FTUNE_HAVE_CUDA
// The GPU kernels (T = float, bf16, f16): cuBLASLt with f32 accumulation, the bias in the base
// GEMM's epilogue; the dropout kernels draw the CPU's mask.
template <class T>
struct CudaKernels {
  static void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    kernels::cuda::gemm(kernels::cuda::gemm_args<T>(ta, tb, m, n, k, float(alpha), a, lda, b, ldb,
                                                    float(beta), c, ldc));
  }
  static void base(int64_t m, int64_t n, int64_t k, const T* x, const T* w, const T* bias, T* y) {
    kernels::cuda::gemm(
        kernels::cuda::gemm_args<T>(false, true, m, n, k, 1.f, x, k, w, k, 0.f, y, n, bias));
  }
  static void drop(const T* x, T* out, int64_t n, double p, uint64_t seed) {
    kernels::cuda::lora_dropout<T>(x, out, n, p, seed);
  }
  static void drop_acc(T* acc, const T* t, int64_t n, double p, uint64_t seed) {
    kernels::cuda::lora_dropout_accumulate<T>(acc, t, n, p, seed);
  }
  static bool down(const kernels::LoraDims& d, const T* x, const T* a, double p, uint64_t seed,
                   T* u, int64_t ldu) {
    return kernels::cuda::lora_down_fused<T>(d, x, a, p, seed, u, ldu);
  }
  static bool up(const kernels::LoraDims& d, const T* x, const T* du, int64_t ldu, const T* a,
                 double p, uint64_t seed, T* da, T* dx, bool dx_accumulate) {
    return kernels::cuda::lora_up_fused<T>(d, x, du, ldu, a, p, seed, da, dx, dx_accumulate);
  }
};
#endif

// Calls f.template operator()<K, T>() with the kernel set of dev and the C++ type of dt.
template <class F>
void dispatch_kernels(const Device& dev, DType dt, const char* op, F&& f) {
  if (dev.is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
    switch (dt) {
      case DType::f32:
        f.template operator()<CudaKernels<float>, float>();
        return;
      case DType::bf16:
        f.template operator()<CudaKernels<bf16>, bf16>();
        return;
      case DType::f16:
        f.template operator()<CudaKernels<f16>, f16>();
        return;
      default:
        FTUNE_THROW("[", op, "] the GPU computes in f32, bf16 or f16, got ", dtype_name(dt));
    }
#endif
  }
  dispatch_float(dt, op, [&]<class T>() { f.template operator()<CpuKernels<T>, T>(); });
}

// One adapted segment, with its place in y (columns o..o+out) and in u (columns ro..ro+r).
struct Adapter {
  int64_t o = 0, out = 0, r = 0, ro = 0;
  double scale = 0, p = 0;
  uint64_t seed = 0;
  Tensor a, b;  // contiguous, detached
};

}  // namespace

Tensor lora_linear_multi(const Tensor& x, const Tensor& w, const Tensor& bias,
                         const std::vector<LoraSegment>& segs) {
  const char* op = "lora_linear_multi";
  check_defined(op, x, "x");
  check_defined(op, w, "weight");
  profiler::OpScope prof(op, w.shape());
  check_same_device(op, {&x, &w, &bias});
  check_same_dtype(op, {&x, &w, &bias});
  check_float(op, x, "x");
  FTUNE_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "[", op, "] x ", x.desc(),
              " does not match weight ", w.desc(), " (expected weight [out, ", x.size(-1), "])");
  const int64_t in = w.size(1), N = w.size(0);
  FTUNE_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == N), "[", op, "] bias ",
              bias.desc(), " for weight ", w.desc());
  FTUNE_CHECK(!segs.empty(), "[", op, "] no segments");
  std::vector<Adapter> ad;
  std::vector<Tensor> inputs{x};
  int64_t rows = 0, R = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const LoraSegment& s = segs[i];
    FTUNE_CHECK(s.out >= 1, "[", op, "] segment ", i, " has ", s.out, " rows");
    FTUNE_CHECK(s.a.defined() == s.b.defined(), "[", op, "] segment ", i,
                ": lora_a and lora_b are both given or both not");
    if (s.a.defined()) {
      check_same_device(op, {&x, &s.a, &s.b});
      check_same_dtype(op, {&x, &s.a, &s.b});
      const int64_t r = s.a.size(0);
      FTUNE_CHECK(s.a.dim() == 2 && s.a.size(1) == in && r >= 1 && s.b.dim() == 2 &&
                      s.b.size(0) == s.out && s.b.size(1) == r,
                  "[", op, "] segment ", i, ": lora_a ", s.a.desc(), " / lora_b ", s.b.desc(),
                  " must be [r, ", in, "] / [", s.out, ", r]");
      FTUNE_CHECK(s.dropout >= 0.0 && s.dropout < 1.0, "[", op, "] segment ", i,
                  ": dropout must be in [0, 1), got ", s.dropout);
      FTUNE_CHECK(std::isfinite(s.scale), "[", op, "] segment ", i, ": scale must be finite, got ",
                  s.scale);
      ad.push_back({rows, s.out, r, R, s.scale, s.dropout, s.seed, contig(s.a), contig(s.b)});
      inputs.push_back(s.a);
      inputs.push_back(s.b);
      R += r;
    }
    rows += s.out;
  }
  FTUNE_CHECK(rows == N, "[", op, "] the segments have ", rows, " rows, the weight ", w.desc());
  // No adapter: a plain linear (it records dx through W).
  if (ad.empty()) return linear(x, w, bias);
#ifndef FTUNE_HAVE_CUDA
  require_cpu(op, {&x, &w, &bias});
#endif

  const int64_t M = x.numel() / in;
  // Without dropout every adapter reads x itself: the A GEMMs run as one against the rows
  // [A_0; A_1; ...] (packed here: r x in per adapter, small next to the GEMMs). With dropout each
  // adapter has its own mask (PEFT: one nn.Dropout per adapter), so they run one by one.
  bool batched = true;
  for (const Adapter& a : ad) batched = batched && a.p == 0;
  Tensor x2 = contig(x), w2 = contig(w), b2 = bias.defined() ? contig(bias) : Tensor();
  Tensor acat;
  if (batched) {
    if (ad.size() == 1) {
      acat = ad[0].a;
    } else {
      acat = Tensor::empty({R, in}, x.dtype(), x.device());
      for (const Adapter& a : ad) acat.slice(0, a.ro, a.ro + a.r).copy_(a.a);
    }
  }
  Shape out_shape = x.shape();
  out_shape.back() = N;
  Tensor y = Tensor::empty(out_shape, x.dtype(), x.device());
  Tensor u = Tensor::empty({M, R}, x.dtype(), x.device());
  Tensor xd;  // drop_i(x), where the fused kernels do not draw the mask themselves
  // Without a bias and with an adapter on every segment, the low-rank terms go first and the
  // base GEMM adds them in its epilogue (beta = 1: nearly free in a compute-bound GEMM, where a
  // low-rank GEMM with beta = 1 after it would read and write y again; kernels/cuda/lora.cu).
  const bool lowrank_first = !b2.defined() && ad.size() == segs.size();
  if (M > 0) {
    dispatch_kernels(x.device(), x.dtype(), op, [&]<class K, class T>() {
      const T* xp = x2.data<T>();
      T* up = u.data<T>();
      T* yp = y.data<T>();
      if (!lowrank_first) K::base(M, N, in, xp, w2.data<T>(), ptr_or_null<T>(b2), yp);  // x W^T + b
      if (batched) {
        K::mm(false, true, M, R, in, 1.0, xp, in, acat.data<T>(), in, 0.0, up, R);  // u = x A^T
      } else {
        for (const Adapter& a : ad) {  // u_i = drop_i(x) A_i^T
          if (K::down({M, in, a.out, a.r}, xp, a.a.data<T>(), a.p, a.seed, up + a.ro, R)) continue;
          const T* xs = xp;
          if (a.p > 0) {
            if (!xd.defined()) xd = Tensor::empty({M, in}, x.dtype(), x.device());
            K::drop(xp, xd.data<T>(), M * in, a.p, a.seed);
            xs = xd.data<T>();
          }
          K::mm(false, true, M, a.r, in, 1.0, xs, in, a.a.data<T>(), in, 0.0, up + a.ro, R);
        }
      }
      for (const Adapter& a : ad)  // y_i (+)= scale_i u_i B_i^T
        K::mm(false, true, M, a.out, a.r, a.scale, up + a.ro, R, a.b.data<T>(), a.r,
              lowrank_first ? 0.0 : 1.0, yp + a.o, N);
      if (lowrank_first)  // y += x W^T
        K::mm(false, true, M, N, in, 1.0, xp, in, w2.data<T>(), in, 1.0, yp, N);
    });
  }
  if (!needs_record(inputs)) return y;

  // Saved: x for the dA, W for dx, A (packed or per adapter) for dx, B for dx and dA, u for dB.
  bool ga = false, gb = false;
  for (size_t i = 1; i < inputs.size(); i += 2) {
    ga = ga || inputs[i].requires_grad();
    gb = gb || inputs[i + 1].requires_grad();
  }
  const bool gx = x.requires_grad();
  Tensor xs = ga ? x2 : Tensor(), ws = gx ? w2 : Tensor(), as = gx && batched ? acat : Tensor();
  Tensor us = gb ? u : Tensor();
  std::vector<Adapter> saved = ad;
  for (Adapter& a : saved) {
    if (!gx || batched) a.a = Tensor();
    if (!gx && !ga) a.b = Tensor();
  }
  const Shape xshape = x.shape();
  record(
      op, y, inputs,
      [saved, xs, ws, as, us, xshape, M, in, N, R, batched](const Tensor& g,
                                                            const std::vector<bool>& need) {
        Tensor gc = contig(g);
        const DType dt = gc.dtype();
        const Device dev = gc.device();
        const size_t n_ad = saved.size();
        std::vector<Tensor> grads(1 + 2 * n_ad);
        bool need_da = false;
        for (size_t i = 0; i < n_ad; ++i) need_da = need_da || need[1 + 2 * i];
        if (need[0]) grads[0] = Tensor::empty(xshape, dt, dev);
        for (size_t i = 0; i < n_ad; ++i) {
          const Adapter& a = saved[i];
          if (need[1 + 2 * i]) grads[1 + 2 * i] = Tensor::empty({a.r, in}, dt, dev);
          if (need[2 + 2 * i]) grads[2 + 2 * i] = Tensor::empty({a.out, a.r}, dt, dev);
        }
        if (M == 0) {  // nothing to sum over: zero adapter gradients, an empty dx
          for (size_t i = 1; i < grads.size(); ++i)
            if (grads[i].defined()) grads[i].zero_();
          return grads;
        }
        const bool need_du = need[0] || need_da;
        Tensor du = need_du ? Tensor::empty({M, R}, dt, dev) : Tensor();
        Tensor dacat = batched && need_da && n_ad > 1 ? Tensor::empty({R, in}, dt, dev) : Tensor();
        Tensor xd;  // as in the forward: allocated where an unfused pass needs it
        auto xd_ptr = [&]<class T>() {
          if (!xd.defined()) xd = Tensor::empty({M, in}, dt, dev);
          return xd.data<T>();
        };
        dispatch_kernels(dev, dt, "lora_linear_multi_backward", [&]<class K, class T>() {
          const T* gp = gc.data<T>();
          for (size_t i = 0; i < n_ad; ++i) {  // dB_i = scale_i g_i^T u_i
            const Adapter& a = saved[i];
            if (need[2 + 2 * i])
              K::mm(true, false, a.out, a.r, M, a.scale, gp + a.o, N, us.data<T>() + a.ro, R, 0.0,
                    grads[2 + 2 * i].data<T>(), a.r);
          }
          if (!need_du) return;
          T* dup = du.data<T>();
          for (const Adapter& a : saved)  // du_i = scale_i g_i B_i (every adapter's columns)
            K::mm(false, false, M, a.r, a.out, a.scale, gp + a.o, N, a.b.data<T>(), a.r, 0.0,
                  dup + a.ro, R);
          // dx: the adapters' shares first, then the base GEMM g W adds them in its epilogue
          // (beta = 1), as in kernels/cuda/lora.cu.
          T* dxp = need[0] ? grads[0].data<T>() : nullptr;
          auto base_dx = [&](bool accumulate) {
            K::mm(false, false, M, in, N, 1.0, gp, N, ws.data<T>(), in, accumulate ? 1.0 : 0.0,
                  dxp, in);
          };
          if (batched) {
            if (need_da) {  // dA = du^T x for all adapters at once
              T* dap = n_ad > 1 ? dacat.data<T>() : grads[1].data<T>();
              K::mm(true, false, R, in, M, 1.0, dup, R, xs.data<T>(), in, 0.0, dap, in);
            }
            if (dxp) {  // dx = du [A_0; A_1; ...] + g W
              K::mm(false, false, M, in, R, 1.0, dup, R, as.data<T>(), in, 0.0, dxp, in);
              base_dx(true);
            }
            return;
          }
          bool dx_started = false;  // dxp holds a sum of adapter shares
          for (size_t i = 0; i < n_ad; ++i) {
            const Adapter& a = saved[i];
            // dA_i and dx's share drop_i'(du_i A_i) in one fused pass over x, where it applies.
            if (K::up({M, in, a.out, a.r}, ptr_or_null<T>(xs), dup + a.ro, R,
                      ptr_or_null<T>(a.a), a.p, a.seed,
                      need[1 + 2 * i] ? grads[1 + 2 * i].data<T>() : nullptr, dxp, dx_started)) {
              dx_started = dx_started || dxp;
              continue;
            }
            if (need[1 + 2 * i]) {  // dA_i = du_i^T drop_i(x)
              const T* src = xs.data<T>();
              if (a.p > 0) {
                T* xdp = xd_ptr.template operator()<T>();
                K::drop(src, xdp, M * in, a.p, a.seed);
                src = xdp;
              }
              K::mm(true, false, a.r, in, M, 1.0, dup + a.ro, R, src, in, 0.0,
                    grads[1 + 2 * i].data<T>(), in);
            }
            if (!dxp) continue;
            if (a.p == 0) {  // dx (+)= du_i A_i
              K::mm(false, false, M, in, a.r, 1.0, dup + a.ro, R, a.a.data<T>(), in,
                    dx_started ? 1.0 : 0.0, dxp, in);
            } else if (!dx_started) {  // dx = drop_i'(du_i A_i), masked in place
              K::mm(false, false, M, in, a.r, 1.0, dup + a.ro, R, a.a.data<T>(), in, 0.0, dxp, in);
              K::drop(dxp, dxp, M * in, a.p, a.seed);
            } else {  // dx += drop_i'(du_i A_i)
              T* xdp = xd_ptr.template operator()<T>();
              K::mm(false, false, M, in, a.r, 1.0, dup + a.ro, R, a.a.data<T>(), in, 0.0, xdp, in);
              K::drop_acc(dxp, xdp, M * in, a.p, a.seed);
            }
            dx_started = true;
          }
          if (dxp) base_dx(dx_started);
        });
        if (dacat.defined())  // the rows of each adapter, as its own tensor
          for (size_t i = 0; i < n_ad; ++i)
            if (need[1 + 2 * i])
              grads[1 + 2 * i].copy_(dacat.slice(0, saved[i].ro, saved[i].ro + saved[i].r));
        return grads;
      });
  return y;
}

}  // namespace ftune::ops
