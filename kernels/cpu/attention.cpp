// FlashAttention-2 on the CPU: tiles of block_q query rows x block_k key columns, an online
// softmax per query row in the forward, and P recomputed from the saved logsumexp in the backward.
// The tile products go through OpenBLAS (strided straight out of the [N, H, D] layout, no copies);
// the softmax and masking loops are written to vectorize.
#include "kernels/attention.h"
#include "kernels/cpu/vec_math.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/allocator.h"
#include "core/error.h"
#include "kernels/matmul.h"

namespace ftune::kernels::cpu {

namespace {

// The tiles are small GEMMs issued from every OpenMP thread at once. A pthreads build of OpenBLAS
// would fan each one out to its own thread pool (oversubscription, and its server lock serializes
// the callers), so it runs single-threaded for the duration. An OpenMP build already does that by
// itself (it checks omp_in_parallel), and there openblas_set_num_threads would also change our
// OpenMP team size, so it is left alone.
class SerialBlasScope {
 public:
  SerialBlasScope() {
    if (openblas_get_parallel() == 1) {
      prev_ = openblas_get_num_threads();
      if (prev_ > 1) openblas_set_num_threads(1);
    }
  }
  ~SerialBlasScope() {
    if (prev_ > 1) openblas_set_num_threads(prev_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int prev_ = 0;
};

// f64 serves the gradient checks: exact over fast. Below -745 exp underflows to 0, and libm's
// underflow path is slow enough to dominate peaked softmaxes, so it is skipped.
template <class T>
inline T exp_t(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_nonpos(x);
  else
    return x < T(-745) ? T(0) : std::exp(x);
}

void check_params(const AttnParams& p) {
  FTUNE_CHECK(p.block_q > 0 && p.block_k > 0 && p.head_dim > 0 && p.num_kv_heads > 0 &&
                  p.num_heads % p.num_kv_heads == 0,
              "[attention] bad kernel parameters: tiles ", p.block_q, "x", p.block_k, ", heads ",
              p.num_heads, "/", p.num_kv_heads, ", head_dim ", p.head_dim);
}

// Number of keys of the tile [c0, c0 + width) that local query row r sees (off = len_k - len_q).
inline int64_t visible(bool causal, int64_t r, int64_t off, int64_t c0, int64_t width) {
  if (!causal) return width;
  return std::clamp<int64_t>(r + off - c0 + 1, 0, width);
}

// One buffer for every thread's scratch, through the tracked allocator (memory tests see it).
template <class T>
struct Scratch {
  DataPtr mem{nullptr, [](void*) {}};
  int64_t per_thread = 0;
  Scratch(int64_t elems_per_thread, int threads) : per_thread((elems_per_thread + 15) / 16 * 16) {
    mem = cpu_alloc(size_t(per_thread * threads) * sizeof(T));
  }
  T* get(int thread) const { return static_cast<T*>(mem.get()) + per_thread * thread; }
};

struct Task {
  int64_t seq, start, cost;  // start: first query row (forward) or the head subgroup (backward)
};

// Below this many multiply-adds a parallel region costs more than it saves (and a spinning
// OpenMP team on a busy machine costs far more): run on the calling thread.
constexpr int64_t kMinParallelWork = int64_t(1) << 21;

void sort_by_cost(std::vector<Task>& tasks) {
  // Largest first, so the dynamic schedule does not end on one long causal tile row.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

}  // namespace

// q [Nq, H, D], k/v [Nk, Hkv, D] -> out [Nq, H, D], lse [H, Nq].
template <class T>
void attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const T* q,
                       const T* k, const T* v, T* out, T* lse) {
  check_params(p);
  const int64_t H = p.num_heads, Hkv = p.num_kv_heads, D = p.head_dim, group = H / Hkv;
  const int64_t bq = p.block_q, bk = p.block_k;
  const int64_t ldq = H * D, ldk = Hkv * D;
  const T scale = T(p.scale);
  const T inf = std::numeric_limits<T>::infinity();

  std::vector<Task> tasks;
  for (int64_t s = 0; s < int64_t(seqs.size()); ++s) {
    const AttnSeq& sq = seqs[s];
    for (int64_t r0 = 0; r0 < sq.len_q; r0 += bq) {
      int64_t r1 = std::min(r0 + bq, sq.len_q);
      int64_t cols =
          p.causal ? std::clamp<int64_t>(r1 + sq.len_k - sq.len_q, 0, sq.len_k) : sq.len_k;
      tasks.push_back({s, r0, (r1 - r0) * (cols + 1)});
    }
  }
  sort_by_cost(tasks);
  const int64_t ntasks = int64_t(tasks.size()) * H;
  if (ntasks == 0) return;
  int64_t work = 0;
  for (const Task& t : tasks) work += t.cost * H * D;

  SerialBlasScope serial_blas;
  const int threads = omp_get_max_threads();
  // Per thread: scores/probabilities [bq, bk], output accumulator [bq, D], row max and sum [bq].
  Scratch<T> scratch(bq * bk + bq * D + 2 * bq, threads);

#pragma omp parallel for schedule(dynamic, 1) if (work > kMinParallelWork)
  for (int64_t t = 0; t < ntasks; ++t) {
    const Task& task = tasks[t / H];
    const int64_t h = t % H, hk = h / group;
    const AttnSeq& sq = seqs[task.seq];
    const int64_t r0 = task.start, rows = std::min(bq, sq.len_q - r0);
    const int64_t off = sq.len_k - sq.len_q;
    const int64_t col_end = p.causal ? std::clamp<int64_t>(r0 + rows + off, 0, sq.len_k) : sq.len_k;

    T* s_buf = scratch.get(omp_get_thread_num());
    T* acc = s_buf + bq * bk;
    T* row_max = acc + bq * D;
    T* row_sum = row_max + bq;
    std::fill(acc, acc + rows * D, T(0));
    std::fill(row_max, row_max + rows, -inf);
    std::fill(row_sum, row_sum + rows, T(0));

    const T* qt = q + ((sq.q_start + r0) * H + h) * D;  // rows strided by ldq
    const T* kt = k + (sq.k_start * Hkv + hk) * D;      // rows strided by ldk
    const T* vt = v + (sq.k_start * Hkv + hk) * D;
    for (int64_t c0 = 0; c0 < col_end; c0 += bk) {
      const int64_t cols = std::min(bk, col_end - c0);
      // S = scale * Q K^T  [rows, cols]
      gemm<T>(false, true, rows, cols, D, scale, qt, ldq, kt + c0 * ldk, ldk, T(0), s_buf, cols);
      const bool full = !p.causal || c0 + cols - 1 <= r0 + off;  // no masked entry in this tile
      for (int64_t i = 0; i < rows; ++i) {
        T* srow = s_buf + i * cols;
        const int64_t n = full ? cols : visible(true, r0 + i, off, c0, cols);
        if (n == 0) {
          std::fill(srow, srow + cols, T(0));
          continue;
        }
        T mx = -inf;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) mx = srow[j] > mx ? srow[j] : mx;
        const T m_new = std::max(row_max[i], mx);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          const T e = exp_t<T>(srow[j] - m_new);
          srow[j] = e;
          sum += e;
        }
        std::fill(srow + n, srow + cols, T(0));
        // Rescale what was accumulated under the old max (exp(-inf) = 0 on the first tile).
        const T alpha = row_max[i] == -inf ? T(0) : exp_t<T>(row_max[i] - m_new);
        row_sum[i] = row_sum[i] * alpha + sum;
        row_max[i] = m_new;
        if (alpha != T(1)) {
          T* arow = acc + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) arow[d] *= alpha;
        }
      }
      // acc += P V  [rows, D]
      gemm<T>(false, false, rows, D, cols, T(1), s_buf, cols, vt + c0 * ldk, ldk, T(1), acc, D);
    }

