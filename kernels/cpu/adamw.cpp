// AdamW update, written as torch.optim.AdamW's single-tensor path computes it.
#include <cmath>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

template <class T>
void adamw_step(T* p, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2, double eps,
                double weight_decay, double bc1, double bc2) {
  // PyTorch: p *= 1 − lr·wd; m.lerp_(g, 1 − β1); v = β2 v + (1 − β2) g²;
  // denom = sqrt(v) / sqrt(bc2) + eps; p −= (lr / bc1) · m / denom. Constants folded in double.
  const T decay = T(1.0 - lr * weight_decay);
  const T b1 = T(beta1), one_m_b1 = T(1.0 - beta1), b2 = T(beta2), one_m_b2 = T(1.0 - beta2);
  const T sqrt_bc2 = T(std::sqrt(bc2)), step = T(lr / bc1), e = T(eps);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = b1 * m[i] + one_m_b1 * gi;
    const T vi = b2 * v[i] + one_m_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step * mi / (std::sqrt(vi) / sqrt_bc2 + e);
  }
}

template void adamw_step<float>(float*, const float*, float*, float*, int64_t, double, double, double, double,
                                double, double, double);
template void adamw_step<double>(double*, const double*, double*, double*, int64_t, double, double, double,
                                 double, double, double, double);

}  // namespace dmat::cpu
