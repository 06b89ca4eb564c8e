// Native Sparse Attention, CPU reference (kernels/cpu/nsa_ops.h): every forward against a naive
// version written here from the definition, every backward against central finite differences in
// fp64, the selection against a brute-force one (ties, early queries, forced blocks, GQA sums), the
// whole layer composed from the ops (finite differences, fp32 against fp64, 1 against 2 threads),
// the model's layer (attention_nsa.cpp) against that composition, and the layer against an
// independent PyTorch version (tests/oracle/nsa_oracle.py).
//
// Tolerances: forwards against the naive versions 1e-12 relative (both fp64, only the summation
// order differs: ~1e-16 per operation over at most a few hundred terms); gradients against finite
// differences 1e-6 relative (test_gradcheck.h: central differences with h = 1e-6 leave ~1e-9 from
// the third derivative and ~1e-10 from roundoff); the PyTorch oracle 1e-9 (fp64 both sides, measured
// ~2e-15); fp32 against fp64 1e-5 (reason at the test); 1 against 2 threads bit for bit.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "kernels/cpu/nsa_ops.h"
#include "model/attention.h"
#include "test_gradcheck.h"
#include "test_util.h"

namespace dmat {
namespace {

using cpu::NsaShape;
using test::norm;
using test::numeric_grad;
using test::rnd;
using test::ThreadCountGuard;
using test::Vec;
using test::weighted_sum;
using Idx = std::vector<int32_t>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Unlike test::rel_err, an exact-zero reference passes when the result is zero too.
double rel_err(const Vec& a, const Vec& b) { return test::rel_err_zero_ok(a, b); }

void expect_grad(const Vec& analytic, const Vec& fd, const std::string& what) {
  test::expect_grad(analytic, fd, what, /*print_margin=*/true);
}

NsaShape make_shape(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t l, int64_t d, int64_t lp,
                    int64_t n, int64_t w) {
  NsaShape s;
  s.B = B; s.T = T; s.H = H; s.Hkv = Hkv; s.D = D;
  s.scale = 1.0 / std::sqrt(double(D));
  s.cmp_block = l; s.cmp_stride = d; s.sel_block = lp; s.sel_count = n; s.window = w;
  return s;
}

std::string tag(const NsaShape& s) {
  return " B" + std::to_string(s.B) + " T" + std::to_string(s.T) + " H" + std::to_string(s.H) + "/" +
         std::to_string(s.Hkv) + " D" + std::to_string(s.D) + " l" + std::to_string(s.cmp_block) + " d" +
         std::to_string(s.cmp_stride) + " l'" + std::to_string(s.sel_block) + " n" + std::to_string(s.sel_count);
}

// Complete compression blocks, counted from the definition (block c covers [c·d, c·d + l)).
int64_t count_blocks(const NsaShape& s) {
  int64_t nc = 0;
  while (nc * s.cmp_stride + s.cmp_block <= s.T) ++nc;
  return nc;
}
// Block c is visible to query t iff it ends at or before t.
bool visible(const NsaShape& s, int64_t c, int64_t t) { return c >= 0 && c * s.cmp_stride + s.cmp_block - 1 <= t; }

// Offsets of the layouts of nsa_ops.h.
size_t iq(const NsaShape& s, int64_t b, int64_t t, int64_t h) { return size_t(((b * s.T + t) * s.H + h) * s.D); }
size_t ik(const NsaShape& s, int64_t b, int64_t t, int64_t hk) { return size_t(((b * s.T + t) * s.Hkv + hk) * s.D); }
size_t ikc(const NsaShape& s, int64_t b, int64_t c, int64_t hk) {
  return size_t(((b * count_blocks(s) + c) * s.Hkv + hk) * s.D);
}
size_t ist(const NsaShape& s, int64_t b, int64_t h, int64_t t) { return size_t((b * s.H + h) * s.T + t); }
size_t ilist(const NsaShape& s, int64_t b, int64_t hk, int64_t t) {
  return size_t(((b * s.Hkv + hk) * s.T + t) * s.sel_count);
}

double dotv(const double* a, const double* b, int64_t n) {
  double r = 0;
  for (int64_t i = 0; i < n; ++i) r += a[i] * b[i];
  return r;
}

// ---- references written from the definition ------------------------------------------------------

// kc_c = W2 · silu(W1 · flatten_j(x[c·d + j] + pos[j])) per (b, c, KV head).
Vec naive_compress(const Vec& x, const Vec& pos, const Vec& w1, const Vec& w2, int64_t F, const NsaShape& s) {
  const int64_t Nc = count_blocks(s), l = s.cmp_block, D = s.D;
  Vec y(size_t(s.B * Nc * s.Hkv * D), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < Nc; ++c)
      for (int64_t hk = 0; hk < s.Hkv; ++hk) {
        Vec u(size_t(l * D));
        for (int64_t j = 0; j < l; ++j)
          for (int64_t e = 0; e < D; ++e)
            u[size_t(j * D + e)] = x[ik(s, b, c * s.cmp_stride + j, hk) + size_t(e)] + pos[size_t(j * D + e)];
        Vec a(static_cast<size_t>(F));
        for (int64_t f = 0; f < F; ++f) {
          const double h = dotv(w1.data() + f * l * D, u.data(), l * D);
          a[size_t(f)] = h / (1.0 + std::exp(-h));
        }
        for (int64_t e = 0; e < D; ++e) y[ikc(s, b, c, hk) + size_t(e)] = dotv(w2.data() + e * F, a.data(), F);
      }
  return y;
}

// Rotate-half RoPE of compressed key c at position c·d + l − 1.
Vec naive_compressed_rope(const Vec& x, double theta, const NsaShape& s) {
  Vec y = x;
  const int64_t half = s.D / 2, Nc = count_blocks(s);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < Nc; ++c)
      for (int64_t hk = 0; hk < s.Hkv; ++hk)
        for (int64_t i = 0; i < half; ++i) {
          const double a = double(c * s.cmp_stride + s.cmp_block - 1) * std::pow(theta, -2.0 * double(i) / double(s.D));
          const size_t o = ikc(s, b, c, hk);
          const double x1 = x[o + size_t(i)], x2 = x[o + size_t(i + half)];
          y[o + size_t(i)] = x1 * std::cos(a) - x2 * std::sin(a);
          y[o + size_t(i + half)] = x2 * std::cos(a) + x1 * std::sin(a);
        }
  return y;
}

// Softmax attention of query (b, h, t) over a key set; out 0 and lse −inf on an empty set.
template <class Keys>
void naive_row(double* out, double& lse, const double* qt, const std::vector<int64_t>& keys, Keys key_at,
               Keys value_at, const NsaShape& s) {
  std::fill(out, out + s.D, 0.0);
  if (keys.empty()) {
    lse = -kInf;
    return;
  }
  Vec sc;
  double mx = -kInf;
  for (int64_t p : keys) {
    sc.push_back(s.scale * dotv(qt, key_at(p), s.D));
    mx = std::max(mx, sc.back());
  }
  double sum = 0;
  for (double x : sc) sum += std::exp(x - mx);
  for (size_t i = 0; i < keys.size(); ++i)
    for (int64_t e = 0; e < s.D; ++e) out[e] += std::exp(sc[i] - mx) / sum * value_at(keys[i])[e];
  lse = mx + std::log(sum);
}

void naive_cmp_attention(Vec& out, Vec& lse, const Vec& q, const Vec& kc, const Vec& vc, const NsaShape& s) {
  out.assign(size_t(s.B * s.T * s.H * s.D), 0.0);
  lse.assign(size_t(s.B * s.H * s.T), 0.0);
  const int64_t g = s.H / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        std::vector<int64_t> keys;
        for (int64_t c = 0; c < count_blocks(s); ++c)
          if (visible(s, c, t)) keys.push_back(c);
        std::function<const double*(int64_t)> kat = [&](int64_t c) { return kc.data() + ikc(s, b, c, h / g); };
        std::function<const double*(int64_t)> vat = [&](int64_t c) { return vc.data() + ikc(s, b, c, h / g); };
        naive_row(out.data() + iq(s, b, t, h), lse[ist(s, b, h, t)], q.data() + iq(s, b, t, h), keys, kat, vat, s);
      }
}

