// Flash attention on the GPU (kernels/cuda/flash_attention.cu) against the CPU reference
// (cpu::attention_forward/backward in fp64) on the SAME bf16-rounded inputs: forward out + lse,
// backward dq/dk/dv through both dQ paths, over sequence lengths with tails, batch, GQA groups,
// every head-dim pair and sliding windows; plus the sparse-variant hooks (gathered key lists,
// per-key bias) against a masked fp64 reference written here. Outputs are poisoned with NaN
// before each call so an element the kernel forgot to write fails the check. Every forward check
// runs on each path the device has (mma.sync always; the wgmma kernels on sm_90a), and a self-check
// of the wgmma building blocks (swizzled cp.async tile, descriptors, fragment layouts) on one tile
// names the broken piece if the wgmma kernels fail.
//
// Tolerances (why): inputs are exact bf16 values, so the only GPU-side roundings are P (and dS)
// to bf16 before their tensor-core products (relative 2^-9 each, errors of random sign averaged
// over many keys) and the bf16 result itself (relative 2^-9 of each element). Measured against
// the largest reference element: ‖got − ref‖∞ ≤ 2e-2·‖ref‖∞ (about 10 bf16 ulps of the largest
// element: room for a few roundings stacking on one element, far below what any indexing or
// masking error produces, which is O(1)), and the bulk ‖got − ref‖₂ ≤ 1e-2·‖ref‖₂. lse is fp32
// from fp32 sums of unrounded probabilities: |Δlse| ≤ 2e-3 (exp2f's few-ulp error times T).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/device_info.h"

#ifdef DMAT_WITH_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/head_dims.h"
#include "test_gpu_util.h"
#endif

