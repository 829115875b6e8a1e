#include "models/sampling.h"

#include <cmath>
#include <exception>

#include "core/autograd.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/sampling.h"

namespace ftune {

namespace {

kernels::SampleParams params_of(const SamplingOptions& o) {
  return {o.temperature, o.top_k, o.top_p};
}

// GPU logits: the CUDA twin picks the tokens on the device (the same f64 weights and Philox
// uniforms as the CPU path); only the [B] ids come back, and a rejected row throws like the CPU.
std::vector<int32_t> sample_tokens_cuda(const Tensor& logits, const SamplingOptions& opt,
                                        uint64_t step, std::span<const uint64_t> streams) {
#ifdef FTUNE_HAVE_CUDA
  NoGradGuard ng;
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  Tensor x = logits.detach().contiguous();
  if (x.dtype() == DType::f64) x = x.to(DType::f32);
  Tensor st;  // u64 stream ids, carried as i64 bits
  if (!streams.empty())
    st = Tensor::from_vector(std::vector<int64_t>(streams.begin(), streams.end()), {batch})
             .to(logits.device());
  Tensor o = Tensor::empty({batch}, DType::i32, logits.device());
  kernels::cuda::sample_tokens(
      x.raw_data(), x.dtype(), batch, vocab, params_of(opt), opt.seed, step,
      st.defined() ? static_cast<const uint64_t*>(st.raw_data()) : nullptr, o.data<int32_t>());
  std::vector<int32_t> out = o.to(Device::cpu()).to_vector<int32_t>();
  for (int64_t r = 0; r < batch; ++r) {
    const int32_t t = out[size_t(r)];
    FTUNE_CHECK(t != kernels::cuda::kSampleNaN, "[sample] NaN logit (row ", r, ")");
    FTUNE_CHECK(t != kernels::cuda::kSamplePosInf, "[sample] +inf logit (the softmax is undefined; ",
                "use temperature 0 for greedy) (row ", r, ")");
    FTUNE_CHECK(t != kernels::cuda::kSampleAllNegInf,
                "[sample] every logit of the row is -inf: nothing to sample (row ", r, ")");
  }
  return out;
#else
  (void)logits, (void)opt, (void)step, (void)streams;
  FTUNE_THROW("[sample] GPU logits in a build without CUDA");
#endif
}

}  // namespace

void SamplingOptions::validate() const {
  FTUNE_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "[sample] temperature must be >= 0 (0 is greedy), got ", temperature);
  FTUNE_CHECK(top_k >= 0, "[sample] top_k must be >= 0 (0 is off), got ", top_k);
  FTUNE_CHECK(top_p >= 0.0 && top_p <= 1.0, "[sample] top_p must be in [0, 1] (1 is off), got ",
              top_p);
}

int32_t sample_row(const float* logits, int64_t vocab, const SamplingOptions& opt, float u) {
  opt.validate();
  return kernels::cpu::sample_row(logits, vocab, params_of(opt), u);
}

std::vector<double> sampling_distribution(const float* logits, int64_t vocab,
                                          const SamplingOptions& opt) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  opt.validate();
  std::vector<double> out(size_t(vocab), 0.0);
  if (opt.greedy()) {
    out[size_t(kernels::cpu::argmax(logits, vocab))] = 1.0;
    return out;
  }
  const double total = kernels::cpu::sample_weights(logits, vocab, params_of(opt), out);
  for (double& q : out) q /= total;
  return out;
}

std::vector<int32_t> sample_tokens(const Tensor& logits, const SamplingOptions& opt, uint64_t step,
                                   std::span<const uint64_t> streams) {
  FTUNE_CHECK(logits.defined(), "[sample] logits are undefined");
  FTUNE_CHECK(logits.dim() == 2, "[sample] logits must be [B, V], got ", logits.desc());
  FTUNE_CHECK(is_floating(logits.dtype()), "[sample] logits must be a float dtype, got ",
              logits.desc());
  opt.validate();
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary: ", logits.desc());
  FTUNE_CHECK(streams.empty() || int64_t(streams.size()) == batch, "[sample] ", streams.size(),
              " streams for ", batch, " rows");
  if (logits.device().is_cuda()) return sample_tokens_cuda(logits, opt, step, streams);
  Tensor x;
  {
    NoGradGuard ng;
    x = logits.detach().to(Device::cpu()).to(DType::f32).contiguous();
  }
  const float* data = x.data<float>();
  std::vector<int32_t> out(static_cast<size_t>(batch));
  std::exception_ptr err;
  int64_t err_row = batch;  // report the lowest failing row, whatever the thread schedule
#pragma omp parallel for schedule(static) if (batch > 1 && !opt.greedy())
  for (int64_t r = 0; r < batch; ++r) {
    try {
      const uint64_t stream = streams.empty() ? uint64_t(r) : streams[size_t(r)];
      const float u = opt.greedy() ? 0.0f : philox_uniform(opt.seed, stream, step);
      out[size_t(r)] = sample_row(data + r * vocab, vocab, opt, u);
    } catch (const std::exception& e) {
#pragma omp critical(ftune_sample_error)
      if (r < err_row) {
        err_row = r;
        err = std::make_exception_ptr(Error(str_cat(e.what(), " (row ", r, ")")));
      }
    }
  }
  if (err) std::rethrow_exception(err);
  return out;
}

}  // namespace ftune