// Query t attends the keys p <= t whose selection block is in its list.
void naive_slc_attention(Vec& out, Vec& lse, const Vec& q, const Vec& k, const Vec& v, const Idx& idx,
                         const NsaShape& s) {
  out.assign(size_t(s.B * s.T * s.H * s.D), 0.0);
  lse.assign(size_t(s.B * s.H * s.T), 0.0);
  const int64_t g = s.H / s.Hkv;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.T; ++t) {
        const int32_t* list = idx.data() + ilist(s, b, h / g, t);
        std::vector<int64_t> keys;
        for (int64_t p = 0; p <= t; ++p)
          if (std::find(list, list + s.sel_count, int32_t(p / s.sel_block)) != list + s.sel_count) keys.push_back(p);
        std::function<const double*(int64_t)> kat = [&](int64_t p) { return k.data() + ik(s, b, p, h / g); };
        std::function<const double*(int64_t)> vat = [&](int64_t p) { return v.data() + ik(s, b, p, h / g); };
        naive_row(out.data() + iq(s, b, t, h), lse[ist(s, b, h, t)], q.data() + iq(s, b, t, h), keys, kat, vat, s);
      }
}

// The selection by brute force: probabilities from a softmax of their own (not the op's lse), eq. 9
// summed literally, Σ_{m<l'/d} Σ_{n<l/d} P[(l'/d)·j + m − n] over visible blocks (P the fixed-point
// probability of nsa_ops.h), then over the group's heads; every candidate block 0 … J sorted by
// (forced first, importance descending, index ascending) and the first min(J + 1, n) kept. Also
// returns the importances ([B·Hkv][T] rows of J + 1).
using Imp = std::vector<int64_t>;
Idx brute_select(const Vec& q, const Vec& kc, const NsaShape& s, std::vector<std::vector<Imp>>* imps = nullptr) {
  const int64_t g = s.H / s.Hkv, R = s.sel_block / s.cmp_stride, C = s.cmp_block / s.cmp_stride;
  const int64_t Nc = count_blocks(s);
  Idx idx(size_t(s.B * s.Hkv * s.T * s.sel_count), -1);
  if (imps) imps->assign(size_t(s.B * s.Hkv), std::vector<Imp>(size_t(s.T)));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hk = 0; hk < s.Hkv; ++hk)
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t J = t / s.sel_block;
        Imp imp(size_t(J + 1), 0);
        for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
          Vec p(size_t(Nc), 0.0);
          double sum = 0;
          for (int64_t c = 0; c < Nc; ++c)
            if (visible(s, c, t)) sum += p[size_t(c)] = std::exp(s.scale * dotv(&q[iq(s, b, t, h)], &kc[ikc(s, b, c, hk)], s.D));
          for (int64_t j = 0; j <= J; ++j)
            for (int64_t m = 0; m < R; ++m)
              for (int64_t n = 0; n < C; ++n) {
                const int64_t c = R * j + m - n;
                if (c < Nc && visible(s, c, t)) imp[size_t(j)] += cpu::nsa_importance_fixed(p[size_t(c)] / sum);
              }
        }
        auto forced = [&](int64_t j) { return j == 0 || j == J || j == J - 1; };
        std::vector<int64_t> order(size_t(J + 1));
        for (int64_t j = 0; j <= J; ++j) order[size_t(j)] = j;
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
          if (forced(a) != forced(c)) return forced(a);
          if (imp[size_t(a)] != imp[size_t(c)]) return imp[size_t(a)] > imp[size_t(c)];
          return a < c;
        });
        order.resize(size_t(std::min(J + 1, s.sel_count)));
        std::sort(order.begin(), order.end());
        for (size_t i = 0; i < order.size(); ++i) idx[ilist(s, b, hk, t) + i] = int32_t(order[i]);
        if (imps) (*imps)[size_t(b * s.Hkv + hk)][size_t(t)] = imp;
      }
  return idx;
}

Idx run_select(const Vec& q, const Vec& kc, const NsaShape& s) {
  Vec vc(kc.size(), 0.0), out(size_t(s.B * s.T * s.H * s.D)), lse(size_t(s.B * s.H * s.T));
  cpu::nsa_cmp_attention_forward<double>(out.data(), lse.data(), q.data(), kc.data(), vc.data(), s);
  Idx idx(size_t(s.B * s.Hkv * s.T * s.sel_count), 77);  // poisoned: every entry must be written
  cpu::nsa_select<double>(idx.data(), q.data(), kc.data(), lse.data(), s);
  return idx;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// ---- the shape ------------------------------------------------------------------------------------

TEST(NsaShape, CountsAndChecks) {
  NsaShape s = make_shape(1, 100, 4, 2, 8, 32, 16, 64, 16, 512);
  EXPECT_EQ(s.n_cmp(), count_blocks(s));  // blocks at 0, 16, 32, 48: the next would end at 96 + 31 > 99
  EXPECT_EQ(s.n_cmp(), 5);
  for (int64_t t = 0; t < s.T; ++t) {
    int64_t nv = 0;
    for (int64_t c = 0; c < s.n_cmp(); ++c) nv += visible(s, c, t);
    EXPECT_EQ(s.cmp_visible(t), nv) << "t " << t;
  }
  s.T = 31;
  EXPECT_EQ(s.n_cmp(), 0);
  EXPECT_NO_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 2, 8, 32, 16, 64, 16, 512)));
  EXPECT_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 3, 8, 32, 16, 64, 16, 512)), Error);  // Hkv ∤ H
  EXPECT_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 2, 8, 24, 16, 64, 16, 512)), Error);  // d ∤ l
  EXPECT_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 2, 8, 32, 16, 40, 16, 512)), Error);  // d ∤ l'
  EXPECT_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 2, 8, 32, 16, 64, 2, 512)), Error);   // n < 3
  EXPECT_THROW(cpu::nsa_check_shape(make_shape(1, 10, 4, 2, 8, 32, 16, 64, 16, 0)), Error);    // w = 0
  const cpu::AttnShape a = cpu::nsa_window_shape(make_shape(2, 10, 4, 2, 8, 32, 16, 64, 16, 512));
  EXPECT_EQ(a.window, 512);
  EXPECT_EQ(a.Dqk, 8);
  EXPECT_EQ(a.Hkv, 2);
}

// ---- compression ----------------------------------------------------------------------------------

struct CompressCase {
  int64_t T, l, d, F;
};
const CompressCase kCompressCases[] = {
    {13, 4, 2, 5},  // overlapping blocks (l = 2d), a tail position in no block
    {12, 4, 4, 3},  // l = d: disjoint blocks
    {17, 8, 2, 4},  // l = 4d
    {8, 8, 4, 2},   // exactly one block
};

TEST(NsaCompress, ForwardMatchesNaive) {
  uint64_t seed = 10;
  for (const CompressCase& k : kCompressCases) {
    const NsaShape s = make_shape(2, k.T, 4, 2, 3, k.l, k.d, 2 * k.l, 3, 4);
    const int64_t D = s.D, Nc = s.n_cmp();
    Vec x = rnd(size_t(s.B * s.T * s.Hkv * D), ++seed), pos = rnd(size_t(k.l * D), ++seed),
        w1 = rnd(size_t(k.F * k.l * D), ++seed), w2 = rnd(size_t(D * k.F), ++seed);
    Vec y(size_t(s.B * Nc * s.Hkv * D), kInf), hid(size_t(s.B * Nc * s.Hkv * k.F), kInf);
    cpu::nsa_compress_forward<double>(y.data(), hid.data(), x.data(), pos.data(), w1.data(), w2.data(), k.F, s);
    EXPECT_LT(rel_err(y, naive_compress(x, pos, w1, w2, k.F, s)), 1e-12) << tag(s);
    for (double h : hid) EXPECT_TRUE(std::isfinite(h)) << tag(s);
  }
  // T < l: no complete block, nothing written, backward gives dx = 0.
  const NsaShape s = make_shape(1, 5, 2, 1, 2, 8, 4, 8, 3, 4);
  Vec x = rnd(size_t(5 * 2), 1), pos = rnd(16, 2), w1 = rnd(32, 3), w2 = rnd(4, 4), dx(x.size(), kInf), dpos(16, 0.0),
      dw1(32, 0.0), dw2(4, 0.0);
  cpu::nsa_compress_forward<double>(nullptr, nullptr, x.data(), pos.data(), w1.data(), w2.data(), 2, s);
  cpu::nsa_compress_backward<double>(dx.data(), dpos.data(), dw1.data(), dw2.data(), nullptr, nullptr, x.data(),
                                     pos.data(), w1.data(), w2.data(), 2, s);
  for (double g : dx) EXPECT_EQ(g, 0.0);
}

