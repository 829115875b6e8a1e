// Chat templates: renders {role, content} messages to the text a chat model was trained on, for
// the known formats, byte for byte like `transformers`' apply_chat_template with the families'
// own Jinja templates (no Jinja engine here: each format is written out by hand and checked
// against transformers by tests/fixtures/make_tokenizer_fixtures.py).
//
// Formats (`names()`), with what one turn renders:
//   chatml   "<|im_start|>{role}\n{content}<|im_end|>\n"; generation prompt
//            "<|im_start|>assistant\n". Any role name. When detected from a template that writes
//            a default system prompt (Qwen2: "You are a helpful assistant."), that system turn is
//            rendered first whenever the conversation does not start with a system message.
//   qwen2    chatml with the default system prompt "You are a helpful assistant." (Qwen2-Instruct).
//   llama3   bos once, then
//   "<|start_header_id|>{role}<|end_header_id|>\n\n{trim(content)}<|eot_id|>";
//            generation prompt "<|start_header_id|>assistant<|end_header_id|>\n\n" (Llama 3 / 3.0).
//   llama2   Llama-2-chat: "{bos}[INST] {strip(user)} [/INST]" and " {strip(assistant)} {eos}";
//            a leading system message goes inside the first [INST] as
//            "<<SYS>>\n{system}\n<</SYS>>\n\n". Roles must alternate user/assistant. No generation
//            prompt (the [/INST] is one).
//   mistral  Mistral-7B-Instruct-v0.1: "{bos}" then "[INST] {user} [/INST]" and "{assistant}{eos}";
//            user/assistant only, alternating (a system message is an error, as in the template).
//   zephyr   "<|{role}|>\n{content}{eos}\n" for system/user/assistant; generation prompt
//            "<|assistant|>\n".
//   plain    no special tokens: "System: {content}\n", "User: {content}\n",
//            "Assistant: {content}\n"; generation prompt "Assistant: " (exactly the prefix an
//            assistant turn has, so training and generation see the same text).
// strip/trim remove Python's whitespace (str.strip), as the Jinja templates do.
//
// Assistant spans: for each assistant message, the byte range of its content plus the end-of-turn
// marker that follows it (<|im_end|>, <|eot_id|>, " {eos}" / "{eos}", or "\n" for plain), i.e.
// what an SFT loss on completions only should train on. Tokenize the rendered text with
// add_special_tokens=false: the template already wrote bos where the model expects it.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace ftune {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (chatml and llama3 accept any name)
  std::string content;
};

struct ChatSpan {
  size_t begin = 0, end = 0;  // byte range [begin, end) in ChatRendering::text
  size_t message = 0;         // index into the messages
};

struct ChatRendering {
  std::string text;
  std::vector<ChatSpan> assistant_spans;
};

class ChatTemplate {
 public:
  // One of names(); bos/eos come from `config` when it sets them, else the family's defaults.
  static ChatTemplate by_name(const std::string& name, const TokenizerConfig& config = {});
  // Recognizes a tokenizer_config.json chat_template (Jinja source) by its markers; throws
  // ftune::Error naming the selectable formats when it is not one of them.
  static ChatTemplate detect(const std::string& jinja, const TokenizerConfig& config = {});
  // detect(config.chat_template); throws when the config has none.
  static ChatTemplate from_config(const TokenizerConfig& config);
  static const std::vector<std::string>& names();

  ChatRendering render(const std::vector<ChatMessage>& messages,
                       bool add_generation_prompt = false) const;

  const std::string& name() const { return name_; }
  const std::string& default_system_prompt() const { return default_system_; }
  const std::string& bos_token() const { return bos_; }
  const std::string& eos_token() const { return eos_; }

 private:
  std::string name_, bos_, eos_, default_system_;
};

}  // namespace ftune
