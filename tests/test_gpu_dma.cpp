// CUDA DMA kernels (kernels/cuda/dma.h) against the CPU reference (kernels/cpu/cpu_ops.h):
//  - key bias forward / backward vs cpu::dma_bias_* in fp64 on the same bf16 inputs, both bias
//    forms, vector and scalar paths, huge |z| (overflow-safe softplus); tolerances derived below;
//    the backward's bits identical run to run;
//  - thresholds bit-identical to cpu::dma_thresholds on adversarial biases (ties, all equal,
//    increasing, decreasing, random, ±0, ±inf; T below / equal / above w; w = 1; a T large enough
//    for the bitset to leave shared memory); NaN rows give NaN;
//  - gathered key lists equal to a brute-force construction, truncation and max_count;
//  - the DMA attention ops (forward, sparse backward with dbias) against the CPU reference over
//    T below / equal / above w, GQA 1, 2, 4, head dims 32, 64, 128 and adversarial biases, bitwise
//    repeatable; the key groups of the backward against a brute-force cover.
// Label gpu (file name); every test skips where no CUDA device is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "kernels/cuda/device_info.h"

#ifdef DMAT_WITH_CUDA
#include "core/bf16.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/dma.h"
#include "kernels/cuda/flash_attention.h"
#include "test_gpu_util.h"
#endif

namespace dmat {
namespace {

#define REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

#ifndef DMAT_WITH_CUDA
TEST(GpuDma, NeedsCudaBuild) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  GTEST_SKIP() << "built without the CUDA backend (DMAT_CUDA=OFF)";
}
#else

using cpu::DmaBiasForm;
using test::BfInput;
using test::check_close;
using test::Dev;
using test::kNaN;
using test::to_d;
constexpr double kU32 = 1.0 / (1 << 24);  // fp32 unit roundoff

// This suite's input streams: bf16 seeds salted with 0xd3a, float seeds with 0xf32, as when the
// tolerances below were set.
BfInput rand_bf(size_t n, uint64_t seed, double lo, double hi) {
  return test::uniform_bf(n, hash64(seed, 0xd3a), lo, hi);
}
std::vector<float> rand_f(size_t n, uint64_t seed, double lo, double hi) {
  return test::uniform_floats(n, hash64(seed, 0xf32), lo, hi);
}

double sp(double z) { return std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }

// ---- bias forward / backward ------------------------------------------------------------------------
struct BiasCase {
  int64_t B, T, Hkv, Dh;
  double vscale, ascale;  // v, W_dt in ±vscale; A in ±ascale
  size_t offset;          // element offset of v (1: unaligned, the scalar path)
};
const BiasCase kBiasCases[] = {
    {2, 37, 3, 64, 1.0, 1.5, 0},   // C = 192: 8-wide loads
    {1, 50, 2, 12, 1.0, 1.5, 1},   // C = 24, v unaligned: scalar path
    {1, 17, 1, 5, 1.0, 1.5, 0},    // C = 5: scalar path
    {1, 33, 4, 32, 8.0, 0.02, 0},  // |z| in the hundreds: softplus must not overflow; exp form stays finite
    {3, 129, 2, 128, 0.5, 3.0, 0},
};

TEST(GpuDma, BiasForwardMatchesCpu) {
  REQUIRE_GPU();
  uint64_t seed = 100;
  for (const BiasCase& c : kBiasCases)
    for (DmaBiasForm form : {DmaBiasForm::Exp, DmaBiasForm::Linear}) {
      const int64_t C = c.Hkv * c.Dh, nkey = c.B * c.Hkv * c.T;
      const BfInput v = rand_bf(size_t(c.B * c.T * C), ++seed, -c.vscale, c.vscale);
      const BfInput w = rand_bf(size_t(c.Hkv * C), ++seed, -c.vscale, c.vscale);
      const BfInput A = rand_bf(size_t(c.Hkv), ++seed, -c.ascale, c.ascale);
      std::vector<double> z(static_cast<size_t>(nkey)), bias(static_cast<size_t>(nkey));
      cpu::dma_bias_forward<double>(z.data(), bias.data(), v.d.data(), w.d.data(), A.d.data(), c.B, c.T, c.Hkv, c.Dh,
                                    form);
      // Σ_c |v·w| per (b, h, t): the scale of fp32 accumulation error in z.
      std::vector<double> zabs(static_cast<size_t>(nkey));
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t h = 0; h < c.Hkv; ++h) {
            double s = 0;
            for (int64_t k = 0; k < C; ++k) s += std::fabs(v.d[size_t((b * c.T + t) * C + k)] * w.d[size_t(h * C + k)]);
            zabs[size_t((b * c.Hkv + h) * c.T + t)] = s;
          }
      Dev<bf16> dv(v.b, c.offset), dw(w.b), dA(A.b);
      Dev<float> dz(static_cast<size_t>(nkey)), db(static_cast<size_t>(nkey));
      dz.up(std::vector<float>(size_t(nkey), kNaN));
      db.up(std::vector<float>(size_t(nkey), kNaN));
      cuda::dma_bias_forward(dz.p, db.p, dv.p, dw.p, dA.p, c.B, c.T, c.Hkv, c.Dh, form);
      const std::string what = fmt::format("B{} T{} Hkv{} Dh{} {}", c.B, c.T, c.Hkv, c.Dh,
                                           form == DmaBiasForm::Exp ? "exp" : "linear");
      // z: C fp32 fmas in some order: |err| ≤ C·u·Σ|v·w| (the γ_C bound), plus a denormal floor.
      auto tol_z = [&](size_t i) { return double(C) * kU32 * zabs[i] + 1e-30; };
      check_close(what + " z", to_d(dz.down()), z, tol_z);
      // bias: a = A·softplus(z) inherits |A|·tol_z (softplus' ≤ 1) plus a few ulps of softplus and
      // the product (≤ 6u·|a| with log1pf ≤ 1 ulp, expf ≤ 2 ulp; 8u allowed); exp form: relative error
  // |Δa| + 2u more (expf).
      auto tol_b = [&](size_t i) {
        const int64_t h = int64_t(i / size_t(c.T)) % c.Hkv;
        const double a = A.d[size_t(h)] * sp(z[i]);
        const double da = std::fabs(A.d[size_t(h)]) * tol_z(i) + 8 * kU32 * (std::fabs(a) + 1e-30) + 1e-37;
        return form == DmaBiasForm::Exp ? std::fabs(bias[i]) * (da + 2 * kU32) * 1.0001 : da;
      };
      check_close(what + " bias", to_d(db.down()), bias, tol_b);
    }
}

