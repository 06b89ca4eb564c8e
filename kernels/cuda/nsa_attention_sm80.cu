// NSA's compressed and selected attention on mma.sync tensor cores (bf16 in, fp32 accumulate; every
// GPU): the forward, the dQ pass and the dK/dV pass, each one kernel template over the mask policy
// (nsa_flash.cuh: CompressedMask, SelectedMask), and their launchers.
//
// The loops are the flash kernels' (flash_fwd_sm80.cu, flash_bwd_sm80.cu: online softmax in the
// log2 domain, a 2-stage cp.async pipeline over key tiles, P and dS rounded to bf16 before their
// products, probabilities recomputed from the saved lse in backward) with nsa_flash.cuh's tiles:
// 64 (query, head) rows of one GQA group per block, and a 64-bit keep-set per (query, key tile)
// from the mask policy, computed once per tile into shared memory, instead of an element test.
//
// Deliberately simple, first to be correct (they have not run on a GPU yet): 4 warps, no wgmma path,
// no block-order heuristic, the forward's and dQ's key tiles and the dK/dV pass's query tiles
// visited in ascending order (deterministic sums). Expected slow points: the selected branch's tiles
// are unions over a tile's queries, so a key tile may be visited for only some of them (its other
// rows masked: wasted mma work, bounded by the union's size, not by n·l'); every tile pays a
// __syncthreads for its keep-sets; the compressed dK/dV pass visits every query tile from the first
// one that sees its keys (the compressed branch's causal structure, N/d keys).
#include <type_traits>

#include "kernels/cuda/flash_tiles.cuh"
#include "kernels/cuda/nsa_flash.cuh"

namespace dmat::cuda::nsa {
namespace {

using flash::Acc;
using flash::cp_async_commit;
using flash::cp_async_wait;
using flash::fast_exp2;
using flash::kLn2;
using flash::kLog2e;
using flash::load_a;
using flash::load_b_t;
using flash::load_tile_async;
using flash::mma16816;
using flash::mma_pv;
using flash::mma_qkt;
using flash::mma_ss_abt;
using flash::online_softmax_tile;
using flash::pack_bf16;

// The global address of row r of query tile qt (q, dout or out layout [B,T,H,D]), nullptr for a
// padding row or a query past T.
template <int D, class Ptr>
__device__ __forceinline__ Ptr tile_row(Ptr base, const NsaAttnParams& p, int b, int hk, int t0, int r) {
  const int qi = r / p.group, t = t0 + qi;
  if (qi >= p.bq || t >= p.T) return nullptr;
  return base + ((int64_t(b) * p.T + t) * p.H + hk * p.group + r % p.group) * D;
}

// Keep-sets of key tile kt for the 64 rows of the query tile from t0 (sBits[r]: row r's query),
// by threads 0 … 63; sel: the tile's selection lists in shared memory ([bq][n_sel]; unused by
// CompressedMask). The caller synchronises before reading them.
template <class Mask>
__device__ __forceinline__ void tile_bits(uint64_t* sBits, const NsaAttnParams& p, int t0, int kt,
                                          const int32_t* sel) {
  const int r = threadIdx.x;
  if (r < kNsaRows) {
    const int qi = r / p.group, t = t0 + qi;
    sBits[r] = qi < p.bq && t < p.T ? Mask::bits(p, t, kt, Mask::kLists ? sel + qi * p.n_sel : nullptr) : 0ull;
  }
}

// The selection lists of query tile qt (bq × n_sel ints, −1 past T) into shared memory.
__device__ __forceinline__ void load_sel(int32_t* sSel, const NsaAttnParams& p, int row, int t0) {
  const int n = p.bq * p.n_sel;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int t = t0 + i / p.n_sel;
    sSel[i] = t < p.T ? __ldg(p.idx + (int64_t(row) * p.T + t) * p.n_sel + i % p.n_sel) : -1;
  }
}

// ---- forward: one block per (query tile, KV head, batch) ------------------------------------------
template <int D, class Mask>
__global__ void __launch_bounds__(kNsaThreads, 1) nsa_fwd_kernel(const NsaAttnParams p) {
  constexpr int BN = kNsaKeyTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);                      // [64][D]
  nv_bf16* sK = sQ + kNsaRows * D;                                         // [2][BN][D]
  nv_bf16* sV = sK + 2 * BN * D;                                           // [2][BN][D]
  uint64_t* sBits = reinterpret_cast<uint64_t*>(sV + 2 * BN * D);          // [64]
  int32_t* sSel = reinterpret_cast<int32_t*>(sBits + kNsaRows);            // [bq][n_sel] (selected)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);  // the latest (longest) tiles start first
  const int hk = blockIdx.y, b = blockIdx.z, row = b * p.Hkv + hk, t0 = qt * p.bq;
  const int64_t kv_stride = int64_t(p.Hkv) * D;
  const nv_bf16* kg = p.k + (int64_t(b) * p.Tk * p.Hkv + hk) * D;
  const nv_bf16* vg = p.v + (int64_t(b) * p.Tk * p.Hkv + hk) * D;

