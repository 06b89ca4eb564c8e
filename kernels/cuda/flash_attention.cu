// FlashAttention-2-style forward and backward on mma.sync tensor cores (bf16 in, fp32 accumulate),
// for causal / sliding-window attention with grouped KV heads. Semantics: cpu::attention_*.
//
// Forward: one block per (query tile of 16·warps rows, head, batch); each warp owns 16 query rows
// and keeps its Q fragments in registers; K/V tiles of kBN keys stream through a 2-stage cp.async
// pipeline; scores are pre-scaled by scale·log2(e) so the online softmax uses exp2 (fast_exp2).
// The key tiles a query tile visits come from a key-tile policy (DenseKeys: causal ± window, GatherKeys:
// an explicit key list per query tile) and an optional per-key bias is added to the scores; the
// DMA/NSA kernels reuse this loop through those two template parameters.
//
// Backward: (1) preprocess: delta_i = Σ dO∘O and lse·log2(e); (2) dK/dV: one block per (key
// tile, KV head, batch) looping over the query heads of the group, then the query tiles, in a
// fixed order (deterministic sums), recomputing P^T from lse; with deterministic == false it also
// adds dS·K into an fp32 dQ accumulator with atomics; (3a) deterministic dQ: one block per query
// tile looping over key tiles, or (3b) fp32 accumulator -> bf16.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)

#include "core/env.h"
#include "core/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/flash_tiles.cuh"
#include "kernels/cuda/flash_wgmma.cuh"
#include "kernels/cuda/head_dims.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using detail::nv_bf16;
using namespace flash;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Forward tiling: 8 warps x 16 rows = 128 queries per block, 64 keys per tile.
constexpr int kFwdWarps = 8, kFwdBM = 16 * kFwdWarps, kFwdBN = 64;
// dQ pass: same query tiling; dK/dV pass: 8 warps x 16 keys = 128 keys per block.
constexpr int kBwdWarps = 8;

__device__ __forceinline__ bool visible(int i, int j, int window) {
  return j >= 0 && j <= i && (window <= 0 || j > i - window);
}
// DMA: visible key j is dropped for query i when its raw bias is below the query's threshold and it
// is outside the local window (local = 0: every key is outside; then this is braw < thr).
__device__ __forceinline__ bool dma_drops(float braw, float thr, int i, int j, int local) {
  return braw < thr && j <= i - local;
}

// ---- key-tile policies -----------------------------------------------------------------------
// A policy answers, for one query tile: how many key tiles, the key position at (tile n, row r)
// (-1: padding, loaded as zeros and masked), and whether tile n needs per-element masking.
template <int BN>
struct DenseKeys {
  static constexpr int kBN = BN;
  static constexpr bool kGathered = false;
  int first = 0, count = 0, q_lo = 0, q_hi = 0, window = 0;
  bool all = false;  // every tile masked (DMA without lists: the threshold mask applies anywhere)
  __device__ DenseKeys(int q0, int bm, int T, int window_, bool all_ = false) : window(window_), all(all_) {
    q_lo = q0;
    q_hi = min(q0 + bm, T) - 1;
    const int lo = window > 0 ? max(0, q_lo - window + 1) : 0;
    first = lo / BN;
    count = q_hi / BN + 1 - first;
  }
  __device__ __forceinline__ int key(int n, int r) const { return (first + n) * BN + r; }
  // Mask only where some (i, j) of the tile is invisible: the causal diagonal (which also covers
  // keys >= T), or a key older than the window for the newest query of the tile.
  __device__ __forceinline__ bool needs_causal_mask(int n) const {
    const int k0 = (first + n) * BN;
    return k0 + BN - 1 > q_lo || (window > 0 && k0 <= q_hi - window);
  }
  __device__ __forceinline__ bool needs_mask(int n) const { return all || needs_causal_mask(n); }
};

// keys == nullptr: the tile's list overflowed its capacity (biases tied at the threshold), so every
// key 0 .. n_keys − 1 is visited instead (the element mask still applies): slower, never wrong.
// The first n_clean keys of a list are kept by every query of the tile (FlashGather::clean), so
// the key tiles made only of them need no element mask.
template <int BN>
struct GatherKeys {
  static constexpr int kBN = BN;
  static constexpr bool kGathered = true;
  const int32_t* keys = nullptr;
  int n_keys = 0, count = 0, clean_tiles = 0;
  __device__ GatherKeys(const int32_t* keys_, int n_keys_, int n_clean) : keys(keys_), n_keys(n_keys_) {
    count = (n_keys + BN - 1) / BN;
    clean_tiles = keys ? min(n_clean, n_keys) / BN : 0;
  }
  __device__ __forceinline__ int key(int n, int r) const {
    const int idx = n * BN + r;
    if (idx >= n_keys) return -1;
    return keys ? __ldg(keys + idx) : idx;
  }
  __device__ __forceinline__ bool needs_mask(int n) const { return n >= clean_tiles; }
};

struct FwdParams {
  const nv_bf16* q;
  const nv_bf16* k;
  const nv_bf16* v;
  nv_bf16* out;
  float* lse;
  const float* bias;  // [B, Hkv, T] or nullptr
  const float* thr;   // [B, Hkv, T] or nullptr: per-query threshold on the raw key bias (gathered + bias only)
  int local;          // DMA's local window L (keys j > i − L kept whatever their bias; thr then covers j <= i − L)
  const int32_t* gkeys;
  const int32_t* gcount;
  const int32_t* gclean;  // nullptr: no clean prefixes
  int64_t gcap;
  int T, H, Hkv, window;
  float scale_log2;
  int qt0;      // first query tile of the launch (gathered lists in batches of tiles), else 0
  int n_tiles;  // gathered: query tiles in the launch
  int order;    // grid_pos: 0 launch order, g > 0 heaviest tiles first in groups of g (head, batch) pairs
};

// Where a block of a (tile, head, batch) grid works. order 0: as launched — every tile of head 0
// (the kernels' tile x = 0 is the heaviest), then head 1, … order g > 0: the (head, batch) pairs in
// groups of g consecutive ones, and inside a group tile x of every pair before tile x + 1 of any,
// so the group's heaviest tiles start first and its lightest fill the tail (longest-processing-time
// order); g from lpt_group on the host (about one wave of blocks per group). A bijection of the grid.
struct GridPos {
  int x, y, z;
};
__device__ __forceinline__ GridPos grid_pos(int order) {
  if (order <= 0) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  // 32-bit: lpt_group orders only grids of fewer than 2^31 blocks
  const int X = gridDim.x, Y = gridDim.y, YZ = Y * int(gridDim.z);
  const int lin = int(blockIdx.x) + X * (int(blockIdx.y) + Y * int(blockIdx.z));
  const int g0 = lin / (X * order) * order;  // the group's first (head, batch) pair
  const int n = min(order, YZ - g0);         // pairs in this group (the last may have fewer)
  const int r = lin - g0 * X, yz = g0 + r % n;
  return {r / n, yz % Y, yz / Y};
}

__global__ void flash_grid_order_kernel(int32_t* out, int order) {
  const GridPos gp = grid_pos(order);
  const int64_t l = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  out[3 * l] = gp.x, out[3 * l + 1] = gp.y, out[3 * l + 2] = gp.z;
}

// The key policy of query tile qt (of bm rows from q0) in a grid of one block per query tile; P:
// FwdParams or BwdParams (T, Hkv, window and the gather list fields).
template <class Keys>
struct MakeKeys;
template <int BN>
struct MakeKeys<DenseKeys<BN>> {
  template <class P>
  __device__ static DenseKeys<BN> make(const P& p, int, int, int, int q0, int bm) {
    return DenseKeys<BN>(q0, bm, p.T, p.window, p.thr != nullptr);
  }
};
template <int BN>
struct MakeKeys<GatherKeys<BN>> {
  template <class P>
  __device__ static GatherKeys<BN> make(const P& p, int b, int hk, int qt, int q0, int bm) {
    const int64_t n_tiles = gridDim.x;  // the lists cover this launch's tiles qt0 .. qt0 + n_tiles − 1
    const int64_t list = (int64_t(b) * p.Hkv + hk) * n_tiles + (qt - p.qt0);
    if (p.gkeys == nullptr) return GatherKeys<BN>(nullptr, min(q0 + bm, p.T), 0);  // no lists (dense DMA)
    const int n = __ldg(p.gcount + list);
    if (n > p.gcap) return GatherKeys<BN>(nullptr, min(q0 + bm, p.T), 0);  // overflowed: dense fallback
    return GatherKeys<BN>(p.gkeys + list * p.gcap, max(n, 0), p.gclean ? __ldg(p.gclean + list) : 0);
  }
};

// ---- forward ---------------------------------------------------------------------------------
template <int DQK, int DV, int WARPS, int BN, class Keys, bool BIAS>
__global__ void __launch_bounds__(WARPS * 32, 1) flash_fwd_kernel(const FwdParams p) {
  constexpr int BM = 16 * WARPS, THREADS = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);  // [BM][DQK]
  nv_bf16* sK = sQ + BM * DQK;                          // [2][BN][DQK]
  nv_bf16* sV = sK + 2 * BN * DQK;                      // [2][BN][DV]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const GridPos gp = grid_pos(p.order);
  const int qt = p.qt0 + int(gridDim.x) - 1 - gp.x;  // the longest (latest) causal tiles start first
  const int h = gp.y, b = gp.z, hk = h / (p.H / p.Hkv);
  const int q0 = qt * BM;
  const int64_t q_stride = int64_t(p.H) * DQK, k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
  const nv_bf16* qg = p.q + (int64_t(b) * p.T * p.H + h) * DQK;
  const nv_bf16* kg = p.k + (int64_t(b) * p.T * p.Hkv + hk) * DQK;
  const nv_bf16* vg = p.v + (int64_t(b) * p.T * p.Hkv + hk) * DV;
  const float* bias = BIAS ? p.bias + (int64_t(b) * p.Hkv + hk) * p.T : nullptr;
  const float* thr = BIAS && p.thr ? p.thr + (int64_t(b) * p.Hkv + hk) * p.T : nullptr;
  const Keys keys = MakeKeys<Keys>::make(p, b, hk, qt, q0, BM);
  const int T = p.T;

  load_tile_async<BM, DQK, THREADS>(sQ, qg, [&](int r) -> const nv_bf16* {
    return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
  });
  cp_async_commit();
  auto load_kv = [&](int n, int stage) {
    load_tile_async<BN, DQK, THREADS>(sK + stage * BN * DQK, kg, [&](int r) -> const nv_bf16* {
      const int j = keys.key(n, r);
      return j >= 0 && j < T ? kg + int64_t(j) * k_stride : nullptr;
    });
    load_tile_async<BN, DV, THREADS>(sV + stage * BN * DV, vg, [&](int r) -> const nv_bf16* {
      const int j = keys.key(n, r);
      return j >= 0 && j < T ? vg + int64_t(j) * v_stride : nullptr;
    });
  };
  const int n_tiles = keys.count;
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q landed (K/V tile 0 may still be in flight)
  __syncthreads();

  uint32_t qa[DQK / 16][4];