TEST(NsaCompress, GradientsMatchFiniteDifferences) {
  uint64_t seed = 100;
  for (const CompressCase& k : kCompressCases) {
    const NsaShape s = make_shape(2, k.T, 2, 2, 3, k.l, k.d, 2 * k.l, 3, 4);
    const int64_t D = s.D, Nc = s.n_cmp();
    Vec x = rnd(size_t(s.B * s.T * s.Hkv * D), ++seed), pos = rnd(size_t(k.l * D), ++seed),
        w1 = rnd(size_t(k.F * k.l * D), ++seed), w2 = rnd(size_t(D * k.F), ++seed),
        G = rnd(size_t(s.B * Nc * s.Hkv * D), ++seed);
    Vec y(G.size()), hid(size_t(s.B * Nc * s.Hkv * k.F));
    auto loss = [&] {
      cpu::nsa_compress_forward<double>(y.data(), hid.data(), x.data(), pos.data(), w1.data(), w2.data(), k.F, s);
      return weighted_sum(G, y);
    };
    loss();
    // dx overwrites (poisoned first); dpos, dW1, dW2 accumulate onto known values.
    Vec dx(x.size(), kInf), dpos = rnd(pos.size(), ++seed), dw1 = rnd(w1.size(), ++seed), dw2 = rnd(w2.size(), ++seed);
    const Vec p0 = dpos, a0 = dw1, b0 = dw2;
    cpu::nsa_compress_backward<double>(dx.data(), dpos.data(), dw1.data(), dw2.data(), G.data(), hid.data(), x.data(),
                                       pos.data(), w1.data(), w2.data(), k.F, s);
    for (size_t i = 0; i < dpos.size(); ++i) dpos[i] -= p0[i];
    for (size_t i = 0; i < dw1.size(); ++i) dw1[i] -= a0[i];
    for (size_t i = 0; i < dw2.size(); ++i) dw2[i] -= b0[i];
    expect_grad(dx, numeric_grad(x, loss), "compress dx" + tag(s));
    expect_grad(dpos, numeric_grad(pos, loss), "compress dpos" + tag(s));
    expect_grad(dw1, numeric_grad(w1, loss), "compress dW1" + tag(s));
    expect_grad(dw2, numeric_grad(w2, loss), "compress dW2" + tag(s));
    // positions after the last complete block reach no output: exactly 0
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t p = (Nc - 1) * k.d + k.l; p < s.T; ++p)
        for (int64_t e = 0; e < s.Hkv * D; ++e) EXPECT_EQ(dx[ik(s, b, p, 0) + size_t(e)], 0.0) << tag(s) << " p " << p;
  }
}

TEST(NsaCompressedRope, ForwardMatchesDefinitionBackwardIsItsTranspose) {
  const NsaShape s = make_shape(2, 23, 2, 2, 6, 4, 2, 8, 3, 4);
  const double theta = 50.0;  // small, so every frequency turns visibly over the few positions
  Vec x = rnd(size_t(s.B * s.n_cmp() * s.Hkv * s.D), 1), y(x.size()), G = rnd(x.size(), 2), dx(x.size());
  cpu::nsa_compressed_rope_forward<double>(y.data(), x.data(), theta, s);
  EXPECT_LT(rel_err(y, naive_compressed_rope(x, theta, s)), 1e-14);
  auto loss = [&] {
    cpu::nsa_compressed_rope_forward<double>(y.data(), x.data(), theta, s);
    return weighted_sum(G, y);
  };
  cpu::nsa_compressed_rope_backward<double>(dx.data(), G.data(), theta, s);
  expect_grad(dx, numeric_grad(x, loss), "compressed rope dx");
  // in place, both directions: backward undoes forward
  Vec z = x;
  cpu::nsa_compressed_rope_forward<double>(z.data(), z.data(), theta, s);
  cpu::nsa_compressed_rope_backward<double>(z.data(), z.data(), theta, s);
  EXPECT_LT(rel_err(z, x), 1e-14);
}

// ---- compressed attention -------------------------------------------------------------------------

TEST(NsaCmpAttention, ForwardMatchesNaiveAndEarlyQueriesGetZero) {
  uint64_t seed = 200;
  for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 2}, {3, 1}})
    for (const CompressCase& k : kCompressCases) {
      const NsaShape s = make_shape(2, k.T, H, Hkv, 5, k.l, k.d, 2 * k.l, 3, 4);
      const int64_t Nc = s.n_cmp();
      Vec q = rnd(size_t(s.B * s.T * H * s.D), ++seed), kc = rnd(size_t(s.B * Nc * Hkv * s.D), ++seed),
          vc = rnd(kc.size(), ++seed);
      Vec out(q.size(), kInf), lse(size_t(s.B * H * s.T), 0.0), ro, rl;
      cpu::nsa_cmp_attention_forward<double>(out.data(), lse.data(), q.data(), kc.data(), vc.data(), s);
      naive_cmp_attention(ro, rl, q, kc, vc, s);
      EXPECT_LT(rel_err(out, ro), 1e-12) << tag(s);
      int early = 0;
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < s.T; ++t) {
            const double a = lse[ist(s, b, h, t)], r = rl[ist(s, b, h, t)];
            if (t < k.l - 1) {
              ++early;
              EXPECT_EQ(a, -kInf) << "early query " << t << tag(s);
              for (int64_t e = 0; e < s.D; ++e) EXPECT_EQ(out[iq(s, b, t, h) + size_t(e)], 0.0);
            } else {
              EXPECT_NEAR(a, r, 1e-12 * std::max(1.0, std::abs(r))) << "t " << t << tag(s);
            }
          }
      EXPECT_GT(early, 0);
    }
}

TEST(NsaCmpAttention, GradientsMatchFiniteDifferences) {
  uint64_t seed = 300;
  for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {4, 2}, {2, 1}})
    for (const CompressCase& k : kCompressCases) {
      const NsaShape s = make_shape(2, k.T, H, Hkv, 4, k.l, k.d, 2 * k.l, 3, 4);
      const int64_t Nc = s.n_cmp();
      Vec q = rnd(size_t(s.B * s.T * H * s.D), ++seed), kc = rnd(size_t(s.B * Nc * Hkv * s.D), ++seed),
          vc = rnd(kc.size(), ++seed), G = rnd(q.size(), ++seed);
      Vec out(q.size()), lse(size_t(s.B * H * s.T));
      auto loss = [&] {
        cpu::nsa_cmp_attention_forward<double>(out.data(), lse.data(), q.data(), kc.data(), vc.data(), s);
        return weighted_sum(G, out);
      };
      loss();
      Vec dq(q.size(), kInf), dkc(kc.size(), kInf), dvc(vc.size(), kInf);
      cpu::nsa_cmp_attention_backward<double>(dq.data(), dkc.data(), dvc.data(), G.data(), out.data(), lse.data(),
                                              q.data(), kc.data(), vc.data(), s);
      if (Nc >= 2) {
        expect_grad(dq, numeric_grad(q, loss), "cmp attention dq" + tag(s));
        expect_grad(dkc, numeric_grad(kc, loss), "cmp attention dkc" + tag(s));
      } else {  // one block: its weight is 1 whatever q and kc, so dq = dkc = 0 (up to roundoff)
        EXPECT_LT(norm(dq) + norm(dkc), 1e-14) << tag(s);
      }
      expect_grad(dvc, numeric_grad(vc, loss), "cmp attention dvc" + tag(s));
      for (int64_t b = 0; b < s.B; ++b)  // early queries: exactly no gradient
        for (int64_t t = 0; t < k.l - 1; ++t)
          for (int64_t e = 0; e < H * s.D; ++e) EXPECT_EQ(dq[iq(s, b, t, 0) + size_t(e)], 0.0);
    }
  // T < l − 1 ... every query early: zero everywhere, no NaN from the −inf lse.
  const NsaShape s = make_shape(1, 3, 2, 1, 4, 4, 2, 4, 3, 4);
  Vec q = rnd(size_t(3 * 2 * 4), 1), G = rnd(q.size(), 2), out(q.size()), lse(6), dq(q.size(), kInf);
  cpu::nsa_cmp_attention_forward<double>(out.data(), lse.data(), q.data(), nullptr, nullptr, s);
  cpu::nsa_cmp_attention_backward<double>(dq.data(), nullptr, nullptr, G.data(), out.data(), lse.data(), q.data(),
                                          nullptr, nullptr, s);
  for (double x : out) EXPECT_EQ(x, 0.0);
  for (double x : lse) EXPECT_EQ(x, -kInf);
  for (double x : dq) EXPECT_EQ(x, 0.0);
}

