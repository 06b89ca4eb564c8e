// CUDA dense kernels (kernels/cuda/cuda_ops.h) against the CPU reference kernels (kernels/cpu), on
// the same bf16-rounded random inputs (fresh seeds, never all zeros), several shapes including odd
// ones, outputs poisoned with NaN before each call (so an unwritten element fails), the aliasing
// the contract allows, += semantics, and bitwise run-to-run determinism of every reduction that
// produces parameter gradients or reported numbers. Each tolerance has its justification next to it.
// Label gpu (file name); every test skips where no CUDA device is visible.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kernels/cuda/device_info.h"

#ifdef DMAT_WITH_CUDA
#include "core/bf16.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "test_gpu_util.h"
#endif

namespace dmat {
namespace {

#define REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

#ifndef DMAT_WITH_CUDA
TEST(GpuOps, NeedsCudaBuild) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  GTEST_SKIP() << "built without the CUDA backend (DMAT_CUDA=OFF)";
}
#else

// ---- host helpers ------------------------------------------------------------------------------
using test::BfInput;
using test::check_close;
using test::Dev;
using test::from_bf;
using test::kNaN;
using test::to_bf;
using test::to_d;

constexpr double kBf16Half = 1.0 / 256;  // bf16 has 8 significant bits: rounding error ≤ 2^-8 relative

// This suite's input stream: every seed is salted with 0x5eed (floats and bf16 alike), as when the
// tolerances below were set.
std::vector<float> rand_floats(size_t n, uint64_t seed, double lo = -1, double hi = 1) {
  return test::uniform_floats(n, hash64(seed, 0x5eed), lo, hi);
}
BfInput rand_bf(size_t n, uint64_t seed, double lo = -1, double hi = 1) {
  return test::uniform_bf(n, hash64(seed, 0x5eed), lo, hi);
}

std::vector<double> got_d(const Dev<bf16>& d) { return to_d(from_bf(d.down())); }
std::vector<double> got_d(const Dev<float>& d) { return to_d(d.down()); }

void check_bf16_rel(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                    double extra_rel, double atol) {
  check_close(what, got, want, [&](size_t i) { return (kBf16Half + extra_rel) * std::fabs(want[i]) + atol; });
}
template <class T>
void check_bitwise(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  ASSERT_EQ(a.size(), b.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      if (bad == 0) first = i;
      ++bad;
    }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " elements differ bitwise, first at " << first;
}

// ---- memory -----------------------------------------------------------------------------------
TEST(GpuOps, MemoryRoundTripAndOomMessage) {
  REQUIRE_GPU();
  const auto v = rand_floats(1003, 1);
  Dev<float> a(v), b(v.size());
  b.poison();
  cuda::memcpy_d2d(b.p, a.p, v.size() * sizeof(float));
  check_bitwise("d2d copy", b.down(), v);
  cuda::memset_zero(b.p, v.size() * sizeof(float));
  for (float x : b.down()) ASSERT_EQ(x, 0.f);
  EXPECT_EQ(cuda::device_alloc(0), nullptr);
  try {
    cuda::device_alloc(size_t(1) << 52);  // 4 PiB
    FAIL() << "a 4 PiB allocation succeeded";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("4503599627370496"), std::string::npos) << m;
    EXPECT_NE(m.find("free"), std::string::npos) << m;
  }
  // The failed allocation must not leave a sticky error behind.
  Dev<float> c(v);
  check_bitwise("after OOM", c.down(), v);
}

// ---- fill / convert / add / scale --------------------------------------------------------------
TEST(GpuOps, FillConvertAddScale) {
  REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(7), size_t(8), size_t(1000), size_t(1000003)})
    for (size_t off : {size_t(0), size_t(1)}) {
      const std::string shape = fmt::format("n={} offset={}", n, off);
      Dev<float> f(n, off);
      Dev<bf16> h(n, off);
      f.poison();
      cuda::fill_f32(f.p, int64_t(n), 0.3f);
      for (float x : f.down()) ASSERT_EQ(x, 0.3f) << shape;
      h.poison();
      cuda::fill_bf16(h.p, int64_t(n), 0.3f);
      for (bf16 x : h.down()) ASSERT_EQ(x.bits, to_bf16(0.3f).bits) << shape;

      // Conversions are exact / correctly rounded: compared bitwise with the host's RNE.
      const auto src = rand_floats(n, 10 + n + off, -3, 3);
      f.up(src);
      h.poison();
      cuda::f32_to_bf16(h.p, f.p, int64_t(n));
      check_bitwise("f32_to_bf16 " + shape, h.down(), to_bf(src));
      f.poison();
      cuda::bf16_to_f32(f.p, h.p, int64_t(n));
      check_bitwise("bf16_to_f32 " + shape, f.down(), from_bf(to_bf(src)));

      // fp32 add / scale: one IEEE operation per element, bitwise equal to the host's.
      const auto y0 = rand_floats(n, 20 + n + off), x0 = rand_floats(n, 30 + n + off);
      Dev<float> y(y0, off), x(x0, off);
      cuda::add_inplace_f32(y.p, x.p, int64_t(n));
      std::vector<float> want(n);
      for (size_t i = 0; i < n; ++i) want[i] = y0[i] + x0[i];
      check_bitwise("add_inplace_f32 " + shape, y.down(), want);
      cuda::scale_inplace_f32(y.p, int64_t(n), -1.7f);
      for (size_t i = 0; i < n; ++i) want[i] *= -1.7f;
      check_bitwise("scale_inplace_f32 " + shape, y.down(), want);

      // bf16 add / scale: fp32 math then one rounding (RNE), bitwise.
      const auto yb = to_bf(y0), xb = to_bf(x0);
      Dev<bf16> yd(yb, off), xd(xb, off);
      cuda::add_inplace_bf16(yd.p, xd.p, int64_t(n));
      std::vector<bf16> wb(n);
      for (size_t i = 0; i < n; ++i) wb[i] = to_bf16(to_float(yb[i]) + to_float(xb[i]));
      check_bitwise("add_inplace_bf16 " + shape, yd.down(), wb);
      cuda::scale_inplace_bf16(yd.p, int64_t(n), 0.37f);
      for (size_t i = 0; i < n; ++i) wb[i] = to_bf16(to_float(wb[i]) * 0.37f);
      check_bitwise("scale_inplace_bf16 " + shape, yd.down(), wb);
    }
}

