// CPU reference kernels: every backward against central finite differences (double), forwards
// against naive loops written here, bitwise determinism across thread counts, and the error case.
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <omp.h>

#include "core/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "test_gradcheck.h"
#include "test_util.h"

namespace dmat {
namespace {

using test::expect_grad;
using test::norm;
using test::numeric_grad;
using test::rel_err;
using test::rnd;
using test::ThreadCountGuard;
using test::Vec;
using test::weighted_sum;

Vec minus(const Vec& a, const Vec& b) {
  Vec d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ---- gemm ----------------------------------------------------------------------------------------

// op(A)[i,k] and op(B)[k,j] of the gemm convention.
template <class T>
T op_a(const std::vector<T>& A, int64_t M, int64_t K, bool ta, int64_t i, int64_t k) {
  return ta ? A[size_t(k * M + i)] : A[size_t(i * K + k)];
}
template <class T>
T op_b(const std::vector<T>& B, int64_t N, int64_t K, bool tb, int64_t k, int64_t j) {
  return tb ? B[size_t(j * K + k)] : B[size_t(k * N + j)];
}

template <class T>
void check_gemm_vs_naive(int64_t M, int64_t N, int64_t K, bool ta, bool tb, T alpha, T beta, uint64_t seed) {
  auto A = rnd<T>(size_t(M * K), seed), B = rnd<T>(size_t(K * N), seed + 1), C0 = rnd<T>(size_t(M * N), seed + 2);
  if (beta == T(0)) std::fill(C0.begin(), C0.end(), std::numeric_limits<T>::quiet_NaN());
  auto C = C0;
  cpu::gemm<T>(C.data(), A.data(), B.data(), M, N, K, ta, tb, alpha, beta);
  const double eps = std::numeric_limits<T>::epsilon();
  int bad = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(op_a(A, M, K, ta, i, k)) * double(op_b(B, N, K, tb, k, j));
        acc += p;
        mag += std::abs(p);
      }
      const double c0 = beta == T(0) ? 0.0 : double(beta) * double(C0[size_t(i * N + j)]);
      const double ref = double(alpha) * acc + c0;
      const double tol = 2.0 * double(K + 2) * eps * (std::abs(double(alpha)) * mag + std::abs(c0)) + 1e-300;
      const double got = double(C[size_t(i * N + j)]);
      if (!(std::abs(got - ref) <= tol) && bad++ < 5)
        ADD_FAILURE() << "gemm " << M << "x" << N << "x" << K << " ta=" << ta << " tb=" << tb << " beta=" << beta
                      << " C[" << i << "," << j << "] = " << got << ", expected " << ref;
    }
  EXPECT_EQ(bad, 0);
}

TEST(OpsGemm, MatchesNaiveTripleLoop) {
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 65, 17}, {300, 257, 129}, {20, 40, 300}, {3, 4100, 5}};
  uint64_t seed = 100;
  for (auto& s : shapes)
    for (int t = 0; t < 4; ++t)
      for (double beta : {0.0, 1.0, 0.5}) {
        const bool ta = t & 1, tb = t & 2;
        check_gemm_vs_naive<float>(s[0], s[1], s[2], ta, tb, 1.25f, float(beta), seed += 3);
        check_gemm_vs_naive<double>(s[0], s[1], s[2], ta, tb, 0.75, beta, seed += 3);
      }
}

TEST(OpsGemm, ZeroKScalesC) {
  std::vector<double> C = {1, 2, 3, 4, 5, 6};
  cpu::gemm<double>(C.data(), nullptr, nullptr, 2, 3, 0, false, false, 1.0, 2.0);
  EXPECT_EQ(C, (std::vector<double>{2, 4, 6, 8, 10, 12}));
  std::fill(C.begin(), C.end(), std::nan(""));
  cpu::gemm<double>(C.data(), nullptr, nullptr, 2, 3, 0, false, false, 1.0, 0.0);
  EXPECT_EQ(C, std::vector<double>(6, 0.0));
}

