// Fused scaled-dot-product attention (FlashAttention-2 algorithm) on the CPU.
//
// Layout. Every batch row or packed sequence is described by an AttnSeq over flat token arrays:
//   q, out, dout, dq  [Nq, H, D]    (a [B, Tq, H, D] batch is Nq = B * Tq tokens)
//   k, v, dk, dv      [Nk, Hkv, D]
//   lse               [H, Nq]       logsumexp of the scaled scores of each query row; +inf for a
//                                   row that sees no key (its output is 0, its gradient 0)
// All contiguous. Sequence s owns query tokens q_start..q_start+len_q and key tokens
// k_start..k_start+len_k; tokens never attend across sequences. Padding is expressed by giving
// the pad tokens a sequence of their own (e.g. cu_seqlens {0, 5, 8} for 5 real + 3 pad tokens):
// they then cost a tiny block and never leak into the real tokens.
//
// Grouped-query: query head h reads kv head h / (H / Hkv); K and V are never expanded.
// Causal is bottom-right aligned: query r of a sequence sees keys j <= r + len_k - len_q (a KV
// cache of len_k - len_q earlier tokens in front of the queries).
//
// Memory: per thread O(block_q * block_k + block * D) scratch; the [T, T] scores never exist.
// The backward recomputes P block by block from q, k and lse.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace ftune::kernels::cpu {

struct AttnSeq {
  int64_t q_start = 0, len_q = 0;
  int64_t k_start = 0, len_k = 0;
};

struct AttnParams {
  int64_t num_heads = 1, num_kv_heads = 1, head_dim = 1;
  int64_t nq = 0, nk = 0;  // total query / key tokens
  double scale = 1.0;      // applied to q.k
  bool causal = true;
  // Tile sizes (query rows, key columns). Defaults are tuned for D = 64..128 on AVX-512/AVX2;
  // tests shrink them to exercise ragged tiles.
  int64_t block_q = 64, block_k = 128;
};

// out [Nq, H, D] and lse [H, Nq] are written in full.
template <class T>
void attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const T* q,
                       const T* k, const T* v, T* out, T* lse);

// Gradients from dout [Nq, H, D]. dq, dk, dv are written in full (no accumulation into existing
// values); any of them may be null when that gradient is not needed.
template <class T>
void attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const T* q,
                        const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq,
                        T* dk, T* dv);

}  // namespace ftune::kernels::cpu

// The CUDA twin (kernels/cuda/attention.cu): the same layout, sequences and parameters. q, k, v,
// out, dout, dq, dk, dv are device buffers of dtype dt (f32, bf16 or f16); lse [H, Nq] is f32 on
// the GPU whatever dt is (the statistic the backward recomputes P from). block_q / block_k are
// ignored: the kernels pick their own tiles. Paths: bf16/f16 with head_dim 64 or 128 run the
// tensor-core (mma.sync) kernels; any other dtype or head_dim <= 256 a simple tiled kernel; a
// forward whose sequences all have at most one query (decoding over a KV cache) a split-key
// decode kernel. Launched on the current stream.
namespace ftune::kernels::cuda {

using cpu::AttnParams;
using cpu::AttnSeq;

void attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                       const void* q, const void* k, const void* v, void* out, float* lse);

// dq, dk, dv are written in full; any may be null. Deterministic: no float atomics.
void attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                        const void* q, const void* k, const void* v, const void* out,
                        const float* lse, const void* dout, void* dq, void* dk, void* dv);

// Benchmark hook: query rows per CTA of the tensor-core forward in blocks of 64 (1 or 2; 0: 1;
// -1, the default, picks per call: 2 for head_dim 128, and for head_dim 64 when the longest
// sequence has at least 1024 queries). Same results either way.
void set_attention_fwd_row_blocks(int n);

// Benchmark / test hooks: the forward, and the deterministic backward, on Hopper's warpgroup MMAs
// (wgmma) instead of mma.sync, for bf16/f16 at head_dim 64 and 128 (the forward with the same row
// blocks per CTA as above; the backward with 64-key dK/dV and 64-row dQ CTAs, the dK/dV split over
// query heads as set_attention_bwd_split_heads says; without determinism the backward keeps the
// atomic-dQ mma.sync kernel).
//   -1 (the default): as the environment variable FTUNE_ATTN_WGMMA says ("1" or "all": both
//      passes, "fwd", "bwd", "2": both passes as 2 below; unset: neither, until a GPU run has
//      measured them);
//    0: off;  1: on;
//    2: on; the forward pipelined (each warpgroup overlaps tile j's softmax with tile j - 1's P V
//       product, K and V double-buffered), the backward with two warpgroups per CTA (128 keys of
//       dK/dV, 128 rows of dQ, sharing each streamed Q/dO or K/V tile).
// Taken only where attention_wgmma_available() (both passes): a build with sm_90a in its CUDA
// architectures (the default) and a compute capability 9.0 GPU (H100/H200). Same results up to
// the f32 summation order inside the MMAs. Process-wide, not thread-safe.
void set_attention_fwd_wgmma(int v);
void set_attention_bwd_wgmma(int v);
bool attention_wgmma_available();

