// Dynamic Mask Attention, CPU reference: thresholds against their brute-force definition (sort each
// prefix), the forward against a naive masked softmax written here, every backward against central
// finite differences in fp64, the tie rule, adversarial biases, determinism across thread counts,
// the layer at initialisation, the config and the FLOP count.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "config/config.h"
#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/attention.h"
#include "model/model.h"
#include "ops/ops.h"
#include "optim/adamw.h"
#include "train/trainer.h"
#include "test_gradcheck.h"
#include "test_util.h"

namespace dmat {
namespace {

using cpu::AttnShape;
using cpu::DmaBiasForm;
using test::norm;
using test::numeric_grad;
using test::rnd;
using test::ThreadCountGuard;
using test::Vec;
using test::weighted_sum;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Unlike test::rel_err, an exact-zero reference passes when the result is zero too.
double rel_err(const Vec& a, const Vec& b) { return test::rel_err_zero_ok(a, b); }

// The shared finite-difference check, with the relative error printed for the record.
void expect_grad(const Vec& analytic, const Vec& fd, const std::string& what) {
  test::expect_grad(analytic, fd, what, /*print_margin=*/true);
}

// ---- references written from the definition ------------------------------------------------------

// thr_i = the w-th largest of bias[0..i] (sorting the prefix), −inf while i + 1 < w.
Vec brute_thresholds(const Vec& bias, int64_t rows, int64_t T, int64_t w) {
  Vec thr(bias.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < T; ++i) {
      Vec prefix(bias.begin() + r * T, bias.begin() + r * T + i + 1);
      std::sort(prefix.begin(), prefix.end(), std::greater<double>());
      thr[size_t(r * T + i)] = i + 1 < w ? -kInf : prefix[size_t(w - 1)];
    }
  return thr;
}

// Masked softmax attention with the bias, one (b, h, i) at a time, mask from the brute-force
// thresholds: kept(i, j) = j <= i && bias_j >= thr_i. With a local window L = s.window > 0 (our
// extension), written from its definition: the L most recent keys, and of the keys 0 … i−L those
// whose bias reaches the w-th largest bias among them (all of them while there are fewer than w).
void naive_dma(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v, const Vec& bias, int64_t w,
               const AttnShape& s) {
  const Vec thr = brute_thresholds(bias, s.B * s.Hkv, s.T, w);
  const int64_t L = s.window;
  auto kept = [&](int64_t row, int64_t i, int64_t j) {
    const double bj = bias[size_t(row * s.T + j)];
    if (L == 0) return j <= i && bj >= thr[size_t(row * s.T + i)];
    if (j > i) return false;
    if (i - j < L) return true;
    Vec before(bias.begin() + row * s.T, bias.begin() + row * s.T + (i - L + 1));
    std::sort(before.begin(), before.end(), std::greater<double>());
    return int64_t(before.size()) < w || bj >= before[size_t(w - 1)];
  };
  out.assign(size_t(s.B * s.T * s.H * s.Dv), 0.0);
  lse.assign(size_t(s.B * s.H * s.T), 0.0);
  const int64_t g = s.H / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t i = 0; i < s.T; ++i) {
        const int64_t hk = h / g;
        Vec sc(size_t(i + 1), -kInf);
        double mx = -kInf;
        for (int64_t j = 0; j <= i; ++j) {
          const double bj = bias[size_t((b * s.Hkv + hk) * s.T + j)];
          if (!kept(b * s.Hkv + hk, i, j)) continue;
          double d = 0;
          for (int64_t c = 0; c < s.Dqk; ++c)
            d += q[size_t(((b * s.T + i) * s.H + h) * s.Dqk + c)] * k[size_t(((b * s.T + j) * s.Hkv + hk) * s.Dqk + c)];
          sc[size_t(j)] = s.scale * d + bj;
          mx = std::max(mx, sc[size_t(j)]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(sc[size_t(j)] - mx);
        for (int64_t j = 0; j <= i; ++j) {
          const double p = std::exp(sc[size_t(j)] - mx) / sum;
          for (int64_t c = 0; c < s.Dv; ++c)
            out[size_t(((b * s.T + i) * s.H + h) * s.Dv + c)] += p * v[size_t(((b * s.T + j) * s.Hkv + hk) * s.Dv + c)];
        }
        lse[size_t((b * s.H + h) * s.T + i)] = mx + std::log(sum);
      }
}

AttnShape shape_of(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D) {
  AttnShape s;
  s.B = B; s.T = T; s.H = H; s.Hkv = Hkv; s.Dqk = D; s.Dv = D;
  s.scale = 1.0 / std::sqrt(double(D));
  return s;
}

std::string tag(const AttnShape& s, int64_t w, const std::string& extra = "") {
  return " B" + std::to_string(s.B) + " T" + std::to_string(s.T) + " H" + std::to_string(s.H) + "/" +
         std::to_string(s.Hkv) + " D" + std::to_string(s.Dqk) + " w" + std::to_string(w) + extra;
}

// Bias patterns, [rows, T].
enum class Pattern { Random, Ties, AllEqual, Increasing, Decreasing };
Vec make_bias(Pattern p, int64_t rows, int64_t T, uint64_t seed) {
  Vec b = rnd(size_t(rows * T), seed, 0.5, 3.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < T; ++j) {
      double& x = b[size_t(r * T + j)];
      switch (p) {
        case Pattern::Random: break;
        case Pattern::Ties: x = std::floor(x * 1.5); break;  // values in {0, 1, 2, 3, 4}
        case Pattern::AllEqual: x = 1.0; break;
        case Pattern::Increasing: x = 0.1 * double(j) + 0.01 * double(r); break;
        case Pattern::Decreasing: x = -0.1 * double(j) + 0.01 * double(r); break;
      }
    }
  return b;
}

// ---- thresholds -----------------------------------------------------------------------------------

TEST(DmaThresholds, MatchBruteForceOnAdversarialBiases) {
  uint64_t seed = 10;
  int ties_beyond_w = 0;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing})
    for (int64_t w : {1, 2, 3, 5, 8})
      for (int64_t T : {int64_t(1), w - 1, w, w + 1, 3 * w + 2}) {
        if (T < 1) continue;
        const int64_t rows = 3;
        Vec bias = make_bias(p, rows, T, ++seed), thr(bias.size());
        cpu::dma_thresholds<double>(thr.data(), bias.data(), rows, T, w);
        const Vec ref = brute_thresholds(bias, rows, T, w);
        ASSERT_EQ(std::memcmp(thr.data(), ref.data(), thr.size() * sizeof(double)), 0)
            << "pattern " << int(p) << " w " << w << " T " << T;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < T; ++i) {
            const double t = thr[size_t(r * T + i)];
            if (i > 0) ASSERT_GE(t, thr[size_t(r * T + i - 1)]) << "thresholds never decrease";
            int64_t kept = 0;
            for (int64_t j = 0; j <= i; ++j) kept += bias[size_t(r * T + j)] >= t;
            // at least min(i+1, w) keys; more only through ties at the threshold
            ASSERT_GE(kept, std::min(i + 1, w));
            if (p == Pattern::Random || p == Pattern::Increasing || p == Pattern::Decreasing) {
              ASSERT_EQ(kept, std::min(i + 1, w));
            }
            if (p == Pattern::AllEqual) {
              ASSERT_EQ(kept, i + 1) << "all biases equal: every causal key is kept";
            }
            ties_beyond_w += kept > w;
          }
      }
  EXPECT_GT(ties_beyond_w, 100) << "the tie patterns never kept more than w keys: the tie test is vacuous";
}

