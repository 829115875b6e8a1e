#include "models/kv_cache.h"

#include "core/error.h"

namespace ftune {

KVCache KVCache::make(int64_t n_layers, int64_t batch, int64_t max_len, int64_t n_kv_heads,
                      int64_t head_dim, std::vector<int64_t> pad, DType dtype, Device dev) {
  FTUNE_CHECK(n_layers > 0 && batch > 0 && max_len > 0 && n_kv_heads > 0 && head_dim > 0,
              "[kv_cache] sizes must be positive: layers ", n_layers, ", batch ", batch,
              ", max_len ", max_len, ", kv heads ", n_kv_heads, ", head_dim ", head_dim);
  FTUNE_CHECK(int64_t(pad.size()) == batch, "[kv_cache] pad has ", pad.size(),
              " entries for a batch of ", batch);
  for (size_t r = 0; r < pad.size(); ++r)
    FTUNE_CHECK(pad[r] >= 0 && pad[r] < max_len, "[kv_cache] pad[", r, "] = ", pad[r],
                " must be in [0, max_len = ", max_len, ")");
  FTUNE_CHECK(is_floating(dtype), "[kv_cache] dtype must be a float type, got ", dtype_name(dtype));
  KVCache c;
  c.batch = batch;
  c.max_len = max_len;
  c.pad = std::move(pad);
  for (int64_t l = 0; l < n_layers; ++l) {
    c.k.push_back(Tensor::zeros({batch, max_len, n_kv_heads, head_dim}, dtype, dev));
    c.v.push_back(Tensor::zeros({batch, max_len, n_kv_heads, head_dim}, dtype, dev));
  }
  return c;
}

}  // namespace ftune