#pragma unroll
  for (int kk = 0; kk < DQK / 16; ++kk) load_a<DQK>(qa[kk], sQ, warp * 16, kk * 16, lane);

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // row max (log2 units), partial row sum
  Acc<DV> o;
  o.zero();
  const int row0 = q0 + warp * 16 + g;  // this thread's rows: row0 (c0,c1) and row0 + 8 (c2,c3)
  // DMA: a key is masked for row i where its raw bias < thr_i (−inf: no threshold)
  float thr_r[2] = {-INFINITY, -INFINITY};
  if (thr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) thr_r[hf] = row0 + 8 * hf < T ? __ldg(thr + row0 + 8 * hf) : -INFINITY;
  }

  for (int n = 0; n < n_tiles; ++n) {
    const int st = n & 1;
    if (n + 1 < n_tiles) load_kv(n + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const nv_bf16* sKs = sK + st * BN * DQK;
    const nv_bf16* sVs = sV + st * BN * DV;

    // S = Q K^T
    Acc<BN> s;
    s.zero();
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];
        load_b<DQK>(kb, sKs, np * 16, kk * 16, lane);
        mma16816(s.c[2 * np], qa[kk], kb[0], kb[1]);
        mma16816(s.c[2 * np + 1], qa[kk], kb[2], kb[3]);
      }
    }

    // log2-domain scores, bias, mask
    const bool mask = keys.needs_mask(n);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = keys.key(n, nb * 8 + 2 * t + e);
        float braw = 0.f;  // compared with thr_r exactly (both copies of the same fp32 biases)
        if constexpr (BIAS) braw = (j >= 0 && j < T) ? __ldg(bias + j) : 0.f;
        const float bj = braw * kLog2e;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float& x = s.c[nb][2 * hf + e];
          x = fmaf(x, p.scale_log2, bj);
          if (mask && (!visible(row0 + 8 * hf, j, p.window) || dma_drops(braw, thr_r[hf], row0 + 8 * hf, j, p.local)))
            x = -INFINITY;
        }
      }
    }

    // online softmax: rescale the running output by exp2(m_old - m_new)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s.c[nb][2 * hf], s.c[nb][2 * hf + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hf], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      const float alpha = fast_exp2(m[hf] - base);
      m[hf] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
        s.c[nb][2 * hf] = fast_exp2(s.c[nb][2 * hf] - base);
        s.c[nb][2 * hf + 1] = fast_exp2(s.c[nb][2 * hf + 1] - base);
        sum += s.c[nb][2 * hf] + s.c[nb][2 * hf + 1];
      }
      l[hf] = l[hf] * alpha + sum;
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb) {
        o.c[nb][2 * hf] *= alpha;
        o.c[nb][2 * hf + 1] *= alpha;
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      s.to_a(pa, kk);
#pragma unroll
      for (int np = 0; np < DV / 16; ++np) {
        uint32_t vb[4];
        load_b_t<DV>(vb, sVs, np * 16, kk * 16, lane);
        mma16816(o.c[2 * np], pa, vb[0], vb[1]);
        mma16816(o.c[2 * np + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  // epilogue: normalise, store O (bf16) and lse (natural log)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float sum = l[hf];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = row0 + 8 * hf;
    if (i < T) {
      nv_bf16* orow = p.out + ((int64_t(b) * T + i) * p.H + h) * DV;
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb)
        *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t) =
            pack_bf16(o.c[nb][2 * hf] * inv, o.c[nb][2 * hf + 1] * inv);
      if (t == 0) p.lse[(int64_t(b) * p.H + h) * T + i] = sum > 0.f ? (m[hf] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// ---- Hopper forward (sm_90a): warp-specialised, wgmma ------------------------------------------
// One block per (128-query tile, head, batch) of 3 warpgroups. Warpgroup 0 is the producer: it
// copies Q and the K/V tiles of the key policy into 128B-swizzled shared tiles (flash_wgmma.cuh),
// STAGES deep — dense tiles by TMA, or by cp.async handed over through an mbarrier after
// cp.async.wait_group + fence.proxy.async (the tensor cores read through the async proxy);
// gathered tiles by cp.async completing on the mbarrier itself (cp_async_mbar_arrive, the
// consumers fence after their wait), so the producer never waits for its own copies — and it
// gives registers away (setmaxnreg.dec). Warpgroups 1 and 2 each own 64 query rows: S = Q·Kᵀ by
// wgmma from shared memory, scale / bias / mask and the online softmax in registers exactly as
// the mma.sync kernel (the wgmma accumulator has its per-warp layout), P rounded to bf16 in
// registers, O += P·V by wgmma with P from registers, then release the stage. The dense cp.async
// producer runs one tile ahead of its signal (it signals tile n-1 after issuing tile n), so two
// tiles are in flight while the consumers compute a third; TMA and gathered producers fill every
// free stage at once.
constexpr int kWgBM = 128, kWgStages = 3, kWgThreads = 384;

template <int DQK>
constexpr int wg_bn() {
  return DQK > 128 ? 64 : 128;  // (192, 128): 64-key tiles keep three stages within shared memory
}

template <int DQK, int DV>
struct WgSmem {
  static constexpr int BN = wg_bn<DQK>();
  static constexpr int kQ = kWgBM * DQK * 2, kK = BN * DQK * 2, kV = BN * DV * 2, kStage = kK + kV;
  static constexpr int kBias = kQ + kWgStages * kStage;     // fp32 key bias [stage][BN] (with a bias)
  static constexpr int kBars = kBias + kWgStages * BN * 4;  // byte offset of the mbarriers
  static constexpr int kBytes = kBars + (2 * kWgStages + 1) * 8;
  static constexpr size_t kAlloc = size_t(kBytes) + 1024;  // slack to align the base to 1024 B
  static_assert(kQ % 1024 == 0 && kK % 1024 == 0 && kV % 1024 == 0, "swizzle atoms stay 1024-aligned");
};

// K and V tensor maps for the TMA producer (dense policy, DMAT_ATTN_WG_TMA=1): see flash_wgmma.cuh.
struct FwdTma {
  CUtensorMap k, v;
};

template <int DQK, int DV, class Keys, bool BIAS, bool OVERLAP, bool TMA>
__global__ void __launch_bounds__(kWgThreads, 1) flash_fwd_wgmma_kernel(const FwdParams p,
                                                                         const __grid_constant__ FwdTma tma) {
  static_assert(!TMA || !Keys::kGathered, "TMA loads tiles of consecutive keys only");
  static_assert(Keys::kBN == WgSmem<DQK, DV>::BN && (Keys::kGathered || !Keys::kGathered),
                "the key policy walks tiles of the kernel's size");
#ifdef DMAT_FLASH_SM90A
  using namespace flash::sm90;
  using L = WgSmem<DQK, DV>;
  constexpr int BM = kWgBM, BN = L::BN, S = kWgStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sKV = base + L::kQ;  // stage st: K at sKV + st·kStage, V at + kK
  const uint32_t bar_q = base + L::kBars, bar_full = bar_q + 8, bar_empty = bar_full + 8 * S;
  // with a bias: the raw key bias of each row of each stage, written by the producer with the tile
  // (cp.async producer: −inf for padding; TMA: a bulk copy of the tile's keys below T, the rest
  // stale — read only in the causal diagonal's masked columns), so the consumers' softmax reads
  // it from here instead of a global load per column and tile
  float* sbias = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kBias);

  const int tid = threadIdx.x, wg = tid >> 7;
  const GridPos gp = grid_pos(p.order);
  const int qt = p.qt0 + int(gridDim.x) - 1 - gp.x;  // the longest (latest) causal tiles start first
  const int h = gp.y, b = gp.z, hk = h / (p.H / p.Hkv);
  const int q0 = qt * BM, T = p.T;
  const Keys keys = MakeKeys<Keys>::make(p, b, hk, qt, q0, BM);
  const int n_tiles = keys.count;

  if (tid == 0) {
    mbar_init(bar_q, 128);
    for (int st = 0; st < S; ++st) {
      // TMA: one expect_tx arrive; gathered: each producer thread's copies and its own arrive; else
      // each producer thread once
      mbar_init(bar_full + 8 * st, TMA ? 1 : Keys::kGathered ? 256 : 128);
      mbar_init(bar_empty + 8 * st, 8);             // lane 0 of each consumer warp once per use
    }
    if constexpr (TMA) mbar_init_fence();
  }
  __syncthreads();  // the only block-wide barrier: the producer leaves early

  if (wg == 0) {
    setmaxnreg_dec<24>();
    const int64_t q_stride = int64_t(p.H) * DQK, k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
    const nv_bf16* qg = p.q + (int64_t(b) * T * p.H + h) * DQK;
    const nv_bf16* kg = p.k + (int64_t(b) * T * p.Hkv + hk) * DQK;
    const nv_bf16* vg = p.v + (int64_t(b) * T * p.Hkv + hk) * DV;
    load_sw128_async<BM, DQK, 128>(sQ, qg, [&](int r) -> const nv_bf16* {
      return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
    }, tid);
    cp_async_commit();
    // K and V of tile n into a stage, each chunk's row looked up in the key policy (cp.async
    // producers other than the gathered shuffle loader)
    auto load_kv_rows = [&](int n, uint32_t sk, uint32_t sv) {
      load_sw128_async<BN, DQK, 128>(sk, kg, [&](int r) -> const nv_bf16* {
        const int j = keys.key(n, r);
        return j >= 0 && j < T ? kg + int64_t(j) * k_stride : nullptr;
      }, tid);
      load_sw128_async<BN, DV, 128>(sv, vg, [&](int r) -> const nv_bf16* {
        const int j = keys.key(n, r);
        return j >= 0 && j < T ? vg + int64_t(j) * v_stride : nullptr;
      }, tid);
    };
    (void)load_kv_rows;
    if constexpr (TMA) {
      cp_async_wait<0>();
      fence_proxy_async();
      mbar_arrive(bar_q);
      // one thread streams the K/V tiles, S in flight; rows past T belong to the next sequence (or
      // are zero past B·T): finite values the causal mask gives probability 0
      if (tid == 0) {
        for (int n = 0; n < n_tiles; ++n) {
          const int st = n % S;
          if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);
          const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK, bar = bar_full + 8 * st;
          const int row = b * T + keys.key(n, 0);
          if constexpr (BIAS) {  // T % 4 == 0 and a 16-byte aligned bias (launch_fwd_wgmma)
            const int k0 = keys.key(n, 0), nb = min(BN, T - k0);
            mbar_arrive_expect_tx(bar, uint32_t(L::kStage + 4 * nb));
            bulk_load(smem_u32(sbias + st * BN), p.bias + (int64_t(b) * p.Hkv + hk) * T + k0, uint32_t(4 * nb), bar);
          } else {
            mbar_arrive_expect_tx(bar, uint32_t(L::kStage));
          }
#pragma unroll
          for (int pn = 0; pn < DQK / 64; ++pn) tma_load_3d(sk + pn * BN * 128, &tma.k, bar, 64 * pn, hk, row);
#pragma unroll
          for (int pn = 0; pn < DV / 64; ++pn) tma_load_3d(sv + pn * BN * 128, &tma.v, bar, 64 * pn, hk, row);
        }
      }
    } else if constexpr (Keys::kGathered) {
      // Q's and every tile's copies complete on their barriers (cp_async_mbar_arrive), so the
      // producer never waits for its own loads: it runs up to S tiles ahead of the consumers.
      // Each thread loads the position (and bias) of one row per tile (gather_row), one tile
      // ahead; with equal head dims of 64 or 128 the K/V chunks take their rows' positions by
      // shuffles (load_gathered_pair_async), otherwise by a load per chunk.
      cp_async_mbar_arrive(bar_q);
      constexpr bool kShfl = GatherRows<BN, DQK>::kOk && DQK == DV;
      const int my_row = kShfl ? GatherRows<BN, DQK>::lane_row(tid >> 5, tid & 31) : (tid < BN ? tid : -1);
      const float* bias = BIAS ? p.bias + (int64_t(b) * p.Hkv + hk) * T : nullptr;
      // this thread's row of tile n: its position, −1 for padding (checked against T at its use,
      // a tile later, so the load is not waited for here)
      auto pos = [&](int n) { return my_row < 0 || n >= n_tiles ? -1 : keys.key(n, my_row); };
      int j_next = pos(0);
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S, j = j_next < T ? j_next : -1;
        float bj = -INFINITY;
        if constexpr (BIAS) bj = j >= 0 ? __ldg(bias + j) : -INFINITY;
        j_next = pos(n + 1);
        if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);  // use n/S − 1 released
        const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK;
        if constexpr (kShfl) load_gathered_pair_async<BN, DQK>(sk, sv, kg, int(k_stride), vg, int(v_stride), j, tid);
        else load_kv_rows(n, sk, sv);
        cp_async_mbar_arrive(bar_full + 8 * st);
        // the stage's previous readers of sbias released it (empty) before this point
        if (BIAS && my_row >= 0) sbias[st * BN + my_row] = bj;
        mbar_arrive(bar_full + 8 * st);  // release: sbias, and this thread's part of the count
      }
      cp_async_wait<0>();
    } else {
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S;
        if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);  // use n/S − 1 released
        const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK;
        // The stage's previous readers of sbias are done: the consumers released it (empty).
        if constexpr (BIAS) {
          const float* bias = p.bias + (int64_t(b) * p.Hkv + hk) * T;
          for (int r = tid; r < BN; r += 128) {
            const int j = keys.key(n, r);
            sbias[st * BN + r] = j >= 0 && j < T ? __ldg(bias + j) : -INFINITY;
          }
        }
        load_kv_rows(n, sk, sv);
        cp_async_commit();
        cp_async_wait<1>();  // the group before this one (Q for n == 0, else tile n − 1) has landed
        fence_proxy_async();
        mbar_arrive(n == 0 ? bar_q : bar_full + 8 * ((n - 1) % S));
      }
      cp_async_wait<0>();
      fence_proxy_async();
      mbar_arrive(n_tiles == 0 ? bar_q : bar_full + 8 * ((n_tiles - 1) % S));
    }
  } else {
    setmaxnreg_inc<240>();
    const int cw = wg - 1, wtid = tid - 128 * wg, warp = wtid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row0 = q0 + 64 * cw + 16 * warp + g;  // this thread's rows: row0 (c0,c1), row0 + 8 (c2,c3)
    // DMA: a key is masked for row i where its raw bias < thr_i (−inf: no threshold)
    float thr_r[2] = {-INFINITY, -INFINITY};
    if (BIAS && p.thr) {
      const float* thr = p.thr + (int64_t(b) * p.Hkv + hk) * T;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) thr_r[hf] = row0 + 8 * hf < T ? __ldg(thr + row0 + 8 * hf) : -INFINITY;
    }
    // dense DMA (every tile would take the threshold mask): a warp whose 16 rows all have the
    // threshold −inf (queries i < w − 1: every causal key kept) masks only the causal diagonal
    bool thr_live = false;
    if constexpr (BIAS && !Keys::kGathered) {
      float tw = fmaxf(thr_r[0], thr_r[1]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tw = fmaxf(tw, __shfl_xor_sync(0xffffffffu, tw, o));
      thr_live = keys.all && tw > -INFINITY;
    }
    (void)thr_live;

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // row max (log2 units), partial row sum
    Acc<DV> o;
    o.zero();
    Acc<BN> s;              // scores of the tile in hand, then its probabilities
    uint32_t pa[BN / 16][4];  // P (bf16) as the A fragments of O += P·V

    // S = Q Kᵀ of tile n (stage st) issued: DQK/16 k-steps, the first overwriting (scale-d = 0)
    auto issue_s = [&](int st) {
      const uint32_t sk = sKV + uint32_t(st * L::kStage);
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk) {
        const uint64_t da = desc_kmajor<BM, DQK>(sQ, 64 * cw, kk), db = desc_kmajor<BN, DQK>(sk, 0, kk);
        if constexpr (BN == 128) wgmma_ss_n128(s.c, da, db, kk > 0);
        else wgmma_ss_n64(s.c, da, db, kk > 0);
      }
    };
    // O += P V issued: P from registers, V N-major from shared memory, one n64 MMA per panel
    auto issue_pv = [&](int st) {
      const uint32_t sv = sKV + uint32_t(st * L::kStage) + L::kK;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn)
          wgmma_rs_n64_tb(*reinterpret_cast<float(*)[8][4]>(&o.c[8 * pn]), pa[kk], desc_nmajor<BN, DV>(sv, kk, pn), 1);
      }
    };
    // Scale, bias, mask and exponentiate the scores of tile n in s (log2 domain), updating the
    // running max m and sum l; alpha = exp2(m_old − m_new), by which O must still be rescaled.
    auto softmax = [&](int n, int st, float (&alpha)[2]) {
      const float* sb = sbias + st * BN;  // in place once the full barrier's phase completes
      (void)sb;
      // the raw bias of column c (compared with thr_r exactly: copies of the same fp32 biases)
      auto bias_at = [&](int c) -> float {
        if constexpr (!BIAS) return 0.f;
        else return sb[c];
      };
      bool masked;
      if constexpr (Keys::kGathered) masked = keys.needs_mask(n);
      else masked = keys.needs_causal_mask(n) || thr_live;
      if (masked) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = nb * 8 + 2 * t + e;
            const int j = keys.key(n, c);  // gathered: -1 for padding
            const float braw = bias_at(c);
            const float bj = braw * kLog2e;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              float& x = s.c[nb][2 * hf + e];
              x = fmaf(x, p.scale_log2, bj);
              if (!visible(row0 + 8 * hf, j, p.window) || dma_drops(braw, thr_r[hf], row0 + 8 * hf, j, p.local))
                x = -INFINITY;
            }
          }
        }
      } else {  // every (row, key) of the tile visible and kept
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = nb * 8 + 2 * t + e;
            const float bj = bias_at(c) * kLog2e;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) s.c[nb][2 * hf + e] = fmaf(s.c[nb][2 * hf + e], p.scale_log2, bj);
          }
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s.c[nb][2 * hf], s.c[nb][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hf], mx);
        const float base_m = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
        alpha[hf] = fast_exp2(m[hf] - base_m);
        m[hf] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
          s.c[nb][2 * hf] = fast_exp2(s.c[nb][2 * hf] - base_m);
          s.c[nb][2 * hf + 1] = fast_exp2(s.c[nb][2 * hf + 1] - base_m);
          sum += s.c[nb][2 * hf] + s.c[nb][2 * hf + 1];
        }
        l[hf] = l[hf] * alpha[hf] + sum;
      }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb) {
        o.c[nb][0] *= alpha[0], o.c[nb][1] *= alpha[0];
        o.c[nb][2] *= alpha[1], o.c[nb][3] *= alpha[1];
      }
    };
    auto make_p = [&] {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        s.to_a(pa[kk], kk);
        fence_operands(pa[kk]);
      }
    };
    auto release = [&](int st) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty + 8 * st);  // this warp is done with the stage
    };
    // gathered: the tiles' copies completed on the barrier, so the proxy fence is the reader's
    auto wait_full = [&](int n) {
      mbar_wait(bar_full + 8 * (n % S), uint32_t(n / S) & 1u);
      if constexpr (Keys::kGathered) fence_proxy_async();
    };

    mbar_wait(bar_q, 0);
    if constexpr (Keys::kGathered) fence_proxy_async();
    if constexpr (!OVERLAP) {
      // per tile: S, wait, softmax, rescale O, P, O += P·V, wait (the other warpgroup fills the gaps)
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S;
        wait_full(n);
        wgmma_fence();
        issue_s(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(s.c);
        float alpha[2];
        softmax(n, st, alpha);
        rescale_o(alpha);
        make_p();
        fence_operands(o.c);  // the rescale and P are written before the fence below, not sunk past it
        wgmma_fence();
        issue_pv(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(o.c);
        release(st);
      }
    } else if (n_tiles > 0) {
      // software-pipelined (FlashAttention-3's intra-warpgroup overlap): S of tile n + 1 is
      // issued before O += P·V of tile n, and its softmax runs while that P·V is in flight.
      // Commit order S(n+1), PV(n): wait_group<1> completes S(n+1) only; wait_group<0> both.
      wait_full(0);
      wgmma_fence();
      issue_s(0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s.c);
      {
        float alpha[2];
        softmax(0, 0, alpha);  // O is zero: nothing to rescale
      }
      make_p();
      // steady state: tiles 0 .. n_tiles − 2 each with a successor (no branch between the commits
      // and the waits, so ptxas can see which group wait_group<1> retires)
      for (int n = 0; n + 1 < n_tiles; ++n) {
        const int st = n % S, st1 = (n + 1) % S;
        wait_full(n + 1);
        fence_operands(o.c);
        wgmma_fence();
        issue_s(st1);
        wgmma_commit();
        issue_pv(st);
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(s.c);
        float alpha[2];
        softmax(n + 1, st1, alpha);
        wgmma_wait<0>();
        fence_operands(o.c);
        release(st);
        rescale_o(alpha);
        make_p();
      }
      // the last tile: O += P·V only
      const int st = (n_tiles - 1) % S;
      fence_operands(o.c);
      wgmma_fence();
      issue_pv(st);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o.c);
      release(st);
    }

    // epilogue: normalise, store O (bf16) and lse (natural log)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = l[hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const int i = row0 + 8 * hf;
      if (i < T) {
        nv_bf16* orow = p.out + ((int64_t(b) * T + i) * p.H + h) * DV;
#pragma unroll
        for (int nb = 0; nb < DV / 8; ++nb)
          *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t) =
              pack_bf16(o.c[nb][2 * hf] * inv, o.c[nb][2 * hf + 1] * inv);
        if (t == 0) p.lse[(int64_t(b) * p.H + h) * T + i] = sum > 0.f ? (m[hf] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
#endif  // DMAT_FLASH_SM90A
}