TEST(GpuDma, BiasBackwardMatchesCpuAndIsDeterministic) {
  REQUIRE_GPU();
  uint64_t seed = 200;
  for (const BiasCase& c : kBiasCases)
    for (DmaBiasForm form : {DmaBiasForm::Exp, DmaBiasForm::Linear}) {
      const int64_t C = c.Hkv * c.Dh, nkey = c.B * c.Hkv * c.T, rows = c.B * c.T;
      const BfInput v = rand_bf(size_t(rows * C), ++seed, -c.vscale, c.vscale);
      const BfInput w = rand_bf(size_t(c.Hkv * C), ++seed, -c.vscale, c.vscale);
      const BfInput A = rand_bf(size_t(c.Hkv), ++seed, -c.ascale, c.ascale);
      // z and bias as a forward would save them (fp32), shared bit for bit by GPU and reference.
      std::vector<double> zd(static_cast<size_t>(nkey)), bd(static_cast<size_t>(nkey));
      cpu::dma_bias_forward<double>(zd.data(), bd.data(), v.d.data(), w.d.data(), A.d.data(), c.B, c.T, c.Hkv, c.Dh,
                                    form);
      std::vector<float> zf(zd.begin(), zd.end()), bf_(bd.begin(), bd.end());
      const std::vector<float> dbias = rand_f(size_t(nkey), ++seed, -1, 1);
      const BfInput dv0 = rand_bf(size_t(rows * C), ++seed, -1, 1);
      const std::vector<float> dw0 = rand_f(size_t(c.Hkv * C), ++seed, -1, 1), dA0 = rand_f(size_t(c.Hkv), ++seed, -1, 1);

      std::vector<double> dv = dv0.d, dw = to_d(dw0), dA = to_d(dA0);
      const std::vector<double> z = to_d(zf), bias = to_d(bf_), dbd = to_d(dbias);
      cpu::dma_bias_backward<double>(dv.data(), dw.data(), dA.data(), dbd.data(), z.data(), bias.data(), v.d.data(),
                                     w.d.data(), A.d.data(), c.B, c.T, c.Hkv, c.Dh, form);
      // |dz| per key, for the error scales (dz = da·A·sigmoid(z), da = dbias·bias or dbias).
      std::vector<double> dz(static_cast<size_t>(nkey)), dterm(static_cast<size_t>(nkey));
      for (int64_t x = 0; x < nkey; ++x) {
        const int64_t h = (x / c.T) % c.Hkv;
        const double da = form == DmaBiasForm::Exp ? dbd[size_t(x)] * bias[size_t(x)] : dbd[size_t(x)];
        dz[size_t(x)] = da * A.d[size_t(h)] / (1 + std::exp(-z[size_t(x)]));
        dterm[size_t(x)] = da * sp(z[size_t(x)]);
      }

      Dev<bf16> gv(v.b, c.offset), gw(w.b), gA(A.b), gdv(dv0.b);
      Dev<float> gz(zf), gb(bf_), gdb(dbias), gdw(dw0), gdA(dA0);
      cuda::dma_bias_backward(gdv.p, gdw.p, gdA.p, gdb.p, gz.p, gb.p, gv.p, gw.p, gA.p, c.B, c.T, c.Hkv, c.Dh, form);
      const std::vector<bf16> got_dv = gdv.down();
      const std::vector<float> got_dw = gdw.down(), got_dA = gdA.down();
      const std::string what = fmt::format("B{} T{} Hkv{} Dh{} {}", c.B, c.T, c.Hkv, c.Dh,
                                           form == DmaBiasForm::Exp ? "exp" : "linear");

      // Each per-term product carries ≤ ~8u of relative error (da, ·A, sigmoid's expf and division,
      // softplus); a sum of n terms adds ≤ n·u·Σ|terms| (every addition, in any tree order); the
      // final += one rounding of the result. Allowed: (n + 16)·u·Σ|terms| + 2u·|result|.
      // dv: then one bf16 rounding of the result (2^-8 relative, the bf16 half-ulp ×2 for safety).
      auto tol_dv = [&](size_t e) {
        const int64_t r = int64_t(e) / C, k = int64_t(e) % C, b = r / c.T, t = r % c.T;
        double s = 0;
        for (int64_t h = 0; h < c.Hkv; ++h)
          s += std::fabs(dz[size_t((b * c.Hkv + h) * c.T + t)] * w.d[size_t(h * C + k)]);
        return (double(c.Hkv) + 16) * kU32 * s + std::fabs(dv[e]) / 128 + 1e-30;
      };
      check_close(what + " dv", to_d(got_dv), dv, tol_dv);
      auto tol_dw = [&](size_t e) {
        const int64_t h = int64_t(e) / C, k = int64_t(e) % C;
        double s = 0;
        for (int64_t r = 0; r < rows; ++r)
          s += std::fabs(dz[size_t(((r / c.T) * c.Hkv + h) * c.T + r % c.T)] * v.d[size_t(r * C + k)]);
        return (double(rows) + 16) * kU32 * s + 2 * kU32 * std::fabs(dw[e]) + 1e-30;
      };
      check_close(what + " dW_dt", to_d(got_dw), dw, tol_dw);
      auto tol_dA = [&](size_t h) {
        double s = 0;
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t t = 0; t < c.T; ++t) s += std::fabs(dterm[size_t((b * c.Hkv + int64_t(h)) * c.T + t)]);
        return (double(rows) + 16) * kU32 * s + 2 * kU32 * std::fabs(dA[h]) + 1e-30;
      };
      check_close(what + " dA", to_d(got_dA), dA, tol_dA);

      // Deterministic: the same call from the same state gives the same bits.
      gdv.up(dv0.b), gdw.up(dw0), gdA.up(dA0);
      cuda::dma_bias_backward(gdv.p, gdw.p, gdA.p, gdb.p, gz.p, gb.p, gv.p, gw.p, gA.p, c.B, c.T, c.Hkv, c.Dh, form);
      const std::vector<bf16> dv2 = gdv.down();
      const std::vector<float> dw2 = gdw.down(), dA2 = gdA.down();
      EXPECT_EQ(0, std::memcmp(dv2.data(), got_dv.data(), dv2.size() * sizeof(bf16))) << what << " dv bits";
      EXPECT_EQ(0, std::memcmp(dw2.data(), got_dw.data(), dw2.size() * sizeof(float))) << what << " dW bits";
      EXPECT_EQ(0, std::memcmp(dA2.data(), got_dA.data(), dA2.size() * sizeof(float))) << what << " dA bits";
    }
}

