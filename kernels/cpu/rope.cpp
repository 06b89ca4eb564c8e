// Rotary position embedding, rotate-half convention (Hugging Face LLaMA / Doge).
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

// Rotates every (i, i + Dh/2) pair of x by sign·a(pos0 + t, i). The cos/sin table [Tn, Dh/2] is built in
// double once per call and shared by all batches and heads. Token rows lie ldy / ldx elements apart
// (H·Dh: contiguous [B, Tn, H, Dh]), heads hsy / hsx apart within a row (Dh: contiguous heads; more
// when the rotated dims are part of a wider head, as MLA's rotary dims are).
// Row t of a sequence sits at position pos0 + t (0 in training; the next position when decoding).
template <class T>
void rotate(T* y, const T* x, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta, double sign, int64_t ldy,
            int64_t ldx, int64_t hsy = 0, int64_t hsx = 0, int64_t pos0 = 0) {
  if (hsy == 0) hsy = Dh;
  if (hsx == 0) hsx = Dh;
  const int64_t half = Dh / 2;
  std::vector<T> cosv(size_t(Tn * half)), sinv(size_t(Tn * half));
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double f = std::pow(theta, -2.0 * double(i) / double(Dh));
      const double a = double(pos0 + t) * f;
      cosv[size_t(t * half + i)] = T(std::cos(a));
      sinv[size_t(t * half + i)] = T(sign * std::sin(a));
    }
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * Tn; ++bt) {
    const int64_t t = bt % Tn;
    const T* c = cosv.data() + t * half;
    const T* s = sinv.data() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + bt * ldx + h * hsx;
      T* yr = y + bt * ldy + h * hsy;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const T x1 = xr[i], x2 = xr[i + half];
        yr[i] = x1 * c[i] - x2 * s[i];
        yr[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

// Copies `width` values per row between rows ldx / ldy apart.
template <class T>
void copy_heads(T* y, const T* x, int64_t rows, int64_t width, int64_t ldy, int64_t ldx) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) y[r * ldy + i] = x[r * ldx + i];
}

}  // namespace

template <class T>
void rope_forward(T* y, const T* x, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta) {
  rotate(y, x, B, Tn, H, Dh, theta, 1.0, H * Dh, H * Dh);
}

template <class T>
void rope_rows(T* y, const T* x, int64_t n, int64_t H, int64_t R, int64_t pos0, double theta, int64_t ldy,
               int64_t ldx, int64_t hsy, int64_t hsx) {
  rotate(y, x, 1, n, H, R, theta, 1.0, ldy, ldx, hsy, hsx, pos0);
}

template <class T>
void rope_backward(T* dx, const T* dy, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta) {
  rotate(dx, dy, B, Tn, H, Dh, theta, -1.0, H * Dh, H * Dh);
}

template <class T>
void rope_unpack_qkv(T* q, T* k, T* v, const T* qkv, int64_t B, int64_t Tn, int64_t H, int64_t Hkv, int64_t Dh,
                     double theta) {
  const int64_t ld = (H + 2 * Hkv) * Dh;
  rotate(q, qkv, B, Tn, H, Dh, theta, 1.0, H * Dh, ld);
  rotate(k, qkv + H * Dh, B, Tn, Hkv, Dh, theta, 1.0, Hkv * Dh, ld);
  copy_heads(v, qkv + (H + Hkv) * Dh, B * Tn, Hkv * Dh, Hkv * Dh, ld);
}

template <class T>
void rope_pack_qkv_backward(T* dqkv, const T* dq, const T* dk, const T* dv, int64_t B, int64_t Tn, int64_t H,
                            int64_t Hkv, int64_t Dh, double theta) {
  const int64_t ld = (H + 2 * Hkv) * Dh;
  rotate(dqkv, dq, B, Tn, H, Dh, theta, -1.0, ld, H * Dh);
  rotate(dqkv + H * Dh, dk, B, Tn, Hkv, Dh, theta, -1.0, ld, Hkv * Dh);
  copy_heads(dqkv + (H + Hkv) * Dh, dv, B * Tn, Hkv * Dh, ld, Hkv * Dh);
}

template <class T>
void rope_unpack_mla(T* q, T* k, T* v, const T* qp, const T* kv, const T* kr, int64_t B, int64_t Tn, int64_t H,
                     int64_t nope, int64_t R, int64_t Dv, double theta) {
  const int64_t Dqk = nope + R, N = B * Tn;
  // q: each head's rotary dims rotated (in place when q == qp), its nope dims copied
  copy_heads(q, qp, N * H, nope, Dqk, Dqk);
  rotate(q + nope, qp + nope, B, Tn, H, R, theta, 1.0, H * Dqk, H * Dqk, Dqk, Dqk);
  // k: head h's k_nope from kv, the shared rotary key rotated once into head 0 and copied to the others
  copy_heads(k, kv, N * H, nope, Dqk, nope + Dv);
  rotate(k + nope, kr, B, Tn, 1, R, theta, 1.0, H * Dqk, R);
  for (int64_t h = 1; h < H; ++h) copy_heads(k + h * Dqk + nope, k + nope, N, R, H * Dqk, H * Dqk);
  copy_heads(v, kv + nope, N * H, Dv, Dv, nope + Dv);
}

template <class T>
void rope_pack_mla_backward(T* dqp, T* dkv, T* dkr, const T* dq, const T* dk, const T* dv, int64_t B, int64_t Tn,
                            int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta) {
  const int64_t Dqk = nope + R, N = B * Tn;
  copy_heads(dqp, dq, N * H, nope, Dqk, Dqk);
  rotate(dqp + nope, dq + nope, B, Tn, H, R, theta, -1.0, H * Dqk, H * Dqk, Dqk, Dqk);
  copy_heads(dkv, dk, N * H, nope, nope + Dv, Dqk);
  copy_heads(dkv + nope, dv, N * H, Dv, nope + Dv, Dv);
  // the rotary key is shared by every head: Σ_h (increasing h) of their rotary dims, then RoPEᵀ once
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < R; ++i) {
      T acc = 0;
      for (int64_t h = 0; h < H; ++h) acc += dk[(n * H + h) * Dqk + nope + i];
      dkr[n * R + i] = acc;
    }
  rotate(dkr, dkr, B, Tn, 1, R, theta, -1.0, R, R);
}

#define DMAT_INSTANTIATE(T)                                                                                     \
  template void rope_forward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double);                      \
  template void rope_backward<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double);                     \
  template void rope_rows<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t, int64_t,  \
                             int64_t);                                                                          \
  template void rope_unpack_qkv<T>(T*, T*, T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, double);  \
  template void rope_pack_qkv_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                          int64_t, double);                                                     \
  template void rope_unpack_mla<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,  \
                                   int64_t, int64_t, double);                                                   \
  template void rope_pack_mla_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,    \
                                          int64_t, int64_t, int64_t, double);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
