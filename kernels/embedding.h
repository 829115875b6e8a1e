// Embedding lookup and its backward. weight is [V, D]; ids (i32|i64) hold N indices (any shape,
// contiguous); out and dy are [N, D]. The forward/backward kernels expect ids already checked.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace ftune::kernels::cpu {

// Flat position of the first id outside [0, V), or -1 when every id is in range.
int64_t first_bad_id(const Tensor& ids, int64_t V);
// out[n, :] = weight[ids[n], :]
void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out);
// dweight (overwritten) [V, D]: dweight[v, :] = sum over n with ids[n] == v of dy[n, :], summed in
// increasing n. Rows are grouped by id first, so each row of dweight has exactly one writer: the
// result is deterministic and independent of the thread count. accumulate: dweight += that sum
// instead (each row's sum formed first, then added: the bits of the overwrite followed by an add,
// as the autograd engine sums a tied embedding's gradient with the LM head's; rows no id names
// are left as they are, so a -0 there stays -0 where the add would give +0).
void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor& dweight,
                        bool accumulate = false);

}  // namespace ftune::kernels::cpu

// The GPU twins, same contracts (f32/bf16/f16 weight). first_bad_id reads one i64 back (a sync).
// embedding_backward is deterministic (sorted ids, one writer per dweight element summing in
// increasing n, as the CPU does) unless ftune::cuda::deterministic() is off, when f32 uses float
// atomics. With accumulate each row's sum is rounded to T, then added in f32 and rounded (the
// overwrite then the engine's add, bit for bit; the f32 atomics add each term onto the values).
namespace ftune::kernels::cuda {

int64_t first_bad_id(const Tensor& ids, int64_t V);
void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out);
void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor& dweight,
                        bool accumulate = false);

}  // namespace ftune::kernels::cuda
