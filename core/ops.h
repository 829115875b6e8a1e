// The ops API. Every op checks its inputs (throwing ftune::Error naming the op, shapes and dtypes),
// dispatches on device to kernels/cpu or kernels/cuda, and records a Node when an input requires
// grad. CPU computes in f32 (or f64 for gradient checks).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/tensor.h"

namespace ftune::ops {

// ---------------------------------------------------------------- elementwise (core/ops/elementwise.cpp)
// Binary ops broadcast numpy-style; both inputs must share dtype and device.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& a, double s);
Tensor mul_scalar(const Tensor& a, double s);  // "scale"
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor sigmoid(const Tensor& a);
Tensor relu(const Tensor& a);
Tensor square(const Tensor& a);
Tensor where_mask(const Tensor& mask_b8, const Tensor& a, double fill);  // mask ? a : fill
// In place, never recorded (optimizer, gradient accumulation): a += alpha * b, same shape. a may
// be a strided view whose elements are distinct (a slice of a wider tensor; not expand's).
void add_(Tensor& a, const Tensor& b, double alpha = 1.0);
void mul_(Tensor& a, double s);
Tensor cast(const Tensor& a, DType dt);  // differentiable between float dtypes

// ---------------------------------------------------------------- reductions (core/ops/reduce.cpp)
Tensor sum(const Tensor& a);  // all elements -> scalar (shape {})
Tensor sum(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, int64_t dim, bool keepdim = false);
Tensor amax(const Tensor& a, int64_t dim, bool keepdim = false);  // not differentiable
Tensor argmax(const Tensor& a, int64_t dim);                      // i64, not differentiable
Tensor sum_to(const Tensor& a, const Shape& shape);  // reduce broadcast dims (backward of broadcasting)
double max_abs_diff(const Tensor& a, const Tensor& b);  // test helper, any float dtypes

// ---------------------------------------------------------------- matmul (core/ops/matmul.cpp)
// a [..., m, k] @ b [..., k, n]; b may be 2-D and is then shared by every batch. OpenBLAS on CPU.
Tensor matmul(const Tensor& a, const Tensor& b);
// x [..., in] @ w[out, in]^T + b[out]
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b = Tensor());

// ---------------------------------------------------------------- shape ops (core/ops/shape.cpp)
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);

// ---------------------------------------------------------------- nn ops (core/ops/nn.cpp)
// weight [V, D], ids (i32|i64) [...] -> [..., D]. Backward scatters into dweight.
Tensor embedding(const Tensor& weight, const Tensor& ids);
// Normalizes over the last dim. weight/bias [D]; bias may be undefined.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps);
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps);
// x [B, T, H, D]; positions (i32|i64) [B, T] or [T]; HF rotate-half convention:
// out = x * cos + rotate_half(x) * sin, inv_freq[i] = theta^(-2i/D).
Tensor rope(const Tensor& x, const Tensor& positions, double theta);
Tensor gelu(const Tensor& x);  // tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh")
Tensor silu(const Tensor& x);
Tensor swiglu(const Tensor& gate, const Tensor& up);  // silu(gate) * up

// ---------------------------------------------------------------- softmax and losses (core/ops/loss.cpp)
Tensor softmax(const Tensor& x);      // over the last dim
Tensor log_softmax(const Tensor& x);  // over the last dim

enum class Reduction { mean, sum, none };
// logits [N, V] (any leading dims flatten into N), targets i32|i64 [N]; rows whose target is
// ignore_index are skipped. mean divides by the number of counted rows (0 when none).
// Never materialises the softmax: the vocabulary is processed in chunks with an online max/sum.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                     Reduction reduction = Reduction::mean);
// cross_entropy(linear(h, w), targets, ignore_index, reduction) without the [N, V] logits: the
// rows go in chunks of chunk_rows (0: about 1 GiB of logits each), each chunk's logits, loss
// and gradient formed and dropped at once; dh and dW (accumulated over the chunks by the GEMM,
// in f32 for 16-bit weights on the GPU) are computed in the forward and scaled by the upstream
// gradient in the backward (which runs once: no retain_graph). h [..., d], w [V, d] (an LM
// head: no bias), targets [N]. reduction mean or sum. For the LM loss of a large vocabulary
// (Qwen2.5's 151936: 2.5 GB of bf16 logits at 8192 tokens, and as much for their gradient).
// In f16 the gradients are formed before any loss scale reaches them (small values flush to 0):
// under loss scaling take the composition. argmax, when given, receives each row's argmax over
// the vocabulary (i64 [N], ties to the lowest index, as argmax(linear(h, w), -1) up to the
// logits' last bits: on the GPU a chunk's GEMM may round differently from the whole one's):
// evaluation's token accuracy, also without the whole logits.
Tensor linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                            int64_t ignore_index = -100, Reduction reduction = Reduction::mean,
                            int64_t chunk_rows = 0, Tensor* argmax = nullptr);
// The local halves of a cross-entropy over logits split along the vocabulary, for
// parallel::vocab_parallel_cross_entropy (which reduces the row statistics over the ranks).
// Not recorded by autograd. logits [N, V_r] (contiguous) are one shard of the vocabulary's columns;
// local_targets (i64 [N], on the logits' device) hold each row's target column in this shard,
// ignore_index, or any other value outside [0, V_r) when the target is in another shard.
// stat [N, 2] gets each row's (max, log sum exp(x - max)) over the shard and nll [N] gets
// lse - x_target for the rows whose target is here, 0 for the others; ignored rows get 0 in both.
// f32 on the GPU (any float logits), the logits' dtype on the CPU.
struct ShardNll {
  Tensor stat, nll;
};
ShardNll cross_entropy_shard_forward(const Tensor& logits, const Tensor& local_targets,
                                     int64_t ignore_index);
