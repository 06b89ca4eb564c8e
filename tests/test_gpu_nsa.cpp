// Native Sparse Attention on the GPU (kernels/cuda/nsa.h) against the CPU reference
// (kernels/cpu/nsa_ops.h in fp64, on the same bf16 values), on fresh random inputs per run (the
// seed is printed with every failure):
//  - every op forward and backward: the compression MLP (two hidden widths), the compressed keys'
//    RoPE, the compressed attention (early queries: output exactly 0, lse −inf, no gradient), the
//    selected attention (on the CPU's selection and on random valid lists), the gates; outputs
//    poisoned first, parameter gradients accumulated onto nonzero values, backward bits repeatable;
//  - the selection identical to cpu::nsa_select<double> given the GPU's lse: random scores, exact
//    ties (identical compressed keys, zero queries), the importance batches shrunk to one tile;
//  - a tiny-nsa model trained 20 steps on the GPU tracks the CPU run, and a GPU run stopped and
//    resumed equals the uninterrupted one bit for bit (through the CLI).
// Shapes: GQA groups 1, 2, 3, 4, 8, 16, 64 (the limit: one query per tile), head dims 32, 64, 128,
// T with partial tiles, T = 1, T below l (no compressed block at all) and T = l (one), more than one
// 64-key tile of compressed keys, blockings with l = d, l' = d, l' not a multiple of 64 or of l.
//
// Tolerances (why), in the norm of the reference (test::compare: max error against the largest
// reference element, and relative L2):
//  - attention outputs and gradients (compressed and selected): 2e-2 / 1e-2 and |Δlse| <= 2e-3, the
//    flash kernels' (test_gpu_attention.cpp: P and dS rounded to bf16 before their products, 2^-9
//    relative each with random signs, plus the bf16 result; lse from fp32 sums). The NSA kernels run
//    the same loop with a different key set, so nothing adds to that argument.
//  - the compression MLP: hid carries the rounding of its input U = bf16(x + pos) (2^-9 relative per
//    element, averaged over l·D products) and its own (2^-9): 1e-2 / 5e-3; y, and every gradient,
//    two to four roundings along the path (silu(hid), y; d silu, dhid, U, dU in fp32 then dx):
//    2e-2 / 1e-2, as the attention gradients.
//  - RoPE: one rounding of the output (2^-9 of |x1|+|x2| at most, the table's floats equal): 5e-3 /
//    3e-3; the gates: the output's rounding: 5e-3 / 3e-3 (dz: an fp32 dot of bf16 products, then one
//    rounding).
// A wrong index, mask, scale or block mapping moves these by O(1), far beyond the tolerances.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda/device_info.h"
#include "test_util.h"

#ifdef DMAT_WITH_CUDA
#include "core/bf16.h"
#include "core/rng.h"
#include "kernels/cpu/nsa_ops.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/nsa.h"
#include "test_gpu_util.h"
#endif