// ---- selection ------------------------------------------------------------------------------------

// Structural facts every list must satisfy, whatever the scores.
void expect_list_invariants(const Idx& idx, const NsaShape& s) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hk = 0; hk < s.Hkv; ++hk)
      for (int64_t t = 0; t < s.T; ++t) {
        const int32_t* l = idx.data() + ilist(s, b, hk, t);
        const int64_t J = t / s.sel_block, m = std::min(J + 1, s.sel_count);
        for (int64_t i = 0; i < s.sel_count; ++i) {
          if (i < m) {
            ASSERT_GE(l[i], 0);
            ASSERT_LE(l[i], J);
            if (i > 0) ASSERT_LT(l[i - 1], l[i]) << "ascending and distinct";
          } else {
            ASSERT_EQ(l[i], -1) << "padding";
          }
        }
        auto has = [&](int64_t j) { return std::find(l, l + s.sel_count, int32_t(j)) != l + s.sel_count; };
        ASSERT_TRUE(has(0)) << "block 0 forced, t " << t;
        ASSERT_TRUE(has(J)) << "own block forced, t " << t;
        if (J >= 1) ASSERT_TRUE(has(J - 1)) << "previous block forced, t " << t;
      }
}

struct SelectCase {
  int64_t T, H, Hkv, l, d, lp, n;
};
const SelectCase kSelectCases[] = {
    {70, 4, 2, 4, 2, 8, 4},   // l' = 2l: eq. 9 with l'/d = 4, l/d = 2
    {70, 2, 1, 4, 2, 8, 5},
    {57, 3, 3, 4, 2, 4, 4},   // l' = l
    {61, 4, 1, 8, 2, 4, 6},   // l' < l: one compression block spans two selection blocks
    {45, 2, 2, 2, 2, 2, 3},   // l = d = l': p_slc = p_cmp; n = 3 leaves nothing to rank
    {90, 2, 1, 6, 3, 12, 7},  // d = 3
};

TEST(NsaSelect, MatchesBruteForce) {
  uint64_t seed = 400;
  for (const SelectCase& k : kSelectCases) {
    const NsaShape s = make_shape(2, k.T, k.H, k.Hkv, 4, k.l, k.d, k.lp, k.n, 8);
    Vec q = rnd(size_t(s.B * s.T * s.H * s.D), ++seed, -2, 2), kc = rnd(size_t(s.B * s.n_cmp() * s.Hkv * s.D), ++seed, -2, 2);
    const Idx ours = run_select(q, kc, s), ref = brute_select(q, kc, s);
    expect_list_invariants(ours, s);
    EXPECT_EQ(ours, ref) << tag(s);
  }
}

// Exact ties: with q = 0 every visible compression block gets the same probability, so blocks with
// the same total overlap with visible compression blocks tie (e.g. with l' < l, block 1, which lacks
// a compression block −1, ties with a block further on whose last compression block is not yet
// visible: the same terms summed in another order; the fixed-point importance makes that an exact
// tie); with kc repeating every l'/d compression blocks the probabilities repeat and interior blocks
// tie for any q. Ties go to the lower index.
TEST(NsaSelect, TiesGoToTheLowerBlockIndex) {
  uint64_t seed = 500;
  for (const SelectCase& k : kSelectCases) {
    const NsaShape s = make_shape(1, k.T, k.H, k.Hkv, 4, k.l, k.d, k.lp, k.n, 8);
    const int64_t Nc = s.n_cmp(), R = std::max<int64_t>(1, k.lp / k.d);
    Vec zero_q(size_t(s.T * s.H * s.D), 0.0), kc = rnd(size_t(Nc * s.Hkv * s.D), ++seed);
    Vec periodic = kc, q = rnd(zero_q.size(), ++seed, -2, 2);
    for (int64_t c = R; c < Nc; ++c)
      for (int64_t x = 0; x < s.Hkv * s.D; ++x) periodic[size_t(c * s.Hkv * s.D + x)] = kc[size_t((c % R) * s.Hkv * s.D + x)];
    for (const auto& [qq, kk, what] : {std::tuple<const Vec&, const Vec&, const char*>{zero_q, kc, "q = 0"},
                                       {q, periodic, "periodic kc"}}) {
      std::vector<std::vector<Imp>> imps;
      const Idx ours = run_select(qq, kk, s), ref = brute_select(qq, kk, s, &imps);
      expect_list_invariants(ours, s);
      EXPECT_EQ(ours, ref) << tag(s) << " " << what;
      // Not vacuous: count the queries where a chosen block ties with a rejected one.
      int tied = 0;
      for (int64_t hk = 0; hk < s.Hkv; ++hk)
        for (int64_t t = 0; t < s.T; ++t) {
          const Imp& imp = imps[size_t(hk)][size_t(t)];
          const int32_t* l = ours.data() + ilist(s, 0, hk, t);
          const int64_t J = t / k.lp;
          for (int64_t a = 1; a <= J - 2; ++a)
            for (int64_t r = 1; r <= J - 2; ++r) {
              const bool ca = std::find(l, l + k.n, a) != l + k.n, cr = std::find(l, l + k.n, r) != l + k.n;
              if (ca && !cr && imp[size_t(a)] == imp[size_t(r)]) {
                ++tied;
                EXPECT_LT(a, r) << "a tie went to the higher index, t " << t << tag(s);
              }
            }
        }
      if (k.n > 3) EXPECT_GT(tied, 0) << tag(s) << " " << what << ": no tie at the cut, the test is vacuous";
    }
  }
}

// Forced blocks are kept even when they carry no mass: queries look only at the middle blocks.
TEST(NsaSelect, ForcedBlocksAreKeptAgainstTheScores) {
  const NsaShape s = make_shape(1, 64, 2, 1, 4, 4, 4, 8, 4, 8);
  const int64_t Nc = s.n_cmp();  // disjoint compression blocks (l = d), two per selection block
  Vec q(size_t(s.T * s.H * s.D), 0.0), kc(size_t(Nc * s.D), 0.0);
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t h = 0; h < s.H; ++h) q[iq(s, 0, t, h)] = 40.0;  // q = 40·e0
  for (int64_t c = 0; c < Nc; ++c) kc[size_t(c * s.D)] = (c / 2 == 2) ? 1.0 : -1.0;  // selection block 2 is hot
  const Idx ours = run_select(q, kc, s);
  expect_list_invariants(ours, s);
  EXPECT_EQ(ours, brute_select(q, kc, s));
  const int32_t* l = ours.data() + ilist(s, 0, 0, 63);  // J = 7: forced 0, 6, 7; the one free slot: 2
  EXPECT_EQ(std::vector<int32_t>(l, l + 4), (std::vector<int32_t>{0, 2, 6, 7}));
}

