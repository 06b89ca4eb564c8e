// flash_attention.h's entry points: argument checks, the kernel path per direction (FlashPath,
// run.kernels.attn_path), the order blocks start in (attn_order), and which kernels run in which
// order on which stream. The kernels and their launchers live in flash_{fwd,bwd}_sm{80,90}.cu
// (flash_common.cuh lists the launchers); here are only the family-independent kernels: the
// backward's preprocess and the grid-order check.
//
// Backward: (1) preprocess: delta_i = Σ dO∘O and lse·log2(e); (2) dK/dV, key-major, recomputing
// Pᵀ from lse, with deterministic == false on mma.sync also dQ += dS·K by fp32 atomics; (3) the
// deterministic dQ pass, query-major (or, after atomics, the fp32 accumulator to bf16).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/head_dims.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace flash;

// grid_pos's answer for every block of the launch (testing::flash_grid_order).
__global__ void flash_grid_order_kernel(int32_t* out, int order) {
  const GridPos gp = grid_pos(order);
  const int64_t l = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  out[3 * l] = gp.x, out[3 * l + 1] = gp.y, out[3 * l + 2] = gp.z;
}

// delta = Σ_d dO∘O and lse2 = lse·log2(e), TPR threads per (b, i, h) row (DV/8 up to 32: every
// lane holds one 16-byte chunk of O and of dO at head dim 128, where a warp per row left half the
// lanes idle; the attention backward did not measurably change with it — docs/perf-log.md).
template <int TPR>
__global__ void __launch_bounds__(256) flash_bwd_pre_kernel(const nv_bf16* out, const nv_bf16* dout,
                                                            const float* lse, float* delta, float* lse2,
                                                            int64_t rows, int T, int H, int DV) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / TPR;
  const int sub = int(threadIdx.x) % TPR;
  float acc = 0.f;
  if (row < rows) {  // no early return: the group sum's shuffles take the whole warp
    for (int d = sub * 8; d < DV; d += 8 * TPR) {
      float a[8], c[8];
      detail::load8(out + row * DV + d, a);
      detail::load8(dout + row * DV + d, c);
#pragma unroll
      for (int x = 0; x < 8; ++x) acc = fmaf(a[x], c[x], acc);
    }
  }
  acc = detail::group_sum<TPR>(acc);
  if (sub == 0 && row < rows) {
    const int h = int(row % H);
    const int64_t bt = row / H, i = bt % T, b = bt / T;
    const int64_t o = (b * H + h) * T + i;
    delta[o] = acc;
    lse2[o] = lse[o] * kLog2e;
  }
}

void check_args(const AttnShape& s, std::initializer_list<const void*> ptrs) {
  if (!flash_attention_supported(s))
    fail("flash attention: unsupported shape B={} T={} H={} Hkv={} Dqk={} Dv={} window={} (head dims {}; H a "
         "multiple of Hkv; 1 <= T < 2^31)",
         s.B, s.T, s.H, s.Hkv, s.Dqk, s.Dv, s.window, head_dims_list(AttnKernel::flash));
  for (const void* p : ptrs)
    DMAT_CHECK(detail::aligned16(p), "flash attention: tensors must be 16-byte aligned ({})", p);
}

// Launch order of the attention grids (grid_pos), kernel_options().attn_order: lpt (default, −1):
// groups of about a wave of blocks (lpt_group), heaviest tiles first inside a group; launch (0): the
// plain grid order (all tiles of one head, then the next); lptN (N): groups of N (head, batch) pairs.
// The group attn_order launch|lptN forces on a grid of `pairs` (head, batch) pairs, or launch
// order where grid_pos's 32-bit arithmetic would overflow; −1 where the grid's own rule applies.
int forced_group(const AttnShape& s, int64_t pairs) {
  const int c = kernel_options().attn_order;
  if (c == 0 || s.T * pairs >= (int64_t(1) << 31)) return 0;  // grid_pos computes in 32 bits (tiles ≤ T)
  if (c > 0) return int(std::min<int64_t>(c, pairs));
  return -1;
}