// ---- thresholds ----------------------------------------------------------------------------------------
enum class Pattern { Random, Ties, AllEqual, Increasing, Decreasing, SignedZerosAndInf, Huge, Tiny };
const char* name(Pattern p) {
  switch (p) {
    case Pattern::Random: return "random";
    case Pattern::Ties: return "ties";
    case Pattern::AllEqual: return "all-equal";
    case Pattern::Increasing: return "increasing";
    case Pattern::Decreasing: return "decreasing";
    case Pattern::SignedZerosAndInf: return "zeros-inf";
    case Pattern::Huge: return "huge";
    case Pattern::Tiny: return "tiny";
  }
  return "?";
}
std::vector<float> make_bias(Pattern p, int64_t rows, int64_t T, uint64_t seed) {
  Rng r(hash64(seed, 0xb1a5));
  std::vector<float> b(static_cast<size_t>(rows * T));
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < T; ++j) {
      float& x = b[size_t(row * T + j)];
      switch (p) {
        case Pattern::Random: x = float(r.normal() * 3); break;
        case Pattern::Ties: x = float(r.below(4)) * 0.5f - 0.5f; break;  // {−0.5, 0, 0.5, 1}
        case Pattern::AllEqual: x = 1.0f; break;
        case Pattern::Increasing: x = float(j) * 0.25f - float(row); break;
        case Pattern::Decreasing: x = -float(j) * 0.25f + float(row); break;
        // huge / tiny A: the bias dominates the scores (±3000), or differs only in the 6th digit
        case Pattern::Huge: x = float(r.normal() * 1000); break;
        case Pattern::Tiny: x = 1.0f + float(r.normal() * 1e-6); break;
        case Pattern::SignedZerosAndInf: {
          const float v[] = {0.0f, -0.0f, INFINITY, -INFINITY, 1.0f, -1.0f};
          x = v[r.below(6)];
          break;
        }
      }
    }
  return b;
}
// Bit-identical, except that −0.0 and +0.0 are the same threshold (dma.h).
bool same_threshold(float a, float b) {
  if (a == 0.0f && b == 0.0f) return true;
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

// Every scan variant (dma.h), each against the CPU heap.
void check_thresholds(Pattern p, int64_t rows, int64_t T, int64_t w, uint64_t seed) {
  const std::vector<float> bias = make_bias(p, rows, T, seed);
  std::vector<float> want(bias.size());
  cpu::dma_thresholds<float>(want.data(), bias.data(), rows, T, w);
  Dev<float> gb(bias), gt(bias.size());
  // the bounds scan with each of its segment lengths (0: the default)
  const std::pair<cuda::DmaThresholdScan, int> runs[] = {
      {cuda::DmaThresholdScan::walk, 0},      {cuda::DmaThresholdScan::bounds, 0},
      {cuda::DmaThresholdScan::bounds, 128},  {cuda::DmaThresholdScan::bounds, 512},
      {cuda::DmaThresholdScan::serial, 0}};
  for (const auto& [scan, seg] : runs) {
    gt.up(std::vector<float>(bias.size(), kNaN));
    const int old_seg = cuda::testing::set_dma_thr_seg(seg ? seg : cuda::kernel_options().dma_thr_seg);
    cuda::dma_thresholds_scan(gt.p, gb.p, rows, T, w, scan);
    cuda::testing::set_dma_thr_seg(old_seg);
    const std::vector<float> got = gt.down();
    size_t bad = 0;
    std::string first;
    for (size_t i = 0; i < got.size(); ++i)
      if (!same_threshold(got[i], want[i])) {
        if (bad < 6) first += fmt::format("\n  row {} i {}: got {} want {}", i / size_t(T), i % size_t(T), got[i], want[i]);
        ++bad;
      }
    EXPECT_EQ(bad, 0u) << "scan " << int(scan) << " segment " << seg << " " << name(p) << " rows " << rows << " T " << T << " w " << w
                       << first;
  }
}

TEST(GpuDma, ThresholdsBitIdenticalToCpu) {
  REQUIRE_GPU();
  uint64_t seed = 300;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing,
                    Pattern::SignedZerosAndInf})
    for (int64_t T : {1, 2, 5, 31, 32, 33, 100, 1000, 2049, 5000})
      for (int64_t w : {int64_t(1), int64_t(2), int64_t(16), int64_t(100), T, T + 1, int64_t(4096)})
        check_thresholds(p, 3, T, w, ++seed);
}

TEST(GpuDma, ThresholdsLongRowsAndBitsetOutsideSharedMemory) {
  REQUIRE_GPU();
  // T = 2^21: the bitset (256 KiB) exceeds a block's shared memory, so it lives in global memory.
  check_thresholds(Pattern::Random, 1, int64_t(1) << 21, 2048, 401);
  check_thresholds(Pattern::Ties, 2, 70000, 1024, 402);
  check_thresholds(Pattern::Increasing, 2, 70000, 1024, 403);
  // 8 rows of 70000: two batches of rows (16 MiB of sort scratch each, dma.h)
  check_thresholds(Pattern::Random, 8, 70000, 1024, 404);
}

TEST(GpuDma, ThresholdsNaNRowGivesNaN) {
  REQUIRE_GPU();
  const int64_t rows = 3, T = 50;
  std::vector<float> bias = make_bias(Pattern::Random, rows, T, 500);
  bias[size_t(1 * T + 17)] = kNaN;
  Dev<float> gb(bias), gt(bias.size());
  for (const auto scan : {cuda::DmaThresholdScan::walk, cuda::DmaThresholdScan::bounds, cuda::DmaThresholdScan::serial}) {
    cuda::dma_thresholds_scan(gt.p, gb.p, rows, T, 8, scan);
    const std::vector<float> got = gt.down();
    std::vector<float> want(static_cast<size_t>(T));
    for (int64_t row : {0, 2}) {
      cpu::dma_thresholds<float>(want.data(), bias.data() + row * T, 1, T, 8);
      for (int64_t i = 0; i < T; ++i)
        EXPECT_TRUE(same_threshold(got[size_t(row * T + i)], want[size_t(i)])) << int(scan) << " " << row << " " << i;
    }
    for (int64_t i = 0; i < T; ++i) EXPECT_TRUE(std::isnan(got[size_t(T + i)])) << int(scan) << " " << i;
  }
}

