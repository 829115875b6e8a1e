// tokenizer.json BPE tokenizer. The pipeline mirrors `tokenizers` step by step: added tokens are
// cut out of the raw text (non-normalized ones), the rest is normalized and cut again (normalized
// ones), pre-tokenized into words, each word is BPE-merged, then the post-processor adds the
// template's special tokens. Every step keeps `tokenizers`' corner cases (empty pieces dropped,
// Metaspace "first" only at the start of the text, the added-token strip rules, ...), because the
// goal is the same ids, not merely a plausible segmentation.
#include "data/tokenizer.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "data/text_util.h"

namespace ftune {

using json = nlohmann::json;
using text::utf8_len;

namespace {

// Heterogeneous lookup (string_view keys without building a std::string).
struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, StrHash, std::equal_to<>>;

std::string read_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  FTUNE_CHECK(f.good(), "[tokenizer] cannot open ", what, " '", path, "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- JSON access with messages that name the file and the field ------------------------------

struct Ctx {
  const std::string& source;
  [[noreturn]] void fail(const std::string& msg) const {
    throw Error(str_cat("[tokenizer] ", source, ": ", msg));
  }
};

const json& field(const Ctx& c, const json& j, const char* key, const std::string& where) {
  if (!j.is_object()) c.fail(str_cat(where, " must be an object"));
  auto it = j.find(key);
  if (it == j.end()) c.fail(str_cat(where, " has no \"", key, "\""));
  return *it;
}
const json* opt_field(const json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? nullptr : &*it;
}
std::string as_str(const Ctx& c, const json& v, const std::string& where) {
  if (!v.is_string()) c.fail(str_cat(where, " must be a string"));
  return v.get<std::string>();
}
std::string str_field(const Ctx& c, const json& j, const char* key, const std::string& where) {
  return as_str(c, field(c, j, key, where), str_cat(where, ".", key));
}
bool bool_opt(const Ctx& c, const json& j, const char* key, bool dflt, const std::string& where) {
  const json* v = opt_field(j, key);
  if (!v) return dflt;
  if (!v->is_boolean()) c.fail(str_cat(where, ".", key, " must be true or false"));
  return v->get<bool>();
}
int64_t int_of(const Ctx& c, const json& v, const std::string& where, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) c.fail(str_cat(where, " must be an integer"));
  int64_t x = v.is_number_unsigned()
                  ? static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), uint64_t(INT64_MAX)))
                  : v.get<int64_t>();
  if (x < lo || x > hi) c.fail(str_cat(where, " = ", x, " is out of range [", lo, ", ", hi, "]"));
  return x;
}
constexpr int64_t kMaxId = (int64_t{1} << 31) - 2;

// ---- byte-level alphabet (GPT-2's bytes_to_unicode) ------------------------------------------

struct ByteAlphabet {
  std::array<std::string, 256> byte_char;  // byte -> UTF-8 of its printable stand-in
  std::unordered_map<uint32_t, uint8_t> char_byte;
  ByteAlphabet() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      text::append_utf8(byte_char[b], cp);
      char_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
// Unicode White_Space and Rust's \w as PCRE2 classes (PCRE2's own \s and \w differ slightly).
constexpr const char* kWhiteSpaceClass =
    "[\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}]";

// ---- pieces of text flowing through the pipeline ---------------------------------------------

struct Piece {
  std::string text;
  int32_t id = -1;         // >= 0: an added token, final
  bool at_origin = false;  // starts at offset 0 of the original text (Metaspace "first")
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct Span {
  size_t begin, end;
  bool match;
};

// `tokenizers`' Pattern::find_matches for a regex: the text cut into matches and gaps.
void regex_spans(const text::Regex& re, std::string_view s, bool invert, std::vector<Span>& out) {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  thread_local std::vector<std::pair<size_t, size_t>> m;
  m.clear();
  re.find_all(s, m);
  size_t prev = 0;
  for (auto [b, e] : m) {
    if (prev != b) out.push_back({prev, b, invert});
    out.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), invert});
}