// grid_pos's group for a grid of `pairs` (head, batch) pairs of ceil(T / 128) tiles each (every
// dense grid: forward and dQ query tiles, dK/dV key blocks), each pair touching `tensors_per_pair`
// [T, Dqk + Dv] bf16 tensors' worth of one head. About one wave of blocks per group: its heaviest
// tiles run together and its light ones fill in behind. Where a pair alone has a wave of tiles or
// more (long sequences) the group is one pair — the launch order, which also keeps the pair's K/V
// (forward, dQ) or Q/dO (dK/dV) in L2 for all its blocks (grouping at N = 16K made the backward 1–2%
// slower). Never more pairs than fit in L2.
int lpt_group(const AttnShape& s, double tensors_per_pair, int64_t pairs) {
  static_assert(kWgBM == 128 && kFwdBM == 128 && kWgKvBN == 128 && 16 * kBwdWarps == 128, "tiles of 128");
  if (const int f = forced_group(s, pairs); f >= 0) return f;
  const int64_t tiles = (s.T + 127) / 128;
  const double unit = double(s.T) * double(s.Dqk + s.Dv) * 2.0 * tensors_per_pair;
  const int64_t fit = int64_t(double(l2_bytes()) / std::max(unit, 1.0));
  return int(std::clamp<int64_t>(std::min<int64_t>(sm_count() / tiles, fit), 1, pairs));
}
// forward: Q and O of the head, its share of K and V; dQ: Q, dO, dQ and the K/V share; dK/dV
// (per KV head): K, V, dK, dV and the group's Q and dO
int fwd_order(const AttnShape& s) { return lpt_group(s, 1.0 + double(s.Hkv) / double(s.H), s.H * s.B); }
int dq_order(const AttnShape& s) { return lpt_group(s, 1.5 + double(s.Hkv) / double(s.H), s.H * s.B); }
int dkdv_order(const AttnShape& s) { return lpt_group(s, 2.0 + double(s.H) / double(s.Hkv), s.Hkv * s.B); }
// The DMA dK/dV grid (key groups): one group of every (KV head, batch) pair, so its classes run
// heaviest first across all heads. A key group's query range is ~w for most classes but up to the
// rest of the row for class 0 (the longest-kept keys), ~8× a typical block at 16K; launched head by
// head (lpt_group's choice there), the last heads' class-0 blocks ran nearly alone at the end
// (grouping took ~9% off DMA's forward + backward at N = 16K, w = 2048; the dense dK/dV grid
// measured slower so grouped, hence only here; docs/perf-log.md).
int dma_dkdv_order(const AttnShape& s) {
  const int64_t pairs = s.Hkv * s.B;
  const int f = forced_group(s, pairs);
  return f >= 0 ? f : int(pairs);
}

// attn_wg_overlap selects the software-pipelined schedule of the wgmma forward, dQ and (head
// dim 64) dK/dV consumers; off, the default, the plain per-tile one (measured faster on the H200:
// forward 229 against 210 TFLOP/s, forward + backward 249 against 216).
bool wg_overlap() { return kernel_options().attn_wg_overlap; }

// The wgmma forward's dense-policy K/V tiles by TMA instead of cp.async: on by default (about twice
// the forward rate of the cp.async producer at N = 16384, D = 128; docs/perf-log.md). attn_wg_tma = 0
// turns it off.
bool wg_tma() { return kernel_options().attn_wg_tma; }

bool wgmma_dims(const AttnShape& s) { return head_dims_wgmma(s.Dqk, s.Dv); }

// kernel_options().attn_path: auto, mma or wgmma for both directions.
FlashPath env_path() {
  switch (kernel_options().attn_path) {
    case AttnPathOption::mma: return FlashPath::mma;
    case AttnPathOption::wgmma: return FlashPath::wgmma;
    default: return FlashPath::automatic;
  }
}

// automatic picks, per direction, the path measured faster on Hopper (docs/perf-log.md; causal
// N = 16384, H = 16, D = 128): forward wgmma with the TMA producer (mma.sync is faster than wgmma
// with cp.async, so without TMA the forward stays on mma.sync), backward wgmma (~1.4× mma.sync). run.kernels.attn_path overrides both directions.
enum class Direction { forward, backward };
FlashPath resolve_path(const AttnShape& s, FlashPath requested, Direction dir) {
  const bool explicit_request = requested != FlashPath::automatic;
  FlashPath want = explicit_request ? requested : env_path();
  if (want == FlashPath::automatic && dir == Direction::forward && !wg_tma()) want = FlashPath::mma;
  if (want == FlashPath::mma) return FlashPath::mma;
  const bool ok = wgmma_dims(s) && device_runs_sm90a();
  if (want == FlashPath::wgmma && !device_runs_sm90a())
    fail("flash attention: the wgmma path needs a compute capability 9.0 GPU and a build for sm_90a "
         "(CMAKE_CUDA_ARCHITECTURES containing 90a)");
  if (want == FlashPath::wgmma && explicit_request && !ok)
    fail("flash attention: no wgmma kernel for head dims ({}, {}) (only for the pairs of kernels/cuda/head_dims.h "
         "marked wgmma)",
         s.Dqk, s.Dv);
  return ok ? FlashPath::wgmma : FlashPath::mma;  // attn_path wgmma: head dims without one use mma
}

