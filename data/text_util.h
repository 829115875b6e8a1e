// UTF-8 and regex helpers shared by the tokenizer and the chat templates (internal to data/).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ftune::text {

// Length of the UTF-8 sequence that starts with lead byte b (valid input assumed).
inline size_t utf8_len(unsigned char b) { return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4; }
// Offset of the first byte that is not part of well-formed UTF-8, or npos when s is valid.
size_t utf8_invalid_at(std::string_view s);
// Code point at s[i] (valid UTF-8 assumed); *len receives its byte length.
uint32_t decode_utf8(std::string_view s, size_t i, size_t* len);
void append_utf8(std::string& out, uint32_t cp);
// Bytes to text with each maximal invalid subsequence replaced by U+FFFD: the policy of Rust's
// String::from_utf8_lossy and Python's errors="replace".
std::string utf8_lossy(std::string_view bytes);

// Unicode White_Space (what Rust's char::is_whitespace and regex \s accept).
bool is_white_space(uint32_t cp);
// Python's str.isspace (what str.strip() and Jinja's trim remove).
bool is_python_space(uint32_t cp);
// Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation, join controls.
bool is_word_char(uint32_t cp);

// A compiled PCRE2 regex (UTF + UCP; JIT when available). Immutable and thread-safe.
class Regex {
 public:
  // Throws ftune::Error starting with `where` when the pattern does not compile.
  Regex(const std::string& pattern, const std::string& where);
  // Non-overlapping matches [start, end) from left to right. After an empty match at p the search
  // resumes one character later, as Oniguruma's find_iter does.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Code;
  std::shared_ptr<Code> code_;
  std::string pattern_;
};

// An Oniguruma pattern (what `tokenizers` runs) made to mean the same in PCRE2: \s and \S become
// Unicode White_Space classes (PCRE2's \s also takes U+180E). Other constructs pass unchanged.
std::string onig_to_pcre2(std::string_view pattern);

// A PCRE2 pattern that matches `literal` exactly (ASCII punctuation escaped).
std::string regex_escape(std::string_view literal);

// NFC normalization (canonical decomposition, reordering, composition) of valid UTF-8.
std::string nfc(std::string_view s);

}  // namespace ftune::text