TEST(DmaThresholds, IncreasingBiasesKeepTheMostRecentKeysDecreasingTheFirst) {
  const int64_t T = 12, w = 4;
  Vec inc = make_bias(Pattern::Increasing, 1, T, 1), dec = make_bias(Pattern::Decreasing, 1, T, 1);
  Vec ti(size_t(T), 0.0), td(size_t(T), 0.0);
  cpu::dma_thresholds<double>(ti.data(), inc.data(), 1, T, w);
  cpu::dma_thresholds<double>(td.data(), dec.data(), 1, T, w);
  for (int64_t i = w - 1; i < T; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      EXPECT_EQ(inc[size_t(j)] >= ti[size_t(i)], j > i - w) << "increasing: a sliding window, i " << i << " j " << j;
      EXPECT_EQ(dec[size_t(j)] >= td[size_t(i)], j < w) << "decreasing: the first w keys, i " << i << " j " << j;
    }
}

// With a local window L the thresholds are those of L = 0 shifted by L (−inf before), bit for bit.
TEST(DmaThresholds, LocalWindowShiftsTheThresholdsByL) {
  uint64_t seed = 40;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::Increasing, Pattern::Decreasing})
    for (int64_t L : {1, 3, 25}) {
      const int64_t rows = 3, T = 20, w = 4;
      const Vec bias = make_bias(p, rows, T, ++seed);
      Vec t0(bias.size()), tL(bias.size());
      cpu::dma_thresholds<double>(t0.data(), bias.data(), rows, T, w);
      cpu::dma_thresholds<double>(tL.data(), bias.data(), rows, T, w, L);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < T; ++i)
          EXPECT_EQ(tL[size_t(r * T + i)], i >= L ? t0[size_t(r * T + i - L)] : -kInf)
              << "L " << L << " row " << r << " query " << i << " pattern " << int(p);
    }
}

TEST(DmaThresholds, NanBiasIsAnError) {
  Vec bias = {1.0, std::nan(""), 2.0}, thr(3);
  EXPECT_THROW(cpu::dma_thresholds<double>(thr.data(), bias.data(), 1, 3, 2), Error);
}

// ---- attention forward ----------------------------------------------------------------------------

TEST(DmaAttention, ForwardMatchesNaiveMaskedSoftmax) {
  uint64_t seed = 100;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing})
    for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 2}, {4, 1}})
      for (int64_t T : {3, 5, 6, 13}) {
        const int64_t w = 5, D = 6, B = 2;
        AttnShape s = shape_of(B, T, H, Hkv, D);
        Vec q = rnd(size_t(B * T * H * D), ++seed), k = rnd(size_t(B * T * Hkv * D), ++seed),
            v = rnd(size_t(B * T * Hkv * D), ++seed), bias = make_bias(p, B * Hkv, T, ++seed);
        Vec thr(bias.size()), out(size_t(B * T * H * D)), lse(size_t(B * H * T)), ro, rl;
        cpu::dma_thresholds<double>(thr.data(), bias.data(), B * Hkv, T, w);
        cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(),
                                           thr.data(), s);
        naive_dma(ro, rl, q, k, v, bias, w, s);
        EXPECT_LT(rel_err(out, ro), 1e-13) << tag(s, w) << " pattern " << int(p);
        EXPECT_LT(rel_err(lse, rl), 1e-13) << tag(s, w) << " pattern " << int(p);
      }
}