// ---- reductions ---------------------------------------------------------------------------------
TEST(GpuOps, SumAndSumSquaresDeterministic) {
  REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(3), size_t(4096), size_t(8193), size_t(1 << 22) + 5})
    for (size_t off : {size_t(0), size_t(1)}) {
      const std::string shape = fmt::format("n={} offset={}", n, off);
      const auto x = rand_floats(n, 40 + n + off, -2, 1);
      Dev<float> xd(x, off);
      Dev<double> out(2);
      double ref_sq = 0, ref_s = 0, abs_s = 0;
      for (float v : x) ref_sq += double(v) * double(v), ref_s += double(v), abs_s += std::fabs(double(v));
      cuda::sum_squares_f32(out.p, xd.p, int64_t(n));
      cuda::sum_f32(out.p + 1, xd.p, int64_t(n));
      const auto r1 = out.down();
      // Double accumulation, any order: |error| ≤ n·2^-53·Σ|terms| (< 1e-9 relative here).
      EXPECT_NEAR(r1[0], ref_sq, 1e-12 * double(n) * ref_sq + 1e-300) << "sum_squares " << shape;
      EXPECT_NEAR(r1[1], ref_s, 1e-12 * double(n) * abs_s) << "sum " << shape;
      // Determinism: same bits on a second run.
      cuda::sum_squares_f32(out.p, xd.p, int64_t(n));
      cuda::sum_f32(out.p + 1, xd.p, int64_t(n));
      check_bitwise("sum/sum_squares rerun " + shape, out.down(), r1);
    }
}

// ---- GEMM ---------------------------------------------------------------------------------------
TEST(GpuOps, GemmAllTransposesBothOutputTypes) {
  REQUIRE_GPU();
  struct S {
    int64_t M, N, K;
  };
  for (S s : {S{1, 1, 1}, S{17, 33, 65}, S{128, 96, 64}, S{255, 129, 300}, S{64, 2304, 768}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        const auto A = rand_bf(size_t(s.M * s.K), 50 + s.M + 2 * ta + tb);
        const auto B = rand_bf(size_t(s.K * s.N), 60 + s.N + 2 * ta + tb);
        Dev<bf16> a(A.b), b(B.b);
        std::vector<double> absA(A.d.size()), absB(B.d.size());
        for (size_t i = 0; i < absA.size(); ++i) absA[i] = std::fabs(A.d[i]);
        for (size_t i = 0; i < absB.size(); ++i) absB[i] = std::fabs(B.d[i]);
        const size_t mn = size_t(s.M * s.N);
        std::vector<double> mag(mn);  // Σ_k |a||b|: the scale of the accumulation error
        cpu::gemm<double>(mag.data(), absA.data(), absB.data(), s.M, s.N, s.K, ta, tb, 1.0, 0.0);
        const std::string shape = fmt::format("M={} N={} K={} trans_a={} trans_b={}", s.M, s.N, s.K, ta, tb);
        // fp32 accumulation over K products of bf16 values (exact in fp32): |error| ≤ K·2^-24·Σ|ab|.
        const double acc_rel = double(s.K) * 0x1p-24 + 1e-7;

        // bf16 C, beta = 0 over a NaN-poisoned C, alpha = 0.5.
        std::vector<double> ref(mn);
        cpu::gemm<double>(ref.data(), A.d.data(), B.d.data(), s.M, s.N, s.K, ta, tb, 0.5, 0.0);
        Dev<bf16> cb(mn);
        cb.poison();
        cuda::gemm(cb.p, false, a.p, b.p, s.M, s.N, s.K, ta, tb, 0.5f, 0.f);
        const auto g1 = got_d(cb);
        // bf16 output: rounding 2^-8·|C| on top of the accumulation error.
        check_close("gemm bf16 C " + shape, g1, ref,
                    [&](size_t i) { return kBf16Half * std::fabs(ref[i]) + 0.5 * acc_rel * mag[i] + 1e-30; });

        // fp32 C: beta = 0 over NaN, then beta = 1 accumulation (weight-gradient form).
        Dev<float> cf(mn);
        cf.poison();
        cuda::gemm(cf.p, true, a.p, b.p, s.M, s.N, s.K, ta, tb, 1.f, 0.f);
        std::vector<double> ref1(mn);
        cpu::gemm<double>(ref1.data(), A.d.data(), B.d.data(), s.M, s.N, s.K, ta, tb, 1.0, 0.0);
        const auto g2 = got_d(cf);
        check_close("gemm fp32 C beta=0 " + shape, g2, ref1, [&](size_t i) { return acc_rel * mag[i] + 1e-30; });
        const auto c0 = rand_floats(mn, 70 + s.K);
        cf.up(c0);
        cuda::gemm(cf.p, true, a.p, b.p, s.M, s.N, s.K, ta, tb, 1.f, 1.f);
        std::vector<double> ref2 = to_d(c0);
        cpu::gemm<double>(ref2.data(), A.d.data(), B.d.data(), s.M, s.N, s.K, ta, tb, 1.0, 1.0);
        check_close("gemm fp32 C beta=1 " + shape, got_d(cf), ref2,
                    [&](size_t i) { return acc_rel * (mag[i] + std::fabs(c0[i])) + 0x1p-24 * std::fabs(ref2[i]); });
      }
}

// ---- embedding ----------------------------------------------------------------------------------
// Tokens with heavy repetition (half of them one token) so that runs span many sort chunks.
std::vector<int32_t> skewed_tokens(size_t n, int64_t V, uint64_t seed) {
  Rng r(hash64(seed, 7));
  std::vector<int32_t> t(n);
  for (auto& x : t) {
    const double u = r.uniform();
    x = u < 0.5 ? int32_t(V / 3) : u < 0.6 ? int32_t(V - 1) : int32_t(r.below(uint64_t(V)));
  }
  return t;
}

TEST(GpuOps, EmbeddingForwardIsAnExactGather) {
  REQUIRE_GPU();
  for (int64_t n : {1, 37, 1000})
    for (int64_t D : {16, 96, 768, 4097}) {
      const int64_t V = 300;
      const auto table = rand_bf(size_t(V * D), 80 + D);
      const auto tok = skewed_tokens(size_t(n), V, 81 + n);
      Dev<bf16> t(table.b), out(size_t(n * D));
      Dev<int32_t> td(tok);
      out.poison();
      cuda::embedding_forward(out.p, t.p, td.p, n, D);
      std::vector<bf16> want(size_t(n * D));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < D; ++d) want[size_t(i * D + d)] = table.b[size_t(tok[size_t(i)] * D + d)];
      check_bitwise(fmt::format("embedding_forward n={} D={}", n, D), out.down(), want);
    }
}

