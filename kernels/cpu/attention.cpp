// Causal (optionally sliding-window) softmax attention with grouped KV heads: the reference the
// CUDA kernels are checked against. One query row at a time, O(T²) per head, numerically stable
// (max-subtracted); backward recomputes the probabilities from the saved log-sum-exp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

// Keys visible to query i: [first_key, i].
int64_t first_key(int64_t i, int64_t window) { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
// Queries that see key j: [j, last_query].
int64_t last_query(int64_t j, int64_t T, int64_t window) { return window > 0 ? std::min(T - 1, j + window - 1) : T - 1; }

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// Strided views of the [B, T, heads, dim] tensors.
struct Layout {
  const AttnShape& s;
  int64_t q(int64_t b, int64_t t, int64_t h) const { return ((b * s.T + t) * s.H + h) * s.Dqk; }
  int64_t k(int64_t b, int64_t t, int64_t hk) const { return ((b * s.T + t) * s.Hkv + hk) * s.Dqk; }
  int64_t v(int64_t b, int64_t t, int64_t hk) const { return ((b * s.T + t) * s.Hkv + hk) * s.Dv; }
  int64_t o(int64_t b, int64_t t, int64_t h) const { return ((b * s.T + t) * s.H + h) * s.Dv; }
  int64_t stat(int64_t b, int64_t h, int64_t t) const { return (b * s.H + h) * s.T + t; }
};

void check_shape(const AttnShape& s) {
  DMAT_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "H={} must be a multiple of Hkv={}", s.H, s.Hkv);
  DMAT_CHECK(s.window >= 0, "window={}", s.window);
}

}  // namespace

template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const AttnShape& s) {
  check_shape(s);
  const Layout L{s};
  const int64_t group = s.H / s.Hkv;
  const T scale = T(s.scale);
#pragma omp parallel
  {
    std::vector<T> score(size_t(s.T));  // one row of scores per thread
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.B * s.H * s.T; ++row) {
      const int64_t i = row % s.T, h = (row / s.T) % s.H, b = row / (s.T * s.H), hk = h / group;
      const int64_t j0 = first_key(i, s.window);
      const T* qi = q + L.q(b, i, h);
      T mx = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        score[size_t(j)] = scale * dot(qi, k + L.k(b, j, hk), s.Dqk);
        mx = std::max(mx, score[size_t(j)]);
      }
      T* oi = out + L.o(b, i, h);
      std::fill(oi, oi + s.Dv, T(0));
      T sum = 0;
      for (int64_t j = j0; j <= i; ++j) {
        const T p = std::exp(score[size_t(j)] - mx);
        sum += p;
        const T* vj = v + L.v(b, j, hk);
#pragma omp simd
        for (int64_t d = 0; d < s.Dv; ++d) oi[d] += p * vj[d];
      }
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t d = 0; d < s.Dv; ++d) oi[d] *= inv;
      lse[L.stat(b, h, i)] = mx + std::log(sum);
    }
  }
}

template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q, const T* k,
                        const T* v, const AttnShape& s) {
  // With P_ij = exp(s_ij − lse_i), dP_ij = dout_i·v_j, D_i = dout_i·out_i = Σ_j P_ij dP_ij and
  // dS_ij = P_ij (dP_ij − D_i):  dq_i = scale Σ_j dS_ij k_j,  dk_j = scale Σ_i dS_ij q_i,
  // dv_j = Σ_i P_ij dout_i. dq is gathered per query row, dk/dv per key row (so no two threads
  // write one element); each recomputes the P_ij it needs.
  check_shape(s);
  const Layout L{s};
  const int64_t group = s.H / s.Hkv;
  const T scale = T(s.scale);
  std::vector<T> Di(size_t(s.B * s.H * s.T));
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.H * s.T; ++row) {
    const int64_t i = row % s.T, h = (row / s.T) % s.H, b = row / (s.T * s.H);
    Di[size_t(L.stat(b, h, i))] = dot(dout + L.o(b, i, h), out + L.o(b, i, h), s.Dv);
  }

#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.H * s.T; ++row) {
    const int64_t i = row % s.T, h = (row / s.T) % s.H, b = row / (s.T * s.H), hk = h / group;
    const T* qi = q + L.q(b, i, h);
    const T* doi = dout + L.o(b, i, h);
    const T lse_i = lse[L.stat(b, h, i)], D_i = Di[size_t(L.stat(b, h, i))];
    T* dqi = dq + L.q(b, i, h);
    std::fill(dqi, dqi + s.Dqk, T(0));
    for (int64_t j = first_key(i, s.window); j <= i; ++j) {
      const T* kj = k + L.k(b, j, hk);
      const T p = std::exp(scale * dot(qi, kj, s.Dqk) - lse_i);
      const T ds = p * (dot(doi, v + L.v(b, j, hk), s.Dv) - D_i);
#pragma omp simd
      for (int64_t d = 0; d < s.Dqk; ++d) dqi[d] += scale * ds * kj[d];
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.Hkv * s.T; ++row) {
    const int64_t j = row % s.T, hk = (row / s.T) % s.Hkv, b = row / (s.T * s.Hkv);
    const T* kj = k + L.k(b, j, hk);
    const T* vj = v + L.v(b, j, hk);
    T* dkj = dk + L.k(b, j, hk);
    T* dvj = dv + L.v(b, j, hk);
    std::fill(dkj, dkj + s.Dqk, T(0));
    std::fill(dvj, dvj + s.Dv, T(0));
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i = j; i <= last_query(j, s.T, s.window); ++i) {
        const T* qi = q + L.q(b, i, h);
        const T* doi = dout + L.o(b, i, h);
        const T p = std::exp(scale * dot(qi, kj, s.Dqk) - lse[L.stat(b, h, i)]);
        const T ds = p * (dot(doi, vj, s.Dv) - Di[size_t(L.stat(b, h, i))]);
#pragma omp simd
        for (int64_t d = 0; d < s.Dv; ++d) dvj[d] += p * doi[d];
#pragma omp simd
        for (int64_t d = 0; d < s.Dqk; ++d) dkj[d] += scale * ds * qi[d];
      }
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*, const AttnShape&);
template void attention_forward<double>(double*, double*, const double*, const double*, const double*,
                                        const AttnShape&);
template void attention_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, const AttnShape&);
template void attention_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, const AttnShape&);

}  // namespace dmat::cpu
