// Op-table cases for the nn ops: embedding, layer_norm, rms_norm, rope, gelu, silu, swiglu.
// References are naive loops over f64 copies of the inputs, written from the formulas (HF
// semantics), not from the kernels.
#include <cmath>

#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;

InputSpec spec(const std::string& name, Shape shape, Fill fill = Fill::normal, double lo = -1.0,
               double hi = 1.0) {
  InputSpec s{name, std::move(shape), fill};
  s.lo = lo;
  s.hi = hi;
  return s;
}

template <class I>
InputSpec fixed_ids(const std::string& name, std::vector<I> v, Shape shape) {
  InputSpec s{name, shape, Fill::fixed};
  s.grad = false;
  s.make = [v, shape] { return Tensor::from_vector(v, shape); };
  return s;
}

std::vector<int64_t> ids_i64(const Tensor& t) { return t.to_vector<int64_t>(); }

Tensor ref_embedding(const Tensor& w, const Tensor& ids) {
  auto wv = w.to_vector<double>();
  auto id = ids_i64(ids);
  const int64_t D = w.size(1);
  std::vector<double> out;
  for (int64_t v : id)
    for (int64_t d = 0; d < D; ++d) out.push_back(wv[size_t(v * D + d)]);
  Shape os = ids.shape();
  os.push_back(D);
  return Tensor::from_vector(out, os);
}

// Biased variance, as torch.nn.LayerNorm; bias may be undefined.
Tensor ref_layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
  auto xv = x.to_vector<double>(), wv = w.to_vector<double>();
  std::vector<double> bv =
      b.defined() ? b.to_vector<double>() : std::vector<double>(wv.size(), 0.0);
  const size_t D = wv.size(), N = xv.size() / D;
  std::vector<double> out(xv.size());
  for (size_t r = 0; r < N; ++r) {
    double mu = 0, var = 0;
    for (size_t j = 0; j < D; ++j) mu += xv[r * D + j] / double(D);
    for (size_t j = 0; j < D; ++j) var += (xv[r * D + j] - mu) * (xv[r * D + j] - mu) / double(D);
    for (size_t j = 0; j < D; ++j)
      out[r * D + j] = (xv[r * D + j] - mu) / std::sqrt(var + eps) * wv[j] + bv[j];
  }
  return Tensor::from_vector(out, x.shape());
}

// LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight.
Tensor ref_rms_norm(const Tensor& x, const Tensor& w, double eps) {
  auto xv = x.to_vector<double>(), wv = w.to_vector<double>();
  const size_t D = wv.size(), N = xv.size() / D;
  std::vector<double> out(xv.size());
  for (size_t r = 0; r < N; ++r) {
    double ms = 0;
    for (size_t j = 0; j < D; ++j) ms += xv[r * D + j] * xv[r * D + j] / double(D);
    for (size_t j = 0; j < D; ++j) out[r * D + j] = xv[r * D + j] / std::sqrt(ms + eps) * wv[j];
  }
  return Tensor::from_vector(out, x.shape());
}

// HF apply_rotary_pos_emb: emb = cat(freqs, freqs), out = x * cos(emb) + rotate_half(x) * sin(emb),
// rotate_half(x) = cat(-x2, x1), inv_freq[i] = 1 / theta^(2i / D).
Tensor ref_rope(const Tensor& x, const Tensor& positions, double theta) {
  auto xv = x.to_vector<double>();
  auto pv = ids_i64(positions);
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  std::vector<double> out(xv.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const double pos = double(positions.dim() == 1 ? pv[size_t(t)] : pv[size_t(b * T + t)]);
      for (int64_t h = 0; h < H; ++h) {
        const double* xr = xv.data() + ((b * T + t) * H + h) * D;
        double* o = out.data() + ((b * T + t) * H + h) * D;
        for (int64_t i = 0; i < D; ++i) {
          const double freq = 1.0 / std::pow(theta, double(2 * (i % half)) / double(D));
          const double rot = i < half ? -xr[i + half] : xr[i - half];
          o[i] = xr[i] * std::cos(pos * freq) + rot * std::sin(pos * freq);
        }
      }
    }
  return Tensor::from_vector(out, x.shape());
}

