// Incremental decoding on the CPU (definitions in cpu_ops.h): new queries of one sequence against
// its cached keys and values, for causal, sliding-window and DMA attention, and MLA's absorbed
// up-projection. The attention loop is attention_forward's / dma_attention_forward's row loop, over
// the cache instead of the batch's own keys, so a decoded row is the sum the training forward forms.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/attend.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void attention_decode(T* out, const T* q, const T* kc, const T* vc, int64_t n, int64_t pos0, int64_t H, int64_t Hkv,
                      int64_t Dqk, int64_t Dv, int64_t ldk, int64_t ldv, double scale_d, int64_t window,
                      const T* bias, int64_t ldb, const T* thr) {
  DMAT_CHECK(Hkv > 0 && H % Hkv == 0 && window >= 0 && pos0 >= 0 && n >= 0,
             "attention_decode: H={} Hkv={} window={} pos0={} n={}", H, Hkv, window, pos0, n);
  const int64_t group = H / Hkv;
  const T scale = T(scale_d);
#pragma omp parallel
  {
    std::vector<T> score(size_t(pos0 + n));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n * H; ++row) {
      const int64_t r = row / H, h = row % H, hk = h / group, i = pos0 + r;
      const T* qi = q + (r * H + h) * Dqk;
      const T* bk = bias ? bias + hk * ldb : nullptr;
      const T t_i = bias ? thr[r * Hkv + hk] : T(0);
      // DMA: j <= i && (j > i − L || bias_j >= thr); otherwise the window's first key onwards
      auto kept = [&](int64_t j) { return !bk || j > i - window || bk[j] >= t_i; };
      const int64_t j0 = !bk && window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      T mx = -INFINITY;
      for (int64_t j = j0; j <= i; ++j) {
        if (!kept(j)) continue;
        // the training loop's score exactly (kernels/cpu/attend.h: attend::score): its dot, and with
        // a bias one fma
        const T qk = dot(qi, kc + j * ldk + hk * Dqk, Dqk);
        score[size_t(j)] = bk ? std::fma(scale, qk, bk[j]) : scale * qk;
        mx = std::max(mx, score[size_t(j)]);
      }
      T* oi = out + (r * H + h) * Dv;
      std::fill(oi, oi + Dv, T(0));
      T sum = 0;
      for (int64_t j = j0; j <= i; ++j) {
        if (!kept(j)) continue;
        const T p = std::exp(score[size_t(j)] - mx);
        sum += p;
        const T* vj = vc + j * ldv + hk * Dv;
#pragma omp simd
        for (int64_t d = 0; d < Dv; ++d) oi[d] += p * vj[d];
      }
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) oi[d] *= inv;
    }
  }
}

template <class T>
void mla_absorb_query(T* qa, const T* q, const T* w_kvb, int64_t n, int64_t H, int64_t nope, int64_t R, int64_t C,
                      int64_t Dv) {
  const int64_t Dqk = nope + R, Da = C + R;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n * H; ++row) {
    const int64_t h = row % H;
    const T* qr = q + row * Dqk;
    const T* wk = w_kvb + h * (nope + Dv) * C;  // W_k,h [nope, C]
    T* out = qa + row * Da;
    std::fill(out, out + C, T(0));
    for (int64_t p = 0; p < nope; ++p) {
      const T qp = qr[p];
      const T* wrow = wk + p * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += qp * wrow[c];
    }
    std::copy(qr + nope, qr + Dqk, out + C);
  }
}

template <class T>
void mla_expand_output(T* o, const T* ctx, const T* w_kvb, int64_t n, int64_t H, int64_t nope, int64_t C, int64_t Dv) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n * H; ++row) {
    const int64_t h = row % H;
    const T* wv = w_kvb + (h * (nope + Dv) + nope) * C;  // W_v,h [Dv, C]
    const T* cr = ctx + row * C;
    T* orow = o + row * Dv;
    for (int64_t d = 0; d < Dv; ++d) orow[d] = dot(wv + d * C, cr, C);
  }
}

#define DMAT_INSTANTIATE(T)                                                                                        \
  template void attention_decode<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                    int64_t, int64_t, int64_t, double, int64_t, const T*, int64_t, const T*);      \
  template void mla_absorb_query<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t); \
  template void mla_expand_output<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