// 1 where this build runs the sm_90a code on the current device (the wgmma kernels' bodies are
// compiled only for sm_90a; another target gets empty stubs).
__global__ void flash_sm90a_probe_kernel(int* out) {
#ifdef DMAT_FLASH_SM90A
  *out = 1;
#else
  *out = 0;
#endif
}

// The building blocks of the kernel above on one tile, for the GPU self-check (see
// testing::flash_wgmma_selftest): a (64 x 128), b (128 x 128, [n][k]), v (128 x 128, [k][n]),
// all row-major bf16. s128 = a·bᵀ (n128 MMAs), s64 = a·b[0:64]ᵀ (n64 MMAs), o = a·v (A from
// registers, V N-major), raw_a = the swizzled shared tile of a as bytes.
__global__ void __launch_bounds__(128) flash_wgmma_selftest_kernel(float* s128, float* s64, float* o, nv_bf16* raw_a,
                                                                   const nv_bf16* a, const nv_bf16* bk,
                                                                   const nv_bf16* v) {
#ifdef DMAT_FLASH_SM90A
  using namespace flash::sm90;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sA = base, sB = base + Sw128<64, 128>::kBytes, sV = sB + Sw128<128, 128>::kBytes;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  load_sw128_async<64, 128, 128>(sA, a, [&](int r) -> const nv_bf16* { return a + r * 128; }, tid);
  load_sw128_async<128, 128, 128>(sB, bk, [&](int r) -> const nv_bf16* { return bk + r * 128; }, tid);
  load_sw128_async<128, 128, 128>(sV, v, [&](int r) -> const nv_bf16* { return v + r * 128; }, tid);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  const unsigned char* sa_gen = smem_raw + (sA - smem_u32(smem_raw));
  for (int x = tid; x < 64 * 128; x += 128) raw_a[x] = reinterpret_cast<const nv_bf16*>(sa_gen)[x];

  // (fully unrolled: an accumulator indexed at run time would leave registers for local memory)
  auto store = [&](float* dst, int ncols, const auto& c) {
    constexpr int NB = sizeof(c) / sizeof(c[0]);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int x = 0; x < 4; ++x) dst[(16 * warp + g + 8 * (x >> 1)) * ncols + 8 * nb + 2 * t + (x & 1)] = c[nb][x];
  };
  Acc<128> acc;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_ss_n128(acc.c, desc_kmajor<64, 128>(sA, 0, kk), desc_kmajor<128, 128>(sB, 0, kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc.c);
  store(s128, 128, acc.c);

  Acc<64> acc64;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
    wgmma_ss_n64(acc64.c, desc_kmajor<64, 128>(sA, 0, kk), desc_kmajor<128, 128>(sB, 0, kk), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(acc64.c);
  store(s64, 64, acc64.c);

  // A fragments straight from global memory by the m16n8k16 A layout, rows 16·warp + g (+8)
  auto pk = [&](int r, int c) {
    __nv_bfloat162 h2;
    h2.x = a[r * 128 + c];
    h2.y = a[r * 128 + c + 1];
    return *reinterpret_cast<const uint32_t*>(&h2);
  };
  uint32_t pa[8][4];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int r = 16 * warp + g, c = 16 * kk + 2 * t;
    pa[kk][0] = pk(r, c), pa[kk][1] = pk(r + 8, c), pa[kk][2] = pk(r, c + 8), pa[kk][3] = pk(r + 8, c + 8);
  }
  Acc<128> oc;
  oc.zero();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) fence_operands(pa[kk]);
  fence_operands(oc.c);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int pn = 0; pn < 2; ++pn)
      wgmma_rs_n64_tb(*reinterpret_cast<float(*)[8][4]>(&oc.c[8 * pn]), pa[kk], desc_nmajor<128, 128>(sV, kk, pn), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(oc.c);
  store(o, 128, oc.c);
#endif
}

// One TMA tile through the forward's tensor-map path, for the GPU self-check
// (testing::flash_tma_selftest): rows row0 .. row0 + 127 of head `head` of a [rows][heads][128]
// bf16 tensor into a 128B-swizzled Sw128<128, 128> tile, copied out raw.
__global__ void __launch_bounds__(128) flash_tma_selftest_kernel(nv_bf16* raw, const __grid_constant__ CUtensorMap map,
                                                                 int row0, int head) {
#ifdef DMAT_FLASH_SM90A
  using namespace flash::sm90;
  using Tile = Sw128<128, 128>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t bar = base + Tile::kBytes;
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, uint32_t(Tile::kBytes));
    for (int pn = 0; pn < 2; ++pn) tma_load_3d(base + pn * Tile::kPanelBytes, &map, bar, 64 * pn, head, row0);
  }
  mbar_wait(bar, 0);
  const nv_bf16* t = reinterpret_cast<const nv_bf16*>(smem_raw + (base - smem_u32(smem_raw)));
  for (int x = threadIdx.x; x < 128 * 128; x += 128) raw[x] = t[x];
#endif
}

// ---- backward --------------------------------------------------------------------------------
struct BwdParams {
  const nv_bf16* q;
  const nv_bf16* k;
  const nv_bf16* v;
  const nv_bf16* dout;
  nv_bf16* dq;
  nv_bf16* dk;
  nv_bf16* dv;
  const float* lse2;   // [B,H,T] lse·log2(e)
  const float* delta;  // [B,H,T] Σ dO∘O
  float* dq_acc;       // [B,T,H,DQK] fp32 (non-deterministic path)
  int T, H, Hkv, window;
  float scale_log2, scale;
  int order, order_kv;  // grid_pos of the dQ grid (query heads) and of the dK/dV grid (KV heads)
  // DMA (flash_attention_backward_dma): the key bias and thresholds [B,Hkv,T], dbias out, the dQ
  // pass's gathered lists (FlashGather) and the dK/dV pass's key groups (FlashKeyGroups)
  const float* bias;
  const float* thr;
  float* dbias;
  int local;  // DMA's local window L, as FwdParams::local
  const int32_t* gkeys;
  const int32_t* gcount;
  const int32_t* gclean;
  int64_t gcap;
  const int32_t* grp_keys;   // [B·Hkv][n_groups][BN] key positions, −1 padding
  const int32_t* grp_range;  // [B·Hkv][n_groups][2]: first and last query of the group (last < first: none)
  int n_groups, grp_regions;
  int qt0;  // first query tile of a dQ launch over a batch of gathered lists, else 0
};

// The keys of dK/dV block x (grid_pos) and the query tiles (of bmq rows) that visit them: dense, the
// consecutive tile x·BN .. + BN − 1 and the queries up to the window's reach (key tile 0 has the
// most); DMA, key group x (groups of one size class run together, the longest query ranges first)
// and its range, or without key groups (dense DMA) the dense blocks.
// key(r): the position of row r of the block, −1 for padding.
template <int BN, bool DMA>
struct KvBlock {
  int k0 = 0, qt_first = 0, nq = 0;
  const int32_t* gk = nullptr;
  __device__ KvBlock(const BwdParams& p, int x, int b, int hk, int bmq) {
    static_assert(!DMA || BN == kFlashGroupKeys, "one key group per block");
    if (DMA && p.grp_keys) {  // DMA without key groups (dense DMA): the dense blocks below
      const int gid = (x % p.grp_regions) * (p.n_groups / p.grp_regions) + x / p.grp_regions;
      const int64_t gi = (int64_t(b) * p.Hkv + hk) * p.n_groups + gid;
      gk = p.grp_keys + gi * BN;
      const int lo = __ldg(p.grp_range + 2 * gi), hi = __ldg(p.grp_range + 2 * gi + 1);
      qt_first = lo / bmq;
      nq = hi >= lo ? hi / bmq + 1 - qt_first : 0;
    } else {  // queries that see some key of [k0, k0 + BN): [k0, k0 + BN − 1 + window − 1]
      k0 = x * BN;
      const int i_hi = p.window > 0 ? min(p.T - 1, k0 + BN - 1 + p.window - 1) : p.T - 1;
      qt_first = k0 / bmq;
      nq = i_hi / bmq + 1 - qt_first;
    }
  }
  __device__ __forceinline__ int key(int r, int T) const {
    if (DMA && gk) return __ldg(gk + r);
    return k0 + r < T ? k0 + r : -1;
  }
};

// delta = Σ_d dO∘O and lse2 = lse·log2(e), TPR threads per (b, i, h) row (DV/8 up to 32: every
// lane holds one 16-byte chunk of O and of dO at head dim 128, where a warp per row left half the
// lanes idle; the attention backward did not measurably change with it — docs/perf.md).
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

