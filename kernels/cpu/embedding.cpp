// Token embedding lookup and its scatter-add gradient.
#include <algorithm>

#include "kernels/cpu/column_chunks.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* src = table + int64_t(tokens[i]) * D;
    T* dst = out + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
  }
}

template <class T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t D) {
  // Repeated tokens hit the same table row, so threads split the columns, not the rows: every
  // element then sees its contributions in increasing i, whatever the thread count.
  parallel_column_chunks(D, [&](int64_t d0, int64_t d1) {
    for (int64_t i = 0; i < n; ++i) {
      T* dst = dtable + int64_t(tokens[i]) * D;
      const T* src = dout + i * D;
#pragma omp simd
      for (int64_t d = d0; d < d1; ++d) dst[d] += src[d];
    }
  });
}

#define DMAT_INSTANTIATE(T)                                                                \
  template void embedding_forward<T>(T*, const T*, const int32_t*, int64_t, int64_t);      \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
