// `dmatrain bench CONFIG`: training-step throughput on synthetic tokens (no data needed): tokens/s,
// MFU (docs/performance.md convention: 6·N + 6·L·T·d FLOPs per token against the device's dense bf16 peak),
// the forward / backward / optimizer split, and peak memory beside `dmatrain info`'s prediction.
#pragma once
#include <cstdint>
#include <ostream>

#include "config/config.h"

namespace dmat {

struct TrainBenchOptions {
  int64_t steps = 10;   // timed optimizer steps
  int64_t warmup = 3;   // untimed steps first (workspaces grow, cuBLASLt picks algorithms)
};

// Prints a human-readable report and one JSON line ("bench":"train") to `out`.
void bench_train(const Config& cfg, const TrainBenchOptions& opt, std::ostream& out);

}  // namespace dmat
