// Flash-attention benchmark: see attention_bench.h.
#include "bench/attention_bench.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/bf16.h"
#include "core/error.h"
#include "core/rng.h"

#ifdef DMAT_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/dma.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/head_dims.h"
#endif

namespace dmat {

#ifdef DMAT_WITH_CUDA
namespace {

struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(size_t bytes) : p(cuda::device_alloc(std::max<size_t>(bytes, 16))) {}
  ~DevBuf() { cuda::device_free(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

void upload_random(void* dst, int64_t n, uint64_t seed) {
  Rng r(seed);
  std::vector<bf16> h(static_cast<size_t>(n));
  for (auto& x : h) x = to_bf16(float(2 * r.uniform() - 1));
  cuda::memcpy_h2d(dst, h.data(), size_t(n) * sizeof(bf16));
}

// Median time in ms of fn() over `iters` runs after 3 warm-up runs, CUDA events on the stream.
template <class Fn>
double median_ms(Fn fn, int iters) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t a, b;
  DMAT_CUDA_CHECK(cudaEventCreate(&a));
  DMAT_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> ts;
  for (int i = 0; i < std::max(iters, 1); ++i) {
    DMAT_CUDA_CHECK(cudaEventRecord(a, cuda::stream()));
    fn();
    DMAT_CUDA_CHECK(cudaEventRecord(b, cuda::stream()));
    DMAT_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DMAT_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  DMAT_CUDA_CHECK(cudaEventDestroy(a));
  DMAT_CUDA_CHECK(cudaEventDestroy(b));
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

void bench_dma(const AttnBenchOptions& o, const AttnShape& s, void* q, void* k, void* v, void* dout, void* outb,
               void* dq, void* dk, void* dv, float* lse, std::ostream& out) {
  const int64_t rows = s.B * s.Hkv, n = rows * s.T, w = o.dma;
  std::vector<float> hb(static_cast<size_t>(n));
  Rng r(5);
  for (int64_t i = 0; i < n; ++i) {
    const float pos = float(i % s.T) / float(s.T);
    if (o.dma_bias == "normal") hb[size_t(i)] = float(r.normal());
    else if (o.dma_bias == "increasing") hb[size_t(i)] = pos;
    else if (o.dma_bias == "decreasing") hb[size_t(i)] = -pos;
    else if (o.dma_bias == "tied") hb[size_t(i)] = 1.f;
    else fail("bench attention: --dma-bias must be normal, increasing, decreasing or tied (got '{}')", o.dma_bias);
  }
  DevBuf bias(size_t(n) * 4), thr(size_t(n) * 4), dbias(size_t(n) * 4);
  cuda::memcpy_h2d(bias.p, hb.data(), size_t(n) * 4);
  auto F = [](DevBuf& d) { return static_cast<float*>(d.p); };
  auto B16 = [](void* p) { return static_cast<bf16*>(p); };
  auto fwd = [&] {
    cuda::dma_thresholds(F(thr), F(bias), rows, s.T, w);
    cuda::dma_attention_forward(B16(outb), lse, B16(q), B16(k), B16(v), F(bias), F(thr), s, w);
  };
  auto fwdbwd = [&] {
    fwd();
    cuda::dma_attention_backward(B16(dq), B16(dk), B16(dv), F(dbias), B16(dout), B16(outb), lse, B16(q), B16(k),
                                 B16(v), F(bias), F(thr), s, w);
  };
  auto thr_only = [&] { cuda::dma_thresholds(F(thr), F(bias), rows, s.T, w); };
  const double thr_ms = median_ms(thr_only, o.iters), fwd_ms = median_ms(fwd, o.iters),
               fwdbwd_ms = median_ms(fwdbwd, o.iters);
  // the mask structures alone (thr as left by the runs above)
  const int64_t tiles = cuda::dma_gather_tiles(s.T), cap = cuda::dma_gather_capacity(s.T, w),
                ng = cuda::dma_group_count(s.T);
  DevBuf lk(size_t(rows * tiles * cap) * 4), lc(size_t(rows * tiles) * 4), lcl(size_t(rows * tiles) * 4),
      lw(size_t(cuda::dma_gather_work_ints(rows, s.T, cap, tiles)) * 4), gk(size_t(rows * ng) * 128 * 4),
      gr(size_t(rows * ng) * 2 * 4);
  auto I = [](DevBuf& d) { return static_cast<int32_t*>(d.p); };
  const double lists_ms = median_ms(
      [&] { cuda::dma_gather_keys(I(lk), I(lc), nullptr, cap, F(bias), F(thr), rows, s.T, 0, -1, I(lcl), I(lw)); },
      o.iters);
  const double groups_ms =
      median_ms([&] { cuda::dma_key_groups(I(gk), I(gr), F(bias), F(thr), rows, s.T); }, o.iters);
  const double wd = double(std::min(w, s.T)), nd = double(s.T);
  const double pairs = wd * (wd + 1) / 2 + (nd - wd) * wd;  // kept pairs without ties
  const double fwd_flops = 2.0 * double(s.B * s.H) * pairs * double(s.Dqk + s.Dv);
  out << fmt::format(
             "{{\"bench\":\"attention\",\"variant\":\"dma\",\"bias\":\"{}\",\"B\":{},\"T\":{},\"H\":{},\"Hkv\":{},\"Dqk\":{},\"Dv\":{},"
             "\"keep\":{},\"thr_ms\":{:.4f},\"lists_ms\":{:.4f},\"groups_ms\":{:.4f},\"fwd_ms\":{:.4f},\"fwd_tflops\":{:.1f},\"fwdbwd_ms\":{:.4f},"
             "\"fwdbwd_tflops\":{:.1f},\"workspace_mib\":{:.1f},\"mask_mib\":{:.1f},"
             "\"flops_convention\":\"kept pairs: fwd 2*B*H*pairs*(Dqk+Dv), fwd+bwd 3.5x; times include thresholds\"}}",
             o.dma_bias, s.B, s.T, s.H, s.Hkv, s.Dqk, s.Dv, w, thr_ms, lists_ms, groups_ms, fwd_ms, fwd_flops / fwd_ms / 1e9, fwdbwd_ms,
             3.5 * fwd_flops / fwdbwd_ms / 1e9, double(cuda::workspace_bytes()) / (1 << 20),
             3.0 * double(n) * 4 / (1 << 20))
      << std::endl;
}

}  // namespace

void bench_attention(const AttnBenchOptions& o, std::ostream& out) {
  AttnShape s;
  // --dim D: the pair of kernels/cuda/head_dims.h whose d_qk is D (192: MLA's 192/128)
  int64_t value_dim = 0;
  for (const cuda::HeadDims& h : cuda::kHeadDims)
    if (h.dqk == o.D) value_dim = h.dv;
  const cuda::AttnKernel kernel = o.dma > 0 ? cuda::AttnKernel::dma : cuda::AttnKernel::flash;
  if (!cuda::head_dims_supported(kernel, o.D, value_dim))
    fail("bench attention: --dim {} has no {} kernel (d_qk/d_v pairs: {})", o.D, o.dma > 0 ? "DMA" : "attention",
         cuda::head_dims_list(kernel));
  s.B = o.B, s.T = o.T, s.H = o.H, s.Hkv = o.Hkv, s.Dqk = o.D, s.Dv = value_dim, s.window = o.window;
  s.scale = 1.0 / std::sqrt(double(s.Dqk));
  s.deterministic = o.deterministic;
  if (!cuda::flash_attention_supported(s))
    fail("bench attention: unsupported shape B={} T={} H={} Hkv={} D={} window={} (H a multiple of Hkv)", o.B, o.T,
         o.H, o.Hkv, o.D, o.window);
  cuda::FlashPath want = cuda::FlashPath::automatic;
  if (o.path == "mma") want = cuda::FlashPath::mma;
  else if (o.path == "wgmma") want = cuda::FlashPath::wgmma;
  else if (o.path != "auto") fail("bench attention: path must be auto, mma or wgmma (got '{}')", o.path);
  const cuda::FlashPath fpath = cuda::flash_attention_forward_path_for(s, want),
                        bpath = cuda::flash_attention_backward_path_for(s, want);
  const int64_t nq = s.B * s.T * s.H * s.Dqk, nk = s.B * s.T * s.Hkv * s.Dqk, nv = s.B * s.T * s.Hkv * s.Dv,
                no = s.B * s.T * s.H * s.Dv, nl = s.B * s.H * s.T;
  DevBuf q(nq * 2), k(nk * 2), v(nv * 2), dout(no * 2), outb(no * 2), dq(nq * 2), dk(nk * 2), dv(nv * 2), lse(nl * 4);
  upload_random(q.p, nq, 1), upload_random(k.p, nk, 2), upload_random(v.p, nv, 3), upload_random(dout.p, no, 4);
  auto B16 = [](DevBuf& d) { return static_cast<bf16*>(d.p); };
  if (o.dma > 0) {
    bench_dma(o, s, q.p, k.p, v.p, dout.p, outb.p, dq.p, dk.p, dv.p, static_cast<float*>(lse.p), out);
    return;
  }
  auto fwd = [&] {
    cuda::flash_attention_forward_path(B16(outb), static_cast<float*>(lse.p), B16(q), B16(k), B16(v), s, nullptr,
                                       nullptr, fpath);
  };
  auto fwdbwd = [&] {
    fwd();
    cuda::flash_attention_backward_path(B16(dq), B16(dk), B16(dv), B16(dout), B16(outb), static_cast<float*>(lse.p),
                                        B16(q), B16(k), B16(v), s, o.deterministic, bpath);
  };
  const double fwd_ms = median_ms(fwd, o.iters), fwdbwd_ms = median_ms(fwdbwd, o.iters);

  // Visible (query, key) pairs per head: N²/2 for causal (the anchors' convention), else counted.
  double pairs = 0;
  std::string convention;
  if (s.window == 0) {
    pairs = double(s.T) * double(s.T) / 2;
    convention = "causal: fwd 2*B*H*(N^2/2)*(Dqk+Dv), fwd+bwd 3.5x";
  } else {
    const double w = double(s.window), n = double(s.T);
    pairs = w >= n ? n * (n + 1) / 2 : w * (w + 1) / 2 + (n - w) * w;
    convention = "window: fwd 2*B*H*visible_pairs*(Dqk+Dv), fwd+bwd 3.5x";
  }
  const double fwd_flops = 2.0 * double(s.B * s.H) * pairs * double(s.Dqk + s.Dv);
  out << fmt::format(
             "{{\"bench\":\"attention\",\"fwd_path\":\"{}\",\"bwd_path\":\"{}\",\"B\":{},\"T\":{},\"H\":{},\"Hkv\":{},\"Dqk\":{},\"Dv\":{},\"window\":{},"
             "\"deterministic\":{},\"fwd_ms\":{:.4f},\"fwd_tflops\":{:.1f},\"fwdbwd_ms\":{:.4f},"
             "\"fwdbwd_tflops\":{:.1f},\"flops_convention\":\"{}\"}}",
             fpath == cuda::FlashPath::wgmma ? "wgmma" : "mma", bpath == cuda::FlashPath::wgmma ? "wgmma" : "mma", s.B, s.T, s.H, s.Hkv, s.Dqk, s.Dv, s.window, o.deterministic ? "true" : "false", fwd_ms,
             fwd_flops / fwd_ms / 1e9, fwdbwd_ms, 3.5 * fwd_flops / fwdbwd_ms / 1e9, convention)
      << std::endl;
}

#else

void bench_attention(const AttnBenchOptions&, std::ostream&) {
  fail("bench attention: this build has no CUDA backend (configure with -DDMAT_CUDA=ON on a machine with nvcc)");
}

#endif

}  // namespace dmat
