#include "data/sft_dataset.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "core/rng.h"
#include "data/chat_template.h"

namespace ftune {

using json = nlohmann::json;

namespace {

const char* const kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";
const char* const kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n";

// Text to tokenize plus the byte ranges whose tokens are trained on.
struct Rendered {
  std::string text;
  std::vector<std::pair<size_t, size_t>> targets;
  bool add_special = true;  // apply the tokenizer's post-processor (bos, ...)
  bool add_eos = false;     // append eos (trained on)
};

// Errors of one line: rethrown as-is by the loader (the message already names file:line).
[[noreturn]] void line_error(const std::string& where, const std::string& what) {
  throw Error(str_cat("[sft_dataset] ", where, ": ", what));
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "a list";
    case json::value_t::object: return "an object";
    case json::value_t::discarded: return "discarded";
    default: return "a number";
  }
}

const json& require(const json& rec, const char* key, const std::string& where,
                    const char* format) {
  auto it = rec.find(key);
  if (it == rec.end())
    line_error(where, str_cat("missing key \"", key, "\" (format ", format, ")"));
  return *it;
}

const std::string& require_string(const json& rec, const char* key, const std::string& where,
                                  const char* format) {
  const json& v = require(rec, key, where, format);
  if (!v.is_string())
    line_error(where, str_cat("\"", key, "\" must be a string, not ", type_name(v)));
  return v.get_ref<const std::string&>();
}

std::vector<ChatMessage> parse_messages(const json& v, const char* key, const std::string& where) {
  if (!v.is_array())
    line_error(where, str_cat("\"", key, "\" must be a list of messages, not ", type_name(v)));
  if (v.empty()) line_error(where, str_cat("\"", key, "\" is empty"));
  std::vector<ChatMessage> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const json& m = v[i];
    std::string at = str_cat("\"", key, "\"[", i, "]");
    if (!m.is_object()) line_error(where, str_cat(at, " must be an object, not ", type_name(m)));
    auto r = m.find("role");
    auto c = m.find("content");
    if (r == m.end()) line_error(where, str_cat(at, " has no \"role\""));
    if (c == m.end()) line_error(where, str_cat(at, " has no \"content\""));
    if (!r->is_string())
      line_error(where, str_cat(at, " \"role\" must be a string, not ", type_name(*r)));
    if (!c->is_string())
      line_error(where, str_cat(at, " \"content\" must be a string, not ", type_name(*c)));
    const std::string& role = r->get_ref<const std::string&>();
    if (role != "system" && role != "user" && role != "assistant")
      line_error(where, str_cat(at, " has role \"", role,
                                "\"; the roles are \"system\", \"user\" and \"assistant\""));
    out.push_back({role, c->get<std::string>()});
  }
  return out;
}

// The template named by `name` ("" / "auto": the tokenizer's).
ChatTemplate resolve_template(const std::string& name, const Tokenizer& tok) {
  if (name.empty() || name == "auto") return ChatTemplate::from_config(tok.config());
  return ChatTemplate::by_name(name, tok.config());
}

// Lazily resolved chat template shared by the lines of one file: resolved once up front, and a
// failure is reported on the first line that needs a template.
struct TemplateSlot {
  std::optional<ChatTemplate> tmpl;
  std::string error;
  const ChatTemplate& get(const std::string& where) const {
    if (!tmpl) line_error(where, error);
    return *tmpl;
  }
};

TemplateSlot make_slot(const std::string& name, const Tokenizer& tok) {
  TemplateSlot s;
  try {
    s.tmpl = resolve_template(name, tok);
  } catch (const Error& e) {
    s.error = e.what();
  }
  return s;
}

Rendered render_chat(const ChatTemplate& t, const std::vector<ChatMessage>& msgs,
                     size_t first_target_message, const std::string& where) {
  ChatRendering r;
  try {
    r = t.render(msgs);
  } catch (const Error& e) {
    line_error(where, e.what());
  }
  Rendered out;
  out.text = std::move(r.text);
  out.add_special = false;  // the template writes bos where the model expects it (as HF)
  for (const ChatSpan& s : r.assistant_spans)
    if (s.message >= first_target_message) out.targets.push_back({s.begin, s.end});
  return out;
}