// The local window (our extension): L recent keys plus the top-w of the keys before them, against
// the naive mask written from that definition, for L below, at and beyond T.
TEST(DmaAttention, LocalWindowForwardMatchesNaiveMaskedSoftmax) {
  uint64_t seed = 300;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::Increasing, Pattern::Decreasing})
    for (int64_t L : {1, 2, 4, 20})
      for (int64_t T : {3, 7, 13}) {
        const int64_t w = 3, D = 5, B = 2, H = 4, Hkv = 2;
        AttnShape s = shape_of(B, T, H, Hkv, D);
        s.window = L;
        Vec q = rnd(size_t(B * T * H * D), ++seed), k = rnd(size_t(B * T * Hkv * D), ++seed),
            v = rnd(size_t(B * T * Hkv * D), ++seed), bias = make_bias(p, B * Hkv, T, ++seed);
        Vec thr(bias.size()), out(size_t(B * T * H * D)), lse(size_t(B * H * T)), ro, rl;
        cpu::dma_thresholds<double>(thr.data(), bias.data(), B * Hkv, T, w, L);
        cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(),
                                           thr.data(), s);
        naive_dma(ro, rl, q, k, v, bias, w, s);
        const std::string t = tag(s, w, " L" + std::to_string(L) + " pattern " + std::to_string(int(p)));
        EXPECT_LT(rel_err(out, ro), 1e-13) << t;
        EXPECT_LT(rel_err(lse, rl), 1e-13) << t;
      }
}

// With distinct biases a query keeps exactly min(i+1, L+w) keys, its L most recent among them.
// q = 0 and biases within 1e-9 of 0 give every kept key a weight of about 1/n, and one-hot values
// (v_j = e_j) make output component j positive exactly when key j is kept.
TEST(DmaAttention, LocalWindowKeepsMinOfPrefixAndBudget) {
  const int64_t B = 1, T = 16, H = 1, Hkv = 1, w = 3, L = 4, D = T;
  AttnShape s = shape_of(B, T, H, Hkv, D);
  s.window = L;
  Vec q(size_t(T * D), 0.0), k = rnd(size_t(T * D), 9), v(size_t(T * D), 0.0);
  for (int64_t j = 0; j < T; ++j) v[size_t(j * D + j)] = 1.0;  // v_j = e_j
  // Distinct biases in a random order, small enough that e^bias ≈ 1 ± 1e-9 (weights ≈ uniform).
  Vec r = rnd(size_t(T), 10, 0.0, 1.0), bias(static_cast<size_t>(T)), thr(static_cast<size_t>(T)),
      out(static_cast<size_t>(T * D)), lse(static_cast<size_t>(T));
  for (int64_t j = 0; j < T; ++j) bias[size_t(j)] = 1e-9 * r[size_t(j)];
  cpu::dma_thresholds<double>(thr.data(), bias.data(), 1, T, w, L);
  cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  for (int64_t i = 0; i < T; ++i) {
    int64_t n = 0;
    for (int64_t j = 0; j < T; ++j) {
      const double o = out[size_t(i * D + j)];
      if (o > 0) ++n;
      if (j <= i && i - j < L) EXPECT_GT(o, 0) << "query " << i << " must keep recent key " << j;
      if (j > i) EXPECT_EQ(o, 0) << "query " << i << " kept future key " << j;
    }
    EXPECT_EQ(n, std::min(i + 1, L + w)) << "query " << i;
  }
}

