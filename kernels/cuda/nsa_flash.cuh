// What NSA's attention kernels (kernels/cuda/nsa_attention_sm80.cu) and their drivers (nsa.cu) share:
// the parameter block, the tile shape, and the two mask policies — which (query, key) pairs of a key
// tile a query keeps — of the compressed and the selected branch (cpu::nsa_cmp_attention_* and
// cpu::nsa_slc_attention_*: the semantics).
//
// Tiles: the kernels differ from the flash kernels (flash_common.cuh) in what a tile's rows are. A
// tile holds kNsaRows (query, head) rows of ONE GQA group: bq = kNsaRows / group consecutive queries
// t0 … t0 + bq − 1, each with all `group` query heads of KV head hk (row r: query t0 + r / group, head
// hk·group + r % group; rows from bq·group on are padding). So a key tile loaded into shared memory
// serves every head of the group at once — the NSA paper's group-centric loading, for the selected
// branch (whose keys differ per query) and the compressed one alike. Keys come in tiles of
// kNsaKeyTile consecutive positions of the branch's key sequence (Tk keys: T for the selected
// branch, Nc compressed blocks for the compressed one).
//
// Masks: for a key tile kt and a query t, a policy gives the 64-bit set of the tile's keys t keeps
// (bit r: key kt·64 + r), computed once per (query, tile) into shared memory; every score then
// tests its bit. A policy also lists the key tiles a query tile visits (forward, dQ) and the query
// tiles a key tile is visited by (dK/dV).
#pragma once
#include <cstdint>

#include "kernels/cuda/flash_common.cuh"

