// SwiGLU gate: out = silu(g) · u, on rows of F values whose g and u rows lie ld apart (ld = F: plain
// arrays; ld = 2F with u = g + F: the packed [rows, 2F] output of one gate/up GEMM).
#include <cmath>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t rows, int64_t F, int64_t ld) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T *gr = g + r * ld, *ur = u + r * ld;
    T* o = out + r * F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      const T gi = gr[c], ui = ur[c];
      const T sig = T(1) / (T(1) + std::exp(-gi));
      o[c] = gi * sig * ui;
    }
  }
}

template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t rows, int64_t F, int64_t ld) {
  // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g))). Each element reads all its inputs before writing, so
  // element-wise aliasing of the outputs with any input is harmless.
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T *gr = g + r * ld, *ur = u + r * ld, *d = dout + r * F;
    T *dgr = dg + r * ld, *dur = du + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      const T gi = gr[c], ui = ur[c], di = d[c];
      const T sig = T(1) / (T(1) + std::exp(-gi));
      const T silu = gi * sig;
      dgr[c] = di * ui * sig * (T(1) + gi * (T(1) - sig));
      dur[c] = di * silu;
    }
  }
}

template <class T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t n) {
  swiglu_forward(out, g, u, 1, n, n);
}

template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n) {
  swiglu_backward(dg, du, dout, g, u, 1, n, n);
}

#define DMAT_INSTANTIATE(T)                                                                         \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                                 \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);                  \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);               \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
