// Softmax attention of every query over its own set of keys, forward and backward: the one loop
// the CPU reference attentions share (causal/windowed in attention.cpp, DMA's kept keys with their
// bias in dma_attention.cpp, NSA's compressed blocks and selected blocks in nsa_attention.cpp).
// They differ only in which keys a query attends, given by a key-set policy:
//
//   struct Keys {
//     static constexpr bool kBias;  // true: bias(b, hk, j) is added to every score of key j
//     int64_t max_keys() const;     // the most keys one query attends
//     template <class F> void keys(int64_t b, int64_t hk, int64_t i, F&& f) const;     // f(j), ascending
//     template <class F> void queries(int64_t b, int64_t hk, int64_t j, F&& f) const;  // f(i), ascending
//     T bias(int64_t b, int64_t hk, int64_t j) const;  // only read when kBias
//   };
//
// keys(i) and queries(j) must describe the same pairs. Scores s_ij = scale·q_i·k_j (+ bias_j),
// P_ij = exp(s_ij − lse_i). Like every CPU reference kernel: exact and simple, O(keys) per query row,
// probabilities recomputed from the saved lse in backward, every output element reduced in a fixed
// order by one thread (results do not depend on the thread count).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

// a·b summed in a fixed order: 8 partial sums (element d into sum d mod 8), combined pairwise. An
// `omp simd` reduction would leave the order to the vectoriser, which chooses per call site once
// inlined, and the backward's recomputed scores must round as the forward's did: a probability that
// disagrees with the forward's lse by an ulp of a large score spoils the cancelling sums (DMA's dbias).
template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[d + u] * b[d + u];
  for (int u = 0; d < n; ++d, ++u) s[u] += a[d] * b[d];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <class T>
inline T sigmoid(T z) {
  if (z >= 0) return T(1) / (T(1) + std::exp(-z));
  const T e = std::exp(z);
  return e / (T(1) + e);
}

namespace attend {

// Layouts: q [B,Tq,H,Dqk], k [B,Tk,Hkv,Dqk], v [B,Tk,Hkv,Dv], out and dout [B,Tq,H,Dv], lse [B,H,Tq],
// bias and dbias [B,Hkv,Tk]. Query head h reads KV head h / (H / Hkv).
struct Dims {
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, Hkv = 0, Dqk = 0, Dv = 0;
  double scale = 0;
  int64_t q(int64_t b, int64_t i, int64_t h) const { return ((b * Tq + i) * H + h) * Dqk; }
  int64_t k(int64_t b, int64_t j, int64_t hk) const { return ((b * Tk + j) * Hkv + hk) * Dqk; }
  int64_t v(int64_t b, int64_t j, int64_t hk) const { return ((b * Tk + j) * Hkv + hk) * Dv; }
  int64_t o(int64_t b, int64_t i, int64_t h) const { return ((b * Tq + i) * H + h) * Dv; }
  int64_t stat(int64_t b, int64_t h, int64_t i) const { return (b * H + h) * Tq + i; }
  int64_t key(int64_t b, int64_t hk, int64_t j) const { return (b * Hkv + hk) * Tk + j; }
};

// The dims of cpu_ops.h's attention shape: queries and keys at the same T positions.
inline Dims dims_of(const AttnShape& s) {
  return {.B = s.B, .Tq = s.T, .Tk = s.T, .H = s.H, .Hkv = s.Hkv, .Dqk = s.Dqk, .Dv = s.Dv, .scale = s.scale};
}

// s_ij, rounded the same way wherever it is computed (forward, and backward's recomputed P_ij): with a
// bias, one explicit fma, so that no contraction the compiler may or may not apply in one context
// makes the backward's probabilities disagree with the forward's lse (the bias can be large, the
// softmax of biased scores then sums terms that cancel in dbias).
template <class T, class Keys>
inline T score(T scale, const T* qi, const T* kj, int64_t n, const Keys& keys, int64_t b, int64_t hk, int64_t j) {
  if constexpr (Keys::kBias) return std::fma(scale, dot(qi, kj, n), T(keys.bias(b, hk, j)));
  else return scale * dot(qi, kj, n);
}

// out, lse overwrite. A query without keys gets out = 0 and lse = −inf (the log of an empty sum).
template <class T, class Keys>
void forward(T* out, T* lse, const T* q, const T* k, const T* v, const Dims& s, const Keys& keys) {
  const int64_t group = s.H / s.Hkv;
  const T scale = T(s.scale);
#pragma omp parallel
  {
    std::vector<T> score_row(size_t(std::max<int64_t>(keys.max_keys(), 1)));  // one row of scores per thread
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.B * s.H * s.Tq; ++row) {
      const int64_t i = row % s.Tq, h = (row / s.Tq) % s.H, b = row / (s.Tq * s.H), hk = h / group;
      const T* qi = q + s.q(b, i, h);
      T mx = -INFINITY;
      size_t m = 0;
      keys.keys(b, hk, i, [&](int64_t j) {
        const T sc = score(scale, qi, k + s.k(b, j, hk), s.Dqk, keys, b, hk, j);
        score_row[m++] = sc;
        mx = std::max(mx, sc);
      });
      T* oi = out + s.o(b, i, h);
      std::fill(oi, oi + s.Dv, T(0));
      if (m == 0) {
        lse[s.stat(b, h, i)] = T(-INFINITY);
        continue;
      }
      T sum = 0;
      m = 0;
      keys.keys(b, hk, i, [&](int64_t j) {
        const T p = std::exp(score_row[m++] - mx);
        sum += p;
        const T* vj = v + s.v(b, j, hk);
#pragma omp simd
        for (int64_t d = 0; d < s.Dv; ++d) oi[d] += p * vj[d];
      });
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t d = 0; d < s.Dv; ++d) oi[d] *= inv;
      lse[s.stat(b, h, i)] = mx + std::log(sum);
    }
  }
}

