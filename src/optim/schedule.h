// Learning-rate schedules. Update s (1-based, s = 1 … steps) uses lr(s):
//   warmup (all schedules): s ≤ W = round(warmup_frac·steps): lr · s / W
//   constant: lr
//   cosine:   lr_min + (lr − lr_min)·½(1 + cos(π·p)), p = (s − W) / (steps − W)
//   wsd:      lr until the last D = round(decay_frac·steps) updates, then linear to lr_min at s = steps
// with lr_min = final_lr_ratio · lr.
#pragma once
#include <cstdint>

#include "config/config.h"

namespace dmat {

double learning_rate(const TrainConfig& t, int64_t s);

}  // namespace dmat