// The forward's kernel on the resolved path: wgmma where the head dims have one, else mma.sync.
void forward_dispatch(const FwdParams& p, const AttnShape& s, FlashPath path, KeyTiles keys, bool bias) {
  if (path == FlashPath::wgmma && wgmma_dims(s)) launch_fwd_sm90(p, s, keys, bias, wg_overlap(), wg_tma());
  else launch_fwd_sm80(p, s, keys, bias);
}

// The backward's kernels after the preprocess. wgmma: dK/dV by the Hopper kernel where the head
// dims have one (else the mma.sync kernel without atomics), then the deterministic Hopper dQ pass,
// on the side stream beside it, for either value of deterministic (it is the faster dQ on Hopper).
// mma.sync: dK/dV then the dQ pass, or (!deterministic) dK/dV adding dQ by atomics into an fp32
// accumulator, converted after.
void backward_dispatch(const BwdParams& p, const AttnShape& s, bool deterministic, bool wg, SideStream* side) {
  const int q_tiles = int((s.T + kFwdBM - 1) / kFwdBM);
  if (wg) {
    if (!launch_bwd_dkdv_sm90(p, s, false, wg_overlap())) launch_bwd_dkdv_sm80(p, s, false, false);
    side->run([&] { launch_bwd_dq_sm90(p, s, false, wg_overlap(), q_tiles); });
    return;
  }
  if (deterministic) {
    launch_bwd_dkdv_sm80(p, s, false, false);
    launch_bwd_dq_sm80(p, s, false, q_tiles);
  } else {
    launch_bwd_dkdv_sm80(p, s, false, true);
    launch_bwd_dq_convert(p, s);
  }
}

// delta = Σ dO∘O and lse·log2e into workspace(); fills the common BwdParams fields.
BwdParams backward_setup(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                         const bf16* q, const bf16* k, const bf16* v, const AttnShape& s) {
  const int64_t rows = s.B * s.T * s.H;
  float* stats = static_cast<float*>(workspace(size_t(2 * rows) * sizeof(float)));
  BwdParams p{};
  p.q = nv(q), p.k = nv(k), p.v = nv(v), p.dout = nv(dout), p.dq = nv(dq), p.dk = nv(dk), p.dv = nv(dv);
  p.delta = stats, p.lse2 = stats + rows;
  p.T = int(s.T), p.H = int(s.H), p.Hkv = int(s.Hkv), p.window = int(s.window);
  p.scale = float(s.scale), p.scale_log2 = float(s.scale) * kLog2e;
  // threads per row: the largest power of two <= min(32, Dv/8) (head dims are multiples of 8)
  auto launch = [&](auto tpr) {
    constexpr int TPR = decltype(tpr)::value;
    const int64_t threads = rows * TPR;
    flash_bwd_pre_kernel<TPR><<<unsigned((threads + 255) / 256), 256, 0, stream()>>>(
        nv(out), nv(dout), lse, stats, stats + rows, rows, p.T, p.H, int(s.Dv));
  };
  if (s.Dv >= 256) launch(std::integral_constant<int, 32>{});
  else if (s.Dv >= 128) launch(std::integral_constant<int, 16>{});
  else if (s.Dv >= 64) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 4>{});
  DMAT_CUDA_LAUNCH_CHECK();
  return p;
}

}  // namespace

bool flash_attention_supported(const AttnShape& s) {
  return head_dims_supported(AttnKernel::flash, s.Dqk, s.Dv) && s.B >= 1 && s.T >= 1 && s.T < (int64_t(1) << 31) - 256 && s.Hkv >= 1 && s.H % s.Hkv == 0 &&
         s.H <= 65535 && s.B <= 65535 && s.window >= 0 && s.window < (int64_t(1) << 31);
}

bool flash_attention_wgmma_available(const AttnShape& s) { return wgmma_dims(s) && device_runs_sm90a(); }

FlashPath flash_attention_forward_path_for(const AttnShape& s, FlashPath requested) {
  return resolve_path(s, requested, Direction::forward);
}

FlashPath flash_attention_backward_path_for(const AttnShape& s, FlashPath requested) {
  return resolve_path(s, requested, Direction::backward);
}

int flash_attention_block_q() { return kFwdBM; }

int attention_side_stream() { return kernel_options().attn_side_stream; }

