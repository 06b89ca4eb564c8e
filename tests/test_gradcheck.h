// The finite-difference harness of the CPU kernel suites (test_ops, test_dma): fp64 inputs, central
// differences of a scalar loss, and the relative-error check of an analytic gradient against them.
// Header-only: it needs OpenMP, which only the kernel suites link; test_util.cpp is compiled into
// every suite, including those that link a single library without OpenMP.
#pragma once
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "test_util.h"

namespace dmat::test {

using Vec = std::vector<double>;

// Fresh uniform values in [lo, hi); each call site passes its own seed.
template <class T = double>
std::vector<T> rnd(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(n);
  random_fill(v, seed, lo, hi);
  return v;
}

inline double norm(const Vec& a) {
  double s = 0;
  for (double x : a) s += x * x;
  return std::sqrt(s);
}

// ‖a − b‖ / ‖b‖ (NaN or inf when b is zero: a zero reference never passes a relative bound)
inline double rel_err(const Vec& a, const Vec& b) {
  Vec d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return norm(d) / norm(b);
}

// As rel_err, but an exact-zero reference passes when the result is zero too (a 1e-300 floor):
// for forwards compared with a naive reference, where some outputs are exactly 0.
inline double rel_err_zero_ok(const Vec& a, const Vec& b) {
  Vec d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return norm(d) / std::max(norm(b), 1e-300);
}

// The scalar loss Σ w·y whose gradient with respect to y is w: a random w checks every element.
inline double weighted_sum(const Vec& w, const Vec& y) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += w[i] * y[i];
  return s;
}

// Restores the OpenMP thread count when a test ends.
struct ThreadCountGuard {
  int saved = omp_get_max_threads();
  ~ThreadCountGuard() { omp_set_num_threads(saved); }
};

// Central differences of loss() with respect to every element of x (loss reads x). One thread:
// thousands of tiny kernel calls, which a second, busy core would only slow down; the analytic
// side still runs with the default thread count.
inline Vec numeric_grad(Vec& x, const std::function<double()>& loss) {
  ThreadCountGuard guard;
  omp_set_num_threads(1);
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i], h = 1e-6 * std::max(1.0, std::abs(xi));
    x[i] = xi + h;
    const double lp = loss();
    x[i] = xi - h;
    const double lm = loss();
    g[i] = (lp - lm) / ((xi + h) - (xi - h));
    x[i] = xi;
  }
  return g;
}

// The analytic gradient matches finite differences to 1e-6 in relative norm. print_margin prints
// the relative error for the record (the DMA suite keeps its margins in the test log).
inline void expect_grad(const Vec& analytic, const Vec& fd, const std::string& what, bool print_margin = false) {
  ASSERT_EQ(analytic.size(), fd.size()) << what;
  ASSERT_GT(norm(fd), 0.0) << what << ": gradient is zero, the check would be vacuous";
  const double r = rel_err(analytic, fd);
  if (print_margin) std::printf("[fd] %-60s rel %.2e\n", what.c_str(), r);
  EXPECT_LT(r, 1e-6) << what;
}

}  // namespace dmat::test
