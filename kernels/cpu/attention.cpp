// Causal (optionally sliding-window) softmax attention with grouped KV heads: the reference the
// CUDA kernels are checked against. One query row at a time, O(T²) per head, numerically stable
// (max-subtracted); backward recomputes the probabilities from the saved log-sum-exp (attend.h).
#include <algorithm>

#include "core/error.h"
#include "kernels/cpu/attend.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

// Keys of query i: [max(0, i − w + 1), i] (w = 0: [0, i]); queries of key j: [j, min(T − 1, j + w − 1)].
struct CausalKeys {
  static constexpr bool kBias = false;
  int64_t T, window;
  int64_t max_keys() const { return window > 0 ? std::min(window, T) : T; }
  template <class F>
  void keys(int64_t, int64_t, int64_t i, F&& f) const {
    for (int64_t j = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; j <= i; ++j) f(j);
  }
  template <class F>
  void queries(int64_t, int64_t, int64_t j, F&& f) const {
    const int64_t last = window > 0 ? std::min(T - 1, j + window - 1) : T - 1;
    for (int64_t i = j; i <= last; ++i) f(i);
  }
  double bias(int64_t, int64_t, int64_t) const { return 0; }
};

void check_shape(const AttnShape& s) {
  DMAT_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "H={} must be a multiple of Hkv={}", s.H, s.Hkv);
  DMAT_CHECK(s.window >= 0, "window={}", s.window);
}

}  // namespace

template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const AttnShape& s) {
  check_shape(s);
  attend::forward(out, lse, q, k, v, attend::dims_of(s), CausalKeys{s.T, s.window});
}

template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q, const T* k,
                        const T* v, const AttnShape& s) {
  check_shape(s);
  attend::backward(dq, dk, dv, static_cast<T*>(nullptr), dout, out, lse, q, k, v, attend::dims_of(s),
                   CausalKeys{s.T, s.window});
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*, const AttnShape&);
template void attention_forward<double>(double*, double*, const double*, const double*, const double*,
                                        const AttnShape&);
template void attention_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, const AttnShape&);
template void attention_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, const AttnShape&);

}  // namespace dmat::cpu