namespace dmat {
namespace {

#define REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible"

#ifndef DMAT_WITH_CUDA
TEST(GpuNsa, NeedsCudaBuild) {
  REQUIRE_GPU();
  GTEST_SKIP() << "built without the CUDA backend (DMAT_CUDA=OFF)";
}
#else

using test::BfInput;
using test::compare;
using test::Dev;
using test::to_d;

constexpr double kAttnMax = 2e-2, kAttnL2 = 1e-2, kLseTol = 2e-3;

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

// A size as size_t (a function, so that `std::vector<double> v(sz(n))` declares a vector).
size_t sz(int64_t n) { return static_cast<size_t>(n); }

// bf16 values uniform in ±amp, and the same values as double.
BfInput rnd(int64_t n, uint64_t seed, double amp) { return test::uniform_bf(sz(n), hash64(seed, 0x45a), -amp, amp); }

struct Case {
  int64_t B, T, H, Hkv, D, l, d, lp, n, w;
};
// GQA groups 1 … 64 (3: a tile of 21 queries; 64: of one), T with partial tiles, T < l (no
// compressed block), T = l (one block, seen by the last query only), T = 1, l = d and l' = d (one
// stride per block), l' of 20 (blocks straddle 64-key tiles), n = 3 (no ranking) and n large
// enough for the ranking to choose, Nc > 64 (two key tiles of compressed keys).
const Case kCases[] = {
    {2, 700, 4, 2, 64, 32, 16, 64, 6, 64},   // the paper's blocking, 10 selection blocks
    {1, 300, 4, 1, 32, 8, 4, 16, 5, 32},     // group 4; l/d = 2, l'/d = 4; Nc = 74
    {1, 257, 2, 2, 128, 16, 16, 16, 4, 100}, // group 1, head dim 128; l = d = l'
    {2, 130, 6, 3, 64, 8, 4, 20, 3, 16},     // group 2, l' = 20, n = 3
    {1, 1000, 8, 1, 64, 32, 16, 64, 8, 512}, // group 8, the paper's (l, d, l', w)
    {1, 150, 3, 1, 32, 8, 4, 8, 4, 32},      // group 3
    {1, 20, 2, 1, 32, 32, 16, 64, 16, 8},    // T < l: no compressed block
    {2, 600, 32, 2, 128, 8, 8, 32, 6, 64},   // group 16 at head dim 128 (dK/dV in row chunks); Nc = 75
    {1, 70, 64, 1, 32, 8, 4, 16, 5, 16},     // group 64: one query per tile
    {1, 16, 4, 2, 64, 16, 8, 16, 3, 16},     // T = l = l': one compressed block, one selection block
    {1, 1, 2, 2, 32, 8, 4, 8, 3, 4},         // T = 1
};

NsaShape shape_of(const Case& c) {
  NsaShape s;
  s.B = c.B, s.T = c.T, s.H = c.H, s.Hkv = c.Hkv, s.D = c.D;
  s.scale = 1.0 / std::sqrt(double(c.D));
  s.cmp_block = c.l, s.cmp_stride = c.d, s.sel_block = c.lp, s.sel_count = c.n, s.window = c.w;
  return s;
}

std::string describe(const NsaShape& s, uint64_t seed) {
  std::ostringstream o;
  o << "B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " D=" << s.D << " l=" << s.cmp_block
    << " d=" << s.cmp_stride << " l'=" << s.sel_block << " n=" << s.sel_count << " seed=" << seed;
  return o.str();
}

template <class T>
std::vector<T> down(const Dev<T>& d) {
  cuda::synchronize();
  return d.down();
}

bool same_bits(const std::vector<bf16>& a, const std::vector<bf16>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].bits != b[i].bits) return false;
  return a.size() == b.size();
}

// ---- compression ------------------------------------------------------------------------------------------