// d(scale * g_i * nll_i)/dlogits on the shard, given the whole vocabulary's statistics `stat`
// [N, 2] (a row's (m, ls), probabilities exp(x - m - ls); the layout and dtype of the forward's):
// each row's softmax over all the shards, minus the one-hot where the target is in this shard.
// g [N] with g_stride 1, or a scalar with g_stride 0. Ignored rows get 0.
Tensor cross_entropy_shard_backward(const Tensor& logits, const Tensor& local_targets,
                                    const Tensor& stat, const Tensor& g, int64_t g_stride,
                                    double scale, int64_t ignore_index);
// log p(target) per row [N], for RL; rows with target ignore_index get 0.
Tensor token_logprobs(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100);
// entropy of softmax(logits) per row [N].
Tensor entropy(const Tensor& logits);

enum class KLKind { forward, reverse, jsd };
// Per-row divergence [N] between student and teacher distributions softmax(logits / temperature).
// forward: KL(teacher || student); reverse: KL(student || teacher);
// jsd: beta * KL(teacher || m) + (1 - beta) * KL(student || m), m = beta * teacher + (1-beta) * student.
// As in TRL's generalized JSD, jsd at beta = 0 is forward and at beta = 1 reverse KL (the formula
// itself tends to 0 there); beta outside [0, 1] throws. No temperature^2 factor is applied.
// Differentiable in both arguments.
Tensor kl_div(const Tensor& student_logits, const Tensor& teacher_logits, KLKind kind,
              double beta = 0.5, double temperature = 1.0);

// ---------------------------------------------------------------- attention (core/ops/attention.cpp)
struct AttentionOptions {
  bool causal = true;
  double scale = 0.0;  // 0 -> 1/sqrt(head_dim)
  // Packed variable-length sequences (flash-attn varlen convention): q is [1, Nq, H, D] or [Nq, H, D]
  // and cu_seqlens_q[i]..cu_seqlens_q[i+1] are the tokens of sequence i (i32). With causal, query
  // r of a sequence sees keys 0..r + (len_k - len_q) (bottom-right aligned, as for a KV cache).
  Tensor cu_seqlens_q, cu_seqlens_k;  // undefined: every batch row is one sequence
};
// q [B, Tq, H, D], k/v [B, Tk, Hkv, D] with H % Hkv == 0 (grouped-query) -> [B, Tq, H, D].
// Blocked with an online softmax: memory O(T) per row block; backward recomputes P from the
// saved logsumexp.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v,
                 const AttentionOptions& opt = AttentionOptions());

// Which fused attention runs GPU tensors (process-wide; CPU tensors always use the CPU kernel):
// "ftune" (kernels/cuda/attention.cu, the default) or "cudnn" (cuDNN's flash attention,
// kernels/cuda/attention_cudnn.cpp; its own forward and backward). Under "cudnn", a call cuDNN's
// graph does not serve (f32, head_dim not a multiple of 8 up to 128, packed variable-length
// sequences, causal with Tq != Tk) runs ftune's kernel; the first such fallback of each reason
// is reported once on stderr. Setting "cudnn" throws in a build without cuDNN; any other name
// throws. Not thread-safe against concurrent attention calls.
void set_attention_backend(const std::string& name);
const std::string& attention_backend();
bool cudnn_attention_built();  // this build has the cudnn backend (FTUNE_HAVE_CUDNN)

// ---------------------------------------------------------------- lora (core/ops/lora.cpp)
// y = x W^T + b + scale * (dropout(x) A^T) B^T. W [out, in] and b are frozen (no gradient);
// A [r, in], B [out, r]. The dropout mask comes from the counter-based RNG (seed), so backward
// regenerates it instead of saving it. in_offset / in_full: x holds input features
// [in_offset, in_offset + in) of in_full (a row-parallel shard): the mask is then that slice of
// the full input's mask (kernels/lora.h); in_full 0 means x is the whole input.
Tensor lora_linear(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& lora_a,
                   const Tensor& lora_b, double scale, double dropout = 0.0, uint64_t seed = 0,
                   int64_t in_offset = 0, int64_t in_full = 0);

// One segment of lora_linear_multi: `out` rows of the fused weight, with an adapter (a, b both
// defined) or none (both undefined).
struct LoraSegment {
  int64_t out = 0;
  Tensor a, b;  // A [r, in], B [out, r]
  double scale = 0, dropout = 0;
  uint64_t seed = 0;
};
// Several lora_linear on one input, batched (the attention's q, k, v; core/ops/lora_multi.cpp):
// W [N, in] = [W_0; W_1; ...] (segment i's rows), b [N] or undefined, y [..., N] whose columns of
// segment i are x W_i^T + b_i + scale_i (dropout_i(x) A_i^T) B_i^T: one base GEMM, one dx GEMM
// through W. Without dropout the A GEMMs (forward x A^T, backward du^T x and du A) run as one
// against [A_0; A_1; ...]; with dropout each adapter keeps its own mask (lora_linear's, from its
// seed, over the whole input), so the adapters run one by one. Gradients: x, every A and B; W and
// b are frozen. Equal to lora_linear per segment up to f32 summation order.
Tensor lora_linear_multi(const Tensor& x, const Tensor& w, const Tensor& b,
                         const std::vector<LoraSegment>& segs);

}  // namespace ftune::ops
