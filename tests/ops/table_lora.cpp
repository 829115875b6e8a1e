// Op-table cases for lora_linear. The reference composes the formula with naive f64 loops and
// regenerates the dropout mask itself with philox_uniform (the rule documented in kernels/lora.h).
#include <cmath>

#include "kernels/lora.h"
#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;

// v = {x [..., in], w [out, in], a [r, in], b [out, r]} or {x, w, bias [out], a, b}.
Tensor lora_reference(const V& v, bool has_bias, double scale, double p, uint64_t seed) {
  const Tensor& x = v[0];
  const Tensor& w = v[1];
  const Tensor& a = v[has_bias ? 3 : 2];
  const Tensor& b = v[has_bias ? 4 : 3];
  const int64_t in = w.size(1), out = w.size(0), r = a.size(0), M = x.numel() / in;
  auto vx = x.to_vector<double>(), vw = w.to_vector<double>(), va = a.to_vector<double>(),
       vb = b.to_vector<double>();
  std::vector<double> vbias = has_bias ? v[2].to_vector<double>() : std::vector<double>(out, 0.0);
  std::vector<double> xd(vx.size());
  for (size_t i = 0; i < vx.size(); ++i) {
    bool dropped = p > 0 && double(philox_uniform(seed, kernels::kLoraDropoutStream, i)) < p;
    xd[i] = dropped ? 0.0 : vx[i] / (1.0 - p);
  }
  std::vector<double> y(size_t(M * out));
  for (int64_t m = 0; m < M; ++m) {
    std::vector<double> u(size_t(r), 0.0);
    for (int64_t k = 0; k < r; ++k)
      for (int64_t i = 0; i < in; ++i) u[k] += xd[m * in + i] * va[k * in + i];
    for (int64_t o = 0; o < out; ++o) {
      double s = vbias[o];
      for (int64_t i = 0; i < in; ++i) s += vx[m * in + i] * vw[o * in + i];
      double l = 0;
      for (int64_t k = 0; k < r; ++k) l += u[k] * vb[o * r + k];
      y[m * out + o] = s + scale * l;
    }
  }
  Shape os = x.shape();
  os.back() = out;
  return Tensor::from_vector(y, os);
}

OpCase lora_case(const std::string& variant, Shape xs, int64_t out, int64_t r, bool bias,
                 double scale, double p, uint64_t seed) {
  OpCase c;
  c.op = "lora_linear";
  c.variant = variant;
  const int64_t in = xs.back();
  InputSpec w{"w", {out, in}};
  w.grad = false;  // frozen base weight
  c.inputs = {{"x", xs}, w};
  if (bias) {
    InputSpec bs{"bias", {out}};
    bs.grad = false;
    c.inputs.push_back(bs);
  }
  c.inputs.push_back({"lora_a", {r, in}});
  c.inputs.push_back({"lora_b", {out, r}});
  c.run = [bias, scale, p, seed](const V& v) {
    return bias ? ops::lora_linear(v[0], v[1], v[2], v[3], v[4], scale, p, seed)
                : ops::lora_linear(v[0], v[1], Tensor(), v[2], v[3], scale, p, seed);
  };
  c.reference = [bias, scale, p, seed](const V& v) {
    return lora_reference(v, bias, scale, p, seed);
  };
  return c;
}

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;
  cs.push_back(lora_case("bias_p0", {6, 8}, 5, 4, true, 2.0, 0.0, 0));
  cs.push_back(lora_case("nobias_p0_3d", {2, 3, 8}, 5, 2, false, 0.5, 0.0, 0));
  // 160 elements of x at p = 0.1: about 16 dropped, so a wrong mask cannot pass unnoticed.
  cs.push_back(lora_case("bias_p0.1_3d", {2, 5, 16}, 7, 3, true, 1.5, 0.1, 1234));
  cs.push_back(lora_case("nobias_p0.1", {10, 16}, 6, 4, false, 0.25, 0.1, 99));
  cs.push_back(lora_case("bias_p0.5_r1", {3, 4, 12}, 9, 1, true, 1.0, 0.5, 7));

  const int64_t M = 8 * 256, in = 1024, out = 1024, r = 16;
  for (double p : {0.0, 0.1}) {
    OpCase c = lora_case(p > 0 ? "bench_2048x1024x1024_r16_p0.1" : "bench_2048x1024x1024_r16",
                         {M, in}, out, r, true, 2.0, p, 5);
    c.bench = true;
    c.flops = [=] { return 2.0 * M * in * out + 2.0 * M * in * r + 2.0 * M * r * out; };
    cs.push_back(c);
  }
  return cs;
}

OpTableEntry reg(cases());

}  // namespace
}  // namespace ftune::test