// ---- gathered key lists --------------------------------------------------------------------------------
// partitioned: the lists with clean counts (dma_gather_keys' clean / work): each list's keys kept
// by every query of the tile first, then the others, each part in increasing j.
void check_gather(Pattern p, int64_t rows, int64_t T, int64_t w, int64_t capacity, uint64_t seed, bool partitioned) {
  const std::vector<float> bias = make_bias(p, rows, T, seed);
  std::vector<float> thr(bias.size());
  cpu::dma_thresholds<float>(thr.data(), bias.data(), rows, T, w);
  const int64_t bq = cuda::flash_attention_block_q(), tiles = cuda::dma_gather_tiles(T);
  ASSERT_EQ(tiles, (T + bq - 1) / bq);
  Dev<float> gb(bias), gt(thr);
  Dev<int32_t> keys(size_t(std::max<int64_t>(1, rows * tiles * capacity))), count(size_t(rows * tiles)), mx(1),
      clean(size_t(rows * tiles)), work(size_t(std::max<int64_t>(1, cuda::dma_gather_work_ints(rows, T, capacity, -1))));
  keys.up(std::vector<int32_t>(keys.n, -7));
  count.up(std::vector<int32_t>(count.n, -7));
  clean.up(std::vector<int32_t>(clean.n, -7));
  mx.up({0});
  int32_t* cl = partitioned ? clean.p : nullptr;
  int32_t* wk = partitioned ? work.p : nullptr;
  cuda::dma_gather_keys(keys.p, count.p, mx.p, capacity, gb.p, gt.p, rows, T, 0, -1, cl, wk);
  const std::vector<int32_t> got_keys = keys.down(), got_count = count.down(), got_max = mx.down(),
                             got_clean = clean.down();
  const std::string what =
      fmt::format("{} rows {} T {} w {} cap {} partitioned {}", name(p), rows, T, w, capacity, partitioned);
  int32_t want_max = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t qt = 0; qt < tiles; ++qt) {
      const int64_t i0 = qt * bq, i1 = std::min(i0 + bq, T), list = r * tiles + qt;
      const float* br = bias.data() + r * T;
      const float t0 = thr[size_t(r * T + i0)], tl = thr[size_t(r * T + i1 - 1)];
      std::vector<int32_t> want;
      for (int64_t j = 0; j < i1; ++j)
        if (br[j] >= t0) want.push_back(int32_t(j));
      // The design's fact: the list holds every key any query of the tile keeps.
      if (capacity == T) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j <= i; ++j) {
            if (br[j] >= thr[size_t(r * T + i)]) {
              ASSERT_TRUE(std::binary_search(want.begin(), want.end(), int32_t(j))) << what << " i " << i << " j " << j;
            }
          }
      }
      if (p == Pattern::Random || p == Pattern::Increasing || p == Pattern::Decreasing) {  // no ties
        EXPECT_LE(int64_t(want.size()), std::min(i1, w + bq - 1)) << what << " tile " << qt;
      }
      want_max = std::max(want_max, int32_t(want.size()));
      ASSERT_EQ(got_count[size_t(list)], int32_t(want.size())) << what << " tile " << qt;
      const bool fits = int64_t(want.size()) <= capacity;
      if (partitioned && fits) {
        std::vector<int32_t> all_keep, rest;
        for (int32_t j : want) (j < i0 && br[j] >= tl ? all_keep : rest).push_back(j);
        // every query of the tile keeps the clean keys (the kernels skip their element mask)
        for (int32_t j : all_keep)
          for (int64_t i = i0; i < i1; ++i) ASSERT_GE(br[j], thr[size_t(r * T + i)]) << what << " j " << j;
        ASSERT_EQ(got_clean[size_t(list)], int32_t(all_keep.size())) << what << " tile " << qt;
        want = all_keep;
        want.insert(want.end(), rest.begin(), rest.end());
      } else if (partitioned) {
        ASSERT_EQ(got_clean[size_t(list)], 0) << what << " overflowed tile " << qt;
      }
      // an overflowed partitioned list's slots are unspecified (the kernels never read them)
      const int64_t n = partitioned && !fits ? 0 : std::min<int64_t>(capacity, int64_t(want.size()));
      for (int64_t k = 0; k < n; ++k)
        ASSERT_EQ(got_keys[size_t(list * capacity + k)], want[size_t(k)]) << what << " tile " << qt << " slot " << k;
      if (fits)
        for (int64_t k = n; k < capacity; ++k)  // slots past the count are not written
          ASSERT_EQ(got_keys[size_t(list * capacity + k)], -7) << what << " tile " << qt << " slot " << k;
    }
  EXPECT_EQ(got_max[0], want_max) << what;
  // A batch of tiles (as the DMA ops build them): tiles t0 .. t0 + n − 1, laid out n per row,
  // equal to the same tiles of the full call.
  const int64_t t0 = tiles / 3, n = std::max<int64_t>(1, std::min(tiles - t0, (tiles + 1) / 2));
  Dev<int32_t> bkeys(size_t(std::max<int64_t>(1, rows * n * capacity))), bcount(size_t(rows * n)),
      bclean(size_t(rows * n));
  bkeys.up(std::vector<int32_t>(bkeys.n, -7));
  cuda::dma_gather_keys(bkeys.p, bcount.p, nullptr, capacity, gb.p, gt.p, rows, T, t0, n,
                        partitioned ? bclean.p : nullptr, wk);
  const std::vector<int32_t> bk = bkeys.down(), bc = bcount.down(), bcl = bclean.down();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t lt = 0; lt < n; ++lt) {
      const int64_t full = r * tiles + t0 + lt, part = r * n + lt;
      ASSERT_EQ(bc[size_t(part)], got_count[size_t(full)]) << what << " batch tile " << t0 + lt;
      if (partitioned) ASSERT_EQ(bcl[size_t(part)], got_clean[size_t(full)]) << what << " batch tile " << t0 + lt;
      if (partitioned && got_count[size_t(full)] > capacity) continue;
      for (int64_t k = 0; k < capacity; ++k)
        ASSERT_EQ(bk[size_t(part * capacity + k)], got_keys[size_t(full * capacity + k)])
            << what << " batch tile " << t0 + lt << " slot " << k;
    }
}