TEST(GpuNsa, CompressionMatchesCpu) {
  REQUIRE_GPU();
  for (const Case& c : kCases)
    for (const int64_t F : {c.D, int64_t(40)}) {
      const NsaShape s = shape_of(c);
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s, seed) + " F=" + std::to_string(F));
      const int64_t Nc = s.n_cmp(), R = s.B * Nc * s.Hkv, K = s.cmp_block * s.D, nx = s.B * s.T * s.Hkv * s.D;
      // weights scaled so that hid and y are O(1): U·W1ᵀ sums l·D products of O(1) values
      const BfInput x = rnd(nx, seed, 1.0), pos = rnd(K, seed + 1, 0.5),
                    w1 = rnd(F * K, seed + 2, std::sqrt(3.0 / double(K))),
                    w2 = rnd(s.D * F, seed + 3, std::sqrt(3.0 / double(F))), dy = rnd(R * s.D, seed + 4, 1.0);
      std::vector<double> y_ref(sz(R * s.D)), hid_ref(sz(R * F));
      cpu::nsa_compress_forward<double>(y_ref.data(), hid_ref.data(), x.d.data(), pos.d.data(), w1.d.data(),
                                        w2.d.data(), F, s);
      Dev<bf16> gx(x.b), gpos(pos.b), gw1(w1.b), gw2(w2.b), gdy(dy.b), gy(sz(R * s.D)), ghid(sz(R * F)),
          gdx(sz(nx));
      gy.poison(), ghid.poison();
      cuda::nsa_compress_forward(gy.p, ghid.p, gx.p, gpos.p, gw1.p, gw2.p, F, s);
      const std::vector<bf16> hid = down(ghid);
      std::string err = compare("hid", to_d(hid), hid_ref, 1e-2, 5e-3) +
                        compare("y", to_d(down(gy)), y_ref, kAttnMax, kAttnL2);
      EXPECT_TRUE(err.empty()) << "forward: " << err;

      // backward from the GPU's hid (both sides recompute silu(hid) from the same values); the
      // parameter gradients accumulate onto nonzero values, compared as increments
      const std::vector<float> pos0 = test::uniform_floats(sz(K), seed + 5, -1, 1),
                               w10 = test::uniform_floats(sz(F * K), seed + 6, -1, 1),
                               w20 = test::uniform_floats(sz(s.D * F), seed + 7, -1, 1);
      std::vector<double> dx_ref(sz(nx)), dpos_ref(sz(K), 0.0), dw1_ref(sz(F * K), 0.0),
          dw2_ref(sz(s.D * F), 0.0);
      cpu::nsa_compress_backward<double>(dx_ref.data(), dpos_ref.data(), dw1_ref.data(), dw2_ref.data(), dy.d.data(),
                                         to_d(hid).data(), x.d.data(), pos.d.data(), w1.d.data(), w2.d.data(), F, s);
      Dev<float> gdpos(pos0), gdw1(w10), gdw2(w20);
      auto increment = [](const std::vector<float>& after, const std::vector<float>& before) {
        std::vector<double> v(after.size());
        for (size_t i = 0; i < v.size(); ++i) v[i] = double(after[i]) - double(before[i]);
        return v;
      };
      gdx.poison();
      cuda::nsa_compress_backward(gdx.p, gdpos.p, gdw1.p, gdw2.p, gdy.p, ghid.p, gx.p, gpos.p, gw1.p, gw2.p, F, s);
      const std::vector<bf16> dx1 = down(gdx);
      const std::vector<float> dpos1 = gdpos.down(), dw11 = gdw1.down(), dw21 = gdw2.down();
      err = compare("dx", to_d(dx1), dx_ref, kAttnMax, kAttnL2) +
            compare("dpos", increment(dpos1, pos0), dpos_ref, kAttnMax, kAttnL2) +
            compare("dw1", increment(dw11, w10), dw1_ref, kAttnMax, kAttnL2) +
            compare("dw2", increment(dw21, w20), dw2_ref, kAttnMax, kAttnL2);
      EXPECT_TRUE(err.empty()) << "backward: " << err;
      if (Nc == 0) {
        for (const bf16 v : dx1) ASSERT_EQ(v.bits, 0) << "no complete block: dx must be 0";
      }
      // the same bits again (fixed-order reductions, cuBLASLt's fixed algorithm per shape)
      gdpos.up(pos0), gdw1.up(w10), gdw2.up(w20);
      gdx.poison();
      cuda::nsa_compress_backward(gdx.p, gdpos.p, gdw1.p, gdw2.p, gdy.p, ghid.p, gx.p, gpos.p, gw1.p, gw2.p, F, s);
      EXPECT_TRUE(same_bits(down(gdx), dx1)) << "dx not bitwise repeatable";
      EXPECT_EQ(gdpos.down(), dpos1) << "dpos not bitwise repeatable";
      EXPECT_EQ(gdw1.down(), dw11) << "dw1 not bitwise repeatable";
      EXPECT_EQ(gdw2.down(), dw21) << "dw2 not bitwise repeatable";
    }
}