Rendered render_record(const json& rec, SftFormat format, const SftDatasetOptions& opt,
                       const TemplateSlot& slot, const std::string& where) {
  if (!rec.is_object())
    line_error(where, str_cat("a line must hold a JSON object, not ", type_name(rec)));
  Rendered r;
  switch (format) {
    case SftFormat::text: {
      r.text = require_string(rec, "text", where, "text");
      r.targets.push_back({0, r.text.size()});
      r.add_eos = opt.add_eos;
      break;
    }
    case SftFormat::prompt_completion: {
      const json& p = require(rec, "prompt", where, "prompt_completion");
      const json& c = require(rec, "completion", where, "prompt_completion");
      if (p.is_string() && c.is_string()) {
        r.text = p.get<std::string>() + c.get_ref<const std::string&>();
        r.targets.push_back({p.get_ref<const std::string&>().size(), r.text.size()});
        r.add_eos = opt.add_eos;
      } else if (p.is_array() && c.is_array()) {
        // Conversational (TRL): the chat template renders prompt + completion messages; the
        // completion's assistant turns are the targets.
        std::vector<ChatMessage> msgs = parse_messages(p, "prompt", where);
        size_t n_prompt = msgs.size();
        std::vector<ChatMessage> comp = parse_messages(c, "completion", where);
        msgs.insert(msgs.end(), comp.begin(), comp.end());
        r = render_chat(slot.get(where), msgs, n_prompt, where);
        if (r.targets.empty() && !opt.train_on_input)
          line_error(where, "\"completion\" has no assistant message");
      } else {
        line_error(where, str_cat("\"prompt\" and \"completion\" must both be strings or both "
                                  "be lists of messages, not ",
                                  type_name(p), " and ", type_name(c)));
      }
      break;
    }
    case SftFormat::messages: {
      std::vector<ChatMessage> msgs =
          parse_messages(require(rec, "messages", where, "messages"), "messages", where);
      r = render_chat(slot.get(where), msgs, 0, where);
      if (r.targets.empty() && !opt.train_on_input)
        line_error(where, "\"messages\" has no assistant message");
      break;
    }
    case SftFormat::alpaca: {
      const std::string& instruction = require_string(rec, "instruction", where, "alpaca");
      const std::string& output = require_string(rec, "output", where, "alpaca");
      std::string input;
      auto it = rec.find("input");
      if (it != rec.end() && !it->is_null()) {
        if (!it->is_string())
          line_error(where, str_cat("\"input\" must be a string, not ", type_name(*it)));
        input = it->get<std::string>();
      }
      if (input.empty())
        r.text = std::string(kAlpacaNoInput) + instruction + "\n\n### Response:\n";
      else
        r.text = std::string(kAlpacaWithInput) + instruction + "\n\n### Input:\n" + input +
                 "\n\n### Response:\n";
      size_t b = r.text.size();
      r.text += output;
      r.targets.push_back({b, r.text.size()});
      r.add_eos = opt.add_eos;
      break;
    }
    case SftFormat::auto_detect:
      FTUNE_THROW("[sft_dataset] encode_sft_record needs a concrete format, not auto");
  }
  return r;
}

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