namespace dmat {
namespace {

#ifdef DMAT_WITH_CUDA

constexpr double kMaxTol = 2e-2;  // ‖got − ref‖∞ / ‖ref‖∞
constexpr double kL2Tol = 1e-2;   // ‖got − ref‖₂ / ‖ref‖₂
constexpr double kLseTol = 2e-3;  // |Δlse|, absolute (natural log units)

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

using test::Dev;
using test::to_d;

std::string describe(const cpu::AttnShape& s) {
  std::ostringstream o;
  o << "B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " Dqk=" << s.Dqk << " Dv=" << s.Dv
    << " window=" << s.window;
  return o.str();
}

// Random bf16 tensor and its exact values as double.
struct Input {
  std::vector<bf16> b;
  std::vector<double> d;
};
Input random_input(int64_t n, uint64_t seed, double amp) {
  Rng r(seed);
  Input x;
  x.b.resize(size_t(n));
  x.d.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    x.b[size_t(i)] = to_bf16(float(amp * (2 * r.uniform() - 1)));
    x.d[size_t(i)] = to_float(x.b[size_t(i)]);
  }
  return x;
}

using test::compare;

// Flat index -> "[b,t,h,d]" for the [B,T,heads,D] tensors (in failure messages).
std::string where4(int64_t idx, int64_t T, int64_t heads, int64_t D) {
  std::ostringstream o;
  o << "[b=" << idx / (T * heads * D) << ",t=" << (idx / (heads * D)) % T << ",h=" << (idx / D) % heads
    << ",d=" << idx % D << "]";
  return o.str();
}

struct Problem {
  cpu::AttnShape s;
  uint64_t seed = 0;
  Input q, k, v, dout;
  Problem(const cpu::AttnShape& shape, uint64_t seed_) : s(shape), seed(seed_) {
    // |q|,|k| up to 1.5: scores of std ~1 after the 1/sqrt(d) scale, so softmax rows are neither
    // uniform nor one-hot and every term of the gradients matters.
    q = random_input(s.B * s.T * s.H * s.Dqk, seed + 1, 1.5);
    k = random_input(s.B * s.T * s.Hkv * s.Dqk, seed + 2, 1.5);
    v = random_input(s.B * s.T * s.Hkv * s.Dv, seed + 3, 1.0);
    dout = random_input(s.B * s.T * s.H * s.Dv, seed + 4, 1.0);
  }
  int64_t nq() const { return s.B * s.T * s.H * s.Dqk; }
  int64_t nk() const { return s.B * s.T * s.Hkv * s.Dqk; }
  int64_t nv() const { return s.B * s.T * s.Hkv * s.Dv; }
  int64_t no() const { return s.B * s.T * s.H * s.Dv; }
  int64_t nl() const { return s.B * s.H * s.T; }
};

struct GpuProblem {
  Dev<bf16> q, k, v, dout, out, dq, dk, dv;
  Dev<float> lse;
  explicit GpuProblem(const Problem& P)
      : q(P.nq()), k(P.nk()), v(P.nv()), dout(P.no()), out(P.no()), dq(P.nq()), dk(P.nk()), dv(P.nv()), lse(P.nl()) {
    q.up(P.q.b);
    k.up(P.k.b);
    v.up(P.v.b);
    dout.up(P.dout.b);
  }
  void poison_forward() {
    cuda::fill_bf16(out.p, out.n, NAN);
    cuda::fill_f32(lse.p, lse.n, NAN);
  }
  void poison_backward() {
    cuda::fill_bf16(dq.p, dq.n, NAN);
    cuda::fill_bf16(dk.p, dk.n, NAN);
    cuda::fill_bf16(dv.p, dv.n, NAN);
  }
  void backward(const cpu::AttnShape& s, bool deterministic, cuda::FlashPath path = cuda::FlashPath::automatic) {
    poison_backward();
    cuda::flash_attention_backward_path(dq.p, dk.p, dv.p, dout.p, out.p, lse.p, q.p, k.p, v.p, s, deterministic, path);
    cuda::synchronize();
  }
};

struct Case {
  int64_t Dqk, Dv, T, window, B, H, Hkv;
};

std::string case_name(const Case& c) {
  std::ostringstream o;
  o << "D" << c.Dqk << "_" << c.Dv << "_T" << c.T << "_W" << c.window << "_B" << c.B << "_H" << c.H << "_" << c.Hkv;
  return o.str();
}

// The forward paths this device runs for shape s: mma.sync always, wgmma where available.
std::vector<cuda::FlashPath> forward_paths(const cpu::AttnShape& s) {
  std::vector<cuda::FlashPath> paths{cuda::FlashPath::mma};
  if (cuda::flash_attention_wgmma_available(s)) paths.push_back(cuda::FlashPath::wgmma);
  return paths;
}
const char* path_name(cuda::FlashPath p) { return p == cuda::FlashPath::wgmma ? "wgmma" : "mma"; }

// The head-dim pairs the kernels are built for (kernels/cuda/head_dims.h), all or those with a
// wgmma kernel: a row added to the table is tested here without further edits.
std::vector<std::pair<int64_t, int64_t>> table_dims(bool wgmma_only = false) {
  std::vector<std::pair<int64_t, int64_t>> v;
  for (const cuda::HeadDims& h : cuda::kHeadDims)
    if (!wgmma_only || h.wgmma) v.push_back({h.dqk, h.dv});
  return v;
}

// Every head-dim pair x every T x every window; B and the GQA group cycle with the index so
// each value meets many of the others without the full cross product.
std::vector<Case> all_cases() {
  const auto dims = table_dims();
  const int64_t Ts[] = {1, 17, 64, 100, 128, 257, 1000};
  const int64_t windows[] = {0, 1, 16, 100, 129};
  const int64_t heads[3][2] = {{4, 4}, {4, 2}, {8, 2}};
  std::vector<Case> cs;
  int idx = 0;
  for (auto& d : dims)
    for (int64_t T : Ts)
      for (int64_t w : windows) {
        const int64_t B = 1 + (idx % 2);
        const auto& hh = heads[(idx / 2) % 3];
        cs.push_back({d.first, d.second, T, w, B, hh[0], hh[1]});
        ++idx;
      }
  return cs;
}

class FlashAttention : public ::testing::TestWithParam<Case> {};

TEST_P(FlashAttention, ForwardAndBackwardMatchCpuReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Case c = GetParam();
  cpu::AttnShape s;
  s.B = c.B, s.T = c.T, s.H = c.H, s.Hkv = c.Hkv, s.Dqk = c.Dqk, s.Dv = c.Dv, s.window = c.window;
  s.scale = 1.0 / std::sqrt(double(c.Dqk));
  ASSERT_TRUE(cuda::flash_attention_supported(s)) << describe(s);
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(describe(s) + " seed=" + std::to_string(seed));
  const Problem P(s, seed);

  // fp64 reference on the same bf16 values
  std::vector<double> out_ref(size_t(P.no())), lse_ref(size_t(P.nl()));
  cpu::attention_forward<double>(out_ref.data(), lse_ref.data(), P.q.d.data(), P.k.d.data(), P.v.d.data(), s);
  std::vector<double> dq_ref(size_t(P.nq())), dk_ref(size_t(P.nk())), dv_ref(size_t(P.nv()));
  cpu::attention_backward<double>(dq_ref.data(), dk_ref.data(), dv_ref.data(), P.dout.d.data(), out_ref.data(),
                                  lse_ref.data(), P.q.d.data(), P.k.d.data(), P.v.d.data(), s);

  GpuProblem G(P);
  // each forward path; the backward below runs on the output of the last one (wgmma where available)
  std::string err;
  for (const cuda::FlashPath path : forward_paths(s)) {
    G.poison_forward();
    cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, nullptr, path);
    cuda::synchronize();
    const std::vector<double> out = to_d(G.out.down()), lse = to_d(G.lse.down());
    err = compare("out", out, out_ref, kMaxTol, kL2Tol) + compare("lse", lse, lse_ref, kLseTol, 0, true);
    ASSERT_TRUE(err.empty()) << path_name(path) << " forward: " << err;
  }