namespace dmat::cuda::nsa {

using flash::nv_bf16;

constexpr int kNsaWarps = 4, kNsaThreads = 32 * kNsaWarps;
constexpr int kNsaRows = 16 * kNsaWarps;  // (query, head) rows per tile: 16 per warp
constexpr int kNsaKeyTile = 64;           // keys per key tile (the mask's 64 bits)

// One parameter block for every NSA attention kernel. Layouts as nsa_ops.h: q, out, dout, dq
// [B,T,H,D]; k, v, dk, dv [B,Tk,Hkv,D]; lse, delta [B,H,T]; idx [B,Hkv,T,n_sel].
struct NsaAttnParams {
  const nv_bf16* q;
  const nv_bf16* k;
  const nv_bf16* v;
  nv_bf16* out;       // forward
  float* lse;         // forward: natural log of Σ exp(scores); −inf for a query that keeps no key
  const nv_bf16* dout;  // backward
  const float* lse_in;  // backward: the forward's lse
  const float* delta;   // backward: Σ_d dO∘O per (b, h, t)
  nv_bf16* dq;
  nv_bf16* dk;
  nv_bf16* dv;
  int T, Tk, H, Hkv, group, bq, n_qt, n_kt;  // bq = kNsaRows / group queries per tile; n_qt, n_kt: tiles
  float scale_log2, scale;
  int cmp_block, cmp_stride;  // compressed: l, d
  const int32_t* idx;         // selected: the selection lists
  int n_sel, sel_block;       // n, l'
  // selected: per (b·Hkv + hk, query tile) the key tiles it visits, ascending (CSR: kt_list
  // [kt_start[x], kt_start[x + 1])); per (b·Hkv + hk, key tile) the query tiles visiting it, ascending.
  const int64_t* kt_start;
  const int32_t* kt_list;
  const int64_t* qt_start;
  const int32_t* qt_list;
};

// Bits a … b − 1 of a 64-bit set (0 <= a < b <= 64).
__device__ __forceinline__ uint64_t bit_range(int a, int b) {
  const uint64_t hi = b >= 64 ? ~0ull : (1ull << b) - 1;
  return hi & ~((1ull << a) - 1);
}

// ---- CompressedMask: query t keeps compressed key c iff block c ends at or before t, c·d + l − 1 <= t
// (and c < Tk = Nc). A query t < l − 1 keeps none: its output is 0, its lse −inf, its gradient 0.
// Key tiles of a query tile: 0 … those its last query sees; query tiles of a key tile: every tile
// from the first query that sees the tile's first key on (dense in the causal sense).
struct CompressedMask {
  static constexpr bool kLists = false;
  __device__ __forceinline__ static int visible(const NsaAttnParams& p, int t) {
    return t + 1 >= p.cmp_block ? min(p.Tk, (t + 1 - p.cmp_block) / p.cmp_stride + 1) : 0;
  }
  __device__ __forceinline__ static uint64_t bits(const NsaAttnParams& p, int t, int kt, const int32_t*) {
    const int m = visible(p, t) - kt * kNsaKeyTile;
    return m <= 0 ? 0ull : bit_range(0, min(m, 64));
  }
  __device__ __forceinline__ static int key_tiles(const NsaAttnParams& p, int, int qt) {
    const int t1 = min(p.T, (qt + 1) * p.bq) - 1;
    return (visible(p, t1) + kNsaKeyTile - 1) / kNsaKeyTile;
  }
  __device__ __forceinline__ static int key_tile(const NsaAttnParams&, int, int, int n) { return n; }
  __device__ __forceinline__ static int first_query_tile(const NsaAttnParams& p, int kt) {
    return (kt * kNsaKeyTile * p.cmp_stride + p.cmp_block - 1) / p.bq;
  }
  __device__ __forceinline__ static int query_tiles(const NsaAttnParams& p, int, int kt) {
    if (kt * kNsaKeyTile >= p.Tk) return 0;
    return max(0, p.n_qt - first_query_tile(p, kt));
  }
  __device__ __forceinline__ static int query_tile(const NsaAttnParams& p, int, int kt, int n) {
    return first_query_tile(p, kt) + n;
  }
};

// ---- SelectedMask: query t keeps key j iff j <= t and the block j / l' is in t's list (sel: t's
// n_sel entries, −1 ignored). Tiles from the lists of NsaAttnParams (built by nsa.cu from the
// selection); `row` is b·Hkv + hk.
struct SelectedMask {
  static constexpr bool kLists = true;
  __device__ __forceinline__ static uint64_t bits(const NsaAttnParams& p, int t, int kt, const int32_t* sel) {
    const int k0 = kt * kNsaKeyTile, k1 = min(k0 + kNsaKeyTile, t + 1);  // the tile's keys t may see
    uint64_t m = 0;
    for (int i = 0; i < p.n_sel; ++i) {
      const int j = sel[i];
      if (j < 0) continue;
      const int a = max(j * p.sel_block, k0), b = min((j + 1) * p.sel_block, k1);
      if (a < b) m |= bit_range(a - k0, b - k0);
    }
    return m;
  }
  __device__ __forceinline__ static int key_tiles(const NsaAttnParams& p, int row, int qt) {
    const int64_t x = int64_t(row) * p.n_qt + qt;
    return int(__ldg(p.kt_start + x + 1) - __ldg(p.kt_start + x));
  }
  __device__ __forceinline__ static int key_tile(const NsaAttnParams& p, int row, int qt, int n) {
    return __ldg(p.kt_list + __ldg(p.kt_start + int64_t(row) * p.n_qt + qt) + n);
  }
  __device__ __forceinline__ static int query_tiles(const NsaAttnParams& p, int row, int kt) {
    const int64_t x = int64_t(row) * p.n_kt + kt;
    return int(__ldg(p.qt_start + x + 1) - __ldg(p.qt_start + x));
  }
  __device__ __forceinline__ static int query_tile(const NsaAttnParams& p, int row, int kt, int n) {
    return __ldg(p.qt_list + __ldg(p.qt_start + int64_t(row) * p.n_kt + kt) + n);
  }
};

// ---- launchers (nsa_attention_sm80.cu), on stream(), for head dim D (the head_dims.h rows marked
// nsa); selected: SelectedMask, else CompressedMask. Grids: forward and dQ one block per (query tile,
// KV head, batch); dK/dV one per (key tile, KV head, batch). No floating-point atomics: every
// output element is summed by one thread in a fixed order.
void launch_nsa_fwd(const NsaAttnParams& p, int64_t B, int64_t D, bool selected);
void launch_nsa_bwd_dq(const NsaAttnParams& p, int64_t B, int64_t D, bool selected);
void launch_nsa_bwd_dkdv(const NsaAttnParams& p, int64_t B, int64_t D, bool selected);

}  // namespace dmat::cuda::nsa