TEST(GpuNsa, CompressedRopeMatchesCpu) {
  REQUIRE_GPU();
  for (const Case& c : kCases) {
    const NsaShape s = shape_of(c);
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(describe(s, seed));
    const int64_t n = s.B * s.n_cmp() * s.Hkv * s.D;
    if (n == 0) continue;
    const BfInput x = rnd(n, seed, 1.0);
    std::vector<double> y_ref(sz(n)), dx_ref(sz(n));
    cpu::nsa_compressed_rope_forward<double>(y_ref.data(), x.d.data(), 10000.0, s);
    cpu::nsa_compressed_rope_backward<double>(dx_ref.data(), x.d.data(), 10000.0, s);
    Dev<bf16> gx(x.b), gy(sz(n));
    gy.poison();
    cuda::nsa_compressed_rope_forward(gy.p, gx.p, 10000.0, s);
    std::string err = compare("rope", to_d(down(gy)), y_ref, 5e-3, 3e-3);
    gy.poison();
    cuda::nsa_compressed_rope_backward(gy.p, gx.p, 10000.0, s);
    err += compare("rope backward", to_d(down(gy)), dx_ref, 5e-3, 3e-3);
    cuda::nsa_compressed_rope_forward(gx.p, gx.p, 10000.0, s);  // in place
    err += compare("rope in place", to_d(down(gx)), y_ref, 5e-3, 3e-3);
    EXPECT_TRUE(err.empty()) << err;
  }
}

// ---- compressed attention ------------------------------------------------------------------------------

TEST(GpuNsa, CompressedAttentionMatchesCpu) {
  REQUIRE_GPU();
  for (const Case& c : kCases) {
    const NsaShape s = shape_of(c);
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(describe(s, seed));
    const int64_t Nc = s.n_cmp(), nq = s.B * s.T * s.H * s.D, nc = s.B * Nc * s.Hkv * s.D, nl = s.B * s.H * s.T;
    // |q|, |kc| up to 1.5: scores of std ~1 (as test_gpu_attention)
    const BfInput q = rnd(nq, seed, 1.5), kc = rnd(nc, seed + 1, 1.5), vc = rnd(nc, seed + 2, 1.0),
                  dout = rnd(nq, seed + 3, 1.0);
    std::vector<double> out_ref(sz(nq)), lse_ref(sz(nl)), dq_ref(sz(nq)), dkc_ref(sz(nc)),
        dvc_ref(sz(nc));
    cpu::nsa_cmp_attention_forward<double>(out_ref.data(), lse_ref.data(), q.d.data(), kc.d.data(), vc.d.data(), s);
    cpu::nsa_cmp_attention_backward<double>(dq_ref.data(), dkc_ref.data(), dvc_ref.data(), dout.d.data(),
                                            out_ref.data(), lse_ref.data(), q.d.data(), kc.d.data(), vc.d.data(), s);
    Dev<bf16> gq(q.b), gkc(kc.b), gvc(vc.b), gdout(dout.b), gout(sz(nq)), gdq(sz(nq)), gdkc(sz(nc)),
        gdvc(sz(nc));
    Dev<float> glse(sz(nl));
    gout.poison(), glse.poison();
    cuda::nsa_cmp_attention_forward(gout.p, glse.p, gq.p, gkc.p, gvc.p, s);
    const std::vector<bf16> out = down(gout);
    const std::vector<float> lse = glse.down();
    std::string err = compare("out", to_d(out), out_ref, kAttnMax, kAttnL2) +
                      compare("lse", to_d(lse), lse_ref, kLseTol, 0, true);
    ASSERT_TRUE(err.empty()) << "forward: " << err;
    // a query before the first complete block: output exactly 0, lse −inf
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = 0; t < std::min(s.T, s.cmp_block - 1); ++t)
        for (int64_t h = 0; h < s.H; ++h) {
          ASSERT_EQ(lse[sz((b * s.H + h) * s.T + t)], -INFINITY) << "t " << t;
          for (int64_t e = 0; e < s.D; ++e) ASSERT_EQ(out[sz(((b * s.T + t) * s.H + h) * s.D + e)].bits, 0);
        }

    gdq.poison(), gdkc.poison(), gdvc.poison();
    cuda::nsa_cmp_attention_backward(gdq.p, gdkc.p, gdvc.p, gdout.p, gout.p, glse.p, gq.p, gkc.p, gvc.p, s);
    const std::vector<bf16> dq1 = down(gdq), dkc1 = gdkc.down(), dvc1 = gdvc.down();
    err = compare("dq", to_d(dq1), dq_ref, kAttnMax, kAttnL2) + compare("dkc", to_d(dkc1), dkc_ref, kAttnMax, kAttnL2) +
          compare("dvc", to_d(dvc1), dvc_ref, kAttnMax, kAttnL2);
    EXPECT_TRUE(err.empty()) << "backward: " << err;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = 0; t < std::min(s.T, s.cmp_block - 1); ++t)
        for (int64_t i = 0; i < s.H * s.D; ++i)
          ASSERT_EQ(dq1[sz((b * s.T + t) * s.H * s.D + i)].bits, 0) << "an early query gets no gradient";
    gdq.poison(), gdkc.poison(), gdvc.poison();
    cuda::nsa_cmp_attention_backward(gdq.p, gdkc.p, gdvc.p, gdout.p, gout.p, glse.p, gq.p, gkc.p, gvc.p, s);
    EXPECT_TRUE(same_bits(down(gdq), dq1) && same_bits(gdkc.down(), dkc1) && same_bits(gdvc.down(), dvc1))
        << "backward not bitwise repeatable";
  }
}