  // each backward path (mma.sync; with wgmma the dQ pass is the Hopper kernel)
  for (const cuda::FlashPath path : forward_paths(s)) {
    SCOPED_TRACE(std::string("backward path ") + path_name(path));
    // deterministic backward: within tolerance, and the same bits on a second run
    G.backward(s, /*deterministic=*/true, path);
    const std::vector<bf16> dq1 = G.dq.down(), dk1 = G.dk.down(), dv1 = G.dv.down();
    err = compare("dq", to_d(dq1), dq_ref, kMaxTol, kL2Tol) +
          compare("dk", to_d(dk1), dk_ref, kMaxTol, kL2Tol) + compare("dv", to_d(dv1), dv_ref, kMaxTol, kL2Tol);
    EXPECT_TRUE(err.empty()) << "deterministic backward: " << err;
    // again with the dQ pass on the compute stream (the first ran beside the dK/dV pass by default)
    const int old_side = cuda::testing::set_attention_side_stream(0);
    G.backward(s, true, path);
    cuda::testing::set_attention_side_stream(old_side);
    const std::vector<bf16> dq2 = G.dq.down(), dk2 = G.dk.down(), dv2 = G.dv.down();
    auto first_diff = [](const std::vector<bf16>& a, const std::vector<bf16>& b) -> int64_t {
      for (size_t i = 0; i < a.size(); ++i)
        if (a[i].bits != b[i].bits) return int64_t(i);
      return -1;
    };
    const int64_t dq_d = first_diff(dq1, dq2), dk_d = first_diff(dk1, dk2), dv_d = first_diff(dv1, dv2);
    EXPECT_EQ(dq_d, -1) << "dq not bitwise repeatable (side stream on, off) at " << where4(dq_d, s.T, s.H, s.Dqk);
    EXPECT_EQ(dk_d, -1) << "dk not bitwise repeatable at " << where4(dk_d, s.T, s.Hkv, s.Dqk);
    EXPECT_EQ(dv_d, -1) << "dv not bitwise repeatable at " << where4(dv_d, s.T, s.Hkv, s.Dv);

    // atomic-dQ backward (mma path; the wgmma path computes dQ deterministically either way)
    G.backward(s, /*deterministic=*/false, path);
    err = compare("dq", to_d(G.dq.down()), dq_ref, kMaxTol, kL2Tol) +
          compare("dk", to_d(G.dk.down()), dk_ref, kMaxTol, kL2Tol) +
          compare("dv", to_d(G.dv.down()), dv_ref, kMaxTol, kL2Tol);
    EXPECT_TRUE(err.empty()) << "non-deterministic backward: " << err;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, FlashAttention, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return case_name(i.param); });

// ---- sparse-variant hooks: per-key bias and gathered key lists ---------------------------------

// fp64 forward with an arbitrary visibility predicate and an optional per-key bias [B,Hkv,T].
void masked_reference(std::vector<double>& out, std::vector<double>& lse, const Problem& P, const double* bias,
                      const std::function<bool(int64_t b, int64_t hk, int64_t i, int64_t j)>& keep) {
  const auto& s = P.s;
  const int64_t group = s.H / s.Hkv;
  out.assign(size_t(P.no()), 0.0);
  lse.assign(size_t(P.nl()), -INFINITY);
  std::vector<double> sc(size_t(s.T));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t i = 0; i < s.T; ++i) {
        const int64_t hk = h / group;
        double mx = -INFINITY;
        for (int64_t j = 0; j < s.T; ++j) {
          sc[size_t(j)] = -INFINITY;
          if (!keep(b, hk, i, j)) continue;
          double d = 0;
          for (int64_t x = 0; x < s.Dqk; ++x)
            d += P.q.d[size_t(((b * s.T + i) * s.H + h) * s.Dqk + x)] * P.k.d[size_t(((b * s.T + j) * s.Hkv + hk) * s.Dqk + x)];
          sc[size_t(j)] = s.scale * d + (bias ? bias[(b * s.Hkv + hk) * s.T + j] : 0.0);
          mx = std::max(mx, sc[size_t(j)]);
        }
        if (mx == -INFINITY) continue;
        double sum = 0;
        double* o = &out[size_t(((b * s.T + i) * s.H + h) * s.Dv)];
        for (int64_t j = 0; j < s.T; ++j) {
          if (sc[size_t(j)] == -INFINITY) continue;
          const double p = std::exp(sc[size_t(j)] - mx);
          sum += p;
          for (int64_t x = 0; x < s.Dv; ++x) o[x] += p * P.v.d[size_t(((b * s.T + j) * s.Hkv + hk) * s.Dv + x)];
        }
        for (int64_t x = 0; x < s.Dv; ++x) o[x] /= sum;
        lse[size_t((b * s.H + h) * s.T + i)] = mx + std::log(sum);
      }
}