// dK, dV for one key tile (16 keys per warp); optionally dQ += dS·K by fp32 atomics.
// DMA: the block's keys are a key group (p.grp_keys: any BN positions) instead of a consecutive
// tile, visited by the queries of the group's range only; the key bias joins the scores, the
// threshold mask (j <= i, bias_j >= thr_i) applies everywhere, and dbias_j = Σ_i dS_ij is summed
// in registers (heads, then query tiles, in a fixed order: deterministic).
template <int DQK, int DV, int WARPS, int BMQ, bool ATOMIC_DQ, bool DMA = false>
__global__ void __launch_bounds__(WARPS * 32, 1) flash_bwd_dkdv_kernel(const BwdParams p) {
  static_assert(!(DMA && ATOMIC_DQ), "the DMA backward computes dQ in its own pass");
  constexpr int BN = 16 * WARPS, THREADS = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sK = reinterpret_cast<nv_bf16*>(smem_raw);  // [BN][DQK]
  nv_bf16* sV = sK + BN * DQK;                          // [BN][DV]
  nv_bf16* sQ = sV + BN * DV;                           // [2][BMQ][DQK]
  nv_bf16* sdO = sQ + 2 * BMQ * DQK;                    // [2][BMQ][DV]
  nv_bf16* sdS = sdO + 2 * BMQ * DV;                    // [BN][BMQ]   (ATOMIC_DQ only)
  float* sL = reinterpret_cast<float*>(sdS + (ATOMIC_DQ ? BN * BMQ : 0));  // [2][BMQ] lse2
  float* sD = sL + 2 * BMQ;                                                // [2][BMQ] delta
  float* sThr = sD + 2 * BMQ;                                              // [2][BMQ] thr (DMA only)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const GridPos gp = grid_pos(p.order_kv);
  const int hk = gp.y, b = gp.z;
  const int T = p.T, group = p.H / p.Hkv;
  const int64_t q_stride = int64_t(p.H) * DQK, o_stride = int64_t(p.H) * DV;
  const int64_t k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
  const nv_bf16* kg = p.k + (int64_t(b) * T * p.Hkv + hk) * DQK;
  const nv_bf16* vg = p.v + (int64_t(b) * T * p.Hkv + hk) * DV;
  const int64_t brow = (int64_t(b) * p.Hkv + hk) * T;  // this (b, hk)'s bias / thr row (DMA)

  const KvBlock<BN, DMA> kv(p, gp.x, b, hk, BMQ);
  const int k0 = kv.k0, qt_first = kv.qt_first, nq = kv.nq;
  auto key_at = [&](int r) { return kv.key(r, T); };
  const int n_items = group * nq;

  load_tile_async<BN, DQK, THREADS>(sK, kg, [&](int r) -> const nv_bf16* {
    const int j = key_at(r);
    return j >= 0 ? kg + int64_t(j) * k_stride : nullptr;
  });
  load_tile_async<BN, DV, THREADS>(sV, vg, [&](int r) -> const nv_bf16* {
    const int j = key_at(r);
    return j >= 0 ? vg + int64_t(j) * v_stride : nullptr;
  });
  // item n: query head hk·group + n / nq (heads outer: a fixed summation order), tile n % nq
  auto load_q = [&](int n, int stage) {
    const int hh = hk * group + n / nq, q0 = (qt_first + n % nq) * BMQ;
    const nv_bf16* qg = p.q + (int64_t(b) * T * p.H + hh) * DQK;
    const nv_bf16* dog = p.dout + (int64_t(b) * T * p.H + hh) * DV;
    load_tile_async<BMQ, DQK, THREADS>(sQ + stage * BMQ * DQK, qg, [&](int r) -> const nv_bf16* {
      return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
    });
    load_tile_async<BMQ, DV, THREADS>(sdO + stage * BMQ * DV, dog, [&](int r) -> const nv_bf16* {
      return q0 + r < T ? dog + int64_t(q0 + r) * o_stride : nullptr;
    });
    if (tid < BMQ) {
      const int64_t o = (int64_t(b) * p.H + hh) * T + q0 + tid;
      const bool ok = q0 + tid < T;
      sL[stage * BMQ + tid] = ok ? p.lse2[o] : 0.f;
      sD[stage * BMQ + tid] = ok ? p.delta[o] : 0.f;
      if constexpr (DMA) sThr[stage * BMQ + tid] = ok ? p.thr[brow + q0 + tid] : INFINITY;
    }
  };
  if (n_items > 0) load_q(0, 0);
  cp_async_commit();

  Acc<DQK> dk;
  Acc<DV> dv;
  dk.zero();
  dv.zero();
  // this thread's keys: rows warp·16 + g (c0,c1) and + 8 (c2,c3) of the tile
  const int kj[2] = {key_at(warp * 16 + g), key_at(warp * 16 + g + 8)};
  float kb2[2] = {0.f, 0.f}, kbraw[2] = {0.f, 0.f}, dbias[2] = {0.f, 0.f};  // DMA: bias (log2 units, raw)
  if constexpr (DMA) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      kbraw[hf] = kj[hf] >= 0 ? __ldg(p.bias + brow + kj[hf]) : 0.f;
      kb2[hf] = kbraw[hf] * kLog2e;
    }
  }

  for (int n = 0; n < n_items; ++n) {
    const int st = n & 1;
    if (n + 1 < n_items) load_q(n + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int hh = hk * group + n / nq, q0 = (qt_first + n % nq) * BMQ;
    const nv_bf16* sQs = sQ + st * BMQ * DQK;
    const nv_bf16* sdOs = sdO + st * BMQ * DV;
    const float* sLs = sL + st * BMQ;
    const float* sDs = sD + st * BMQ;
    const float* sThrs = sThr + st * BMQ;
    (void)sThrs;

    // P^T = exp2(K Q^T · scale·log2e − lse2): rows keys, columns queries
    Acc<BMQ> s;
    s.zero();
    mma_ss_abt<DQK, BMQ, DQK, DQK>(s, sK, warp * 16, sQs, 0, lane);
    const bool mask =
        DMA || q0 < k0 + BN - 1 || q0 + BMQ > T || (p.window > 0 && q0 + BMQ - 1 - p.window >= k0);
#pragma unroll
    for (int nb = 0; nb < BMQ / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nb * 8 + 2 * t + e, i = q0 + c;
        const float li = sLs[c];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float& x = s.c[nb][2 * hf + e];
          x = fast_exp2(fmaf(x, p.scale_log2, kb2[hf] - li));
          if (mask && (i >= T || !visible(i, kj[hf], p.window))) x = 0.f;
          if constexpr (DMA)
            if (dma_drops(kbraw[hf], sThrs[c], i, kj[hf], p.local)) x = 0.f;
        }
      }
    }
    // dP^T = V dO^T, then dS^T = P^T ∘ (dP^T − delta)
    Acc<BMQ> ds;
    ds.zero();
    mma_ss_abt<DV, BMQ, DV, DV>(ds, sV, warp * 16, sdOs, 0, lane);
#pragma unroll
    for (int nb = 0; nb < BMQ / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float di = sDs[nb * 8 + 2 * t + e];
        ds.c[nb][e] = s.c[nb][e] * (ds.c[nb][e] - di);
        ds.c[nb][2 + e] = s.c[nb][2 + e] * (ds.c[nb][2 + e] - di);
        if constexpr (DMA) {
          dbias[0] += ds.c[nb][e];
          dbias[1] += ds.c[nb][2 + e];
        }
      }
    }
    // dV += P^T dO, dK += dS^T Q   (k = queries)
#pragma unroll
    for (int kk = 0; kk < BMQ / 16; ++kk) {
      uint32_t pa[4], da[4];
      s.to_a(pa, kk);
      ds.to_a(da, kk);
#pragma unroll
      for (int np = 0; np < DV / 16; ++np) {
        uint32_t bb[4];
        load_b_t<DV>(bb, sdOs, np * 16, kk * 16, lane);
        mma16816(dv.c[2 * np], pa, bb[0], bb[1]);
        mma16816(dv.c[2 * np + 1], pa, bb[2], bb[3]);
      }
#pragma unroll
      for (int np = 0; np < DQK / 16; ++np) {
        uint32_t bb[4];
        load_b_t<DQK>(bb, sQs, np * 16, kk * 16, lane);
        mma16816(dk.c[2 * np], da, bb[0], bb[1]);
        mma16816(dk.c[2 * np + 1], da, bb[2], bb[3]);
      }
    }

    if constexpr (ATOMIC_DQ) {
      // dS^T -> shared (bf16), then dQ(BMQ x DQK) = dS · K split over warps, added atomically
#pragma unroll
      for (int nb = 0; nb < BMQ / 8; ++nb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          *reinterpret_cast<uint32_t*>(sdS + Smem<BMQ>::off(warp * 16 + g + 8 * hf, nb * 8 + 2 * t)) =
              pack_bf16(ds.c[nb][2 * hf], ds.c[nb][2 * hf + 1]);
      }
      __syncthreads();
      constexpr int RG = BMQ / 16, CG = WARPS / RG, DC = DQK / CG;
      static_assert(WARPS % RG == 0 && DQK % CG == 0 && DC % 16 == 0, "dQ warp split");
      const int wm = warp % RG, wn = warp / RG;
      Acc<DC> dq;
      dq.zero();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        load_a_t<BMQ>(a, sdS, wm * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < DC / 16; ++np) {
          uint32_t bb[4];
          load_b_t<DQK>(bb, sK, wn * DC + np * 16, kk * 16, lane);
          mma16816(dq.c[2 * np], a, bb[0], bb[1]);
          mma16816(dq.c[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = q0 + wm * 16 + g + 8 * hf;
        if (i < T) {
          float* dst = p.dq_acc + ((int64_t(b) * T + i) * p.H + hh) * DQK + wn * DC + 2 * t;
#pragma unroll
          for (int nb = 0; nb < DC / 8; ++nb) {
            atomicAdd(dst + nb * 8, dq.c[nb][2 * hf]);
            atomicAdd(dst + nb * 8 + 1, dq.c[nb][2 * hf + 1]);
          }
        }
      }
    }
    __syncthreads();  // the next prefetch overwrites this stage (and sdS)
  }

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if constexpr (DMA) {  // the four lanes of a key row hold disjoint query columns
      dbias[hf] += __shfl_xor_sync(0xffffffffu, dbias[hf], 1);
      dbias[hf] += __shfl_xor_sync(0xffffffffu, dbias[hf], 2);
    }
    const int j = kj[hf];
    if (j >= 0) {
      if (DMA && t == 0) p.dbias[brow + j] = dbias[hf];
      nv_bf16* dkr = p.dk + ((int64_t(b) * T + j) * p.Hkv + hk) * DQK;
      nv_bf16* dvr = p.dv + ((int64_t(b) * T + j) * p.Hkv + hk) * DV;
#pragma unroll
      for (int nb = 0; nb < DQK / 8; ++nb)
        *reinterpret_cast<uint32_t*>(dkr + nb * 8 + 2 * t) =
            pack_bf16(dk.c[nb][2 * hf] * p.scale, dk.c[nb][2 * hf + 1] * p.scale);
#pragma unroll
      for (int nb = 0; nb < DV / 8; ++nb)
        *reinterpret_cast<uint32_t*>(dvr + nb * 8 + 2 * t) = pack_bf16(dv.c[nb][2 * hf], dv.c[nb][2 * hf + 1]);
    }
  }
}

// Deterministic dQ: one block per query tile (16 rows per warp), looping over its key tiles.
// Keys: the key policy (DenseKeys, or GatherKeys over the DMA lists); DMA: the key bias joins the
// scores and the threshold mask applies (as the forward).
template <int DQK, int DV, int WARPS, int BN, class Keys = DenseKeys<BN>, bool DMA = false>
__global__ void __launch_bounds__(WARPS * 32, 1) flash_bwd_dq_kernel(const BwdParams p) {
  static_assert(Keys::kBN == BN, "key tile size");
  constexpr int BM = 16 * WARPS, THREADS = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);  // [BM][DQK]
  nv_bf16* sdO = sQ + BM * DQK;                         // [BM][DV]
  nv_bf16* sK = sdO + BM * DV;                          // [2][BN][DQK]
  nv_bf16* sV = sK + 2 * BN * DQK;                      // [2][BN][DV]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const GridPos gp = grid_pos(p.order);
  const int qt = p.qt0 + int(gridDim.x) - 1 - gp.x;
  const int h = gp.y, b = gp.z, hk = h / (p.H / p.Hkv);
  const int T = p.T, q0 = qt * BM;
  const int64_t q_stride = int64_t(p.H) * DQK, o_stride = int64_t(p.H) * DV;
  const int64_t k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
  const nv_bf16* qg = p.q + (int64_t(b) * T * p.H + h) * DQK;
  const nv_bf16* dog = p.dout + (int64_t(b) * T * p.H + h) * DV;
  const nv_bf16* kg = p.k + (int64_t(b) * T * p.Hkv + hk) * DQK;
  const nv_bf16* vg = p.v + (int64_t(b) * T * p.Hkv + hk) * DV;
  const Keys keys = MakeKeys<Keys>::make(p, b, hk, qt, q0, BM);
  const int64_t brow = (int64_t(b) * p.Hkv + hk) * T;  // this (b, hk)'s bias / thr row (DMA)

  load_tile_async<BM, DQK, THREADS>(sQ, qg, [&](int r) -> const nv_bf16* {
    return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
  });
  load_tile_async<BM, DV, THREADS>(sdO, dog, [&](int r) -> const nv_bf16* {
    return q0 + r < T ? dog + int64_t(q0 + r) * o_stride : nullptr;
  });
  cp_async_commit();
  auto load_kv = [&](int n, int stage) {
    load_tile_async<BN, DQK, THREADS>(sK + stage * BN * DQK, kg, [&](int r) -> const nv_bf16* {
      const int j = keys.key(n, r);
      return j >= 0 && j < T ? kg + int64_t(j) * k_stride : nullptr;
    });
    load_tile_async<BN, DV, THREADS>(sV + stage * BN * DV, vg, [&](int r) -> const nv_bf16* {
      const int j = keys.key(n, r);
      return j >= 0 && j < T ? vg + int64_t(j) * v_stride : nullptr;
    });
  };
  const int n_tiles = keys.count;
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int row0 = q0 + warp * 16 + g;
  float li[2], di[2], thr_r[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = row0 + 8 * hf;
    const int64_t o = (int64_t(b) * p.H + h) * T + i;
    li[hf] = i < T ? p.lse2[o] : 0.f;
    di[hf] = i < T ? p.delta[o] : 0.f;
    if constexpr (DMA) thr_r[hf] = i < T ? __ldg(p.thr + brow + i) : INFINITY;
  }
  Acc<DQK> dq;
  dq.zero();

  for (int n = 0; n < n_tiles; ++n) {
    const int st = n & 1;
    if (n + 1 < n_tiles) load_kv(n + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const nv_bf16* sKs = sK + st * BN * DQK;
    const nv_bf16* sVs = sV + st * BN * DV;

    Acc<BN> s;  // P = exp2(Q K^T · scale·log2e − lse2)
    s.zero();
    mma_ss_abt<DQK, BN, DQK, DQK>(s, sQ, warp * 16, sKs, 0, lane);
    const bool mask = keys.needs_mask(n);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = keys.key(n, nb * 8 + 2 * t + e);
        float braw = 0.f;  // compared with thr_r exactly, as the forward
        if constexpr (DMA) braw = (j >= 0 && j < T) ? __ldg(p.bias + brow + j) : 0.f;
        const float bj = braw * kLog2e;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float& x = s.c[nb][2 * hf + e];
          x = fast_exp2(fmaf(x, p.scale_log2, bj - li[hf]));
          if (mask && (!visible(row0 + 8 * hf, j, p.window) || dma_drops(braw, thr_r[hf], row0 + 8 * hf, j, p.local)))
            x = 0.f;
        }
      }
    }
    Acc<BN> ds;  // dP = dO V^T, dS = P ∘ (dP − delta)
    ds.zero();
    mma_ss_abt<DV, BN, DV, DV>(ds, sdO, warp * 16, sVs, 0, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int x = 0; x < 4; ++x) ds.c[nb][x] = s.c[nb][x] * (ds.c[nb][x] - di[x >> 1]);
    }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      ds.to_a(a, kk);