  load_tile_async<kNsaRows, D, kNsaThreads>(sQ, p.q, [&](int r) { return tile_row<D>(p.q, p, b, hk, t0, r); });
  cp_async_commit();
  if constexpr (Mask::kLists) load_sel(sSel, p, row, t0);
  const int n_tiles = Mask::key_tiles(p, row, qt);
  auto load_kv = [&](int n, int stage) {
    const int k0 = Mask::key_tile(p, row, qt, n) * BN;
    load_tile_async<BN, D, kNsaThreads>(sK + stage * BN * D, kg, [&](int r) -> const nv_bf16* {
      return k0 + r < p.Tk ? kg + int64_t(k0 + r) * kv_stride : nullptr;
    });
    load_tile_async<BN, D, kNsaThreads>(sV + stage * BN * D, vg, [&](int r) -> const nv_bf16* {
      return k0 + r < p.Tk ? vg + int64_t(k0 + r) * kv_stride : nullptr;
    });
  };
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q landed (K/V tile 0 may still be in flight)
  __syncthreads();     // and the selection lists (read by the keep-sets below)

  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qa[kk], sQ, warp * 16, kk * 16, lane);

  const int r0 = warp * 16 + g;  // this thread's rows r0 (c0, c1) and r0 + 8 (c2, c3)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  Acc<D> o;
  o.zero();

  for (int n = 0; n < n_tiles; ++n) {
    const int st = n & 1;
    if (n + 1 < n_tiles) load_kv(n + 1, st ^ 1);
    cp_async_commit();
    tile_bits<Mask>(sBits, p, t0, Mask::key_tile(p, row, qt, n), sSel);
    cp_async_wait<1>();
    __syncthreads();
    const nv_bf16* sKs = sK + st * BN * D;
    const nv_bf16* sVs = sV + st * BN * D;
    const uint64_t keep[2] = {sBits[r0], sBits[r0 + 8]};

    Acc<BN> s;  // S = Q Kᵀ
    s.zero();
    mma_qkt<D>(s, qa, sKs, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int col = nb * 8 + 2 * t4 + (x & 1);
        float& v = s.c[nb][x];
        v = (keep[x >> 1] >> col) & 1ull ? v * p.scale_log2 : -INFINITY;
      }
    }
    online_softmax_tile<BN, D>(s, o, m, l);  // log2 units, as flash_fwd_kernel
    mma_pv<BN, D>(o, s, sVs, lane);          // O += P V
    __syncthreads();  // the next prefetch overwrites this stage, the next keep-sets sBits
  }

  // epilogue: normalise, store O (bf16) and lse (natural log; −inf and O = +0 where nothing is kept:
  // written as a constant, not as o · 0, since the sign of the zero the tensor cores leave in o for
  // an all-zero P is not specified and the contract, and the tests, say +0)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float sum = l[hf];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool kept = sum > 0.f;
    const float inv = kept ? 1.f / sum : 0.f;
    const int r = r0 + 8 * hf, qi = r / p.group, t = t0 + qi;
    if (qi < p.bq && t < p.T) {
      const int h = hk * p.group + r % p.group;
      nv_bf16* orow = p.out + ((int64_t(b) * p.T + t) * p.H + h) * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb)
        *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t4) =
            kept ? pack_bf16(o.c[nb][2 * hf] * inv, o.c[nb][2 * hf + 1] * inv) : 0u;
      if (t4 == 0) p.lse[(int64_t(b) * p.H + h) * p.T + t] = sum > 0.f ? (m[hf] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// ---- dQ: one block per (query tile, KV head, batch), over the forward's key tiles ------------------
template <int D, class Mask>
__global__ void __launch_bounds__(kNsaThreads, 1) nsa_bwd_dq_kernel(const NsaAttnParams p) {
  constexpr int BN = kNsaKeyTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);              // [64][D]
  nv_bf16* sdO = sQ + kNsaRows * D;                                // [64][D]
  nv_bf16* sK = sdO + kNsaRows * D;                                // [2][BN][D]
  nv_bf16* sV = sK + 2 * BN * D;                                   // [2][BN][D]
  uint64_t* sBits = reinterpret_cast<uint64_t*>(sV + 2 * BN * D);  // [64]
  int32_t* sSel = reinterpret_cast<int32_t*>(sBits + kNsaRows);    // [bq][n_sel] (selected)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int qt = int(gridDim.x) - 1 - int(blockIdx.x);
  const int hk = blockIdx.y, b = blockIdx.z, row = b * p.Hkv + hk, t0 = qt * p.bq;
  const int64_t kv_stride = int64_t(p.Hkv) * D;
  const nv_bf16* kg = p.k + (int64_t(b) * p.Tk * p.Hkv + hk) * D;
  const nv_bf16* vg = p.v + (int64_t(b) * p.Tk * p.Hkv + hk) * D;

  load_tile_async<kNsaRows, D, kNsaThreads>(sQ, p.q, [&](int r) { return tile_row<D>(p.q, p, b, hk, t0, r); });
  load_tile_async<kNsaRows, D, kNsaThreads>(sdO, p.dout,
                                            [&](int r) { return tile_row<D>(p.dout, p, b, hk, t0, r); });
  cp_async_commit();
  if constexpr (Mask::kLists) load_sel(sSel, p, row, t0);
  const int n_tiles = Mask::key_tiles(p, row, qt);
  auto load_kv = [&](int n, int stage) {
    const int k0 = Mask::key_tile(p, row, qt, n) * BN;
    load_tile_async<BN, D, kNsaThreads>(sK + stage * BN * D, kg, [&](int r) -> const nv_bf16* {
      return k0 + r < p.Tk ? kg + int64_t(k0 + r) * kv_stride : nullptr;
    });
    load_tile_async<BN, D, kNsaThreads>(sV + stage * BN * D, vg, [&](int r) -> const nv_bf16* {
      return k0 + r < p.Tk ? vg + int64_t(k0 + r) * kv_stride : nullptr;
    });
  };
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int r0 = warp * 16 + g;
  float li[2], di[2];  // lse·log2(e) and delta of the thread's rows (0 for padding: nothing kept there)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = r0 + 8 * hf, qi = r / p.group, t = t0 + qi;
    const bool ok = qi < p.bq && t < p.T;
    const int64_t o = (int64_t(b) * p.H + hk * p.group + r % p.group) * p.T + t;
    li[hf] = ok ? p.lse_in[o] * kLog2e : 0.f;
    di[hf] = ok ? p.delta[o] : 0.f;
  }
  Acc<D> dq;
  dq.zero();
  __syncthreads();  // the selection lists are in (read by the keep-sets below)

  for (int n = 0; n < n_tiles; ++n) {
    const int st = n & 1;
    if (n + 1 < n_tiles) load_kv(n + 1, st ^ 1);
    cp_async_commit();
    tile_bits<Mask>(sBits, p, t0, Mask::key_tile(p, row, qt, n), sSel);
    cp_async_wait<1>();
    __syncthreads();
    const nv_bf16* sKs = sK + st * BN * D;
    const nv_bf16* sVs = sV + st * BN * D;
    const uint64_t keep[2] = {sBits[r0], sBits[r0 + 8]};

    Acc<BN> s;  // P = exp2(Q Kᵀ · scale·log2e − lse2) on kept pairs, else 0
    s.zero();
    mma_ss_abt<D, BN, D, D>(s, sQ, warp * 16, sKs, 0, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int col = nb * 8 + 2 * t4 + (x & 1);
        float& v = s.c[nb][x];
        // a select, not a product: a query that keeps nothing has lse −inf, and exp2 of its
        // shifted scores is +inf
        v = (keep[x >> 1] >> col) & 1ull ? fast_exp2(fmaf(v, p.scale_log2, -li[x >> 1])) : 0.f;
      }
    }
    Acc<BN> ds;  // dP = dO Vᵀ, dS = P ∘ (dP − delta)
    ds.zero();
    mma_ss_abt<D, BN, D, D>(ds, sdO, warp * 16, sVs, 0, lane);
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
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bb[4];
        load_b_t<D>(bb, sKs, np * 16, kk * 16, lane);
        mma16816(dq.c[2 * np], a, bb[0], bb[1]);
        mma16816(dq.c[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();
  }

  // no cp.async may still target shared memory when the block exits: with no key tile (n_tiles = 0)
  // the Q/dO group was never waited for
  cp_async_wait<0>();
  // a query that keeps no key (lse −inf: a compressed-branch query before the first block) gets
  // dQ = +0 written as a constant: its dS is P·(dP − delta) = 0·(…), a zero of either sign, and the
  // sign the tensor cores give a sum of signed zeros is not specified
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = r0 + 8 * hf, qi = r / p.group, t = t0 + qi;
    if (qi < p.bq && t < p.T) {
      const bool kept = li[hf] != -INFINITY;
      nv_bf16* dqr = p.dq + ((int64_t(b) * p.T + t) * p.H + hk * p.group + r % p.group) * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb)
        *reinterpret_cast<uint32_t*>(dqr + nb * 8 + 2 * t4) =
            kept ? pack_bf16(dq.c[nb][2 * hf] * p.scale, dq.c[nb][2 * hf + 1] * p.scale) : 0u;
    }
  }
}

