// Residual connection with an optional learned per-channel scale on the skip path (Doge).
#include <algorithm>

#include "kernels/cpu/column_chunks.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void residual_forward(T* out, const T* x, const T* r_scale, const T* branch, int64_t rows, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    const T* br = branch + r * D;
    T* o = out + r * D;
    if (r_scale) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = r_scale[d] * xr[d] + br[d];
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = xr[d] + br[d];
    }
  }
}

template <class T>
void residual_backward(T* dx, T* dr_scale, const T* dout, const T* x, const T* r_scale, int64_t rows, int64_t D) {
  // dr_scale first (it reads dout, which dx may overwrite). Threads own column chunks and sum the
  // rows in order.
  if (dr_scale) {
    parallel_column_chunks(D, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* dor = dout + r * D;
        const T* xr = x + r * D;
#pragma omp simd
        for (int64_t d = d0; d < d1; ++d) dr_scale[d] += dor[d] * xr[d];
      }
    });
  }
  if (!dx) return;
  if (!r_scale) {
    if (dx == dout) return;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < rows * D; ++i) dx[i] = dout[i];
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* dor = dout + r * D;
    T* dxr = dx + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dxr[d] = r_scale[d] * dor[d];
  }
}

#define DMAT_INSTANTIATE(T)                                                                         \
  template void residual_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t);            \
  template void residual_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
