// Deterministic robustness tests (the ctest side of tests/fuzz/fuzz_tokenizer_json.cpp): thousands
// of mutations of valid tokenizer.json files thrown at the parser, then encode/decode with what
// loads, and random bytes encoded by valid tokenizers. Only ftune::Error may escape.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/error.h"
#include "data/tokenizer.h"

using namespace ftune;
using json = nlohmann::json;

namespace {

std::vector<std::string> seeds() {
  std::vector<std::string> out;
  auto dir = std::filesystem::path(FTUNE_SOURCE_DIR) / "tests/fuzz/corpus/tokenizer_json";
  std::vector<std::filesystem::path> files;
  for (auto& e : std::filesystem::directory_iterator(dir)) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    out.push_back(ss.str());
  }
  return out;
}

// Values that stress a parser: wrong types, huge and negative numbers, odd strings and regexes.
json odd_value(std::mt19937& rng) {
  switch (rng() % 18) {
    case 0:
      return nullptr;
    case 1:
      return -1;
    case 2:
      return 4294967296LL;
    case 3:
      return 2147483647;
    case 4:
      return 1e300;
    case 5:
      return "";
    case 6:
      return "(unclosed";
    case 7:
      return "\\s*";  // a regex that matches empty everywhere
    case 8:
      return "a|";
    case 9:
      return json::array();
    case 10:
      return json::object();
    case 11:
      return true;
    case 12:
      return "\xe2\x96\x81";
    case 13:
      return json::array({"a", "b"});
    case 14:
      return "(?<=a)b|\\K";
    case 15:
      return "((a+)+)+$";
    case 16:
      return std::string(300, 'x');
    default:
      return "Split";
  }
}

// Walks to a random node of j and replaces, removes or duplicates something there.
void mutate_structure(json& j, std::mt19937& rng) {
  json* node = &j;
  for (int depth = 0; depth < 6; ++depth) {
    if (node->is_object() && !node->empty()) {
      auto it = node->begin();
      std::advance(it, rng() % node->size());
      if (rng() % 3 == 0) break;
      node = &it.value();
    } else if (node->is_array() && !node->empty()) {
      if (rng() % 3 == 0) break;
      node = &(*node)[rng() % node->size()];
    } else {
      break;
    }
  }
  switch (rng() % 5) {
    case 0:
      *node = odd_value(rng);
      break;
    case 1:
      if (node->is_object() && !node->empty()) {
        auto it = node->begin();
        std::advance(it, rng() % node->size());
        node->erase(it);
      } else {
        *node = odd_value(rng);
      }
      break;
    case 2:
      if (node->is_object() && !node->empty()) {
        auto it = node->begin();
        std::advance(it, rng() % node->size());
        it.value() = odd_value(rng);
      } else if (node->is_array()) {
        node->push_back(odd_value(rng));
      }
      break;
    case 3:
      if (node->is_array() && !node->empty()) {  // duplicate an element (repeated merges/tokens)
        json copy = (*node)[rng() % node->size()];
        node->push_back(copy);
      } else if (node->is_string()) {
        *node = node->get<std::string>() + node->get<std::string>();
      }
      break;
    default:
      if (node->is_object() && node->contains("type")) {  // a different known or unknown type
        static const char* types[] = {
            "Sequence", "ByteLevel", "Metaspace",          "Split", "Replace", "Strip",
            "BPE",      "Digits",    "TemplateProcessing", "Nope"};
        (*node)["type"] = types[rng() % 10];
      } else {
        *node = odd_value(rng);
      }
  }
}

void mutate_bytes(std::string& s, std::mt19937& rng) {
  int n = 1 + rng() % 4;
  for (int k = 0; k < n && !s.empty(); ++k) {
    size_t pos = rng() % s.size();
    switch (rng() % 5) {
      case 0:
        s[pos] = static_cast<char>(rng());
        break;
      case 1:
        s.erase(pos, 1 + rng() % 8);
        break;
      case 2:
        s.insert(pos, 1, "{}[]\",:\\0-9e\xe2"[rng() % 15]);
        break;
      case 3:
        s.resize(pos);
        break;  // truncation
      default: {
        size_t len = std::min<size_t>(1 + rng() % 32, s.size() - pos);
        s.insert(rng() % s.size(), s.substr(pos, len));
      }
    }
  }
}