// Query rows per chunk of the dK/dV pass: a 64-row query tile in four chunks of 16 at head dim 128
// (chunks of 32 spilled 20 bytes beside the 128 registers of the dK and dV accumulators), in one
// below. The chunk loop is not unrolled, so chunks do not share registers.
template <int D>
constexpr int dkdv_chunk() {
  return D >= 128 ? 16 : 64;
}

// ---- dK/dV: one block per (key tile, KV head, batch) over the query tiles that visit it -----------
// Items: the policy's query tiles of this key tile, ascending; each item is one query tile, 64
// (query, head) rows of the group, so dK and dV sum over the group's heads and the queries in one
// fixed order (items in turn, rows inside the mma).
template <int D, class Mask>
__global__ void __launch_bounds__(kNsaThreads, 1) nsa_bwd_dkdv_kernel(const NsaAttnParams p) {
  constexpr int BN = kNsaKeyTile, RM = kNsaRows, CW = dkdv_chunk<D>();
  static_assert(BN == 16 * kNsaWarps, "one 16-key slice per warp");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  nv_bf16* sK = reinterpret_cast<nv_bf16*>(smem_raw);            // [BN][D]
  nv_bf16* sV = sK + BN * D;                                     // [BN][D]
  nv_bf16* sQ = sV + BN * D;                                     // [2][RM][D]
  nv_bf16* sdO = sQ + 2 * RM * D;                                // [2][RM][D]
  float* sL = reinterpret_cast<float*>(sdO + 2 * RM * D);        // [2][RM] lse·log2(e)
  float* sDl = sL + 2 * RM;                                      // [2][RM] delta
  uint64_t* sBits = reinterpret_cast<uint64_t*>(sDl + 2 * RM);   // [RM]
  int32_t* sSel = reinterpret_cast<int32_t*>(sBits + RM);        // [2][bq][n_sel] (selected)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, row = b * p.Hkv + hk, k0 = kt * BN;
  const int64_t kv_stride = int64_t(p.Hkv) * D;
  const nv_bf16* kg = p.k + (int64_t(b) * p.Tk * p.Hkv + hk) * D;
  const nv_bf16* vg = p.v + (int64_t(b) * p.Tk * p.Hkv + hk) * D;
  const int sel_n = p.bq * p.n_sel;

  load_tile_async<BN, D, kNsaThreads>(sK, kg, [&](int r) -> const nv_bf16* {
    return k0 + r < p.Tk ? kg + int64_t(k0 + r) * kv_stride : nullptr;
  });
  load_tile_async<BN, D, kNsaThreads>(sV, vg, [&](int r) -> const nv_bf16* {
    return k0 + r < p.Tk ? vg + int64_t(k0 + r) * kv_stride : nullptr;
  });
  const int n_items = Mask::query_tiles(p, row, kt);
  auto load_item = [&](int n, int stage) {
    const int t0 = Mask::query_tile(p, row, kt, n) * p.bq;
    load_tile_async<RM, D, kNsaThreads>(sQ + stage * RM * D, p.q,
                                        [&](int r) { return tile_row<D>(p.q, p, b, hk, t0, r); });
    load_tile_async<RM, D, kNsaThreads>(sdO + stage * RM * D, p.dout,
                                        [&](int r) { return tile_row<D>(p.dout, p, b, hk, t0, r); });
    if (tid < RM) {
      const int qi = tid / p.group, t = t0 + qi;
      const bool ok = qi < p.bq && t < p.T;
      const int64_t o = (int64_t(b) * p.H + hk * p.group + tid % p.group) * p.T + t;
      sL[stage * RM + tid] = ok ? p.lse_in[o] * kLog2e : 0.f;
      sDl[stage * RM + tid] = ok ? p.delta[o] : 0.f;
    }
    if constexpr (Mask::kLists) load_sel(sSel + stage * sel_n, p, row, t0);
  };
  if (n_items > 0) load_item(0, 0);
  cp_async_commit();

  Acc<D> dk, dv;
  dk.zero();
  dv.zero();
  const int kr = warp * 16 + g;  // this thread's keys: rows kr (c0, c1) and kr + 8 (c2, c3) of the tile

  for (int n = 0; n < n_items; ++n) {
    const int st = n & 1;
    if (n + 1 < n_items) load_item(n + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // item n's tiles, lse, delta and lists are in
    tile_bits<Mask>(sBits, p, Mask::query_tile(p, row, kt, n) * p.bq, kt, sSel + st * sel_n);
    __syncthreads();
    const nv_bf16* sQs = sQ + st * RM * D;
    const nv_bf16* sdOs = sdO + st * RM * D;
    const float* sLs = sL + st * RM;
    const float* sDs = sDl + st * RM;

#pragma unroll 1
    for (int c0 = 0; c0 < RM; c0 += CW) {
      // Pᵀ = exp2(K Qᵀ · scale·log2e − lse2): rows keys, columns this chunk's (query, head) rows
      Acc<CW> s;
      s.zero();
      mma_ss_abt<D, CW, D, D>(s, sK, warp * 16, sQs, c0, lane);
#pragma unroll
      for (int nb = 0; nb < CW / 8; ++nb) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int c = c0 + nb * 8 + 2 * t4 + (x & 1);
          float& v = s.c[nb][x];
          v = (sBits[c] >> (kr + 8 * (x >> 1))) & 1ull ? fast_exp2(fmaf(v, p.scale_log2, -sLs[c])) : 0.f;
        }
      }
      // dPᵀ = V dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − delta)
      Acc<CW> ds;
      ds.zero();
      mma_ss_abt<D, CW, D, D>(ds, sV, warp * 16, sdOs, c0, lane);
#pragma unroll
      for (int nb = 0; nb < CW / 8; ++nb) {
#pragma unroll
        for (int x = 0; x < 4; ++x) ds.c[nb][x] = s.c[nb][x] * (ds.c[nb][x] - sDs[c0 + nb * 8 + 2 * t4 + (x & 1)]);
      }
      // dV += Pᵀ dO, dK += dSᵀ Q   (k = this chunk's rows)
#pragma unroll
      for (int kk = 0; kk < CW / 16; ++kk) {
        uint32_t pa[4], da[4];
        s.to_a(pa, kk);
        ds.to_a(da, kk);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t bb[4];
          load_b_t<D>(bb, sdOs, np * 16, c0 + kk * 16, lane);
          mma16816(dv.c[2 * np], pa, bb[0], bb[1]);
          mma16816(dv.c[2 * np + 1], pa, bb[2], bb[3]);
        }
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t bb[4];
          load_b_t<D>(bb, sQs, np * 16, c0 + kk * 16, lane);
          mma16816(dk.c[2 * np], da, bb[0], bb[1]);
          mma16816(dk.c[2 * np + 1], da, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // the next prefetch overwrites this stage, the next keep-sets sBits
  }

  // no cp.async may still target shared memory when the block exits: with no query tile (a key
  // tile nobody selected: n_items = 0) the K/V group was never waited for
  cp_async_wait<0>();
  // keys no query keeps get zeros (written, never left unset)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = k0 + kr + 8 * hf;
    if (j < p.Tk) {
      nv_bf16* dkr = p.dk + ((int64_t(b) * p.Tk + j) * p.Hkv + hk) * D;
      nv_bf16* dvr = p.dv + ((int64_t(b) * p.Tk + j) * p.Hkv + hk) * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        *reinterpret_cast<uint32_t*>(dkr + nb * 8 + 2 * t4) =
            pack_bf16(dk.c[nb][2 * hf] * p.scale, dk.c[nb][2 * hf + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + nb * 8 + 2 * t4) = pack_bf16(dv.c[nb][2 * hf], dv.c[nb][2 * hf + 1]);
      }
    }
  }
}

