// Small file helpers shared by io/: whole-file reads and crash-safe writes.
#pragma once
#include <cstddef>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace ftune {

// Reads a whole file; throws ftune::Error "[<component>] cannot read <path>: <reason>".
std::string read_text_file(const std::string& path, const char* component);

bool file_exists(const std::string& path);  // a regular file (following symlinks)
bool dir_exists(const std::string& path);
std::string path_join(const std::string& dir, const std::string& name);
std::string path_dirname(const std::string& path);  // "." when there is no slash

// A JSON value for an error message: scalars as JSON, containers shallowly ("[1, 2, [...]]") and
// cut at 200 characters. json::dump() recurses, so a hostile, deeply nested value must never
// reach it.
std::string json_brief(const nlohmann::json& v);

// Writes "<path>.tmp", then commit() fsyncs it and renames it onto `path` (and fsyncs the folder),
// so `path` is either the old file or the complete new one, never a torn write. Destroyed without
// commit() (an exception on the way), it removes the temporary file.
class AtomicFile {
 public:
  AtomicFile(std::string path, const char* component);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t bytes);
  void write(const std::string& s) { write(s.data(), s.size()); }
  void commit();
  const std::string& tmp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  const char* component_;
  int fd_ = -1;
  bool committed_ = false;
};

// write + commit of a whole string.
void write_file_atomic(const std::string& path, const std::string& contents, const char* component);

}  // namespace ftune
