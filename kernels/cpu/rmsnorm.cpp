// RMSNorm over the last dimension (no mean subtraction, optional per-channel weight).
#include <algorithm>
#include <cmath>

#include "kernels/cpu/column_chunks.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t rows, int64_t D, double eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * double(xr[d]);
    const T rs = T(1.0 / std::sqrt(ss / double(D) + eps));
    rstd[r] = rs;
    if (w) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * rs * w[d];
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * rs;
    }
  }
}

template <class T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t rows, int64_t D,
                      bool accumulate_dx) {
  if (w && dw) {
    // dw[d] += Σ_r dy[r,d] x[r,d] rstd[r]: threads own column chunks, rows summed in order.
    // Done before dx so that dx may overwrite dy.
    parallel_column_chunks(D, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * D;
        const T* dyr = dy + r * D;
        const T rs = rstd[r];
#pragma omp simd
        for (int64_t d = d0; d < d1; ++d) dw[d] += dyr[d] * xr[d] * rs;
      }
    });
  }
  // With g = w ⊙ dy:  dx = rstd·g − x · rstd³ · (g·x) / D.
  if (dx) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * D;
      const T* dyr = dy + r * D;
      T* dxr = dx + r * D;
      const T rs = rstd[r];
      T gx = 0;
      if (w) {
#pragma omp simd reduction(+ : gx)
        for (int64_t d = 0; d < D; ++d) gx += w[d] * dyr[d] * xr[d];
      } else {
#pragma omp simd reduction(+ : gx)
        for (int64_t d = 0; d < D; ++d) gx += dyr[d] * xr[d];
      }
      const T c = rs * rs * rs * gx / T(D);
      if (accumulate_dx) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] += rs * (w ? w[d] : T(1)) * dyr[d] - xr[d] * c;
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = rs * (w ? w[d] : T(1)) * dyr[d] - xr[d] * c;
      }
    }
  }
}

#define DMAT_INSTANTIATE(T)                                                                               \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double);                 \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t, int64_t, bool);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
