// ftune::Error and the check macros used everywhere. Library code throws; only main() exits.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace ftune {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
inline void format_into(std::ostringstream&) {}
template <class T, class... R>
void format_into(std::ostringstream& os, const T& v, const R&... rest) {
  os << v;
  format_into(os, rest...);
}
}  // namespace detail

// Concatenates its arguments with operator<< into one string.
template <class... A>
std::string str_cat(const A&... a) {
  std::ostringstream os;
  detail::format_into(os, a...);
  return os.str();
}

[[noreturn]] void throw_error(const std::string& msg, const char* file, int line);

}  // namespace ftune

// FTUNE_CHECK(cond, "[op] message parts", ...): throws ftune::Error with file:line appended.
#define FTUNE_CHECK(cond, ...)                                                    \
  do {                                                                            \
    if (!(cond)) ::ftune::throw_error(::ftune::str_cat(__VA_ARGS__), __FILE__, __LINE__); \
  } while (0)

#define FTUNE_THROW(...) ::ftune::throw_error(::ftune::str_cat(__VA_ARGS__), __FILE__, __LINE__)