TEST(GpuDma, GatherListsMatchBruteForce) {
  REQUIRE_GPU();
  uint64_t seed = 600;
  for (Pattern p : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing})
    for (int64_t T : {1, 100, 128, 129, 700, 2000, 5000})  // 5000: 40 tiles, five segments of the update
      // chain; w = T: lists of up to 5000 keys, more than one round (4096) of the builder
      for (int64_t w : {int64_t(1), int64_t(16), int64_t(200), T}) {
        for (bool part : {false, true}) {
          check_gather(p, 2, T, w, T, ++seed, part);  // capacity T: never truncated
          check_gather(p, 2, T, w, std::min<int64_t>(T, w + cuda::flash_attention_block_q() - 1), ++seed, part);
          check_gather(p, 1, T, w, 3, ++seed, part);  // truncated lists: count still the true count
        }
      }
}

// ---- the DMA forward end to end: GPU thresholds -> GPU gather lists -> gathered flash forward with
// the per-query threshold (FlashGather::thr), against cpu::dma_attention_forward in fp64 ----------
// Tolerances as tests/test_gpu_attention.cpp (the same kernel; why there): inputs exact bf16, the
// GPU rounds P to bf16 and the result to bf16: ‖got − ref‖∞ ≤ 2e-2·‖ref‖∞, ‖·‖₂ ≤ 1e-2·‖ref‖₂,
// |Δlse| ≤ 2e-3. The mask is exact (the thresholds are bit-identical and compared as raw fp32), so
// any masking error shows as an O(1) difference.
double rel_max(const std::vector<double>& got, const std::vector<double>& ref, double* rel2) {
  double mx = 0, rmx = 1e-6, e2 = 0, r2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(got[i] - ref[i]);
    mx = std::isnan(got[i]) ? INFINITY : std::max(mx, d);
    rmx = std::max(rmx, std::fabs(ref[i]));
    e2 += d * d, r2 += ref[i] * ref[i];
  }
  *rel2 = std::sqrt(e2 / std::max(r2, 1e-30));
  return mx / rmx;
}

// One DMA attention case: shape, bf16 inputs (the GPU gets the bf16, the reference the same
// values in fp64), key biases of a pattern, their CPU thresholds, and the fp64 reference forward.
// Inputs are drawn in the order q, k, v, (dout), bias from ++seed.
struct DmaCase {
  cpu::AttnShape s;
  BfInput q, k, v, dout;
  std::vector<float> bias, thr;
  std::vector<double> bias_d, thr_d, out_ref, lse_ref;
  // local: DMA's local window L (s.window; the thresholds then cover the keys before it)
  DmaCase(int64_t D, int64_t group, Pattern pat, int64_t T, int64_t w, uint64_t& seed, bool with_dout,
          int64_t local = 0) {
    s.B = 2, s.T = T, s.Hkv = 2, s.H = 2 * group, s.Dqk = D, s.Dv = D, s.window = local;
    s.scale = 1.0 / std::sqrt(double(D));
    q = rand_bf(size_t(s.B * T * s.H * D), ++seed, -1, 1);
    k = rand_bf(size_t(s.B * T * s.Hkv * D), ++seed, -1, 1);
    v = rand_bf(size_t(s.B * T * s.Hkv * D), ++seed, -1, 1);
    if (with_dout) dout = rand_bf(size_t(s.B * T * s.H * D), ++seed, -1, 1);
    bias = make_bias(pat, s.B * s.Hkv, T, ++seed);
    thr.resize(bias.size());
    cpu::dma_thresholds<float>(thr.data(), bias.data(), s.B * s.Hkv, T, w, local);
    bias_d = to_d(bias), thr_d = to_d(thr);
    out_ref.resize(size_t(s.B * T * s.H * D)), lse_ref.resize(size_t(s.B * s.H * T));
    cpu::dma_attention_forward<double>(out_ref.data(), lse_ref.data(), q.d.data(), k.d.data(), v.d.data(),
                                       bias_d.data(), thr_d.data(), s);
  }
};

TEST(GpuDma, ForwardThroughGatheredFlashMatchesCpu) {
  REQUIRE_GPU();
  uint64_t seed = 900;
  const int64_t bq = cuda::flash_attention_block_q();
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
    for (int64_t D : {64, 128})
      for (int64_t group : {1, 2, 4})
        for (Pattern pat : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing})
          for (auto [T, w] : {std::pair<int64_t, int64_t>{50, 64}, {64, 64}, {300, 64}, {300, 1}, {2 * bq + 7, 100}}) {
            cpu::AttnShape probe;
            probe.Dqk = probe.Dv = D;
            if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(probe)) continue;
            const std::string what = fmt::format("path {} D {} group {} {} T {} w {}", int(path), D, group, name(pat), T, w);
            const DmaCase c(D, group, pat, T, w, seed, false);
            const cpu::AttnShape& s = c.s;
            const BfInput &q = c.q, &k = c.k, &v = c.v;
            const std::vector<float>& bias = c.bias;
            const std::vector<double> &out_ref = c.out_ref, &lse_ref = c.lse_ref;

            Dev<bf16> gq(q.b), gk(k.b), gv(v.b), gout(out_ref.size());
            Dev<float> gb(bias), gt(bias.size()), glse(lse_ref.size());
            cuda::dma_thresholds(gt.p, gb.p, s.B * s.Hkv, T, w);
            const int64_t tiles = cuda::dma_gather_tiles(T), cap = T;
            Dev<int32_t> keys(size_t(s.B * s.Hkv * tiles * cap)), count(size_t(s.B * s.Hkv * tiles));
            cuda::dma_gather_keys(keys.p, count.p, nullptr, cap, gb.p, gt.p, s.B * s.Hkv, T);
            cuda::FlashGather fg{keys.p, count.p, cap};
            fg.thr = gt.p;
            cuda::flash_attention_forward_path(gout.p, glse.p, gq.p, gk.p, gv.p, s, gb.p, &fg, path);
            double rel2 = 0;
            const double relmax = rel_max(to_d(gout.down()), out_ref, &rel2);
            EXPECT_LE(relmax, 2e-2) << what << " out max";
            EXPECT_LE(rel2, 1e-2) << what << " out L2";
            check_close(what + " lse", to_d(glse.down()), lse_ref, [](size_t) { return 2e-3; });
          }
}

