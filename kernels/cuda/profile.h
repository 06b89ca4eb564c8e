// Per-op GPU time, for finding where a training step goes (`DMAT_PROFILE=1 dmatrain bench ...`).
// When enabled, each op of src/ops records a pair of CUDA events around its kernels on the compute
// stream; report() waits for the stream and sums the elapsed time per op name. Disabled (the
// default) it costs one branch per op. Process-wide like the CUDA context it measures.
// run.kernels.profile = gemm (DMAT_PROFILE=gemm) also times every GEMM by its shape ("detail" rows: they are part of their op's
// time, so they are reported beside the ops, not added to them).
#pragma once
#include <string>
#include <vector>

namespace dmat::cuda {

bool profiling();        // run.kernels.profile is 1 or gemm
bool profiling_gemms();  // run.kernels.profile is gemm
void profile_begin(const char* name);
void profile_end();
void profile_detail_begin(std::string name, double flops = 0);
void profile_detail_end();

struct ProfileRow {
  std::string name;
  double ms = 0;
  long calls = 0;
  bool detail = false;
  double flops = 0;  // summed over the calls (detail rows that count them)
};
// Ops since the last report, largest first, then the detail rows, largest first; clears the records.
std::vector<ProfileRow> profile_report();

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