// T <= w: every causal key is kept, so DMA is causal attention with the bias added; with a constant
// bias (A = 0 at init, "exp" form: bias 1, all keys tie) it is exactly causal attention.
TEST(DmaAttention, ConstantBiasIsCausalAttention) {
  const int64_t B = 2, T = 11, H = 4, Hkv = 2, D = 8, w = 3;
  AttnShape s = shape_of(B, T, H, Hkv, D);
  Vec q = rnd(size_t(B * T * H * D), 1), k = rnd(size_t(B * T * Hkv * D), 2), v = rnd(size_t(B * T * Hkv * D), 3);
  Vec bias(size_t(B * Hkv * T), 1.0), thr(bias.size());
  cpu::dma_thresholds<double>(thr.data(), bias.data(), B * Hkv, T, w);
  Vec out(size_t(B * T * H * D)), lse(size_t(B * H * T)), co(out.size()), cl(lse.size());
  cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  cpu::attention_forward<double>(co.data(), cl.data(), q.data(), k.data(), v.data(), s);
  EXPECT_LT(rel_err(out, co), 1e-14);
  Vec shifted = cl;
  for (double& x : shifted) x += 1.0;  // the constant bias shifts the log-sum-exp only
  EXPECT_LT(rel_err(lse, shifted), 1e-14);
  // backward: the same dq, dk, dv, and dbias rows sum to zero (softmax is shift invariant)
  Vec G = rnd(out.size(), 4), dq(q.size()), dk(k.size()), dv(v.size()), db(bias.size()), cq(q.size()),
      ck(k.size()), cv(v.size());
  cpu::dma_attention_backward<double>(dq.data(), dk.data(), dv.data(), db.data(), G.data(), out.data(), lse.data(),
                                      q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  cpu::attention_backward<double>(cq.data(), ck.data(), cv.data(), G.data(), co.data(), cl.data(), q.data(), k.data(),
                                  v.data(), s);
  EXPECT_LT(rel_err(dq, cq), 1e-12);
  EXPECT_LT(rel_err(dk, ck), 1e-12);
  EXPECT_LT(rel_err(dv, cv), 1e-12);
  for (int64_t r = 0; r < B * Hkv; ++r) {
    double sum = 0, mag = 0;
    for (int64_t j = 0; j < T; ++j) sum += db[size_t(r * T + j)], mag += std::abs(db[size_t(r * T + j)]);
    EXPECT_GT(mag, 1e-3);
    EXPECT_NEAR(sum, 0.0, 1e-12 * mag + 1e-14);
  }
}

TEST(DmaAttention, HugeBiasesPickTheLargestKeptKey) {
  // Biases far larger than any q·k: the softmax is one-hot on the largest-bias key j <= i.
  const int64_t B = 1, T = 9, H = 2, Hkv = 1, D = 4, w = 3;
  AttnShape s = shape_of(B, T, H, Hkv, D);
  Vec q = rnd(size_t(T * H * D), 5), k = rnd(size_t(T * D), 6), v = rnd(size_t(T * D), 7);
  Vec bias = rnd(size_t(T), 8, 1e6, 1e8), thr(bias.size()), out(q.size()), lse(size_t(H * T));
  cpu::dma_thresholds<double>(thr.data(), bias.data(), 1, T, w);
  cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t jmax = std::max_element(bias.begin(), bias.begin() + i + 1) - bias.begin();
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(out[size_t((i * H + h) * D + d)], v[size_t(jmax * D + d)]);
      EXPECT_TRUE(std::isfinite(lse[size_t(h * T + i)]));
    }
}

// ---- gradients --------------------------------------------------------------------------------------

// L = Σ G ⊙ out with out = attention(q, k, v, bias, thresholds(bias)): the thresholds follow the
// perturbed bias, so with distinct biases the kept set is locally constant and L is smooth.
void check_attention_grads(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t w, Pattern p,
                           uint64_t seed, int64_t local = 0) {
  AttnShape s = shape_of(B, T, H, Hkv, D);
  s.window = local;
  Vec q = rnd(size_t(B * T * H * D), seed), k = rnd(size_t(B * T * Hkv * D), seed + 1),
      v = rnd(size_t(B * T * Hkv * D), seed + 2), bias = make_bias(p, B * Hkv, T, seed + 3),
      G = rnd(size_t(B * T * H * D), seed + 4);
  Vec thr(bias.size()), out(G.size()), lse(size_t(B * H * T));
  auto forward = [&] {
    cpu::dma_thresholds<double>(thr.data(), bias.data(), B * Hkv, T, w, local);
    cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(),
                                       s);
    return weighted_sum(G, out);
  };
  forward();
  Vec dq(q.size()), dk(k.size()), dv(v.size()), db(bias.size());
  cpu::dma_attention_backward<double>(dq.data(), dk.data(), dv.data(), db.data(), G.data(), out.data(), lse.data(),
                                      q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  const std::string t = tag(s, w, " L" + std::to_string(local) + " pattern " + std::to_string(int(p)));
  expect_grad(dq, numeric_grad(q, forward), "dma_attention dq" + t);
  expect_grad(dk, numeric_grad(k, forward), "dma_attention dk" + t);
  expect_grad(dv, numeric_grad(v, forward), "dma_attention dv" + t);
  expect_grad(db, numeric_grad(bias, forward), "dma_attention dbias" + t);
}

TEST(DmaAttention, GradientsMatchFiniteDifferences) {
  uint64_t seed = 1000;
  const int64_t w = 4;
  for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 2}, {4, 1}})
    for (int64_t T : {w - 1, w, w + 5})  // shorter than, equal to and longer than w
      check_attention_grads(2, T, H, Hkv, 6, w, Pattern::Random, seed += 10);
  // monotone biases: the kept set is a sliding window / the first w keys
  check_attention_grads(1, 10, 4, 2, 4, 3, Pattern::Increasing, seed += 10);
  check_attention_grads(1, 10, 4, 2, 4, 3, Pattern::Decreasing, seed += 10);
  // with a local window
  for (int64_t L : {1, 3})
    for (Pattern p : {Pattern::Random, Pattern::Decreasing}) check_attention_grads(2, 11, 4, 2, 4, 3, p, seed += 10, L);
}

