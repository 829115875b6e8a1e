// Fused LoRA linear: y = x W^T + b + scale * (drop(x) A^T) B^T, and its backward.
// Shapes (row-major, contiguous): x [M, in], W [out, in], b [out], A [r, in], B [out, r],
// u = drop(x) A^T [M, r], y [M, out]. W and b are frozen: backward gives dx, dA, dB only.
#pragma once
#include <cstdint>

namespace ftune::kernels {

// Dropout mask rule, shared by the CPU and CUDA kernels and the test reference: element i of x
// (row-major flat index into x viewed [M, in]) is dropped iff
// philox_uniform(seed, kLoraDropoutStream, i) < p (compared in double); kept ones scale by 1/(1-p).
// Under tensor parallelism x may be a column slice of the full input: LoraMaskCols says where, and
// element [row, j] then draws index row * full + offset + j, the index of its element in the full
// input, so each rank's mask is exactly its slice of the one-process mask.
inline constexpr uint64_t kLoraDropoutStream = 0x10a0d0b0;

// x [M, width] holds columns [offset, offset + width) of a [M, full] input. The default (full 0)
// means x is the whole input (flat indices, as above); so does offset 0 with full == width.
struct LoraMaskCols {
  int64_t width = 0, offset = 0, full = 0;
  bool whole() const { return full == 0 || (offset == 0 && full == width); }
};

// in_offset / in_full: x's columns in the full input of a row-parallel layer (for the dropout
// mask only; see LoraMaskCols). in_full 0: x is the whole input.
struct LoraDims {
  int64_t m = 0, in = 0, out = 0, r = 0;
  int64_t in_offset = 0, in_full = 0;
  LoraMaskCols mask_cols() const { return {in, in_offset, in_full}; }
};

namespace cpu {

// out = dropout(x) over n elements (x and out may alias). p in [0, 1). With cols not whole, n is
// a multiple of cols.width (rows of x) and the mask is the full input's slice (LoraMaskCols).
template <class T>
void lora_dropout(const T* x, T* out, int64_t n, double p, uint64_t seed,
                  const LoraMaskCols& cols = {});
// acc += dropout(t): the backward of dropout, accumulated into acc.
template <class T>
void lora_dropout_accumulate(T* acc, const T* t, int64_t n, double p, uint64_t seed,
                             const LoraMaskCols& cols = {});
// keep[i] = 1 where element i is kept, 0 where dropped.
void lora_dropout_keep(uint8_t* keep, int64_t n, double p, uint64_t seed,
                       const LoraMaskCols& cols = {});

// Forward. bias may be null. xd is [M, in] scratch, used (and only needed) when p > 0.
// Writes u [M, r] (saved for dB) and y [M, out].
template <class T>
void lora_forward(const LoraDims& d, const T* x, const T* w, const T* bias, const T* a, const T* b,
                  T scale, double p, uint64_t seed, T* xd, T* u, T* y);

// Backward from g [M, out]. Outputs dx [M, in], da [r, in], db [out, r] may each be null (not
// needed); the inputs only they use may then be null too (x for da, w and a for dx, u for db).
// Scratch: du [M, r] when dx or da; xd [M, in] when p > 0 and (dx or da); keep [M, in] bytes
// when p > 0 and both dx and da.
template <class T>
void lora_backward(const LoraDims& d, const T* g, const T* x, const T* w, const T* a, const T* b,
                   const T* u, T scale, double p, uint64_t seed, T* du, T* xd, uint8_t* keep, T* dx,
                   T* da, T* db);

}  // namespace cpu

// The GPU twins (kernels/cuda/lora.cu), T = float, bf16 or f16: the same mask, shapes and
// contracts as above. GEMMs run on cuBLASLt with f32 accumulation (the bias in the base GEMM's
// epilogue). With dropout, bf16/f16 and r <= 64 the low-rank GEMMs are tensor-core kernels that
// draw the mask as they read x (lora_down_fused / lora_up_fused below: drop(x) is never written);
// elsewhere the dropout passes are one vectorized kernel each. FTUNE_LORA_FUSED=0 turns the
// fused kernels off, =1 uses them without dropout too (read per call). scale is f32 (for
// T = float the signatures are exactly the CPU's). keep is not used on the GPU (each pass
// redraws the mask, cheaper there than a byte mask in memory) and may be null. xd may be null
// too: where the unfused path needs drop(x), it then takes a scratch buffer of its own.
namespace cuda {

template <class T>
void lora_dropout(const T* x, T* out, int64_t n, double p, uint64_t seed,
                  const LoraMaskCols& cols = {});
template <class T>
void lora_dropout_accumulate(T* acc, const T* t, int64_t n, double p, uint64_t seed,
                             const LoraMaskCols& cols = {});
template <class T>
void lora_forward(const LoraDims& d, const T* x, const T* w, const T* bias, const T* a, const T* b,
                  float scale, double p, uint64_t seed, T* xd, T* u, T* y);
template <class T>
void lora_backward(const LoraDims& d, const T* g, const T* x, const T* w, const T* a, const T* b,
                   const T* u, float scale, double p, uint64_t seed, T* du, T* xd, uint8_t* keep,
                   T* dx, T* da, T* db);

// The fused low-rank GEMMs, also used by lora_linear_multi (core/ops/lora_multi.cpp). Each
// returns false, launching nothing, where it does not apply: T = float, r > 64, in % 8 != 0,
// buffers off the 16-byte grid, a column-slice mask whose full width or offset is not a multiple
// of 4, m == 0, or FTUNE_LORA_FUSED (0: never; unset: only with dropout, p > 0).
// u [m, r] (row stride ldu) = drop(x) A^T.
template <class T>
bool lora_down_fused(const LoraDims& d, const T* x, const T* a, double p, uint64_t seed, T* u,
                     int64_t ldu);
// From du [m, r] (row stride ldu): da [r, in] = du^T drop(x) (null: not needed; x may then be
// null) and dx [m, in] = drop'(du A), or dx += drop'(du A) with dx_accumulate (null: not needed;
// a may then be null). dA's partial sums over row blocks are summed in a fixed order
// (deterministic).
template <class T>
bool lora_up_fused(const LoraDims& d, const T* x, const T* du, int64_t ldu, const T* a, double p,
                   uint64_t seed, T* da, T* dx, bool dx_accumulate);

}  // namespace cuda
}  // namespace ftune::kernels