TEST(OpsGemm, GradientsMatchFiniteDifferences) {
  const int64_t M = 7, N = 5, K = 3;
  const double alpha = 1.3;
  uint64_t seed = 200;
  for (int t = 0; t < 4; ++t)
    for (double beta : {0.0, 1.0}) {
      const bool ta = t & 1, tb = t & 2;
      Vec A = rnd(M * K, ++seed), B = rnd(K * N, ++seed), C0 = rnd(M * N, ++seed), W = rnd(M * N, ++seed);
      auto loss = [&] {
        Vec C = C0;
        cpu::gemm<double>(C.data(), A.data(), B.data(), M, N, K, ta, tb, alpha, beta);
        return weighted_sum(W, C);
      };
      // The backward of C = α op(A)·op(B) + β C0, as the ops layer writes it with gemm itself.
      Vec dA(A.size()), dB(B.size());
      if (!ta)
        cpu::gemm<double>(dA.data(), W.data(), B.data(), M, K, N, false, !tb, alpha, 0.0);  // W·op(B)ᵀ
      else
        cpu::gemm<double>(dA.data(), B.data(), W.data(), K, M, N, tb, true, alpha, 0.0);  // op(B)·Wᵀ
      if (!tb)
        cpu::gemm<double>(dB.data(), A.data(), W.data(), K, N, M, !ta, false, alpha, 0.0);  // op(A)ᵀ·W
      else
        cpu::gemm<double>(dB.data(), W.data(), A.data(), N, K, M, true, ta, alpha, 0.0);  // Wᵀ·op(A)
      const std::string tag = " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) + " beta=" + std::to_string(beta);
      expect_grad(dA, numeric_grad(A, loss), "gemm dA" + tag);
      expect_grad(dB, numeric_grad(B, loss), "gemm dB" + tag);
      if (beta != 0.0) {
        Vec dC0 = W;
        for (double& x : dC0) x *= beta;
        expect_grad(dC0, numeric_grad(C0, loss), "gemm dC" + tag);
      }
    }
}

// ---- elementwise, sum_squares, adamw ------------------------------------------------------------

TEST(OpsElementwise, FillCopyAddScale) {
  const int64_t n = 1000;
  auto x = rnd<float>(n, 300), y = rnd<float>(n, 301);
  auto y0 = y;
  cpu::add_inplace<float>(y.data(), x.data(), n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[size_t(i)], y0[size_t(i)] + x[size_t(i)]);
  cpu::scale_inplace<float>(y.data(), n, 0.5f);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[size_t(i)], (y0[size_t(i)] + x[size_t(i)]) * 0.5f);
  cpu::copy<float>(y.data(), x.data(), n);
  EXPECT_EQ(y, x);
  cpu::fill<float>(y.data(), n, 3.5f);
  EXPECT_EQ(y, std::vector<float>(n, 3.5f));
}

TEST(OpsElementwise, SumSquaresMatchesNaive) {
  for (int64_t n : {0, 1, 8191, 8192, 20003}) {
    auto x = rnd<float>(size_t(n), 400 + uint64_t(n));
    double ref = 0;
    for (float v : x) ref += double(v) * double(v);
    EXPECT_NEAR(cpu::sum_squares<float>(x.data(), n), ref, 1e-12 * std::max(1.0, ref)) << "n=" << n;
  }
}

TEST(OpsAdamw, TwoStepsMatchPytorchFormula) {
  const int64_t n = 37;
  const double lr = 3e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  Vec p = rnd(n, 500), m(n, 0.0), v(n, 0.0);
  Vec rp = p, rm = m, rv = v;
  for (int step = 1; step <= 2; ++step) {
    Vec g = rnd(n, 510 + uint64_t(step));
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    cpu::adamw_step<double>(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, bc1, bc2);
    for (int64_t i = 0; i < n; ++i) {  // torch.optim.AdamW, written out
      rp[i] *= 1 - lr * wd;
      rm[i] = b1 * rm[i] + (1 - b1) * g[i];
      rv[i] = b2 * rv[i] + (1 - b2) * g[i] * g[i];
      rp[i] -= lr * (rm[i] / bc1) / (std::sqrt(rv[i] / bc2) + eps);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(p[i], rp[i], 1e-14) << i;
    EXPECT_NEAR(m[i], rm[i], 1e-15) << i;
    EXPECT_NEAR(v[i], rv[i], 1e-15) << i;
  }
  EXPECT_GT(rel_err(p, rnd(n, 500)), 1e-4);  // the parameters did move
}

// ---- embedding -----------------------------------------------------------------------------------

TEST(OpsEmbedding, ForwardGathersRows) {
  const int64_t V = 6, D = 5, n = 8;
  auto table = rnd<float>(V * D, 600);
  std::vector<int32_t> tok = {3, 0, 5, 3, 3, 1, 0, 2};
  std::vector<float> out(n * D);
  cpu::embedding_forward<float>(out.data(), table.data(), tok.data(), n, D);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) ASSERT_EQ(out[size_t(i * D + d)], table[size_t(tok[size_t(i)] * D + d)]);
}