#pragma unroll
      for (int np = 0; np < DQK / 16; ++np) {
        uint32_t bb[4];
        load_b_t<DQK>(bb, sKs, np * 16, kk * 16, lane);
        mma16816(dq.c[2 * np], a, bb[0], bb[1]);
        mma16816(dq.c[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = row0 + 8 * hf;
    if (i < T) {
      nv_bf16* dqr = p.dq + ((int64_t(b) * T + i) * p.H + h) * DQK;
#pragma unroll
      for (int nb = 0; nb < DQK / 8; ++nb)
        *reinterpret_cast<uint32_t*>(dqr + nb * 8 + 2 * t) =
            pack_bf16(dq.c[nb][2 * hf] * p.scale, dq.c[nb][2 * hf + 1] * p.scale);
    }
  }
}

// Deterministic dQ on Hopper (sm_90a): the forward's block structure (a producer warpgroup
// streaming K/V tiles into 128B-swizzled stages, two consumer warpgroups of 64 query rows) with Q
// and dO stationary. Per 64-key tile: S = Q·Kᵀ and dP = dO·Vᵀ (wgmma, both operands in shared
// memory, V read K-major), P = exp2(S·scale·log2e − lse2), dS = P∘(dP − delta) in registers,
// dQ += dS·K (wgmma, dS from registers, K read N-major). 64-key tiles keep dQ (Dqk/2 registers)
// + S + dP + dS within the consumers' 240 registers. Fixed summation order: deterministic.
constexpr int kWgDqBN = 64;

template <int DQK, int DV>
struct WgDqSmem {
  static constexpr int BN = kWgDqBN;
  static constexpr int kQ = kWgBM * DQK * 2, kO = kWgBM * DV * 2, kK = BN * DQK * 2, kV = BN * DV * 2;
  static constexpr int kStage = kK + kV;
  static constexpr int kStages = (kQ + kO + 3 * kStage) <= 200 * 1024 ? 3 : 2;
  static constexpr int kKeys = kQ + kO + kStages * kStage;  // int32 key positions [stage][BN] (gathered)
  static constexpr int kBias = kKeys + kStages * BN * 4;     // fp32 raw key bias [stage][BN] (DMA)
  static constexpr int kBars = kBias + kStages * BN * 4;
  static constexpr int kBytes = kBars + (2 * kStages + 1) * 8;
  static constexpr size_t kAlloc = size_t(kBytes) + 1024;
  static_assert(kQ % 1024 == 0 && kO % 1024 == 0 && kK % 1024 == 0 && kV % 1024 == 0, "1024-aligned atoms");
};

// Keys: DenseKeys, or GatherKeys over the DMA lists (the producer stages each tile's positions and,
// with DMA, raw key biases in shared memory); DMA: key bias in the scores and the threshold mask.
template <int DQK, int DV, bool OVERLAP, class Keys = DenseKeys<kWgDqBN>, bool DMA = false>
__global__ void __launch_bounds__(kWgThreads, 1) flash_bwd_dq_wgmma_kernel(const BwdParams p) {
#ifdef DMAT_FLASH_SM90A
  using namespace flash::sm90;
  using L = WgDqSmem<DQK, DV>;
  constexpr int BM = kWgBM, BN = L::BN, S = L::kStages;
  static_assert(Keys::kBN == BN, "key tile size");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sO = base + L::kQ, sKV = sO + L::kO;
  const uint32_t bar_q = base + L::kBars, bar_full = bar_q + 8, bar_empty = bar_full + 8 * S;
  int32_t* skeys = reinterpret_cast<int32_t*>(smem_raw + (base - smem_u32(smem_raw)) + L::kKeys);
  float* sbias = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kBias);

  const int tid = threadIdx.x, wg = tid >> 7;
  const GridPos gp = grid_pos(p.order);
  const int qt = p.qt0 + int(gridDim.x) - 1 - gp.x;
  const int h = gp.y, b = gp.z, hk = h / (p.H / p.Hkv);
  const int q0 = qt * BM, T = p.T;
  const Keys keys = MakeKeys<Keys>::make(p, b, hk, qt, q0, BM);
  const int n_tiles = keys.count;
  const int64_t brow = (int64_t(b) * p.Hkv + hk) * T;  // this (b, hk)'s bias / thr row (DMA)

  if (tid == 0) {
    mbar_init(bar_q, 128);
    for (int st = 0; st < S; ++st) {
      mbar_init(bar_full + 8 * st, Keys::kGathered ? 256 : 128);  // gathered: copies + arrive per thread
      mbar_init(bar_empty + 8 * st, 8);
    }
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<24>();
    const int64_t q_stride = int64_t(p.H) * DQK, o_stride = int64_t(p.H) * DV;
    const int64_t k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
    const nv_bf16* qg = p.q + (int64_t(b) * T * p.H + h) * DQK;
    const nv_bf16* dog = p.dout + (int64_t(b) * T * p.H + h) * DV;
    const nv_bf16* kg = p.k + (int64_t(b) * T * p.Hkv + hk) * DQK;
    const nv_bf16* vg = p.v + (int64_t(b) * T * p.Hkv + hk) * DV;
    load_sw128_async<BM, DQK, 128>(sQ, qg, [&](int r) -> const nv_bf16* {
      return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
    }, tid);
    load_sw128_async<BM, DV, 128>(sO, dog, [&](int r) -> const nv_bf16* {
      return q0 + r < T ? dog + int64_t(q0 + r) * o_stride : nullptr;
    }, tid);
    cp_async_commit();
    if constexpr (Keys::kGathered) {
      // as the gathered forward: copies complete on the barriers (no waits in the producer), one
      // row's position and bias per thread and tile loaded a tile ahead, K/V rows by shuffles
      static_assert(GatherRows<BN, DQK>::kOk && DQK == DV, "gathered dQ: equal head dims of 64 or 128");
      cp_async_mbar_arrive(bar_q);
      const int my_row = GatherRows<BN, DQK>::lane_row(tid >> 5, tid & 31);
      auto pos = [&](int n) { return my_row < 0 || n >= n_tiles ? -1 : keys.key(n, my_row); };
      int j_next = pos(0);
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S, j = j_next < T ? j_next : -1;
        float bj = -INFINITY;
        if constexpr (DMA) bj = j >= 0 ? __ldg(p.bias + brow + j) : -INFINITY;
        j_next = pos(n + 1);
        if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);
        const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK;
        load_gathered_pair_async<BN, DQK>(sk, sv, kg, int(k_stride), vg, int(v_stride), j, tid);
        cp_async_mbar_arrive(bar_full + 8 * st);
        // the stage's previous readers of skeys / sbias released it (empty) before this point
        if (my_row >= 0) {
          skeys[st * BN + my_row] = j;
          if constexpr (DMA) sbias[st * BN + my_row] = bj;
        }
        mbar_arrive(bar_full + 8 * st);  // release: skeys and sbias, and this thread's part of the count
      }
      cp_async_wait<0>();
    } else {
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S;
        if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);
        const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK;
        const int k0 = keys.key(n, 0);  // dense: rows k0 .. k0 + BN − 1
        load_sw128_async<BN, DQK, 128>(sk, kg, [&](int r) -> const nv_bf16* {
          return k0 + r < T ? kg + int64_t(k0 + r) * k_stride : nullptr;
        }, tid);
        load_sw128_async<BN, DV, 128>(sv, vg, [&](int r) -> const nv_bf16* {
          return k0 + r < T ? vg + int64_t(k0 + r) * v_stride : nullptr;
        }, tid);
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();
        mbar_arrive(n == 0 ? bar_q : bar_full + 8 * ((n - 1) % S));
      }
      cp_async_wait<0>();
      fence_proxy_async();
      mbar_arrive(n_tiles == 0 ? bar_q : bar_full + 8 * ((n_tiles - 1) % S));
    }
  } else {
    setmaxnreg_inc<240>();
    const int cw = wg - 1, wtid = tid - 128 * wg, warp = wtid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int row0 = q0 + 64 * cw + 16 * warp + g;
    float li[2], di[2], thr_r[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = row0 + 8 * hf;
      const int64_t o = (int64_t(b) * p.H + h) * T + i;
      li[hf] = i < T ? p.lse2[o] : 0.f;
      di[hf] = i < T ? p.delta[o] : 0.f;
      if constexpr (DMA) thr_r[hf] = i < T ? __ldg(p.thr + brow + i) : INFINITY;
    }
    Acc<DQK> dq;
    dq.zero();
    Acc<BN> sc, dp;            // S and dP (then dS) of a key tile
    uint32_t da[BN / 16][4];  // dS as A fragments (bf16)

    auto issue_sdp = [&](int st) {  // S = Q·Kᵀ and dP = dO·Vᵀ (one commit group)
      const uint32_t sk = sKV + uint32_t(st * L::kStage), sv = sk + L::kK;
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk)
        wgmma_ss_n64(sc.c, desc_kmajor<BM, DQK>(sQ, 64 * cw, kk), desc_kmajor<BN, DQK>(sk, 0, kk), kk > 0);
#pragma unroll
      for (int kk = 0; kk < DV / 16; ++kk)
        wgmma_ss_n64(dp.c, desc_kmajor<BM, DV>(sO, 64 * cw, kk), desc_kmajor<BN, DV>(sv, 0, kk), kk > 0);
    };
    auto ds = [&](int n, int st) {  // dS = P∘(dP − delta), P = exp2(S·c − lse2) masked, in dp
      const int32_t* sks = skeys + st * BN;  // gathered: written before the full barrier's arrive
      const float* sb = sbias + st * BN;
      (void)sks, (void)sb;
      auto bias_at = [&](int c, int j) -> float {  // raw: compared with thr_r exactly, as the forward
        if constexpr (!DMA) return 0.f;
        else if constexpr (Keys::kGathered) return sb[c];  // −inf for padding
        else return j >= 0 ? __ldg(p.bias + brow + j) : 0.f;
      };
      auto tile = [&](auto masked) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = nb * 8 + 2 * t + e;
            const int j = Keys::kGathered ? (masked ? sks[c] : 0) : keys.key(n, c);
            const float braw = bias_at(c, j);
            const float bj = braw * kLog2e;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              float pv = fast_exp2(fmaf(sc.c[nb][2 * hf + e], p.scale_log2, bj - li[hf]));
              if (masked &&
                  (!visible(row0 + 8 * hf, j, p.window) || dma_drops(braw, thr_r[hf], row0 + 8 * hf, j, p.local)))
                pv = 0.f;
              dp.c[nb][2 * hf + e] = pv * (dp.c[nb][2 * hf + e] - di[hf]);
            }
          }
        }
      };
      if (keys.needs_mask(n)) tile(std::true_type{});
      else tile(std::false_type{});  // every (row, key) of the tile visible and kept
    };
    auto make_frags = [&] {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        dp.to_a(da[kk], kk);
        fence_operands(da[kk]);
      }
    };
    auto issue_dq = [&](int st) {  // dQ += dS·K, K N-major
      const uint32_t sk = sKV + uint32_t(st * L::kStage);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
        for (int pn = 0; pn < DQK / 64; ++pn)
          wgmma_rs_n64_tb(*reinterpret_cast<float(*)[8][4]>(&dq.c[8 * pn]), da[kk], desc_nmajor<BN, DQK>(sk, kk, pn), 1);
      }
    };
    auto release = [&](int st) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty + 8 * st);
    };
    auto wait_full = [&](int n) {
      mbar_wait(bar_full + 8 * (n % S), uint32_t(n / S) & 1u);
      if constexpr (Keys::kGathered) fence_proxy_async();  // the copies completed on the barrier
    };

    mbar_wait(bar_q, 0);
    if constexpr (Keys::kGathered) fence_proxy_async();
    if constexpr (!OVERLAP) {
      for (int n = 0; n < n_tiles; ++n) {
        const int st = n % S;
        wait_full(n);
        wgmma_fence();
        issue_sdp(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(sc.c);
        fence_operands(dp.c);
        ds(n, st);
        make_frags();
        fence_operands(dq.c);
        wgmma_fence();
        issue_dq(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dq.c);
        release(st);
      }
    } else if (n_tiles > 0) {
      // pipelined as the forward: S/dP of tile n + 1 issued before dQ += dS·K of tile n
      wait_full(0);
      wgmma_fence();
      issue_sdp(0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(sc.c);
      fence_operands(dp.c);
      ds(0, 0);
      make_frags();
      for (int n = 0; n + 1 < n_tiles; ++n) {
        const int st = n % S, st1 = (n + 1) % S;
        wait_full(n + 1);
        fence_operands(dq.c);
        wgmma_fence();
        issue_sdp(st1);
        wgmma_commit();
        issue_dq(st);
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(sc.c);
        fence_operands(dp.c);
        ds(n + 1, st1);
        wgmma_wait<0>();
        fence_operands(dq.c);
        release(st);
        make_frags();
      }
      const int st = (n_tiles - 1) % S;
      fence_operands(dq.c);
      wgmma_fence();
      issue_dq(st);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dq.c);
      release(st);
    }

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = row0 + 8 * hf;
      if (i < T) {
        nv_bf16* dqr = p.dq + ((int64_t(b) * T + i) * p.H + h) * DQK;
#pragma unroll
        for (int nb = 0; nb < DQK / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dqr + nb * 8 + 2 * t) =
              pack_bf16(dq.c[nb][2 * hf] * p.scale, dq.c[nb][2 * hf + 1] * p.scale);
      }
    }
  }