// The group's heads vote together: the sum over heads, not one head, decides (and the case is built
// so that head 0 alone would choose differently from the group).
TEST(NsaSelect, GqaGroupsSumTheirHeads) {
  const NsaShape s = make_shape(1, 64, 2, 1, 4, 4, 4, 8, 4, 8);
  const int64_t Nc = s.n_cmp();
  Vec q(size_t(s.T * s.H * s.D), 0.0), kc(size_t(Nc * s.D), 0.0);
  for (int64_t t = 0; t < s.T; ++t) {
    q[iq(s, 0, t, 0)] = 6.0;      // head 0 prefers block 2 (key direction e0), mildly
    q[iq(s, 0, t, 1) + 1] = 30.0;  // head 1 strongly prefers block 3 (e1)
  }
  for (int64_t c = 0; c < Nc; ++c) {
    kc[size_t(c * s.D)] = (c / 2 == 2) ? 1.0 : 0.0;
    kc[size_t(c * s.D + 1)] = (c / 2 == 3) ? 1.0 : 0.0;
  }
  const Idx group = run_select(q, kc, s);
  EXPECT_EQ(group, brute_select(q, kc, s));
  EXPECT_EQ(group[ilist(s, 0, 0, 63) + 1], 3);
  NsaShape one = s;  // head 0 alone
  one.H = 1;
  Vec q0(size_t(s.T * s.D));
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t e = 0; e < s.D; ++e) q0[size_t(t * s.D + e)] = q[iq(s, 0, t, 0) + size_t(e)];
  const Idx alone = run_select(q0, kc, one);
  EXPECT_EQ(alone[ilist(one, 0, 0, 63) + 1], 2);
}

TEST(NsaSelect, EarlyQueriesSelectEveryBlockTheyHave) {
  const NsaShape s = make_shape(1, 40, 2, 1, 4, 4, 2, 8, 4, 8);
  const Idx idx = run_select(rnd(size_t(40 * 2 * 4), 1), rnd(size_t(s.n_cmp() * 4), 2), s);
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t J = t / 8;
    if (J + 1 > 4) continue;
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(idx[ilist(s, 0, 0, t) + size_t(i)], i <= J ? i : -1) << "t " << t;
  }
}

TEST(NsaSelect, NanIsAnError) {
  const NsaShape s = make_shape(1, 40, 2, 1, 4, 4, 2, 8, 4, 8);
  Vec q = rnd(size_t(40 * 2 * 4), 1), kc = rnd(size_t(s.n_cmp() * 4), 2), out(q.size()), lse(80);
  kc[5] = std::nan("");
  cpu::nsa_cmp_attention_forward<double>(out.data(), lse.data(), q.data(), kc.data(), kc.data(), s);
  Idx idx(size_t(40 * 4));
  EXPECT_THROW(cpu::nsa_select<double>(idx.data(), q.data(), kc.data(), lse.data(), s), Error);
}

// ---- selected attention -------------------------------------------------------------------------

TEST(NsaSlcAttention, ForwardMatchesNaiveAndBackwardMatchesFiniteDifferences) {
  uint64_t seed = 600;
  for (const SelectCase& k : kSelectCases) {
    const NsaShape s = make_shape(2, std::min<int64_t>(k.T, 50), k.H, k.Hkv, 4, k.l, k.d, k.lp, k.n, 8);
    Vec q = rnd(size_t(s.B * s.T * s.H * s.D), ++seed), kc = rnd(size_t(s.B * s.n_cmp() * s.Hkv * s.D), ++seed),
        kk = rnd(size_t(s.B * s.T * s.Hkv * s.D), ++seed), v = rnd(kk.size(), ++seed), G = rnd(q.size(), ++seed);
    const Idx idx = run_select(q, kc, s);
    Vec out(q.size(), kInf), lse(size_t(s.B * s.H * s.T), kInf), ro, rl;
    auto loss = [&] {
      cpu::nsa_slc_attention_forward<double>(out.data(), lse.data(), q.data(), kk.data(), v.data(), idx.data(), s);
      return weighted_sum(G, out);
    };
    loss();
    naive_slc_attention(ro, rl, q, kk, v, idx, s);
    EXPECT_LT(rel_err(out, ro), 1e-12) << tag(s);
    EXPECT_LT(rel_err(lse, rl), 1e-12) << tag(s);
    Vec dq(q.size(), kInf), dk(kk.size(), kInf), dv(v.size(), kInf);
    cpu::nsa_slc_attention_backward<double>(dq.data(), dk.data(), dv.data(), G.data(), out.data(), lse.data(),
                                            q.data(), kk.data(), v.data(), idx.data(), s);
    expect_grad(dq, numeric_grad(q, loss), "slc attention dq" + tag(s));
    expect_grad(dk, numeric_grad(kk, loss), "slc attention dk" + tag(s));
    expect_grad(dv, numeric_grad(v, loss), "slc attention dv" + tag(s));
  }
}

// ---- gates --------------------------------------------------------------------------------------

TEST(NsaGate, ForwardMatchesDefinitionBackwardMatchesFiniteDifferences) {
  const int64_t rows = 7, H = 3, D = 4;
  Vec z = rnd(size_t(rows * 3 * H), 1, -3, 3), a = rnd(size_t(rows * H * D), 2), b = rnd(a.size(), 3),
      c = rnd(a.size(), 4), G = rnd(a.size(), 5), out(a.size(), kInf);
  cpu::nsa_gate_forward<double>(out.data(), z.data(), a.data(), b.data(), c.data(), rows, H, D);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t e = 0; e < D; ++e) {
        const size_t o = size_t((r * H + h) * D + e), g = size_t((r * H + h) * 3);
        EXPECT_NEAR(out[o], sigmoid(z[g]) * a[o] + sigmoid(z[g + 1]) * b[o] + sigmoid(z[g + 2]) * c[o], 1e-15);
      }
  auto loss = [&] {
    cpu::nsa_gate_forward<double>(out.data(), z.data(), a.data(), b.data(), c.data(), rows, H, D);
    return weighted_sum(G, out);
  };
  Vec dz(z.size(), kInf), da(a.size(), kInf), db(a.size(), kInf), dc(a.size(), kInf);
  cpu::nsa_gate_backward<double>(dz.data(), da.data(), db.data(), dc.data(), G.data(), z.data(), a.data(), b.data(),
                                 c.data(), rows, H, D);
  expect_grad(dz, numeric_grad(z, loss), "gate dz");
  expect_grad(da, numeric_grad(a, loss), "gate do_cmp");
  expect_grad(db, numeric_grad(b, loss), "gate do_slc");
  expect_grad(dc, numeric_grad(c, loss), "gate do_win");
}

// ---- cost -------------------------------------------------------------------------------------------

TEST(NsaCost, CoreFlopsMatchAHandCount) {
  // T 8, l 4, d 2, l' 4, n 3, w 3, H 2, Hkv 1, D 2, F 3.
  // compressed keys per query (blocks ending at 3, 5, 7): 0 0 0 1 1 2 2 3 = 9
  // selected keys: t < 4 (J = 0): t + 1 = 1 2 3 4; t >= 4 (J = 1, blocks 0 and 1): 4 + t − 3 = 5 6 7 8; sum 36
  // window keys: 1 2 3 3 3 3 3 3 = 21
  // cores: 4·H·D·(9 + 36 + 21)/T = 4·2·2·66/8 = 132; MLPs: 2·2·Hkv·F·D·(l + 1)·Nc/T = 4·3·2·5·3/8 = 45
  const NsaShape s = make_shape(1, 8, 2, 1, 2, 4, 2, 4, 3, 3);
  EXPECT_DOUBLE_EQ(cpu::nsa_core_flops_per_token(s, 3), 177.0);
}

// ---- the layer, composed from the ops -----------------------------------------------------------