TEST(OpsEmbedding, BackwardMatchesFiniteDifferences) {
  const int64_t V = 7, D = 9, n = 12;
  std::vector<int32_t> tok = {2, 5, 2, 2, 0, 6, 5, 2, 1, 0, 3, 2};  // repeats; token 4 unused
  Vec table = rnd(V * D, 610), W = rnd(n * D, 611), d0 = rnd(V * D, 612);
  auto loss = [&] {
    Vec out(n * D);
    cpu::embedding_forward<double>(out.data(), table.data(), tok.data(), n, D);
    return weighted_sum(W, out);
  };
  Vec dt = d0;
  cpu::embedding_backward<double>(dt.data(), W.data(), tok.data(), n, D);
  expect_grad(minus(dt, d0), numeric_grad(table, loss), "embedding dtable");
}

// ---- rmsnorm -------------------------------------------------------------------------------------

TEST(OpsRmsnorm, ForwardMatchesNaive) {
  const int64_t R = 5, D = 37;
  const double eps = 1e-5;
  for (bool with_w : {true, false}) {
    Vec x = rnd(R * D, 700), w = rnd(D, 701, 0.5, 1.5), y(R * D), rstd(R);
    cpu::rmsnorm_forward<double>(y.data(), rstd.data(), x.data(), with_w ? w.data() : nullptr, R, D, eps);
    for (int64_t r = 0; r < R; ++r) {
      double ms = 0;
      for (int64_t d = 0; d < D; ++d) ms += x[r * D + d] * x[r * D + d] / D;
      const double rs = 1 / std::sqrt(ms + eps);
      EXPECT_NEAR(rstd[r], rs, 1e-13 * rs);
      for (int64_t d = 0; d < D; ++d)
        EXPECT_NEAR(y[r * D + d], x[r * D + d] * rs * (with_w ? w[d] : 1.0), 1e-13) << r << "," << d;
    }
    Vec xa = x, rstd2(R);  // y may alias x
    cpu::rmsnorm_forward<double>(xa.data(), rstd2.data(), xa.data(), with_w ? w.data() : nullptr, R, D, eps);
    EXPECT_EQ(xa, y);
  }
}

TEST(OpsRmsnorm, BackwardMatchesFiniteDifferences) {
  const int64_t R = 4, D = 11;
  const double eps = 1e-5;
  uint64_t seed = 720;
  for (bool with_w : {true, false})
    for (bool acc : {false, true}) {
      Vec x = rnd(R * D, ++seed), w = rnd(D, ++seed, 0.5, 1.5), G = rnd(R * D, ++seed);
      const double* wp = with_w ? w.data() : nullptr;
      auto loss = [&] {
        Vec y(R * D), rstd(R);
        cpu::rmsnorm_forward<double>(y.data(), rstd.data(), x.data(), wp, R, D, eps);
        return weighted_sum(G, y);
      };
      Vec y(R * D), rstd(R);
      cpu::rmsnorm_forward<double>(y.data(), rstd.data(), x.data(), wp, R, D, eps);
      const Vec dx0 = rnd(R * D, ++seed), dw0 = rnd(D, ++seed);  // junk to overwrite or add to
      Vec dx = dx0, dw = dw0;
      cpu::rmsnorm_backward<double>(dx.data(), dw.data(), G.data(), x.data(), wp, rstd.data(), R, D, acc);
      const std::string tag = std::string(with_w ? " with w" : " without w") + (acc ? " accumulate" : " overwrite");
      expect_grad(acc ? minus(dx, dx0) : dx, numeric_grad(x, loss), "rmsnorm dx" + tag);
      if (with_w)
        expect_grad(minus(dw, dw0), numeric_grad(w, loss), "rmsnorm dw" + tag);
      else
        EXPECT_EQ(dw, dw0) << "dw must be untouched without w";
    }
}

// ---- rope ----------------------------------------------------------------------------------------