    T* ot = out + ((sq.q_start + r0) * H + h) * D;
    T* lt = lse + h * p.nq + sq.q_start + r0;
    for (int64_t i = 0; i < rows; ++i) {
      T* orow = ot + i * ldq;
      if (row_sum[i] == T(0)) {  // sees no key (causal with len_q > len_k, or len_k == 0)
        std::fill(orow, orow + D, T(0));
        lt[i] = inf;
        continue;
      }
      const T inv = T(1) / row_sum[i];
      const T* arow = acc + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] = arow[d] * inv;
      lt[i] = row_max[i] + std::log(row_sum[i]);
    }
  }
}

// FlashAttention-2 backward. A task owns one sequence, one kv head and a subgroup of the query
// heads reading it, so dq (per query head) and dk/dv (per kv head) have a single writer. When
// there are too few (sequence, kv head) pairs to keep the threads busy, the query heads of a
// group are split into subgroups that write partial dk/dv, summed at the end.
template <class T>
void attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const T* q,
                        const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq,
                        T* dk, T* dv) {
  check_params(p);
  if (!dq && !dk && !dv) return;
  const int64_t H = p.num_heads, Hkv = p.num_kv_heads, D = p.head_dim, group = H / Hkv;
  const int64_t bq = p.block_q, bk = p.block_k;
  const int64_t ldq = H * D, ldk = Hkv * D;
  const T scale = T(p.scale);
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t nseq = int64_t(seqs.size());
  const int threads = omp_get_max_threads();

  SerialBlasScope serial_blas;

  // Delta [H, Nq] = rowsum(dO * O): the softmax-Jacobian term of dS = P * (dP - Delta).
  DataPtr delta_mem = cpu_alloc(size_t(std::max<int64_t>(H * p.nq, 1)) * sizeof(T));
  T* delta = static_cast<T*>(delta_mem.get());
#pragma omp parallel for schedule(static) if (p.nq * H * D > (1 << 15))
  for (int64_t n = 0; n < p.nq; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const T* o = out + (n * H + h) * D;
      const T* g = dout + (n * H + h) * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += o[d] * g[d];
      delta[h * p.nq + n] = acc;
    }

  // Smallest split of each group into subgroups that gives at least kMinBwdTasks tasks. It depends
  // on the problem only, never on the thread count, so dK/dV sum in the same order everywhere
  // (a run resumed on another machine continues bit for bit).
  constexpr int64_t kMinBwdTasks = 64;
  int64_t splits = 1;
  while (splits < group && nseq * Hkv * splits < kMinBwdTasks) {
    ++splits;
    while (group % splits) ++splits;
  }
  const int64_t sub = group / splits;  // query heads per task
  const bool partial = splits > 1 && (dk || dv);
  DataPtr part_mem{nullptr, [](void*) {}};
  T* dk_part = nullptr;
  T* dv_part = nullptr;
  if (partial) {  // [splits, Nk, Hkv, D] each
    const int64_t n = splits * p.nk * Hkv * D;
    part_mem = cpu_alloc(size_t(std::max<int64_t>(2 * n, 1)) * sizeof(T));
    dk_part = static_cast<T*>(part_mem.get());
    dv_part = dk_part + n;
  }

  std::vector<Task> tasks;
  for (int64_t s = 0; s < nseq; ++s)
    for (int64_t sg = 0; sg < splits; ++sg) {
      const AttnSeq& sq = seqs[s];
      tasks.push_back({s, sg, sq.len_q * (sq.len_k + 1) + sq.len_k});
    }
  sort_by_cost(tasks);
  const int64_t ntasks = int64_t(tasks.size()) * Hkv;
  int64_t work = 0;
  for (const AttnSeq& sq : seqs) work += sq.len_q * sq.len_k * H * D;

  // Per thread: P [bq, bk], dP then dS [bq, bk], dK and dV accumulators [bk, D].
  Scratch<T> scratch(2 * bq * bk + 2 * bk * D, threads);

#pragma omp parallel for schedule(dynamic, 1) if (work > kMinParallelWork)
  for (int64_t t = 0; t < ntasks; ++t) {
    const Task& task = tasks[t / Hkv];
    const int64_t hk = t % Hkv, sg = task.start;
    const int64_t h_begin = hk * group + sg * sub, h_end = h_begin + sub;
    const AttnSeq& sq = seqs[task.seq];
    const int64_t off = sq.len_k - sq.len_q;

    T* p_buf = scratch.get(omp_get_thread_num());
    T* ds_buf = p_buf + bq * bk;
    T* dk_acc = ds_buf + bq * bk;
    T* dv_acc = dk_acc + bk * D;

    if (dq)  // this task is the only writer of these rows: zero them here, accumulate below
      for (int64_t r = 0; r < sq.len_q; ++r)
        std::fill(dq + ((sq.q_start + r) * H + h_begin) * D,
                  dq + ((sq.q_start + r) * H + h_end) * D, T(0));

    const T* kt = k + (sq.k_start * Hkv + hk) * D;
    const T* vt = v + (sq.k_start * Hkv + hk) * D;
    T* dk_out =
        dk ? (partial ? dk_part + sg * p.nk * ldk : dk) + (sq.k_start * Hkv + hk) * D : nullptr;
    T* dv_out =
        dv ? (partial ? dv_part + sg * p.nk * ldk : dv) + (sq.k_start * Hkv + hk) * D : nullptr;

    for (int64_t c0 = 0; c0 < sq.len_k; c0 += bk) {
      const int64_t cols = std::min(bk, sq.len_k - c0);
      std::fill(dk_acc, dk_acc + cols * D, T(0));
      std::fill(dv_acc, dv_acc + cols * D, T(0));
      // Query row r sees key c0 iff r + off >= c0: earlier rows skip this tile entirely.
      const int64_t first_row = p.causal ? std::clamp<int64_t>(c0 - off, 0, sq.len_q) : 0;
      const T* kc = kt + c0 * ldk;
      const T* vc = vt + c0 * ldk;
      for (int64_t h = h_begin; h < h_end; ++h) {
        for (int64_t r0 = first_row; r0 < sq.len_q; r0 += bq) {
          const int64_t rows = std::min(bq, sq.len_q - r0);
          const int64_t tok = sq.q_start + r0;
          const T* qt = q + (tok * H + h) * D;
          const T* dot = dout + (tok * H + h) * D;
          const T* lt = lse + h * p.nq + tok;
          const T* dlt = delta + h * p.nq + tok;
          const bool full = !p.causal || c0 + cols - 1 <= r0 + off;
          // P = exp(scale * Q K^T - lse), zero where masked
          gemm<T>(false, true, rows, cols, D, scale, qt, ldq, kc, ldk, T(0), p_buf, cols);
          for (int64_t i = 0; i < rows; ++i) {
            T* prow = p_buf + i * cols;
            const int64_t n = lt[i] == inf ? 0 : full ? cols : visible(true, r0 + i, off, c0, cols);
            const T l = lt[i];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) prow[j] = exp_t<T>(prow[j] - l);
            std::fill(prow + n, prow + cols, T(0));
          }
          // dV += P^T dO  [cols, D]
          if (dv) gemm<T>(true, false, cols, D, rows, T(1), p_buf, cols, dot, ldq, T(1), dv_acc, D);
          if (!dq && !dk) continue;
          // dP = dO V^T, then dS = P * (dP - Delta) in place  [rows, cols]
          gemm<T>(false, true, rows, cols, D, T(1), dot, ldq, vc, ldk, T(0), ds_buf, cols);
          for (int64_t i = 0; i < rows; ++i) {
            T* drow = ds_buf + i * cols;
            const T* prow = p_buf + i * cols;
            const T dl = dlt[i];
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) drow[j] = prow[j] * (drow[j] - dl);
          }
          // dQ += scale * dS K  [rows, D], straight into dq
          if (dq)
            gemm<T>(false, false, rows, D, cols, scale, ds_buf, cols, kc, ldk, T(1),
                    dq + (tok * H + h) * D, ldq);
          // dK += scale * dS^T Q  [cols, D]
          if (dk)
            gemm<T>(true, false, cols, D, rows, scale, ds_buf, cols, qt, ldq, T(1), dk_acc, D);
        }
      }
      for (int64_t j = 0; j < cols; ++j) {
        if (dk_out) std::memcpy(dk_out + (c0 + j) * ldk, dk_acc + j * D, size_t(D) * sizeof(T));
        if (dv_out) std::memcpy(dv_out + (c0 + j) * ldk, dv_acc + j * D, size_t(D) * sizeof(T));
      }
    }
  }

  if (partial) {  // dk[n, hk] = sum over subgroups of the partial results
    const int64_t n = p.nk * ldk;
    auto reduce = [&](T* dst, const T* part) {
#pragma omp parallel for schedule(static) if (n * splits > (1 << 15))
      for (int64_t i = 0; i < n; ++i) {
        T acc = 0;
        for (int64_t s = 0; s < splits; ++s) acc += part[s * n + i];
        dst[i] = acc;
      }
    };
    if (dk) reduce(dk, dk_part);
    if (dv) reduce(dv, dv_part);
  }
}

template void attention_forward<float>(const AttnParams&, const std::vector<AttnSeq>&, const float*,
                                       const float*, const float*, float*, float*);
template void attention_forward<double>(const AttnParams&, const std::vector<AttnSeq>&,
                                        const double*, const double*, const double*, double*,
                                        double*);
template void attention_backward<float>(const AttnParams&, const std::vector<AttnSeq>&,
                                        const float*, const float*, const float*, const float*,
                                        const float*, const float*, float*, float*, float*);
template void attention_backward<double>(const AttnParams&, const std::vector<AttnSeq>&,
                                         const double*, const double*, const double*, const double*,
                                         const double*, const double*, double*, double*, double*);

}  // namespace ftune::kernels::cpu
