#include "core/error.h"

#include <cstring>

namespace ftune {

void throw_error(const std::string& msg, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw Error(str_cat(msg, " (", base ? base + 1 : file, ":", line, ")"));
}

}  // namespace ftune