// ---- selection --------------------------------------------------------------------------------------------

// The first (b, hk, t) whose lists differ, as text ("" when equal).
std::string first_list_difference(const std::vector<int32_t>& got, const std::vector<int32_t>& want,
                                  const NsaShape& s) {
  for (int64_t r = 0; r < s.B * s.Hkv * s.T; ++r) {
    const auto g = got.begin() + r * s.sel_count, w = want.begin() + r * s.sel_count;
    if (!std::equal(g, g + s.sel_count, w)) {
      std::ostringstream o;
      o << "(b, hk, t) = (" << r / (s.Hkv * s.T) << ", " << (r / s.T) % s.Hkv << ", " << r % s.T << "): got";
      for (int64_t i = 0; i < s.sel_count; ++i) o << " " << g[i];
      o << ", cpu";
      for (int64_t i = 0; i < s.sel_count; ++i) o << " " << w[i];
      return o.str();
    }
  }
  return "";
}

// The GPU's lists against cpu::nsa_select<double> on the same q, kc and the GPU's lse; also with
// the importance batches shrunk to one query tile, and to about 150 queries (several tiles per
// batch, the last batch partial; nsa.h: B·Hkv·ceil(T/l') int64 importances per query). kc_mode 0:
// random; 1: every compressed key the same vector (each query's probabilities equal: importances
// tie wherever the overlaps do); 2: q = 0.
void check_selection(const NsaShape& s, uint64_t seed, int kc_mode) {
  const int64_t Nc = s.n_cmp(), nq = s.B * s.T * s.H * s.D, nc = s.B * Nc * s.Hkv * s.D, nl = s.B * s.H * s.T;
  BfInput q = rnd(nq, seed, 2.0), kc = rnd(nc, seed + 1, 2.0);
  const BfInput vc = rnd(nc, seed + 2, 1.0);
  if (kc_mode == 1)
    for (int64_t i = s.D; i < nc; ++i) kc.b[sz(i)] = kc.b[sz(i % s.D)], kc.d[sz(i)] = kc.d[sz(i % s.D)];
  if (kc_mode == 2) q.b.assign(q.b.size(), to_bf16(0.f)), q.d.assign(q.d.size(), 0.0);
  Dev<bf16> gq(q.b), gkc(kc.b), gvc(vc.b), gout(sz(nq));
  Dev<float> glse(sz(nl));
  cuda::nsa_cmp_attention_forward(gout.p, glse.p, gq.p, gkc.p, gvc.p, s);
  const std::vector<float> lse = down(glse);
  const int64_t nidx = s.B * s.Hkv * s.T * s.sel_count;
  std::vector<int32_t> want(sz(nidx));
  cpu::nsa_select<double>(want.data(), q.d.data(), kc.d.data(), to_d(lse).data(), s);
  Dev<int32_t> gidx(sz(nidx));
  gidx.poison();
  cuda::nsa_select(gidx.p, gq.p, gkc.p, glse.p, s);
  EXPECT_EQ(first_list_difference(down(gidx), want, s), "") << "kc mode " << kc_mode;
  const int64_t per_query = s.B * s.Hkv * s.n_sel() * int64_t(sizeof(int64_t));
  for (const int64_t budget : {int64_t(1), 150 * per_query}) {
    const int64_t old = cuda::testing::set_nsa_select_budget(budget);
    gidx.poison();
    cuda::nsa_select(gidx.p, gq.p, gkc.p, glse.p, s);
    cuda::testing::set_nsa_select_budget(old);
    EXPECT_EQ(first_list_difference(down(gidx), want, s), "")
        << "kc mode " << kc_mode << ", importance budget " << budget << " bytes";
  }
}