// L = Σ G ⊙ bias(v, W_dt, A).
// fd_on_vw = false for tiny A: ∂L/∂v and ∂L/∂W_dt are O(A) there, below what central differences
// resolve on an O(1) loss (roundoff ~1e-10); they are checked at the other A.
void check_bias_grads(DmaBiasForm form, double A_lo, double A_hi, bool fd_on_vw, uint64_t seed,
                      const std::string& what) {
  const int64_t B = 2, T = 5, Hkv = 2, Dh = 3, C = Hkv * Dh;
  Vec v = rnd(size_t(B * T * C), seed), W = rnd(size_t(Hkv * C), seed + 1), A = rnd(size_t(Hkv), seed + 2, A_lo, A_hi),
      G = rnd(size_t(B * Hkv * T), seed + 3);
  Vec z(G.size()), bias(G.size());
  auto forward = [&] {
    cpu::dma_bias_forward<double>(z.data(), bias.data(), v.data(), W.data(), A.data(), B, T, Hkv, Dh, form);
    return weighted_sum(G, bias);
  };
  forward();
  // the ops accumulate: start from known values and subtract them
  Vec dv = rnd(v.size(), seed + 4), dW = rnd(W.size(), seed + 5), dA = rnd(A.size(), seed + 6);
  const Vec dv0 = dv, dW0 = dW, dA0 = dA;
  cpu::dma_bias_backward<double>(dv.data(), dW.data(), dA.data(), G.data(), z.data(), bias.data(), v.data(), W.data(),
                                 A.data(), B, T, Hkv, Dh, form);
  for (size_t i = 0; i < dv.size(); ++i) dv[i] -= dv0[i];
  for (size_t i = 0; i < dW.size(); ++i) dW[i] -= dW0[i];
  for (size_t i = 0; i < dA.size(); ++i) dA[i] -= dA0[i];
  const std::string t = std::string(form == DmaBiasForm::Exp ? " exp" : " linear") + " " + what;
  if (fd_on_vw) {
    expect_grad(dv, numeric_grad(v, forward), "dma_bias dv" + t);
    expect_grad(dW, numeric_grad(W, forward), "dma_bias dW_dt" + t);
  }
  expect_grad(dA, numeric_grad(A, forward), "dma_bias dA" + t);
}

TEST(DmaBias, GradientsMatchFiniteDifferences) {
  for (DmaBiasForm f : {DmaBiasForm::Exp, DmaBiasForm::Linear}) {
    check_bias_grads(f, -1.0, 1.0, true, 2000, "A in [-1, 1]");
    check_bias_grads(f, 4.0, 8.0, true, 2010, "huge A in [4, 8]");
    check_bias_grads(f, 1e-9, 2e-9, false, 2020, "tiny A ~1e-9");
  }
}

TEST(DmaBias, ForwardMatchesDefinition) {
  const int64_t B = 2, T = 3, Hkv = 2, Dh = 2, C = Hkv * Dh;
  Vec v = rnd(size_t(B * T * C), 1, -30, 30), W = rnd(size_t(Hkv * C), 2), A = {0.7, -0.3};
  for (DmaBiasForm f : {DmaBiasForm::Exp, DmaBiasForm::Linear}) {
    Vec z(size_t(B * Hkv * T)), bias(z.size());
    cpu::dma_bias_forward<double>(z.data(), bias.data(), v.data(), W.data(), A.data(), B, T, Hkv, Dh, f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t t = 0; t < T; ++t) {
          double zz = 0;
          for (int64_t c = 0; c < C; ++c) zz += v[size_t((b * T + t) * C + c)] * W[size_t(h * C + c)];
          const double sp = zz > 30 ? zz + std::exp(-zz) : std::log(1 + std::exp(zz));  // softplus
          const double a = A[size_t(h)] * sp, ref = f == DmaBiasForm::Exp ? std::exp(a) : a;
          const size_t x = size_t((b * Hkv + h) * T + t);
          EXPECT_NEAR(z[x], zz, 1e-12 * std::max(1.0, std::abs(zz)));
          EXPECT_NEAR(bias[x], ref, 1e-12 * std::max(1.0, std::abs(ref)));
        }
  }
}

// The whole DMA core as the layer chains it: L = Σ G ⊙ attention(q, k, v, bias(v, W_dt, A),
// thresholds(bias)); v reaches L through both the values and the bias.
struct FdOn {
  bool A = true, W = true;
};
void check_chain(DmaBiasForm form, int64_t T, int64_t H, int64_t Hkv, int64_t w, double A_lo, double A_hi, FdOn on,
                 uint64_t seed, const std::string& what) {
  const int64_t B = 2, D = 4, C = Hkv * D;
  AttnShape s = shape_of(B, T, H, Hkv, D);
  Vec q = rnd(size_t(B * T * H * D), seed), k = rnd(size_t(B * T * C), seed + 1), v = rnd(size_t(B * T * C), seed + 2),
      W = rnd(size_t(Hkv * C), seed + 3, -2, 2), A = rnd(size_t(Hkv), seed + 4, A_lo, A_hi),
      G = rnd(size_t(B * T * H * D), seed + 5);
  Vec z(size_t(B * Hkv * T)), bias(z.size()), thr(z.size()), out(G.size()), lse(size_t(B * H * T));
  auto forward = [&] {
    cpu::dma_bias_forward<double>(z.data(), bias.data(), v.data(), W.data(), A.data(), B, T, Hkv, D, form);
    cpu::dma_thresholds<double>(thr.data(), bias.data(), B * Hkv, T, w);
    cpu::dma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(),
                                       s);
    return weighted_sum(G, out);
  };
  forward();
  Vec dq(q.size()), dk(k.size()), dv(v.size()), db(bias.size()), dW(W.size(), 0.0), dA(A.size(), 0.0);
  cpu::dma_attention_backward<double>(dq.data(), dk.data(), dv.data(), db.data(), G.data(), out.data(), lse.data(),
                                      q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
  cpu::dma_bias_backward<double>(dv.data(), dW.data(), dA.data(), db.data(), z.data(), bias.data(), v.data(), W.data(),
                                 A.data(), B, T, Hkv, D, form);
  const std::string t = tag(s, w, std::string(form == DmaBiasForm::Exp ? " exp " : " linear ") + what);
  expect_grad(dq, numeric_grad(q, forward), "dma chain dq" + t);
  expect_grad(dk, numeric_grad(k, forward), "dma chain dk" + t);
  expect_grad(dv, numeric_grad(v, forward), "dma chain dv" + t);
  if (on.W) expect_grad(dW, numeric_grad(W, forward), "dma chain dW_dt" + t);
  if (on.A) expect_grad(dA, numeric_grad(A, forward), "dma chain dA" + t);
}