void flash_attention_forward_path(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                  const AttnShape& s, const float* key_bias, const FlashGather* gather,
                                  FlashPath path) {
  check_args(s, {out, q, k, v});
  const FlashPath use = resolve_path(s, path, Direction::forward);
  FwdParams p{};
  p.q = nv(q), p.k = nv(k), p.v = nv(v), p.out = nv(out), p.lse = lse, p.bias = key_bias;
  p.T = int(s.T), p.H = int(s.H), p.Hkv = int(s.Hkv), p.window = int(s.window);
  p.scale_log2 = float(s.scale) * kLog2e;
  p.order = fwd_order(s);
  if (gather && !gather->keys) {  // dense DMA: every causal key, the threshold mask on every tile
    DMAT_CHECK(gather->thr && key_bias && gather->tile0 == 0 && gather->tiles < 0,
               "flash attention: a gather without lists (dense DMA) needs thresholds, the key bias and all tiles");
    p.thr = gather->thr;
    p.local = p.window, p.window = 0;  // DMA: the shape's window is the local window (dma.h)
    forward_dispatch(p, s, use, KeyTiles::dense, true);
  } else if (gather) {
    DMAT_CHECK(gather->keys && gather->count && gather->capacity >= 0, "flash attention: incomplete gather list");
    DMAT_CHECK(!gather->thr || s.window == 0,
               "flash attention: DMA's local window ({}) runs dense (no gathered lists)", s.window);
    p.gkeys = gather->keys, p.gcount = gather->count, p.gcap = gather->capacity, p.thr = gather->thr;
    p.gclean = gather->clean;
    const int64_t all = (s.T + kFwdBM - 1) / kFwdBM;
    const int64_t n = gather->tiles < 0 ? all - gather->tile0 : gather->tiles;
    DMAT_CHECK(gather->tile0 >= 0 && n >= 0 && gather->tile0 + n <= all,
               "flash attention: gather tiles {} + {} of {}", gather->tile0, n, all);
    if (n == 0) return;
    p.qt0 = int(gather->tile0), p.n_tiles = int(n);
    DMAT_CHECK(!gather->thr || key_bias, "flash attention: a gather threshold needs the key bias");
    forward_dispatch(p, s, use, KeyTiles::gathered, key_bias != nullptr);
  } else {
    forward_dispatch(p, s, use, KeyTiles::dense, key_bias != nullptr);
  }
}

void flash_attention_forward_ext(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                 const AttnShape& s, const float* key_bias, const FlashGather* gather) {
  flash_attention_forward_path(out, lse, q, k, v, s, key_bias, gather, FlashPath::automatic);
}

void flash_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const AttnShape& s) {
  flash_attention_forward_path(out, lse, q, k, v, s, nullptr, nullptr, FlashPath::automatic);
}

void flash_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                              const bf16* q, const bf16* k, const bf16* v, const AttnShape& s, bool deterministic) {
  flash_attention_backward_path(dq, dk, dv, dout, out, lse, q, k, v, s, deterministic, FlashPath::automatic);
}

void flash_attention_backward_path(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                                   const bf16* q, const bf16* k, const bf16* v, const AttnShape& s, bool deterministic,
                                   FlashPath path) {
  check_args(s, {dq, dk, dv, dout, out, q, k, v});
  const bool wg = resolve_path(s, path, Direction::backward) == FlashPath::wgmma;
  // workspace(): delta and lse·log2e; workspace2(): the fp32 dQ accumulator (non-deterministic)
  BwdParams p = backward_setup(dq, dk, dv, dout, out, lse, q, k, v, s);
  const int64_t rows = s.B * s.T * s.H;
  p.dq_acc = deterministic || wg ? nullptr : static_cast<float*>(workspace2(size_t(rows * s.Dqk) * sizeof(float)));
  p.order = dq_order(s), p.order_kv = dkdv_order(s);
  // the wgmma path's dQ pass on a side stream, forked after the delta kernel, beside the dK/dV pass
  SideStream side(attention_side_stream());
  // wg is false for a pair without a wgmma kernel (resolve_path)
  backward_dispatch(p, s, deterministic, wg, &side);
  side.join();
}

