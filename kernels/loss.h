// Softmax and loss kernels: softmax / log_softmax, fused cross-entropy (token log-probs), entropy
// and KL / generalized JSD. Every input is a contiguous [N, V] row-major matrix of logits: one row
// per token, V the vocabulary. The loss forwards never hold a row's probabilities: they sweep the
// vocabulary in chunks with an online max and sum-exp, and save per-row statistics (logsumexp,
// ...) from which the backwards recompute the probabilities in one pass.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

#include "core/dtype.h"

namespace ftune::kernels {

// Vocabulary chunk of the online passes: 4096 floats (16 KiB) stay in L1 between the max and the
// sum-exp sweep of a chunk.
constexpr int64_t kLossChunk = 4096;

enum class Divergence { forward, reverse, jsd };

namespace cpu {

// x, out are [N, V]. out = softmax(x) or log_softmax(x) along V.
template <class T>
void softmax_forward(const T* x, int64_t n, int64_t v, bool log, T* out);
// y is the forward output [N, V], dy the upstream gradient [N, V]; dx [N, V].
// softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy).
template <class T>
void softmax_backward(const T* y, const T* dy, int64_t n, int64_t v, bool log, T* dx);

// Row statistics: a row's logsumexp is kept as the pair (m, ls) = (max of the raw row, log of
// sum exp(scale * (x - m))), so lse = scale * m + ls and log p_j = scale * (x_j - m) - ls. Unlike a
// rounded lse, this stays exact for large logits (x - m is exact near the max).
// stat [N, 2] holds (m, ls) per row.
template <class T>
void row_stats(const T* x, int64_t n, int64_t v, T* stat, int64_t chunk = kLossChunk);

// Negative log-likelihood of targets, fused: x [N, V], tgt [N] (already checked to be in [0, V) or
// ignore). nll[i] = lse[i] - x[i, tgt[i]] and stat [N, 2] as above; rows with tgt == ignore get
// nll = 0 and stat = 0. Vocabulary shards (parallel::vocab_parallel_cross_entropy): x is one
// shard of the columns and a target outside [0, V) other than ignore is in another shard; its row
// gets its stat and nll = 0 here, and no one-hot term in nll_backward.
template <class T>
void nll_forward(const T* x, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore, T* stat,
                 T* nll, int64_t chunk = kLossChunk);
// dx[i, :] = (softmax(x[i]) - onehot(tgt[i])) * g[i * g_stride] * scale in one pass (g_stride 0
// for a scalar upstream gradient); ignored rows get 0. stat is nll_forward's, or any row's (m, ls):
// the probabilities are exp(x - m - ls), so a shard given the whole vocabulary's statistics gets
// its columns of the whole row's softmax.
template <class T>
void nll_backward(const T* x, const int64_t* tgt, const T* stat, const T* g, int64_t g_stride,
                  T scale, int64_t n, int64_t v, int64_t ignore, T* dx);

// Entropy of softmax(x) per row: h [N], and stat [N, 2] for the backward.
template <class T>
void entropy_forward(const T* x, int64_t n, int64_t v, T* stat, T* h, int64_t chunk = kLossChunk);
// dx = -g[i] * p * (log p + h[i]), p = softmax(x[i]).
template <class T>
void entropy_backward(const T* x, const T* stat, const T* h, const T* g, int64_t n, int64_t v,
                      T* dx);

// Divergences between Q = softmax(s / temp) (student) and P = softmax(t / temp) (teacher), per
// row: forward KL(P || Q), reverse KL(Q || P), jsd beta KL(P || M) + (1-beta) KL(Q || M) with
// M = beta P + (1-beta) Q, 0 < beta < 1 (the op maps the endpoints to forward/reverse).
// s, t [N, V]; out [N]; stats [N, 6] keeps (m_s, ls_s, m_t, ls_t, k_p, k_q) for the backward:
// the row statistics of s and t (scale = 1 / temp) and k_p = KL(P || .), k_q = KL(Q || .), the
// row's divergence terms (0 where unused).
template <class T>
void kl_forward(const T* s, const T* t, int64_t n, int64_t v, Divergence kind, double beta,
                double inv_temp, T* out, T* stats, int64_t chunk = kLossChunk);
// ds, dt [N, V] (either may be null: not wanted) from g [N] and kl_forward's stats.
template <class T>
void kl_backward(const T* s, const T* t, const T* stats, const T* g, int64_t n, int64_t v,
                 Divergence kind, double beta, double inv_temp, T* ds, T* dt);

}  // namespace cpu

// CUDA twins (kernels/cuda/loss.cu). Same formulas as the CPU ones, but the logits (and the [N, V]
// outputs) are f32, bf16 or f16 (`dt`), everything per row (stats, nll, h, kl, g) is f32 and stats
// keep the CPU layouts. One CTA per row sweeps the vocabulary with 16-byte loads and an online
// (max, sum-exp) in f32, so a forward reads the row once (KL: twice) and a backward reads it once
// and writes the gradient once. All pointers are device pointers; `out`-style arguments of `dt`
// are [N, V] in the logits dtype. Launched on the current stream.
namespace cuda {

void row_stats(const void* x, DType dt, int64_t n, int64_t v, float* stat);
void softmax_forward(const void* x, DType dt, int64_t n, int64_t v, bool log, void* out);
void softmax_backward(const void* y, const void* dy, DType dt, int64_t n, int64_t v, bool log,
                      void* dx);
// out [N] in out_dt (any float dtype but f64): sign * nll (sign -1: token log-probs); ignored rows
// get 0 and stat 0. tgt: device i64 [N].
void nll_forward(const void* x, DType dt, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore,
                 float* stat, void* out, DType out_dt, float sign);
void nll_backward(const void* x, DType dt, const int64_t* tgt, const float* stat, const float* g,
                  int64_t g_stride, float scale, int64_t n, int64_t v, int64_t ignore, void* dx);
// nll_forward (f32 nll, sign 1) and nll_backward (upstream gradient `scale` for every row) in
// one kernel: each row's logits read once from memory. dx must not alias x.
void nll_fused(const void* x, DType dt, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore,
               float scale, float* nll, void* dx);
void entropy_forward(const void* x, DType dt, int64_t n, int64_t v, float* stat, float* h);
void entropy_backward(const void* x, DType dt, const float* stat, const float* h, const float* g,
                      int64_t n, int64_t v, void* dx);
void kl_forward(const void* s, const void* t, DType dt, int64_t n, int64_t v, Divergence kind,
                double beta, double inv_temp, float* out, float* stats);
// ds, dt_out may be null (not wanted).
void kl_backward(const void* s, const void* t, DType dt, const float* stats, const float* g,
                 int64_t n, int64_t v, Divergence kind, double beta, double inv_temp, void* ds,
                 void* dt_out);
// out[0] = scale * sum(x[0, n)) stored in out_dt: the loss reductions, one CTA in a fixed order
// (deterministic), f64 partial sums.
void sum_scaled(const float* x, int64_t n, double scale, void* out, DType out_dt);

}  // namespace cuda
}  // namespace ftune::kernels