TEST(GpuOps, EmbeddingBackwardAccumulatesDeterministically) {
  REQUIRE_GPU();
  struct S {
    int64_t n, D, V;
  };
  for (S s : {S{1, 16, 50}, S{33, 96, 50}, S{64, 768, 1000}, S{1000, 16, 50}, S{4096, 96, 1000},
              S{777, 4097, 40}, S{65536, 768, 32768}})
    {
      const std::string shape = fmt::format("n={} D={} V={}", s.n, s.D, s.V);
      const auto dout = rand_bf(size_t(s.n * s.D), 90 + s.n);
      const auto tok = skewed_tokens(size_t(s.n), s.V, 91 + s.D);
      const auto dt0 = rand_floats(size_t(s.V * s.D), 92 + s.V);
      Dev<bf16> dd(dout.b);
      Dev<int32_t> td(tok);
      Dev<float> dt(dt0);
      cuda::embedding_backward(dt.p, dd.p, td.p, s.n, s.D, s.V);
      const auto g1 = dt.down();
      std::vector<double> ref = to_d(dt0);
      cpu::embedding_backward<double>(ref.data(), dout.d.data(), tok.data(), s.n, s.D);
      std::vector<double> count(size_t(s.V), 0);
      for (int32_t t : tok) count[size_t(t)] += 1;
      // fp32: serial sums of ≤ 32 terms per sort chunk, then ≤ c/32 chunk sums in order, then the
      // add onto |dtable| ≤ 1; terms ≤ 1: |error| ≤ (34 + c/32)·2^-24·(c + 1).
      check_close("embedding_backward " + shape, to_d(g1), ref, [&](size_t i) {
        const double c = count[i / size_t(s.D)];
        return (34 + c / 32) * 0x1p-24 * (c + 1);
      });
      dt.up(dt0);
      cuda::embedding_backward(dt.p, dd.p, td.p, s.n, s.D, s.V);
      check_bitwise("embedding_backward rerun " + shape, dt.down(), g1);
    }
}

// ---- RMSNorm ------------------------------------------------------------------------------------
struct NormShape {
  int64_t rows, D;
};
const std::vector<NormShape> kNormShapes = {{1, 16},   {7, 16},    {333, 16}, {100, 32},  {37, 96},
                                            {65, 768}, {9, 2304},  {5, 4097}, {3, 16384}, {1000, 128}};

std::vector<double> ref_rstd(const std::vector<double>& x, int64_t rows, int64_t D, double eps) {
  std::vector<double> r(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += x[size_t(i * D + d)] * x[size_t(i * D + d)];
    r[size_t(i)] = 1.0 / std::sqrt(ss / double(D) + eps);
  }
  return r;
}

TEST(GpuOps, RmsnormForward) {
  REQUIRE_GPU();
  const float eps = 1e-5f;
  for (NormShape s : kNormShapes)
    for (int with_w = 0; with_w < 2; ++with_w)
      for (int in_place = 0; in_place < 2; ++in_place) {
        const std::string shape = fmt::format("rows={} D={} w={} in_place={}", s.rows, s.D, with_w, in_place);
        const auto x = rand_bf(size_t(s.rows * s.D), 100 + s.D + with_w);
        const auto w = rand_bf(size_t(s.D), 101 + s.D, 0.5, 1.5);
        Dev<bf16> xd(x.b), wd(w.b), yd(x.b.size());
        Dev<float> rs(size_t(s.rows));
        yd.poison();
        rs.poison();
        bf16* y = in_place ? xd.p : yd.p;
        cuda::rmsnorm_forward(y, rs.p, xd.p, with_w ? wd.p : nullptr, s.rows, s.D, eps);
        std::vector<double> ry(x.d.size()), rr(size_t(s.rows));
        cpu::rmsnorm_forward<double>(ry.data(), rr.data(), x.d.data(), with_w ? w.d.data() : nullptr, s.rows, s.D,
                                     eps);
        // rstd: fp32 sum of D squares in short serial runs + a tree: ≤ ~100·2^-24 relative.
        check_close("rmsnorm rstd " + shape, got_d(rs), rr, [&](size_t i) { return 1e-5 * rr[i]; });
        // y: one bf16 rounding of a value carrying the rstd error above.
        check_bf16_rel("rmsnorm y " + shape, in_place ? got_d(xd) : got_d(yd), ry, 1e-5, 1e-30);
      }
}

TEST(GpuOps, ResidualRmsnormForwardFusedEqualsComposition) {
  REQUIRE_GPU();
  const float eps = 1e-6f;
  for (NormShape s : kNormShapes)
    for (int with_r = 0; with_r < 2; ++with_r)
      for (int alias = 0; alias < 3; ++alias) {  // out separate / out == x / out == branch
        const std::string shape = fmt::format("rows={} D={} r={} alias={}", s.rows, s.D, with_r, alias);
        const size_t n = size_t(s.rows * s.D);
        const auto x = rand_bf(n, 110 + s.D), br = rand_bf(n, 111 + s.D);
        const auto r = rand_bf(size_t(s.D), 112, 0.5, 1.5), w = rand_bf(size_t(s.D), 113, 0.5, 1.5);
        Dev<bf16> xd(x.b), bd(br.b), rd(r.b), wd(w.b), od(n), yd(n);
        Dev<float> rs(size_t(s.rows));
        od.poison();
        yd.poison();
        rs.poison();
        bf16* out = alias == 1 ? xd.p : alias == 2 ? bd.p : od.p;
        cuda::residual_rmsnorm_forward(out, yd.p, rs.p, xd.p, with_r ? rd.p : nullptr, bd.p, wd.p, s.rows, s.D, eps);
        const auto got_out = alias == 1 ? xd.down() : alias == 2 ? bd.down() : od.down();
        const auto got_y = yd.down();
        const auto got_rs = rs.down();
        // vs the CPU composition: out is one bf16 rounding of r·x + b (fp32 vs double before it).
        std::vector<double> ro(n);
        cpu::residual_forward<double>(ro.data(), x.d.data(), with_r ? r.d.data() : nullptr, br.d.data(), s.rows, s.D);
        check_bf16_rel("fused out " + shape, to_d(from_bf(got_out)), ro, 1e-6, 1e-30);
        // y vs the CPU norm of the GPU's stored out (isolates the norm from out's last-bit ties).
        std::vector<double> ry(n), rr(size_t(s.rows));
        const auto od_d = to_d(from_bf(got_out));
        cpu::rmsnorm_forward<double>(ry.data(), rr.data(), od_d.data(), w.d.data(), s.rows, s.D, eps);
        check_bf16_rel("fused y " + shape, to_d(from_bf(got_y)), ry, 1e-5, 1e-30);
        // vs the GPU composition: the same bits (the fused kernel normalises the rounded out).
        Dev<bf16> xd2(x.b), bd2(br.b), od2(n), yd2(n);
        Dev<float> rs2(size_t(s.rows));
        cuda::residual_forward(od2.p, xd2.p, with_r ? rd.p : nullptr, bd2.p, s.rows, s.D);
        cuda::rmsnorm_forward(yd2.p, rs2.p, od2.p, wd.p, s.rows, s.D, eps);
        check_bitwise("fused vs composed out " + shape, got_out, od2.down());
        check_bitwise("fused vs composed y " + shape, got_y, yd2.down());
        check_bitwise("fused vs composed rstd " + shape, got_rs, rs2.down());
      }
}