TEST(GpuNsa, SelectionIsTheCpus) {
  REQUIRE_GPU();
  for (const Case& c : kCases)
    for (int kc_mode : {0, 1, 2}) {
      const NsaShape s = shape_of(c);
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s, seed));
      check_selection(s, seed, kc_mode);
    }
}

// ---- selected attention --------------------------------------------------------------------------------

// Random valid lists: each query's own block and a random subset of the earlier ones, at most n,
// ascending, −1 after (nsa_ops.h's contract; not necessarily what nsa_select would choose).
std::vector<int32_t> random_lists(const NsaShape& s, uint64_t seed) {
  Rng r(hash64(seed, 0x11575));
  std::vector<int32_t> idx(sz(s.B * s.Hkv * s.T * s.sel_count), -1);
  for (int64_t row = 0; row < s.B * s.Hkv * s.T; ++row) {
    const int64_t t = row % s.T, J = t / s.sel_block;
    std::vector<int32_t> blocks{int32_t(J)};
    for (int64_t j = 0; j < J; ++j)
      if (r.uniform() < 0.4) blocks.push_back(int32_t(j));
    std::sort(blocks.begin() + 1, blocks.end());
    blocks.resize(std::min<size_t>(blocks.size(), sz(s.sel_count)));
    std::sort(blocks.begin(), blocks.end());
    std::copy(blocks.begin(), blocks.end(), idx.begin() + row * s.sel_count);
  }
  return idx;
}

