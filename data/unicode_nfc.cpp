// NFC normalization (UAX #15): full canonical decomposition, canonical ordering, then canonical
// composition. Qwen2's tokenizer.json normalizes with NFC. Tables: data/unicode_nfc_tables.inc.
#include <algorithm>
#include <cstdint>

#include "data/text_util.h"

namespace ftune::text {

namespace {

struct CccEntry {
  uint32_t cp, ccc;
};
struct DecompEntry {
  uint32_t cp, a, b;  // b == 0: a singleton decomposition
};
struct ComposeEntry {
  uint32_t a, b, c;
};
#include "data/unicode_nfc_tables.inc"

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint32_t ccc_of(uint32_t cp) {
  if (cp < 0x300) return 0;
  auto it = std::lower_bound(std::begin(kCcc), std::end(kCcc), cp,
                             [](const CccEntry& e, uint32_t v) { return e.cp < v; });
  return (it != std::end(kCcc) && it->cp == cp) ? it->ccc : 0;
}

void decompose(uint32_t cp, std::u32string& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0) {
    auto it = std::lower_bound(std::begin(kDecomp), std::end(kDecomp), cp,
                               [](const DecompEntry& e, uint32_t v) { return e.cp < v; });
    if (it != std::end(kDecomp) && it->cp == cp) {
      decompose(it->a, out);
      if (it->b) decompose(it->b, out);
      return;
    }
  }
  out.push_back(cp);
}

// The primary composite of (a, b), or 0.
uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  auto it = std::lower_bound(std::begin(kCompose), std::end(kCompose), std::pair(a, b),
                             [](const ComposeEntry& e, std::pair<uint32_t, uint32_t> v) {
                               return e.a != v.first ? e.a < v.first : e.b < v.second;
                             });
  return (it != std::end(kCompose) && it->a == a && it->b == b) ? it->c : 0;
}

}  // namespace

std::string nfc(std::string_view s) {
  bool ascii = true;
  for (char c : s) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  if (ascii) return std::string(s);
  std::u32string buf;
  buf.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t l;
    decompose(decode_utf8(s, i, &l), buf);
    i += l;
  }
  // Canonical ordering: a stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < buf.size();) {
    if (ccc_of(buf[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < buf.size() && ccc_of(buf[j]) != 0) ++j;
    std::stable_sort(buf.begin() + i, buf.begin() + j,
                     [](uint32_t a, uint32_t b) { return ccc_of(a) < ccc_of(b); });
    i = j;
  }
  // Canonical composition (the UAX #15 sample algorithm).
  if (!buf.empty()) {
    size_t starter = 0, out = 1;
    uint32_t last_class = ccc_of(buf[0]) ? 256 : 0;
    for (size_t i = 1; i < buf.size(); ++i) {
      uint32_t ch = buf[i], cls = ccc_of(ch);
      uint32_t comp = compose(buf[starter], ch);
      if (comp && (last_class < cls || last_class == 0)) {
        buf[starter] = comp;
        continue;
      }
      if (cls == 0) starter = out;
      last_class = cls;
      buf[out++] = ch;
    }
    buf.resize(out);
  }
  std::string r;
  r.reserve(s.size());
  for (uint32_t cp : buf) append_utf8(r, cp);
  return r;
}

}  // namespace ftune::text
