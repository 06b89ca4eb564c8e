// The CPU reference of Multi-head Latent Attention's own op (cpu::rope_unpack_mla and its
// transpose, kernels/cpu/cpu_ops.h): forward against a naive loop written here from the definition,
// backward against central finite differences in fp64, the aliasing the contract allows, and
// bitwise determinism across thread counts.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <omp.h>

#include "kernels/cpu/cpu_ops.h"
#include "test_gradcheck.h"
#include "test_util.h"

namespace dmat {
namespace {

using test::expect_grad;
using test::numeric_grad;
using test::rel_err;
using test::rnd;
using test::ThreadCountGuard;
using test::Vec;
using test::weighted_sum;

struct MlaShape {
  int64_t B, Tn, H, nope, R, Dv;
  double theta;
  int64_t N() const { return B * Tn; }
  int64_t Dqk() const { return nope + R; }
  std::string str() const {
    return "B" + std::to_string(B) + " T" + std::to_string(Tn) + " H" + std::to_string(H) + " nope" +
           std::to_string(nope) + " R" + std::to_string(R) + " Dv" + std::to_string(Dv);
  }
};

// Odd head counts, nope ≠ Dv, R = 2 (one rotated pair) and a rotary part wider than the rest.
const MlaShape kShapes[] = {{2, 5, 3, 4, 6, 2, 10000.0}, {1, 7, 1, 6, 2, 4, 500.0}, {2, 3, 4, 2, 8, 6, 10000.0}};

// The definition, one element at a time: RoPE of pair (i, i + R/2) at position t by the angle
// t·theta^(−2i/R), rotate-half.
void naive_unpack(Vec& q, Vec& k, Vec& v, const Vec& qp, const Vec& kv, const Vec& kr, const MlaShape& s) {
  const int64_t Dqk = s.Dqk(), half = s.R / 2;
  q.assign(size_t(s.N() * s.H * Dqk), 0.0);
  k.assign(q.size(), 0.0);
  v.assign(size_t(s.N() * s.H * s.Dv), 0.0);
  auto rot = [&](const double* x, double* y, int64_t t) {
    for (int64_t i = 0; i < half; ++i) {
      const double a = double(t) * std::pow(s.theta, -2.0 * double(i) / double(s.R));
      y[i] = x[i] * std::cos(a) - x[i + half] * std::sin(a);
      y[i + half] = x[i + half] * std::cos(a) + x[i] * std::sin(a);
    }
  };
  for (int64_t n = 0; n < s.N(); ++n)
    for (int64_t h = 0; h < s.H; ++h) {
      const double* qh = qp.data() + (n * s.H + h) * Dqk;
      const double* kvh = kv.data() + (n * s.H + h) * (s.nope + s.Dv);
      double* qo = q.data() + (n * s.H + h) * Dqk;
      double* ko = k.data() + (n * s.H + h) * Dqk;
      for (int64_t i = 0; i < s.nope; ++i) qo[i] = qh[i], ko[i] = kvh[i];
      rot(qh + s.nope, qo + s.nope, n % s.Tn);
      rot(kr.data() + n * s.R, ko + s.nope, n % s.Tn);
      for (int64_t i = 0; i < s.Dv; ++i) v[size_t((n * s.H + h) * s.Dv + i)] = kvh[s.nope + i];
    }
}

struct Inputs {
  Vec qp, kv, kr;
};
Inputs inputs(const MlaShape& s, uint64_t seed) {
  return {rnd(size_t(s.N() * s.H * s.Dqk()), seed), rnd(size_t(s.N() * s.H * (s.nope + s.Dv)), seed + 1),
          rnd(size_t(s.N() * s.R), seed + 2)};
}

TEST(OpsMla, UnpackMatchesTheDefinition) {
  uint64_t seed = 11;
  for (const MlaShape& s : kShapes) {
    const Inputs in = inputs(s, seed += 10);
    Vec q(in.qp.size()), k(in.qp.size()), v(size_t(s.N() * s.H * s.Dv)), rq, rk, rv;
    cpu::rope_unpack_mla<double>(q.data(), k.data(), v.data(), in.qp.data(), in.kv.data(), in.kr.data(), s.B, s.Tn,
                                 s.H, s.nope, s.R, s.Dv, s.theta);
    naive_unpack(rq, rk, rv, in.qp, in.kv, in.kr, s);
    // the same arithmetic up to where cos/sin are rounded: within a few ulps
    EXPECT_LT(rel_err(q, rq), 1e-14) << s.str();
    EXPECT_LT(rel_err(k, rk), 1e-14) << s.str();
    EXPECT_EQ(v, rv) << s.str();  // copies
    // q in place (q == qp) gives the same values
    Vec inplace = in.qp;
    Vec k2(k.size()), v2(v.size());
    cpu::rope_unpack_mla<double>(inplace.data(), k2.data(), v2.data(), inplace.data(), in.kv.data(), in.kr.data(),
                                 s.B, s.Tn, s.H, s.nope, s.R, s.Dv, s.theta);
    EXPECT_EQ(inplace, q) << s.str();
  }
}

// L = Σ wq·q + wk·k + wv·v: its gradients with respect to qp, kv and kr are the transpose applied
// to (wq, wk, wv); checked against central differences of L.
TEST(OpsMla, PackBackwardMatchesFiniteDifferences) {
  uint64_t seed = 71;
  for (const MlaShape& s : kShapes) {
    Inputs in = inputs(s, seed += 10);
    const Vec wq = rnd(in.qp.size(), seed + 5), wk = rnd(in.qp.size(), seed + 6),
              wv = rnd(size_t(s.N() * s.H * s.Dv), seed + 7);
    Vec q(wq.size()), k(wk.size()), v(wv.size());
    auto loss = [&] {
      cpu::rope_unpack_mla<double>(q.data(), k.data(), v.data(), in.qp.data(), in.kv.data(), in.kr.data(), s.B, s.Tn,
                                   s.H, s.nope, s.R, s.Dv, s.theta);
      return weighted_sum(wq, q) + weighted_sum(wk, k) + weighted_sum(wv, v);
    };
    Vec dqp(in.qp.size()), dkv(in.kv.size()), dkr(in.kr.size());
    cpu::rope_pack_mla_backward<double>(dqp.data(), dkv.data(), dkr.data(), wq.data(), wk.data(), wv.data(), s.B,
                                        s.Tn, s.H, s.nope, s.R, s.Dv, s.theta);
    expect_grad(dqp, numeric_grad(in.qp, loss), "mla dqp " + s.str());
    expect_grad(dkv, numeric_grad(in.kv, loss), "mla dkv " + s.str());
    expect_grad(dkr, numeric_grad(in.kr, loss), "mla dkr " + s.str());
    // dqp in place (dqp == dq)
    Vec inplace = wq, dkv2(dkv.size()), dkr2(dkr.size());
    cpu::rope_pack_mla_backward<double>(inplace.data(), dkv2.data(), dkr2.data(), inplace.data(), wk.data(), wv.data(),
                                        s.B, s.Tn, s.H, s.nope, s.R, s.Dv, s.theta);
    EXPECT_EQ(inplace, dqp) << s.str();
  }
}

// Every output element is computed in a fixed order (the head sum of dkr included), so one thread
// and two give the same bits.
TEST(OpsMla, BitwiseAcrossThreadCounts) {
  ThreadCountGuard guard;
  const MlaShape s{3, 9, 5, 4, 6, 4, 10000.0};
  const std::vector<float> qp = rnd<float>(size_t(s.N() * s.H * s.Dqk()), 5),
                           kv = rnd<float>(size_t(s.N() * s.H * (s.nope + s.Dv)), 6),
                           kr = rnd<float>(size_t(s.N() * s.R), 7);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> q(qp.size()), k(qp.size()), v(size_t(s.N() * s.H * s.Dv)), dqp(qp.size()), dkv(kv.size()),
        dkr(kr.size());
    cpu::rope_unpack_mla<float>(q.data(), k.data(), v.data(), qp.data(), kv.data(), kr.data(), s.B, s.Tn, s.H, s.nope,
                                s.R, s.Dv, s.theta);
    cpu::rope_pack_mla_backward<float>(dqp.data(), dkv.data(), dkr.data(), q.data(), k.data(), v.data(), s.B, s.Tn,
                                       s.H, s.nope, s.R, s.Dv, s.theta);
    std::vector<float> all = q;
    for (const auto* x : {&k, &v, &dqp, &dkv, &dkr}) all.insert(all.end(), x->begin(), x->end());
    return all;
  };
  const auto a = run(1), b = run(2);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

}  // namespace
}  // namespace dmat
