// Dynamic Mask Attention, CPU reference (definitions and tie rule in cpu_ops.h): the per-key bias
// from the values and its backward, the per-query thresholds, and masked attention with the bias.
// Exact and simple, the oracle the CUDA kernels are checked against: attention is attend.h's loop
// over the kept keys, O(T²) per head like attention.cpp (a key is tested against the query's
// threshold, not gathered), and each output element is reduced in a fixed order, so results do not
// depend on the thread count.
#include <algorithm>
#include <cmath>
#include <functional>
#include <queue>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/attend.h"
#include "kernels/cpu/column_chunks.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

// softplus(z) = log(1 + e^z) without overflow; its derivative is the logistic sigmoid.
template <class T>
T softplus(T z) {
  return std::max(z, T(0)) + std::log1p(std::exp(-std::abs(z)));
}

// The keys query i keeps (cpu_ops.h): j <= i, and j among the L most recent keys (local window;
// none when L = 0) or b_j >= thr_i, thr as dma_thresholds wrote it for that L. Every kept key's
// score carries its bias b_j.
template <class T>
struct KeptKeys {
  static constexpr bool kBias = true;
  const T* b;    // biases [B,Hkv,T]
  const T* thr;  // thresholds [B,Hkv,T]
  int64_t Hkv, T_, local;
  int64_t at(int64_t bi, int64_t hk, int64_t t) const { return (bi * Hkv + hk) * T_ + t; }
  bool kept(int64_t bi, int64_t hk, int64_t i, int64_t j) const {
    return j <= i && (j > i - local || b[at(bi, hk, j)] >= thr[at(bi, hk, i)]);  // ties at the threshold kept
  }
  int64_t max_keys() const { return T_; }
  template <class F>
  void keys(int64_t bi, int64_t hk, int64_t i, F&& f) const {
    for (int64_t j = 0; j <= i; ++j)
      if (kept(bi, hk, i, j)) f(j);
  }
  template <class F>
  void queries(int64_t bi, int64_t hk, int64_t j, F&& f) const {
    for (int64_t i = j; i < T_; ++i)
      if (kept(bi, hk, i, j)) f(i);
  }
  T bias(int64_t bi, int64_t hk, int64_t j) const { return b[at(bi, hk, j)]; }
};

void check_shape(const AttnShape& s) {
  DMAT_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "H={} must be a multiple of Hkv={}", s.H, s.Hkv);
  DMAT_CHECK(s.window >= 0, "dma attention: local window={} (must be >= 0)", s.window);
}

}  // namespace

template <class T>
void dma_bias_forward(T* z, T* bias, const T* v, const T* w_dt, const T* A, int64_t B, int64_t Tn, int64_t Hkv,
                      int64_t Dh, DmaBiasForm form) {
  const int64_t C = Hkv * Dh;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * Tn; ++r) {
    const int64_t b = r / Tn, t = r % Tn;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = (b * Hkv + h) * Tn + t;
      const T zz = dot(v + r * C, w_dt + h * C, C);
      const T a = A[h] * softplus(zz);
      z[at] = zz;
      bias[at] = form == DmaBiasForm::Exp ? std::exp(a) : a;
    }
  }
}