TEST(GpuOps, RmsnormBackward) {
  REQUIRE_GPU();
  for (NormShape s : kNormShapes)
    for (int with_w = 0; with_w < 2; ++with_w)
      for (int mode = 0; mode < 3; ++mode) {  // 0: overwrite, 1: accumulate, 2: dx aliases dy
        const std::string shape = fmt::format("rows={} D={} w={} mode={}", s.rows, s.D, with_w, mode);
        const size_t n = size_t(s.rows * s.D);
        const auto x = rand_bf(n, 120 + s.D), dy = rand_bf(n, 121 + s.D);
        const auto w = rand_bf(size_t(s.D), 122, 0.5, 1.5);
        // rstd as the forward stores it (fp32); the reference uses the same floats.
        std::vector<float> rsf(size_t(s.rows));
        const auto rsd = ref_rstd(x.d, s.rows, s.D, 1e-5);
        for (size_t i = 0; i < rsf.size(); ++i) rsf[i] = float(rsd[i]);
        const auto dx0 = rand_bf(n, 123);
        const auto dw0 = rand_floats(size_t(s.D), 124);
        Dev<bf16> xd(x.b), dyd(dy.b), wd(w.b), dxd(n);
        Dev<float> rs(rsf), dw(dw0);
        if (mode == 1) dxd.up(dx0.b);
        else dxd.poison();
        bf16* dx = mode == 2 ? dyd.p : dxd.p;
        const bf16* wp = with_w ? wd.p : nullptr;
        cuda::rmsnorm_backward(dx, with_w ? dw.p : nullptr, dyd.p, xd.p, wp, rs.p, s.rows, s.D, mode == 1);
        const auto g_dx = mode == 2 ? got_d(dyd) : got_d(dxd);
        const auto g_dw = dw.down();

        std::vector<double> rdx = mode == 1 ? dx0.d : std::vector<double>(n, 0.0), rdw = to_d(dw0);
        const auto rsd_f = to_d(rsf);
        cpu::rmsnorm_backward<double>(rdx.data(), with_w ? rdw.data() : nullptr, dy.d.data(), x.d.data(),
                                      with_w ? w.d.data() : nullptr, rsd_f.data(), s.rows, s.D, mode == 1);
        // dx = rstd·w·dy − x·c has cancellation: the fp32 error scales with the terms' magnitude
        // m = |rstd·w·dy| + |x·c| (+|dx0|), ~1e-5 relative (gx summed over D in fp32), then a bf16 rounding.
        std::vector<double> mag(n);
        for (int64_t r = 0; r < s.rows; ++r) {
          double gx = 0;
          for (int64_t d = 0; d < s.D; ++d)
            gx += (with_w ? w.d[size_t(d)] : 1.0) * dy.d[size_t(r * s.D + d)] * x.d[size_t(r * s.D + d)];
          const double rs3 = rsd_f[size_t(r)] * rsd_f[size_t(r)] * rsd_f[size_t(r)];
          for (int64_t d = 0; d < s.D; ++d) {
            const size_t i = size_t(r * s.D + d);
            mag[i] = std::fabs(rsd_f[size_t(r)] * (with_w ? w.d[size_t(d)] : 1.0) * dy.d[i]) +
                     std::fabs(x.d[i] * rs3 * gx / double(s.D)) + (mode == 1 ? std::fabs(dx0.d[i]) : 0.0);
          }
        }
        check_close("rmsnorm dx " + shape, g_dx, rdx,
                    [&](size_t i) { return kBf16Half * std::fabs(rdx[i]) + 2e-5 * mag[i] + 1e-30; });
        if (with_w) {
          // dw: fp32 partial sums over row ranges then fixed-order group sums; error ≲ 1e-5 of Σ|terms|.
          std::vector<double> amag(size_t(s.D), 0);
          for (int64_t r = 0; r < s.rows; ++r)
            for (int64_t d = 0; d < s.D; ++d)
              amag[size_t(d)] += std::fabs(dy.d[size_t(r * s.D + d)] * x.d[size_t(r * s.D + d)] * rsd_f[size_t(r)]);
          check_close("rmsnorm dw " + shape, to_d(g_dw), rdw,
                      [&](size_t d) { return 1e-5 * (amag[d] + std::fabs(dw0[d])) + 1e-30; });
          // Determinism of dw (dy unchanged unless aliased: rerun only in the non-aliased modes).
          if (mode != 2) {
            dw.up(dw0);
            if (mode == 1) dxd.up(dx0.b);
            cuda::rmsnorm_backward(dx, dw.p, dyd.p, xd.p, wp, rs.p, s.rows, s.D, mode == 1);
            check_bitwise("rmsnorm dw rerun " + shape, dw.down(), g_dw);
          }
        } else {
          check_bitwise("rmsnorm dw untouched without w " + shape, g_dw, dw0);
        }
      }
}

