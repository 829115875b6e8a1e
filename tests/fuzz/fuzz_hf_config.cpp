// libFuzzer target: config.json parsing. Arbitrary bytes must parse or throw ftune::Error, and an
// accepted config must survive to_json -> parse unchanged in its modelled fields.
//   build-fuzz/tests/fuzz/fuzz_hf_config /tmp/cfg-corpus tests/fixtures/configs -max_total_time=60
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "io/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ftune;
  std::string text(reinterpret_cast<const char*>(data), size);
  // The first byte picks a max_seq_len, so the sliding-window rule is explored too.
  HfConfigOptions opt;
  if (size > 0 && data[0] % 2) opt.max_seq_len = int64_t(data[0]) * 64;
  ModelConfig c;
  try {
    c = parse_hf_config_text(text, "fuzz", opt);
  } catch (const Error&) {
    return 0;
  }
  ModelConfig r = parse_hf_config(c.to_json(), "fuzz round trip", opt);  // must not throw
  if (r.family != c.family || r.hidden_size != c.hidden_size || r.head_dim != c.head_dim ||
      r.num_key_value_heads != c.num_key_value_heads ||
      r.intermediate_size != c.intermediate_size || r.sliding_window != c.sliding_window ||
      r.eos_token_ids != c.eos_token_ids || r.rope_theta != c.rope_theta ||
      r.tie_word_embeddings != c.tie_word_embeddings || r.extra != c.extra)
    std::abort();
  return 0;
}
