// Rotary position embedding, rotate-half convention (Hugging Face LLaMA / Doge).
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

// Rotates every (i, i + Dh/2) pair of x by sign·a(t, i). The cos/sin table [Tn, Dh/2] is built in
// double once per call and shared by all batches and heads.
template <class T>
void rotate(T* y, const T* x, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta, double sign) {
  const int64_t half = Dh / 2;
  std::vector<T> cosv(size_t(Tn * half)), sinv(size_t(Tn * half));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double f = std::pow(theta, -2.0 * double(i) / double(Dh));
      const double a = double(t) * f;
      cosv[size_t(t * half + i)] = T(std::cos(a));
      sinv[size_t(t * half + i)] = T(sign * std::sin(a));
    }
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * Tn; ++bt) {
    const int64_t t = bt % Tn;
    const T* c = cosv.data() + t * half;
    const T* s = sinv.data() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + (bt * H + h) * Dh;
      T* yr = y + (bt * H + h) * Dh;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const T x1 = xr[i], x2 = xr[i + half];
        yr[i] = x1 * c[i] - x2 * s[i];
        yr[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace

template <class T>
void rope_forward(T* y, const T* x, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta) {
  rotate(y, x, B, Tn, H, Dh, theta, 1.0);
}

template <class T>
void rope_backward(T* dx, const T* dy, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta) {
  rotate(dx, dy, B, Tn, H, Dh, theta, -1.0);
}

#define DMAT_INSTANTIATE(T)                                                                  \
  template void rope_forward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double);   \
  template void rope_backward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
