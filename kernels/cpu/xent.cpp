// Softmax cross-entropy over the vocabulary, fused with its gradient.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void softmax_xent(T* loss, T* dlogits, const T* logits, const int32_t* targets, int64_t rows, int64_t V,
                  T grad_scale) {
  // Validate before the parallel region: an exception must not leave an OpenMP region.
  for (int64_t r = 0; r < rows; ++r)
    if (targets[r] >= V) fail("softmax_xent: target {} at row {} is out of range (vocabulary size {})", targets[r], r, V);

#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = logits + r * V;
    const int32_t t = targets[r];
    if (t < 0) {
      if (loss) loss[r] = T(0);
      if (dlogits) std::fill(dlogits + r * V, dlogits + (r + 1) * V, T(0));
      continue;
    }
    T mx = x[0];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 1; j < V; ++j) mx = std::max(mx, x[j]);
    double sum = 0;  // V terms in (0, 1]: summed in double, it costs nothing next to exp
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += double(std::exp(x[j] - mx));
    const T lse = mx + T(std::log(sum));
    const T xt = x[t];  // read before dlogits (which may alias logits) is written
    if (loss) loss[r] = lse - xt;
    if (dlogits) {
      T* d = dlogits + r * V;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) d[j] = grad_scale * std::exp(x[j] - lse);
      d[t] = grad_scale * (std::exp(xt - lse) - T(1));
    }
  }
}

template void softmax_xent<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, float);
template void softmax_xent<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, double);

}  // namespace dmat::cpu