TEST(OpsRope, ForwardMatchesFormulaAndInverts) {
  const int64_t B = 2, Tn = 7, H = 3, Dh = 8;
  for (double theta : {10000.0, 500000.0}) {
    Vec x = rnd(B * Tn * H * Dh, 800), y(x.size());
    cpu::rope_forward<double>(y.data(), x.data(), B, Tn, H, Dh, theta);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tn; ++t)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < Dh / 2; ++i) {
            const int64_t o = ((b * Tn + t) * H + h) * Dh;
            const double a = t * std::pow(theta, -2.0 * i / Dh);
            EXPECT_NEAR(y[o + i], x[o + i] * std::cos(a) - x[o + i + Dh / 2] * std::sin(a), 1e-14);
            EXPECT_NEAR(y[o + i + Dh / 2], x[o + i + Dh / 2] * std::cos(a) + x[o + i] * std::sin(a), 1e-14);
          }
    Vec back = y;  // dx may alias dy
    cpu::rope_backward<double>(back.data(), back.data(), B, Tn, H, Dh, theta);
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(back[i], x[i], 1e-14);
    auto xf = rnd<float>(x.size(), 801);
    std::vector<float> yf(x.size());
    cpu::rope_forward<float>(yf.data(), xf.data(), B, Tn, H, Dh, theta);
    cpu::rope_backward<float>(yf.data(), yf.data(), B, Tn, H, Dh, theta);
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(yf[i], xf[i], 1e-6);
  }
}

TEST(OpsRope, BackwardMatchesFiniteDifferences) {
  const int64_t B = 2, Tn = 7, H = 3, Dh = 6;
  for (double theta : {10000.0, 500000.0}) {
    Vec x = rnd(B * Tn * H * Dh, 810), G = rnd(x.size(), 811);
    auto loss = [&] {
      Vec y(x.size());
      cpu::rope_forward<double>(y.data(), x.data(), B, Tn, H, Dh, theta);
      return weighted_sum(G, y);
    };
    Vec dx(x.size());
    cpu::rope_backward<double>(dx.data(), G.data(), B, Tn, H, Dh, theta);
    expect_grad(dx, numeric_grad(x, loss), "rope dx theta=" + std::to_string(theta));
  }
}

// ---- attention -----------------------------------------------------------------------------------

cpu::AttnShape attn_shape(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Dqk, int64_t Dv, int64_t window) {
  cpu::AttnShape s;
  s.B = B, s.T = T, s.H = H, s.Hkv = Hkv, s.Dqk = Dqk, s.Dv = Dv, s.window = window;
  s.scale = 1.0 / std::sqrt(double(Dqk));
  return s;
}

// Full score matrix per (b, h), masked with −inf, softmax by hand.
void naive_attention(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v, const cpu::AttnShape& s) {
  const int64_t T = s.T, G = s.H / s.Hkv;
  out.assign(size_t(s.B * T * s.H * s.Dv), 0.0);
  lse.assign(size_t(s.B * s.H * T), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t hk = h / G;
      std::vector<Vec> S(size_t(T), Vec(size_t(T), -INFINITY));
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          const bool visible = j <= i && (s.window == 0 || j > i - s.window);
          if (!visible) continue;
          double d = 0;
          for (int64_t c = 0; c < s.Dqk; ++c)
            d += q[((b * T + i) * s.H + h) * s.Dqk + c] * k[((b * T + j) * s.Hkv + hk) * s.Dqk + c];
          S[i][j] = s.scale * d;
        }
      for (int64_t i = 0; i < T; ++i) {
        double mx = -INFINITY, sum = 0;
        for (double x : S[i]) mx = std::max(mx, x);
        for (double x : S[i]) sum += std::exp(x - mx);
        lse[(b * s.H + h) * T + i] = mx + std::log(sum);
        for (int64_t j = 0; j < T; ++j) {
          const double p = std::exp(S[i][j] - mx) / sum;
          for (int64_t c = 0; c < s.Dv; ++c)
            out[((b * T + i) * s.H + h) * s.Dv + c] += p * v[((b * T + j) * s.Hkv + hk) * s.Dv + c];
        }
      }
    }
}

struct AttnCase {
  int64_t T, H, Hkv, window;
};
const AttnCase kAttnCases[] = {{9, 4, 4, 0},  {13, 4, 2, 0},  {17, 4, 1, 0}, {11, 4, 4, 1},  {12, 4, 2, 1},
                               {15, 4, 1, 3}, {10, 2, 2, 3},  {16, 4, 2, 3}, {14, 4, 1, 40}, {9, 2, 1, 9}};

std::string attn_tag(const AttnCase& c) {
  return " T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " Hkv=" + std::to_string(c.Hkv) +
         " window=" + std::to_string(c.window);
}

