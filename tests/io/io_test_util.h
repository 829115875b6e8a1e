// Helpers for the io tests: a scratch folder, raw safetensors files built byte by byte, and
// assertions on error messages.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace ftune::test {

// A fresh folder under $TMPDIR, removed with its contents at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "ftune_io_XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : "";
    if (path_.empty()) throw std::runtime_error("mkdtemp failed");
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

inline std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// 8-byte little-endian `header_len` (default: the header's size), the header, then data_bytes
// bytes of data (0, 1, 2, ...).
inline std::vector<uint8_t> st_bytes(const std::string& header, size_t data_bytes,
                                     int64_t header_len = -1) {
  uint64_t n = header_len < 0 ? header.size() : uint64_t(header_len);
  std::vector<uint8_t> out(8 + header.size() + data_bytes);
  for (size_t i = 0; i < 8; ++i) out[i] = uint8_t(n >> (8 * i));
  for (size_t i = 0; i < header.size(); ++i) out[8 + i] = uint8_t(header[i]);
  for (size_t i = 0; i < data_bytes; ++i) out[8 + header.size() + i] = uint8_t(i);
  return out;
}

// The contiguous bytes of a CPU tensor.
inline std::vector<uint8_t> tensor_bytes(const Tensor& t) {
  Tensor c = t.contiguous();
  auto* p = static_cast<const uint8_t*>(c.raw_data());
  return std::vector<uint8_t>(p, p + size_t(c.numel()) * dtype_size(c.dtype()));
}

// Runs fn, which must throw ftune::Error whose message holds every one of `parts`.
template <class F>
void expect_error(F&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected ftune::Error holding '" << *parts.begin() << "'";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
  }
}

inline bool is_mapped(const std::string& path) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.size() >= path.size() &&
        line.compare(line.size() - path.size(), path.size(), path) == 0)
      return true;
  return false;
}

}  // namespace ftune::test
