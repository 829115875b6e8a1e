// Next-token selection from logits (the semantics are documented in models/sampling.h, which wraps
// these): temperature -> top_k -> top_p, then an inverse-CDF draw in id order with one uniform per
// row; temperature 0 is greedy (argmax, first maximum wins).
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace ftune::kernels {

struct SampleParams {
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
};

namespace cpu {

// One row of f32 logits [vocab]; u in [0, 1) (ignored when greedy). Throws "[sample] ..." on NaN
// logits, and when sampling on +inf logits or a row that is entirely -inf.
int32_t sample_row(const float* logits, int64_t vocab, const SampleParams& p, float u);
int32_t argmax(const float* logits, int64_t vocab);
// The unnormalized weights sample_row draws from (0 = excluded), their sum returned (f64, added in
// id order). temperature > 0.
double sample_weights(const float* logits, int64_t vocab, const SampleParams& p,
                      std::vector<double>& w);

}  // namespace cpu

// CUDA twin (kernels/cuda/sampling.cu): one CTA per row of logits [b, v] (device, f32/bf16/f16),
// the same selection with the row's uniform philox_uniform(seed, stream, step), stream =
// streams[r] (device u64 [b]) or r when streams is null. The weights are f64 as on the CPU, so
// the GPU picks the CPU's token unless u * total falls within f64 rounding of a cumulative sum.
// out: device i32 [b]; a row the CPU would reject gets a negative code instead (see below).
namespace cuda {

constexpr int32_t kSampleNaN = -1;      // a NaN logit
constexpr int32_t kSamplePosInf = -2;   // a +inf logit while sampling
constexpr int32_t kSampleAllNegInf = -3;  // every logit -inf while sampling

void sample_tokens(const void* logits, DType dt, int64_t b, int64_t v, const SampleParams& p,
                   uint64_t seed, uint64_t step, const uint64_t* streams, int32_t* out);

}  // namespace cuda
}  // namespace ftune::kernels
