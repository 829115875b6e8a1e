// The embedded default's tokenizer (assets/tiny-llama) against HF `tokenizers` and
// `transformers` (tests/fixtures/assets_tokenizer_expected.json, made by
// tests/fixtures/make_assets_tokenizer_fixture.py): ids token for token over dataset lines, decode,
// special tokens and config, and the chat template detected as ChatML rendering like
// apply_chat_template.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "data/chat_template.h"
#include "data/tokenizer.h"

using namespace ftune;
using json = nlohmann::json;

namespace {

const std::string kAsset = std::string(FTUNE_SOURCE_DIR) + "/assets/tiny-llama";

json fixture() {
  std::ifstream f(std::string(FTUNE_SOURCE_DIR) +
                  "/tests/fixtures/assets_tokenizer_expected.json");
  EXPECT_TRUE(f.good());
  return json::parse(f);
}

std::string show(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

std::vector<ChatMessage> messages(const json& j) {
  std::vector<ChatMessage> out;
  for (auto& m : j) out.push_back({m["role"], m["content"]});
  return out;
}

}  // namespace

TEST(AssetsTokenizer, MatchesHuggingFaceTokenForToken) {
  json fx = fixture();
  Tokenizer tok = Tokenizer::from_folder(kAsset);
  ASSERT_GE(fx["cases"].size(), 300u);
  int id_fail = 0, dec_fail = 0, skip_fail = 0;
  size_t n_ids = 0;
  for (const json& c : fx["cases"]) {
    const std::string text = c["text"];
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    n_ids += ids.size();
    auto got = tok.encode(text);
    if (got != ids && ++id_fail <= 5)
      ADD_FAILURE() << "encode(" << json(text).dump() << ")\n  ftune " << show(got)
                    << "\n  HF    " << show(ids);
    // The post-processor adds nothing (no bos), so both modes give the same ids.
    EXPECT_EQ(tok.encode(text, false), got);
    const std::string decoded = c.value("decoded", text);
    if (tok.decode(ids) != decoded && ++dec_fail <= 5)
      ADD_FAILURE() << "decode of " << json(text).dump() << ": " << json(tok.decode(ids)).dump();
    const std::string skip = c.value("decoded_skip", decoded);
    if (tok.decode(ids, true) != skip && ++skip_fail <= 5)
      ADD_FAILURE() << "decode(skip) of " << json(text).dump() << ": "
                    << json(tok.decode(ids, true)).dump();
  }
  EXPECT_EQ(id_fail, 0);
  EXPECT_EQ(dec_fail, 0);
  EXPECT_EQ(skip_fail, 0);
  EXPECT_GT(n_ids, 10000u);  // the cases are real documents, not a handful of words
}

TEST(AssetsTokenizer, SpecialTokensAndConfig) {
  json fx = fixture();
  Tokenizer tok = Tokenizer::from_folder(kAsset);
  EXPECT_EQ(tok.vocab_size(), fx["vocab_size"].get<int64_t>());
  for (auto& [s, id] : fx["special_ids"].items()) {
    EXPECT_EQ(tok.token_to_id(s), id.get<int32_t>()) << s;
    EXPECT_TRUE(tok.is_special(id.get<int32_t>())) << s;
    // A special token written in the text is one token.
    EXPECT_EQ(tok.encode(s), std::vector<int32_t>{id.get<int32_t>()}) << s;
  }
  // Qwen2-style: eos <|im_end|>, pad <|endoftext|>, no bos.
  EXPECT_EQ(tok.config().eos_token, "<|im_end|>");
  EXPECT_EQ(tok.config().pad_token, "<|endoftext|>");
  EXPECT_TRUE(tok.config().bos_token.empty());
  EXPECT_EQ(tok.eos_id(), fx["special_ids"]["<|im_end|>"].get<int32_t>());
  EXPECT_EQ(tok.pad_id(), fx["special_ids"]["<|endoftext|>"].get<int32_t>());
  EXPECT_FALSE(tok.bos_id().has_value());
  EXPECT_EQ(tok.config().model_max_length, 512);

  // config.json agrees with the tokenizer on the vocabulary and the special ids.
  std::ifstream f(kAsset + "/config.json");
  json cfg = json::parse(f);
  EXPECT_EQ(cfg["vocab_size"].get<int64_t>(), tok.vocab_size());
  EXPECT_EQ(cfg["eos_token_id"].get<int32_t>(), *tok.eos_id());
  EXPECT_EQ(cfg["pad_token_id"].get<int32_t>(), *tok.pad_id());
}

TEST(AssetsTokenizer, ChatTemplateIsChatmlAndRendersLikeTransformers) {
  json fx = fixture();
  Tokenizer tok = Tokenizer::from_folder(kAsset);
  ChatTemplate t = ChatTemplate::from_config(tok.config());
  EXPECT_EQ(t.name(), "chatml");
  EXPECT_EQ(t.default_system_prompt(), "");  // no default system turn: short examples
  ASSERT_GE(fx["chat"].size(), 8u);
  for (const json& c : fx["chat"]) {
    auto msgs = messages(c["messages"]);
    const bool gen = c["add_generation_prompt"];
    SCOPED_TRACE(c["messages"].dump() + (gen ? " +gen" : ""));
    ChatRendering r = t.render(msgs, gen);
    EXPECT_EQ(r.text, c["text"].get<std::string>());
    EXPECT_EQ(tok.encode(r.text, false), c["ids"].get<std::vector<int32_t>>());
    // Each assistant span is its content plus <|im_end|>, the tokens an SFT loss trains on.
    size_t n_assistant = 0;
    for (auto& m : msgs) n_assistant += m.role == "assistant";
    ASSERT_EQ(r.assistant_spans.size(), n_assistant);
    for (const ChatSpan& s : r.assistant_spans)
      EXPECT_EQ(r.text.substr(s.begin, s.end - s.begin), msgs[s.message].content + "<|im_end|>");
  }
}
