// Errors a user can act on. Throw dmat::Error at boundaries (config, files, CLI) with a message
// that names what is wrong and what was expected; DMAT_CHECK guards internal invariants.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace dmat {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace dmat

#define DMAT_CHECK(cond, ...)                                                                 \
  do {                                                                                        \
    if (!(cond))                                                                              \
      throw ::dmat::Error(::fmt::format("internal check failed at {}:{}: {} ({})", __FILE__, \
                                        __LINE__, #cond, ::fmt::format(__VA_ARGS__)));        \
  } while (0)
