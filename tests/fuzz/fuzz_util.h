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
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "core/error.h"

namespace dmat::fuzz {

// A scratch directory per process (libFuzzer's -fork / -jobs workers each get their own), removed
// at a normal exit (scripts/fuzz.sh removes the TMPDIR it is in, whatever the ending). Readers take
// paths, so inputs are written to files in it.
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

// ---- structure-aware mutation of JSON inputs ------------------------------------------------------
// Byte mutations rarely keep JSON valid, so a reader's checks behind the parser (a field of the
// wrong type, an id beyond INT64_MAX) are reached slowly. A harness of a JSON format defines
// LLVMFuzzerCustomMutator with mutate_json: half of the mutations are libFuzzer's own; the others
// parse one NUL-separated part (or a safetensors file's header), change one value in it (a value of
// another type, a boundary number, a removed or copied key) and write it back.

// Values a JSON field is changed to: each type, boundaries of the integer widths readers use.
inline const std::vector<nlohmann::json>& json_value_pool() {
  static const std::vector<nlohmann::json> pool = [] {
    using nlohmann::json;
    return std::vector<json>{nullptr, true, false, 0, -1, 1, 2, 5, 0.5, -0.0, 1e308, -1e-300,
                             int64_t(1) << 31, int64_t(1) << 32, std::numeric_limits<int64_t>::max(),
                             std::numeric_limits<int64_t>::min(), std::numeric_limits<uint64_t>::max(),
                             uint64_t(1) << 63, "", "x", "NFC", "Sequence", "ByteLevel", "mha", "dma",
                             json::array(), json::object(), json::array({1, 2}), json::object({{"type", "x"}})};
  }();
  return pool;
}

// One structural change to j (which holds at least one value).
inline void mutate_json_value(nlohmann::json& j, std::minstd_rand& rng) {
  std::vector<nlohmann::json*> nodes{&j};
  std::vector<std::string> keys;
  for (size_t i = 0; i < nodes.size() && nodes.size() < 100000; ++i) {
    if (nodes[i]->is_object())
      for (auto it = nodes[i]->begin(); it != nodes[i]->end(); ++it) keys.push_back(it.key()), nodes.push_back(&*it);
    else if (nodes[i]->is_array())
      for (auto& e : *nodes[i]) nodes.push_back(&e);
  }
  nlohmann::json& n = *nodes[rng() % nodes.size()];
  const auto& pool = json_value_pool();
  switch (rng() % 4) {
    case 0:  // another value
      n = pool[rng() % pool.size()];
      break;
    case 1:  // a key removed, an element dropped
      if (n.is_object() && !n.empty()) {
        auto it = n.begin();
        std::advance(it, long(rng() % n.size()));
        n.erase(it);
      } else if (n.is_array() && !n.empty()) {
        n.erase(n.begin() + long(rng() % n.size()));
      } else {
        n = pool[rng() % pool.size()];
      }
      break;
    case 2:  // a key of the document (or an element) added with a value of the pool
      if (n.is_object() && !keys.empty()) n[keys[rng() % keys.size()]] = pool[rng() % pool.size()];
      else if (n.is_array()) n.push_back(n.empty() ? pool[rng() % pool.size()] : n[rng() % n.size()]);
      else n = pool[rng() % pool.size()];
      break;
    default:  // an integer nudged by one (modulo 2^64, stored signed or unsigned), a float negated
      if (n.is_number_integer()) {
        const uint64_t v = n.is_number_unsigned() ? n.get<uint64_t>() : uint64_t(n.get<int64_t>());
        const uint64_t w = v + uint64_t(rng() % 3) - 1;
        n = rng() % 2 ? nlohmann::json(w) : nlohmann::json(int64_t(w));
      } else if (n.is_number()) {
        n = -n.get<double>();
      } else {
        n = pool[rng() % pool.size()];
      }
  }
}

// A safetensors file's JSON header mutated in place (its length field rewritten); false when the
// bytes hold no parsable header.
inline bool mutate_safetensors_header(std::string& file, std::minstd_rand& rng) {
  if (file.size() < 8) return false;
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= uint64_t(uint8_t(file[size_t(i)])) << (8 * i);
  if (len > file.size() - 8) return false;
  nlohmann::json h = nlohmann::json::parse(file.substr(8, len), nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded()) return false;
  mutate_json_value(h, rng);
  const std::string text = h.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char(uint64_t(text.size()) >> (8 * i));
  file = out + text + file.substr(8 + len);
  return true;
}

}  // namespace dmat::fuzz

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace dmat::fuzz {

// max_parts: as split_parts (the last part keeps its NULs); a part that does not parse as JSON is
// taken as a safetensors file (the checkpoint's weights) when its header parses.
inline size_t mutate_json(uint8_t* data, size_t size, size_t max_size, unsigned seed, size_t max_parts) {
  std::minstd_rand rng(seed);
  if (rng() % 2 == 0) return LLVMFuzzerMutate(data, size, max_size);
  std::vector<std::string> parts;
  for (auto p : split_parts(data, size, max_parts)) parts.emplace_back(p);
  std::string& part = parts[rng() % parts.size()];
  nlohmann::json j = nlohmann::json::parse(part, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded()) {
    mutate_json_value(j, rng);
    part = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else if (!mutate_safetensors_header(part, rng)) {
    return LLVMFuzzerMutate(data, size, max_size);
  }
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? std::string(1, '\0') : std::string()) + parts[i];
  if (out.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::copy(out.begin(), out.end(), data);
  return out.size();
}

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