TEST(OpsAttention, ForwardMatchesNaiveSoftmax) {
  uint64_t seed = 900;
  for (const auto& c : kAttnCases) {
    const auto s = attn_shape(2, c.T, c.H, c.Hkv, 6, 5, c.window);
    Vec q = rnd(2 * c.T * c.H * 6, ++seed, -2, 2), k = rnd(2 * c.T * c.Hkv * 6, ++seed, -2, 2),
        v = rnd(2 * c.T * c.Hkv * 5, ++seed);
    Vec ref_out, ref_lse;
    naive_attention(ref_out, ref_lse, q, k, v, s);
    Vec out(ref_out.size(), NAN), lse(ref_lse.size(), NAN);
    cpu::attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
    EXPECT_LT(rel_err(out, ref_out), 1e-13) << attn_tag(c);
    EXPECT_LT(rel_err(lse, ref_lse), 1e-13) << attn_tag(c);
    // float kernel against the double reference
    std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end());
    std::vector<float> of(out.size()), lf(lse.size());
    cpu::attention_forward<float>(of.data(), lf.data(), qf.data(), kf.data(), vf.data(), s);
    EXPECT_LT(rel_err(Vec(of.begin(), of.end()), ref_out), 1e-5) << attn_tag(c);
    EXPECT_LT(rel_err(Vec(lf.begin(), lf.end()), ref_lse), 1e-5) << attn_tag(c);
  }
}

TEST(OpsAttention, StableForLargeScores) {
  auto s = attn_shape(1, 5, 1, 1, 2, 2, 0);
  s.scale = 1.0;
  std::vector<float> q = {100, 100, 90, 95, 80, -80, 70, 60, 100, 0};
  std::vector<float> k = {100, 0, 0, 100, 50, 50, -100, 0, 10, 10};
  auto v = rnd<float>(10, 950);
  std::vector<float> out(10), lse(5);
  cpu::attention_forward<float>(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
  for (float x : out) EXPECT_TRUE(std::isfinite(x));
  for (float x : lse) EXPECT_TRUE(std::isfinite(x));
  EXPECT_FLOAT_EQ(lse[0], 10000.0f);  // one visible key
  EXPECT_FLOAT_EQ(out[0], v[0]);
}

TEST(OpsAttention, BackwardMatchesFiniteDifferences) {
  uint64_t seed = 1000;
  const int64_t B = 2, Dqk = 6, Dv = 5;
  for (const auto& c : kAttnCases) {
    const auto s = attn_shape(B, c.T, c.H, c.Hkv, Dqk, Dv, c.window);
    Vec q = rnd(B * c.T * c.H * Dqk, ++seed, -1.5, 1.5), k = rnd(B * c.T * c.Hkv * Dqk, ++seed, -1.5, 1.5),
        v = rnd(B * c.T * c.Hkv * Dv, ++seed), G = rnd(B * c.T * c.H * Dv, ++seed);
    Vec out(G.size()), lse(size_t(B * c.H * c.T));
    auto loss = [&] {
      Vec o(G.size()), l(lse.size());
      cpu::attention_forward<double>(o.data(), l.data(), q.data(), k.data(), v.data(), s);
      return weighted_sum(G, o);
    };
    cpu::attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
    Vec dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
    cpu::attention_backward<double>(dq.data(), dk.data(), dv.data(), G.data(), out.data(), lse.data(), q.data(),
                                    k.data(), v.data(), s);
    if (c.window == 1) {  // out_i = v_i: q and k do not matter
      EXPECT_LT(norm(dq) + norm(dk), 1e-12) << attn_tag(c);
      EXPECT_LT(norm(numeric_grad(q, loss)) + norm(numeric_grad(k, loss)), 1e-9) << attn_tag(c);
    } else {
      expect_grad(dq, numeric_grad(q, loss), "attention dq" + attn_tag(c));
      expect_grad(dk, numeric_grad(k, loss), "attention dk" + attn_tag(c));
    }
    expect_grad(dv, numeric_grad(v, loss), "attention dv" + attn_tag(c));
  }
}

// The packed output of one q/k/v GEMM: unpacking rotates q and k exactly as rope_forward does on
// the unpacked tensors and copies v; packing the gradients is its transpose, the same values as
// rope_backward of dq and dk beside dv.
TEST(OpsRope, PackedQkvMatchesUnpacked) {
  const int64_t B = 2, Tn = 5, H = 4, Hkv = 2, Dh = 6, W = (H + 2 * Hkv) * Dh;
  const double theta = 500.0;
  Vec qkv = rnd(B * Tn * W, 1300), q(B * Tn * H * Dh, NAN), k(B * Tn * Hkv * Dh, NAN), v(k.size(), NAN);
  cpu::rope_unpack_qkv<double>(q.data(), k.data(), v.data(), qkv.data(), B, Tn, H, Hkv, Dh, theta);
  Vec q0(q.size()), k0(k.size()), v0(v.size());
  for (int64_t n = 0; n < B * Tn; ++n) {
    for (int64_t i = 0; i < H * Dh; ++i) q0[n * H * Dh + i] = qkv[n * W + i];
    for (int64_t i = 0; i < Hkv * Dh; ++i) k0[n * Hkv * Dh + i] = qkv[n * W + H * Dh + i];
    for (int64_t i = 0; i < Hkv * Dh; ++i) v0[n * Hkv * Dh + i] = qkv[n * W + (H + Hkv) * Dh + i];
  }
  cpu::rope_forward<double>(q0.data(), q0.data(), B, Tn, H, Dh, theta);
  cpu::rope_forward<double>(k0.data(), k0.data(), B, Tn, Hkv, Dh, theta);
  EXPECT_EQ(q, q0);
  EXPECT_EQ(k, k0);
  EXPECT_EQ(v, v0);
  // backward: pack (dq, dk, dv) and compare with rope_backward of each, placed by hand
  Vec dqkv(qkv.size(), NAN);
  cpu::rope_pack_qkv_backward<double>(dqkv.data(), q.data(), k.data(), v.data(), B, Tn, H, Hkv, Dh, theta);
  cpu::rope_backward<double>(q0.data(), q.data(), B, Tn, H, Dh, theta);
  cpu::rope_backward<double>(k0.data(), k.data(), B, Tn, Hkv, Dh, theta);
  for (int64_t n = 0; n < B * Tn; ++n) {
    for (int64_t i = 0; i < H * Dh; ++i) EXPECT_EQ(dqkv[n * W + i], q0[n * H * Dh + i]);
    for (int64_t i = 0; i < Hkv * Dh; ++i) EXPECT_EQ(dqkv[n * W + H * Dh + i], k0[n * Hkv * Dh + i]);
    for (int64_t i = 0; i < Hkv * Dh; ++i) EXPECT_EQ(dqkv[n * W + (H + Hkv) * Dh + i], v[n * Hkv * Dh + i]);
  }
}

// ---- swiglu, residual ----------------------------------------------------------------------------

TEST(OpsSwiglu, ForwardAndBackward) {
  const int64_t n = 50;
  Vec g = rnd(n, 1100, -4, 4), u = rnd(n, 1101), G = rnd(n, 1102), out(n);
  cpu::swiglu_forward<double>(out.data(), g.data(), u.data(), n);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-g[i])) * u[i], 1e-15);
  auto loss = [&] {
    Vec o(n);
    cpu::swiglu_forward<double>(o.data(), g.data(), u.data(), n);
    return weighted_sum(G, o);
  };
  Vec dg(n, NAN), du(n, NAN);
  cpu::swiglu_backward<double>(dg.data(), du.data(), G.data(), g.data(), u.data(), n);
  expect_grad(dg, numeric_grad(g, loss), "swiglu dg");
  expect_grad(du, numeric_grad(u, loss), "swiglu du");
}