TEST(DmaChain, GradientsMatchFiniteDifferences) {
  uint64_t seed = 3000;
  for (DmaBiasForm f : {DmaBiasForm::Exp, DmaBiasForm::Linear}) {
    for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 2}, {4, 1}})
      for (int64_t T : {3, 4, 9})  // w = 4: shorter, equal, longer
        check_chain(f, T, H, Hkv, 4, 0.5, 1.5, {}, seed += 10, "A in [0.5, 1.5]");
    check_chain(f, 9, 4, 2, 3, -1.5, -0.5, {}, seed += 10, "negative A");
    check_chain(f, 9, 4, 2, 3, 2.0, 3.0, {}, seed += 10, "large A");
    // A ~ 1e-9: biases nearly tie but stay ordered. A finite-difference step on A itself (1e-6)
    // would flip their order, so dA is checked where no selection happens (T <= w); dW_dt is O(A),
    // below finite-difference resolution (see check_bias_grads).
    check_chain(f, 9, 4, 2, 3, 1e-9, 2e-9, {false, false}, seed += 10, "tiny A");
    check_chain(f, 3, 4, 2, 3, 1e-9, 2e-9, {true, false}, seed += 10, "tiny A, T <= w");
  }
}

// ---- determinism --------------------------------------------------------------------------------------

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