// The layer composed from the ops by hand (nsa_ops.h, README "NSA"; the model's is attention_nsa.cpp),
// on x [B·T, dm]: projections by GEMM, RoPE on q and the selected/window keys, the compressed keys rotated after
// compression, three branches, gates, o_proj. Parameters by their Hugging Face names under self_attn.
template <class T>
struct NsaLayer {
  using V = std::vector<T>;
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
    V value, grad;
  };
  NsaShape s;
  int64_t dm, F;
  double theta;
  std::vector<Param> params;
  // saved by forward
  V q, kcr, vcr, hk, hv, kc, vc, ks, vs, kw, vw, z, oc, os, ow, o, out, lc, ls, lw;
  Idx idx;

  NsaLayer(const NsaShape& shape, int64_t d_model, int64_t hidden, double rope_theta)
      : s(shape), dm(d_model), F(hidden), theta(rope_theta) {
    const int64_t HD = s.H * s.D, KD = s.Hkv * s.D, l = s.cmp_block;
    add("q_proj.weight", {HD, dm});
    for (const char* b : {"cmp", "slc", "win"})
      for (const char* kv : {"k", "v"}) add(std::string(b) + "_" + kv + "_proj.weight", {KD, dm});
    for (const char* kv : {"k", "v"}) {
      const std::string m = std::string("cmp_") + kv + "_mlp.";
      add(m + "pos_embed", {l, s.D});
      add(m + "fc1.weight", {F, l * s.D});
      add(m + "fc2.weight", {s.D, F});
    }
    add("g_proj.weight", {3 * s.H, dm});
    add("o_proj.weight", {dm, HD});
  }
  void add(const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    params.push_back({name, shape, V(size_t(n)), V(size_t(n), T(0))});
  }
  Param& P(const std::string& name) {
    for (Param& p : params)
      if (p.name == name) return p;
    throw Error("no parameter " + name);
  }
  const V& W(const std::string& name) { return P(name).value; }
  // Weights uniform in ±gain/sqrt(fan in) (position embeddings ±0.5): O(1) activations. gain 2 for
  // q and the compressed keys, so that the compressed scores spread (with gain 1 the compressed
  // branch's key gradients are ~1e-3 and central differences resolve them to only ~4e-7).
  void init(uint64_t seed) {
    for (Param& p : params) {
      const bool sharp = p.name.rfind("q_proj", 0) == 0 || p.name.rfind("cmp_k", 0) == 0;
      const double a = p.name.find("pos_embed") != std::string::npos ? 0.5
                                                                     : (sharp ? 2.0 : 1.0) / std::sqrt(double(p.shape[1]));
      p.value = rnd<T>(p.value.size(), ++seed, -a, a);
    }
  }
  void zero_grad() {
    for (Param& p : params) std::fill(p.grad.begin(), p.grad.end(), T(0));
  }
  // y [rows, n] = x [rows, dm] · Wᵀ
  void proj(V& y, const V& x, const V& w, int64_t n) {
    y.assign(size_t(s.B * s.T * n), T(0));
    cpu::gemm(y.data(), x.data(), w.data(), s.B * s.T, n, dm, false, true, T(1), T(0));
  }
  void rope(V& y, int64_t heads) { cpu::rope_forward(y.data(), y.data(), s.B, s.T, heads, s.D, theta); }

  void forward(const V& x) {
    const int64_t HD = s.H * s.D, KD = s.Hkv * s.D, Nc = s.n_cmp(), R = s.B * s.T;
    proj(q, x, W("q_proj.weight"), HD);
    rope(q, s.H);
    proj(kcr, x, W("cmp_k_proj.weight"), KD);
    proj(vcr, x, W("cmp_v_proj.weight"), KD);
    kc.assign(size_t(s.B * Nc * KD), T(0));
    vc = kc;
    hk.assign(size_t(s.B * Nc * s.Hkv * F), T(0));
    hv = hk;
    cpu::nsa_compress_forward(kc.data(), hk.data(), kcr.data(), W("cmp_k_mlp.pos_embed").data(),
                              W("cmp_k_mlp.fc1.weight").data(), W("cmp_k_mlp.fc2.weight").data(), F, s);
    cpu::nsa_compress_forward(vc.data(), hv.data(), vcr.data(), W("cmp_v_mlp.pos_embed").data(),
                              W("cmp_v_mlp.fc1.weight").data(), W("cmp_v_mlp.fc2.weight").data(), F, s);
    cpu::nsa_compressed_rope_forward(kc.data(), kc.data(), theta, s);
    oc.assign(size_t(R * HD), T(0));
    os = ow = oc;
    lc.assign(size_t(s.B * s.H * s.T), T(0));
    ls = lw = lc;
    cpu::nsa_cmp_attention_forward(oc.data(), lc.data(), q.data(), kc.data(), vc.data(), s);
    idx.assign(size_t(s.B * s.Hkv * s.T * s.sel_count), 0);
    cpu::nsa_select(idx.data(), q.data(), kc.data(), lc.data(), s);
    proj(ks, x, W("slc_k_proj.weight"), KD);
    rope(ks, s.Hkv);
    proj(vs, x, W("slc_v_proj.weight"), KD);
    cpu::nsa_slc_attention_forward(os.data(), ls.data(), q.data(), ks.data(), vs.data(), idx.data(), s);
    proj(kw, x, W("win_k_proj.weight"), KD);
    rope(kw, s.Hkv);
    proj(vw, x, W("win_v_proj.weight"), KD);
    cpu::attention_forward(ow.data(), lw.data(), q.data(), kw.data(), vw.data(), cpu::nsa_window_shape(s));
    proj(z, x, W("g_proj.weight"), 3 * s.H);
    o.assign(size_t(R * HD), T(0));
    cpu::nsa_gate_forward(o.data(), z.data(), oc.data(), os.data(), ow.data(), R, s.H, s.D);
    out.assign(size_t(R * dm), T(0));
    cpu::gemm(out.data(), o.data(), W("o_proj.weight").data(), R, dm, HD, false, true, T(1), T(0));
  }

  // Parameter gradients accumulate; dx is overwritten.
  void backward(const V& x, const V& dout, V& dx) {
    const int64_t HD = s.H * s.D, KD = s.Hkv * s.D, Nc = s.n_cmp(), R = s.B * s.T;
    dx.assign(size_t(R * dm), T(0));
    // y = x·Wᵀ: dW += dyᵀ·x, dx += dy·W
    auto back_proj = [&](const V& dy, const std::string& name, int64_t n) {
      cpu::gemm(P(name).grad.data(), dy.data(), x.data(), n, dm, R, true, false, T(1), T(1));
      cpu::gemm(dx.data(), dy.data(), W(name).data(), R, dm, n, false, false, T(1), T(1));
    };
    V dO(size_t(R * HD));
    cpu::gemm(dO.data(), dout.data(), W("o_proj.weight").data(), R, HD, dm, false, false, T(1), T(0));
    cpu::gemm(P("o_proj.weight").grad.data(), dout.data(), o.data(), dm, HD, R, true, false, T(1), T(1));
    V dz(z.size()), doc(oc.size()), dos(os.size()), dow(ow.size());
    cpu::nsa_gate_backward(dz.data(), doc.data(), dos.data(), dow.data(), dO.data(), z.data(), oc.data(), os.data(),
                           ow.data(), R, s.H, s.D);
    back_proj(dz, "g_proj.weight", 3 * s.H);
    V dq(q.size()), dqx(q.size()), dk(ks.size()), dv(vs.size());
    // window
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), dow.data(), ow.data(), lw.data(), q.data(), kw.data(),
                            vw.data(), cpu::nsa_window_shape(s));
    cpu::rope_backward(dk.data(), dk.data(), s.B, s.T, s.Hkv, s.D, theta);
    back_proj(dk, "win_k_proj.weight", KD);
    back_proj(dv, "win_v_proj.weight", KD);
    // selected
    cpu::nsa_slc_attention_backward(dqx.data(), dk.data(), dv.data(), dos.data(), os.data(), ls.data(), q.data(),
                                    ks.data(), vs.data(), idx.data(), s);
    cpu::add_inplace(dq.data(), dqx.data(), int64_t(dq.size()));
    cpu::rope_backward(dk.data(), dk.data(), s.B, s.T, s.Hkv, s.D, theta);
    back_proj(dk, "slc_k_proj.weight", KD);
    back_proj(dv, "slc_v_proj.weight", KD);
    // compressed
    V dkc(kc.size()), dvc(vc.size());
    cpu::nsa_cmp_attention_backward(dqx.data(), dkc.data(), dvc.data(), doc.data(), oc.data(), lc.data(), q.data(),
                                    kc.data(), vc.data(), s);
    cpu::add_inplace(dq.data(), dqx.data(), int64_t(dq.size()));
    cpu::nsa_compressed_rope_backward(dkc.data(), dkc.data(), theta, s);
    for (const char* kv : {"k", "v"}) {
      const std::string m = std::string("cmp_") + kv + "_mlp.";
      const bool is_k = kv[0] == 'k';
      cpu::nsa_compress_backward(dk.data(), P(m + "pos_embed").grad.data(), P(m + "fc1.weight").grad.data(),
                                 P(m + "fc2.weight").grad.data(), (is_k ? dkc : dvc).data(), (is_k ? hk : hv).data(),
                                 (is_k ? kcr : vcr).data(), W(m + "pos_embed").data(), W(m + "fc1.weight").data(),
                                 W(m + "fc2.weight").data(), F, s);
      back_proj(dk, std::string("cmp_") + kv + "_proj.weight", KD);
    }
    (void)Nc;
    cpu::rope_backward(dq.data(), dq.data(), s.B, s.T, s.H, s.D, theta);
    back_proj(dq, "q_proj.weight", HD);
  }
};