// ---- RoPE ---------------------------------------------------------------------------------------
TEST(GpuOps, RopeForwardBackward) {
  REQUIRE_GPU();
  struct S {
    int64_t B, T, H, Dh;
  };
  for (S s : {S{1, 1, 1, 16}, S{2, 5, 3, 64}, S{2, 64, 3, 128}, S{1, 7, 2, 6}, S{3, 33, 1, 32}})
    for (int bwd = 0; bwd < 2; ++bwd)
      for (int in_place = 0; in_place < 2; ++in_place) {
        const std::string shape =
            fmt::format("B={} T={} H={} Dh={} backward={} in_place={}", s.B, s.T, s.H, s.Dh, bwd, in_place);
        const size_t n = size_t(s.B * s.T * s.H * s.Dh);
        const auto x = rand_bf(n, 130 + s.Dh + s.T);
        Dev<bf16> xd(x.b), yd(n);
        yd.poison();
        bf16* y = in_place ? xd.p : yd.p;
        const double theta = 10000.0;
        if (bwd) cuda::rope_backward(y, xd.p, s.B, s.T, s.H, s.Dh, theta);
        else cuda::rope_forward(y, xd.p, s.B, s.T, s.H, s.Dh, theta);
        std::vector<double> ref(n);
        if (bwd) cpu::rope_backward<double>(ref.data(), x.d.data(), s.B, s.T, s.H, s.Dh, theta);
        else cpu::rope_forward<double>(ref.data(), x.d.data(), s.B, s.T, s.H, s.Dh, theta);
        // One bf16 rounding; cos/sin rounded to float (2^-24) and fp32 products: ≤ 1e-6·(|x1|+|x2|).
        const int64_t half = s.Dh / 2;
        check_close("rope " + shape, in_place ? got_d(xd) : got_d(yd), ref, [&](size_t i) {
          const size_t base = i - i % size_t(s.Dh), k = (i % size_t(s.Dh)) % size_t(half);
          return kBf16Half * std::fabs(ref[i]) + 1e-6 * (std::fabs(x.d[base + k]) + std::fabs(x.d[base + k + half]));
        });
      }
}

// Packed q/k/v (one GEMM's output): the same bits as rope_forward / rope_backward on the unpacked
// tensors (the same kernel with strided rows) and an exact copy of v.
TEST(GpuOps, RopePackedQkvMatchesUnpacked) {
  REQUIRE_GPU();
  struct S {
    int64_t B, T, H, Hkv, Dh;
  };
  for (S s : {S{1, 3, 2, 1, 6}, S{2, 33, 4, 2, 64}, S{2, 64, 6, 3, 128}, S{1, 5, 1, 1, 32}}) {
    const std::string shape = fmt::format("B={} T={} H={} Hkv={} Dh={}", s.B, s.T, s.H, s.Hkv, s.Dh);
    const int64_t N = s.B * s.T, W = (s.H + 2 * s.Hkv) * s.Dh, nq = N * s.H * s.Dh, nk = N * s.Hkv * s.Dh;
    const auto qkv = rand_bf(size_t(N * W), 150 + s.Dh + s.T);
    std::vector<bf16> q0(static_cast<size_t>(nq)), k0(static_cast<size_t>(nk)), v0(static_cast<size_t>(nk));
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < s.H * s.Dh; ++i) q0[size_t(n * s.H * s.Dh + i)] = qkv.b[size_t(n * W + i)];
      for (int64_t i = 0; i < s.Hkv * s.Dh; ++i) {
        k0[size_t(n * s.Hkv * s.Dh + i)] = qkv.b[size_t(n * W + s.H * s.Dh + i)];
        v0[size_t(n * s.Hkv * s.Dh + i)] = qkv.b[size_t(n * W + (s.H + s.Hkv) * s.Dh + i)];
      }
    }
    const double theta = 10000.0;
    Dev<bf16> pd(qkv.b), qd(static_cast<size_t>(nq)), kd(static_cast<size_t>(nk)), vd(static_cast<size_t>(nk)), q0d(q0),
        k0d(k0);
    qd.poison(), kd.poison(), vd.poison();
    cuda::rope_unpack_qkv(qd.p, kd.p, vd.p, pd.p, s.B, s.T, s.H, s.Hkv, s.Dh, theta);
    cuda::rope_forward(q0d.p, q0d.p, s.B, s.T, s.H, s.Dh, theta);
    cuda::rope_forward(k0d.p, k0d.p, s.B, s.T, s.Hkv, s.Dh, theta);
    check_bitwise("packed rope q " + shape, qd.down(), q0d.down());
    check_bitwise("packed rope k " + shape, kd.down(), k0d.down());
    check_bitwise("packed v " + shape, vd.down(), v0);
    // backward: dq = q, dk = k, dv = v as gradients, packed into dqkv
    Dev<bf16> dpd(static_cast<size_t>(N * W));
    dpd.poison();
    cuda::rope_pack_qkv_backward(dpd.p, qd.p, kd.p, vd.p, s.B, s.T, s.H, s.Hkv, s.Dh, theta);
    cuda::rope_backward(q0d.p, qd.p, s.B, s.T, s.H, s.Dh, theta);
    cuda::rope_backward(k0d.p, kd.p, s.B, s.T, s.Hkv, s.Dh, theta);
    const auto got = dpd.down(), gq = q0d.down(), gk = k0d.down(), gv = vd.down();
    std::vector<bf16> want(got.size());
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < s.H * s.Dh; ++i) want[size_t(n * W + i)] = gq[size_t(n * s.H * s.Dh + i)];
      for (int64_t i = 0; i < s.Hkv * s.Dh; ++i) {
        want[size_t(n * W + s.H * s.Dh + i)] = gk[size_t(n * s.Hkv * s.Dh + i)];
        want[size_t(n * W + (s.H + s.Hkv) * s.Dh + i)] = gv[size_t(n * s.Hkv * s.Dh + i)];
      }
    }
    check_bitwise("packed rope backward " + shape, got, want);
  }
}

// ---- SwiGLU -------------------------------------------------------------------------------------
// Packed gate/up rows ([rows, 2F]: g, then u): the same bits as the plain kernel on the halves.
TEST(GpuOps, SwigluPackedRowsMatchPlain) {
  REQUIRE_GPU();
  for (int64_t R : {1, 5, 33})
    for (int64_t F : {1, 7, 8, 96}) {
      const std::string shape = fmt::format("rows={} F={}", R, F);
      const size_t n = size_t(R * F);
      const auto gu = rand_bf(2 * n, 160 + n, -6, 6), dout = rand_bf(n, 161 + n);
      std::vector<bf16> g(n), u(n);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < F; ++c)
          g[size_t(r * F + c)] = gu.b[size_t(r * 2 * F + c)], u[size_t(r * F + c)] = gu.b[size_t(r * 2 * F + F + c)];
      Dev<bf16> gud(gu.b), gd(g), ud(u), od(n), o0(n), dod(dout.b), dgud(2 * n), dgd(n), dud(n);
      od.poison(), dgud.poison();
      cuda::swiglu_forward(od.p, gud.p, gud.p + F, R, F, 2 * F);
      cuda::swiglu_forward(o0.p, gd.p, ud.p, int64_t(n));
      check_bitwise("packed swiglu out " + shape, od.down(), o0.down());
      cuda::swiglu_backward(dgud.p, dgud.p + F, dod.p, gud.p, gud.p + F, R, F, 2 * F);
      cuda::swiglu_backward(dgd.p, dud.p, dod.p, gd.p, ud.p, int64_t(n));
      const auto got = dgud.down(), wg = dgd.down(), wu = dud.down();
      std::vector<bf16> want(2 * n);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < F; ++c)
          want[size_t(r * 2 * F + c)] = wg[size_t(r * F + c)], want[size_t(r * 2 * F + F + c)] = wu[size_t(r * F + c)];
      check_bitwise("packed swiglu backward " + shape, got, want);
    }
}