#endif  // DMAT_FLASH_SM90A
}

// dK/dV on Hopper (sm_90a), head dims 64 and 128: one block per (128-key tile, KV head, batch);
// K and V stay in shared memory, the producer warpgroup streams (query head, 64-query tile) items
// — Q, dO, lse2 and delta — through STAGES buffers in the fixed order of the mma.sync kernel
// (heads outer: deterministic sums). Consumer warpgroup cw owns keys 64cw .. 64cw + 63:
// Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ as SS wgmma (m64n64, all operands K-major), Pᵀ = exp2(Sᵀ·c − lse2)
// and dSᵀ = Pᵀ∘(dPᵀ − delta) in registers, then dV += Pᵀ·dO and dK += dSᵀ·Q as RS wgmma with dO
// and Q read N-major. dQ comes from the separate wgmma dQ pass.
constexpr int kWgKvBN = 128, kWgKvBM = 64;

template <int DQK, int DV>
struct WgKvSmem {
  static constexpr int BN = kWgKvBN, BM = kWgKvBM;
  static constexpr int kK = BN * DQK * 2, kV = BN * DV * 2, kQ = BM * DQK * 2, kO = BM * DV * 2;
  static constexpr int kStage = kQ + kO;
  static constexpr int kStages = (kK + kV + 4 * kStage) <= 200 * 1024 ? 4 : 3;
  static constexpr int kStats = kK + kV + kStages * kStage;  // float lse2, delta, thr (DMA; NaN past T) [stage][3][BM]
  static constexpr int kBars = kStats + kStages * BM * 12;
  static constexpr int kBytes = kBars + (2 * kStages + 1) * 8;
  static constexpr size_t kAlloc = size_t(kBytes) + 1024;
  static_assert(kK % 1024 == 0 && kV % 1024 == 0 && kQ % 1024 == 0 && kO % 1024 == 0, "1024-aligned atoms");
};

// DMA: the block's keys are a key group (p.grp_keys), its queries the group's range, with the key
// bias, the threshold mask and dbias_j = Σ_i dS_ij summed in registers (as the mma.sync kernel).
template <int DQK, int DV, bool OVERLAP, bool DMA = false>
__global__ void __launch_bounds__(kWgThreads, 1) flash_bwd_dkdv_wgmma_kernel(const BwdParams p) {
#ifdef DMAT_FLASH_SM90A
  using namespace flash::sm90;
  using L = WgKvSmem<DQK, DV>;
  constexpr int BN = L::BN, BM = L::BM, S = L::kStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = base, sV = base + L::kK, sQO = sV + L::kV;  // stage st: Q at sQO + st·kStage, dO at + kQ
  float* stats = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kStats);
  const uint32_t bar_kv = base + L::kBars, bar_full = bar_kv + 8, bar_empty = bar_full + 8 * S;

  const int tid = threadIdx.x, wg = tid >> 7;
  const GridPos gp = grid_pos(p.order_kv);
  const int hk = gp.y, b = gp.z;
  const int T = p.T, group = p.H / p.Hkv;
  const int64_t brow = (int64_t(b) * p.Hkv + hk) * T;  // this (b, hk)'s bias / thr row (DMA)
  const KvBlock<BN, DMA> kv(p, gp.x, b, hk, BM);
  const int k0 = kv.k0, qt_first = kv.qt_first, nq = kv.nq;
  auto key_at = [&](int r) { return kv.key(r, T); };
  const int n_items = group * nq;

  if (tid == 0) {
    mbar_init(bar_kv, 128);
    for (int st = 0; st < S; ++st) {
      mbar_init(bar_full + 8 * st, 256);  // each producer thread: its copies, then its own arrive
      mbar_init(bar_empty + 8 * st, 8);
    }
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<24>();
    const int64_t q_stride = int64_t(p.H) * DQK, o_stride = int64_t(p.H) * DV;
    const int64_t k_stride = int64_t(p.Hkv) * DQK, v_stride = int64_t(p.Hkv) * DV;
    const nv_bf16* kg = p.k + (int64_t(b) * T * p.Hkv + hk) * DQK;
    const nv_bf16* vg = p.v + (int64_t(b) * T * p.Hkv + hk) * DV;
    load_sw128_async<BN, DQK, 128>(sK, kg, [&](int r) -> const nv_bf16* {
      const int j = key_at(r);
      return j >= 0 ? kg + int64_t(j) * k_stride : nullptr;
    }, tid);
    load_sw128_async<BN, DV, 128>(sV, vg, [&](int r) -> const nv_bf16* {
      const int j = key_at(r);
      return j >= 0 ? vg + int64_t(j) * v_stride : nullptr;
    }, tid);
    // Every copy completes on its barrier (cp_async_mbar_arrive): the producer never waits for
    // its own loads and keeps every free stage filled (consumers fence after their waits).
    cp_async_mbar_arrive(bar_kv);
    // lse2, delta (and thr) of a whole item by 16-byte cp.async where the rows allow it (T % 4 == 0,
    // aligned bases); a sequence's last, partial item and unaligned rows by plain loads and stores
    // (past T: 0, and thr NaN, so no key is kept there whatever its bias).
    const bool vec_stats =
        (T & 3) == 0 && ((reinterpret_cast<uintptr_t>(p.lse2) | reinterpret_cast<uintptr_t>(p.delta) |
                          (DMA ? reinterpret_cast<uintptr_t>(p.thr) : uintptr_t(0))) & 15u) == 0;
    for (int n = 0; n < n_items; ++n) {
      const int st = n % S;
      if (n >= S) mbar_wait(bar_empty + 8 * st, uint32_t((n / S) + 1) & 1u);
      const int hh = hk * group + n / nq, q0 = (qt_first + n % nq) * BM;
      const nv_bf16* qg = p.q + (int64_t(b) * T * p.H + hh) * DQK;
      const nv_bf16* dog = p.dout + (int64_t(b) * T * p.H + hh) * DV;
      const uint32_t sq = sQO + uint32_t(st * L::kStage), so = sq + L::kQ;
      load_sw128_async<BM, DQK, 128>(sq, qg, [&](int r) -> const nv_bf16* {
        return q0 + r < T ? qg + int64_t(q0 + r) * q_stride : nullptr;
      }, tid);
      load_sw128_async<BM, DV, 128>(so, dog, [&](int r) -> const nv_bf16* {
        return q0 + r < T ? dog + int64_t(q0 + r) * o_stride : nullptr;
      }, tid);
      const int64_t o0 = (int64_t(b) * p.H + hh) * T + q0;
      float* sst = stats + st * 3 * BM;  // the stage's previous readers released it (empty)
      if (vec_stats && q0 + BM <= T) {
        constexpr int kV4 = BM / 4;  // 16-byte chunks per vector
        if (tid < (DMA ? 3 : 2) * kV4) {
          const int which = tid / kV4, c4 = (tid % kV4) * 4;
          const float* src = which == 0 ? p.lse2 + o0 + c4 : which == 1 ? p.delta + o0 + c4 : p.thr + brow + q0 + c4;
          cp_async16_u32(smem_u32(sst + which * BM + c4), src, true);
        }
      } else {  // lse2 (threads 0..63) and delta (64..127), and thr
        const int c = tid & (BM - 1), i = q0 + c;
        sst[(tid >= BM) * BM + c] = i < T ? (tid < BM ? p.lse2[o0 + c] : p.delta[o0 + c]) : 0.f;
        if (DMA && tid < BM) sst[2 * BM + c] = i < T ? p.thr[brow + i] : __int_as_float(0x7fffffff);
      }
      cp_async_mbar_arrive(bar_full + 8 * st);
      mbar_arrive(bar_full + 8 * st);  // release: the plain stores, and this thread's part of the count
    }
    cp_async_wait<0>();
  } else {
    setmaxnreg_inc<240>();
    const int cw = wg - 1, wtid = tid - 128 * wg, warp = wtid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    // this thread's keys: rows 64cw + 16warp + g (c0,c1) and + 8 (c2,c3) of the tile
    const int kj[2] = {key_at(64 * cw + 16 * warp + g), key_at(64 * cw + 16 * warp + g + 8)};
    // for the element mask: padding rows (−1) sort after every query, so no query keeps them
    const int kjm[2] = {kj[0] >= 0 ? kj[0] : INT_MAX, kj[1] >= 0 ? kj[1] : INT_MAX};
    float kb2[2] = {0.f, 0.f}, kbraw[2] = {0.f, 0.f}, dbias[2] = {0.f, 0.f};  // DMA: bias (log2 units, raw)
    // DMA: the block's last key position and smallest raw key bias (over its real keys): a query
    // tile q0 .. q0 + BM − 1 (all < T) with q0 >= kmax and thr[q0 + BM − 1] <= kbmin keeps every
    // key of the block for every query (thresholds never decrease), so it runs without the mask
    int kmax = -1;
    float kbmin = INFINITY;
    if constexpr (DMA) {
      __shared__ int red_k[8];
      __shared__ float red_b[8];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        kbraw[hf] = kj[hf] >= 0 ? __ldg(p.bias + brow + kj[hf]) : 0.f;
        kb2[hf] = kbraw[hf] * kLog2e;
        kmax = max(kmax, kj[hf]);
        if (kj[hf] >= 0) kbmin = fminf(kbmin, kbraw[hf]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
        kbmin = fminf(kbmin, __shfl_xor_sync(0xffffffffu, kbmin, o));
      }
      if (lane == 0) red_k[4 * cw + warp] = kmax, red_b[4 * cw + warp] = kbmin;
      asm volatile("bar.sync 2, 256;\n" ::: "memory");  // the two consumer warpgroups
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) kmax = max(kmax, red_k[w8]), kbmin = fminf(kbmin, red_b[w8]);
    }
    Acc<DQK> dk;
    Acc<DV> dv;
    dk.zero();
    dv.zero();
    Acc<BM> sc, dp;  // Sᵀ and dPᵀ (then Pᵀ and dSᵀ): rows keys, columns queries
    uint32_t pa[BM / 16][4], da[BM / 16][4];  // Pᵀ and dSᵀ as A fragments (bf16)

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ of the item in stage st issued (one commit group)
    auto issue_sdp = [&](int st) {
      const uint32_t sq = sQO + uint32_t(st * L::kStage), so = sq + L::kQ;
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk)
        wgmma_ss_n64(sc.c, desc_kmajor<BN, DQK>(sK, 64 * cw, kk), desc_kmajor<BM, DQK>(sq, 0, kk), kk > 0);