// Small enough for finite differences on every parameter, large enough that the selection ranks
// (J + 1 > n from t = 24 on) and every branch has early and late queries.
NsaShape layer_shape() { return make_shape(2, 40, 4, 2, 4, 4, 2, 8, 4, 6); }

TEST(NsaLayer, GradientsMatchFiniteDifferences) {
  const NsaShape s = layer_shape();
  const int64_t dm = 6, F = 5;
  NsaLayer<double> L(s, dm, F, 100.0);
  L.init(1);
  Vec x = rnd(size_t(s.B * s.T * dm), 2), G = rnd(x.size(), 3), dx;
  L.forward(x);
  const Idx idx0 = L.idx;
  L.zero_grad();
  L.backward(x, G, dx);
  int flips = 0;
  auto loss = [&] {
    L.forward(x);
    flips += L.idx != idx0;  // the selection is piecewise constant: a flip would break the check
    return weighted_sum(G, L.out);
  };
  expect_grad(dx, numeric_grad(x, loss), "layer dx");
  for (auto& p : L.params) expect_grad(p.grad, numeric_grad(p.value, loss), "layer d" + p.name);
  EXPECT_EQ(flips, 0) << "a finite-difference step changed the selection";
  // The selection ranked something (not every list is the forced blocks and the lowest ones).
  int ranked = 0;
  for (int64_t t = 32; t < s.T; ++t) ranked += idx0[ilist(s, 0, 0, t) + 1] != 1;
  EXPECT_GT(ranked, 0);
}

// fp32 against fp64 on the same inputs. The selection must agree exactly (importance gaps here are
// far above fp32 rounding); outputs and gradients within 1e-5 relative: fp32 rounds each op at ~6e-8
// relative, and the softmaxes, the MLP and the GEMMs sum at most a few hundred such terms (measured
// 5e-7 at worst).
TEST(NsaLayer, FloatMatchesDouble) {
  const NsaShape s = layer_shape();
  const int64_t dm = 6, F = 5;
  NsaLayer<double> Ld(s, dm, F, 100.0);
  NsaLayer<float> Lf(s, dm, F, 100.0);
  Ld.init(7);
  for (size_t i = 0; i < Ld.params.size(); ++i)
    Lf.params[i].value.assign(Ld.params[i].value.begin(), Ld.params[i].value.end());
  Vec x = rnd(size_t(s.B * s.T * dm), 8), G = rnd(x.size(), 9), dxd;
  std::vector<float> xf(x.begin(), x.end()), Gf(G.begin(), G.end()), dxf;
  Ld.forward(x);
  Lf.forward(xf);
  ASSERT_EQ(Ld.idx, Lf.idx);
  Ld.zero_grad();
  Lf.zero_grad();
  Ld.backward(x, G, dxd);
  Lf.backward(xf, Gf, dxf);
  double worst = 0;
  auto check = [&](const std::vector<float>& f, const Vec& d, const std::string& what) {
    const double r = rel_err(Vec(f.begin(), f.end()), d);
    worst = std::max(worst, r);
    EXPECT_LT(r, 1e-5) << what;
  };
  check(Lf.out, Ld.out, "out");
  check(dxf, dxd, "dx");
  for (size_t i = 0; i < Ld.params.size(); ++i) check(Lf.params[i].grad, Ld.params[i].grad, Ld.params[i].name);
  std::printf("[fp32] worst relative error against fp64: %.2e\n", worst);
}

TEST(NsaDeterminism, OneAndTwoThreadsAgreeBitForBit) {
  ThreadCountGuard guard;
  // Larger than the other cases, so that every op's parallel loops split over both threads.
  const NsaShape s = make_shape(2, 150, 4, 2, 16, 8, 4, 16, 5, 20);
  const int64_t dm = 24, F = 12;
  std::vector<float> x = rnd<float>(size_t(s.B * s.T * dm), 1), G = rnd<float>(x.size(), 2);
  using Res = std::vector<std::vector<float>>;
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    NsaLayer<float> L(s, dm, F, 10000.0);
    L.init(3);
    L.forward(x);
    L.zero_grad();
    std::vector<float> dx;
    L.backward(x, G, dx);
    Res r = {L.out, L.oc, L.os, L.ow, L.lc, L.ls, L.kc, L.vc, dx};
    for (auto& p : L.params) r.push_back(p.grad);
    std::vector<float> idx(L.idx.begin(), L.idx.end());
    r.push_back(idx);
    return r;
  };
  const Res one = run(1), two = run(2);
  ASSERT_EQ(one.size(), two.size());
  for (size_t i = 0; i < one.size(); ++i) {
    ASSERT_EQ(one[i].size(), two[i].size());
    EXPECT_EQ(std::memcmp(one[i].data(), two[i].data(), one[i].size() * sizeof(float)), 0) << "result " << i;
  }
}

// ---- the model's layer (src/model/attention_nsa.cpp) against the ops composed here ---------------

// model.attention.type "nsa" with the shape's settings: d_model dm, compression MLP width F.
ModelConfig nsa_model_config(const NsaShape& s, int64_t dm, int64_t F, double theta) {
  ModelConfig m;
  m.d_model = dm;
  m.n_layers = 2;
  m.n_heads = s.H;
  m.n_kv_heads = s.Hkv;
  m.head_dim = s.D;
  m.rope_theta = theta;
  m.attention.type = "nsa";
  m.attention.nsa = {.cmp_block = s.cmp_block, .cmp_stride = s.cmp_stride, .sel_block = s.sel_block,
                     .sel_count = s.sel_count, .window = s.window, .cmp_hidden = F};
  return m;
}