// Applies a split behavior to spans and appends the kept, non-empty pieces.
void split_piece(const Piece& p, std::vector<Span>& spans, Behavior beh, std::vector<Piece>& out) {
  thread_local std::vector<std::pair<size_t, size_t>> keep;  // [begin, end)
  keep.clear();
  switch (beh) {
    case Behavior::Isolated:
      for (auto& s : spans) keep.emplace_back(s.begin, s.end);
      break;
    case Behavior::Removed:
      for (auto& s : spans)
        if (!s.match) keep.emplace_back(s.begin, s.end);
      break;
    case Behavior::Contiguous: {
      bool prev = false;
      for (auto& s : spans) {
        if (s.match == prev && !keep.empty())
          keep.back().second = s.end;
        else
          keep.emplace_back(s.begin, s.end);
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool prev = false;
      for (auto& s : spans) {
        if (s.match && !prev && !keep.empty())
          keep.back().second = s.end;
        else
          keep.emplace_back(s.begin, s.end);
        prev = s.match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev = false;
      for (size_t i = spans.size(); i-- > 0;) {
        const Span& s = spans[i];
        if (s.match && !prev && !keep.empty())
          keep.back().first = s.begin;
        else
          keep.emplace_back(s.begin, s.end);
        prev = s.match;
      }
      std::reverse(keep.begin(), keep.end());
      break;
    }
  }
  for (auto [b, e] : keep) {
    if (b >= e) continue;
    Piece q;
    q.text = p.text.substr(b, e - b);
    q.at_origin = p.at_origin && b == 0;
    out.push_back(std::move(q));
  }
}

// ---- normalizers -----------------------------------------------------------------------------

struct Normalizer {
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

struct PrependNormalizer : Normalizer {
  std::string prepend;
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prepend);
  }
};

// Replaces every match of a regex (a String pattern is an escaped regex, as in `tokenizers`).
struct ReplaceRule {
  std::unique_ptr<text::Regex> re;
  std::string content;
  void apply(std::string& s) const {
    thread_local std::vector<std::pair<size_t, size_t>> m;
    m.clear();
    re->find_all(s, m);
    if (m.empty()) return;
    std::string out;
    size_t prev = 0;
    for (auto [b, e] : m) {
      out.append(s, prev, b - prev);
      out += content;
      prev = e;
    }
    out.append(s, prev, std::string::npos);
    s = std::move(out);
  }
};

struct ReplaceNormalizer : Normalizer {
  ReplaceRule rule;
  void normalize(std::string& s) const override { rule.apply(s); }
};

struct NfcNormalizer : Normalizer {
  void normalize(std::string& s) const override { s = text::nfc(s); }
};

struct SequenceNormalizer : Normalizer {
  std::vector<std::unique_ptr<Normalizer>> items;
  void normalize(std::string& s) const override {
    for (auto& n : items) n->normalize(s);
  }
};

// ---- pre-tokenizers --------------------------------------------------------------------------

struct PreTokenizer {
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` (none of them an added token) with their pre-tokenized words.
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};

struct SplitPreTokenizer : PreTokenizer {
  std::unique_ptr<text::Regex> re;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size() * 4);
    std::vector<Span> spans;
    for (auto& p : pieces) {
      regex_spans(*re, p.text, invert, spans);
      split_piece(p, spans, behavior, out);
    }
    pieces = std::move(out);
  }
};

struct ByteLevelPreTokenizer : PreTokenizer {
  bool add_prefix_space = false;
  bool use_regex = true;
  std::unique_ptr<text::Regex> re;  // GPT-2's pattern
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> split;
    if (use_regex) {
      split.reserve(pieces.size() * 4);
      std::vector<Span> spans;
      for (auto& p : pieces) {
        if (add_prefix_space && !p.text.empty() && p.text[0] != ' ') p.text.insert(0, " ");
        regex_spans(*re, p.text, false, spans);
        split_piece(p, spans, Behavior::Isolated, split);
      }
    } else {
      split = std::move(pieces);
      for (auto& p : split)
        if (add_prefix_space && !p.text.empty() && p.text[0] != ' ') p.text.insert(0, " ");
    }
    const auto& alpha = byte_alphabet();
    for (auto& p : split) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char b : p.text) mapped += alpha.byte_char[b];
      p.text = std::move(mapped);
    }
    pieces = std::move(split);
  }
};

enum class PrependScheme { Always, First, Never };

struct MetaspacePreTokenizer : PreTokenizer {
  std::string replacement = "\xE2\x96\x81";  // U+2581
  PrependScheme scheme = PrependScheme::Always;
  bool split = true;
  std::unique_ptr<text::Regex> re;  // the replacement character, one match per occurrence
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size() * 4);
    std::vector<Span> spans;
    for (auto& p : pieces) {
      std::string t;
      t.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ')
          t += replacement;
        else
          t.push_back(c);
      }
      bool starts = t.compare(0, replacement.size(), replacement) == 0;
      if (!t.empty() && !starts &&
          (scheme == PrependScheme::Always || (scheme == PrependScheme::First && p.at_origin)))
        t.insert(0, replacement);
      p.text = std::move(t);
      if (split) {
        regex_spans(*re, p.text, false, spans);
        split_piece(p, spans, Behavior::MergedWithNext, out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    }
    pieces = std::move(out);
  }
};

struct SequencePreTokenizer : PreTokenizer {
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void apply(std::vector<Piece>& pieces) const override {
    for (auto& p : items) p->apply(pieces);
  }
};

// ---- BPE model -------------------------------------------------------------------------------

struct Bpe {
  StrMap<int32_t> vocab;
  std::unordered_map<int32_t, std::string> vocab_r;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, new id)
  std::optional<std::string> unk_token, prefix, suffix;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::array<int32_t, 256> byte_ids{};  // "<0xXX>" ids, -1 when absent

  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // `tokenizers`' merge cache: words below 256 bytes, at most 10000 entries (then no inserts).
  static constexpr size_t kCacheCapacity = 10000, kCacheMaxLen = 256;
  mutable std::mutex cache_mu;
  mutable StrMap<std::vector<int32_t>> cache;

  struct Symbol {
    int32_t id;
    int32_t prev, next;
    size_t len;
  };
  struct Merge {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
  };
  struct MergeOrder {  // the smallest rank first, then the leftmost position
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };

  int32_t unk_id() const {
    auto it = vocab.find(*unk_token);
    if (it == vocab.end())
      throw Error(str_cat("[tokenizer] unk_token '", *unk_token, "' is not in the vocab"));
    return it->second;
  }

  void merge_word(std::string_view w, std::vector<int32_t>& out) const {
    std::vector<Symbol> sym;
    sym.reserve(w.size());
    auto add = [&sym](int32_t id, size_t len) {
      int32_t n = static_cast<int32_t>(sym.size());
      if (!sym.empty()) sym.back().next = n;
      sym.push_back({id, n - 1, -1, len});
    };
    bool have_unk = false;
    int32_t unk = -1;
    size_t unk_len = 0;
    std::string buf;
    for (size_t i = 0; i < w.size();) {
      size_t l = utf8_len(static_cast<unsigned char>(w[i]));
      if (i + l > w.size()) l = w.size() - i;
      std::string_view c = w.substr(i, l);
      bool first = i == 0, last = i + l >= w.size();
      std::string_view s = c;
      if ((!first && prefix) || (last && suffix)) {
        buf.clear();
        if (!first && prefix) buf += *prefix;
        buf += c;
        if (last && suffix) buf += *suffix;
        s = buf;
      }
      i += l;
      auto it = vocab.find(s);
      if (it != vocab.end()) {
        if (have_unk) {
          add(unk, unk_len);
          have_unk = false;
        }
        add(it->second, l);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char b : s) all = all && byte_ids[b] >= 0;
        if (all) {  // `tokenizers` does not flush a pending unk here; neither do we
          for (unsigned char b : s) add(byte_ids[b], 1);
          continue;
        }
      }
      if (unk_token) {
        if (have_unk && fuse_unk) {
          unk_len += l;
        } else {
          if (have_unk) add(unk, unk_len);
          unk = unk_id();
          unk_len = l;
          have_unk = true;
        }
      }
    }
    if (have_unk) add(unk, unk_len);

    if (sym.size() > 1 && !merges.empty()) {
      std::priority_queue<Merge, std::vector<Merge>, MergeOrder> queue;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = merges.find(key(sym[i].id, sym[i + 1].id));
        if (it != merges.end())
          queue.push({it->second.first, static_cast<int32_t>(i), it->second.second});
      }
      while (!queue.empty()) {
        Merge top = queue.top();
        queue.pop();
        Symbol& cur = sym[top.pos];
        if (cur.len == 0 || cur.next == -1) continue;
        Symbol right = sym[cur.next];
        auto it = merges.find(key(cur.id, right.id));
        if (it == merges.end() || it->second.second != top.new_id) continue;  // stale entry
        int32_t next_pos = cur.next;
        cur.id = top.new_id;
        cur.len += right.len;
        cur.next = right.next;
        sym[next_pos].len = 0;
        if (right.next >= 0 && static_cast<size_t>(right.next) < sym.size())
          sym[right.next].prev = top.pos;
        if (cur.prev >= 0) {
          auto p = merges.find(key(sym[cur.prev].id, cur.id));
          if (p != merges.end()) queue.push({p->second.first, cur.prev, p->second.second});
        }
        if (cur.next >= 0 && static_cast<size_t>(cur.next) < sym.size()) {
          auto n = merges.find(key(cur.id, sym[cur.next].id));
          if (n != merges.end()) queue.push({n->second.first, top.pos, n->second.second});
        }
      }
    }
    for (auto& s : sym)
      if (s.len != 0) out.push_back(s.id);
  }

  // SentencePiece-style models see a whole sentence as one word ("▁The▁cat..."), which would
  // make BPE quadratic-ish and the cache useless. When no token that BPE can produce has a "▁"
  // after another character, no merge can cross such a point, so the word is merged in chunks
  // cut before each "▁" that follows another character: the same ids, much faster. Decided at
  // load (metaspace_chunks).
  static constexpr std::string_view kMeta = "\xE2\x96\x81";
  bool metaspace_chunks = false;

  // t[p..] starts with "▁" (p > 0): does another character come right before it?
  static bool meta_follows_other(std::string_view t, size_t p) {
    return p < kMeta.size() || t.compare(p - kMeta.size(), kMeta.size(), kMeta) != 0;
  }
  static bool meta_after_other(std::string_view t) {
    for (size_t p = t.find(kMeta, 1); p != std::string_view::npos; p = t.find(kMeta, p + 1))
      if (meta_follows_other(t, p)) return true;
    return false;
  }

  // Called once the vocab and merges are in; `merge_outputs_cross` says whether any merge makes
  // a token with "▁" after another character.
  void decide_metaspace_chunks(bool merge_outputs_cross) {
    metaspace_chunks = false;
    if (merge_outputs_cross || prefix || suffix) return;
    if (!vocab.count(kMeta)) return;  // "▁" could become <unk> and fuse across a cut
    if (ignore_merges)
      for (auto& [t, id] : vocab)
        if (meta_after_other(t)) return;
    metaspace_chunks = true;
  }

  void tokenize(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges) {
      auto it = vocab.find(word);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    if (metaspace_chunks) {
      size_t start = 0;
      for (size_t p = word.find(kMeta, 1); p != std::string_view::npos;
           p = word.find(kMeta, p + 1)) {
        if (meta_follows_other(word, p)) {
          merge_cached(word.substr(start, p - start), out);
          start = p;
        }
      }
      merge_cached(word.substr(start), out);
      return;
    }
    merge_cached(word, out);
  }

  void merge_cached(std::string_view word, std::vector<int32_t>& out) const {
    const bool cacheable = word.size() < kCacheMaxLen;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu);
      auto it = cache.find(word);
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    size_t start = out.size();
    merge_word(word, out);
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu);
      if (cache.size() < kCacheCapacity)
        cache.emplace(std::string(word), std::vector<int32_t>(out.begin() + start, out.end()));
    }
  }
};

// ---- decoders --------------------------------------------------------------------------------

struct Decoder {
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

struct ByteLevelDecoder : Decoder {
  void decode_chain(std::vector<std::string>& tokens) const override {
    const auto& alpha = byte_alphabet();
    std::string bytes;
    for (auto& t : tokens) {
      std::string mapped;
      bool ok = true;
      for (size_t i = 0; i < t.size() && ok;) {
        size_t l;
        uint32_t cp = text::decode_utf8(t, i, &l);
        auto it = alpha.char_byte.find(cp);
        if (it == alpha.char_byte.end())
          ok = false;
        else
          mapped.push_back(static_cast<char>(it->second));
        i += l;
      }
      bytes += ok ? mapped : t;  // a token outside the alphabet goes through as its own bytes
    }
    tokens.assign(1, text::utf8_lossy(bytes));
  }
};

struct ReplaceDecoder : Decoder {
  ReplaceRule rule;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) rule.apply(t);
  }
};

struct ByteFallbackDecoder : Decoder {
  static int parse_byte(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    int v = 0;
    for (int k = 3; k < 5; ++k) {
      char c = t[k];
      int d = (c >= '0' && c <= '9')   ? c - '0'
              : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                       : -1;
      if (d < 0) return -1;
      v = v * 16 + d;
    }
    return v;
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string bytes;
    auto flush = [&] {
      if (bytes.empty()) return;
      if (text::utf8_invalid_at(bytes) == std::string::npos) {
        out.push_back(bytes);
      } else {
        for (size_t k = 0; k < bytes.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      }
      bytes.clear();
    };
    for (auto& t : tokens) {
      int b = parse_byte(t);
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
  }
};

struct FuseDecoder : Decoder {
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

struct StripDecoder : Decoder {
  uint32_t content = ' ';
  size_t start = 0, stop = 0;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::vector<std::pair<size_t, uint32_t>> chars;  // (byte offset, code point)
      for (size_t i = 0; i < t.size();) {
        size_t l;
        chars.emplace_back(i, text::decode_utf8(t, i, &l));
        i += l;
      }
      size_t a = 0, b = chars.size();
      while (a < start && a < chars.size() && chars[a].second == content) ++a;
      for (size_t k = 0; k < stop && b > a && chars[b - 1].second == content; ++k) --b;
      size_t from = a < chars.size() ? chars[a].first : t.size();
      size_t to = b < chars.size() ? chars[b].first : t.size();
      t = t.substr(from, to - from);
    }
  }
};

struct MetaspaceDecoder : Decoder {
  std::string replacement = "\xE2\x96\x81";
  bool strip_first = true;  // prepend_scheme != never
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string out;
      const std::string& t = tokens[i];
      for (size_t k = 0; k < t.size();) {
        if (t.compare(k, replacement.size(), replacement) == 0) {
          if (!(i == 0 && strip_first)) out.push_back(' ');
          k += replacement.size();
        } else {
          out.push_back(t[k++]);
        }
      }
      tokens[i] = std::move(out);
    }
  }
};

struct SequenceDecoder : Decoder {
  std::vector<std::unique_ptr<Decoder>> items;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& d : items) d->decode_chain(tokens);
  }
};

// ---- post-processors (single sequence) ---------------------------------------------------------

struct PostProcessor {
  virtual ~PostProcessor() = default;
  virtual void process(std::vector<int32_t>& ids) const = 0;
};

struct TemplatePostProcessor : PostProcessor {
  // One entry per template piece: the ids of a special token, or nullopt for the sequence $A.
  std::vector<std::optional<std::vector<int32_t>>> single;
  void process(std::vector<int32_t>& ids) const override {
    std::vector<int32_t> out;
    out.reserve(ids.size() + 4);
    for (auto& p : single) {
      if (p)
        out.insert(out.end(), p->begin(), p->end());
      else
        out.insert(out.end(), ids.begin(), ids.end());
    }
    ids = std::move(out);
  }
};

struct WrapPostProcessor : PostProcessor {  // RobertaProcessing / BertProcessing: cls $A sep
  int32_t cls = 0, sep = 0;
  void process(std::vector<int32_t>& ids) const override {
    ids.insert(ids.begin(), cls);
    ids.push_back(sep);
  }
};

struct SequencePostProcessor : PostProcessor {
  std::vector<std::unique_ptr<PostProcessor>> items;
  void process(std::vector<int32_t>& ids) const override {
    for (auto& p : items) p->process(ids);
  }
};

// ---- added tokens ------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  std::string pattern;  // what is matched: content, or its normalized form when `normalized`
  int32_t id = -1;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
  bool same_flags(const AddedToken& o) const {
    return single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

// Leftmost-longest matching of a set of added tokens (the Aho-Corasick of `tokenizers`, done
// with a first-byte index: tokens are few and the text rarely holds their first byte).
class AddedMatcher {
 public:
  void build(const std::vector<const AddedToken*>& tokens) {
    for (auto& v : by_byte_) v.clear();
    for (const AddedToken* t : tokens)
      if (!t->pattern.empty()) by_byte_[static_cast<unsigned char>(t->pattern[0])].push_back(t);
    for (auto& v : by_byte_)
      std::stable_sort(v.begin(), v.end(), [](const AddedToken* a, const AddedToken* b) {
        return a->pattern.size() > b->pattern.size();
      });
    empty_ = tokens.empty();
  }
  bool empty() const { return empty_; }
  // The leftmost match at or after `from` (longest at that position), or nullptr.
  const AddedToken* find(std::string_view s, size_t from, size_t* at) const {
    for (size_t i = from; i < s.size(); ++i) {
      const auto& cands = by_byte_[static_cast<unsigned char>(s[i])];
      for (const AddedToken* t : cands) {
        if (s.compare(i, t->pattern.size(), t->pattern) == 0) {
          *at = i;
          return t;
        }
      }
    }
    return nullptr;
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_byte_;
  bool empty_ = true;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  Bpe model;
  std::unique_ptr<Decoder> decoder;
  std::unique_ptr<PostProcessor> post_processor;

  std::vector<std::unique_ptr<AddedToken>> added;  // by insertion
  StrMap<int32_t> added_by_content;
  std::unordered_map<int32_t, const AddedToken*> added_by_id;
  std::unordered_set<std::string> special_contents;
  AddedMatcher raw_matcher, normalized_matcher;
  int64_t vocab_size = 0;

  // `tokenizers`' AddedVocabulary::find_matches: pieces of `p` cut at added tokens.
  void split_added(Piece&& p, const AddedMatcher& m, std::vector<Piece>& out) const {
    if (p.text.empty()) return;
    if (m.empty()) {
      out.push_back(std::move(p));
      return;
    }
    const std::string& s = p.text;
    size_t start_offset = 0, from = 0, at = 0;
    auto push = [&](size_t b, size_t e, int32_t id) {
      if (b >= e) return;
      Piece q;
      q.text = s.substr(b, e - b);
      q.id = id;
      q.at_origin = p.at_origin && b == 0;
      out.push_back(std::move(q));
    };
    while (const AddedToken* t = m.find(s, from, &at)) {
      size_t start = at, stop = at + t->pattern.size();
      from = stop;
      if (t->single_word) {
        auto last_is_word = [&](size_t end) {
          size_t b = end;
          while (b > 0 && (static_cast<unsigned char>(s[b - 1]) & 0xC0) == 0x80) --b;
          if (b == 0) return false;
          size_t l;
          return text::is_word_char(text::decode_utf8(s, b - 1, &l));
        };
        bool start_space = start == 0 || !last_is_word(start);
        size_t l;
        bool stop_space = stop == s.size() || !text::is_word_char(text::decode_utf8(s, stop, &l));
        if (!start_space || !stop_space) continue;
      }
      if (t->lstrip) {
        size_t b = start;
        while (b > 0) {
          size_t c = b - 1;
          while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
          size_t l;
          if (!text::is_white_space(text::decode_utf8(s, c, &l))) break;
          b = c;
        }
        start = std::max(b, start_offset);
      }
      if (t->rstrip) {
        while (stop < s.size()) {
          size_t l;
          if (!text::is_white_space(text::decode_utf8(s, stop, &l))) break;
          stop += l;
        }
      }
      if (start_offset < start) push(start_offset, start, -1);
      if (start > stop) start = stop;  // a previous rstrip ran past this match
      Piece q;
      q.text = s.substr(start, stop - start);
      q.id = t->id;
      out.push_back(std::move(q));
      start_offset = stop;
    }
    if (start_offset < s.size()) push(start_offset, s.size(), -1);
  }

  std::vector<int32_t> encode(std::string_view input, bool add_special) const {
    size_t bad = text::utf8_invalid_at(input);
    FTUNE_CHECK(bad == std::string_view::npos, "[tokenizer] ", source,
                ": input is not valid UTF-8 (byte offset ", bad, ")");
    std::vector<Piece> stage1, pieces;
    Piece whole;
    whole.text.assign(input);
    whole.at_origin = true;
    split_added(std::move(whole), raw_matcher, stage1);
    for (auto& p : stage1) {
      if (p.id >= 0) {
        pieces.push_back(std::move(p));
        continue;
      }
      if (normalizer) normalizer->normalize(p.text);
      split_added(std::move(p), normalized_matcher, pieces);
    }
    std::vector<int32_t> ids;
    ids.reserve(input.size() / 3 + 8);
    std::vector<Piece> words;
    for (size_t i = 0; i < pieces.size();) {
      if (pieces[i].id >= 0) {
        ids.push_back(pieces[i].id);
        ++i;
        continue;
      }
      // A run of plain pieces goes through the pre-tokenizer together.
      words.clear();
      while (i < pieces.size() && pieces[i].id < 0) words.push_back(std::move(pieces[i++]));
      if (pre_tokenizer) pre_tokenizer->apply(words);
      for (auto& w : words) model.tokenize(w.text, ids);
    }
    if (add_special && post_processor) post_processor->process(ids);
    return ids;
  }

  std::optional<std::string> token_for_decode(int32_t id) const {
    auto a = added_by_id.find(id);
    if (a != added_by_id.end()) return a->second->pattern;  // normalized form, as `tokenizers`
    auto m = model.vocab_r.find(id);
    if (m != model.vocab_r.end()) return m->second;
    return std::nullopt;
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      auto t = token_for_decode(id);
      if (!t) continue;
      if (skip_special && special_contents.count(*t)) continue;
      tokens.push_back(std::move(*t));
    }
    if (!decoder) {
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i) out.push_back(' ');
        out += tokens[i];
      }
      return out;
    }
    decoder->decode_chain(tokens);
    std::string out;
    for (auto& t : tokens) out += t;
    return out;
  }
};

namespace {

// ---- parsing -------------------------------------------------------------------------------

std::unique_ptr<text::Regex> pattern_regex(const Ctx& c, const json& pat,
                                           const std::string& where) {
  // {"String": "..."} or {"Regex": "..."}
  if (!pat.is_object())
    c.fail(str_cat(where, ".pattern must be {\"String\": ..} or {\"Regex\": ..}"));
  std::string src = "[tokenizer] " + c.source + ": " + where + ":";
  if (const json* s = opt_field(pat, "String"))
    return std::make_unique<text::Regex>(
        text::regex_escape(as_str(c, *s, where + ".pattern.String")), src);
  if (const json* r = opt_field(pat, "Regex"))
    return std::make_unique<text::Regex>(
        text::onig_to_pcre2(as_str(c, *r, where + ".pattern.Regex")), src);
  c.fail(str_cat(where, ".pattern must be {\"String\": ..} or {\"Regex\": ..}"));
}

std::string type_of(const Ctx& c, const json& j, const std::string& where) {
  return str_field(c, j, "type", where);
}

std::unique_ptr<Normalizer> parse_normalizer(const Ctx& c, const json& j, const std::string& where,
                                             int depth = 0) {
  if (depth > 32) c.fail(str_cat(where, " nests too deeply"));
  std::string type = type_of(c, j, where);
  if (type == "Sequence") {
    auto n = std::make_unique<SequenceNormalizer>();
    const json& items = field(c, j, "normalizers", where);
    if (!items.is_array()) c.fail(str_cat(where, ".normalizers must be an array"));
    for (size_t i = 0; i < items.size(); ++i)
      n->items.push_back(
          parse_normalizer(c, items[i], str_cat(where, ".normalizers[", i, "]"), depth + 1));
    return n;
  }
  if (type == "Prepend") {
    auto n = std::make_unique<PrependNormalizer>();
    n->prepend = str_field(c, j, "prepend", where);
    return n;
  }
  if (type == "Replace") {
    auto n = std::make_unique<ReplaceNormalizer>();
    n->rule.re = pattern_regex(c, field(c, j, "pattern", where), where);
    n->rule.content = str_field(c, j, "content", where);
    return n;
  }
  if (type == "NFC") return std::make_unique<NfcNormalizer>();
  c.fail(str_cat(where, ": type '", type,
                 "' is not supported (supported: Prepend, Replace, NFC, Sequence)"));
}

Behavior parse_behavior(const Ctx& c, const json& j, const std::string& where) {
  std::string b = str_field(c, j, "behavior", where);
  if (b == "Removed") return Behavior::Removed;
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  if (b == "Contiguous") return Behavior::Contiguous;
  c.fail(str_cat(where, ".behavior '", b,
                 "' is not one of Removed, Isolated, MergedWithPrevious, "
                 "MergedWithNext, Contiguous"));
}

PrependScheme parse_scheme(const Ctx& c, const json& j, const std::string& where) {
  if (const json* s = opt_field(j, "prepend_scheme")) {
    std::string v = as_str(c, *s, where + ".prepend_scheme");
    if (v == "always") return PrependScheme::Always;
    if (v == "first") return PrependScheme::First;
    if (v == "never") return PrependScheme::Never;
    c.fail(str_cat(where, ".prepend_scheme '", v, "' is not one of always, first, never"));
  }
  // Files before `prepend_scheme` existed say add_prefix_space.
  return bool_opt(c, j, "add_prefix_space", true, where) ? PrependScheme::Always
                                                         : PrependScheme::Never;
}

std::string replacement_of(const Ctx& c, const json& j, const std::string& where) {
  std::string r = "\xE2\x96\x81";
  if (const json* v = opt_field(j, "replacement")) r = as_str(c, *v, where + ".replacement");
  size_t l = r.empty() ? 0 : utf8_len(static_cast<unsigned char>(r[0]));
  if (r.empty() || l != r.size()) c.fail(str_cat(where, ".replacement must be one character"));
  return r;
}

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const Ctx& c, const json& j,
                                                  const std::string& where, int depth = 0) {
  if (depth > 32) c.fail(str_cat(where, " nests too deeply"));
  std::string type = type_of(c, j, where);
  std::string src = "[tokenizer] " + c.source + ": " + where + ":";
  if (type == "Sequence") {
    auto p = std::make_unique<SequencePreTokenizer>();
    const json& items = field(c, j, "pretokenizers", where);
    if (!items.is_array()) c.fail(str_cat(where, ".pretokenizers must be an array"));
    for (size_t i = 0; i < items.size(); ++i)
      p->items.push_back(
          parse_pre_tokenizer(c, items[i], str_cat(where, ".pretokenizers[", i, "]"), depth + 1));
    return p;
  }
  if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPreTokenizer>();
    p->add_prefix_space = bool_opt(c, j, "add_prefix_space", true, where);
    p->use_regex = bool_opt(c, j, "use_regex", true, where);
    p->re = std::make_unique<text::Regex>(text::onig_to_pcre2(kGpt2Pattern), src);
    return p;
  }
  if (type == "Split") {
    auto p = std::make_unique<SplitPreTokenizer>();
    p->re = pattern_regex(c, field(c, j, "pattern", where), where);
    p->behavior = parse_behavior(c, j, where);
    p->invert = bool_opt(c, j, "invert", false, where);
    return p;
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<MetaspacePreTokenizer>();
    p->replacement = replacement_of(c, j, where);
    p->scheme = parse_scheme(c, j, where);
    p->split = bool_opt(c, j, "split", true, where);
    p->re = std::make_unique<text::Regex>(text::regex_escape(p->replacement), src);
    return p;
  }
  if (type == "Digits") {
    auto p = std::make_unique<SplitPreTokenizer>();
    p->re = std::make_unique<text::Regex>("\\p{N}", src);
    p->behavior = bool_opt(c, j, "individual_digits", false, where) ? Behavior::Isolated
                                                                    : Behavior::Contiguous;
    return p;
  }
  if (type == "WhitespaceSplit") {
    auto p = std::make_unique<SplitPreTokenizer>();
    p->re = std::make_unique<text::Regex>(kWhiteSpaceClass, src);
    p->behavior = Behavior::Removed;
    return p;
  }
  if (type == "Whitespace") {  // \w+|[^\w\s]+, keeping the matches
    auto p = std::make_unique<SplitPreTokenizer>();
    std::string ws = std::string(kWhiteSpaceClass).substr(1);  // drop '[' to splice the class
    ws.pop_back();
    const std::string w = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}";
    p->re = std::make_unique<text::Regex>("[" + w + "]+|[^" + w + ws + "]+", src);
    p->behavior = Behavior::Removed;
    p->invert = true;
    return p;
  }
  c.fail(str_cat(where, ": type '", type,
                 "' is not supported (supported: ByteLevel, Split, Metaspace, Digits, "
                 "Whitespace, WhitespaceSplit, Sequence)"));
}

std::unique_ptr<Decoder> parse_decoder(const Ctx& c, const json& j, const std::string& where,
                                       int depth = 0) {
  if (depth > 32) c.fail(str_cat(where, " nests too deeply"));
  std::string type = type_of(c, j, where);
  if (type == "Sequence") {
    auto d = std::make_unique<SequenceDecoder>();
    const json& items = field(c, j, "decoders", where);
    if (!items.is_array()) c.fail(str_cat(where, ".decoders must be an array"));
    for (size_t i = 0; i < items.size(); ++i)
      d->items.push_back(
          parse_decoder(c, items[i], str_cat(where, ".decoders[", i, "]"), depth + 1));
    return d;
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Replace") {
    auto d = std::make_unique<ReplaceDecoder>();
    d->rule.re = pattern_regex(c, field(c, j, "pattern", where), where);
    d->rule.content = str_field(c, j, "content", where);
    return d;
  }
  if (type == "Strip") {
    auto d = std::make_unique<StripDecoder>();
    std::string content = str_field(c, j, "content", where);
    size_t l = content.empty() ? 0 : utf8_len(static_cast<unsigned char>(content[0]));
    if (content.empty() || l != content.size())
      c.fail(str_cat(where, ".content must be one character"));
    d->content = text::decode_utf8(content, 0, &l);
    d->start =
        static_cast<size_t>(int_of(c, field(c, j, "start", where), where + ".start", 0, 1 << 30));
    d->stop =
        static_cast<size_t>(int_of(c, field(c, j, "stop", where), where + ".stop", 0, 1 << 30));
    return d;
  }
  if (type == "Metaspace") {
    auto d = std::make_unique<MetaspaceDecoder>();
    d->replacement = replacement_of(c, j, where);
    d->strip_first = parse_scheme(c, j, where) != PrependScheme::Never;
    return d;
  }
  c.fail(str_cat(where, ": type '", type,
                 "' is not supported (supported: ByteLevel, Metaspace, Replace, ByteFallback, "
                 "Fuse, Strip, Sequence)"));
}

std::unique_ptr<PostProcessor> parse_post_processor(const Ctx& c, const json& j,
                                                    const std::string& where,
                                                    const Tokenizer::Impl& tok, int depth = 0) {
  if (depth > 32) c.fail(str_cat(where, " nests too deeply"));
  std::string type = type_of(c, j, where);
  if (type == "Sequence") {
    auto p = std::make_unique<SequencePostProcessor>();
    const json& items = field(c, j, "processors", where);
    if (!items.is_array()) c.fail(str_cat(where, ".processors must be an array"));
    for (size_t i = 0; i < items.size(); ++i)
      p->items.push_back(parse_post_processor(c, items[i], str_cat(where, ".processors[", i, "]"),
                                              tok, depth + 1));
    return p;
  }
  if (type == "ByteLevel") return std::make_unique<SequencePostProcessor>();  // ids unchanged
  if (type == "TemplateProcessing") {
    auto p = std::make_unique<TemplatePostProcessor>();
    const json& specials = field(c, j, "special_tokens", where);
    if (!specials.is_object()) c.fail(str_cat(where, ".special_tokens must be an object"));
    const json& single = field(c, j, "single", where);
    if (!single.is_array()) c.fail(str_cat(where, ".single must be an array"));
    for (size_t i = 0; i < single.size(); ++i) {
      std::string w = str_cat(where, ".single[", i, "]");
      const json& piece = single[i];
      if (const json* st = opt_field(piece, "SpecialToken")) {
        std::string name = str_field(c, *st, "id", w + ".SpecialToken");
        auto it = specials.find(name);
        if (it == specials.end())
          c.fail(str_cat(w, ": special token '", name, "' is not in ", where, ".special_tokens"));
        const json& ids = field(c, *it, "ids", str_cat(where, ".special_tokens[", name, "]"));
        if (!ids.is_array())
          c.fail(str_cat(where, ".special_tokens[", name, "].ids must be an array"));
        std::vector<int32_t> v;
        for (auto& x : ids) v.push_back(static_cast<int32_t>(int_of(c, x, w + " ids", 0, kMaxId)));
        p->single.emplace_back(std::move(v));
      } else if (const json* sq = opt_field(piece, "Sequence")) {
        std::string id = str_field(c, *sq, "id", w + ".Sequence");
        if (id != "A")
          c.fail(str_cat(w, ": the single-sequence template can only use $A, not $", id));
        p->single.emplace_back(std::nullopt);
      } else {
        c.fail(str_cat(w, " must be {\"SpecialToken\": ..} or {\"Sequence\": ..}"));
      }
    }
    return p;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto p = std::make_unique<WrapPostProcessor>();
    auto tok_id = [&](const char* key) {
      const json& v = field(c, j, key, where);
      if (!v.is_array() || v.size() != 2) c.fail(str_cat(where, ".", key, " must be [token, id]"));
      return static_cast<int32_t>(int_of(c, v[1], str_cat(where, ".", key, "[1]"), 0, kMaxId));
    };
    p->cls = tok_id("cls");
    p->sep = tok_id("sep");
    return p;
  }
  c.fail(str_cat(where, ": type '", type,
                 "' is not supported (supported: TemplateProcessing, ByteLevel, "
                 "RobertaProcessing, BertProcessing, Sequence)"));
}

void parse_model(const Ctx& c, const json& m, Bpe& bpe) {
  if (!m.is_object()) c.fail("\"model\" must be an object");
  std::string type = "BPE";
  if (const json* t = opt_field(m, "type")) {
    type = as_str(c, *t, "model.type");
  } else if (!opt_field(m, "merges")) {
    c.fail("model has no \"type\" and no \"merges\" (only BPE models are supported)");
  }
  if (type != "BPE") c.fail(str_cat("model type '", type, "' is not supported (only BPE is)"));
  if (const json* d = opt_field(m, "dropout")) {
    if (!d->is_number() || d->get<double>() != 0.0)
      c.fail("model.dropout is set: BPE-dropout is random and is not supported");
  }
  auto opt_str = [&](const char* key) -> std::optional<std::string> {
    const json* v = opt_field(m, key);
    if (!v) return std::nullopt;
    return as_str(c, *v, str_cat("model.", key));
  };
  bpe.unk_token = opt_str("unk_token");
  bpe.prefix = opt_str("continuing_subword_prefix");
  bpe.suffix = opt_str("end_of_word_suffix");
  bpe.fuse_unk = bool_opt(c, m, "fuse_unk", false, "model");
  bpe.byte_fallback = bool_opt(c, m, "byte_fallback", false, "model");
  bpe.ignore_merges = bool_opt(c, m, "ignore_merges", false, "model");

  const json& vocab = field(c, m, "vocab", "model");
  if (!vocab.is_object()) c.fail("model.vocab must be an object {token: id}");
  bpe.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int32_t id = static_cast<int32_t>(
        int_of(c, it.value(), str_cat("model.vocab[\"", it.key(), "\"]"), 0, kMaxId));
    bpe.vocab[it.key()] = id;
    bpe.vocab_r.emplace(id, it.key());
  }
  bpe.byte_ids.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = bpe.vocab.find(std::string_view(name));
    if (it != bpe.vocab.end()) bpe.byte_ids[b] = it->second;
  }

  const json& merges = field(c, m, "merges", "model");
  if (!merges.is_array()) c.fail("model.merges must be an array");
  bpe.merges.reserve(merges.size());
  std::string joined;
  size_t plen = bpe.prefix ? bpe.prefix->size() : 0;
  int32_t rank = 0;
  bool merge_outputs_cross = false;
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& e = merges[i];
    std::string a, b;
    if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      if (s.rfind("#version", 0) == 0) continue;  // a merges.txt header line
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        c.fail(str_cat("model.merges[", i, "] '", s, "' is not two tokens separated by one space"));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      c.fail(str_cat("model.merges[", i, "] must be \"a b\" or [\"a\", \"b\"]"));
    }
    auto ia = bpe.vocab.find(a), ib = bpe.vocab.find(b);
    if (ia == bpe.vocab.end())
      c.fail(str_cat("model.merges[", i, "] uses '", a, "', which is not in the vocab"));
    if (ib == bpe.vocab.end())
      c.fail(str_cat("model.merges[", i, "] uses '", b, "', which is not in the vocab"));
    if (b.size() < plen)
      c.fail(str_cat("model.merges[", i, "]: '", b, "' is shorter than the prefix"));
    joined = a;
    joined.append(b, plen, std::string::npos);
    auto in = bpe.vocab.find(joined);
    if (in == bpe.vocab.end())
      c.fail(str_cat("model.merges[", i, "] makes '", joined, "', which is not in the vocab"));
    bpe.merges[Bpe::key(ia->second, ib->second)] = {rank++, in->second};
    merge_outputs_cross = merge_outputs_cross || Bpe::meta_after_other(joined);
  }
  bpe.decide_metaspace_chunks(merge_outputs_cross);
  if (bpe.unk_token && !bpe.vocab.count(*bpe.unk_token))
    c.fail(str_cat("model.unk_token '", *bpe.unk_token, "' is not in the vocab"));
}

void parse_added_tokens(const Ctx& c, const json& arr, Tokenizer::Impl& tok) {
  if (!arr.is_array()) c.fail("\"added_tokens\" must be an array");
  // `tokenizers` re-adds the tokens on load: a content already in the vocab keeps its id, any
  // other gets the next id after the model vocab (entry count), in file order.
  int32_t next_id = static_cast<int32_t>(tok.model.vocab.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string w = str_cat("added_tokens[", i, "]");
    const json& e = arr[i];
    auto t = std::make_unique<AddedToken>();
    t->content = str_field(c, e, "content", w);
    if (const json* idv = opt_field(e, "id")) int_of(c, *idv, w + ".id", 0, kMaxId);
    t->special = bool_opt(c, e, "special", false, w);
    t->single_word = bool_opt(c, e, "single_word", false, w);
    t->lstrip = bool_opt(c, e, "lstrip", false, w);
    t->rstrip = bool_opt(c, e, "rstrip", false, w);
    t->normalized = bool_opt(c, e, "normalized", !t->special, w);
    if (t->content.empty()) continue;
    auto existing = tok.added_by_content.find(t->content);
    if (existing != tok.added_by_content.end() &&
        tok.added_by_id.at(existing->second)->same_flags(*t))
      continue;
    int32_t id;
    if (existing != tok.added_by_content.end()) {
      id = existing->second;
    } else if (auto v = tok.model.vocab.find(t->content); v != tok.model.vocab.end()) {
      id = v->second;
    } else {
      if (next_id > kMaxId) c.fail("too many added tokens");
      id = next_id++;
    }
    t->id = id;
    t->pattern = t->content;
    if (t->normalized && tok.normalizer) tok.normalizer->normalize(t->pattern);
    tok.added_by_content[t->content] = id;
    if (t->special) tok.special_contents.insert(t->content);
    tok.added_by_id[id] = t.get();
    tok.added.push_back(std::move(t));
  }
  std::vector<const AddedToken*> raw, norm;
  for (auto& [id, t] : tok.added_by_id) (t->normalized ? norm : raw).push_back(t);
  auto by_id = [](const AddedToken* a, const AddedToken* b) { return a->id < b->id; };
  std::sort(raw.begin(), raw.end(), by_id);
  std::sort(norm.begin(), norm.end(), by_id);
  tok.raw_matcher.build(raw);
  tok.normalized_matcher.build(norm);
}

std::shared_ptr<Tokenizer::Impl> parse_tokenizer(const std::string& text,
                                                 const std::string& source) {
  Ctx c{source};
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    c.fail(str_cat("malformed JSON: ", e.what()));
  }
  if (!j.is_object()) c.fail("the top level must be a JSON object");
  auto tok = std::make_shared<Tokenizer::Impl>();
  tok->source = source;
  try {
    if (const json* v = opt_field(j, "version")) {
      if (!v->is_string() || v->get<std::string>() != "1.0")
        c.fail(str_cat("unknown tokenizer.json version ", v->dump()));
    }
    parse_model(c, field(c, j, "model", "tokenizer.json"), tok->model);
    if (const json* n = opt_field(j, "normalizer"))
      tok->normalizer = parse_normalizer(c, *n, "normalizer");
    if (const json* p = opt_field(j, "pre_tokenizer"))
      tok->pre_tokenizer = parse_pre_tokenizer(c, *p, "pre_tokenizer");
    if (const json* d = opt_field(j, "decoder")) tok->decoder = parse_decoder(c, *d, "decoder");
    if (const json* a = opt_field(j, "added_tokens")) parse_added_tokens(c, *a, *tok);
    if (const json* p = opt_field(j, "post_processor"))
      tok->post_processor = parse_post_processor(c, *p, "post_processor", *tok);
  } catch (const json::exception& e) {  // a type mismatch the checks above did not foresee
    c.fail(str_cat("unexpected JSON content: ", e.what()));
  }
  int64_t max_id = -1;
  for (auto& [id, t] : tok->model.vocab_r) max_id = std::max<int64_t>(max_id, id);
  for (auto& [id, t] : tok->added_by_id) max_id = std::max<int64_t>(max_id, id);
  tok->vocab_size = max_id + 1;
  return tok;
}

std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) {
    auto it = v.find("content");
    if (it != v.end() && it->is_string()) return it->get<std::string>();
  }
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TokenizerConfig TokenizerConfig::from_file(const std::string& path) {
  return from_string(read_file(path, "tokenizer config"), path);
}

TokenizerConfig TokenizerConfig::from_string(const std::string& text, const std::string& source) {
  Ctx c{source};
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    c.fail(str_cat("malformed JSON: ", e.what()));
  }
  if (!j.is_object()) c.fail("the top level must be a JSON object");
  TokenizerConfig cfg;
  auto tok = [&](const char* key) {
    const json* v = opt_field(j, key);
    return v ? token_content(*v) : std::string();
  };
  cfg.bos_token = tok("bos_token");
  cfg.eos_token = tok("eos_token");
  cfg.pad_token = tok("pad_token");
  cfg.unk_token = tok("unk_token");
  auto flag = [&](const char* key) -> std::optional<bool> {
    const json* v = opt_field(j, key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) c.fail(str_cat(key, " must be true or false"));
    return v->get<bool>();
  };
  cfg.add_bos_token = flag("add_bos_token");
  cfg.add_eos_token = flag("add_eos_token");
  if (const json* v = opt_field(j, "model_max_length")) {
    if (v->is_number_integer()) cfg.model_max_length = v->get<int64_t>();
    // HF writes 1e30 (a float) for "no limit": left unset.
  }
  if (const json* t = opt_field(j, "chat_template")) {
    if (t->is_string()) {
      cfg.chat_template = t->get<std::string>();
    } else if (t->is_array()) {  // [{name, template}]: the "default" one
      for (auto& e : *t) {
        if (e.is_object() && e.value("name", std::string()) == "default" &&
            e.contains("template") && e["template"].is_string())
          cfg.chat_template = e["template"].get<std::string>();
      }
      if (cfg.chat_template.empty()) c.fail("chat_template is a list without a \"default\" entry");
    } else {
      c.fail("chat_template must be a string or a list of {name, template}");
    }
  }
  return cfg;
}

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl, TokenizerConfig config)
    : impl_(std::move(impl)), config_(std::move(config)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::Tokenizer(const Tokenizer&) = default;
Tokenizer& Tokenizer::operator=(const Tokenizer&) = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_string(const std::string& json_text, const std::string& source) {
  return Tokenizer(parse_tokenizer(json_text, source), TokenizerConfig{});
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  Tokenizer t(parse_tokenizer(read_file(path, "tokenizer.json"), path), TokenizerConfig{});
  auto cfg = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(cfg, ec)) t.config_ = TokenizerConfig::from_file(cfg.string());
  return t;
}

Tokenizer Tokenizer::from_folder(const std::string& dir) {
  auto p = std::filesystem::path(dir) / "tokenizer.json";
  std::error_code ec;
  FTUNE_CHECK(std::filesystem::exists(p, ec), "[tokenizer] ", dir,
              " has no tokenizer.json (only tokenizer.json BPE tokenizers are supported)");
  return from_file(p.string());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  return impl_->encode(text, add_special_tokens);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto a = impl_->added_by_content.find(token);
  if (a != impl_->added_by_content.end()) return a->second;
  auto m = impl_->model.vocab.find(token);
  if (m != impl_->model.vocab.end()) return m->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  auto a = impl_->added_by_id.find(id);
  if (a != impl_->added_by_id.end()) return a->second->content;
  auto m = impl_->model.vocab_r.find(id);
  if (m != impl_->model.vocab_r.end()) return m->second;
  return std::nullopt;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

bool Tokenizer::is_special(int32_t id) const {
  auto a = impl_->added_by_id.find(id);
  return a != impl_->added_by_id.end() && a->second->special;
}

std::optional<int32_t> Tokenizer::bos_id() const {
  return config_.bos_token.empty() ? std::nullopt : token_to_id(config_.bos_token);
}
std::optional<int32_t> Tokenizer::eos_id() const {
  return config_.eos_token.empty() ? std::nullopt : token_to_id(config_.eos_token);
}
std::optional<int32_t> Tokenizer::pad_id() const {
  return config_.pad_token.empty() ? std::nullopt : token_to_id(config_.pad_token);
}

const TokenizerConfig& Tokenizer::config() const { return config_; }
void Tokenizer::set_config(TokenizerConfig config) { config_ = std::move(config); }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace ftune
