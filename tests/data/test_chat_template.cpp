// Chat templates against transformers' apply_chat_template renderings of the real Jinja templates
// (tests/fixtures/chat_templates/expected.json), detection, assistant spans, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/chat_template.h"

using namespace ftune;
using json = nlohmann::json;

namespace {

json fixture() {
  std::ifstream f(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/chat_templates/expected.json");
  return json::parse(f);
}

std::vector<ChatMessage> conversation(const json& j) {
  std::vector<ChatMessage> out;
  for (auto& m : j) out.push_back({m["role"], m["content"]});
  return out;
}

TokenizerConfig config_for(const json& fx, const std::string& fmt) {
  TokenizerConfig c;
  c.bos_token = fx["specials"][fmt]["bos"];
  c.eos_token = fx["specials"][fmt]["eos"];
  c.chat_template = fx["templates"][fmt];
  return c;
}

}  // namespace

TEST(ChatTemplate, MatchesTransformersRendering) {
  json fx = fixture();
  ASSERT_GE(fx["cases"].size(), 60u);
  int checked = 0, errors = 0;
  for (const json& c : fx["cases"]) {
    const std::string fmt = c["format"];
    TokenizerConfig cfg = config_for(fx, fmt);
    auto msgs = conversation(fx["conversations"][c["conversation"].get<int>()]);
    bool gen = c["add_generation_prompt"];
    // Both the template selected by name and the one detected from the Jinja source.
    for (const ChatTemplate& t :
         {ChatTemplate::by_name(fmt, cfg), ChatTemplate::from_config(cfg)}) {
      SCOPED_TRACE(fmt + " conversation " + c["conversation"].dump() + (gen ? " +gen" : ""));
      if (c.contains("error")) {
        EXPECT_THROW(t.render(msgs, gen), Error);
        ++errors;
        continue;
      }
      ChatRendering r = t.render(msgs, gen);
      EXPECT_EQ(r.text, c["text"].get<std::string>());
      ++checked;
      // One span per assistant message, in order, inside the text, each holding its content.
      size_t n_assistant = 0, last_end = 0;
      for (auto& m : msgs) n_assistant += m.role == "assistant";
      ASSERT_EQ(r.assistant_spans.size(), n_assistant);
      for (const ChatSpan& s : r.assistant_spans) {
        ASSERT_LE(last_end, s.begin);
        ASSERT_LE(s.end, r.text.size());
        std::string body = r.text.substr(s.begin, s.end - s.begin);
        EXPECT_EQ(msgs[s.message].role, "assistant");
        std::string content = msgs[s.message].content;
        std::string marker = fmt == "llama3"                       ? "<|eot_id|>"
                             : fmt == "llama2"                     ? " </s>"
                             : (fmt == "chatml" || fmt == "qwen2") ? "<|im_end|>"
                                                                   : "</s>";
        ASSERT_GE(body.size(), marker.size());
        EXPECT_EQ(body.substr(body.size() - marker.size()), marker);
        // llama2/llama3 strip the content; the span holds what was rendered.
        std::string rendered = body.substr(0, body.size() - marker.size());
        EXPECT_NE(content.find(rendered), std::string::npos) << rendered;
        last_end = s.end;
      }
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_GT(errors, 0);  // Mistral refuses the system role, like its template
}

TEST(ChatTemplate, Detection) {
  json fx = fixture();
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["qwen2"]).name(), "chatml");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["qwen2"]).default_system_prompt(),
            "You are a helpful assistant.");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["chatml"]).default_system_prompt(), "");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["llama3"]).name(), "llama3");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["llama2"]).name(), "llama2");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["mistral"]).name(), "mistral");
  EXPECT_EQ(ChatTemplate::detect(fx["templates"]["zephyr"]).name(), "zephyr");
  // A Qwen2.5-style default system prompt is picked up from the non-tool branch.
  std::string qwen25 =
      "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
      "{{- messages[0]['content'] }}{%- endif %}{%- else %}{%- if messages[0]['role'] == 'system' "
      "%}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
      "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
      "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}";
  EXPECT_EQ(ChatTemplate::detect(qwen25).default_system_prompt(),
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");

  auto refused = [](const std::string& jinja, const std::string& needle) {
    try {
      ChatTemplate::detect(jinja);
      ADD_FAILURE() << "accepted: " << jinja;
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("not recognized"), std::string::npos) << m;
      EXPECT_NE(m.find("chatml, qwen2, llama3, llama2, mistral, zephyr, plain"), std::string::npos)
          << m;
      EXPECT_NE(m.find(needle), std::string::npos) << m;
    }
  };
  refused("{{ messages }}", "{{ messages }}");
  refused("", "empty");
  refused("{{ '<|user|>' + message['content'] + '<|end|>' + '<|assistant|>' }}", "<|user|>");
  refused("{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: x' }}",
          "Llama 3.1");
  refused("{{ '[INST]' + content + '[/INST]' }}", "[INST] template of a variant");
  EXPECT_THROW(ChatTemplate::from_config(TokenizerConfig{}), Error);
  EXPECT_THROW(ChatTemplate::by_name("vicuna"), Error);
}