template <class F>
Tensor map1(const Tensor& a, F f) {
  auto v = a.to_vector<double>();
  for (auto& x : v) x = f(x);
  return Tensor::from_vector(v, a.shape());
}

double ref_gelu(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
double ref_silu(double x) { return x / (1.0 + std::exp(-x)); }

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;
  // ------------------------------------------------------------------ embedding
  {
    OpCase c;
    c.op = "embedding";
    c.run = [](const V& v) { return ops::embedding(v[0], v[1]); };
    c.reference = [](const V& v) { return ref_embedding(v[0], v[1]); };
    // Repeated ids: their gradients must accumulate into the same row of dweight.
    c.variant = "repeated_ids_i64";
    c.inputs = {spec("weight", {7, 5}),
                fixed_ids<int64_t>("ids", {3, 0, 3, 6, 3, 1, 0, 6, 2, 3, 5, 3}, {2, 6})};
    cs.push_back(c);
    c.variant = "repeated_ids_i32";
    c.inputs = {spec("weight", {7, 5}), fixed_ids<int32_t>("ids", {4, 4, 0, 6, 4, 2, 2, 1}, {8})};
    cs.push_back(c);
    c.variant = "bench_V32000_D2048_4096ids";
    InputSpec ids{"ids", {4096}, Fill::index};
    ids.hi = 32000;
    ids.grad = false;
    c.inputs = {spec("weight", {32000, 2048}), ids};
    c.bench = true;
    cs.push_back(c);
  }
  // ------------------------------------------------------------------ layer_norm
  {
    OpCase c;
    c.op = "layer_norm";
    // x away from zero mean so that the centring matters.
    c.variant = "bias_3x4x16";
    c.inputs = {spec("x", {3, 4, 16}, Fill::uniform, -1.0, 3.0),
                spec("weight", {16}, Fill::uniform, 0.5, 1.5), spec("bias", {16})};
    c.run = [](const V& v) { return ops::layer_norm(v[0], v[1], v[2], 1e-5); };
    c.reference = [](const V& v) { return ref_layer_norm(v[0], v[1], v[2], 1e-5); };
    cs.push_back(c);
    c.variant = "nobias_5x24";
    c.inputs = {spec("x", {5, 24}, Fill::uniform, -2.0, 1.0),
                spec("weight", {24}, Fill::uniform, -1.5, 1.5)};
    c.run = [](const V& v) { return ops::layer_norm(v[0], v[1], Tensor(), 1e-5); };
    c.reference = [](const V& v) { return ref_layer_norm(v[0], v[1], Tensor(), 1e-5); };
    cs.push_back(c);
    // Variance of ~1e-4 against eps 1e-3: a misplaced eps shows.
    c.variant = "eps_dominant_4x12";
    c.inputs = {spec("x", {4, 12}, Fill::uniform, -0.02, 0.02),
                spec("weight", {12}, Fill::uniform, 0.5, 1.5), spec("bias", {12})};
    c.run = [](const V& v) { return ops::layer_norm(v[0], v[1], v[2], 1e-3); };
    c.reference = [](const V& v) { return ref_layer_norm(v[0], v[1], v[2], 1e-3); };
    cs.push_back(c);
    c.variant = "bench_4096x4096";
    c.inputs = {spec("x", {4096, 4096}), spec("weight", {4096}), spec("bias", {4096})};
    c.run = [](const V& v) { return ops::layer_norm(v[0], v[1], v[2], 1e-5); };
    c.bench = true;
    cs.push_back(c);
  }
  // ------------------------------------------------------------------ rms_norm
  {
    OpCase c;
    c.op = "rms_norm";
    c.variant = "3x5x16";
    c.inputs = {spec("x", {3, 5, 16}), spec("weight", {16}, Fill::uniform, 0.5, 1.5)};
    c.run = [](const V& v) { return ops::rms_norm(v[0], v[1], 1e-6); };
    c.reference = [](const V& v) { return ref_rms_norm(v[0], v[1], 1e-6); };
    cs.push_back(c);
    c.variant = "eps_dominant_6x10";
    c.inputs = {spec("x", {6, 10}, Fill::uniform, -0.03, 0.03),
                spec("weight", {10}, Fill::uniform, -1.0, 1.0)};
    c.run = [](const V& v) { return ops::rms_norm(v[0], v[1], 1e-3); };
    c.reference = [](const V& v) { return ref_rms_norm(v[0], v[1], 1e-3); };
    cs.push_back(c);
    c.variant = "bench_4096x4096";
    c.inputs = {spec("x", {4096, 4096}), spec("weight", {4096})};
    c.run = [](const V& v) { return ops::rms_norm(v[0], v[1], 1e-6); };
    c.bench = true;
    cs.push_back(c);
  }
  // ------------------------------------------------------------------ rope
  {
    auto rope_case = [&](const std::string& variant, Shape xs, InputSpec pos, double theta) {
      OpCase c;
      c.op = "rope";
      c.variant = variant;
      c.inputs = {spec("x", xs), pos};
      c.run = [theta](const V& v) { return ops::rope(v[0], v[1], theta); };
      c.reference = [theta](const V& v) { return ref_rope(v[0], v[1], theta); };
      return c;
    };
    // [B, T] positions: a shuffled 0..T-1 row and a row of large values.
    cs.push_back(
        rope_case("bt_positions_theta1e4", {2, 6, 3, 8},
                  fixed_ids<int64_t>("positions",
                                     {3, 0, 5, 1, 4, 2, 1000, 1003, 997, 1500, 1024, 999}, {2, 6}),
                  10000.0));
    // [T] positions shared by the batch, i32, up to 32k.
    cs.push_back(rope_case("t_positions_i32_theta5e5", {3, 6, 2, 16},
                           fixed_ids<int32_t>("positions", {4096, 0, 32000, 17, 9999, 123}, {6}),
                           500000.0));
    cs.push_back(rope_case("t_positions_shuffled_theta1e4", {2, 5, 4, 6},
                           fixed_ids<int64_t>("positions", {4, 1, 3, 0, 2}, {5}), 10000.0));
    std::vector<int64_t> ar(512);
    for (int64_t i = 0; i < 512; ++i) ar[size_t(i)] = i;
    OpCase b = rope_case("bench_8x512x32x128", {8, 512, 32, 128},
                         fixed_ids<int64_t>("positions", ar, {512}), 500000.0);
    b.bench = true;
    cs.push_back(b);
  }
  // ------------------------------------------------------------------ activations
  {
    OpCase c;
    c.op = "gelu";
    c.variant = "5x37";
    c.inputs = {spec("x", {5, 37}, Fill::uniform, -6.0, 6.0)};
    c.run = [](const V& v) { return ops::gelu(v[0]); };
    c.reference = [](const V& v) { return map1(v[0], ref_gelu); };
    cs.push_back(c);
    c.variant = "bench_8x512x11008";
    c.inputs = {spec("x", {8, 512, 11008})};
    c.bench = true;
    cs.push_back(c);
  }
  {
    OpCase c;
    c.op = "silu";
    c.variant = "5x37";
    c.inputs = {spec("x", {5, 37}, Fill::uniform, -8.0, 8.0)};
    c.run = [](const V& v) { return ops::silu(v[0]); };
    c.reference = [](const V& v) { return map1(v[0], ref_silu); };
    cs.push_back(c);
    c.variant = "bench_8x512x11008";
    c.inputs = {spec("x", {8, 512, 11008})};
    c.bench = true;
    cs.push_back(c);
  }
  {
    OpCase c;
    c.op = "swiglu";
    c.variant = "4x3x29";
    c.inputs = {spec("gate", {4, 3, 29}, Fill::uniform, -8.0, 8.0), spec("up", {4, 3, 29})};
    c.run = [](const V& v) { return ops::swiglu(v[0], v[1]); };
    c.reference = [](const V& v) {
      auto g = v[0].to_vector<double>(), u = v[1].to_vector<double>();
      for (size_t i = 0; i < g.size(); ++i) g[i] = ref_silu(g[i]) * u[i];
      return Tensor::from_vector(g, v[0].shape());
    };
    cs.push_back(c);
    c.variant = "bench_8x512x11008";
    c.inputs = {spec("gate", {8, 512, 11008}), spec("up", {8, 512, 11008})};
    c.bench = true;
    cs.push_back(c);
  }
  return cs;
}

OpTableEntry entry(cases());

}  // namespace
}  // namespace ftune::test
