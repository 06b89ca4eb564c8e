// What the flash-attention kernels (kernels/cuda/flash_*.cu) and their dispatch share: tile sizes,
// the kernels' parameter blocks, the order their blocks start in (grid_pos), the key-tile
// policies (which key tiles a query tile visits, and which of those need the element mask), the
// element mask (which (query, key) pairs of such a tile are kept), and the launchers, one per
// kernel, that each family defines beside its kernels.
//
//   flash_fwd_sm80.cu, flash_bwd_sm80.cu  mma.sync kernels: every GPU, every pair of head_dims.h
//   flash_fwd_sm90.cu, flash_bwd_sm90.cu  wgmma / TMA kernels, built for sm_90a (the pairs marked
//                                         wgmma), with the sm_90a probe and self-checks
//   flash_attention.cu                    flash_attention.h's entry points: path choice, grid
//                                         order, which kernels run in which order, the backward's
//                                         preprocess
// Semantics of every kernel: cpu::attention_* (and cpu::dma_attention_* with a threshold).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "core/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/head_dims.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda::flash {

using detail::nv_bf16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Forward tiling: 8 warps x 16 rows = 128 queries per block, 64 keys per tile.
constexpr int kFwdWarps = 8, kFwdBM = 16 * kFwdWarps, kFwdBN = 64;
// dQ pass: same query tiling; dK/dV pass: 8 warps x 16 keys = 128 keys per block.
constexpr int kBwdWarps = 8;

// Hopper kernels: 128 query rows per block (the forward's and the dQ pass's tiles, so one gathered
// list serves both paths), three warpgroups (a producer and two consumers of 64 rows each).
constexpr int kWgBM = 128, kWgStages = 3, kWgThreads = 384;
// Hopper dQ pass: 64-key tiles; Hopper dK/dV pass: 128-key blocks, 64-query items.
constexpr int kWgDqBN = 64;
constexpr int kWgKvBN = 128, kWgKvBM = 64;

// ---- element mask ----------------------------------------------------------------------------
// Which (query i, key j) pairs of a visited key tile are dropped. A mask policy is a type of static
// functions reading what they need from the kernel's parameter block P (FwdParams or BwdParams),
// as MakeKeys does; every kernel applies it once per score, at one place, on the tiles its key-tile
// policy marks (needs_mask: every pair of the other tiles is kept):
//   apply(p, x, dropped, i, j, kb, qt[, past_end])  x = dropped where i drops j (or past_end: a
//       query past the sequence, which the key-major dK/dV tiles reach);
//   keeps_branchless<THR>(p, i, j, kb, qt, T)  the same decision as a value, without short-circuits,
//       for a kernel that masks whole register tiles branch-free (the Hopper dK/dV pass).
// Besides the positions a policy may compare two per-element values the kernel holds: the key's
// raw bias kb and the query's threshold qt (bit-exact copies of the fp32 values the CPU reference
// compares; kernels without a threshold pass qt = −inf, which drops nothing, and the test folds
// away). A variant with another mask adds its policy here; NSA's (CompressedMask, SelectedMask) live
// with its own tiles in nsa_flash.cuh, whose rows are (query, head) pairs of one GQA group.
//
// CausalMask: i keeps j when 0 <= j <= i, j is inside the sliding window (p.window: keys
// i − window + 1 .. i; 0: none) and, for DMA, kb >= qt or j is inside the local window (p.local:
// keys j > i − local; 0: none) — cpu::attention_* and cpu::dma_attention_*'s kept(i, j).
struct CausalMask {
  template <class P, class T>
  __device__ __forceinline__ static void apply(const P& p, T& x, T dropped, int i, int j, float kb, float qt,
                                               bool past_end = false) {
    if (past_end || !visible(i, j, p.window) || below_threshold(kb, qt, i, j, p.local)) x = dropped;
  }
  // Padding keys come as j = INT_MAX, and queries i >= T are dropped. THR (DMA, whose p.window is
  // 0): with a threshold, which the caller passes as NaN for i >= T; the sliding window is not
  // tested. j is taken by reference only to keep the compiled comparisons' operand order as the
  // caller wrote them (a value parameter gets them swapped, which moves that kernel's SASS).
  template <bool THR, class P>
  __device__ __forceinline__ static bool keeps_branchless(const P& p, int i, const int& j, float kb, float qt,
                                                          int T) {
    bool keep = j <= i;
    if constexpr (THR) keep &= (kb >= qt) | ((j > i - p.local) & (i < T));
    else keep &= (i < T) & ((p.window <= 0) | (j > i - p.window));
    return keep;
  }