// The packed form (g and u as the two halves of one [rows, 2F] tensor, as one gate/up GEMM writes
// them) computes the same values as the plain arrays, element for element.
TEST(OpsSwiglu, PackedRowsMatchPlainArrays) {
  const int64_t R = 5, F = 13;
  Vec gu = rnd(2 * R * F, 1110, -4, 4), G = rnd(R * F, 1111), g(R * F), u(R * F);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < F; ++c) g[r * F + c] = gu[r * 2 * F + c], u[r * F + c] = gu[r * 2 * F + F + c];
  Vec out(R * F), want(R * F), dgu(2 * R * F, NAN), dg(R * F), du(R * F);
  cpu::swiglu_forward<double>(out.data(), gu.data(), gu.data() + F, R, F, 2 * F);
  cpu::swiglu_forward<double>(want.data(), g.data(), u.data(), R * F);
  cpu::swiglu_backward<double>(dgu.data(), dgu.data() + F, G.data(), gu.data(), gu.data() + F, R, F, 2 * F);
  cpu::swiglu_backward<double>(dg.data(), du.data(), G.data(), g.data(), u.data(), R * F);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < F; ++c) {
      EXPECT_EQ(out[r * F + c], want[r * F + c]);
      EXPECT_EQ(dgu[r * 2 * F + c], dg[r * F + c]);
      EXPECT_EQ(dgu[r * 2 * F + F + c], du[r * F + c]);
    }
}