TEST(GpuOps, SwigluForwardBackward) {
  REQUIRE_GPU();
  for (size_t n : {size_t(1), size_t(7), size_t(8), size_t(1000), size_t(100003)})
    for (size_t off : {size_t(0), size_t(1)}) {
      const std::string shape = fmt::format("n={} offset={}", n, off);
      const auto g = rand_bf(n, 140 + n, -6, 6), u = rand_bf(n, 141 + n, -2, 2), dout = rand_bf(n, 142 + n);
      Dev<bf16> gd(g.b, off), ud(u.b, off), od(n, off), dod(dout.b, off), dgd(n, off), dud(n, off);
      od.poison();
      cuda::swiglu_forward(od.p, gd.p, ud.p, int64_t(n));
      std::vector<double> ro(n), rdg(n), rdu(n);
      cpu::swiglu_forward<double>(ro.data(), g.d.data(), u.d.data(), int64_t(n));
      cpu::swiglu_backward<double>(rdg.data(), rdu.data(), dout.d.data(), g.d.data(), u.d.data(), int64_t(n));
      // fp32 expf/division: ~1e-6 relative before the single bf16 rounding.
      check_bf16_rel("swiglu out " + shape, got_d(od), ro, 2e-6, 1e-30);
      dgd.poison();
      dud.poison();
      cuda::swiglu_backward(dgd.p, dud.p, dod.p, gd.p, ud.p, int64_t(n));
      // dg = dout·u·σ·(1 + g(1−σ)) has cancellation near g ≈ −1.28: scale the fp32 error by the terms.
      check_close("swiglu dg " + shape, got_d(dgd), rdg, [&](size_t i) {
        return kBf16Half * std::fabs(rdg[i]) + 1e-5 * std::fabs(dout.d[i] * u.d[i]) * (1 + std::fabs(g.d[i]));
      });
      check_bf16_rel("swiglu du " + shape, got_d(dud), rdu, 2e-6, 1e-30);
      // Aliasing allowed by the contract: out == g, then dg == g and du == u.
      cuda::swiglu_forward(gd.p, gd.p, ud.p, int64_t(n));
      check_bf16_rel("swiglu out aliasing g " + shape, got_d(gd), ro, 2e-6, 1e-30);
      gd.up(g.b);
      cuda::swiglu_backward(gd.p, ud.p, dod.p, gd.p, ud.p, int64_t(n));
      check_close("swiglu dg aliasing g " + shape, got_d(gd), rdg, [&](size_t i) {
        return kBf16Half * std::fabs(rdg[i]) + 1e-5 * std::fabs(dout.d[i] * u.d[i]) * (1 + std::fabs(g.d[i]));
      });
      check_bf16_rel("swiglu du aliasing u " + shape, got_d(ud), rdu, 2e-6, 1e-30);
    }
}

// ---- residual -----------------------------------------------------------------------------------
TEST(GpuOps, ResidualForwardBackward) {
  REQUIRE_GPU();
  for (int64_t rows : {1, 3, 257})
    for (int64_t D : {16, 96, 100, 768})
      for (int with_r = 0; with_r < 2; ++with_r) {
        const std::string shape = fmt::format("rows={} D={} r={}", rows, D, with_r);
        const size_t n = size_t(rows * D);
        const auto x = rand_bf(n, 150 + D), br = rand_bf(n, 151 + D), dout = rand_bf(n, 152 + D);
        const auto r = rand_bf(size_t(D), 153, 0.5, 1.5);
        const bf16* rp = nullptr;
        Dev<bf16> xd(x.b), bd(br.b), rd(r.b), od(n), dod(dout.b), dxd(n);
        if (with_r) rp = rd.p;
        std::vector<double> ro(n);
        cpu::residual_forward<double>(ro.data(), x.d.data(), with_r ? r.d.data() : nullptr, br.d.data(), rows, D);
        od.poison();
        cuda::residual_forward(od.p, xd.p, rp, bd.p, rows, D);
        // fp32 r·x + b (one fma-or-two roundings ≤ 2^-23 relative of the terms), then bf16 rounding.
        auto tol_fwd = [&](size_t i) {
          return kBf16Half * std::fabs(ro[i]) + 0x1p-22 * (std::fabs(x.d[i]) * 1.5 + std::fabs(br.d[i]));
        };
        check_close("residual out " + shape, got_d(od), ro, tol_fwd);
        cuda::residual_forward(xd.p, xd.p, rp, bd.p, rows, D);  // out aliases x
        check_close("residual out aliasing x " + shape, got_d(xd), ro, tol_fwd);
        xd.up(x.b);

        // Backward: dx overwrite (r·dout is one fp32 product, then a bf16 rounding), dr += (deterministic).
        const auto dr0 = rand_floats(size_t(D), 154);
        std::vector<double> rdx(n), rdr = to_d(dr0);
        cpu::residual_backward<double>(rdx.data(), with_r ? rdr.data() : nullptr, dout.d.data(), x.d.data(),
                                       with_r ? r.d.data() : nullptr, rows, D);
        Dev<float> dr(dr0);
        dxd.poison();
        cuda::residual_backward(dxd.p, with_r ? dr.p : nullptr, dod.p, xd.p, rp, rows, D);
        check_bf16_rel("residual dx " + shape, got_d(dxd), rdx, 1e-7, 1e-30);
        const auto g_dr = dr.down();
        if (with_r) {
          std::vector<double> amag(size_t(D), 0);
          for (size_t i = 0; i < n; ++i) amag[i % size_t(D)] += std::fabs(dout.d[i] * x.d[i]);
          // fp32 sums over row ranges, then fixed-order group sums: ≲ 1e-5 of Σ|terms|.
          check_close("residual dr " + shape, to_d(g_dr), rdr,
                      [&](size_t d) { return 1e-5 * (amag[d] + std::fabs(dr0[d])) + 1e-30; });
          dr.up(dr0);
          cuda::residual_backward(dxd.p, dr.p, dod.p, xd.p, rp, rows, D);
          check_bitwise("residual dr rerun " + shape, dr.down(), g_dr);
          // dr without dx; then dx aliasing dout.
          dr.up(dr0);
          cuda::residual_backward(nullptr, dr.p, dod.p, xd.p, rp, rows, D);
          check_bitwise("residual dr without dx " + shape, dr.down(), g_dr);
          dr.up(dr0);
          cuda::residual_backward(dod.p, dr.p, dod.p, xd.p, rp, rows, D);
          check_bitwise("residual dr with dx aliasing dout " + shape, dr.down(), g_dr);
          check_bf16_rel("residual dx aliasing dout " + shape, got_d(dod), rdx, 1e-7, 1e-30);
        } else {
          check_bitwise("residual dr untouched without r " + shape, g_dr, dr0);
        }
      }
}

