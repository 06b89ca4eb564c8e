// Elementwise helpers and the deterministic sum of squares (gradient-norm clipping).
#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void fill(T* x, int64_t n, T value) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

template <class T>
void copy(T* dst, const T* src, int64_t n) {
  if (dst == src) return;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

template <class T>
void add_inplace(T* y, const T* x, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

template <class T>
void scale_inplace(T* x, int64_t n, T s) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

template <class T>
double sum_squares(const T* x, int64_t n) {
  // Chunks of a fixed size (not per thread): each chunk sum has one order, and the chunk sums
  // are added in index order afterwards.
  constexpr int64_t kChunk = 8192;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(size_t(std::max<int64_t>(chunks, 0)));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = lo; i < hi; ++i) s += double(x[i]) * double(x[i]);
    partial[size_t(c)] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

#define DMAT_INSTANTIATE(T)                                  \
  template void fill<T>(T*, int64_t, T);                     \
  template void copy<T>(T*, const T*, int64_t);              \
  template void add_inplace<T>(T*, const T*, int64_t);       \
  template void scale_inplace<T>(T*, int64_t, T);            \
  template double sum_squares<T>(const T*, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