// Tokenizes the whole rendered text once (as HF does, so training sees the tokens generation
// will see) and marks every token holding a byte of a target range. The token index of a byte
// boundary b comes from tokenizing text[0, b): the tokens it shares with the whole text lie
// before b, and the next token of the whole text is the first one at or across b.
void tokenize(const Rendered& r, const Tokenizer& tok, bool train_all, SftExample& ex) {
  std::vector<int32_t> plain = tok.encode(r.text, false);
  std::vector<uint8_t> mask(plain.size(), train_all ? 1 : 0);
  if (!train_all) {
    for (auto [b, e] : r.targets) {
      if (b >= e) continue;
      size_t i0 = b == 0 ? 0 : common_prefix(tok.encode(std::string_view(r.text).substr(0, b),
                                                        false), plain);
      size_t i1 = plain.size();
      if (e < r.text.size()) {
        std::vector<int32_t> p = tok.encode(std::string_view(r.text).substr(0, e), false);
        size_t l = common_prefix(p, plain);
        i1 = std::min(plain.size(), l + (p.size() > l ? 1 : 0));
      }
      for (size_t i = i0; i < i1; ++i) mask[i] = 1;
    }
  }
  if (r.add_special) {
    // The post-processor only adds tokens around the sequence: locate the sequence in it.
    std::vector<int32_t> full = tok.encode(r.text, true);
    size_t k = 0;
    bool found = false;
    for (; k + plain.size() <= full.size(); ++k)
      if (std::equal(plain.begin(), plain.end(), full.begin() + int64_t(k))) {
        found = true;
        break;
      }
    FTUNE_CHECK(found, "[sft_dataset] the post-processor of ", tok.source(),
                " changed the tokens of the text");
    uint8_t tail = train_all || (!mask.empty() && mask.back());
    std::vector<uint8_t> m(full.size(), 0);
    std::copy(mask.begin(), mask.end(), m.begin() + int64_t(k));
    std::fill(m.begin() + int64_t(k + plain.size()), m.end(), tail);
    if (train_all) std::fill(m.begin(), m.end(), 1);
    ex.ids = std::move(full);
    ex.train_mask = std::move(m);
  } else {
    ex.ids = std::move(plain);
    ex.train_mask = std::move(mask);
  }
  if (r.add_eos) {
    std::optional<int32_t> eos = tok.eos_id();
    FTUNE_CHECK(eos.has_value(), "[sft_dataset] add_eos is set but the tokenizer ", tok.source(),
                " has no eos_token (tokenizer_config.json); set add_eos false or give one");
    if (ex.ids.empty() || ex.ids.back() != *eos) {
      ex.ids.push_back(*eos);
      ex.train_mask.push_back(1);
    }
  }
}

bool encode_rendered(const Rendered& r, const Tokenizer& tok, const SftDatasetOptions& opt,
                     const std::string& where, SftExample& out, bool* truncated, bool* dropped) {
  if (truncated) *truncated = false;
  if (dropped) *dropped = false;
  try {
    tokenize(r, tok, opt.train_on_input, out);
  } catch (const Error& e) {
    line_error(where, e.what());
  }
  const int64_t n = int64_t(out.ids.size()), max_len = opt.max_seq_len;
  if (n > max_len) {
    if (opt.truncation == "drop") {
      if (dropped) *dropped = true;
      return false;
    }
    if (truncated) *truncated = true;
    if (opt.truncation == "left") {
      out.ids.erase(out.ids.begin(), out.ids.end() - max_len);
      out.train_mask.erase(out.train_mask.begin(), out.train_mask.end() - max_len);
    } else {
      out.ids.resize(size_t(max_len));
      out.train_mask.resize(size_t(max_len));
    }
  }
  if (!out.train_mask.empty()) out.train_mask[0] = 0;  // nothing before it predicts it
  return std::find(out.train_mask.begin(), out.train_mask.end(), 1) != out.train_mask.end();
}

void check_options(const SftDatasetOptions& opt) {
  FTUNE_CHECK(opt.max_seq_len >= 2, "[sft_dataset] max_seq_len must be at least 2, got ",
              opt.max_seq_len);
  FTUNE_CHECK(opt.truncation == "right" || opt.truncation == "left" || opt.truncation == "drop",
              "[sft_dataset] truncation must be right, left or drop, got '", opt.truncation, "'");
}

bool is_blank(const std::string& s) {
  return s.find_first_not_of(" \t\r\n") == std::string::npos;
}

json parse_line(const std::string& line, const std::string& where) {
  try {
    return json::parse(line);
  } catch (const json::exception& e) {
    line_error(where, str_cat("invalid JSON: ", e.what()));
  }
}

}  // namespace

