// Differences between two safetensors files of fp32 tensors (checkpoints of two runs), for the
// suites that compare whole runs (test_mpi_train, test_gpu_ddp). Header-only: test_util.cpp is
// linked into component-only suites that do not link the io library.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "io/safetensors.h"

namespace dmat::test {

// Largest |a − b| over every tensor (same names and sizes required: a failure otherwise).
inline double max_abs_diff(const std::string& a, const std::string& b) {
  SafetensorsFile fa(a), fb(b);
  EXPECT_EQ(fa.names(), fb.names());
  double d = 0;
  for (const auto& n : fa.names()) {
    const Tensor &x = fa.get(n), &y = fb.get(n);
    EXPECT_EQ(x.numel(), y.numel()) << n;
    for (int64_t i = 0; i < std::min(x.numel(), y.numel()); ++i)
      d = std::max(d, std::abs(double(x.as<float>()[i]) - double(y.as<float>()[i])));
  }
  return d;
}

// ‖a − b‖₂ / ‖a‖₂ over every tensor of a.
inline double rel_l2_diff(const std::string& a, const std::string& b) {
  SafetensorsFile fa(a), fb(b);
  double num = 0, den = 0;
  for (const auto& n : fa.names()) {
    const Tensor &x = fa.get(n), &y = fb.get(n);
    for (int64_t i = 0; i < std::min(x.numel(), y.numel()); ++i) {
      const double d = double(x.as<float>()[i]) - double(y.as<float>()[i]);
      num += d * d;
      den += double(x.as<float>()[i]) * double(x.as<float>()[i]);
    }
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace dmat::test