// Shared memory of each kernel, in its order (the selection lists only for SelectedMask).
size_t fwd_smem(int D, const NsaAttnParams& p, bool sel) {
  return size_t(kNsaRows * D + 4 * kNsaKeyTile * D) * sizeof(nv_bf16) + kNsaRows * sizeof(uint64_t) +
         (sel ? size_t(p.bq * p.n_sel) * sizeof(int32_t) : 0);
}
size_t dq_smem(int D, const NsaAttnParams& p, bool sel) {
  return size_t(2 * kNsaRows * D + 4 * kNsaKeyTile * D) * sizeof(nv_bf16) + kNsaRows * sizeof(uint64_t) +
         (sel ? size_t(p.bq * p.n_sel) * sizeof(int32_t) : 0);
}
size_t dkdv_smem(int D, const NsaAttnParams& p, bool sel) {
  return size_t(2 * kNsaKeyTile * D + 4 * kNsaRows * D) * sizeof(nv_bf16) + 4 * kNsaRows * sizeof(float) +
         kNsaRows * sizeof(uint64_t) + (sel ? size_t(2 * p.bq * p.n_sel) * sizeof(int32_t) : 0);
}

// The kernel for head dim D (a row of head_dims.h marked nsa) and the policy; false where none.
template <class F>
bool with_head_dim(int64_t D, bool selected, F&& f) {
  bool found = false;
  head_dims_switch(D, D, [&](auto dqk, auto) {
    constexpr int DD = decltype(dqk)::value;
    if constexpr (head_dims_nsa(DD, DD)) {
      if (selected) f(std::integral_constant<int, DD>{}, SelectedMask{});
      else f(std::integral_constant<int, DD>{}, CompressedMask{});
      found = true;
    }
  });
  return found;
}