cpu::AttnShape hook_shape(int64_t Dqk, int64_t Dv, int64_t T, int64_t window) {
  cpu::AttnShape s;
  s.B = 2, s.T = T, s.H = 4, s.Hkv = 2, s.Dqk = Dqk, s.Dv = Dv, s.window = window;
  s.scale = 1.0 / std::sqrt(double(Dqk));
  return s;
}

// Gathered lists [B, Hkv, tiles, capacity] from a per-(b, hk, tile) key choice.
struct Gather {
  std::vector<int32_t> keys, count;
  int64_t capacity = 0;
};
Gather build_gather(const cpu::AttnShape& s, const std::function<std::vector<int32_t>(int64_t, int64_t, int64_t)>& pick) {
  const int64_t bq = cuda::flash_attention_block_q(), tiles = (s.T + bq - 1) / bq;
  std::vector<std::vector<int32_t>> lists;
  Gather g;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hk = 0; hk < s.Hkv; ++hk)
      for (int64_t t = 0; t < tiles; ++t) {
        lists.push_back(pick(b, hk, t));
        g.capacity = std::max<int64_t>(g.capacity, int64_t(lists.back().size()));
      }
  g.capacity = std::max<int64_t>(g.capacity, 1);
  g.keys.assign(lists.size() * size_t(g.capacity), -7);  // junk past count must never be read
  for (size_t l = 0; l < lists.size(); ++l) {
    g.count.push_back(int32_t(lists[l].size()));
    std::copy(lists[l].begin(), lists[l].end(), g.keys.begin() + int64_t(l) * g.capacity);
  }
  return g;
}

std::vector<std::pair<int64_t, int64_t>> hook_dims() { return table_dims(); }

TEST(FlashAttentionHooks, GatherAllCausalKeysEqualsDense) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
  for (auto [Dqk, Dv] : hook_dims())
    for (int64_t T : {100, 300}) {
      const cpu::AttnShape s = hook_shape(Dqk, Dv, T, 0);
      if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(s)) continue;
      SCOPED_TRACE(path_name(path));
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s) + " seed=" + std::to_string(seed));
      const Problem P(s, seed);
      GpuProblem G(P);
      const int64_t bq = cuda::flash_attention_block_q();
      Gather g = build_gather(s, [&](int64_t, int64_t, int64_t t) {
        std::vector<int32_t> ks;
        for (int64_t j = 0; j < std::min(T, (t + 1) * bq); ++j) ks.push_back(int32_t(j));
        return ks;
      });
      Dev<int32_t> gk(int64_t(g.keys.size())), gc(int64_t(g.count.size()));
      gk.up(g.keys);
      gc.up(g.count);
      const cuda::FlashGather fg{gk.p, gc.p, g.capacity};
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, nullptr, path);
      const std::vector<bf16> dense = G.out.down();
      const std::vector<float> dense_lse = G.lse.down();
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, &fg, path);
      const std::vector<bf16> gath = G.out.down();
      const std::vector<float> gath_lse = G.lse.down();
      // Same key tiles in the same order and masked keys give exact zeros, so the results should
      // be the same bits; allow one bf16 ulp (2^-8 relative) in case the two instantiations are
      // scheduled with different fma contractions. Any masking/indexing error is far larger.
      for (size_t i = 0; i < dense.size(); ++i) {
        const float a = to_float(dense[i]), c = to_float(gath[i]);
        ASSERT_LE(std::abs(a - c), std::ldexp(std::abs(a), -8))
            << "out " << where4(int64_t(i), T, s.H, Dv) << " dense " << a << " gathered " << c;
      }
      for (size_t i = 0; i < dense_lse.size(); ++i)
        ASSERT_LE(std::abs(dense_lse[i] - gath_lse[i]), 1e-5f * (1 + std::abs(dense_lse[i])))
            << "lse " << i << " dense " << dense_lse[i] << " gathered " << gath_lse[i];
    }
}

