// Op-table cases for the fused attention op: causal / not, grouped-query, batched and packed
// variable-length sequences, KV-cache shaped (len_q < len_k), tiles cut by ragged T.
#include <cmath>

#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;

// Naive reference in f64: the full scores matrix of every (sequence, head), masked, softmaxed.
// q [B, Tq, H, D] / k, v [B, Tk, Hkv, D], or packed [1, N, ., D] / [N, ., D] with cu_seqlens.
Tensor naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                       const std::vector<int>& cu_q, const std::vector<int>& cu_k) {
  const int64_t H = q.size(-2), D = q.size(-1), Hkv = k.size(-2);
  if (scale == 0) scale = 1.0 / std::sqrt(double(D));
  std::vector<int64_t> qs, ks;  // sequence boundaries in tokens
  if (cu_q.empty()) {
    for (int64_t b = 0; b <= q.size(0); ++b) {
      qs.push_back(b * q.size(1));
      ks.push_back(b * k.size(1));
    }
  } else {
    qs.assign(cu_q.begin(), cu_q.end());
    ks.assign(cu_k.begin(), cu_k.end());
  }
  auto vq = q.to_vector<double>(), vk = k.to_vector<double>(), vv = v.to_vector<double>();
  std::vector<double> out(vq.size(), 0.0);
  for (size_t s = 0; s + 1 < qs.size(); ++s) {
    const int64_t lq = qs[s + 1] - qs[s], lk = ks[s + 1] - ks[s];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      for (int64_t r = 0; r < lq; ++r) {
        std::vector<double> sc(size_t(lk), -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j < lk; ++j) {
          if (causal && j > r + lk - lq) continue;
          double d = 0;
          for (int64_t e = 0; e < D; ++e)
            d += vq[((qs[s] + r) * H + h) * D + e] * vk[((ks[s] + j) * Hkv + hk) * D + e];
          sc[j] = d * scale;
          mx = std::max(mx, sc[j]);
        }
        if (mx == -INFINITY) continue;  // sees no key: output 0
        double z = 0;
        for (auto& x : sc) z += (x = std::exp(x - mx));
        for (int64_t j = 0; j < lk; ++j)
          for (int64_t e = 0; e < D; ++e)
            out[((qs[s] + r) * H + h) * D + e] += sc[j] / z * vv[((ks[s] + j) * Hkv + hk) * D + e];
      }
    }
  }
  return Tensor::from_vector(out, q.shape());
}

Tensor cu(const std::vector<int>& v) {
  return Tensor::from_vector(std::vector<int32_t>(v.begin(), v.end()), {int64_t(v.size())});
}

// A batched case: q [B, Tq, H, D], k/v [B, Tk, Hkv, D].
OpCase batched(const std::string& variant, int64_t B, int64_t Tq, int64_t Tk, int64_t H,
               int64_t Hkv, int64_t D, bool causal, double scale = 0.0) {
  OpCase c;
  c.op = "attention";
  c.variant = variant;
  c.inputs = {{"q", {B, Tq, H, D}}, {"k", {B, Tk, Hkv, D}}, {"v", {B, Tk, Hkv, D}}};
  c.run = [causal, scale](const V& x) {
    ops::AttentionOptions o;
    o.causal = causal;
    o.scale = scale;
    return ops::attention(x[0], x[1], x[2], o);
  };
  c.reference = [causal, scale](const V& x) {
    return naive_attention(x[0], x[1], x[2], causal, scale, {}, {});
  };
  return c;
}

// A packed case: q [1, Nq, H, D] (or [Nq, H, D] when three_d), sequences cut by cu_seqlens.
OpCase packed(const std::string& variant, const std::vector<int>& cq, const std::vector<int>& ck,
              int64_t H, int64_t Hkv, int64_t D, bool causal, bool three_d = false) {
  OpCase c;
  c.op = "attention";
  c.variant = variant;
  Shape sq{cq.back(), H, D}, sk{ck.back(), Hkv, D};
  if (!three_d) {
    sq.insert(sq.begin(), 1);
    sk.insert(sk.begin(), 1);
  }
  c.inputs = {{"q", sq}, {"k", sk}, {"v", sk}};
  c.run = [cq, ck, causal](const V& x) {
    ops::AttentionOptions o;
    o.causal = causal;
    o.cu_seqlens_q = cu(cq);
    o.cu_seqlens_k = cu(ck);
    return ops::attention(x[0], x[1], x[2], o);
  };
  c.reference = [cq, ck, causal](const V& x) {
    return naive_attention(x[0], x[1], x[2], causal, 0.0, cq, ck);
  };
  return c;
}

