// attention: fused scaled-dot-product attention (kernels/attention.h), with its own backward.
#include "kernels/attention.h"

#include <atomic>
#include <cmath>
#include <iostream>
#include <mutex>
#include <set>

#include "core/ops/common.h"

namespace ftune::ops {

using namespace detail;

namespace {

using kernels::cpu::AttnParams;
using kernels::cpu::AttnSeq;

// cu_seqlens [nseq + 1] (i32): 0 = cu[0] <= cu[1] <= ... <= cu[nseq] = n.
std::vector<int64_t> read_cu_seqlens(const Tensor& cu, const char* what, int64_t n) {
  FTUNE_CHECK(cu.dtype() == DType::i32, "[attention] ", what, " must be i32, got ", cu.desc());
  FTUNE_CHECK(cu.dim() == 1 && cu.numel() >= 2, "[attention] ", what,
              " must be 1-d with at least 2 entries (one sequence), got ", cu.desc());
  std::vector<int64_t> v;
  for (int32_t x : cu.to_vector<int32_t>()) v.push_back(x);
  FTUNE_CHECK(v.front() == 0, "[attention] ", what, "[0] must be 0, got ", v.front());
  for (size_t i = 1; i < v.size(); ++i)
    FTUNE_CHECK(v[i] >= v[i - 1], "[attention] ", what, " must be non-decreasing, got ", v[i - 1],
                " then ", v[i], " at index ", i);
  FTUNE_CHECK(v.back() == n, "[attention] ", what, " ends at ", v.back(), " but there are ", n,
              " tokens");
  return v;
}

// Packed layout: [1, N, H, D] or [N, H, D] -> N.
int64_t packed_tokens(const Tensor& t, const char* what) {
  FTUNE_CHECK(t.dim() == 3 || (t.dim() == 4 && t.size(0) == 1), "[attention] with cu_seqlens, ",
              what, " must be [1, N, heads, head_dim] or [N, heads, head_dim], got ", t.desc());
  return t.size(-3);
}

// The backend: an atomic flag (set from every rank's thread when ranks are threads, as in the
// tests' in-process groups), not a shared string.
std::atomic<bool> g_cudnn_backend{false};

// Whether this GPU call goes to cuDNN: backend "cudnn" and a shape its graph serves. A fallback
// is reported once per reason, so a run says which calls did not use cuDNN.
bool use_cudnn(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt) {
  if (!g_cudnn_backend.load(std::memory_order_relaxed)) return false;
#ifdef FTUNE_HAVE_CUDNN
  std::string why = kernels::cuda::cudnn_attention_unsupported(p, seqs, dt);
  if (why.empty()) return true;
  static std::mutex mu;
  static std::set<std::string> told;
  std::lock_guard<std::mutex> lock(mu);
  if (told.insert(why).second)
    std::cerr << "[attention] backend cudnn: " << why << "; these calls run ftune's kernel\n";
#else
  (void)p;
  (void)seqs;
  (void)dt;
#endif
  return false;
}

}  // namespace

bool cudnn_attention_built() {
#ifdef FTUNE_HAVE_CUDNN
  return true;
#else
  return false;
#endif
}

void set_attention_backend(const std::string& name) {
  FTUNE_CHECK(name == "ftune" || name == "cudnn", "[attention] unknown backend `", name,
              "`: expected ftune or cudnn");
  FTUNE_CHECK(name != "cudnn" || cudnn_attention_built(),
              "[attention] backend cudnn: this ftune was built without cuDNN (",
#ifdef FTUNE_HAVE_CUDA
              "CMake found no cuDNN 9 beside the CUDA toolkit",
#else
              "FTUNE_CUDA=OFF",
#endif
              "); use attention.backend: ftune");
  g_cudnn_backend.store(name == "cudnn", std::memory_order_relaxed);
}

const std::string& attention_backend() {
  static const std::string ftune = "ftune", cudnn = "cudnn";
  return g_cudnn_backend.load(std::memory_order_relaxed) ? cudnn : ftune;
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt) {
  profiler::OpScope prof("attention");
  check_defined("attention", q, "q");
  check_defined("attention", k, "k");
  check_defined("attention", v, "v");
  const Tensor& cq = opt.cu_seqlens_q;
  const Tensor& ck = opt.cu_seqlens_k;
  check_same_device("attention", {&q, &k, &v});
  // cu_seqlens are read on the host: they may stay there when q is on the GPU.
  for (const Tensor* c : {&cq, &ck})
    FTUNE_CHECK(!c->defined() || c->device().is_cpu() || c->device() == q.device(),
                "[attention] cu_seqlens on ", c->desc(), " must be on the CPU or with q ",
                q.desc());
  check_same_dtype("attention", {&q, &k, &v});
  check_float("attention", q, "q");
  const bool gpu = q.device().is_cuda();
  FTUNE_CHECK(v.shape() == k.shape(), "[attention] v ", v.desc(), " must have the shape of k ",
              k.desc());
  const bool varlen = cq.defined() || ck.defined();
  FTUNE_CHECK(cq.defined() == ck.defined(),
              "[attention] cu_seqlens_q and cu_seqlens_k must be given together (got only ",
              cq.defined() ? "cu_seqlens_q" : "cu_seqlens_k", ")");
  if (varlen) {
    packed_tokens(q, "q");
    packed_tokens(k, "k");
  } else {
    FTUNE_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0),
                "[attention] expects q [B, Tq, H, D] ",
                "and k, v [B, Tk, Hkv, D] with the same B, got q ", q.desc(), ", k ", k.desc());
  }
  const int64_t H = q.size(-2), D = q.size(-1), Hkv = k.size(-2);
  FTUNE_CHECK(k.size(-1) == D, "[attention] head_dim of q ", q.desc(), " and k ", k.desc(),
              " differ");
  FTUNE_CHECK(D > 0 && H > 0 && Hkv > 0 && H % Hkv == 0, "[attention] query heads (", H,
              ") must be a positive multiple of kv heads (", Hkv, "), head_dim > 0: q ", q.desc(),
              ", k ", k.desc());
  FTUNE_CHECK(std::isfinite(opt.scale), "[attention] scale must be finite, got ", opt.scale);

  AttnParams p;
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.scale = opt.scale != 0.0 ? opt.scale : 1.0 / std::sqrt(double(D));
  p.causal = opt.causal;
  std::vector<AttnSeq> seqs;
  if (varlen) {
    p.nq = packed_tokens(q, "q");
    p.nk = packed_tokens(k, "k");
    auto vq = read_cu_seqlens(cq, "cu_seqlens_q", p.nq);
    auto vk = read_cu_seqlens(ck, "cu_seqlens_k", p.nk);
    FTUNE_CHECK(vq.size() == vk.size(), "[attention] cu_seqlens_q ", cq.desc(),
                " and cu_seqlens_k ", ck.desc(), " must describe the same number of sequences");
    for (size_t i = 0; i + 1 < vq.size(); ++i)
      seqs.push_back({vq[i], vq[i + 1] - vq[i], vk[i], vk[i + 1] - vk[i]});
  } else {
    const int64_t B = q.size(0), Tq = q.size(1), Tk = k.size(1);
    p.nq = B * Tq;
    p.nk = B * Tk;
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b * Tq, Tq, b * Tk, Tk});
  }

  Tensor qc = contig(q), kc = contig(k), vc = contig(v);
  Tensor out = Tensor::empty(q.shape(), q.dtype(), q.device());
  // The GPU keeps the logsumexp in f32 for every input dtype.
  Tensor lse = Tensor::empty({H, p.nq}, gpu ? DType::f32 : q.dtype(), q.device());
  // The backward runs the same implementation as the forward (their lse are interchangeable,
  // but pairing them keeps each backend's numbers its own).
  const bool cudnn = gpu && use_cudnn(p, seqs, q.dtype());
  if (gpu) {
#ifdef FTUNE_HAVE_CUDA
    if (cudnn)
      kernels::cuda::cudnn_attention_forward(p, seqs, q.dtype(), qc.raw_data(), kc.raw_data(),
                                             vc.raw_data(), out.raw_data(), lse.data<float>());
    else
      kernels::cuda::attention_forward(p, seqs, q.dtype(), qc.raw_data(), kc.raw_data(),
                                       vc.raw_data(), out.raw_data(), lse.data<float>());
#endif
  } else {
    dispatch_float(q.dtype(), "attention", [&]<class T>() {
      kernels::cpu::attention_forward<T>(p, seqs, qc.data<T>(), kc.data<T>(), vc.data<T>(),
                                         out.data<T>(), lse.data<T>());
    });
  }
  if (!needs_record({&q, &k, &v})) return out;

  Tensor saved_out = out.detach();
  record("attention", out, {q, k, v},
         [p, seqs, qc, kc, vc, saved_out, lse, cudnn](const Tensor& g,
                                                       const std::vector<bool>& need) {
           Tensor gc = g.dtype() == qc.dtype() ? contig(g) : g.detach().to(qc.dtype());
           Tensor dq, dk, dv;
           if (need[0]) dq = Tensor::empty(qc.shape(), qc.dtype(), qc.device());
           if (need[1]) dk = Tensor::empty(kc.shape(), kc.dtype(), kc.device());
           if (need[2]) dv = Tensor::empty(vc.shape(), vc.dtype(), vc.device());
           if (gc.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
             (cudnn ? kernels::cuda::cudnn_attention_backward : kernels::cuda::attention_backward)(
                 p, seqs, gc.dtype(), qc.raw_data(), kc.raw_data(), vc.raw_data(),
                 saved_out.raw_data(), lse.data<float>(), gc.raw_data(),
                 dq.defined() ? dq.raw_data() : nullptr, dk.defined() ? dk.raw_data() : nullptr,
                 dv.defined() ? dv.raw_data() : nullptr);
#endif
             return std::vector<Tensor>{dq, dk, dv};
           }
           dispatch_float(gc.dtype(), "attention_backward", [&]<class T>() {
             kernels::cpu::attention_backward<T>(
                 p, seqs, qc.data<T>(), kc.data<T>(), vc.data<T>(), saved_out.data<T>(),
                 lse.data<T>(), gc.data<T>(), dq.defined() ? dq.data<T>() : nullptr,
                 dk.defined() ? dk.data<T>() : nullptr, dv.defined() ? dv.data<T>() : nullptr);
           });
           return std::vector<Tensor>{dq, dk, dv};
         });
  return out;
}

}  // namespace ftune::ops
