// Tensor-core building blocks of the hand-written kernels (attention.cu, lora.cu): the
// mma.sync.m16n8k16 fragment layouts, ldmatrix, cp.async and f32 -> 16-bit packing (sm_80+).
// Included by kernels/cuda/*.cu only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace ftune::kernels::cuda {

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D[16x8] += A[16x16] * B[16x8]. With
// g = lane / 4 and t = lane % 4, the fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"):
//   A (4 x .b32, two 16-bit elements each, the lower column in the low half):
//     a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]   a2 = A[g][2t+8..2t+9]   a3 = A[g+8][2t+8..]
//   B (2 x .b32):  b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]    (k index pairs, column g)
//   C/D (4 x f32): c0, c1 = C[g][2t..2t+1]   c2, c3 = C[g+8][2t..2t+1]
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i (8 rows of 16 bytes);
// register i then holds row g, elements 2t..2t+1 of matrix i; with .trans it holds element
// [2t][g], [2t+1][g] (the transposed 8x8 matrix's row g).
// Hence, for a row-major tile X[rows][cols] in shared memory:
//   A fragment of X[r0..r0+15][k0..k0+15]: ldmatrix.x4 with lane -> &X[r0 + lane % 16][k0 + (lane / 16) * 8]
//     (matrices: rows 0-7/k 0-7, rows 8-15/k 0-7, rows 0-7/k 8-15, rows 8-15/k 8-15 = a0..a3).
//   B fragments with B = X^T (X = K[key][dim], S = Q K^T, k = dim), for 16 keys n0..n0+15:
//     ldmatrix.x4 with lane -> &X[n0 + lane % 8 + (lane / 16) * 8][k0 + ((lane / 8) % 2) * 8]
//     gives {b0, b1} of keys n0..n0+7 in r0, r1 and of keys n0+8..n0+15 in r2, r3.
//   B fragments with B = X (X = V[key][dim], O = P V, k = key), for 16 dims n0..n0+15:
//     ldmatrix.x4.trans with lane -> &X[k0 + lane % 8 + ((lane / 8) % 2) * 8][n0 + (lane / 16) * 8]
//     gives {b0, b1} of dims n0..n0+7 in r0, r1 and of dims n0+8..n0+15 in r2, r3.
//   A fragment of A = Y^T (Y[k][m] stored row-major, e.g. dA = du^T x with Y = du[row][rank]):
//     ldmatrix.x4.trans with lane -> &Y[k0 + lane % 8 + (lane / 16) * 8][m0 + ((lane / 8) % 2) * 8]
//     (matrix i holds k (i / 2) * 8.., m (i % 2) * 8..; transposed, register i is a0..a3).
//   The S accumulators of keys 16kk..16kk+15 (n-blocks 2kk, 2kk+1) are, packed to 16 bits, the A
//   fragment of P for the PV product: a0 = S[2kk].c0c1, a1 = S[2kk].c2c3, a2 = S[2kk+1].c0c1,
//   a3 = S[2kk+1].c2c3.
// Shared tiles have a row stride of an odd number of 16-byte units (attention: D + 8 elements),
// so the 8 row addresses of one ldmatrix matrix fall in distinct bank groups (no conflicts).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy; src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
// 4-byte global -> shared copy (through L1); src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a .b32 of two 16-bit T, lo in the low half (the lower column).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// Waits until at most N of this thread's cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ftune::kernels::cuda