 private:
  __device__ __forceinline__ static bool visible(int i, int j, int window) {
    return j >= 0 && j <= i && (window <= 0 || j > i - window);
  }
  // DMA: a visible key whose raw bias is below the query's threshold is dropped unless it is
  // inside the local window (local = 0: every key is outside; then this is kb < qt)
  __device__ __forceinline__ static bool below_threshold(float kb, float qt, int i, int j, int local) {
    return kb < qt && j <= i - local;
  }
};

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

// ---- parameters: one block for every forward kernel, one for every backward kernel -------------
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

// ---- dK/dV key blocks --------------------------------------------------------------------------
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

// ---- grid order ------------------------------------------------------------------------------
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

// ---- host side -------------------------------------------------------------------------------
inline const nv_bf16* nv(const bf16* p) { return reinterpret_cast<const nv_bf16*>(p); }
inline nv_bf16* nv(bf16* p) { return reinterpret_cast<nv_bf16*>(p); }

// Opt in to > 48 KB of dynamic shared memory once per kernel instantiation.
template <class Kernel>
inline void prepare(Kernel kernel, size_t smem) {
  DMAT_CHECK(smem <= max_smem_optin(), "flash attention needs {} B of shared memory, device allows {}", smem,
             max_smem_optin());
  DMAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

// A runtime flag to a template argument (FlashAttention-2's BOOL_SWITCH): f(std::true_type{}) or
// f(std::false_type{}).
template <class F>
void bool_switch(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// ---- launchers: one per kernel, defined beside it ----------------------------------------------
// Each launches its kernel on stream() for the head dims (s.Dqk, s.Dv) over the grid its params
// describe (x: query tiles, key blocks or key groups; y: heads; z: s.B), the flags picking the
// template instance; a pair the family has no kernel for is an error unless the launcher returns
// bool. Which kernels run, and in which order, is decided in flash_attention.cu.
enum class KeyTiles { dense, gathered };  // the key-tile policy: DenseKeys or GatherKeys

// Forward over ceil(T / kFwdBM) query tiles, gathered: p.n_tiles tiles from p.qt0; bias: p.bias
// (and p.thr) apply.
void launch_fwd_sm80(const FwdParams& p, const AttnShape& s, KeyTiles keys, bool bias);
// As launch_fwd_sm80 on the pairs marked wgmma; tma: dense tiles by the TMA producer where its
// limits allow (else cp.async); overlap: the software-pipelined consumer schedule.
void launch_fwd_sm90(const FwdParams& p, const AttnShape& s, KeyTiles keys, bool bias, bool overlap, bool tma);

// dK/dV over ceil(T / 128) key blocks; dma (the pairs marked dma): over p.n_groups key groups with
// the key bias, threshold and dbias; atomic_dq (not with dma): also dQ += dS·K into p.dq_acc,
// which it zeroes first.
void launch_bwd_dkdv_sm80(const BwdParams& p, const AttnShape& s, bool dma, bool atomic_dq);
// Deterministic dQ over n_tiles query tiles from p.qt0: dense keys, or (dma) the gathered lists.
void launch_bwd_dq_sm80(const BwdParams& p, const AttnShape& s, bool dma, int n_tiles);
// p.dq = bf16(scale · p.dq_acc) after the atomic dK/dV pass.
void launch_bwd_dq_convert(const BwdParams& p, const AttnShape& s);
// As launch_bwd_dkdv_sm80 (without atomics) by wgmma; false, nothing launched, for a pair without
// a Hopper dK/dV kernel (192/128). overlap: the pipelined schedule where it fits the registers.
bool launch_bwd_dkdv_sm90(const BwdParams& p, const AttnShape& s, bool dma, bool overlap);
// As launch_bwd_dq_sm80 by wgmma, on the pairs marked wgmma; overlap: the pipelined schedule
// (not with dma).
void launch_bwd_dq_sm90(const BwdParams& p, const AttnShape& s, bool dma, bool overlap, int n_tiles);

// Whether the sm_90a kernels run on the current device: compute capability 9.0 and this build
// carries sm_90a code (probed once; flash_fwd_sm90.cu).
bool device_runs_sm90a();

// The error for a head-dim pair a launcher has no kernel for (the dispatch never asks for one).
[[noreturn]] inline void no_kernel(const char* kernel, const AttnShape& s) {
  fail("flash attention: no {} kernel for head dims ({}, {})", kernel, s.Dqk, s.Dv);
}

}  // namespace dmat::cuda::flash