// Launches kernel over grid with smem bytes of dynamic shared memory (opting in above 48 KB; the
// attribute is set at every launch, as the size depends on n_sel and the group).
template <class Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const NsaAttnParams& p) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  flash::prepare(kernel, smem);
  kernel<<<grid, kNsaThreads, smem, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

[[noreturn]] void no_kernel(int64_t D) {
  fail("nsa attention: no CUDA kernel for head dim {} (supported: {})", D, head_dims_list(AttnKernel::nsa));
}

}  // namespace

void launch_nsa_fwd(const NsaAttnParams& p, int64_t B, int64_t D, bool selected) {
  const bool ok = with_head_dim(D, selected, [&](auto dd, auto mask) {
    constexpr int DD = decltype(dd)::value;
    launch(nsa_fwd_kernel<DD, decltype(mask)>, dim3(unsigned(p.n_qt), unsigned(p.Hkv), unsigned(B)),
           fwd_smem(DD, p, selected), p);
  });
  if (!ok) no_kernel(D);
}

void launch_nsa_bwd_dq(const NsaAttnParams& p, int64_t B, int64_t D, bool selected) {
  const bool ok = with_head_dim(D, selected, [&](auto dd, auto mask) {
    constexpr int DD = decltype(dd)::value;
    launch(nsa_bwd_dq_kernel<DD, decltype(mask)>, dim3(unsigned(p.n_qt), unsigned(p.Hkv), unsigned(B)),
           dq_smem(DD, p, selected), p);
  });
  if (!ok) no_kernel(D);
}

void launch_nsa_bwd_dkdv(const NsaAttnParams& p, int64_t B, int64_t D, bool selected) {
  const bool ok = with_head_dim(D, selected, [&](auto dd, auto mask) {
    constexpr int DD = decltype(dd)::value;
    launch(nsa_bwd_dkdv_kernel<DD, decltype(mask)>, dim3(unsigned(p.n_kt), unsigned(p.Hkv), unsigned(B)),
           dkdv_smem(DD, p, selected), p);
  });
  if (!ok) no_kernel(D);
}

}  // namespace dmat::cuda::nsa
