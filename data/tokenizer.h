// Hugging Face tokenizer.json (BPE models) in C++: encodes and decodes token for token like the
// `tokenizers` library. Supported pipeline pieces (anything else is refused with an ftune::Error
// naming the file and the type):
//   normalizer:     Prepend, Replace (String or Regex), NFC, Sequence, null
//   pre_tokenizer:  ByteLevel, Split (String or Regex, all five behaviors, invert), Metaspace,
//                   Digits, Whitespace, WhitespaceSplit, Sequence, null
//   model:          BPE (merges as "a b" strings or [a, b] pairs; byte_fallback, fuse_unk,
//                   unk_token, ignore_merges, continuing_subword_prefix, end_of_word_suffix)
//   decoder:        ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence, null
//   post_processor: TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence,
//   null
// Added tokens (special or not) are matched before pre-tokenization, longest match first, with
// their single_word / lstrip / rstrip / normalized flags applied as `tokenizers` does; their ids
// are assigned the way `tokenizers` assigns them on load (the model's id when the content is in
// the vocab, otherwise the next free id), which equals the file's ids for any well-formed file.
// Regexes run through PCRE2 (UTF + UCP, JIT when available); the input must be valid UTF-8.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ftune {

// The parts of tokenizer_config.json that training and generation need. Tokens given as
// AddedToken objects ({"content": ...}) are reduced to their content; absent ones stay empty.
struct TokenizerConfig {
  std::string bos_token, eos_token, pad_token, unk_token;
  std::optional<bool> add_bos_token, add_eos_token;  // unset when the file does not say
  std::string chat_template;                         // the Jinja source ("default" one of a list)
  std::optional<int64_t> model_max_length;

  static TokenizerConfig from_file(const std::string& path);
  // `source` names the text in error messages (a file name, or "<string>").
  static TokenizerConfig from_string(const std::string& json,
                                     const std::string& source = "<string>");
};

class Tokenizer {
 public:
  // Loads tokenizer.json; a sibling tokenizer_config.json, when present, fills config().
  static Tokenizer from_file(const std::string& path);
  // Loads a HF model folder: tokenizer.json plus tokenizer_config.json when present.
  static Tokenizer from_folder(const std::string& dir);
  // Parses tokenizer.json text; `source` names it in error messages.
  static Tokenizer from_string(const std::string& json, const std::string& source = "<string>");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&);  // cheap: the loaded tables are shared (they are immutable)
  Tokenizer& operator=(const Tokenizer&);
  ~Tokenizer();

  // Text (valid UTF-8, else ftune::Error) to ids. add_special_tokens applies the post_processor
  // (e.g. Llama's "<s> $A"); added tokens written in the text are recognized either way.
  // Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Ids to text through the decoder. Unknown ids are skipped (as `tokenizers` does); with
  // skip_special_tokens the special added tokens are left out.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;  // model vocab or added
  std::optional<std::string> id_to_token(int32_t id) const;
  // One past the largest id (model vocab and added tokens): the embedding size it needs.
  int64_t vocab_size() const;
  bool is_special(int32_t id) const;
  // The special-token ids of `config()` (bos/eos/pad) resolved through the vocab, when set.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;

  const TokenizerConfig& config() const;
  void set_config(TokenizerConfig config);
  const std::string& source() const;  // the file it was loaded from (for messages)

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl, TokenizerConfig config);
  std::shared_ptr<const Impl> impl_;
  TokenizerConfig config_;
};

}  // namespace ftune
