#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

namespace dmat {

double learning_rate(const TrainConfig& t, int64_t s) {
  const double lr = t.lr, lr_min = t.final_lr_ratio * t.lr;
  const int64_t W = std::llround(t.warmup_frac * double(t.steps));
  if (W > 0 && s <= W) return lr * double(s) / double(W);
  if (t.schedule == "constant") return lr;
  if (t.schedule == "cosine") {
    const int64_t span = std::max<int64_t>(1, t.steps - W);
    const double p = std::clamp(double(s - W) / double(span), 0.0, 1.0);
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + std::cos(M_PI * p));
  }
  // wsd
  const int64_t D = std::max<int64_t>(1, std::llround(t.decay_frac * double(t.steps)));
  const int64_t start = t.steps - D;  // updates start+1 … steps decay
  if (s <= start) return lr;
  const double p = std::clamp(double(s - start) / double(D), 0.0, 1.0);
  return lr + (lr_min - lr) * p;
}

}  // namespace dmat