// ---- the DMA ops end to end, forward and backward (cuda::dma_attention_forward / _backward: lists
// at their real capacity, so tied biases take the dense fallback; key groups; the sparse backward)
// against cpu::dma_attention_* in fp64 on the same bf16 inputs ---------------------------------------
// Tolerances as the dense flash attention's (tests/test_gpu_attention.cpp), for the same reasons:
// P and dS are rounded to bf16 for the tensor cores and dq/dk/dv to bf16 on output, delta comes
// from the bf16 output: ‖got − ref‖∞ ≤ 2e-2·‖ref‖∞ and relative L2 ≤ 1e-2. dbias (fp32 out) sums
// the same fp32 dS values as dk over the same queries without the q factor, so the same relative
// bounds apply. The mask is exact (thresholds bit-identical, raw fp32 comparisons), so a masking
// or selection error is an O(1) difference. Every output must repeat bit for bit.
// Cancellation: dS_ij = P_ij·(dP_ij − Δ_i) is ~0 wherever one key takes all of a query's weight
// (w = 1, huge biases), so dq, dk and dbias can be ~0 while their terms are not. Each term carries a
// relative error of ≲ 4e-3 (P through the GPU lse, |Δlse| ≤ 2e-3; Δ from the bf16 output, 2^-9
// of Σ|dO∘O|), so the errors are bounded by the size of the terms: with
// Q_i = Σ_j P_ij·(|dP_ij| + Σ_d|dO_id·O_id|) per query and M_j = Σ_i (the same) per key (over the
// group's heads),
//   dbias: |got − ref| ≤ 1e-2·M_j + 1e-9·max M, per key;
//   dq, dk: the max criterion relative to max(‖ref‖∞, scale·max Q·max|k|) resp. (…·max M·max|q|),
//   the L2 criterion only where ‖ref‖∞ is not below that floor.
struct TermSize {
  std::vector<double> M;  // per key [B, Hkv, T]
  double q_max = 0;       // max_i Q_i
};
TermSize term_size(const cpu::AttnShape& s, const BfInput& q, const BfInput& k, const BfInput& v, const BfInput& dout,
                   const std::vector<double>& out, const std::vector<double>& lse, const std::vector<float>& bias,
                   const std::vector<float>& thr) {
  const int64_t T = s.T, D = s.Dqk, group = s.H / s.Hkv;
  TermSize r;
  r.M.assign(bias.size(), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t hk = h / group, row = (b * s.Hkv + hk) * T;
      for (int64_t i = 0; i < T; ++i) {
        const double* qi = &q.d[size_t(((b * T + i) * s.H + h) * D)];
        const double* gi = &dout.d[size_t(((b * T + i) * s.H + h) * D)];
        const double* oi = &out[size_t(((b * T + i) * s.H + h) * D)];
        double delta = 0, Qi = 0;  // delta: Σ|dO∘O|, the size of Δ's terms (its rounding error scales with that)
        for (int64_t d = 0; d < D; ++d) delta += std::fabs(gi[d] * oi[d]);
        for (int64_t j = 0; j <= i; ++j) {
          // kept: the threshold rule, or inside DMA's local window (s.window)
          if (!(bias[size_t(row + j)] >= thr[size_t(row + i)]) && j <= i - s.window) continue;
          const double* kj = &k.d[size_t(((b * T + j) * s.Hkv + hk) * D)];
          const double* vj = &v.d[size_t(((b * T + j) * s.Hkv + hk) * D)];
          double qk = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) qk += qi[d] * kj[d], dp += gi[d] * vj[d];
          const double pij = std::exp(qk * s.scale + double(bias[size_t(row + j)]) - lse[size_t((b * s.H + h) * T + i)]);
          const double term = pij * (std::fabs(dp) + std::fabs(delta));
          r.M[size_t(row + j)] += term;
          Qi += term;
        }
        r.q_max = std::max(r.q_max, Qi);
      }
    }
  return r;
}
// Two host copies hold the same bits.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
double abs_max(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}
void expect_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                  double floor = 0) {
  double e2 = 0, r2 = 0, emax = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(got[i] - ref[i]);
    emax = std::isnan(got[i]) ? INFINITY : std::max(emax, d);
    e2 += d * d, r2 += ref[i] * ref[i];
  }
  const double rmax = abs_max(ref);
  EXPECT_LE(emax / std::max({rmax, floor, 1e-30}), 2e-2) << what << " max (ref max " << rmax << ", floor " << floor << ")";
  if (rmax >= floor) EXPECT_LE(std::sqrt(e2 / std::max(r2, 1e-300)), 1e-2) << what << " L2";
}