TEST(ChatTemplate, PlainFormatAndSpans) {
  ChatTemplate t = ChatTemplate::by_name("plain");
  std::vector<ChatMessage> m = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}};
  ChatRendering r = t.render(m, true);
  EXPECT_EQ(r.text, "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant: ");
  ASSERT_EQ(r.assistant_spans.size(), 1u);
  EXPECT_EQ(r.text.substr(r.assistant_spans[0].begin,
                          r.assistant_spans[0].end - r.assistant_spans[0].begin),
            "Hello!\n");
  EXPECT_EQ(r.assistant_spans[0].message, 2u);
  EXPECT_THROW(t.render({{"tool", "x"}}), Error);
}

TEST(ChatTemplate, SpansOfChatMLAndLlama2) {
  std::vector<ChatMessage> m = {{"system", "S"}, {"user", "Q"}, {"assistant", "  A  "}};
  ChatRendering c = ChatTemplate::by_name("chatml").render(m);
  ASSERT_EQ(c.assistant_spans.size(), 1u);
  EXPECT_EQ(c.text.substr(c.assistant_spans[0].begin,
                          c.assistant_spans[0].end - c.assistant_spans[0].begin),
            "  A  <|im_end|>");
  ChatRendering l = ChatTemplate::by_name("llama2").render(m);
  EXPECT_EQ(l.text, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST] A </s>");
  EXPECT_EQ(l.text.substr(l.assistant_spans[0].begin), "A </s>");
}

TEST(ChatTemplate, RoleErrors) {
  std::vector<ChatMessage> twice = {{"user", "a"}, {"user", "b"}};
  EXPECT_THROW(ChatTemplate::by_name("llama2").render(twice), Error);
  EXPECT_THROW(ChatTemplate::by_name("mistral").render(twice), Error);
  EXPECT_THROW(ChatTemplate::by_name("mistral").render({{"system", "s"}, {"user", "u"}}), Error);
  EXPECT_THROW(ChatTemplate::by_name("zephyr").render({{"tool", "t"}}), Error);
  EXPECT_THROW(ChatTemplate::by_name("chatml").render({{"user", std::string("\xff")}}), Error);
}

TEST(ChatTemplate, TokenizedWithTheFixtureTokenizer) {
  // The rendered text holds the special tokens, so encoding without adding specials gives one
  // <|im_start|> / <|im_end|> id each, never split.
  Tokenizer tok =
      Tokenizer::from_folder(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/tokenizers/qwen2");
  ChatTemplate t = ChatTemplate::from_config(tok.config());
  EXPECT_EQ(t.default_system_prompt(), "You are a helpful assistant.");
  ChatRendering r = t.render({{"user", "hello"}, {"assistant", "world"}});
  auto ids = tok.encode(r.text, false);
  int32_t start = tok.token_to_id("<|im_start|>").value(),
          end = tok.token_to_id("<|im_end|>").value();
  EXPECT_EQ(std::count(ids.begin(), ids.end(), start), 3);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), end), 3);
  EXPECT_EQ(tok.decode(ids), r.text);
}