TEST(DmaDeterminism, OneAndTwoThreadsAgreeBitForBit) {
  ThreadCountGuard guard;
  const int64_t B = 2, T = 37, H = 4, Hkv = 2, D = 16, C = Hkv * D, w = 8;
  AttnShape s = shape_of(B, T, H, Hkv, D);
  std::vector<float> q(size_t(B * T * H * D)), k(size_t(B * T * C)), v(k.size()), W(size_t(Hkv * C)), A = {0.8f, 1.3f},
      G(q.size());
  test::random_fill(q, 1);
  test::random_fill(k, 2);
  test::random_fill(v, 3);
  test::random_fill(W, 4);
  test::random_fill(G, 5);
  using Res = std::vector<std::vector<float>>;
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> z(size_t(B * Hkv * T)), bias(z.size()), thr(z.size()), out(q.size()), lse(size_t(B * H * T)),
        dq(q.size()), dk(k.size()), dv(v.size()), db(z.size()), dW(W.size(), 0.f), dA(2, 0.f);
    cpu::dma_bias_forward<float>(z.data(), bias.data(), v.data(), W.data(), A.data(), B, T, Hkv, D, DmaBiasForm::Exp);
    cpu::dma_thresholds<float>(thr.data(), bias.data(), B * Hkv, T, w);
    cpu::dma_attention_forward<float>(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
    cpu::dma_attention_backward<float>(dq.data(), dk.data(), dv.data(), db.data(), G.data(), out.data(), lse.data(),
                                       q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
    cpu::dma_bias_backward<float>(dv.data(), dW.data(), dA.data(), db.data(), z.data(), bias.data(), v.data(),
                                  W.data(), A.data(), B, T, Hkv, D, DmaBiasForm::Exp);
    return Res{z, bias, thr, out, lse, dq, dk, dv, db, dW, dA};
  };
  const Res one = run(1), two = run(2);
  const char* names[] = {"z", "bias", "thr", "out", "lse", "dq", "dk", "dv", "dbias", "dW_dt", "dA"};
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(same_bits(one[i], two[i])) << names[i];
}

// ---- the layer, the config, the FLOP count ----------------------------------------------------------

ModelConfig dma_model(int64_t window) {
  ModelConfig m;
  m.vocab_size = 13;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 6;
  m.ffn_dim = 20;
  m.qk_norm = true;
  m.residual_scale = true;
  m.init_std = 0.3;
  m.attention.type = "dma";
  m.attention.dma.window = window;
  return m;
}

// At initialisation A = 0: every "exp" bias is exp(0) = 1, all keys tie at the threshold and are all
// kept, so a DMA model computes exactly what the MHA model with the same weights computes, even
// with w far below T.
TEST(DmaLayer, AtInitialisationAllKeysTieAndDmaIsCausalAttention) {
  const int64_t B = 2, T = 12;
  ModelConfig cd = dma_model(2), cm = dma_model(0);
  cm.attention.type = "mha";
  Model md(cd, DType::F64), mm(cm, DType::F64);
  md.init_weights(17);
  // copy the shared weights by name; the DMA-only ones (dt_proj, A) keep their init
  const auto& di = md.param_info();
  for (size_t i = 0; i < di.size(); ++i) {
    if (di[i].name.find("self_attn.A") != std::string::npos) {
      Tensor a = md.params().get(int(i));
      for (int64_t j = 0; j < a.numel(); ++j) ASSERT_EQ(a.as<double>()[j], 0.0) << "A starts at 0";
    }
    for (size_t k = 0; k < mm.param_info().size(); ++k)
      if (mm.param_info()[k].name == di[i].name) ops::copy(mm.params().get(int(k)), md.params().get(int(i)));
  }
  std::vector<int32_t> x(B * T), y(B * T);
  Rng r(3);
  for (auto& t : x) t = int32_t(r.below(13));
  for (auto& t : y) t = int32_t(r.below(13));
  md.forward(x.data(), y.data(), B, T, 0.0);
  mm.forward(x.data(), y.data(), B, T, 0.0);
  Tensor ld = md.logits(), lm = mm.logits();
  Vec a(ld.as<double>(), ld.as<double>() + ld.numel()), b(lm.as<double>(), lm.as<double>() + lm.numel());
  EXPECT_LT(rel_err(a, b), 1e-13);
  EXPECT_GT(norm(b), 0.0);
}

// The investigation's options act on exactly the tensors they name: a_init sets A, dt_init_std sets
// dt_proj's spread, and bias_lr_scale multiplies the learning rate of A and dt_proj alone (AdamW's
// first step moves each coordinate by lr·g/(|g| + eps), so the steps differ by the scale exactly
// up to rounding, and every other tensor moves identically).
TEST(DmaLayer, InitAndLearningRateOptionsActOnAAndDtProjOnly) {
  const int64_t B = 2, T = 12;
  auto step_once = [&](double lr_scale, Arena& before) {
    ModelConfig c = dma_model(3);
    c.attention.dma.a_init = 0.25;
    c.attention.dma.dt_init_std = 0.05;
    c.attention.dma.bias_lr_scale = lr_scale;
    Model m(c, DType::F64);
    m.init_weights(21);
    before = m.host_weights();
    std::vector<int32_t> x(B * T), y(B * T);
    Rng r(4);
    for (auto& t : x) t = int32_t(r.below(13));
    for (auto& t : y) t = int32_t(r.below(13));
    m.zero_grad();
    m.forward(x.data(), y.data(), B, T, 1.0 / double(B * T));
    m.backward();
    TrainConfig tc;
    tc.weight_decay = 0;
    AdamW opt(m, tc);
    opt.step(1e-3);
    return m.host_weights();
  };
  Arena b1, b10;
  const Arena a1 = step_once(1.0, b1), a10 = step_once(10.0, b10);
  ModelConfig c = dma_model(3);
  const auto info = Model::declare_params(c).info();
  for (size_t i = 0; i < info.size(); ++i) {
    const bool scaled = info[i].name.find("self_attn.A") != std::string::npos ||
                        info[i].name.find("dt_proj") != std::string::npos;
    const Tensor p0 = b1.get(int(i)), p1 = a1.get(int(i)), p10 = a10.get(int(i));
    double spread = 0;
    for (int64_t j = 0; j < p0.numel(); ++j) {
      const double x0 = p0.as<double>()[j], d1 = p1.as<double>()[j] - x0, d10 = p10.as<double>()[j] - x0;
      ASSERT_EQ(x0, b10.get(int(i)).as<double>()[j]) << info[i].name << ": same start";
      if (info[i].name.find("self_attn.A") != std::string::npos) EXPECT_EQ(x0, 0.25);
      if (info[i].name.find("dt_proj") != std::string::npos) spread += x0 * x0;
      EXPECT_NEAR(d10, (scaled ? 10.0 : 1.0) * d1, 1e-12) << info[i].name << "[" << j << "]";
    }
    if (info[i].name.find("dt_proj") != std::string::npos)
      EXPECT_NEAR(std::sqrt(spread / double(p0.numel())), 0.05, 0.02) << "dt_proj init spread";
  }
}

// The local window's CUDA kernels await the gpu tests: a CUDA run is refused by the trainer's pre-check,
// naming the key.
TEST(DmaLayer, LocalWindowIsRefusedOnCuda) {
  nlohmann::json j = {{"model", {{"attention", {{"type", "dma"}, {"window", 8}, {"local_window", 4}}}}},
                      {"data", {{"train", "x"}, {"val", "y"}}}};
  try {
    check_device_support(parse_config(j), Device::CUDA);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.attention.local_window 4 is not yet verified on CUDA"),
              std::string::npos)
        << e.what();
  }
  j["model"]["attention"]["local_window"] = 0;
  EXPECT_NO_THROW(check_device_support(parse_config(j), Device::CPU));
}

