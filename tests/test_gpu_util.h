// Helpers shared by the GPU kernel suites (test_gpu_ops, test_gpu_dma, test_gpu_attention, test_gpu_nsa): device
// buffers, bf16 inputs whose exact values the CPU reference also gets, element-wise and norm tolerance checks.
// Header-only: Dev and check_close are templates, and only the GPU suites include it, so the
// component-only suites that also compile test_util.cpp never link CUDA. Everything is inside
// DMAT_WITH_CUDA because the CPU-only build compiles the GPU suites too (their tests then skip).
#pragma once
#ifdef DMAT_WITH_CUDA

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
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

// Compares got with ref in norm: "" when max |got − ref| <= max_tol·max(‖ref‖∞, 1e-4) and the relative L2
// error <= l2_tol (absolute: max |got − ref| <= max_tol, no L2 test), else a report naming the
// worst and the first bad element. Non-finite reference elements (an empty row's lse, −inf on both
// sides) are skipped; a non-finite result where the reference is finite fails.
inline std::string compare(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                           double max_tol, double l2_tol, bool absolute = false) {
  double ref_max = 0, err_max = 0, err2 = 0, ref2 = 0;
  int64_t worst = -1, first_nan = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    ref_max = std::max(ref_max, std::abs(ref[i]));
    ref2 += ref[i] * ref[i];
    if (!std::isfinite(got[i]) && std::isfinite(ref[i])) {
      if (first_nan < 0) first_nan = int64_t(i);
      continue;
    }
    if (!std::isfinite(ref[i])) continue;  // e.g. lse of an empty row: both -inf
    const double e = std::abs(got[i] - ref[i]);
    err2 += e * e;
    if (e > err_max) err_max = e, worst = int64_t(i);
  }
  // Scale floor: where the exact gradient vanishes (window 1 or T = 1: a single visible key, so
  // dS = P·(dP − Δ) = 0), fp32 rounding of dP − Δ leaves ~1e-7 (Δ comes from the bf16 output).
  // Inputs are O(1), so 1e-4 is far below any real gradient here and far above that noise.
  constexpr double kFloor = 1e-4;
  const double bound = absolute ? max_tol : max_tol * std::max(ref_max, kFloor);
  const double rel2 = std::sqrt(err2 / std::max(ref2, kFloor * kFloor * double(ref.size())));
  std::ostringstream o;
  if (first_nan >= 0)
    o << what << ": element " << first_nan << " not finite (got " << got[size_t(first_nan)] << ", expected "
      << ref[size_t(first_nan)] << "): unwritten or NaN; ";
  if (err_max > bound) {
    int64_t first_bad = -1;
    for (size_t i = 0; i < ref.size() && first_bad < 0; ++i)
      if (std::isfinite(ref[i]) && std::abs(got[i] - ref[i]) > bound) first_bad = int64_t(i);
    o << what << ": max |err| " << err_max << " > " << bound << " (ref max " << ref_max << ") at " << worst
      << " (got " << got[size_t(worst)] << ", expected " << ref[size_t(worst)] << "); first bad index "
      << first_bad << " (got " << got[size_t(first_bad)] << ", expected " << ref[size_t(first_bad)] << "); ";
  }
  if (!absolute && l2_tol > 0 && rel2 > l2_tol) o << what << ": relative L2 error " << rel2 << " > " << l2_tol << "; ";
  return o.str();
}

}  // namespace dmat::test

#endif  // DMAT_WITH_CUDA