TEST(GpuNsa, SelectedAttentionMatchesCpu) {
  REQUIRE_GPU();
  for (const Case& c : kCases)
    for (const bool chosen : {true, false}) {
      const NsaShape s = shape_of(c);
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s, seed) + (chosen ? " (the CPU's selection)" : " (random lists)"));
      const int64_t nq = s.B * s.T * s.H * s.D, nk = s.B * s.T * s.Hkv * s.D, nl = s.B * s.H * s.T;
      const int64_t nc = s.B * s.n_cmp() * s.Hkv * s.D;
      const BfInput q = rnd(nq, seed, 1.5), k = rnd(nk, seed + 1, 1.5), v = rnd(nk, seed + 2, 1.0),
                    dout = rnd(nq, seed + 3, 1.0);
      std::vector<int32_t> idx;
      if (chosen) {  // the reference selection from a random compressed branch
        const BfInput kc = rnd(nc, seed + 4, 2.0), vc = rnd(nc, seed + 5, 1.0);
        std::vector<double> o(sz(nq)), lse(sz(nl));
        cpu::nsa_cmp_attention_forward<double>(o.data(), lse.data(), q.d.data(), kc.d.data(), vc.d.data(), s);
        idx.resize(sz(s.B * s.Hkv * s.T * s.sel_count));
        cpu::nsa_select<double>(idx.data(), q.d.data(), kc.d.data(), lse.data(), s);
      } else {
        idx = random_lists(s, seed);
      }
      std::vector<double> out_ref(sz(nq)), lse_ref(sz(nl)), dq_ref(sz(nq)), dk_ref(sz(nk)),
          dv_ref(sz(nk));
      cpu::nsa_slc_attention_forward<double>(out_ref.data(), lse_ref.data(), q.d.data(), k.d.data(), v.d.data(),
                                             idx.data(), s);
      cpu::nsa_slc_attention_backward<double>(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.d.data(),
                                              out_ref.data(), lse_ref.data(), q.d.data(), k.d.data(), v.d.data(),
                                              idx.data(), s);
      Dev<bf16> gq(q.b), gk(k.b), gv(v.b), gdout(dout.b), gout(sz(nq)), gdq(sz(nq)), gdk(sz(nk)),
          gdv(sz(nk));
      Dev<float> glse(sz(nl));
      Dev<int32_t> gidx(idx);
      gout.poison(), glse.poison();
      cuda::nsa_slc_attention_forward(gout.p, glse.p, gq.p, gk.p, gv.p, gidx.p, s);
      std::string err = compare("out", to_d(down(gout)), out_ref, kAttnMax, kAttnL2) +
                        compare("lse", to_d(glse.down()), lse_ref, kLseTol, 0, true);
      ASSERT_TRUE(err.empty()) << "forward: " << err;
      gdq.poison(), gdk.poison(), gdv.poison();
      cuda::nsa_slc_attention_backward(gdq.p, gdk.p, gdv.p, gdout.p, gout.p, glse.p, gq.p, gk.p, gv.p, gidx.p, s);
      const std::vector<bf16> dq1 = down(gdq), dk1 = gdk.down(), dv1 = gdv.down();
      err = compare("dq", to_d(dq1), dq_ref, kAttnMax, kAttnL2) + compare("dk", to_d(dk1), dk_ref, kAttnMax, kAttnL2) +
            compare("dv", to_d(dv1), dv_ref, kAttnMax, kAttnL2);
      EXPECT_TRUE(err.empty()) << "backward: " << err;
      gdq.poison(), gdk.poison(), gdv.poison();
      cuda::nsa_slc_attention_backward(gdq.p, gdk.p, gdv.p, gdout.p, gout.p, glse.p, gq.p, gk.p, gv.p, gidx.p, s);
      EXPECT_TRUE(same_bits(down(gdq), dq1) && same_bits(gdk.down(), dk1) && same_bits(gdv.down(), dv1))
          << "backward not bitwise repeatable";
    }
}

// ---- gates ------------------------------------------------------------------------------------------------

TEST(GpuNsa, GatesMatchCpu) {
  REQUIRE_GPU();
  for (const int64_t D : {32, 64, 128}) {
    const int64_t rows = 37, H = 3, n = rows * H * D;
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("D=" + std::to_string(D) + " seed=" + std::to_string(seed));
    const BfInput z = rnd(rows * 3 * H, seed, 4.0), oc = rnd(n, seed + 1, 1.0), os = rnd(n, seed + 2, 1.0),
                  ow = rnd(n, seed + 3, 1.0), dout = rnd(n, seed + 4, 1.0);
    std::vector<double> out_ref(sz(n)), dz_ref(sz(rows * 3 * H)), doc_ref(sz(n)), dos_ref(sz(n)),
        dow_ref(sz(n));
    cpu::nsa_gate_forward<double>(out_ref.data(), z.d.data(), oc.d.data(), os.d.data(), ow.d.data(), rows, H, D);
    cpu::nsa_gate_backward<double>(dz_ref.data(), doc_ref.data(), dos_ref.data(), dow_ref.data(), dout.d.data(),
                                   z.d.data(), oc.d.data(), os.d.data(), ow.d.data(), rows, H, D);
    Dev<bf16> gz(z.b), goc(oc.b), gos(os.b), gow(ow.b), gdout(dout.b), gout(sz(n)), gdz(sz(rows * 3 * H)),
        gdoc(sz(n)), gdos(sz(n)), gdow(sz(n));
    gout.poison(), gdz.poison(), gdoc.poison(), gdos.poison(), gdow.poison();
    cuda::nsa_gate_forward(gout.p, gz.p, goc.p, gos.p, gow.p, rows, H, D);
    cuda::nsa_gate_backward(gdz.p, gdoc.p, gdos.p, gdow.p, gdout.p, gz.p, goc.p, gos.p, gow.p, rows, H, D);
    const std::string err = compare("out", to_d(down(gout)), out_ref, 5e-3, 3e-3) +
                            compare("dz", to_d(gdz.down()), dz_ref, 5e-3, 3e-3) +
                            compare("do_cmp", to_d(gdoc.down()), doc_ref, 5e-3, 3e-3) +
                            compare("do_slc", to_d(gdos.down()), dos_ref, 5e-3, 3e-3) +
                            compare("do_win", to_d(gdow.down()), dow_ref, 5e-3, 3e-3);
    EXPECT_TRUE(err.empty()) << err;
  }
}