std::string random_text(std::mt19937& rng, bool valid_utf8) {
  std::string s;
  int n = rng() % 40;
  if (!valid_utf8) {
    for (int i = 0; i < n; ++i) s.push_back(static_cast<char>(rng()));
    return s;
  }
  for (int i = 0; i < n; ++i) {
    uint32_t cp;
    switch (rng() % 6) {
      case 0:
        cp = 0x20 + rng() % 0x60;
        break;
      case 1:
        cp = "\t\n\r \x0b\x0c"[rng() % 6];
        break;
      case 2:
        cp = 0x80 + rng() % 0x780;
        break;
      case 3:
        cp = 0x800 + rng() % 0xF800;
        break;
      case 4:
        cp = 0x10000 + rng() % 0x100000;
        break;
      default:
        cp = 0x2581;
        break;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
    char buf[5] = {};
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      s += {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
    } else if (cp < 0x10000) {
      s += {static_cast<char>(0xE0 | (cp >> 12)), static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
            static_cast<char>(0x80 | (cp & 0x3F))};
    } else {
      s += {static_cast<char>(0xF0 | (cp >> 18)), static_cast<char>(0x80 | ((cp >> 12) & 0x3F)),
            static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), static_cast<char>(0x80 | (cp & 0x3F))};
    }
    (void)buf;
  }
  if (rng() % 4 == 0) s += "<s><|eot|>[L] [R]w</s>";
  return s;
}

// Runs what a loaded tokenizer offers; returns a description of any non-ftune exception.
std::string exercise(const std::string& json_text, std::mt19937& rng, int* loaded) {
  try {
    Tokenizer t = Tokenizer::from_string(json_text, "mutant.json");
    ++*loaded;
    for (int k = 0; k < 3; ++k) {
      try {
        auto ids = t.encode(random_text(rng, true), k % 2 == 0);
        t.decode(ids, k == 1);
      } catch (const Error&) {
      }
    }
    std::vector<int32_t> ids;
    for (int k = 0; k < 16; ++k) ids.push_back(static_cast<int32_t>(rng() % 40) - 5);
    t.decode(ids);
    t.decode(ids, true);
  } catch (const Error&) {
  } catch (const std::exception& e) {
    return std::string("std::exception: ") + e.what();
  } catch (...) {
    return "unknown exception";
  }
  return {};
}

}  // namespace

TEST(TokenizerFuzz, MutatedJsonOnlyThrowsFtuneError) {
  auto base = seeds();
  ASSERT_GE(base.size(), 3u);
  std::mt19937 rng(20240531);
  int total = 0, loaded = 0, failures = 0;
  for (int i = 0; i < 6000; ++i) {
    const std::string& seed = base[i % base.size()];
    std::string mutant;
    if (i % 2 == 0) {
      json j = json::parse(seed);
      int n = 1 + rng() % 3;
      for (int k = 0; k < n; ++k) mutate_structure(j, rng);
      mutant = j.dump();
    } else {
      mutant = seed;
      mutate_bytes(mutant, rng);
    }
    ++total;
    std::string bad = exercise(mutant, rng, &loaded);
    if (!bad.empty() && ++failures <= 5) ADD_FAILURE() << bad << "\n  for input: " << mutant;
  }
  EXPECT_EQ(failures, 0);
  // Both paths must be exercised: many mutants load (then encode/decode run), many are refused.
  EXPECT_GT(loaded, total / 10);
  EXPECT_LT(loaded, total);
  std::printf("[ fuzz ] %d mutants, %d loaded\n", total, loaded);
}

TEST(TokenizerFuzz, RandomBytesEncodeOrThrowFtuneError) {
  std::vector<Tokenizer> toks;
  for (auto& s : seeds()) toks.push_back(Tokenizer::from_string(s));
  for (const char* name : {"gpt2", "sp_legacy", "qwen2"})
    toks.push_back(Tokenizer::from_folder(std::string(FTUNE_SOURCE_DIR) +
                                          "/tests/fixtures/tokenizers/" + name));
  std::mt19937 rng(7);
  int encoded = 0, refused = 0;
  for (int i = 0; i < 6000; ++i) {
    const Tokenizer& t = toks[i % toks.size()];
    std::string s = random_text(rng, i % 3 != 0);
    try {
      auto ids = t.encode(s);
      t.decode(ids);
      ++encoded;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not valid UTF-8"), std::string::npos) << e.what();
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "non-ftune exception " << e.what();
    }
  }
  EXPECT_GT(encoded, 3000);
  EXPECT_GT(refused, 500);
}
