#include "core/env.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace dmat {

int env_choice(const char* name, std::initializer_list<const char*> choices, int fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return fallback;
  int i = 0;
  std::string listed;
  for (const char* c : choices) {
    if (std::strcmp(e, c) == 0) return i;
    listed += (i > 0 ? ", " : "") + std::string(c);
    ++i;
  }
  fail("{} must be one of {} (got '{}')", name, listed, e);
}

}  // namespace dmat
