#include "data/chat_template.h"

#include <algorithm>

#include "core/error.h"
#include "data/text_util.h"

namespace ftune {

namespace {

// Python's str.strip(): Unicode whitespace as str.isspace() defines it.
std::string py_strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    size_t l;
    if (!text::is_python_space(text::decode_utf8(s, b, &l))) break;
    b += l;
  }
  while (e > b) {
    size_t c = e - 1;
    while (c > b && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
    size_t l;
    if (!text::is_python_space(text::decode_utf8(s, c, &l))) break;
    e = c;
  }
  return s.substr(b, e - b);
}

bool contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

std::string list_names() {
  std::string out;
  for (auto& n : ChatTemplate::names()) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// The default system prompt a ChatML template writes as a literal, e.g. Qwen2's
// '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'; empty when there is none.
std::string chatml_default_system(const std::string& jinja) {
  for (const char* head : {"<|im_start|>system\\n", "<|im_start|>system\n"}) {
    size_t pos = 0;
    while ((pos = jinja.find(head, pos)) != std::string::npos) {
      size_t b = pos + std::char_traits<char>::length(head);
      size_t e = jinja.find("<|im_end|>", b);
      pos = b;
      if (e == std::string::npos) break;
      std::string cand = jinja.substr(b, e - b);
      if (cand.empty() || cand.find_first_of("'\"{}+\\%") != std::string::npos) continue;
      return cand;
    }
  }
  return {};
}

// Validates UTF-8 once so the strip helpers can decode freely.
void check_utf8(const std::vector<ChatMessage>& msgs) {
  for (size_t i = 0; i < msgs.size(); ++i) {
    FTUNE_CHECK(text::utf8_invalid_at(msgs[i].content) == std::string::npos,
                "[chat_template] message ", i, " content is not valid UTF-8");
    FTUNE_CHECK(text::utf8_invalid_at(msgs[i].role) == std::string::npos,
                "[chat_template] message ", i, " role is not valid UTF-8");
  }
}

}  // namespace

const std::vector<std::string>& ChatTemplate::names() {
  static const std::vector<std::string> n = {"chatml",  "qwen2",  "llama3", "llama2",
                                             "mistral", "zephyr", "plain"};
  return n;
}

ChatTemplate ChatTemplate::by_name(const std::string& name, const TokenizerConfig& config) {
  ChatTemplate t;
  t.name_ = name;
  auto pick = [](const std::string& v, const char* dflt) {
    return v.empty() ? std::string(dflt) : v;
  };
  if (name == "chatml") {
  } else if (name == "qwen2") {
    t.name_ = "chatml";
    t.default_system_ = "You are a helpful assistant.";
  } else if (name == "llama3") {
    t.bos_ = pick(config.bos_token, "<|begin_of_text|>");
  } else if (name == "llama2" || name == "mistral" || name == "zephyr") {
    t.bos_ = pick(config.bos_token, "<s>");
    t.eos_ = pick(config.eos_token, "</s>");
  } else if (name == "plain") {
  } else {
    FTUNE_THROW("[chat_template] unknown chat template '", name,
                "'; the known ones are: ", list_names());
  }
  return t;
}

ChatTemplate ChatTemplate::detect(const std::string& jinja, const TokenizerConfig& config) {
  auto unrecognized = [&](const std::string& why) -> ChatTemplate {
    std::string head = jinja.substr(0, 120);
    FTUNE_THROW("[chat_template] the tokenizer's chat_template is not recognized", why,
                "; set chat_template in the recipe to one of: ", list_names(),
                " (template starts: ", head, jinja.size() > head.size() ? "...)" : ")");
  };
  if (jinja.empty()) return unrecognized(" (it is empty)");
  if (contains(jinja, "<|im_start|>")) {
    ChatTemplate t = by_name("chatml", config);
    t.default_system_ = chatml_default_system(jinja);
    return t;
  }
  if (contains(jinja, "<|start_header_id|>")) {
    if (contains(jinja, "Cutting Knowledge Date") || contains(jinja, "Environment: ipython"))
      return unrecognized(
          " (a Llama 3.1+ template with date and tool headers, which ftune does "
          "not reproduce; 'llama3' renders the Llama 3.0 format)");
    return by_name("llama3", config);
  }
  if (contains(jinja, "[INST]")) {
    if (contains(jinja, "<<SYS>>")) return by_name("llama2", config);
    if (contains(jinja, "' [/INST]'")) return by_name("mistral", config);
    return unrecognized(
        " (an [INST] template of a variant other than Llama 2 and "
        "Mistral-Instruct-v0.1)");
  }
  if (contains(jinja, "<|user|>") && contains(jinja, "<|assistant|>") &&
      !contains(jinja, "<|end|>") && (contains(jinja, "eos_token") || contains(jinja, "</s>")))
    return by_name("zephyr", config);
  return unrecognized("");
}

ChatTemplate ChatTemplate::from_config(const TokenizerConfig& config) {
  FTUNE_CHECK(!config.chat_template.empty(),
              "[chat_template] tokenizer_config.json has no chat_template; set chat_template in "
              "the recipe to one of: ",
              list_names());
  return detect(config.chat_template, config);
}

ChatRendering ChatTemplate::render(const std::vector<ChatMessage>& msgs,
                                   bool add_generation_prompt) const {
  check_utf8(msgs);
  ChatRendering r;
  std::string& out = r.text;
  // Appends an assistant body followed by its end-of-turn marker, recording the span.
  auto assistant = [&](size_t i, const std::string& body, const std::string& end_marker) {
    ChatSpan s;
    s.begin = out.size();
    out += body;
    out += end_marker;
    s.end = out.size();
    s.message = i;
    r.assistant_spans.push_back(s);
  };
  auto alternation = [&](size_t k, const ChatMessage& m) {
    FTUNE_CHECK(m.role == "user" || m.role == "assistant", "[chat_template] ", name_, ": role '",
                m.role, "' is not supported (only user and assistant",
                name_ == "llama2" ? ", and one leading system message)" : ")");
    FTUNE_CHECK((m.role == "user") == (k % 2 == 0), "[chat_template] ", name_,
                ": conversation roles must alternate user/assistant/user/assistant/...");
  };

  if (name_ == "chatml") {
    if (!default_system_.empty() && !msgs.empty() && msgs[0].role != "system")
      out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
    for (size_t i = 0; i < msgs.size(); ++i) {
      out += "<|im_start|>" + msgs[i].role + "\n";
      if (msgs[i].role == "assistant")
        assistant(i, msgs[i].content, "<|im_end|>");
      else
        out += msgs[i].content + "<|im_end|>";
      out += "\n";
    }
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
  } else if (name_ == "llama3") {
    for (size_t i = 0; i < msgs.size(); ++i) {
      if (i == 0) out += bos_;
      out += "<|start_header_id|>" + msgs[i].role + "<|end_header_id|>\n\n";
      std::string body = py_strip(msgs[i].content);
      if (msgs[i].role == "assistant")
        assistant(i, body, "<|eot_id|>");
      else
        out += body + "<|eot_id|>";
    }
    if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  } else if (name_ == "llama2") {
    size_t first = 0;
    bool has_system = !msgs.empty() && msgs[0].role == "system";
    if (has_system) first = 1;
    for (size_t i = first; i < msgs.size(); ++i) {
      size_t k = i - first;
      alternation(k, msgs[i]);
      std::string content = msgs[i].content;
      if (k == 0 && has_system)
        content = "<<SYS>>\n" + msgs[0].content + "\n<</SYS>>\n\n" + content;
      if (msgs[i].role == "user") {
        out += bos_ + "[INST] " + py_strip(content) + " [/INST]";
      } else {
        out += " ";
        assistant(i, py_strip(content), " " + eos_);
      }
    }
  } else if (name_ == "mistral") {
    out += bos_;
    for (size_t i = 0; i < msgs.size(); ++i) {
      alternation(i, msgs[i]);
      if (msgs[i].role == "user")
        out += "[INST] " + msgs[i].content + " [/INST]";
      else
        assistant(i, msgs[i].content, eos_);
    }
  } else if (name_ == "zephyr") {
    for (size_t i = 0; i < msgs.size(); ++i) {
      const std::string& role = msgs[i].role;
      FTUNE_CHECK(role == "system" || role == "user" || role == "assistant",
                  "[chat_template] zephyr: role '", role, "' is not supported");
      out += "<|" + role + "|>\n";
      if (role == "assistant")
        assistant(i, msgs[i].content, eos_);
      else
        out += msgs[i].content + eos_;
      out += "\n";
    }
    if (add_generation_prompt && !msgs.empty()) out += "<|assistant|>\n";
  } else if (name_ == "plain") {
    for (size_t i = 0; i < msgs.size(); ++i) {
      const std::string& role = msgs[i].role;
      if (role == "system") {
        out += "System: " + msgs[i].content + "\n";
      } else if (role == "user") {
        out += "User: " + msgs[i].content + "\n";
      } else if (role == "assistant") {
        out += "Assistant: ";
        assistant(i, msgs[i].content, "\n");
      } else {
        FTUNE_THROW("[chat_template] plain: role '", role, "' is not supported");
      }
    }
    if (add_generation_prompt) out += "Assistant: ";
  } else {
    FTUNE_THROW("[chat_template] unknown chat template '", name_, "'");
  }
  return r;
}

}  // namespace ftune