TEST(FlashAttentionHooks, ZeroBiasEqualsNoBias) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
  for (auto [Dqk, Dv] : hook_dims()) {
    const cpu::AttnShape s = hook_shape(Dqk, Dv, 257, 100);
    if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(s)) continue;
    SCOPED_TRACE(path_name(path));
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(describe(s) + " seed=" + std::to_string(seed));
    const Problem P(s, seed);
    GpuProblem G(P);
    Dev<float> bias(s.B * s.Hkv * s.T);
    cuda::fill_f32(bias.p, bias.n, 0.f);
    G.poison_forward();
    cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, nullptr, path);
    const std::vector<bf16> a = G.out.down();
    G.poison_forward();
    cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, bias.p, nullptr, path);
    const std::vector<bf16> b = G.out.down();
    // bias 0 adds +0 to every score: the same arithmetic, so the same bits up to fma contraction
    // differences between the two instantiations (one bf16 ulp allowed).
    for (size_t i = 0; i < a.size(); ++i)
      ASSERT_LE(std::abs(to_float(a[i]) - to_float(b[i])), std::ldexp(std::abs(to_float(a[i])), -8))
          << "out " << where4(int64_t(i), s.T, s.H, Dv) << ": " << to_float(a[i]) << " vs " << to_float(b[i]);
  }
}

// Random bias, and a DMA-like gathered selection (per KV head and query tile: a random subset of
// the causal keys, in random order) with the bias, both against the masked fp64 reference.
TEST(FlashAttentionHooks, BiasAndGatheredSubsetMatchReference) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const cuda::FlashPath path : {cuda::FlashPath::mma, cuda::FlashPath::wgmma})
  for (auto [Dqk, Dv] : hook_dims())
    for (int64_t window : {0, 50}) {
      const int64_t T = 300;
      const cpu::AttnShape s = hook_shape(Dqk, Dv, T, window);
      if (path == cuda::FlashPath::wgmma && !cuda::flash_attention_wgmma_available(s)) continue;
      SCOPED_TRACE(path_name(path));
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s) + " seed=" + std::to_string(seed));
      const Problem P(s, seed);
      GpuProblem G(P);
      Rng r(seed + 99);
      std::vector<float> bias_h(size_t(s.B * s.Hkv * T));
      std::vector<double> bias_d(bias_h.size());
      for (size_t i = 0; i < bias_h.size(); ++i) bias_h[i] = float(3 * r.uniform() - 2), bias_d[i] = bias_h[i];
      Dev<float> bias(int64_t(bias_h.size()));
      bias.up(bias_h);

      auto visible = [&](int64_t i, int64_t j) { return j <= i && (window == 0 || j > i - window); };
      std::vector<double> out_ref, lse_ref;
      masked_reference(out_ref, lse_ref, P, bias_d.data(),
                       [&](int64_t, int64_t, int64_t i, int64_t j) { return visible(i, j); });
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, bias.p, nullptr, path);
      std::string err = compare("biased out", to_d(G.out.down()), out_ref, kMaxTol, kL2Tol) +
                        compare("biased lse", to_d(G.lse.down()), lse_ref, kLseTol, 0, true);
      EXPECT_TRUE(err.empty()) << err;

      // Keep each older key of the tile with probability 1/2 and every key inside the tile's own
      // query range (so each row keeps at least its diagonal key), shuffled.
      const int64_t bq = cuda::flash_attention_block_q();
      std::vector<std::vector<std::vector<char>>> kept(size_t(s.B * s.Hkv));
      Gather g = build_gather(s, [&](int64_t b, int64_t hk, int64_t t) {
        std::vector<int32_t> ks;
        auto& kv = kept[size_t(b * s.Hkv + hk)];
        kv.resize(size_t((T + bq - 1) / bq), std::vector<char>(size_t(T), 0));
        for (int64_t j = 0; j < std::min(T, (t + 1) * bq); ++j)
          if (j >= t * bq || r.uniform() < 0.5) ks.push_back(int32_t(j)), kv[size_t(t)][size_t(j)] = 1;
        for (size_t x = ks.size(); x > 1; --x) std::swap(ks[x - 1], ks[size_t(r.uniform() * double(x)) % x]);
        return ks;
      });
      Dev<int32_t> gk(int64_t(g.keys.size())), gc(int64_t(g.count.size()));
      gk.up(g.keys);
      gc.up(g.count);
      const cuda::FlashGather fg{gk.p, gc.p, g.capacity};
      masked_reference(out_ref, lse_ref, P, bias_d.data(), [&](int64_t b, int64_t hk, int64_t i, int64_t j) {
        return visible(i, j) && kept[size_t(b * s.Hkv + hk)][size_t(i / bq)][size_t(j)];
      });
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, bias.p, &fg, path);
      err = compare("gathered out", to_d(G.out.down()), out_ref, kMaxTol, kL2Tol) +
            compare("gathered lse", to_d(G.lse.down()), lse_ref, kLseTol, 0, true);
      EXPECT_TRUE(err.empty()) << err;
    }
}

