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
#include "kernels/cuda/nsa.h"
#include "kernels/cuda/nsa_limits.h"
#include "kernels/cpu/nsa_ops.h"
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

// Native Sparse Attention's core at shape s (bench_attention's q, dout; its own keys and values):
// see attention_bench.h.
void bench_nsa(const AttnBenchOptions& o, const AttnShape& a, std::ostream& out) {
  NsaShape s;
  s.B = a.B, s.T = a.T, s.H = a.H, s.Hkv = a.Hkv, s.D = a.Dqk, s.scale = a.scale;
  s.window = o.window > 0 ? o.window : 512;  // the paper's l, d, l', n: NsaShape's defaults
  if (const std::string why = cuda::nsa_cuda_unsupported(s); !why.empty()) fail("bench attention --nsa: {}", why);
  const int64_t F = s.D, Nc = s.n_cmp(), l = s.cmp_block;
  const int64_t nq = s.B * s.T * s.H * s.D, nk = s.B * s.T * s.Hkv * s.D, nc = s.B * Nc * s.Hkv * s.D,
                nh = s.B * Nc * s.Hkv * F, nl = s.B * s.H * s.T, nidx = s.B * s.Hkv * s.T * s.sel_count;
  DevBuf q(nq * 2), dout(nq * 2), kraw(nk * 2), vraw(nk * 2), ks(nk * 2), vs(nk * 2), kw(nk * 2), vw(nk * 2),
      pos(l * s.D * 2 * 2), w1(F * l * s.D * 2 * 2), w2(s.D * F * 2 * 2), hid(nh * 2 * 2), kc(nc * 2), vc(nc * 2),
      z(s.B * s.T * 3 * s.H * 2), ob(nq * 2 * 3), gated(nq * 2), lse(nl * 4 * 3), idx(nidx * 4), dq(nq * 2), dq2(nq * 2),
      dk(nk * 2), dv(nk * 2), dob(nq * 2 * 3), dz(s.B * s.T * 3 * s.H * 2), dkc(nc * 2), dvc(nc * 2),
      dpos(l * s.D * 4 * 2), dw1(F * l * s.D * 4 * 2), dw2(s.D * F * 4 * 2);
  uint64_t seed = 10;
  for (DevBuf* b : {&q, &dout, &kraw, &vraw, &ks, &vs, &kw, &vw, &z})
    upload_random(b->p, int64_t(b == &q || b == &dout ? nq : b == &z ? s.B * s.T * 3 * s.H : nk), ++seed);
  upload_random(pos.p, 2 * l * s.D, ++seed);
  upload_random(w1.p, 2 * F * l * s.D, ++seed);  // uniform ±1: fine for timing (values do not change the work)
  upload_random(w2.p, 2 * s.D * F, ++seed);
  cuda::memset_zero(dpos.p, size_t(2 * l * s.D) * 4);
  cuda::memset_zero(dw1.p, size_t(2 * F * l * s.D) * 4);
  cuda::memset_zero(dw2.p, size_t(2 * s.D * F) * 4);
  auto B16 = [](DevBuf& d, int64_t off = 0) { return static_cast<bf16*>(d.p) + off; };
  auto F32 = [](DevBuf& d, int64_t off = 0) { return static_cast<float*>(d.p) + off; };
  int32_t* sel = static_cast<int32_t*>(idx.p);
  AttnShape win = a;
  win.window = s.window;
  const int64_t rows = s.B * s.T, lD = l * s.D, FlD = F * l * s.D, DF = s.D * F;

  auto compress = [&] {
    cuda::nsa_compress_forward(B16(kc), B16(hid), B16(kraw), B16(pos), B16(w1), B16(w2), F, s);
    cuda::nsa_compress_forward(B16(vc), B16(hid, nh), B16(vraw), B16(pos, lD), B16(w1, FlD), B16(w2, DF), F, s);
    cuda::nsa_compressed_rope_forward(B16(kc), B16(kc), 10000.0, s);
  };
  auto cmp = [&] { cuda::nsa_cmp_attention_forward(B16(ob), F32(lse), B16(q), B16(kc), B16(vc), s); };
  auto select = [&] { cuda::nsa_select(sel, B16(q), B16(kc), F32(lse), s); };
  auto slc = [&] { cuda::nsa_slc_attention_forward(B16(ob, nq), F32(lse, nl), B16(q), B16(ks), B16(vs), sel, s); };
  auto window = [&] { cuda::flash_attention_forward(B16(ob, 2 * nq), F32(lse, 2 * nl), B16(q), B16(kw), B16(vw), win); };
  auto gate = [&] { cuda::nsa_gate_forward(B16(gated), B16(z), B16(ob), B16(ob, nq), B16(ob, 2 * nq), rows, s.H, s.D); };
  auto fwd = [&] { compress(), cmp(), select(), slc(), window(), gate(); };
  auto fwdbwd = [&] {
    fwd();
    cuda::nsa_gate_backward(B16(dz), B16(dob), B16(dob, nq), B16(dob, 2 * nq), B16(dout), B16(z), B16(ob),
                            B16(ob, nq), B16(ob, 2 * nq), rows, s.H, s.D);
    cuda::flash_attention_backward(B16(dq), B16(dk), B16(dv), B16(dob, 2 * nq), B16(ob, 2 * nq), F32(lse, 2 * nl),
                                   B16(q), B16(kw), B16(vw), win, true);
    cuda::nsa_slc_attention_backward(B16(dq2), B16(dk), B16(dv), B16(dob, nq), B16(ob, nq), F32(lse, nl), B16(q),
                                     B16(ks), B16(vs), sel, s);
    cuda::nsa_cmp_attention_backward(B16(dq2), B16(dkc), B16(dvc), B16(dob), B16(ob), F32(lse), B16(q), B16(kc),
                                     B16(vc), s);
    cuda::nsa_compressed_rope_backward(B16(dkc), B16(dkc), 10000.0, s);
    cuda::nsa_compress_backward(B16(dk), F32(dpos), F32(dw1), F32(dw2), B16(dkc), B16(hid), B16(kraw), B16(pos),
                                B16(w1), B16(w2), F, s);
    cuda::nsa_compress_backward(B16(dv), F32(dpos, lD), F32(dw1, FlD), F32(dw2, DF), B16(dvc), B16(hid, nh),
                                B16(vraw), B16(pos, lD), B16(w1, FlD), B16(w2, DF), F, s);
  };
  const double fwd_ms = median_ms(fwd, o.iters), fwdbwd_ms = median_ms(fwdbwd, o.iters);
  const double compress_ms = median_ms(compress, o.iters), cmp_ms = median_ms(cmp, o.iters),
               select_ms = median_ms(select, o.iters), slc_ms = median_ms(slc, o.iters),
               win_ms = median_ms(window, o.iters);
  const double flops = cpu::nsa_core_flops_per_token(s, F) * double(s.B * s.T);  // forward, executed
  out << fmt::format(
             "{{\"bench\":\"attention\",\"variant\":\"nsa\",\"B\":{},\"T\":{},\"H\":{},\"Hkv\":{},\"D\":{},"
             "\"cmp_block\":{},\"cmp_stride\":{},\"sel_block\":{},\"sel_count\":{},\"window\":{},"
             "\"compress_ms\":{:.4f},\"cmp_fwd_ms\":{:.4f},\"select_ms\":{:.4f},\"slc_fwd_ms\":{:.4f},"
             "\"win_fwd_ms\":{:.4f},\"fwd_ms\":{:.4f},\"fwd_tflops\":{:.1f},\"fwdbwd_ms\":{:.4f},"
             "\"fwdbwd_tflops\":{:.1f},\"workspace_mib\":{:.1f},\"selection_mib\":{:.1f},"
             "\"flops_convention\":\"executed core: nsa_core_flops_per_token*B*T (compression MLPs included), fwd+bwd "
             "3.5x\"}}",
             s.B, s.T, s.H, s.Hkv, s.D, s.cmp_block, s.cmp_stride, s.sel_block, s.sel_count, s.window, compress_ms,
             cmp_ms, select_ms, slc_ms, win_ms, fwd_ms, flops / fwd_ms / 1e9, fwdbwd_ms,
             3.5 * flops / fwdbwd_ms / 1e9, double(cuda::workspace_bytes()) / (1 << 20),
             double(nidx) * 4 / (1 << 20))
      << std::endl;
}

}  // namespace

void bench_attention(const AttnBenchOptions& o, std::ostream& out) {
  AttnShape s;
  // --dim D: the pair of kernels/cuda/head_dims.h whose d_qk is D (192: MLA's 192/128)
  int64_t value_dim = 0;
  for (const cuda::HeadDims& h : cuda::kHeadDims)
    if (h.dqk == o.D) value_dim = h.dv;
  const cuda::AttnKernel kernel =
      o.dma > 0 ? cuda::AttnKernel::dma : o.nsa ? cuda::AttnKernel::nsa : cuda::AttnKernel::flash;
  if (!cuda::head_dims_supported(kernel, o.D, value_dim))
    fail("bench attention: --dim {} has no {} kernel (d_qk/d_v pairs: {})", o.D,
         o.dma > 0 ? "DMA" : o.nsa ? "NSA" : "attention", cuda::head_dims_list(kernel));
  s.B = o.B, s.T = o.T, s.H = o.H, s.Hkv = o.Hkv, s.Dqk = o.D, s.Dv = value_dim, s.window = o.window;
  s.scale = 1.0 / std::sqrt(double(s.Dqk));
  s.deterministic = o.deterministic;
  if (o.nsa) {
    bench_nsa(o, s, out);
    return;
  }
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
