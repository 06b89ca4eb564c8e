// Helpers shared by the GPU kernel suites (test_gpu_ops, test_gpu_dma, test_gpu_attention): device buffers, bf16 inputs
// whose exact values the CPU reference also gets, and element-wise tolerance checks.
// Header-only: Dev and check_close are templates, and only the GPU suites include it, so the
// component-only suites that also compile test_util.cpp never link CUDA. Everything is inside
// DMAT_WITH_CUDA because the CPU-only build compiles the GPU suites too (their tests then skip).
#pragma once
#ifdef DMAT_WITH_CUDA

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "core/bf16.h"
#include "core/rng.h"
#include "kernels/cuda/cuda_ops.h"
#include "test_util.h"

namespace dmat::test {

inline const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Device buffer with an element offset (offset > 0 tests the unaligned paths). One spare element
// past the end, so a zero-length buffer still has a valid pointer.
template <class T>
struct Dev {
  T* base = nullptr;
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t n_, size_t offset = 0) : n(n_) {
    base = static_cast<T*>(cuda::device_alloc((n + offset + 1) * sizeof(T)));
    p = base + offset;
  }
  Dev(const std::vector<T>& v, size_t offset = 0) : Dev(v.size(), offset) { up(v); }
  ~Dev() { cuda::device_free(base); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void up(const std::vector<T>& v) {
    ASSERT_EQ(v.size(), n);
    cuda::memcpy_h2d(p, v.data(), n * sizeof(T));
  }
  std::vector<T> down() const {
    std::vector<T> v(n);
    cuda::memcpy_d2h(v.data(), p, n * sizeof(T));
    return v;
  }
  // Fills with values no kernel writes (NaN, or -12345 for integers), so an element the kernel
  // forgot to write fails the comparison.
  void poison() {
    std::vector<T> v(n);
    if constexpr (std::is_same_v<T, bf16>) {
      for (auto& x : v) x = bf16{0x7fc0};
    } else if constexpr (std::is_floating_point_v<T>) {
      for (auto& x : v) x = T(kNaN);
    } else {
      for (auto& x : v) x = T(-12345);
    }
    up(v);
  }
};

// n floats uniform in [lo, hi) from Rng(seed). Each suite salts its seeds with its own stream
// constant (hash64(seed, salt)) and must keep it: its tolerances were set on those inputs.
inline std::vector<float> uniform_floats(size_t n, uint64_t seed, double lo, double hi) {
  std::vector<float> v(n);
  random_fill(v, seed, lo, hi);
  return v;
}

inline std::vector<bf16> to_bf(const std::vector<float>& v) {
  std::vector<bf16> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to_bf16(v[i]);
  return o;
}
inline std::vector<float> from_bf(const std::vector<bf16>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to_float(v[i]);
  return o;
}
inline std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
inline std::vector<double> to_d(const std::vector<bf16>& v) { return to_d(from_bf(v)); }

// bf16-representable random values: the GPU gets the bf16, the reference the identical value.
struct BfInput {
  std::vector<bf16> b;
  std::vector<double> d;
};
// uniform_floats(n, seed, lo, hi) rounded to bf16.
inline BfInput uniform_bf(size_t n, uint64_t seed, double lo, double hi) {
  BfInput in;
  in.b = to_bf(uniform_floats(n, seed, lo, hi));
  in.d = to_d(in.b);
  return in;
}

// Element i passes when |got − want| ≤ tol(i); NaN never passes. Prints the first failures with
// index, got, want and tolerance.
template <class Tol>
void check_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, Tol tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double t = tol(i);
    if (!(std::fabs(got[i] - want[i]) <= t)) {
      if (bad < 8) first += fmt::format("\n  [{}] got {:.9g} want {:.9g} (|diff| {:.3g} > tol {:.3g})", i, got[i],
                                        want[i], std::fabs(got[i] - want[i]), t);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements out of tolerance" << first;
}

}  // namespace dmat::test

#endif  // DMAT_WITH_CUDA