TEST(DmaLayer, ParametersHaveHuggingFaceNamesAndShapes) {
  ModelConfig c = dma_model(3);
  ParamTable t = Model::declare_params(c);
  bool dt = false, A = false;
  for (const auto& p : t.info()) {
    if (p.name == "model.layers.1.self_attn.dt_proj.weight") {
      dt = true;
      EXPECT_EQ(p.shape, (Shape{2, 12}));  // [Hkv, Hkv·Dh], nn.Linear(Hkv·Dh → Hkv)
      EXPECT_TRUE(p.decay);
    }
    if (p.name == "model.layers.1.self_attn.A") {
      A = true;
      EXPECT_EQ(p.shape, (Shape{2}));
      EXPECT_EQ(p.init, Init::Zeros);
      EXPECT_FALSE(p.decay);
    }
  }
  EXPECT_TRUE(dt && A);
}

TEST(DmaLayer, CoreFlopsCountKeptKeysLikeSlidingWindow) {
  ModelConfig d = dma_model(5), s = dma_model(5), m = dma_model(0);
  s.attention.type = "swa";
  s.attention.swa.window = 5;
  m.attention.type = "mha";
  auto ad = make_attention(d), as = make_attention(s), am = make_attention(m);
  for (int64_t T : {1, 4, 5, 6, 100}) EXPECT_DOUBLE_EQ(ad->core_flops_per_token(T), as->core_flops_per_token(T)) << T;
  for (int64_t T : {1, 4, 5}) EXPECT_DOUBLE_EQ(ad->core_flops_per_token(T), am->core_flops_per_token(T)) << T;
  // T = 100, w = 5: (15 + 95·5)/100 = 4.9 keys per query
  EXPECT_DOUBLE_EQ(ad->core_flops_per_token(100), 4.0 * 4 * 6 * 4.9);
}

std::string config_error(const nlohmann::json& attention) {
  nlohmann::json j = {{"model", {{"attention", attention}}}, {"data", {{"train", "x"}, {"val", "y"}}}};
  try {
    parse_config(j);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(DmaConfig, ParsesAndValidates) {
  nlohmann::json j = {{"model", {{"attention", {{"type", "dma"}, {"window", 32}}}}},
                      {"data", {{"train", "x"}, {"val", "y"}}}};
  Config c = parse_config(j);
  EXPECT_EQ(c.model.attention.type, "dma");
  EXPECT_EQ(c.model.attention.dma.window, 32);
  EXPECT_EQ(c.model.attention.dma.bias_form, "exp");
  EXPECT_EQ(c.resolved["model"]["attention"]["bias_form"], "exp");
  j["model"]["attention"]["bias_form"] = "linear";
  EXPECT_EQ(parse_config(j).model.attention.dma.bias_form, "linear");

  EXPECT_NE(config_error({{"type", "dma"}}).find("model.attention.window must be > 0 for attention type dma (keys "
                                                  "kept per query) (got 0)"),
            std::string::npos)
      << config_error({{"type", "dma"}});
  EXPECT_NE(config_error({{"type", "dma"}, {"window", 4}, {"bias_form", "cubic"}})
                .find("model.attention.bias_form must be one of exp, linear (got \"cubic\")"),
            std::string::npos)
      << config_error({{"type", "dma"}, {"window", 4}, {"bias_form", "cubic"}});
  EXPECT_NE(config_error({{"type", "mha"}, {"bias_form", "linear"}})
                .find("model.attention.bias_form must be absent for attention type mha (only dma has it; "
                      "got \"linear\")"),
            std::string::npos)
      << config_error({{"type", "mha"}, {"bias_form", "linear"}});

  // The investigation's options: defaults, resolution of dt_init_std, and their errors.
  EXPECT_EQ(c.model.attention.dma.local_window, 0);
  EXPECT_EQ(c.model.attention.dma.a_init, 0.0);
  EXPECT_EQ(c.model.attention.dma.dt_init_std, c.model.init_std);  // 0 resolves to model.init_std
  EXPECT_EQ(c.model.attention.dma.bias_lr_scale, 1.0);
  j["model"]["attention"]["local_window"] = 8;
  j["model"]["attention"]["a_init"] = -0.5;
  j["model"]["attention"]["dt_init_std"] = 0.1;
  j["model"]["attention"]["bias_lr_scale"] = 10;
  const Config c2 = parse_config(j);
  EXPECT_EQ(c2.model.attention.dma.local_window, 8);
  EXPECT_EQ(c2.model.attention.dma.a_init, -0.5);
  EXPECT_EQ(c2.model.attention.dma.dt_init_std, 0.1);
  EXPECT_EQ(c2.model.attention.dma.bias_lr_scale, 10.0);
  for (const auto& [key, bad, expect] :
       {std::tuple<const char*, nlohmann::json, const char*>{"local_window", -1, "model.attention.local_window must be >= 0"},
        {"dt_init_std", -0.1, "model.attention.dt_init_std must be >= 0"},
        {"bias_lr_scale", 0, "model.attention.bias_lr_scale must be > 0"}}) {
    const std::string e = config_error({{"type", "dma"}, {"window", 4}, {key, bad}});
    EXPECT_NE(e.find(expect), std::string::npos) << e;
  }
  for (const char* key : {"local_window", "a_init", "dt_init_std", "bias_lr_scale"}) {
    const std::string e = config_error({{"type", "swa"}, {"window", 4}, {key, 2}});
    EXPECT_NE(e.find(std::string("model.attention.") + key + " must be absent for attention type swa"),
              std::string::npos)
        << e;
  }
}

}  // namespace
}  // namespace dmat