TEST(OpsResidual, ForwardAndBackward) {
  const int64_t R = 6, D = 70;
  for (bool scaled : {true, false}) {
    Vec x = rnd(R * D, 1200), rs = rnd(D, 1201, 0.5, 1.5), br = rnd(R * D, 1202), G = rnd(R * D, 1203);
    const double* rp = scaled ? rs.data() : nullptr;
    Vec out(R * D);
    cpu::residual_forward<double>(out.data(), x.data(), rp, br.data(), R, D);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d)
        ASSERT_NEAR(out[r * D + d], (scaled ? rs[d] : 1.0) * x[r * D + d] + br[r * D + d], 1e-15);
    auto loss = [&] {
      Vec o(R * D);
      cpu::residual_forward<double>(o.data(), x.data(), rp, br.data(), R, D);
      return weighted_sum(G, o);
    };
    const Vec dr0 = rnd(D, 1204);
    Vec dx(R * D, NAN), dr = dr0;
    cpu::residual_backward<double>(dx.data(), scaled ? dr.data() : nullptr, G.data(), x.data(), rp, R, D);
    const std::string tag = scaled ? " with r_scale" : " without r_scale";
    expect_grad(dx, numeric_grad(x, loss), "residual dx" + tag);
    expect_grad(G, numeric_grad(br, loss), "residual dbranch" + tag);
    if (scaled) {
      expect_grad(minus(dr, dr0), numeric_grad(rs, loss), "residual dr_scale");
      Vec dxa = G, dra = dr0;  // dx aliasing dout gives the same result
      cpu::residual_backward<double>(dxa.data(), dra.data(), dxa.data(), x.data(), rp, R, D);
      EXPECT_EQ(dxa, dx);
      EXPECT_EQ(dra, dr);
    }
  }
}

// ---- softmax cross-entropy -----------------------------------------------------------------------

TEST(OpsXent, LossMatchesLogSoftmaxByHand) {
  const int64_t R = 5, V = 23;
  Vec logits = rnd(R * V, 1300, -3, 3), loss(R, NAN);
  std::vector<int32_t> tgt = {4, -1, 0, 22, 7};
  cpu::softmax_xent<double>(loss.data(), nullptr, logits.data(), tgt.data(), R, V, 1.0);
  for (int64_t r = 0; r < R; ++r) {
    if (tgt[r] < 0) {
      EXPECT_EQ(loss[r], 0.0);
      continue;
    }
    double z = 0;
    for (int64_t j = 0; j < V; ++j) z += std::exp(logits[r * V + j]);
    EXPECT_NEAR(loss[r], -std::log(std::exp(logits[r * V + tgt[r]]) / z), 1e-13) << r;
  }
  // Shifting a row by a huge constant changes nothing (max-subtracted).
  std::vector<float> big(V), small(V);
  for (int64_t j = 0; j < V; ++j) small[j] = float(logits[j]), big[j] = small[j] + 1e4f;
  float lb = 0, ls = 0;
  int32_t t = 3;
  cpu::softmax_xent<float>(&lb, nullptr, big.data(), &t, 1, V, 1.0f);
  cpu::softmax_xent<float>(&ls, nullptr, small.data(), &t, 1, V, 1.0f);
  EXPECT_TRUE(std::isfinite(lb));
  EXPECT_NEAR(lb, ls, 1e-2);  // 1e4 has float spacing ~1e-3
}

TEST(OpsXent, GradientMatchesFiniteDifferences) {
  const int64_t R = 6, V = 13;
  const double gs = 0.37;
  Vec logits = rnd(R * V, 1310, -2, 2);
  std::vector<int32_t> tgt = {3, -1, 12, 0, -1, 5};
  auto total = [&] {
    Vec loss(R);
    cpu::softmax_xent<double>(loss.data(), nullptr, logits.data(), tgt.data(), R, V, 1.0);
    double s = 0;
    for (double l : loss) s += gs * l;
    return s;
  };
  Vec loss(R), d(R * V, NAN);
  cpu::softmax_xent<double>(loss.data(), d.data(), logits.data(), tgt.data(), R, V, gs);
  expect_grad(d, numeric_grad(logits, total), "softmax_xent dlogits");
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(d[1 * V + j], 0.0) << "ignored row has zero gradient";
  Vec inplace = logits, loss2(R);  // dlogits aliasing logits
  cpu::softmax_xent<double>(loss2.data(), inplace.data(), inplace.data(), tgt.data(), R, V, gs);
  EXPECT_EQ(inplace, d);
  EXPECT_EQ(loss2, loss);
}

