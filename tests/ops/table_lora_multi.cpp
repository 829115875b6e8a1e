// Op-table cases for lora_linear_multi (the batched q/k/v projection). The reference runs each
// segment on its own with naive f64 loops and draws each adapter's dropout mask itself with
// philox_uniform (kernels/lora.h), so the batching, the packing of [A_0; A_1; ...], the column
// offsets into y and u, and the per-adapter masks are all checked against an independent sum.
#include <cmath>

#include "kernels/lora.h"
#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;

struct Seg {
  int64_t out = 0, r = 0;  // r 0: no adapter
  double scale = 1, p = 0;
  uint64_t seed = 0;
};

// v = {x [..., in], w [N, in], (bias [N]), then a_i [r_i, in], b_i [out_i, r_i] per adapter}.
Tensor multi_reference(const V& v, bool has_bias, const std::vector<Seg>& segs) {
  const Tensor& x = v[0];
  const int64_t in = v[1].size(1), N = v[1].size(0), M = x.numel() / in;
  auto vx = x.to_vector<double>(), vw = v[1].to_vector<double>();
  std::vector<double> vbias = has_bias ? v[2].to_vector<double>() : std::vector<double>(N, 0.0);
  std::vector<double> y(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < N; ++o) {
      double s = vbias[o];
      for (int64_t i = 0; i < in; ++i) s += vx[m * in + i] * vw[o * in + i];
      y[m * N + o] = s;
    }
  size_t k = has_bias ? 3 : 2;
  int64_t row = 0;
  for (const Seg& sg : segs) {
    if (sg.r > 0) {
      auto va = v[k].to_vector<double>(), vb = v[k + 1].to_vector<double>();
      k += 2;
      std::vector<double> xd(vx.size());
      for (size_t i = 0; i < vx.size(); ++i) {
        bool dropped =
            sg.p > 0 && double(philox_uniform(sg.seed, kernels::kLoraDropoutStream, i)) < sg.p;
        xd[i] = dropped ? 0.0 : vx[i] / (1.0 - sg.p);
      }
      for (int64_t m = 0; m < M; ++m) {
        std::vector<double> u(size_t(sg.r), 0.0);
        for (int64_t j = 0; j < sg.r; ++j)
          for (int64_t i = 0; i < in; ++i) u[j] += xd[m * in + i] * va[j * in + i];
        for (int64_t o = 0; o < sg.out; ++o) {
          double l = 0;
          for (int64_t j = 0; j < sg.r; ++j) l += u[j] * vb[o * sg.r + j];
          y[m * N + row + o] += sg.scale * l;
        }
      }
    }
    row += sg.out;
  }
  Shape os = x.shape();
  os.back() = N;
  return Tensor::from_vector(y, os);
}

OpCase multi_case(const std::string& variant, Shape xs, bool bias, std::vector<Seg> segs) {
  OpCase c;
  c.op = "lora_linear_multi";
  c.variant = variant;
  const int64_t in = xs.back();
  int64_t N = 0;
  for (const Seg& s : segs) N += s.out;
  InputSpec w{"w", {N, in}};
  w.grad = false;  // frozen base weight
  c.inputs = {{"x", xs}, w};
  if (bias) {
    InputSpec bs{"bias", {N}};
    bs.grad = false;
    c.inputs.push_back(bs);
  }
  for (size_t i = 0; i < segs.size(); ++i)
    if (segs[i].r > 0) {
      c.inputs.push_back({"lora_a" + std::to_string(i), {segs[i].r, in}});
      c.inputs.push_back({"lora_b" + std::to_string(i), {segs[i].out, segs[i].r}});
    }
  c.run = [bias, segs](const V& v) {
    std::vector<ops::LoraSegment> ls;
    size_t k = bias ? 3 : 2;
    for (const Seg& s : segs) {
      ops::LoraSegment l;
      l.out = s.out;
      if (s.r > 0) {
        l.a = v[k];
        l.b = v[k + 1];
        k += 2;
        l.scale = s.scale;
        l.dropout = s.p;
        l.seed = s.seed;
      }
      ls.push_back(l);
    }
    return ops::lora_linear_multi(v[0], v[1], bias ? v[2] : Tensor(), ls);
  };
  c.reference = [bias, segs](const V& v) { return multi_reference(v, bias, segs); };
  return c;
}

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;
  // GQA shapes: q 8 rows, k and v 4 each; ranks differ so the packed offsets are not uniform.
  cs.push_back(multi_case("qkv_gqa_bias_p0", {6, 8}, true,
                          {{8, 2, 2.0, 0, 0}, {4, 3, 0.5, 0, 0}, {4, 1, 1.5, 0, 0}}));
  // PEFT's default targets: q and v adapted, k not (its rows only take the base GEMM).
  cs.push_back(multi_case("qv_only_nobias_p0_3d", {2, 3, 8}, false,
                          {{8, 2, 2.0, 0, 0}, {4, 0, 0, 0, 0}, {4, 2, 2.0, 0, 0}}));
  // Dropout: each adapter its own seed and mask (one at p 0 amid them); 160 elements of x.
  cs.push_back(multi_case("qkv_bias_dropout_mixed_3d", {2, 5, 16}, true,
                          {{8, 3, 1.5, 0.1, 11}, {4, 2, 1.5, 0.0, 12}, {4, 3, 1.5, 0.25, 13}}));
  cs.push_back(multi_case("qkv_dropout_same_p", {10, 16}, false,
                          {{6, 4, 0.25, 0.1, 99}, {6, 4, 0.25, 0.1, 100}, {6, 4, 0.25, 0.1, 101}}));
  cs.push_back(multi_case("one_segment_p0", {5, 12}, true, {{7, 2, 2.0, 0, 0}}));
  // No bias, an adapter on every segment, no dropout: the low-rank terms first, the batched A's.
  cs.push_back(multi_case("qkv_nobias_p0_lowrank_first", {9, 16}, false,
                          {{6, 4, 0.5, 0, 0}, {3, 2, 1.0, 0, 0}, {3, 2, 1.0, 0, 0}}));
  cs.push_back(multi_case("no_adapter", {4, 8}, true, {{6, 0, 0, 0, 0}, {2, 0, 0, 0, 0}}));

  // Llama-like q/k/v at d=1024, 8 kv heads of 16 query heads' 64 dims: timing only.
  const int64_t M = 8 * 256, in = 1024, r = 16;
  for (double p : {0.0, 0.1}) {
    OpCase c = multi_case(
        p > 0 ? "bench_2048x1024_qkv1024_512_512_r16_p0.1" : "bench_2048x1024_qkv1024_512_512_r16",
        {M, in}, true, {{1024, r, 2.0, p, 5}, {512, r, 2.0, p, 6}, {512, r, 2.0, p, 7}});
    c.bench = true;
    c.flops = [=] { return 2.0 * M * in * 2048 + 3 * 2.0 * M * in * r + 2.0 * M * r * 2048; };
    cs.push_back(c);
  }
  return cs;
}

OpTableEntry reg(cases());

}  // namespace
}  // namespace ftune::test
