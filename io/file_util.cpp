#include "io/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace ftune {

std::string read_text_file(const std::string& path, const char* component) {
  FTUNE_CHECK(!dir_exists(path), "[", component, "] cannot read ", path, ": is a directory");
  std::ifstream f(path, std::ios::binary);
  FTUNE_CHECK(f.good(), "[", component, "] cannot read ", path, ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  FTUNE_CHECK(!f.bad(), "[", component, "] error reading ", path);
  return ss.str();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool dir_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string path_join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string path_dirname(const std::string& path) {
  size_t p = path.find_last_of('/');
  if (p == std::string::npos) return ".";
  return p == 0 ? "/" : path.substr(0, p);
}

std::string json_brief(const nlohmann::json& v) {
  if (!v.is_structured()) return v.dump();
  std::string out = v.is_array() ? "[" : "{";
  size_t i = 0;
  for (auto it = v.begin(); it != v.end() && out.size() < 200; ++it, ++i) {
    if (i) out += ", ";
    if (v.is_object()) out += nlohmann::json(it.key()).dump() + ": ";
    out += it->is_array() ? "[...]" : it->is_object() ? "{...}" : it->dump();
  }
  if (out.size() > 200) out = out.substr(0, 200) + "...";
  return out + (v.is_array() ? "]" : "}");
}

AtomicFile::AtomicFile(std::string path, const char* component)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), component_(component) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FTUNE_CHECK(fd_ >= 0, "[", component_, "] cannot create ", tmp_, ": ", std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  FTUNE_CHECK(fd_ >= 0 && !committed_, "[", component_, "] write to ", path_, " after commit");
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    // Linux writes at most ~2 GiB per call; loop for big tensors and partial writes.
    ssize_t n = ::write(fd_, p, bytes < (size_t(1) << 30) ? bytes : (size_t(1) << 30));
    if (n < 0 && errno == EINTR) continue;
    FTUNE_CHECK(n > 0, "[", component_, "] error writing ", tmp_, ": ", std::strerror(errno));
    p += n;
    bytes -= size_t(n);
  }
}

void AtomicFile::commit() {
  FTUNE_CHECK(fd_ >= 0 && !committed_, "[", component_, "] commit of ", path_, " twice");
  FTUNE_CHECK(::fsync(fd_) == 0, "[", component_, "] fsync of ", tmp_, ": ", std::strerror(errno));
  int rc = ::close(fd_);
  fd_ = -1;
  FTUNE_CHECK(rc == 0, "[", component_, "] closing ", tmp_, ": ", std::strerror(errno));
  FTUNE_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, "[", component_, "] cannot rename ", tmp_,
              " to ", path_, ": ", std::strerror(errno));
  committed_ = true;
  // The rename itself is durable only once the folder is synced; a failure here loses nothing.
  int dfd = ::open(path_dirname(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const std::string& path, const std::string& contents,
                       const char* component) {
  AtomicFile f(path, component);
  f.write(contents);
  f.commit();
}

}  // namespace ftune