TEST(OpsXent, TargetOutOfRangeThrowsNamingIt) {
  const int64_t R = 3, V = 10;
  Vec logits = rnd(R * V, 1320), loss(R);
  std::vector<int32_t> tgt = {1, 2, 12345};
  try {
    cpu::softmax_xent<double>(loss.data(), nullptr, logits.data(), tgt.data(), R, V, 1.0);
    FAIL() << "no error for a target >= V";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("12345"), std::string::npos) << msg;
    EXPECT_NE(msg.find("row 2"), std::string::npos) << msg;
  }
  tgt[2] = int32_t(V);  // exactly V is out of range too
  EXPECT_THROW(cpu::softmax_xent<double>(loss.data(), nullptr, logits.data(), tgt.data(), R, V, 1.0), Error);
}

// ---- determinism across thread counts ------------------------------------------------------------

// Runs f with 1 and with 2 OpenMP threads; f returns the outputs to compare bit for bit.
template <class F>
void expect_thread_count_invariant(F f, const std::string& what) {
  ThreadCountGuard guard;
  omp_set_num_threads(1);
  const auto one = f();
  omp_set_num_threads(2);
  const auto two = f();
  ASSERT_EQ(one.size(), two.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(bitwise_equal(one[i], two[i])) << what << " output " << i;
}

TEST(OpsDeterminism, BitwiseEqualWithOneAndTwoThreads) {
  using F = std::vector<float>;
  const int64_t M = 301, N = 259, K = 300;
  const auto A = rnd<float>(M * K, 1400), B = rnd<float>(K * N, 1401), C0 = rnd<float>(M * N, 1402);
  for (int t = 0; t < 4; ++t)
    expect_thread_count_invariant(
        [&] {
          F C = C0;
          cpu::gemm<float>(C.data(), A.data(), B.data(), M, N, K, t & 1, t & 2, 1.0f, 1.0f);
          return std::vector<F>{C};
        },
        "gemm trans " + std::to_string(t));
  // Tall-skinny dW shape (few output rows, long reduction).
  expect_thread_count_invariant(
      [&] {
        F C(size_t(24 * 40), 0.5f);
        cpu::gemm<float>(C.data(), A.data(), B.data(), 24, 40, 1000, true, false, 1.0f, 1.0f);
        return std::vector<F>{C};
      },
      "gemm dW");

  const auto s = attn_shape(2, 64, 4, 2, 16, 8, 24);
  const auto q = rnd<float>(2 * 64 * 4 * 16, 1410), k = rnd<float>(2 * 64 * 2 * 16, 1411),
             v = rnd<float>(2 * 64 * 2 * 8, 1412), dout = rnd<float>(2 * 64 * 4 * 8, 1413);
  expect_thread_count_invariant(
      [&] {
        F out(dout.size()), lse(size_t(2 * 4 * 64)), dq(q.size()), dk(k.size()), dv(v.size());
        cpu::attention_forward<float>(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
        cpu::attention_backward<float>(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(),
                                       q.data(), k.data(), v.data(), s);
        return std::vector<F>{out, lse, dq, dk, dv};
      },
      "attention");

  const int64_t n = 3000, D = 200, V = 17;
  std::vector<int32_t> tok(n);
  for (int64_t i = 0; i < n; ++i) tok[size_t(i)] = int32_t((i * 7 + i / 5) % V);
  const auto dout_e = rnd<float>(n * D, 1420, -1, 1);
  expect_thread_count_invariant(
      [&] {
        F dt(size_t(V * D), 0.25f);
        cpu::embedding_backward<float>(dt.data(), dout_e.data(), tok.data(), n, D);
        return std::vector<F>{dt};
      },
      "embedding_backward");

  const auto x = rnd<float>(n * D, 1430), w = rnd<float>(D, 1431);
  expect_thread_count_invariant(
      [&] {
        F y(x.size()), rstd(n), dx(x.size()), dw(size_t(D), 0.1f);
        cpu::rmsnorm_forward<float>(y.data(), rstd.data(), x.data(), w.data(), n, D, 1e-5);
        cpu::rmsnorm_backward<float>(dx.data(), dw.data(), dout_e.data(), x.data(), w.data(), rstd.data(), n, D,
                                     false);
        return std::vector<F>{dx, dw, F{float(cpu::sum_squares<float>(x.data(), n * D))}};
      },
      "rmsnorm_backward");
}

}  // namespace
}  // namespace dmat