TEST(GpuDma, AttentionOpsForwardAndBackwardMatchCpu) {
  REQUIRE_GPU();
  uint64_t seed = 5000;
  const int64_t bq = cuda::flash_attention_block_q();
  int cases = 0;
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
  for (int64_t D : {32, 64, 128})
    for (int64_t group : {1, 2, 4})
      for (Pattern pat : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing,
                          Pattern::Huge, Pattern::Tiny})
        for (auto [T, w] : {std::pair<int64_t, int64_t>{50, 64}, {64, 64}, {300, 64}, {300, 1}, {2 * bq + 7, 100},
                            {1300, 200}}) {
          // every pattern at D = 64; fewer elsewhere (CPU reference time)
          const bool few = pat == Pattern::Random || pat == Pattern::Ties || pat == Pattern::Huge;
          if (D != 64 && (!few || group == 4)) continue;
          if (T == 1300 && (D != 64 || group == 4 || !few)) continue;  // two key-group regions
          cpu::AttnShape probe;
          probe.Dqk = probe.Dv = D;
          if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(probe)) continue;
          const std::string what =
              fmt::format("path {} D {} group {} {} T {} w {}", int(path), D, group, name(pat), T, w);
          const DmaCase c(D, group, pat, T, w, seed, true);
          const cpu::AttnShape& s = c.s;
          const BfInput &q = c.q, &k = c.k, &v = c.v, &dout = c.dout;
          const std::vector<float> &bias = c.bias, &thr = c.thr;
          const std::vector<double> &bias_d = c.bias_d, &thr_d = c.thr_d, &out_ref = c.out_ref, &lse_ref = c.lse_ref;
          std::vector<double> dq_ref(q.d.size()), dk_ref(k.d.size()), dv_ref(v.d.size()), db_ref(bias.size());
          cpu::dma_attention_backward<double>(dq_ref.data(), dk_ref.data(), dv_ref.data(), db_ref.data(),
                                              dout.d.data(), out_ref.data(), lse_ref.data(), q.d.data(), k.d.data(),
                                              v.d.data(), bias_d.data(), thr_d.data(), s);

          const TermSize ts = term_size(s, q, k, v, dout, out_ref, lse_ref, bias, thr);
          const double m_max = *std::max_element(ts.M.begin(), ts.M.end());
          // the modes of the ops: gathered (lists, key groups), dense (every causal pair, masked) and
          // auto (dense forward + gathered backward where w keeps half the causal pairs: T = 50, 64, 263)
          for (const int mode : {0, 1, -1}) {
            const int old_mode = cuda::testing::set_dma_dense(mode);
            const std::string wm = what + (mode == 1 ? " dense" : mode == 0 ? " gathered" : " auto");
            Dev<bf16> gq(q.b), gk(k.b), gv(v.b), gdo(dout.b), gout(out_ref.size());
            Dev<bf16> gdq(q.b.size()), gdk(k.b.size()), gdv(v.b.size());
            Dev<float> gb(bias), gt(bias.size()), glse(lse_ref.size()), gdb(bias.size());
            cuda::dma_thresholds(gt.p, gb.p, s.B * s.Hkv, T, w);
            cuda::dma_attention_forward(gout.p, glse.p, gq.p, gk.p, gv.p, gb.p, gt.p, s, w, path);
            expect_close(wm + " out", to_d(gout.down()), out_ref);
            check_close(wm + " lse", to_d(glse.down()), lse_ref, [](size_t) { return 2e-3; });
            cuda::dma_attention_backward(gdq.p, gdk.p, gdv.p, gdb.p, gdo.p, gout.p, glse.p, gq.p, gk.p, gv.p, gb.p,
                                         gt.p, s, w, path);
            const std::vector<bf16> dq1 = gdq.down(), dk1 = gdk.down(), dv1 = gdv.down();
            const std::vector<float> db1 = gdb.down();
            expect_close(wm + " dq", to_d(dq1), dq_ref, s.scale * ts.q_max * abs_max(k.d));
            expect_close(wm + " dk", to_d(dk1), dk_ref, s.scale * m_max * abs_max(q.d));
            expect_close(wm + " dv", to_d(dv1), dv_ref);
            check_close(wm + " dbias", to_d(db1), db_ref, [&](size_t x) { return 1e-2 * ts.M[x] + 1e-9 * m_max; });
            // again with every kernel on the compute stream (the first ran with the default side stream)
            const int old_side = cuda::testing::set_attention_side_stream(0);
            cuda::dma_attention_backward(gdq.p, gdk.p, gdv.p, gdb.p, gdo.p, gout.p, glse.p, gq.p, gk.p, gv.p, gb.p,
                                         gt.p, s, w, path);
            cuda::testing::set_attention_side_stream(old_side);
            EXPECT_TRUE(same_bits(gdq.down(), dq1) && same_bits(gdk.down(), dk1) && same_bits(gdv.down(), dv1) &&
                        same_bits(gdb.down(), db1))
                << wm << ": the backward is not bitwise repeatable (with and without the side stream)";
            if (T > bq && mode == 0) {
              // lists in batches of one query tile (as at long T): the same bits
              const std::vector<bf16> out1 = gout.down();
              const std::vector<float> lse1 = glse.down();
              // (and the side stream of the greatest priority)
              const int64_t old = cuda::testing::set_dma_list_budget(1);
              const int old_side1 = cuda::testing::set_attention_side_stream(1);
              cuda::dma_attention_forward(gout.p, glse.p, gq.p, gk.p, gv.p, gb.p, gt.p, s, w, path);
              cuda::dma_attention_backward(gdq.p, gdk.p, gdv.p, gdb.p, gdo.p, gout.p, glse.p, gq.p, gk.p, gv.p, gb.p,
                                           gt.p, s, w, path);
              cuda::testing::set_attention_side_stream(old_side1);
              cuda::testing::set_dma_list_budget(old);
              EXPECT_TRUE(same_bits(gout.down(), out1) && same_bits(glse.down(), lse1) && same_bits(gdq.down(), dq1) &&
                          same_bits(gdk.down(), dk1) && same_bits(gdv.down(), dv1) && same_bits(gdb.down(), db1))
                  << wm << ": lists built one tile per batch change the results";
            }
            cuda::testing::set_dma_dense(old_mode);
            if (HasFailure()) return;  // one case's report is enough to act on
          }
          ++cases;
        }
  std::cout << cases << " cases\n";
}