#endif  // DMAT_WITH_CUDA

// ---- the model, through the CLI ----------------------------------------------------------------------------

// configs/tiny-nsa.json (T = 128: compression blocks of 8 at stride 4, 4 selected blocks of 16, a window
// of 32; group 2, head dim 32) trained 20 steps on the bundled data on the CPU (fp32) and on the GPU
// (bf16): the losses agree within 0.05 nats per step, the tolerance of the other variants'
// GPU-against-CPU runs (test_gpu_train.cpp: bf16 storage with fp32 accumulation). NSA adds one
// source of difference: the GPU selects from bf16 scores, so a block whose importance ties within
// that rounding with another may be chosen on one device and not the other; such a swap exchanges
// two nearly equally attended blocks and moves the loss by far less than the tolerance. A first
// bound, to be confirmed against the measured difference on the GPU machine.
TEST(GpuNsa, TinyModelTracksTheCpuFor20Steps) {
  REQUIRE_GPU();
  const std::string dir = test::temp_dir("gpu_nsa_track"), bin = test::dmatrain_bin();
  const std::string cfg = " train " + test::source_dir() + "/configs/tiny-nsa.json --set run.threads=2" +
                          " --set train.steps=20 --set train.batch_size=4 --set run.log_interval=1" +
                          " --set train.eval_interval=20 --set train.eval_batches=2" +
                          test::prepare_bundled_data(dir);
  auto a = test::run(bin + cfg + " --set run.device=cpu --out " + dir + "/cpu");
  ASSERT_EQ(a.rc, 0) << a.out;
  auto b = test::run(bin + cfg + " --set run.device=cuda --out " + dir + "/gpu");
  ASSERT_EQ(b.rc, 0) << b.out;
  const auto lc = test::metric_column(dir + "/cpu", "loss"), lg = test::metric_column(dir + "/gpu", "loss");
  ASSERT_EQ(lc.size(), 20u);
  ASSERT_EQ(lg.size(), 20u);
  double worst = 0;
  for (const auto& [step, loss] : lc) {
    ASSERT_TRUE(lg.count(step)) << "step " << step;
    worst = std::max(worst, std::abs(lg.at(step) - loss));
    EXPECT_NEAR(lg.at(step), loss, 0.05) << "step " << step;
  }
  EXPECT_LT(lc.rbegin()->second, lc.begin()->second - 0.5) << "the byte model starts near ln 257 = 5.55";
  std::cout << "nsa: loss " << lc.begin()->second << " -> cpu " << lc.rbegin()->second << " / gpu "
            << lg.rbegin()->second << ", max |Δ| " << worst << "\n";
}

TEST(GpuNsa, ResumeIsBitExactOnTheGpu) {
  REQUIRE_GPU();
  test::expect_resume_bit_exact("gpu_resume_nsa", "configs/tiny-nsa.json", " --set run.device=cuda");
}

}  // namespace
}  // namespace dmat