SftFormat sft_format_from_name(const std::string& name) {
  if (name == "auto") return SftFormat::auto_detect;
  if (name == "text") return SftFormat::text;
  if (name == "prompt_completion") return SftFormat::prompt_completion;
  if (name == "messages") return SftFormat::messages;
  if (name == "alpaca") return SftFormat::alpaca;
  FTUNE_THROW("[sft_dataset] unknown dataset format '", name,
              "'; the formats are: auto, text, prompt_completion, messages, alpaca");
}

const char* sft_format_name(SftFormat f) {
  switch (f) {
    case SftFormat::auto_detect: return "auto";
    case SftFormat::text: return "text";
    case SftFormat::prompt_completion: return "prompt_completion";
    case SftFormat::messages: return "messages";
    case SftFormat::alpaca: return "alpaca";
  }
  return "?";
}

SftFormat detect_sft_format(const json& rec, const std::string& where) {
  if (!rec.is_object())
    line_error(where, str_cat("a line must hold a JSON object, not ", type_name(rec)));
  if (rec.contains("messages")) return SftFormat::messages;
  if (rec.contains("prompt") && rec.contains("completion")) return SftFormat::prompt_completion;
  if (rec.contains("instruction") && rec.contains("output")) return SftFormat::alpaca;
  if (rec.contains("text")) return SftFormat::text;
  std::string keys;
  for (auto it = rec.begin(); it != rec.end(); ++it) keys += (keys.empty() ? "" : ", ") + it.key();
  line_error(where, str_cat("cannot tell the dataset format from the keys {", keys,
                            "}: expected \"text\", \"prompt\"+\"completion\", \"messages\" or "
                            "\"instruction\"+\"output\" (or set dataset.format)"));
}

bool encode_sft_record(const json& record, SftFormat format, const Tokenizer& tok,
                       const SftDatasetOptions& opt, const std::string& where, SftExample& out,
                       bool* truncated, bool* dropped) {
  check_options(opt);
  FTUNE_CHECK(format != SftFormat::auto_detect,
              "[sft_dataset] encode_sft_record needs a concrete format, not auto");
  TemplateSlot slot;
  bool chat = format == SftFormat::messages ||
              (format == SftFormat::prompt_completion && record.is_object() &&
               record.contains("prompt") && record["prompt"].is_array());
  if (chat) slot = make_slot(opt.chat_template, tok);
  Rendered r = render_record(record, format, opt, slot, where);
  return encode_rendered(r, tok, opt, where, out, truncated, dropped);
}

