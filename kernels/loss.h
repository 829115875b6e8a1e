// Softmax and loss kernels: softmax / log_softmax, fused cross-entropy (token log-probs), entropy
// and KL / generalized JSD. Every input is a contiguous [N, V] row-major matrix of logits: one row
// per token, V the vocabulary. The loss forwards never hold a row's probabilities: they sweep the
// vocabulary in chunks with an online max and sum-exp, and save per-row statistics (logsumexp,
// ...) from which the backwards recompute the probabilities in one pass.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

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
// nll = 0 and stat = 0.
template <class T>
void nll_forward(const T* x, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore, T* stat,
                 T* nll, int64_t chunk = kLossChunk);
// dx[i, :] = (softmax(x[i]) - onehot(tgt[i])) * g[i * g_stride] * scale in one pass (g_stride 0
// for a scalar upstream gradient); ignored rows get 0. stat is nll_forward's.
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
}  // namespace ftune::kernels
