// SwiGLU gate: out = silu(g) · u.
#include <cmath>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], ui = u[i];
    const T sig = T(1) / (T(1) + std::exp(-gi));
    out[i] = gi * sig * ui;
  }
}

template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n) {
  // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g))). Each element reads all its inputs before writing, so
  // element-wise aliasing of the outputs with any input is harmless.
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], ui = u[i], di = dout[i];
    const T sig = T(1) / (T(1) + std::exp(-gi));
    const T silu = gi * sig;
    dg[i] = di * ui * sig * (T(1) + gi * (T(1) - sig));
    du[i] = di * silu;
  }
}

#define DMAT_INSTANTIATE(T)                                                           \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                   \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