#pragma unroll
      for (int kk = 0; kk < DV / 16; ++kk)
        wgmma_ss_n64(dp.c, desc_kmajor<BN, DV>(sV, 64 * cw, kk), desc_kmajor<BM, DV>(so, 0, kk), kk > 0);
    };
    // Pᵀ = exp2(Sᵀ·c − lse2) (masked to 0) and dSᵀ = Pᵀ∘(dPᵀ − delta), in place, for item n
    auto p_ds = [&](int n, int st) {
      const int q0 = (qt_first + n % nq) * BM;
      const float* sL = stats + (st * 3) * BM;
      const float* sD = sL + BM;
      const float* sThr = sD + BM;
      (void)sThr;
      const bool mask = DMA ? !(q0 >= kmax && q0 + BM <= T && sThr[BM - 1] <= kbmin)
                            : q0 < k0 + BN - 1 || q0 + BM > T || (p.window > 0 && q0 + BM - 1 - p.window >= k0);
      auto item = [&](auto masked) {
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = nb * 8 + 2 * t + e, i = q0 + c;
            const float li = sL[c], di = sD[c];
            const float th = DMA && masked ? sThr[c] : 0.f;  // NaN past T: no key kept there
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              float pv = fast_exp2(fmaf(sc.c[nb][2 * hf + e], p.scale_log2, kb2[hf] - li));
              if constexpr (decltype(masked)::value) {  // branch-free: & rather than short-circuits
                bool keep = kjm[hf] <= i;
                // (past T th is NaN and i >= T: no key kept there, local window or not)
                if constexpr (DMA) keep &= (kbraw[hf] >= th) | ((kjm[hf] > i - p.local) & (i < T));
                else keep &= (i < T) & ((p.window <= 0) | (kjm[hf] > i - p.window));
                pv = keep ? pv : 0.f;
              }
              sc.c[nb][2 * hf + e] = pv;
              const float dsv = pv * (dp.c[nb][2 * hf + e] - di);
              dp.c[nb][2 * hf + e] = dsv;
              if constexpr (DMA) dbias[hf] += dsv;
            }
          }
        }
      };
      if (mask) item(std::true_type{});
      else item(std::false_type{});
    };
    auto make_frags = [&] {
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        sc.to_a(pa[kk], kk);
        dp.to_a(da[kk], kk);
        fence_operands(pa[kk]);
        fence_operands(da[kk]);
      }
    };
    // dV += Pᵀ·dO and dK += dSᵀ·Q issued (dO and Q N-major)
    auto issue_grads = [&](int st) {
      const uint32_t sq = sQO + uint32_t(st * L::kStage), so = sq + L::kQ;
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
        for (int pn = 0; pn < DV / 64; ++pn)
          wgmma_rs_n64_tb(*reinterpret_cast<float(*)[8][4]>(&dv.c[8 * pn]), pa[kk], desc_nmajor<BM, DV>(so, kk, pn), 1);
#pragma unroll
        for (int pn = 0; pn < DQK / 64; ++pn)
          wgmma_rs_n64_tb(*reinterpret_cast<float(*)[8][4]>(&dk.c[8 * pn]), da[kk], desc_nmajor<BM, DQK>(sq, kk, pn), 1);
      }
    };
    auto release = [&](int st) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty + 8 * st);
    };
    auto wait_full = [&](int n) {
      mbar_wait(bar_full + 8 * (n % S), uint32_t(n / S) & 1u);
      fence_proxy_async();  // the copies completed on the barrier
    };

    mbar_wait(bar_kv, 0);
    fence_proxy_async();
    if constexpr (!OVERLAP) {
      for (int n = 0; n < n_items; ++n) {
        const int st = n % S;
        wait_full(n);
        wgmma_fence();
        issue_sdp(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(sc.c);
        fence_operands(dp.c);
        p_ds(n, st);
        make_frags();
        fence_operands(dv.c);
        fence_operands(dk.c);
        wgmma_fence();
        issue_grads(st);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dv.c);
        fence_operands(dk.c);
        release(st);
      }
    } else if (n_items > 0) {
      // as the forward's pipelined schedule: Sᵀ/dPᵀ of item n + 1 issued before the gradient
      // MMAs of item n, their elementwise part running while those are in flight
      wait_full(0);
      wgmma_fence();
      issue_sdp(0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(sc.c);
      fence_operands(dp.c);
      p_ds(0, 0);
      make_frags();
      for (int n = 0; n + 1 < n_items; ++n) {
        const int st = n % S, st1 = (n + 1) % S;
        wait_full(n + 1);
        fence_operands(dv.c);
        fence_operands(dk.c);
        wgmma_fence();
        issue_sdp(st1);
        wgmma_commit();
        issue_grads(st);
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(sc.c);
        fence_operands(dp.c);
        p_ds(n + 1, st1);
        wgmma_wait<0>();
        fence_operands(dv.c);
        fence_operands(dk.c);
        release(st);
        make_frags();
      }
      const int st = (n_items - 1) % S;
      fence_operands(dv.c);
      fence_operands(dk.c);
      wgmma_fence();
      issue_grads(st);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dv.c);
      fence_operands(dk.c);
      release(st);
    }

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if constexpr (DMA) {  // the four lanes of a key row hold disjoint query columns
        dbias[hf] += __shfl_xor_sync(0xffffffffu, dbias[hf], 1);
        dbias[hf] += __shfl_xor_sync(0xffffffffu, dbias[hf], 2);
      }
      const int j = kj[hf];
      if (j >= 0) {
        if (DMA && t == 0) p.dbias[brow + j] = dbias[hf];
        nv_bf16* dkr = p.dk + ((int64_t(b) * T + j) * p.Hkv + hk) * DQK;
        nv_bf16* dvr = p.dv + ((int64_t(b) * T + j) * p.Hkv + hk) * DV;
#pragma unroll
        for (int nb = 0; nb < DQK / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dkr + nb * 8 + 2 * t) =
              pack_bf16(dk.c[nb][2 * hf] * p.scale, dk.c[nb][2 * hf + 1] * p.scale);
#pragma unroll
        for (int nb = 0; nb < DV / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dvr + nb * 8 + 2 * t) = pack_bf16(dv.c[nb][2 * hf], dv.c[nb][2 * hf + 1]);
      }
    }
  }
#endif  // DMAT_FLASH_SM90A
}

// dq = bf16(scale · acc), 8 elements per thread (DQK is a multiple of 8).
__global__ void __launch_bounds__(256) flash_dq_convert_kernel(nv_bf16* dq, const float* acc, float scale,
                                                               int64_t n8) {
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < n8; v += int64_t(gridDim.x) * blockDim.x) {
    float f[8];
    detail::load8f(acc + v * 8, f);
#pragma unroll
    for (int x = 0; x < 8; ++x) f[x] *= scale;
    detail::store8(dq + v * 8, f);
  }
}

// ---- host side -------------------------------------------------------------------------------
const nv_bf16* nv(const bf16* p) { return reinterpret_cast<const nv_bf16*>(p); }
nv_bf16* nv(bf16* p) { return reinterpret_cast<nv_bf16*>(p); }

void check_args(const AttnShape& s, std::initializer_list<const void*> ptrs) {
  if (!flash_attention_supported(s))
    fail("flash attention: unsupported shape B={} T={} H={} Hkv={} Dqk={} Dv={} window={} (head dims {}; H a "
         "multiple of Hkv; 1 <= T < 2^31)",
         s.B, s.T, s.H, s.Hkv, s.Dqk, s.Dv, s.window, head_dims_list(AttnKernel::flash));
  for (const void* p : ptrs)
    DMAT_CHECK(detail::aligned16(p), "flash attention: tensors must be 16-byte aligned ({})", p);
}

// Opt in to > 48 KB of dynamic shared memory once per kernel instantiation.
template <class Kernel>
void prepare(Kernel kernel, size_t smem) {
  DMAT_CHECK(smem <= max_smem_optin(), "flash attention needs {} B of shared memory, device allows {}", smem,
             max_smem_optin());
  DMAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

template <int DQK, int DV, class Keys, bool BIAS>
void launch_fwd(const FwdParams& p, int64_t B) {
  constexpr size_t smem = size_t(kFwdBM * DQK + 2 * kFwdBN * (DQK + DV)) * sizeof(nv_bf16);
  auto kernel = flash_fwd_kernel<DQK, DV, kFwdWarps, kFwdBN, Keys, BIAS>;
  static const bool ready = (prepare(kernel, smem), true);
  (void)ready;
  const dim3 grid(unsigned(Keys::kGathered ? p.n_tiles : (p.T + kFwdBM - 1) / kFwdBM), unsigned(p.H), unsigned(B));
  kernel<<<grid, kFwdWarps * 32, smem, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

template <int DQK, int DV, class Keys, bool BIAS>
void forward_dims(const FwdParams& p, int64_t B) {
  launch_fwd<DQK, DV, Keys, BIAS>(p, B);
}

// Launch order of the attention grids (grid_pos). DMAT_ATTN_ORDER=lpt (default): groups of about a
// wave of blocks (lpt_group), heaviest tiles first inside a group; launch: the plain grid order (all
// tiles of one head, then the next); lptN: groups of N (head, batch) pairs. Read once.
int attn_order_choice() {
  static const int c = env_choice("DMAT_ATTN_ORDER", {"lpt", "launch", "lpt1", "lpt2", "lpt4", "lpt8", "lpt16", "lpt32", "lpt64"}, 0);
  return c;
}

// The group DMAT_ATTN_ORDER=launch|lptN forces on a grid of `pairs` (head, batch) pairs, or launch
// order where grid_pos's 32-bit arithmetic would overflow; −1 where the grid's own rule applies.
int forced_group(const AttnShape& s, int64_t pairs) {
  const int c = attn_order_choice();
  if (c == 1 || s.T * pairs >= (int64_t(1) << 31)) return 0;  // grid_pos computes in 32 bits (tiles ≤ T)
  if (c >= 2) return int(std::min<int64_t>(int64_t(1) << (c - 2), pairs));
  return -1;
}

// grid_pos's group for a grid of `pairs` (head, batch) pairs of ceil(T / 128) tiles each (every
// dense grid: forward and dQ query tiles, dK/dV key blocks), each pair touching `tensors_per_pair`
// [T, Dqk + Dv] bf16 tensors' worth of one head. About one wave of blocks per group: its heaviest
// tiles run together and its light ones fill in behind. Where a pair alone has a wave of tiles or
// more (long sequences) the group is one pair — the launch order, which also keeps the pair's K/V
// (forward, dQ) or Q/dO (dK/dV) in L2 for all its blocks (grouping at N = 16K made the backward 1–2%
// slower; H200, 2026-11-29). Never more pairs than fit in L2.
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
// head (lpt_group's choice there), the last heads' class-0 blocks ran nearly alone at the end (H200,
// ninth session, N = 16K, w = 2048: fwd+bwd 3.60 → 3.29 ms, and 3.28 → 3.18 with the dQ pass on the
// side stream; the dense dK/dV grid measured slower so grouped, 8.93 → 9.17 ms, hence only here).
int dma_dkdv_order(const AttnShape& s) {
  const int64_t pairs = s.Hkv * s.B;
  const int f = forced_group(s, pairs);
  return f >= 0 ? f : int(pairs);
}

int g_side_mode = -1;  // attention_side_stream(): −1 from the environment; testing::set_attention_side_stream

// DMAT_ATTN_WG_OVERLAP=1 selects the software-pipelined schedule of the wgmma forward, dQ and (head
// dim 64) dK/dV consumers; 0, the default, the plain per-tile one (measured faster on the H200:
// forward 229 against 210 TFLOP/s, forward + backward 249 against 216). Read once.
bool wg_overlap() {
  static const bool on = env_choice("DMAT_ATTN_WG_OVERLAP", {"0", "1"}, 0) == 1;
  return on;
}

// The wgmma forward's dense-policy K/V tiles by TMA instead of cp.async: on by default since its
// first H200 measurement (2026-11-29: forward 475 TFLOP/s against 229 with cp.async and 271 for
// mma.sync at N = 16384, D = 128; the whole attention suite passes with it). DMAT_ATTN_WG_TMA=0
// turns it off (read once).
bool wg_tma() {
  static const bool on = env_choice("DMAT_ATTN_WG_TMA", {"0", "1"}, 1) == 1;
  return on;
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    DMAT_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    DMAT_CHECK(q == cudaDriverEntryPointSuccess && f != nullptr, "flash attention: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// 3-D map over a [rows][heads][D] bf16 tensor: box {64 columns, 1 head, box_rows rows}, 128B swizzle,
// zero fill outside.
CUtensorMap make_tmap(const void* base, int64_t D, int64_t heads, int64_t rows, int box_rows) {
  CUtensorMap m;
  const cuuint64_t dims[3] = {cuuint64_t(D), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(D * 2), cuuint64_t(heads * D * 2)};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {64, 1, cuuint32_t(box_rows)};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims, strides, box,
                                    estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DMAT_CHECK(r == CUDA_SUCCESS, "flash attention: cuTensorMapEncodeTiled failed ({}) for D={} heads={} rows={}",
             int(r), D, heads, rows);
  return m;
}

template <int DQK, int DV, class Keys, bool BIAS, bool OVERLAP, bool TMA>
void launch_fwd_wgmma_variant(const FwdParams& p, int64_t B) {
  using L = WgSmem<DQK, DV>;
  auto kernel = flash_fwd_wgmma_kernel<DQK, DV, Keys, BIAS, OVERLAP, TMA>;
  static const bool ready = (prepare(kernel, L::kAlloc), true);
  (void)ready;
  FwdTma tma{};
  if constexpr (TMA) {
    tma.k = make_tmap(p.k, DQK, p.Hkv, B * p.T, L::BN);
    tma.v = make_tmap(p.v, DV, p.Hkv, B * p.T, L::BN);
  }
  const dim3 grid(unsigned(Keys::kGathered ? p.n_tiles : (p.T + kWgBM - 1) / kWgBM), unsigned(p.H), unsigned(B));
  kernel<<<grid, kWgThreads, L::kAlloc, stream()>>>(p, tma);
  DMAT_CUDA_LAUNCH_CHECK();
}

template <int DQK, int DV, class Keys, bool BIAS>
void launch_fwd_wgmma(const FwdParams& p, int64_t B) {
  if constexpr (!Keys::kGathered) {
    // TMA coordinates are int32; a bias comes by bulk copies of 16-byte multiples from 16-byte
    // aligned rows (else the cp.async producer stages it)
    const bool bias_ok = !BIAS || (p.T % 4 == 0 && detail::aligned16(p.bias));
    if (wg_tma() && bias_ok && B * int64_t(p.T) < (int64_t(1) << 31) - 256) {
      if (wg_overlap()) launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, true, true>(p, B);
      else launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, false, true>(p, B);
      return;
    }
  }
  if (wg_overlap()) launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, true, false>(p, B);
  else launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, false, false>(p, B);
}

// KeysT: the key-tile policy (DenseKeys or GatherKeys), instantiated at each kernel's key-tile size.
template <template <int> class KeysT, bool BIAS>
void forward_dispatch(const FwdParams& p, const AttnShape& s, FlashPath path) {
  static_assert(kWgBM == kFwdBM, "one query tile (and gather list) size for both paths");
  const bool known = head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    if constexpr (head_dims_wgmma(DQK, DV)) {
      if (path == FlashPath::wgmma) {
        launch_fwd_wgmma<DQK, DV, KeysT<wg_bn<DQK>()>, BIAS>(p, s.B);
        return;
      }
    }
    forward_dims<DQK, DV, KeysT<kFwdBN>, BIAS>(p, s.B);
  });
  DMAT_CHECK(known, "flash attention: head dims ({}, {}) not in the table (check_args admits only those)", s.Dqk,
             s.Dv);
}

// ---- path selection ------------------------------------------------------------------------
// Whether the wgmma kernels run on the current device: compute capability 9.0 and this build
// carries sm_90a code (probed once: the probe kernel reports which code the driver picked).
bool device_runs_sm90a() {
  static const bool ok = [] {
    int dev = 0, major = 0, minor = 0;
    DMAT_CUDA_CHECK(cudaGetDevice(&dev));
    DMAT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DMAT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0) return false;
    int* d = nullptr;
    int h = 0;
    DMAT_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
    flash_sm90a_probe_kernel<<<1, 1, 0, stream()>>>(d);
    DMAT_CUDA_CHECK(cudaGetLastError());
    DMAT_CUDA_CHECK(cudaMemcpyAsync(&h, d, sizeof(int), cudaMemcpyDeviceToHost, stream()));
    DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));
    DMAT_CUDA_CHECK(cudaFree(d));
    return h == 1;
  }();
  return ok;
}

