// The KV cache for generation. Rows of a batch are left-padded to a common length: slots
// [0, pad[r]) of row r are padding and are never attended; its real tokens sit at
// [pad[r], length). The positions (for RoPE / learned positions) of row r count from its first
// real token: slot s has position s - pad[r].
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace ftune {

struct KVCache {
  int64_t batch = 0;
  int64_t max_len = 0;       // slots per row
  int64_t length = 0;        // slots filled so far (the same for every row)
  std::vector<int64_t> pad;  // [batch] left padding per row
  std::vector<Tensor> k, v;  // per layer: [batch, max_len, n_kv_heads, head_dim]

  // Allocates the per-layer buffers (zeros) for a model with these dimensions.
  static KVCache make(int64_t n_layers, int64_t batch, int64_t max_len, int64_t n_kv_heads,
                      int64_t head_dim, std::vector<int64_t> pad, DType dtype = DType::f32,
                      Device dev = Device::cpu());
};

}  // namespace ftune