// ---- the wgmma path: building blocks, then long sequences against the mma.sync path ----------

// One tile through each sm_90a building block (testing::flash_wgmma_selftest) against fp64 on the
// same bf16 values. Each product sums 128 exact bf16·bf16 terms in fp32: |err| ≤ ~1e-5 of the
// largest element, so 1e-3 catches every layout error (those are O(1)) with margin. The raw shared
// tile is checked bit for bit first: a wrong swizzle there is a copy bug, not a descriptor bug.
TEST(FlashAttentionWgmma, BuildingBlocksMatchCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const Input a = random_input(64 * 128, seed + 1, 1.0), b = random_input(128 * 128, seed + 2, 1.0),
              v = random_input(128 * 128, seed + 3, 1.0);
  Dev<bf16> da(64 * 128), db(128 * 128), dv(128 * 128), raw(64 * 128);
  Dev<float> s128(64 * 128), s64(64 * 64), o(64 * 128);
  da.up(a.b), db.up(b.b), dv.up(v.b);
  cuda::fill_f32(s128.p, s128.n, NAN);
  cuda::fill_f32(s64.p, s64.n, NAN);
  cuda::fill_f32(o.p, o.n, NAN);
  if (!cuda::testing::flash_wgmma_selftest(s128.p, s64.p, o.p, raw.p, da.p, db.p, dv.p))
    GTEST_SKIP() << "the wgmma path is not available on this device/build";
  cuda::synchronize();

  // raw: panel p, row r, chunk position (c ^ r%8) holds columns 64p + 8c .. +7 of row r
  const std::vector<bf16> rw = raw.down();
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 8; ++c)
        for (int e = 0; e < 8; ++e) {
          const size_t at = size_t(p * 64 * 64 + r * 64 + ((c ^ (r % 8)) * 8) + e);
          const size_t src = size_t(r * 128 + 64 * p + 8 * c + e);
          ASSERT_EQ(rw[at].bits, a.b[src].bits) << "swizzled cp.async tile: panel " << p << " row " << r << " chunk "
                                                << c << " element " << e;
        }

  auto check = [&](const char* what, const std::vector<float>& got, int rows, int cols,
                   const std::function<double(int, int)>& ref) {
    std::vector<double> g(got.begin(), got.end()), want(got.size());
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j) want[size_t(i * cols + j)] = ref(i, j);
    const std::string err = compare(what, g, want, 1e-3, 1e-4);
    EXPECT_TRUE(err.empty()) << err << "(first row of got vs want: " << g[0] << "," << g[1] << "," << g[8] << " vs "
                             << want[0] << "," << want[1] << "," << want[8] << ")";
  };
  auto dot_ab = [&](int i, int j) {
    double acc = 0;
    for (int k = 0; k < 128; ++k) acc += a.d[size_t(i * 128 + k)] * b.d[size_t(j * 128 + k)];
    return acc;
  };
  check("S = A·Bᵀ, m64n128k16 SS (K-major descriptors, two 64-column panels)", s128.down(), 64, 128, dot_ab);
  check("S = A·B[0:64]ᵀ, m64n64k16 SS", s64.down(), 64, 64, dot_ab);
  check("O = A·V, m64n64k16 RS per panel (A fragments from registers, V N-major)", o.down(), 64, 128,
        [&](int i, int j) {
          double acc = 0;
          for (int k = 0; k < 128; ++k) acc += a.d[size_t(i * 128 + k)] * v.d[size_t(k * 128 + j)];
          return acc;
        });
}

