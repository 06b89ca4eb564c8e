// Shared by the libFuzzer harnesses (docs/fuzzing.md). A harness feeds one input to a reader's real
// entry points: a dmat::Error is the reader rejecting the input, which is correct behaviour;
// anything else is a finding: a crash or sanitizer report, an exception of another type (it reaches
// std::terminate), a broken property checked with fuzz_require, or libFuzzer's own limits (time per
// input, 2 GB rss).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "core/error.h"

namespace dmat::fuzz {

// A scratch directory per process (libFuzzer's -fork / -jobs workers each get their own), removed
// at exit. Readers take paths, so inputs are written to files in it.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/dmat_fuzz_XXXXXX";
    if (!::mkdtemp(templ.data())) {
      std::perror("fuzz: mkdtemp");
      std::abort();
    }
    static const std::string keep = templ;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(keep, ec);
    });
    return templ;
  }();
  return dir;
}

// Writes bytes to path (replacing it), creating its parent directories. No fsync: speed matters here.
inline void write_bytes(const std::string& path, std::string_view bytes) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  for (size_t done = 0; done < bytes.size();) {
    const ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    done += size_t(w);
  }
  ::close(fd);
}

// The input cut at NUL bytes into at most `max_parts` parts (the last part keeps any further NULs):
// how a harness that needs several files or strings reads them from one input.
inline std::vector<std::string_view> split_parts(const uint8_t* data, size_t size, size_t max_parts) {
  std::vector<std::string_view> parts;
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  while (parts.size() + 1 < max_parts) {
    const size_t nul = rest.find('\0');
    if (nul == std::string_view::npos) break;
    parts.push_back(rest.substr(0, nul));
    rest.remove_prefix(nul + 1);
  }
  parts.push_back(rest);
  return parts;
}

// A property every accepted input must have; a broken one is a finding (abort: libFuzzer saves the input).
inline void fuzz_require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz finding: %s\n", what);
  std::abort();
}

// The readers' warnings would flood the fuzzer's output: only errors of the harness itself show.
inline void quiet_logging() { spdlog::set_level(spdlog::level::off); }

// Runs f; a dmat::Error is the reader's rejection of a bad input.
template <class F>
int rejecting(F&& f) {
  try {
    f();
  } catch (const dmat::Error&) {
  }
  return 0;
}

}  // namespace dmat::fuzz