OpCase bench_case(const std::string& variant, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                  int64_t D, bool causal) {
  OpCase c = batched(variant, B, T, T, H, Hkv, D, causal);
  c.reference = nullptr;
  c.bench = true;
  c.flops = [=] { return 4.0 * B * H * T * T * D * (causal ? 0.5 : 1.0); };
  return c;
}

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;
  cs.push_back(batched("noncausal_b2_t9_h2_d8", 2, 9, 9, 2, 2, 8, false));
  cs.push_back(batched("causal_b2_t9_h2_d8", 2, 9, 9, 2, 2, 8, true));
  // T = 70 and 150 cut the default 64 x 128 tiles raggedly; D = 13 is no vector width.
  cs.push_back(batched("causal_b1_t70_h2_d13", 1, 70, 70, 2, 2, 13, true));
  cs.push_back(batched("noncausal_b1_t150_h1_d7", 1, 150, 150, 1, 1, 7, false));
  cs.push_back(batched("causal_b2_t150_h2_d5", 2, 150, 150, 2, 2, 5, true));
  cs.push_back(batched("gqa_h4_kv2_causal_t37", 2, 37, 37, 4, 2, 8, true));
  cs.push_back(batched("mqa_h4_kv1_causal_t70", 1, 70, 70, 4, 1, 6, true));
  cs.push_back(batched("mqa_h4_kv1_noncausal_b3", 3, 11, 11, 4, 1, 8, false));
  cs.push_back(batched("scale_0p3_causal", 2, 12, 12, 2, 1, 8, true, 0.3));
  // Scores in the hundreds: the online max must keep exp from overflowing (near one-hot rows).
  cs.push_back(batched("scale_40_peaked_causal", 1, 140, 140, 2, 1, 8, true, 40.0));
  // KV cache: the queries are the last len_q of len_k tokens (bottom-right causal).
  cs.push_back(batched("kvcache_q5_k23_causal", 2, 5, 23, 4, 2, 8, true));
  cs.push_back(batched("kvcache_q1_k140_causal", 2, 1, 140, 2, 1, 8, true));
  cs.push_back(batched("cross_q7_k19_noncausal", 2, 7, 19, 2, 2, 8, false));
  // Packed variable-length sequences.
  cs.push_back(packed("varlen_0_3_10_12_causal", {0, 3, 10, 12}, {0, 3, 10, 12}, 4, 2, 8, true));
  cs.push_back(
      packed("varlen_0_3_10_12_noncausal", {0, 3, 10, 12}, {0, 3, 10, 12}, 4, 4, 8, false));
  cs.push_back(packed("varlen_long_gqa_causal", {0, 70, 75, 205}, {0, 70, 75, 205}, 4, 2, 4, true));
  cs.push_back(packed("varlen_3d_empty_seq", {0, 4, 4, 9}, {0, 4, 4, 9}, 2, 1, 8, true, true));
  // Enough (sequence, kv head) pairs that the backward gives each task a whole query-head group.
  cs.push_back(packed("varlen_9seq_gqa_causal", {0, 1, 5, 6, 14, 20, 21, 29, 33, 40},
                      {0, 1, 5, 6, 14, 20, 21, 29, 33, 40}, 4, 2, 8, true));
  // Packed KV cache: each sequence's queries are the tail of its keys.
  cs.push_back(packed("varlen_kvcache_causal", {0, 2, 5, 6}, {0, 7, 9, 20}, 2, 1, 8, true));
  // Causal with len_q > len_k: the first len_q - len_k queries see no key (output 0).
  cs.push_back(packed("varlen_q_longer_than_k", {0, 6, 9}, {0, 2, 9}, 2, 2, 8, true));

  cs.push_back(bench_case("bench_b8_t256_h8_d64_causal", 8, 256, 8, 8, 64, true));
  cs.push_back(bench_case("bench_b4_t1024_h8_d64_causal", 4, 1024, 8, 8, 64, true));
  cs.push_back(bench_case("bench_b1_t4096_h8_d64_causal", 1, 4096, 8, 8, 64, true));
  cs.push_back(bench_case("bench_b2_t1024_h8_kv2_d64_causal", 2, 1024, 8, 2, 64, true));
  cs.push_back(bench_case("bench_b1_t1024_h4_d64_noncausal", 1, 1024, 4, 4, 64, false));
  cs.push_back(bench_case("bench_b1_t4096_h4_kv1_d128_causal", 1, 4096, 4, 1, 128, true));
  return cs;
}

OpTableEntry entry(cases());

}  // namespace
}  // namespace ftune::test
