// Deterministic reductions over rows: threads own chunks of columns and each sums its rows in
// order, so every output element sees its terms in the same order whatever the thread count.
#pragma once
#include <algorithm>
#include <cstdint>

namespace dmat::cpu {

// Calls f(d0, d1) for column chunks [d0, d1) covering [0, D), in parallel.
template <class F>
inline void parallel_column_chunks(int64_t D, F&& f) {
  constexpr int64_t kCols = 64;
  const int64_t chunks = (D + kCols - 1) / kCols;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) f(c * kCols, std::min(D, c * kCols + kCols));
}

}  // namespace dmat::cpu
