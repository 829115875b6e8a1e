// libFuzzer target: tokenizer.json text -> Tokenizer::from_string, then encode/decode with the
// tokenizer it made. Only ftune::Error may come out; anything else (another exception, a crash,
// an ASan/UBSan report, a hang) is a bug. Seeds: tests/fixtures/tokenizers/*/tokenizer.json.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    ftune::Tokenizer tok = ftune::Tokenizer::from_string(text, "fuzz.json");
    static const char* kSamples[] = {"",
                                     " ",
                                     "Hello world! It's 2024.",
                                     "  a\n\n\tb  ",
                                     "café 日本 😀 \xe2\x96\x81x <s></s><|endoftext|>",
                                     "e\xcc\x81 \xc2\x85 \xe3\x80\x80"};
    for (const char* s : kSamples) {
      auto ids = tok.encode(s);
      tok.decode(ids);
      tok.decode(ids, true);
    }
    // Ids taken from the input bytes, many of them unknown.
    std::vector<int32_t> ids;
    for (size_t i = 0; i + 1 < size && ids.size() < 64; i += 2)
      ids.push_back(static_cast<int32_t>(data[i]) | (static_cast<int32_t>(data[i + 1]) << 8));
    tok.decode(ids);
    tok.id_to_token(ids.empty() ? 0 : ids[0]);
    tok.token_to_id(text.substr(0, 16));
  } catch (const ftune::Error&) {
  }
  return 0;
}