// DMA's local window (our extension; s.window = L): the thresholds shifted by L bit for bit, and the
// ops (dense in both directions: the lists know only the threshold rule) against the CPU reference
// with the tolerances of AttentionOpsForwardAndBackwardMatchCpu; L below w, above it, beyond T, and
// windows that end inside a query tile or a key tile. Every output repeats bit for bit.
TEST(GpuDma, LocalWindowOpsMatchCpu) {
  REQUIRE_GPU();
  uint64_t seed = 6000;
  const int64_t bq = cuda::flash_attention_block_q();
  int cases = 0;
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
    for (int64_t D : {64, 128})
      for (int64_t group : {1, 2})
        for (Pattern pat : {Pattern::Random, Pattern::Ties, Pattern::Increasing, Pattern::Decreasing, Pattern::Huge})
          for (auto [T, w, L] : {std::tuple<int64_t, int64_t, int64_t>{300, 32, 16}, {2 * bq + 7, 40, 64},
                                 {1300, 100, 100}, {64, 8, 200}, {257, 1, 5}}) {
            if (T == 1300 && (D != 64 || pat != Pattern::Random)) continue;  // CPU reference time
            cpu::AttnShape probe;
            probe.Dqk = probe.Dv = D;
            if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(probe)) continue;
            const std::string what =
                fmt::format("path {} D {} group {} {} T {} w {} L {}", int(path), D, group, name(pat), T, w, L);
            const DmaCase c(D, group, pat, T, w, seed, true, L);
            const cpu::AttnShape& s = c.s;
            const BfInput &q = c.q, &k = c.k, &v = c.v, &dout = c.dout;
            std::vector<double> dq_ref(q.d.size()), dk_ref(k.d.size()), dv_ref(v.d.size()), db_ref(c.bias.size());
            cpu::dma_attention_backward<double>(dq_ref.data(), dk_ref.data(), dv_ref.data(), db_ref.data(),
                                                dout.d.data(), c.out_ref.data(), c.lse_ref.data(), q.d.data(),
                                                k.d.data(), v.d.data(), c.bias_d.data(), c.thr_d.data(), s);
            const TermSize ts = term_size(s, q, k, v, dout, c.out_ref, c.lse_ref, c.bias, c.thr);
            const double m_max = *std::max_element(ts.M.begin(), ts.M.end());
            Dev<bf16> gq(q.b), gk(k.b), gv(v.b), gdo(dout.b), gout(c.out_ref.size());
            Dev<bf16> gdq(q.b.size()), gdk(k.b.size()), gdv(v.b.size());
            Dev<float> gb(c.bias), gt(c.bias.size()), glse(c.lse_ref.size()), gdb(c.bias.size());
            cuda::dma_thresholds(gt.p, gb.p, s.B * s.Hkv, T, w, L);
            const std::vector<float> thr_got = gt.down();
            ASSERT_EQ(std::memcmp(thr_got.data(), c.thr.data(), c.thr.size() * sizeof(float)), 0)
                << what << ": shifted thresholds differ from cpu::dma_thresholds";
            cuda::dma_attention_forward(gout.p, glse.p, gq.p, gk.p, gv.p, gb.p, gt.p, s, w, path);
            expect_close(what + " out", to_d(gout.down()), c.out_ref);
            check_close(what + " lse", to_d(glse.down()), c.lse_ref, [](size_t) { return 2e-3; });
            cuda::dma_attention_backward(gdq.p, gdk.p, gdv.p, gdb.p, gdo.p, gout.p, glse.p, gq.p, gk.p, gv.p, gb.p,
                                         gt.p, s, w, path);
            const std::vector<bf16> dq1 = gdq.down(), dk1 = gdk.down(), dv1 = gdv.down();
            const std::vector<float> db1 = gdb.down();
            expect_close(what + " dq", to_d(dq1), dq_ref, s.scale * ts.q_max * abs_max(k.d));
            expect_close(what + " dk", to_d(dk1), dk_ref, s.scale * m_max * abs_max(q.d));
            expect_close(what + " dv", to_d(dv1), dv_ref);
            check_close(what + " dbias", to_d(db1), db_ref, [&](size_t x) { return 1e-2 * ts.M[x] + 1e-9 * m_max; });
            cuda::dma_attention_backward(gdq.p, gdk.p, gdv.p, gdb.p, gdo.p, gout.p, glse.p, gq.p, gk.p, gv.p, gb.p,
                                         gt.p, s, w, path);
            EXPECT_TRUE(same_bits(gdq.down(), dq1) && same_bits(gdk.down(), dk1) && same_bits(gdv.down(), dv1) &&
                        same_bits(gdb.down(), db1))
                << what << ": the backward is not bitwise repeatable";
            if (HasFailure()) return;
            ++cases;
          }
  std::cout << cases << " cases\n";
}

// Key groups: every key of a row in exactly one group; each group's range covers exactly the queries
// that keep one of its kept keys (j .. last_j by brute force over thr); empty groups have none.
TEST(GpuDma, KeyGroupsPartitionTheKeysAndCoverTheirQueries) {
  REQUIRE_GPU();
  uint64_t seed = 7000;
  for (Pattern pat : {Pattern::Random, Pattern::Ties, Pattern::AllEqual, Pattern::Increasing, Pattern::Decreasing})
    for (auto [T, w] : {std::pair<int64_t, int64_t>{5, 3}, {300, 64}, {1024, 100}, {2500, 300}, {20000, 2048}}) {
      // T = 20000: regions of 4096 keys (dma_group_region_size); brute force is O(T²): two patterns
      if (T == 20000 && pat != Pattern::Random && pat != Pattern::Increasing) continue;
      const int64_t rows = 2, ng = cuda::dma_group_count(T), G = cuda::kFlashGroupKeys;
      const std::string what = fmt::format("{} T {} w {}", name(pat), T, w);
      const std::vector<float> bias = make_bias(pat, rows, T, ++seed);
      std::vector<float> thr(bias.size());
      cpu::dma_thresholds<float>(thr.data(), bias.data(), rows, T, w);
      Dev<float> gb(bias), gt(thr);
      Dev<int32_t> keys(size_t(rows * ng * G)), range(size_t(rows * ng * 2));
      cuda::dma_key_groups(keys.p, range.p, gb.p, gt.p, rows, T);
      const std::vector<int32_t> hk = keys.down(), hr = range.down();
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<int> seen(size_t(T), 0);
        for (int64_t g = 0; g < ng; ++g) {
          int lo = INT32_MAX, hi = -1;
          for (int64_t n = 0; n < G; ++n) {
            const int j = hk[size_t((r * ng + g) * G + n)];
            if (j < 0) continue;
            ASSERT_LT(j, T) << what;
            ++seen[size_t(j)];
            for (int64_t i = j; i < T; ++i)
              if (bias[size_t(r * T + j)] >= thr[size_t(r * T + i)]) lo = std::min(lo, int(i)), hi = std::max(hi, int(i));
          }
          const int glo = hr[size_t((r * ng + g) * 2)], ghi = hr[size_t((r * ng + g) * 2 + 1)];
          if (hi < 0) {
            EXPECT_LT(ghi, glo) << what << " row " << r << " group " << g << ": should be empty";
          } else {
            EXPECT_EQ(glo, lo) << what << " row " << r << " group " << g;
            EXPECT_EQ(ghi, hi) << what << " row " << r << " group " << g;
          }
        }
        for (int64_t j = 0; j < T; ++j) ASSERT_EQ(seen[size_t(j)], 1) << what << " row " << r << " key " << j;
      }
    }
}

#endif  // DMAT_WITH_CUDA

}  // namespace
}  // namespace dmat