// Test hook, the layouts under the wgmma kernels: one warpgroup MMA on [64][64] row-major matrices
// a and b (rounded to bf16), reduction step kk (0..3: columns, or rows of a transposed b, 16 kk ..
// 16 kk + 15), with the kernels' tile loader, descriptors, A-fragment and accumulator layouts.
// which 0: D = A_kk B_kk^T, A in registers, B K-major (the forward's S = Q K^T); 1: D = A_kk
// B[16 kk .. +15][:], B transposed (O += P V); 2: as 0 with A from shared memory (the
// backward's S^T = K Q^T). Returns D [64][64]. Needs attention_wgmma_available().
std::vector<float> wgmma_probe(int which, int kk, const std::vector<float>& a,
                               const std::vector<float>& b);

// Benchmark hook: the tensor-core backward's variant. -1 (the default): 1 at head_dim 64, 4 at
// head_dim 128 (the fastest measured on an H200). 0: as described above.
// 1: more resident CTAs per SM (dK/dV at head_dim 64 capped at 168 registers; dQ at head_dim 128
// with single K/V buffers). 2: with ftune::cuda::deterministic() off, a leaner atomic dQ inside
// the dK/dV kernel (dS fragments read once, float2 atomics); with it on, as 0. 3: as 1, but dK/dV
// at head_dim 64 by 128-key CTAs, 32 keys per warp (a third fewer shared-memory reads per MMA).
// 4: as 3, and dQ by 128-row CTAs (32 rows per warp) over 32-key tiles. 5: as 4, that dQ kernel
// at head_dim 64 capped at 168 registers (3 CTAs per SM). 1-5 compute Delta = rowsum(dO * O)
// with 16-byte loads. Process-wide, not thread-safe.
void set_attention_bwd_variant(int v);

// Benchmark / test hook: the tensor-core dK/dV split over query heads under grouped-query
// attention (deterministic dQ only; the dK/dV kernels of every variant at head_dim 128, of
// variants 0-2 at 64). -1 (the default): split when the kv heads give fewer than 4 CTAs per SM; 0:
// never; 1: whenever H > Hkv. Each query head's CTAs write their share of dK/dV in f32, summed
// per group in head order afterwards. Same results up to f32 summation order. Process-wide.
void set_attention_bwd_split_heads(int v);

}  // namespace ftune::kernels::cuda

// cuDNN's fused flash attention (kernels/cuda/attention_cudnn.cpp), the `attention.backend:
// cudnn` alternative to the kernels above and the baseline they are measured against. Built only
// when CMake found cuDNN 9 (FTUNE_HAVE_CUDNN); without it these throw. The same layout, sequences
// and parameters as attention_forward / attention_backward; lse is [H, Nq] f32, the layout above,
// so either backward could consume either forward's output (the ops layer keeps them paired).
// Served: dt bf16 or f16; head_dim a multiple of 8 up to 128; grouped-query; a batch of
// equal-length sequences (the [B, T, H, D] case: seqs[b] = {b*Tq, Tq, b*Tk, Tk}); causal only with
// Tq == Tk. cudnn_attention_unsupported says why a call is not served ("" when it is); packed
// variable-length sequences are among them (the ops layer then runs ftune's kernel).
// The cuDNN graph per shape is built once and cached (per thread and device); the workspace comes
// from the caching allocator; execution is on the current stream. The backward accumulates dQ with
// atomics inside cuDNN: it is not bitwise deterministic, unlike attention_backward.
namespace ftune::kernels::cuda {

std::string cudnn_attention_unsupported(const AttnParams& p, const std::vector<AttnSeq>& seqs,
                                        DType dt);
void cudnn_attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                             const void* q, const void* k, const void* v, void* out, float* lse);
void cudnn_attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                              const void* q, const void* k, const void* v, const void* out,
                              const float* lse, const void* dout, void* dq, void* dk, void* dv);

}  // namespace ftune::kernels::cuda
