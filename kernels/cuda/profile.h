// Per-op GPU time, for finding where a training step goes (`DMAT_PROFILE=1 dmatrain bench ...`).
// When enabled, each op of src/ops records a pair of CUDA events around its kernels on the compute
// stream; report() waits for the stream and sums the elapsed time per op name. Disabled (the
// default) it costs one branch per op. Process-wide like the CUDA context it measures.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace dmat::cuda {

bool profiling();  // DMAT_PROFILE set to a non-empty value other than 0
void profile_begin(const char* name);
void profile_end();
// (name, total ms, calls) per op since the last reset, largest first; clears the records.
std::vector<std::pair<std::string, std::pair<double, long>>> profile_report();

struct ProfileScope {
  bool on;
  explicit ProfileScope(const char* name) : on(profiling()) {
    if (on) profile_begin(name);
  }
  ~ProfileScope() {
    if (on) profile_end();
  }
};

}  // namespace dmat::cuda
