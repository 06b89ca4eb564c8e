// Fuzz target: the config reader (src/config) as `dmatrain train|info CONFIG --set ...` uses it.
// Input: NUL-separated parts: the config file's text; the text of "base.json" beside it (what the
// config may include; absent without a second part); then up to four --set strings.
// Properties of an accepted config: what the run directory saves (its resolved form) reads back as
// the same config, and `info`'s counts and memory estimates compute.
#include <optional>

#include "config/config.h"
#include "fuzz_util.h"
#include "train/info.h"

using namespace dmat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  return fuzz::mutate_json(data, size, max_size, seed, 6);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 6);
  const std::string dir = fuzz::scratch_dir() + "/config";
  fuzz::write_bytes(dir + "/config.json", parts[0]);
  std::error_code ec;
  if (parts.size() > 1) fuzz::write_bytes(dir + "/base.json", parts[1]);
  else std::filesystem::remove(dir + "/base.json", ec);
  const std::vector<std::string> sets(parts.begin() + std::min<size_t>(2, parts.size()), parts.end());

  std::optional<Config> c;
  fuzz::rejecting([&] { c = load_config(dir + "/config.json", sets); });
  if (!c) return 0;
  try {
    const Config saved = parse_saved_config(c->resolved, dir);
    fuzz::fuzz_require(saved.resolved == c->resolved, "the saved config reads back differently");
    const nlohmann::json info = describe_json(*c);
    fuzz::fuzz_require(info["params"]["total"].get<int64_t>() > 0, "info: no parameters");
    for (int ranks : {1, 8}) {
      const MemoryEstimate m = estimate_memory(*c, Device::CUDA, ranks);
      fuzz::fuzz_require(m.total() > 0, "info: memory estimate <= 0");
    }
    (void)describe(*c);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    fuzz::fuzz_require(false, "an accepted config fails when saved and read back, or in info");
  }
  return 0;
}