// The layer the model runs (through the ops layer and the activation arena), on the same weights and
// inputs as NsaLayer: the same outputs, selection and gradients to 1e-13 relative (both fp64; the
// model's layer calls the same kernels in the same order, through GEMMs that may overwrite where
// NsaLayer accumulates onto zeros). Once with the selection ranking, once with T < l (no compressed
// block exists: the compressed branch gives 0 everywhere), recomputed twice to show the arena's
// scratch and statistics are rewritten, not accumulated.
TEST(NsaModelLayer, ForwardAndBackwardMatchTheOps) {
  for (const NsaShape& s : {layer_shape(), make_shape(2, 3, 4, 2, 4, 4, 2, 8, 4, 6)}) {
    SCOPED_TRACE(tag(s));
    const int64_t dm = 6, F = 5, N = s.B * s.T;
    NsaLayer<double> ref(s, dm, F, 100.0);
    ref.init(21);
    Vec x = rnd(size_t(N * dm), 22), G = rnd(x.size(), 23), dx_ref;
    ref.forward(x);
    ref.zero_grad();
    ref.backward(x, G, dx_ref);

    const ModelConfig m = nsa_model_config(s, dm, F, 100.0);
    auto attn = make_attention(m);
    ParamTable pt;
    attn->declare_params(pt, "");
    ASSERT_EQ(pt.info().size(), ref.params.size());
    Arena params(pt.table(), DType::F64, Device::CPU), grads(pt.table(), DType::F64, Device::CPU);
    TensorTable at;
    attn->declare_acts(at, "attn.", s.B, s.T);
    Arena acts(at, DType::F64, Device::CPU);
    for (size_t i = 0; i < pt.info().size(); ++i) {
      ASSERT_EQ(pt.info()[i].name, ref.params[i].name);
      Tensor t = params.get(int(i));
      ASSERT_EQ(size_t(t.numel()), ref.params[i].value.size()) << ref.params[i].name;
      std::copy(ref.params[i].value.begin(), ref.params[i].value.end(), t.as<double>());
    }
    LayerCtx c;
    c.params = &params;
    c.grads = &grads;
    c.acts = &acts;
    c.B = s.B;
    c.T = s.T;
    Vec out(size_t(N * dm)), dx(x.size());
    const Tensor tx{x.data(), Shape{N, dm}, DType::F64}, tout{out.data(), Shape{N, dm}, DType::F64},
        tG{G.data(), Shape{N, dm}, DType::F64}, tdx{dx.data(), Shape{N, dm}, DType::F64};
    for (int rep = 0; rep < 2; ++rep) {
      grads.zero();
      attn->forward(c, tx, tout);
      attn->backward(c, tx, tG, tdx);
    }
    EXPECT_LT(rel_err(out, ref.out), 1e-13);
    EXPECT_LT(rel_err(dx, dx_ref), 1e-13);
    for (size_t i = 0; i < pt.info().size(); ++i) {
      const Tensor g = grads.get(int(i));
      EXPECT_LT(rel_err(Vec(g.as<double>(), g.as<double>() + g.numel()), ref.params[i].grad), 1e-13)
          << ref.params[i].name;
    }
    const Tensor sel = acts.get(at.find("attn.selection"));
    EXPECT_EQ(Idx(static_cast<const int32_t*>(sel.data), static_cast<const int32_t*>(sel.data) + ref.idx.size()),
              ref.idx);
    if (s.T < s.cmp_block) {
      EXPECT_EQ(norm(ref.oc), 0.0);
      EXPECT_GT(norm(ref.out), 0.0);
    }
  }
}

// ---- the PyTorch oracle -------------------------------------------------------------------------------

// Debian's python3-torch imports under /usr/bin/python3; DMAT_PYTHON wins (as test_oracle.cpp).
std::string python() {
  if (const char* e = std::getenv("DMAT_PYTHON")) return e;
  for (const char* p : {"/usr/bin/python3", "python3"})
    if (test::run(std::string(p) + " -c 'import torch, numpy'").rc == 0) return p;
  return "/usr/bin/python3";
}

Tensor view(Vec& v, const std::vector<int64_t>& dims) {
  Shape shape;
  for (int64_t x : dims) shape.d[size_t(shape.n++)] = x;
  return Tensor{v.data(), shape, DType::F64};
}

// Writes DIR for nsa_oracle.py: nsa.json (the shape), inputs.safetensors (x, dout, the weights) and
// ours.safetensors (out, idx, grad.x, grad.<param>); returns DIR.
std::string write_oracle_dir(const std::string& tag, NsaLayer<double>& L, Vec& x, Vec& G, Vec& dx,
                             std::vector<int32_t>& idx) {
  const NsaShape& s = L.s;
  const std::string dir = test::temp_dir("nsa_oracle_" + tag);
  nlohmann::json j = {{"B", s.B}, {"T", s.T}, {"H", s.H}, {"Hkv", s.Hkv}, {"D", s.D}, {"d_model", L.dm},
                      {"cmp_hidden", L.F}, {"rope_theta", L.theta}, {"cmp_block", s.cmp_block},
                      {"cmp_stride", s.cmp_stride}, {"sel_block", s.sel_block}, {"sel_count", s.sel_count},
                      {"window", s.window}};
  std::ofstream(dir + "/nsa.json") << j.dump(2);
  std::vector<NamedTensor> in = {{"x", view(x, {s.B, s.T, L.dm})}, {"dout", view(G, {s.B, s.T, L.dm})}};
  for (auto& p : L.params) in.push_back({"self_attn." + p.name, view(p.value, p.shape)});
  write_safetensors(dir + "/inputs.safetensors", in);
  std::vector<NamedTensor> ours = {{"out", view(L.out, {s.B, s.T, L.dm})},
                                   {"idx", Tensor{idx.data(), Shape{s.B, s.Hkv, s.T, s.sel_count}, DType::I32}},
                                   {"grad.x", view(dx, {s.B, s.T, L.dm})}};
  for (auto& p : L.params) ours.push_back({"grad.self_attn." + p.name, view(p.grad, p.shape)});
  write_safetensors(dir + "/ours.safetensors", ours);
  return dir;
}

void run_nsa_oracle(const std::string& tag, const NsaShape& s, int64_t dm, int64_t F) {
  NsaLayer<double> L(s, dm, F, 100.0);
  L.init(11);
  Vec x = rnd(size_t(s.B * s.T * dm), 12), G = rnd(x.size(), 13), dx;
  L.forward(x);
  L.zero_grad();
  L.backward(x, G, dx);
  std::vector<int32_t> idx = L.idx;
  const std::string script = python() + " " + test::source_dir() + "/tests/oracle/nsa_oracle.py ";

  const std::string dir = write_oracle_dir(tag, L, x, G, dx, idx);
  auto res = test::run(script + dir);
  ASSERT_NE(res.out.find("\"rel\""), std::string::npos)
      << "the oracle did not run (does /usr/bin/python3 import torch?):\n" << res.out;
  EXPECT_EQ(res.rc, 0) << res.out;
  std::printf("%s", res.out.substr(res.out.rfind("{\"summary\"")).c_str());

  // It must fail on a wrong result: one gradient off by 1e-6 relative, one selection changed.
  auto& p = L.P("cmp_k_mlp.pos_embed");
  const double saved = p.grad[0];
  p.grad[0] += 1e-6 * std::max(1.0, norm(p.grad));
  EXPECT_EQ(test::run(script + write_oracle_dir(tag + "_bad_grad", L, x, G, dx, idx)).rc, 1);
  p.grad[0] = saved;
  // a query whose list ranks blocks: swap a ranked block for another candidate
  bool changed = false;
  for (int64_t t = s.T - 1; t >= 0 && !changed; --t) {
    int32_t* l = idx.data() + ilist(s, 0, 0, t);
    const int64_t J = t / s.sel_block;
    if (J + 1 <= s.sel_count) break;
    for (int32_t cand = 1; cand <= J - 2 && !changed; ++cand)
      if (std::find(l, l + s.sel_count, cand) == l + s.sel_count) {
        l[1] = cand;  // l[0] = 0 is forced; l[1] is a ranked block here
        std::sort(l, l + s.sel_count);
        changed = true;
      }
  }
  ASSERT_TRUE(changed);
  EXPECT_EQ(test::run(script + write_oracle_dir(tag + "_bad_idx", L, x, G, dx, idx)).rc, 1);
}

TEST(NsaOracle, LayerMatchesTorch) {
  // l' = 2l (eq. 9 with l'/d = 4, l/d = 2), GQA 4/2; selection ranks from t = 40 (n = 5).
  run_nsa_oracle("l4d2s8", make_shape(2, 64, 4, 2, 6, 4, 2, 8, 5, 10), 10, 5);
}
TEST(NsaOracle, SelectionBlocksSmallerThanCompressionBlocks) {
  // l' = l/2 (a compression block spans two selection blocks), MQA, window shorter than a block.
  run_nsa_oracle("l8d4s4", make_shape(1, 48, 3, 1, 4, 8, 4, 4, 6, 3), 8, 7);
}

}  // namespace
}  // namespace dmat