template <class T>
void dma_bias_backward(T* dv, T* dw_dt, T* dA, const T* dbias, const T* z, const T* bias, const T* v,
                       const T* w_dt, const T* A, int64_t B, int64_t Tn, int64_t Hkv, int64_t Dh, DmaBiasForm form) {
  // With a = A·softplus(z): exp form ∂bias/∂a = bias, linear form 1. Then ∂a/∂A = softplus(z),
  // ∂a/∂z = A·sigmoid(z), and z is linear in v and W_dt.
  const int64_t C = Hkv * Dh, n = B * Hkv * Tn;
  std::vector<T> dz(size_t(n), T(0));
#pragma omp parallel for schedule(static)
  for (int64_t x = 0; x < n; ++x) {
    const int64_t h = (x / Tn) % Hkv;
    const T da = form == DmaBiasForm::Exp ? dbias[x] * bias[x] : dbias[x];
    dz[size_t(x)] = da * A[h] * sigmoid(z[x]);
  }
  // dA[h]: (b, t) in increasing order, one head per iteration.
#pragma omp parallel for schedule(static)
  for (int64_t h = 0; h < Hkv; ++h) {
    T acc = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t x = (b * Hkv + h) * Tn + t;
        const T da = form == DmaBiasForm::Exp ? dbias[x] * bias[x] : dbias[x];
        acc += da * softplus(z[x]);
      }
    dA[h] += acc;
  }
  // dv[b,t,:] += Σ_h dz[b,h,t] · W_dt[h,:]   (heads in increasing order)
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * Tn; ++r) {
    const int64_t b = r / Tn, t = r % Tn;
    T* dvr = dv + r * C;
    for (int64_t h = 0; h < Hkv; ++h) {
      const T g = dz[size_t((b * Hkv + h) * Tn + t)];
      const T* wh = w_dt + h * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dvr[c] += g * wh[c];
    }
  }
  // dW_dt[h,:] += Σ_{b,t} dz[b,h,t] · v[b,t,:]   (threads own column chunks, rows in order)
  parallel_column_chunks(C, [&](int64_t c0, int64_t c1) {
    for (int64_t h = 0; h < Hkv; ++h) {
      T* dwh = dw_dt + h * C;
      for (int64_t r = 0; r < B * Tn; ++r) {
        const int64_t b = r / Tn, t = r % Tn;
        const T g = dz[size_t((b * Hkv + h) * Tn + t)];
        const T* vr = v + r * C;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) dwh[c] += g * vr[c];
      }
    }
  });
}

template <class T>
void dma_thresholds(T* thr, const T* bias, int64_t rows, int64_t Tn, int64_t window, int64_t local) {
  DMAT_CHECK(window > 0 && local >= 0, "dma thresholds: window={} local={}", window, local);
  bool nan = false;
#pragma omp parallel for schedule(static) reduction(|| : nan)
  for (int64_t r = 0; r < rows; ++r) {
    // The w largest biases seen so far, smallest on top: after key k the top is the threshold of
    // query k + L (the keys 0 … k are the ones it tests).
    std::priority_queue<T, std::vector<T>, std::greater<T>> top;
    const T* br = bias + r * Tn;
    T* tr = thr + r * Tn;
    for (int64_t i = 0; i < std::min(local, Tn); ++i) tr[i] = T(-INFINITY);  // no key to test yet
    for (int64_t k = 0; k < Tn; ++k) {
      nan = nan || std::isnan(br[k]);
      if (k + local >= Tn) continue;
      top.push(br[k]);
      if (int64_t(top.size()) > window) top.pop();
      tr[k + local] = int64_t(top.size()) == window ? top.top() : T(-INFINITY);
    }
  }
  if (nan) fail("dma attention: a key bias is NaN (diverged? see model.attention.bias_form and the A parameters)");
}

template <class T>
void dma_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const T* bias, const T* thr,
                           const AttnShape& s) {
  // Key i itself (local window) or the largest bias among the tested keys is kept: no row is empty.
  check_shape(s);
  attend::forward(out, lse, q, k, v, attend::dims_of(s), KeptKeys<T>{bias, thr, s.Hkv, s.T, s.window});
}

template <class T>
void dma_attention_backward(T* dq, T* dk, T* dv, T* dbias, const T* dout, const T* out, const T* lse, const T* q,
                            const T* k, const T* v, const T* bias, const T* thr, const AttnShape& s) {
  // As attention_backward, over kept keys only and with the bias in the scores; since
  // ∂s_ij/∂bias_j = 1, dbias_j = Σ_i dS_ij, gathered with dk and dv per key row (attend.h).
  check_shape(s);
  attend::backward(dq, dk, dv, dbias, dout, out, lse, q, k, v, attend::dims_of(s),
                   KeptKeys<T>{bias, thr, s.Hkv, s.T, s.window});
}

#define DMAT_INSTANTIATE(T)                                                                                      \
  template void dma_bias_forward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,    \
                                    DmaBiasForm);                                                                \
  template void dma_bias_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, const T*,     \
                                     int64_t, int64_t, int64_t, int64_t, DmaBiasForm);                           \
  template void dma_thresholds<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t);                             \
  template void dma_attention_forward<T>(T*, T*, const T*, const T*, const T*, const T*, const T*,               \
                                         const AttnShape&);                                                      \
  template void dma_attention_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T*,      \
                                          const T*, const T*, const T*, const AttnShape&);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