// One TMA tile (the DMAT_ATTN_WG_TMA=1 producer's copy) against the source, bit for bit: rows
// 100 .. 227 of head 1 of a [200][2][128] tensor, so the last 28 rows fall outside and must be zero.
TEST(FlashAttentionWgmma, TmaTileLoadMatchesSource) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int64_t rows = 200, heads = 2;
  const int row0 = 100, head = 1;
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const Input src = random_input(rows * heads * 128, seed, 1.0);
  Dev<bf16> dsrc(rows * heads * 128), raw(128 * 128);
  dsrc.up(src.b);
  cuda::fill_bf16(raw.p, raw.n, NAN);
  if (!cuda::testing::flash_tma_selftest(raw.p, dsrc.p, rows, heads, row0, head))
    GTEST_SKIP() << "the wgmma path is not available on this device/build";
  cuda::synchronize();
  const std::vector<bf16> rw = raw.down();
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < 128; ++r)
      for (int c = 0; c < 8; ++c)
        for (int e = 0; e < 8; ++e) {
          const size_t at = size_t(p * 128 * 64 + r * 64 + ((c ^ (r % 8)) * 8) + e);
          const int64_t row = row0 + r;
          const uint16_t want =
              row < rows ? src.b[size_t((row * heads + head) * 128 + 64 * p + 8 * c + e)].bits : uint16_t(0);
          ASSERT_EQ(rw[at].bits, want) << "TMA tile: panel " << p << " row " << r << " chunk " << c << " element " << e;
        }
}

TEST(FlashAttentionWgmma, PathSelection) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  cpu::AttnShape s = hook_shape(128, 128, 64, 0);
  const bool avail = cuda::flash_attention_wgmma_available(s);
  EXPECT_EQ(cuda::flash_attention_forward_path_for(s, cuda::FlashPath::mma), cuda::FlashPath::mma);
  if (avail) EXPECT_EQ(cuda::flash_attention_forward_path_for(s, cuda::FlashPath::wgmma), cuda::FlashPath::wgmma);
  else EXPECT_THROW(cuda::flash_attention_forward_path_for(s, cuda::FlashPath::wgmma), Error);
  const char* env = std::getenv("DMAT_ATTN_PATH");
  if (env == nullptr || std::string(env) == "auto" || std::string(env).empty()) {
    // automatic: the faster per direction — forward wgmma with the TMA producer (on unless
    // DMAT_ATTN_WG_TMA=0; without it mma.sync is faster), backward wgmma where available
    const char* tma = std::getenv("DMAT_ATTN_WG_TMA");
    const bool tma_on = tma == nullptr || *tma == 0 || std::string(tma) == "1";
    EXPECT_EQ(cuda::flash_attention_forward_path_for(s, cuda::FlashPath::automatic),
              avail && tma_on ? cuda::FlashPath::wgmma : cuda::FlashPath::mma);
    EXPECT_EQ(cuda::flash_attention_backward_path_for(s, cuda::FlashPath::automatic),
              avail ? cuda::FlashPath::wgmma : cuda::FlashPath::mma);
  }
  // head dim 32 has only the mma.sync kernel
  const cpu::AttnShape s32 = hook_shape(32, 32, 64, 0);
  EXPECT_FALSE(cuda::flash_attention_wgmma_available(s32));
  EXPECT_EQ(cuda::flash_attention_forward_path_for(s32, cuda::FlashPath::automatic), cuda::FlashPath::mma);
  EXPECT_EQ(cuda::flash_attention_backward_path_for(s32, cuda::FlashPath::automatic), cuda::FlashPath::mma);
}

// Long sequences (many key tiles: every pipeline stage reused many times, both mbarrier parities)
// where an fp64 reference would be slow: the wgmma forward against the mma.sync forward, each
// rounding P to bf16 in its own tiling, so they agree to the same tolerance as against fp64.
TEST(FlashAttentionWgmma, LongSequencesMatchMmaPath) {  // forward, and the dQ pass
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (auto [Dqk, Dv] : table_dims(/*wgmma_only=*/true))
    for (int64_t window : {0, 1000}) {
      cpu::AttnShape s = hook_shape(Dqk, Dv, 4099, window);
      s.B = 1;
      if (!cuda::flash_attention_wgmma_available(s)) GTEST_SKIP() << "the wgmma path is not available";
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(s) + " seed=" + std::to_string(seed));
      const Problem P(s, seed);
      GpuProblem G(P);
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, nullptr,
                                         cuda::FlashPath::mma);
      const std::vector<double> out_m = to_d(G.out.down()), lse_m = to_d(G.lse.down());
      G.poison_forward();
      cuda::flash_attention_forward_path(G.out.p, G.lse.p, G.q.p, G.k.p, G.v.p, s, nullptr, nullptr,
                                         cuda::FlashPath::wgmma);
      std::string err = compare("wgmma out vs mma", to_d(G.out.down()), out_m, kMaxTol, kL2Tol) +
                        compare("wgmma lse vs mma", to_d(G.lse.down()), lse_m, kLseTol, 0, true);
      EXPECT_TRUE(err.empty()) << err;
      // dQ: the wgmma pass against the mma.sync pass on the same forward output
      G.backward(s, true, cuda::FlashPath::mma);
      const std::vector<double> dq_m = to_d(G.dq.down());
      G.backward(s, true, cuda::FlashPath::wgmma);
      err = compare("wgmma dq vs mma", to_d(G.dq.down()), dq_m, kMaxTol, kL2Tol);
      EXPECT_TRUE(err.empty()) << err;
    }
}