// ---- softmax cross-entropy ----------------------------------------------------------------------
TEST(GpuOps, SoftmaxXent) {
  REQUIRE_GPU();
  struct S {
    int64_t rows, V;
  };
  for (S s : {S{1, 8}, S{5, 100}, S{64, 1000}, S{7, 32768}, S{5, 50304}, S{3, 65544}, S{2, 262144}, S{4, 4097}})
    for (int mode = 0; mode < 3; ++mode) {  // 0: separate dlogits, 1: in place, 2: loss only
      const std::string shape = fmt::format("rows={} V={} mode={}", s.rows, s.V, mode);
      const size_t n = size_t(s.rows * s.V);
      const auto logits = rand_bf(n, 160 + s.V, -4, 4);
      std::vector<int32_t> tg(size_t(s.rows));
      Rng rng(hash64(161, uint64_t(s.V)));
      for (auto& t : tg) t = int32_t(rng.below(uint64_t(s.V)));
      if (s.rows > 1) tg[1] = -1;  // an ignored row
      tg[0] = int32_t(s.V - 1);    // the last column as a target
      const float gs = 1.f / float(s.rows);
      Dev<bf16> ld(logits.b), dl(n);
      Dev<int32_t> td(tg);
      Dev<float> loss(size_t(s.rows));
      loss.poison();
      dl.poison();
      bf16* dlp = mode == 0 ? dl.p : mode == 1 ? ld.p : nullptr;
      cuda::softmax_xent(loss.p, dlp, ld.p, td.p, s.rows, s.V, gs);
      std::vector<double> rl(size_t(s.rows)), rd(n);
      cpu::softmax_xent<double>(rl.data(), rd.data(), logits.d.data(), tg.data(), s.rows, s.V, double(gs));
      // loss: fp32 sum of V exps in serial runs of ≤ 256 terms per thread + a tree: ≤ ~270·2^-24
      // (1.6e-5) relative in the sum, i.e. absolute in lse; plus fp32 rounding of lse (~6e-8·|lse|).
      check_close("xent loss " + shape, got_d(loss), rl, [&](size_t i) { return 4e-5 + 1e-6 * std::fabs(rl[i]); });
      if (mode == 2) continue;
      // dlogits: p carries the lse error (~2e-5 relative), then one bf16 rounding.
      check_bf16_rel("xent dlogits " + shape, mode == 1 ? got_d(ld) : got_d(dl), rd, 3e-5, 1e-12);
    }
}

