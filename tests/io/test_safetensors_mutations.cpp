// The safetensors header parser on 20000 deterministic mutations of a valid file: it must either
// accept (and then every invariant of a valid file holds and every tensor reads) or throw
// ftune::Error, never crash or throw anything else. The libFuzzer target (tests/fuzz/) explores
// further under ASan; this one runs in every CI build.
#include <gtest/gtest.h>

#include <random>

#include "io/safetensors.h"

using namespace ftune;

namespace {

std::vector<uint8_t> valid_file() {
  NamedTensors t = {
      {"model.embed.weight", Tensor::full({3, 4}, 0.5)},
      {"model.norm.weight", Tensor::full({4}, 1.0, DType::bf16)},
      {"ids", Tensor::arange(5)},
      {"mask", Tensor::ones({2}, DType::b8)},
      {"half", Tensor::full({2, 1}, -2.0, DType::f16)},
      {"empty", Tensor::zeros({0}, DType::f64)},
      {"i", Tensor::full({1}, 7, DType::i32)},
  };
  return serialize_safetensors(t, {{"format", "pt"}});
}

void mutate(std::vector<uint8_t>& b, std::mt19937_64& g) {
  static const uint8_t kInteresting[] = {'{', '}', '[', ']',  '"',  ',',  ':',  '-', '0', '1',
                                         '9', ' ', 0,   0x7f, 0x80, 0xc0, 0xff, 'e', '.', '\\'};
  auto pick = [&](size_t n) { return n ? size_t(g() % n) : 0; };
  uint64_t hlen = 0;
  if (b.size() >= 8) std::memcpy(&hlen, b.data(), 8);
  switch (g() % 9) {
    case 0:  // flip a bit
      if (!b.empty()) b[pick(b.size())] ^= uint8_t(1u << (g() % 8));
      break;
    case 1:  // a random byte
      if (!b.empty()) b[pick(b.size())] = uint8_t(g());
      break;
    case 2:  // a JSON-significant byte, inside the header most of the time
      if (!b.empty())
        b[8 + pick(std::min<size_t>(b.size() - 8, hlen + 1))] =
            kInteresting[pick(sizeof kInteresting)];
      break;
    case 3:  // truncate
      b.resize(pick(b.size() + 1));
      break;
    case 4: {  // change a digit of the header (offsets, shapes): the semantic checks
      std::vector<size_t> digits;
      for (size_t i = 8; i < b.size() && i < 8 + hlen; ++i)
        if (b[i] >= '0' && b[i] <= '9') digits.push_back(i);
      if (!digits.empty()) b[digits[pick(digits.size())]] = uint8_t('0' + g() % 10);
      break;
    }
    case 5: {  // a new header length: near the truth, huge, or random
      uint64_t v[] = {hlen + 1, hlen - 1,       hlen + 8,  uint64_t(b.size()),
                      ~0ull,    100'000'001ull, g() % 256, g()};
      uint64_t n = v[pick(8)];
      if (b.size() >= 8) std::memcpy(b.data(), &n, 8);
      break;
    }
    case 6: {  // insert random bytes
      size_t at = pick(b.size() + 1), n = 1 + pick(16);
      std::vector<uint8_t> ins(n);
      for (auto& x : ins) x = uint8_t(g());
      b.insert(b.begin() + long(at), ins.begin(), ins.end());
      break;
    }
    case 7: {  // erase a range
      if (b.empty()) break;
      size_t at = pick(b.size()), n = 1 + pick(std::min<size_t>(16, b.size() - at));
      b.erase(b.begin() + long(at), b.begin() + long(at + n));
      break;
    }
    default: {  // duplicate a chunk of the header in place (repeated keys, nested braces)
      if (b.size() < 16) break;
      size_t at = 8 + pick(b.size() - 8), n = 1 + pick(std::min<size_t>(32, b.size() - at));
      std::vector<uint8_t> chunk(b.begin() + long(at), b.begin() + long(at + n));
      b.insert(b.begin() + long(at), chunk.begin(), chunk.end());
    }
  }
}

}  // namespace

TEST(SafetensorsMutations, ParserOnlyReturnsOrThrowsError) {
  const std::vector<uint8_t> base = valid_file();
  ASSERT_NO_THROW(parse_safetensors_header(base.data(), base.size(), "base"));
  std::mt19937_64 g(20240611);
  int accepted = 0, rejected = 0;
  for (int it = 0; it < 20000; ++it) {
    std::vector<uint8_t> b = base;
    for (int k = 1 + int(g() % 3); k > 0; --k) mutate(b, g);
    try {
      SafetensorsHeader h = parse_safetensors_header(b.data(), b.size(), "mutant");
      // Accepted: the invariants of a valid file hold and every readable tensor reads.
      uint64_t expect = 0;
      for (const auto& e : h.entries) {
        ASSERT_EQ(e.begin, expect) << "iteration " << it;
        ASSERT_EQ(e.nbytes() * 8, uint64_t(e.numel()) * uint64_t(st_dtype_bits(e.dtype)));
        expect = e.end;
        if (st_to_dtype(e.dtype))
          EXPECT_EQ(safetensors_entry_to_tensor(e, b.data() + h.data_start(), "mutant").numel(),
                    e.numel());
      }
      ASSERT_EQ(h.data_start() + expect, b.size()) << "iteration " << it;
      ++accepted;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << " threw a non-ftune exception: " << e.what();
    }
  }
  // Both outcomes happen (data-byte flips stay valid; most header edits do not).
  EXPECT_GT(accepted, 200);
  EXPECT_GT(rejected, 5000);
  std::printf("mutants: %d accepted, %d rejected\n", accepted, rejected);
}