void flash_attention_backward_dma(bf16* dq, bf16* dk, bf16* dv, float* dbias, const bf16* dout, const bf16* out,
                                  const float* lse, const bf16* q, const bf16* k, const bf16* v, const AttnShape& s,
                                  const float* key_bias, const float* thr, const FlashKeyGroups& groups,
                                  int64_t tiles_per_batch, const FlashGatherSource& lists, FlashPath path,
                                  SideStream* side) {
  check_args(s, {dq, dk, dv, dout, out, q, k, v});
  const bool wg = resolve_path(s, path, Direction::backward) == FlashPath::wgmma;
  const bool dense = !groups.keys && !lists;  // dense DMA: no key groups, no lists
  DMAT_CHECK(head_dims_supported(AttnKernel::dma, s.Dqk, s.Dv) && (s.window == 0 || dense),
             "flash attention (DMA backward): head dims ({}, {}) local window {} (head dims {}; a local window only "
             "dense)",
             s.Dqk, s.Dv, s.window, head_dims_list(AttnKernel::dma));
  DMAT_CHECK(key_bias && thr && dbias &&
                 (dense || (groups.keys && groups.range && groups.n_groups > 0 && groups.regions > 0 &&
                            groups.n_groups % groups.regions == 0 && groups.n_groups * kFlashGroupKeys >= s.T &&
                            groups.n_groups < (int64_t(1) << 31) && tiles_per_batch > 0 && lists)),
             "flash attention (DMA backward): incomplete groups or lists ({} groups in {} regions for T={})",
             groups.n_groups, groups.regions, s.T);
  // With a side stream (dma_attention_backward, which queued the key groups on it and marked
  // them): the first batch's lists and every dQ pass go to the side, beside the delta kernel and
  // the dK/dV pass on the compute stream; the dK/dV pass waits for the groups only.
  const int64_t all = (s.T + kFwdBM - 1) / kFwdBM;
  auto on_side = [&](auto&& f) {
    if (side) side->run(f);
    else f();
  };
  FlashGather first{};
  if (!dense && side) on_side([&] { first = lists(0, std::min(tiles_per_batch, all)); });
  BwdParams p = backward_setup(dq, dk, dv, dout, out, lse, q, k, v, s);
  if (side) side->side_waits_main(), side->main_waits_mark();
  p.bias = key_bias, p.thr = thr, p.dbias = dbias;
  p.local = p.window, p.window = 0;  // the shape's window is DMA's local window (dma.h)
  p.grp_keys = groups.keys, p.grp_range = groups.range;
  // dense: one block per 128 consecutive keys (KvBlock without groups)
  p.n_groups = dense ? int((s.T + kFlashGroupKeys - 1) / kFlashGroupKeys) : int(groups.n_groups);
  p.grp_regions = dense ? 1 : int(groups.regions);
  p.order = dq_order(s), p.order_kv = dense ? dkdv_order(s) : dma_dkdv_order(s);
  // dK/dV/dbias key-major over the key groups, then dQ query-major over the gathered lists (wgmma
  // on the resolved path, which is mma.sync for a pair without a wgmma kernel; deterministic either way)
  if (!(wg && launch_bwd_dkdv_sm90(p, s, true, false))) launch_bwd_dkdv_sm80(p, s, true, false);
  auto dq_pass = [&](int n) {
    if (wg) launch_bwd_dq_sm90(p, s, true, false, n);
    else launch_bwd_dq_sm80(p, s, true, n);
  };
  if (dense) {  // dQ over every causal key (GatherKeys without lists), the mask on every tile
    p.gkeys = nullptr, p.gcount = nullptr, p.gclean = nullptr, p.gcap = 0, p.qt0 = 0;
    on_side([&] { dq_pass(int(all)); });
    return;
  }
  for (int64_t t0 = 0; t0 < all; t0 += tiles_per_batch) {
    const int64_t n = std::min(tiles_per_batch, all - t0);
    on_side([&] {
      const FlashGather g = t0 == 0 && side ? first : lists(t0, n);
      DMAT_CHECK(g.keys && g.count && g.thr == thr, "flash attention (DMA backward): lists for tiles {} + {}", t0, n);
      p.gkeys = g.keys, p.gcount = g.count, p.gcap = g.capacity, p.gclean = g.clean, p.qt0 = int(t0);
      dq_pass(int(n));
    });
  }
}

}  // namespace dmat::cuda

namespace dmat::cuda::testing {

int set_attention_side_stream(int mode) {
  DMAT_CHECK(mode >= 0 && mode <= 2, "attention side stream mode {} (0, 1 or 2)", mode);
  KernelOptions o = kernel_options();
  const int old = o.attn_side_stream;
  o.attn_side_stream = mode;
  set_kernel_options(o);
  return old;
}

void flash_grid_order(int32_t* out, int X, int Y, int Z, int order) {
  flash_grid_order_kernel<<<dim3(unsigned(X), unsigned(Y), unsigned(Z)), 1, 0, stream()>>>(out, order);
  DMAT_CUDA_LAUNCH_CHECK();
}

int flash_grid_order_group(const AttnShape& s, int which) {
  return which == 0 ? fwd_order(s) : which == 1 ? dq_order(s) : which == 2 ? dkdv_order(s) : dma_dkdv_order(s);
}

}  // namespace dmat::cuda::testing