// ---- AdamW --------------------------------------------------------------------------------------
TEST(GpuOps, AdamwMultiTensor) {
  REQUIRE_GPU();
  // Segments with gaps, odd offsets and sizes, one longer than a kernel chunk, different wd.
  std::vector<cuda::AdamSegment> segs = {{0, 1000, 0.1f}, {1003, 5, 0.f}, {1009, 10001, 0.01f}, {11011, 1, 0.5f}};
  const size_t N = 11020;
  auto master0 = rand_floats(N, 170), g0 = rand_floats(N, 171, -0.1, 0.1), m0 = rand_floats(N, 172, -0.01, 0.01),
       v0 = rand_floats(N, 173, 0, 1e-3);
  Dev<float> master(master0, 0), g(g0), m(m0), v(v0);
  Dev<bf16> p(N);
  p.poison();
  std::vector<float> rmaster = master0, rm = m0, rv = v0;
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, gscale = 0.7f;
  for (int step = 1; step <= 3; ++step) {
    if (step == 3) segs[1].weight_decay = 0.2f;  // same host array, changed in place: must be re-read
    const float bc1 = float(1 - std::pow(double(b1), step)), bc2 = float(1 - std::pow(double(b2), step));
    cuda::adamw_step(master.p, p.p, g.p, m.p, v.p, segs.data(), int(segs.size()), lr, b1, b2, eps, bc1, bc2, gscale);
    for (const auto& sg : segs) {
      std::vector<float> gs(size_t(sg.n));
      for (int64_t i = 0; i < sg.n; ++i) gs[size_t(i)] = g0[size_t(sg.offset + i)] * gscale;
      cpu::adamw_step<float>(rmaster.data() + sg.offset, gs.data(), rm.data() + sg.offset, rv.data() + sg.offset,
                             sg.n, lr, b1, b2, eps, sg.weight_decay, bc1, bc2);
    }
  }
  const auto gm = master.down(), gmm = m.down(), gv = v.down();
  const auto gp = p.down();
  std::vector<bool> inside(N, false);
  for (const auto& sg : segs)
    for (int64_t i = 0; i < sg.n; ++i) inside[size_t(sg.offset + i)] = true;
  size_t bad = 0;
  std::string first;
  for (size_t i = 0; i < N; ++i) {
    bool ok;
    if (inside[i]) {
      // Same fp32 formula as the reference; FMA contraction may differ: a few fp32 ulps of each
      // quantity (the update is ~lr, so 1e-6·|p| + 1e-9 covers it).
      ok = std::fabs(gm[i] - rmaster[i]) <= 1e-6 * std::fabs(rmaster[i]) + 1e-9 &&
           std::fabs(gmm[i] - rm[i]) <= 1e-6 * std::fabs(rm[i]) + 1e-12 &&
           std::fabs(gv[i] - rv[i]) <= 1e-6 * std::fabs(rv[i]) + 1e-15 &&
           gp[i].bits == to_bf16(gm[i]).bits;  // p is exactly the rounded master
    } else {
      // Gaps are not touched (p keeps its NaN poison).
      ok = gm[i] == master0[i] && gmm[i] == m0[i] && gv[i] == v0[i] && gp[i].bits == 0x7fc0;
    }
    if (!ok) {
      if (bad < 8)
        first += fmt::format("\n  [{}] inside={} master {} vs {}, m {} vs {}, v {} vs {}, p {:#x}", i, bool(inside[i]),
                             gm[i], rmaster[i], gmm[i], rm[i], gv[i], rv[i], gp[i].bits);
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << "adamw: " << bad << " of " << N << " elements wrong" << first;
}

// ---- MLA's operands (rope_unpack_mla / rope_pack_mla_backward) -----------------------------------
// Against the CPU reference in double on the same bf16 inputs (uniform in [-1, 1)). Copies (k's and
// kv's nope dims, v) are exact. Rotated values: one bf16 rounding of an fp32 rotation with cos/sin
// rounded to float, ≤ 2^-24·(|x1| + |x2|) ≤ 2^-23 before the rounding, so 2^-8·|ref| + 1e-6. The
// rotary key's gradient sums H bf16 values in fp32 first: ≤ H·2^-24·Σ|terms| more, bounded by
// 1e-6·Σ_h (|x1| + |x2|) for H ≤ 16. In-place q (q = qp) and dq (dqp = dq) give the out-of-place bits,
// and a rerun the same bits. The paper's shape (nope 128, rope 64, v 128) takes the vector path; the
// odd ones the scalar path.
TEST(GpuOps, RopeMlaMatchesCpu) {
  REQUIRE_GPU();
  struct S {
    int64_t B, T, H, nope, R, Dv;
  };
  for (S s : {S{2, 64, 6, 128, 64, 128}, S{1, 5, 3, 6, 4, 2}, S{2, 33, 2, 16, 16, 8}}) {
    const std::string shape = fmt::format("B={} T={} H={} nope={} R={} Dv={}", s.B, s.T, s.H, s.nope, s.R, s.Dv);
    const int64_t N = s.B * s.T, Dqk = s.nope + s.R, half = s.R / 2;
    const size_t nq = size_t(N * s.H * Dqk), nkv = size_t(N * s.H * (s.nope + s.Dv)), nr = size_t(N * s.R),
                 nv = size_t(N * s.H * s.Dv);
    const double theta = 10000.0;
    const auto qp = rand_bf(nq, 170 + s.T), kv = rand_bf(nkv, 171 + s.T), kr = rand_bf(nr, 172 + s.T);
    Dev<bf16> qpd(qp.b), kvd(kv.b), krd(kr.b), qd(nq), kd(nq), vd(nv);
    qd.poison(), kd.poison(), vd.poison();
    cuda::rope_unpack_mla(qd.p, kd.p, vd.p, qpd.p, kvd.p, krd.p, s.B, s.T, s.H, s.nope, s.R, s.Dv, theta);
    std::vector<double> rq(nq), rk(nq), rv(nv);
    cpu::rope_unpack_mla<double>(rq.data(), rk.data(), rv.data(), qp.d.data(), kv.d.data(), kr.d.data(), s.B, s.T,
                                 s.H, s.nope, s.R, s.Dv, theta);
    auto rotated = [&](const std::vector<double>& ref) {
      return [&ref](size_t i) { return kBf16Half * std::fabs(ref[i]) + 1e-6; };
    };
    check_close("mla q " + shape, got_d(qd), rq, rotated(rq));
    check_close("mla k " + shape, got_d(kd), rk, rotated(rk));
    check_close("mla v " + shape, got_d(vd), rv, [](size_t) { return 0.0; });
    Dev<bf16> qin(qp.b), k2(nq), v2(nv);
    cuda::rope_unpack_mla(qin.p, k2.p, v2.p, qin.p, kvd.p, krd.p, s.B, s.T, s.H, s.nope, s.R, s.Dv, theta);
    check_bitwise("mla q in place " + shape, qin.down(), qd.down());
    check_bitwise("mla k rerun " + shape, k2.down(), kd.down());

    // backward, from fresh gradients
    const auto dq = rand_bf(nq, 173 + s.T), dk = rand_bf(nq, 174 + s.T), dv = rand_bf(nv, 175 + s.T);
    Dev<bf16> dqd(dq.b), dkd(dk.b), dvd(dv.b), dqpd(nq), dkvd(nkv), dkrd(nr);
    dqpd.poison(), dkvd.poison(), dkrd.poison();
    cuda::rope_pack_mla_backward(dqpd.p, dkvd.p, dkrd.p, dqd.p, dkd.p, dvd.p, s.B, s.T, s.H, s.nope, s.R, s.Dv, theta);
    std::vector<double> rdqp(nq), rdkv(nkv), rdkr(nr);
    cpu::rope_pack_mla_backward<double>(rdqp.data(), rdkv.data(), rdkr.data(), dq.d.data(), dk.d.data(), dv.d.data(),
                                        s.B, s.T, s.H, s.nope, s.R, s.Dv, theta);
    check_close("mla dqp " + shape, got_d(dqpd), rdqp, rotated(rdqp));
    check_close("mla dkv " + shape, got_d(dkvd), rdkv, [](size_t) { return 0.0; });
    std::vector<double> terms(nr, 0.0);  // Σ_h |dk| over the pair an element of dkr is rotated from
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < s.R; ++i)
        for (int64_t h = 0; h < s.H; ++h) {
          const double* row = dk.d.data() + (n * s.H + h) * Dqk + s.nope;
          terms[size_t(n * s.R + i)] += std::fabs(row[i % half]) + std::fabs(row[i % half + half]);
        }
    check_close("mla dkr " + shape, got_d(dkrd), rdkr,
                [&](size_t i) { return kBf16Half * std::fabs(rdkr[i]) + 1e-6 * terms[i]; });
    Dev<bf16> dqin(dq.b), dkv2(nkv), dkr2(nr);
    cuda::rope_pack_mla_backward(dqin.p, dkv2.p, dkr2.p, dqin.p, dkd.p, dvd.p, s.B, s.T, s.H, s.nope, s.R, s.Dv, theta);
    check_bitwise("mla dqp in place " + shape, dqin.down(), dqpd.down());
    check_bitwise("mla dkr rerun " + shape, dkr2.down(), dkrd.down());
  }
}

#endif  // DMAT_WITH_CUDA

}  // namespace
}  // namespace dmat