// dq, dk, dv overwrite (dbias too when the policy has a bias and dbias is given). With
// dP_ij = dout_i·v_j, D_i = dout_i·out_i = Σ_j P_ij dP_ij and dS_ij = P_ij (dP_ij − D_i):
// dq_i = scale Σ_j dS_ij k_j, dk_j = scale Σ_i dS_ij q_i, dv_j = Σ_i P_ij dout_i, dbias_j = Σ_i dS_ij.
// dq is gathered per query row, dk/dv/dbias per key row (no two threads write one element); a key
// row sums over the query heads of its KV head (ascending), then its queries (ascending).
template <class T, class Keys>
void backward(T* dq, T* dk, T* dv, T* dbias, const T* dout, const T* out, const T* lse, const T* q, const T* k,
              const T* v, const Dims& s, const Keys& keys) {
  const int64_t group = s.H / s.Hkv;
  const T scale = T(s.scale);
  std::vector<T> Di(size_t(s.B * s.H * s.Tq));
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.H * s.Tq; ++row) {
    const int64_t i = row % s.Tq, h = (row / s.Tq) % s.H, b = row / (s.Tq * s.H);
    Di[size_t(s.stat(b, h, i))] = dot(dout + s.o(b, i, h), out + s.o(b, i, h), s.Dv);
  }
  // P_ij recomputed from the forward's lse
  auto prob = [&](const T* qi, const T* kj, int64_t b, int64_t hk, int64_t j, T lse_i) {
    return std::exp(score(scale, qi, kj, s.Dqk, keys, b, hk, j) - lse_i);
  };

#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.H * s.Tq; ++row) {
    const int64_t i = row % s.Tq, h = (row / s.Tq) % s.H, b = row / (s.Tq * s.H), hk = h / group;
    const T* qi = q + s.q(b, i, h);
    const T* doi = dout + s.o(b, i, h);
    const T lse_i = lse[s.stat(b, h, i)], D_i = Di[size_t(s.stat(b, h, i))];
    T* dqi = dq + s.q(b, i, h);
    std::fill(dqi, dqi + s.Dqk, T(0));
    keys.keys(b, hk, i, [&](int64_t j) {
      const T* kj = k + s.k(b, j, hk);
      const T p = prob(qi, kj, b, hk, j, lse_i);
      const T ds = p * (dot(doi, v + s.v(b, j, hk), s.Dv) - D_i);
#pragma omp simd
      for (int64_t d = 0; d < s.Dqk; ++d) dqi[d] += scale * ds * kj[d];
    });
  }

#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.Hkv * s.Tk; ++row) {
    const int64_t j = row % s.Tk, hk = (row / s.Tk) % s.Hkv, b = row / (s.Tk * s.Hkv);
    const T* kj = k + s.k(b, j, hk);
    const T* vj = v + s.v(b, j, hk);
    T* dkj = dk + s.k(b, j, hk);
    T* dvj = dv + s.v(b, j, hk);
    std::fill(dkj, dkj + s.Dqk, T(0));
    std::fill(dvj, dvj + s.Dv, T(0));
    T db = 0;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      keys.queries(b, hk, j, [&](int64_t i) {
        const T* qi = q + s.q(b, i, h);
        const T* doi = dout + s.o(b, i, h);
        const T p = prob(qi, kj, b, hk, j, lse[s.stat(b, h, i)]);
        const T ds = p * (dot(doi, vj, s.Dv) - Di[size_t(s.stat(b, h, i))]);
        if constexpr (Keys::kBias) db += ds;
#pragma omp simd
        for (int64_t d = 0; d < s.Dv; ++d) dvj[d] += p * doi[d];
#pragma omp simd
        for (int64_t d = 0; d < s.Dqk; ++d) dkj[d] += scale * ds * qi[d];
      });
    }
    if constexpr (Keys::kBias)
      if (dbias) dbias[s.key(b, hk, j)] = db;
  }
}

}  // namespace attend
}  // namespace dmat::cpu