std::vector<SftExample> load_sft_jsonl(const std::string& path, const Tokenizer& tok,
                                       const SftDatasetOptions& opt, SftDataStats* stats) {
  check_options(opt);
  std::ifstream f(path, std::ios::binary);
  FTUNE_CHECK(f.good(), "[sft_dataset] cannot open ", path);
  std::vector<std::string> lines;
  std::vector<int64_t> line_no;
  {
    std::string s;
    int64_t n = 0;
    while (std::getline(f, s)) {
      ++n;
      if (n == 1 && s.rfind("\xEF\xBB\xBF", 0) == 0) s.erase(0, 3);  // a UTF-8 byte order mark
      if (is_blank(s)) continue;
      lines.push_back(std::move(s));
      line_no.push_back(n);
    }
    FTUNE_CHECK(!f.bad(), "[sft_dataset] read error in ", path);
  }
  auto where_of = [&](size_t i) { return str_cat(path, ":", line_no[i]); };
  SftFormat format = opt.format;
  if (format == SftFormat::auto_detect && !lines.empty())
    format = detect_sft_format(parse_line(lines[0], where_of(0)), where_of(0));
  TemplateSlot slot;
  if (format == SftFormat::messages || format == SftFormat::prompt_completion)
    slot = make_slot(opt.chat_template, tok);
  if (format == SftFormat::messages && !slot.tmpl)
    FTUNE_THROW("[sft_dataset] ", path, ": ", slot.error);

  const int64_t n = int64_t(lines.size());
  std::vector<SftExample> ex(static_cast<size_t>(n));
  std::vector<uint8_t> kept(size_t(n), 0), trunc(size_t(n), 0), drop(size_t(n), 0);
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::atomic<int64_t> first_error{n};
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t i = 0; i < n; ++i) {
    if (i > first_error.load(std::memory_order_relaxed)) continue;
    try {
      std::string where = where_of(size_t(i));
      json rec = parse_line(lines[size_t(i)], where);
      Rendered r = render_record(rec, format, opt, slot, where);
      bool t = false, d = false;
      kept[size_t(i)] = encode_rendered(r, tok, opt, where, ex[size_t(i)], &t, &d);
      trunc[size_t(i)] = t;
      drop[size_t(i)] = d;
      ex[size_t(i)].line = line_no[size_t(i)];
    } catch (const std::exception& e) {
      errors[size_t(i)] = e.what();
      int64_t cur = first_error.load();
      while (i < cur && !first_error.compare_exchange_weak(cur, i)) {
      }
    }
  }
  if (first_error.load() < n) throw Error(errors[size_t(first_error.load())]);

  SftDataStats st;
  st.lines = n;
  std::vector<SftExample> out;
  out.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    if (drop[size_t(i)]) {
      ++st.dropped;
      continue;
    }
    if (!kept[size_t(i)]) {
      ++st.no_targets;
      continue;
    }
    st.truncated += trunc[size_t(i)];
    st.tokens += int64_t(ex[size_t(i)].ids.size());
    for (uint8_t m : ex[size_t(i)].train_mask) st.target_tokens += m;
    out.push_back(std::move(ex[size_t(i)]));
  }
  st.examples = int64_t(out.size());
  if (stats) *stats = st;
  return out;
}

std::vector<int64_t> philox_permutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> p(size_t(std::max<int64_t>(n, 0)));
  std::iota(p.begin(), p.end(), int64_t(0));
  // Fisher-Yates from the end; draw i takes 64 bits of Philox block (i / 2, stream) and maps
  // them to [0, i] by a 128-bit multiply (bias below 2^-40 for any realistic n).
  for (int64_t i = n - 1; i > 0; --i) {
    uint32_t r[4];
    philox4x32(seed, uint64_t(i) >> 1, stream, r);
    int w = int(i & 1) * 2;
    uint64_t x = (uint64_t(r[w]) << 32) | r[w + 1];
    auto j = int64_t((static_cast<unsigned __int128>(x) * uint64_t(i + 1)) >> 64);
    std::swap(p[size_t(i)], p[size_t(j)]);
  }
  return p;
}

std::pair<std::vector<SftExample>, std::vector<SftExample>> split_holdout(
    std::vector<SftExample> all, double val_size, uint64_t seed) {
  const int64_t n = int64_t(all.size());
  FTUNE_CHECK(std::isfinite(val_size) && val_size >= 0, "[sft_dataset] val_size must be >= 0, got ",
              val_size);
  int64_t k;
  if (val_size < 1) {
    k = int64_t(std::ceil(val_size * double(n)));
  } else {
    FTUNE_CHECK(val_size == std::floor(val_size),
                "[sft_dataset] val_size >= 1 is a count of examples and must be whole, got ",
                val_size);
    k = int64_t(val_size);
  }
  FTUNE_CHECK(k == 0 || k < n, "[sft_dataset] val_size ", val_size, " holds out ", k, " of ", n,
              " examples, leaving none to train on");
  std::vector<int64_t> perm = philox_permutation(n, seed, 0x53504c4954000000ull);  // "SPLIT"
  std::vector<uint8_t> is_val(size_t(n), 0);
  for (int64_t i = 0; i < k; ++i) is_val[size_t(perm[size_t(i)])] = 1;
  std::pair<std::vector<SftExample>, std::vector<SftExample>> out;
  out.first.reserve(size_t(n - k));
  out.second.reserve(size_t(k));
  for (int64_t i = 0; i < n; ++i)
    (is_val[size_t(i)] ? out.second : out.first).push_back(std::move(all[size_t(i)]));
  return out;
}

}  // namespace ftune