// The block order of the attention grids (DMAT_ATTN_ORDER): every (x, y, z) exactly once for any
// group size, including groups that do not divide the (y, z) pairs; order 0 is the launch order;
// with groups of g pairs, blocks are taken group by group, and inside a group x never decreases
// (each kernel's x = 0 is its heaviest tile) while the group's pairs cycle.
TEST(FlashAttentionGridOrder, EveryBlockOnceHeaviestFirstPerGroup) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int dims[][3] = {{16, 6, 32}, {128, 16, 1}, {7, 3, 5}, {1, 1, 1}, {5, 13, 1}, {3, 1, 4}};
  for (const auto& d : dims)
    for (int order : {0, 1, 2, 3, 4, 8, 16, 1000}) {
      const int X = d[0], Y = d[1], Z = d[2], n = X * Y * Z, YZ = Y * Z;
      SCOPED_TRACE("grid " + std::to_string(X) + "x" + std::to_string(Y) + "x" + std::to_string(Z) + " order " +
                   std::to_string(order));
      Dev<int32_t> out(3 * int64_t(n));
      cuda::testing::flash_grid_order(out.p, X, Y, Z, order);
      const std::vector<int32_t> o = out.down();
      std::vector<int> seen(size_t(n), 0);
      for (int l = 0; l < n; ++l) {
        const int x = o[3 * size_t(l)], y = o[3 * size_t(l) + 1], z = o[3 * size_t(l) + 2];
        ASSERT_TRUE(x >= 0 && x < X && y >= 0 && y < Y && z >= 0 && z < Z) << "block " << l << ": " << x << "," << y << "," << z;
        ++seen[size_t(x + X * (y + Y * z))];
        if (order == 0) {
          ASSERT_EQ(x + X * (y + Y * z), l) << "launch order";
          continue;
        }
        const int g = l / (X * order), g0 = g * order, m = std::min(order, YZ - g0), r = l - g0 * X;
        ASSERT_EQ(x, r / m) << "block " << l << ": tile";
        ASSERT_EQ(y + Y * z, g0 + r % m) << "block " << l << ": (head, batch) pair";
      }
      for (int i = 0; i < n; ++i) ASSERT_EQ(seen[size_t(i)], 1) << "block " << i << " visited " << seen[size_t(i)] << " times";
    }
  // the default order (lpt_group): groups of at least one pair and at most all of them
  cpu::AttnShape s = hook_shape(128, 128, 2048, 0);
  s.B = 32, s.H = 6, s.Hkv = 3;
  const char* env = std::getenv("DMAT_ATTN_ORDER");
  const bool launch = env != nullptr && std::string(env) == "launch", lpt = env == nullptr || std::string(env) == "lpt";
  for (int which : {0, 1, 2, 3}) {
    const int g = cuda::testing::flash_grid_order_group(s, which);
    if (launch) EXPECT_EQ(g, 0);
    else EXPECT_TRUE(g >= 1 && g <= (which >= 2 ? s.Hkv : s.H) * s.B) << "grid " << which << ": group " << g;
  }
  // the DMA dK/dV grid: every (KV head, batch) pair in one group
  if (lpt) EXPECT_EQ(cuda::testing::flash_grid_order_group(s, 3), s.Hkv * s.B);
}

TEST(FlashAttentionHooks, UnsupportedShapeIsAnError) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  cpu::AttnShape s = hook_shape(96, 96, 16, 0);
  EXPECT_FALSE(cuda::flash_attention_supported(s));
  EXPECT_THROW(cuda::flash_attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, s), Error);
}

#else  // !DMAT_WITH_CUDA

TEST(FlashAttention, NotBuilt) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  GTEST_SKIP() << "built without the CUDA backend";
}

#endif

}  // namespace
}  // namespace dmat