bool wgmma_dims(const AttnShape& s) { return head_dims_wgmma(s.Dqk, s.Dv); }

// DMAT_ATTN_PATH=mma|wgmma, read once; anything else is an error a user can act on.
FlashPath env_path() {
  static const FlashPath p = [] {
    switch (env_choice("DMAT_ATTN_PATH", {"auto", "mma", "wgmma"}, 0)) {
      case 1: return FlashPath::mma;
      case 2: return FlashPath::wgmma;
      default: return FlashPath::automatic;
    }
  }();
  return p;
}

// automatic picks, per direction, the path measured faster on the H200 (docs/perf.md, 2026-11-29,
// causal N = 16384, H = 16, D = 128): forward wgmma with the TMA producer (475 TFLOP/s; mma.sync
// 271, wgmma with cp.async 229, so without TMA the forward stays on mma.sync), backward wgmma
// (10.7 ms against 15.2). DMAT_ATTN_PATH overrides both directions.
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
  return ok ? FlashPath::wgmma : FlashPath::mma;  // DMAT_ATTN_PATH=wgmma: head dims without one use mma
}

// Query rows per dK/dV step: 64, or 32 where the (192, 128) accumulators leave no registers.
template <int DQK>
constexpr int bwd_bmq() {
  return DQK >= 128 ? 32 : 64;
}

template <int DQK, int DV>
void backward_dims(const BwdParams& p, int64_t B, bool deterministic, bool wgmma_dq, SideStream* side) {
  constexpr int BMQ = bwd_bmq<DQK>(), BNK = 16 * kBwdWarps;
  const dim3 kgrid(unsigned((p.T + BNK - 1) / BNK), unsigned(p.Hkv), unsigned(B));
  if constexpr (DQK % 64 == 0 && DV % 64 == 0) {
    if (wgmma_dq) {
      // dK/dV (wgmma for head dims 64 and 128, else the mma.sync kernel without atomics), then the
      // deterministic wgmma dQ pass (also when atomics are allowed: it is the faster dQ on Hopper)
      if constexpr (DQK <= 128) {  // (192, 128): the accumulators need more than 240 registers
        using LK = WgKvSmem<DQK, DV>;
        // the pipelined schedule holds two items' Sᵀ/dPᵀ state next to dK and dV: it fits the 240
        // registers for head dim 64 only (at 128 ptxas serialises the MMAs and spills, C7512)
        constexpr bool kCanOverlap = DQK + DV <= 128;
        auto kdkdv = flash_bwd_dkdv_wgmma_kernel<DQK, DV, false>;
        if constexpr (kCanOverlap)
          if (wg_overlap()) kdkdv = flash_bwd_dkdv_wgmma_kernel<DQK, DV, true>;
        static const bool ready_kv = (prepare(kdkdv, LK::kAlloc), true);  // the variant is fixed per process
        (void)ready_kv;
        const dim3 wkgrid(unsigned((p.T + kWgKvBN - 1) / kWgKvBN), unsigned(p.Hkv), unsigned(B));
        kdkdv<<<wkgrid, kWgThreads, LK::kAlloc, stream()>>>(p);
        DMAT_CUDA_LAUNCH_CHECK();
      } else {
        constexpr size_t smem_kv =
            size_t(BNK * (DQK + DV) + 2 * BMQ * (DQK + DV)) * sizeof(nv_bf16) + 4 * BMQ * sizeof(float);
        auto kdkdv = flash_bwd_dkdv_kernel<DQK, DV, kBwdWarps, BMQ, false>;
        static const bool ready_kv = (prepare(kdkdv, smem_kv), true);
        (void)ready_kv;
        kdkdv<<<kgrid, kBwdWarps * 32, smem_kv, stream()>>>(p);
        DMAT_CUDA_LAUNCH_CHECK();
      }
      using L = WgDqSmem<DQK, DV>;
      auto kdq = wg_overlap() ? flash_bwd_dq_wgmma_kernel<DQK, DV, true> : flash_bwd_dq_wgmma_kernel<DQK, DV, false>;
      static const bool ready_q = (prepare(kdq, L::kAlloc), true);  // the variant is fixed per process
      (void)ready_q;
      const dim3 qgrid(unsigned((p.T + kWgBM - 1) / kWgBM), unsigned(p.H), unsigned(B));
      side->run([&] { kdq<<<qgrid, kWgThreads, L::kAlloc, stream()>>>(p); });  // beside the dK/dV pass
      DMAT_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  if (deterministic) {
    constexpr size_t smem_kv =
        size_t(BNK * (DQK + DV) + 2 * BMQ * (DQK + DV)) * sizeof(nv_bf16) + 4 * BMQ * sizeof(float);
    auto kdkdv = flash_bwd_dkdv_kernel<DQK, DV, kBwdWarps, BMQ, false>;
    static const bool ready_kv = (prepare(kdkdv, smem_kv), true);
    (void)ready_kv;
    kdkdv<<<kgrid, kBwdWarps * 32, smem_kv, stream()>>>(p);
    DMAT_CUDA_LAUNCH_CHECK();

    constexpr int BM = 16 * kBwdWarps, BN = 64;
    constexpr size_t smem_q = size_t(BM * (DQK + DV) + 2 * BN * (DQK + DV)) * sizeof(nv_bf16);
    auto kdq = flash_bwd_dq_kernel<DQK, DV, kBwdWarps, BN>;
    static const bool ready_q = (prepare(kdq, smem_q), true);
    (void)ready_q;
    const dim3 qgrid(unsigned((p.T + BM - 1) / BM), unsigned(p.H), unsigned(B));
    kdq<<<qgrid, kBwdWarps * 32, smem_q, stream()>>>(p);
    DMAT_CUDA_LAUNCH_CHECK();
  } else {
    constexpr size_t smem_kv = size_t(BNK * (DQK + DV) + 2 * BMQ * (DQK + DV) + BNK * BMQ) * sizeof(nv_bf16) +
                               4 * BMQ * sizeof(float);
    auto kdkdv = flash_bwd_dkdv_kernel<DQK, DV, kBwdWarps, BMQ, true>;
    static const bool ready_kv = (prepare(kdkdv, smem_kv), true);
    (void)ready_kv;
    const int64_t n_acc = B * int64_t(p.T) * p.H * DQK;
    DMAT_CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, size_t(n_acc) * sizeof(float), stream()));
    kdkdv<<<kgrid, kBwdWarps * 32, smem_kv, stream()>>>(p);
    DMAT_CUDA_LAUNCH_CHECK();
    flash_dq_convert_kernel<<<detail::grid_for(n_acc / 8, 256, 8), 256, 0, stream()>>>(p.dq, p.dq_acc, p.scale,
                                                                                         n_acc / 8);
    DMAT_CUDA_LAUNCH_CHECK();
  }
}

// DMA backward: dK/dV/dbias key-major over the key groups (dma_dkdv_dims), then dQ query-major
// over the gathered lists of tiles qt0 .. qt0 + n_tiles − 1 (dma_dq_dims; wgmma on Hopper for head
// dims 64 and 128, else mma.sync; deterministic either way).
template <int D>
void dma_dkdv_dims(const BwdParams& p, int64_t B, bool wg) {
  if constexpr (head_dims_wgmma(D, D)) {  // a wgmma kernel for this head dim (head_dims.h)
    if (wg) {
      using LK = WgKvSmem<D, D>;
      static_assert(LK::BN == kFlashGroupKeys, "one key group per dK/dV block");
      auto kdkdv = flash_bwd_dkdv_wgmma_kernel<D, D, false, true>;
      static const bool ready_kv = (prepare(kdkdv, LK::kAlloc), true);
      (void)ready_kv;
      kdkdv<<<dim3(unsigned(p.n_groups), unsigned(p.Hkv), unsigned(B)), kWgThreads, LK::kAlloc, stream()>>>(p);
      DMAT_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  constexpr int BMQ = bwd_bmq<D>(), BNK = 16 * kBwdWarps;
  static_assert(BNK == kFlashGroupKeys, "one key group per dK/dV block");
  constexpr size_t smem_kv = size_t(BNK * 2 * D + 2 * BMQ * 2 * D) * sizeof(nv_bf16) + 6 * BMQ * sizeof(float);
  auto kdkdv = flash_bwd_dkdv_kernel<D, D, kBwdWarps, BMQ, false, true>;
  static const bool ready_kv = (prepare(kdkdv, smem_kv), true);
  (void)ready_kv;
  kdkdv<<<dim3(unsigned(p.n_groups), unsigned(p.Hkv), unsigned(B)), kBwdWarps * 32, smem_kv, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

template <int D>
void dma_dq_dims(const BwdParams& p, int64_t B, bool wg, int n_tiles) {
  if constexpr (head_dims_wgmma(D, D)) {  // a wgmma kernel for this head dim (head_dims.h)
    if (wg) {
      using L = WgDqSmem<D, D>;
      static_assert(kWgBM == kFwdBM, "the dQ pass reads the forward's per-tile lists");
      auto kdq = flash_bwd_dq_wgmma_kernel<D, D, false, GatherKeys<kWgDqBN>, true>;
      static const bool ready_q = (prepare(kdq, L::kAlloc), true);
      (void)ready_q;
      kdq<<<dim3(unsigned(n_tiles), unsigned(p.H), unsigned(B)), kWgThreads, L::kAlloc, stream()>>>(p);
      DMAT_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  constexpr int BM = 16 * kBwdWarps, BN = 64;
  static_assert(BM == kFwdBM, "the dQ pass reads the forward's per-tile lists");
  constexpr size_t smem_q = size_t(BM * 2 * D + 2 * BN * 2 * D) * sizeof(nv_bf16);
  auto kdq = flash_bwd_dq_kernel<D, D, kBwdWarps, BN, GatherKeys<BN>, true>;
  static const bool ready_q = (prepare(kdq, smem_q), true);
  (void)ready_q;
  kdq<<<dim3(unsigned(n_tiles), unsigned(p.H), unsigned(B)), kBwdWarps * 32, smem_q, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
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

int attention_side_stream() {
  if (g_side_mode < 0) g_side_mode = env_choice("DMAT_ATTN_SIDE_STREAM", {"0", "1", "2"}, 2);
  return g_side_mode;
}

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
    forward_dispatch<DenseKeys, true>(p, s, use);
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
    if (key_bias) forward_dispatch<GatherKeys, true>(p, s, use);
    else forward_dispatch<GatherKeys, false>(p, s, use);
  } else {
    if (key_bias) forward_dispatch<DenseKeys, true>(p, s, use);
    else forward_dispatch<DenseKeys, false>(p, s, use);
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
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    backward_dims<decltype(dqk)::value, decltype(dv)::value>(p, s.B, deterministic, wg, &side);
  });
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
  // the DMA kernels take one head dim (d_qk = d_v, the rows of the table marked dma); wg is false
  // for a pair without a wgmma kernel (resolve_path)
  auto dma_dims = [&](auto&& f) {
    head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
      if constexpr (head_dims_dma(decltype(dqk)::value, decltype(dv)::value)) {
        static_assert(decltype(dqk)::value == decltype(dv)::value, "the DMA kernels take d_qk = d_v");
        f(dqk);
      }
    });
  };
  dma_dims([&](auto d) { dma_dkdv_dims<decltype(d)::value>(p, s.B, wg); });
  auto dq_pass = [&](int n) { dma_dims([&](auto d) { dma_dq_dims<decltype(d)::value>(p, s.B, wg, n); }); };
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

bool flash_wgmma_selftest(float* s128, float* s64, float* o, bf16* raw_a, const bf16* a, const bf16* b,
                          const bf16* v) {
  if (!device_runs_sm90a()) return false;
  constexpr size_t smem = 1024 + size_t(64 * 128 + 2 * 128 * 128) * 2;
  static const bool ready = (prepare(flash_wgmma_selftest_kernel, smem), true);
  (void)ready;
  flash_wgmma_selftest_kernel<<<1, 128, smem, stream()>>>(s128, s64, o, nv(raw_a), nv(a), nv(b), nv(v));
  DMAT_CUDA_LAUNCH_CHECK();
  return true;
}

bool flash_tma_selftest(bf16* raw, const bf16* src, int64_t rows, int64_t heads, int row0, int head) {
  if (!device_runs_sm90a()) return false;
  const CUtensorMap map = make_tmap(src, 128, heads, rows, 128);
  constexpr size_t smem = 1024 + size_t(128 * 128) * 2 + 8;
  static const bool ready = (prepare(flash_tma_selftest_kernel, smem), true);
  (void)ready;
  flash_tma_selftest_kernel<<<1, 128, smem, stream()>>>(nv(raw), map, row0, head);
  DMAT_CUDA_LAUNCH_CHECK();
  return true;
}

int set_attention_side_stream(int mode) {
  DMAT_CHECK(mode >= -1 && mode <= 2, "attention side stream mode {} (−1, 0, 1 or 2)", mode);
  const int old = g_side_mode;
  g_side_mode = mode;
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
