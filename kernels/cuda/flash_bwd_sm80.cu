// The backward on mma.sync tensor cores (every GPU, every head-dim pair of head_dims.h; DMA's on
// the pairs marked dma): flash_bwd_dkdv_kernel, flash_bwd_dq_kernel, flash_dq_convert_kernel and
// their launchers (launch_bwd_dkdv_sm80, launch_bwd_dq_sm80, launch_bwd_dq_convert:
// flash_common.cuh). They read the preprocess's delta and lse·log2(e) (BwdParams).
//
// dK/dV: one block per (key tile, KV head, batch) looping over the query heads of the group, then
// the query tiles, in a fixed order (deterministic sums), recomputing Pᵀ from lse; optionally it
// also adds dS·K into an fp32 dQ accumulator with atomics, which flash_dq_convert_kernel turns
// into bf16 dQ. Deterministic dQ: one block per query tile looping over its key tiles (a key-tile
// policy, as the forward).
#include <type_traits>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_tiles.cuh"

namespace dmat::cuda::flash {
namespace {

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
    const bool masked =
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
          if (masked) CausalMask::apply(p, x, 0.f, i, kj[hf], kbraw[hf], DMA ? sThrs[c] : -INFINITY, i >= T);
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
    const bool masked = keys.needs_mask(n);
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
          if (masked) CausalMask::apply(p, x, 0.f, row0 + 8 * hf, j, braw, thr_r[hf]);
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

// Query rows per dK/dV step: 64, or 32 where the (192, 128) accumulators leave no registers.
template <int DQK>
constexpr int bwd_bmq() {
  return DQK >= 128 ? 32 : 64;
}

// Shared memory of flash_bwd_dkdv_kernel, in the kernel's order: K [BN][DQK], V [BN][DV],
// Q [2][BMQ][DQK], dO [2][BMQ][DV], dSᵀ [BN][BMQ] (atomic dQ only), then fp32 lse2 and delta
// [2][BMQ] each and, with DMA, thr [2][BMQ].
template <int DQK, int DV, bool ATOMIC_DQ, bool DMA>
struct DkdvSmem {
  static constexpr int BN = 16 * kBwdWarps, BMQ = bwd_bmq<DQK>();
  static constexpr size_t kBytes =
      size_t(BN * (DQK + DV) + 2 * BMQ * (DQK + DV) + (ATOMIC_DQ ? BN * BMQ : 0)) * sizeof(nv_bf16) +
      (DMA ? 6 : 4) * BMQ * sizeof(float);
};

// Shared memory of flash_bwd_dq_kernel, in the kernel's order: Q [BM][DQK], dO [BM][DV],
// K [2][BN][DQK], V [2][BN][DV].
template <int DQK, int DV>
struct DqSmem {
  static constexpr int BM = 16 * kBwdWarps, BN = 64;
  static constexpr size_t kBytes = size_t(BM * (DQK + DV) + 2 * BN * (DQK + DV)) * sizeof(nv_bf16);
};

// Atomic dQ: zeroes p.dq_acc first.
template <int DQK, int DV, bool ATOMIC_DQ, bool DMA>
void launch_dkdv(const BwdParams& p, int64_t B) {
  using L = DkdvSmem<DQK, DV, ATOMIC_DQ, DMA>;
  static_assert(!DMA || L::BN == kFlashGroupKeys, "one key group per dK/dV block");
  auto kernel = flash_bwd_dkdv_kernel<DQK, DV, kBwdWarps, L::BMQ, ATOMIC_DQ, DMA>;
  static const bool ready = (prepare(kernel, L::kBytes), true);
  (void)ready;
  if constexpr (ATOMIC_DQ) {
    const int64_t n_acc = B * int64_t(p.T) * p.H * DQK;
    DMAT_CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, size_t(n_acc) * sizeof(float), stream()));
  }
  const unsigned x = DMA ? unsigned(p.n_groups) : unsigned((p.T + L::BN - 1) / L::BN);
  kernel<<<dim3(x, unsigned(p.Hkv), unsigned(B)), kBwdWarps * 32, L::kBytes, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

template <int DQK, int DV, bool DMA>
void launch_dq(const BwdParams& p, int64_t B, int n_tiles) {
  using L = DqSmem<DQK, DV>;
  static_assert(L::BM == kFwdBM, "the dQ pass reads the forward's per-tile lists");
  using Keys = std::conditional_t<DMA, GatherKeys<L::BN>, DenseKeys<L::BN>>;
  auto kernel = flash_bwd_dq_kernel<DQK, DV, kBwdWarps, L::BN, Keys, DMA>;
  static const bool ready = (prepare(kernel, L::kBytes), true);
  (void)ready;
  kernel<<<dim3(unsigned(n_tiles), unsigned(p.H), unsigned(B)), kBwdWarps * 32, L::kBytes, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_bwd_dkdv_sm80(const BwdParams& p, const AttnShape& s, bool dma, bool atomic_dq) {
  DMAT_CHECK(!(dma && atomic_dq), "flash attention: the DMA backward computes dQ in its own pass");
  bool launched = false;
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    if (!dma) {
      if (atomic_dq) launch_dkdv<DQK, DV, true, false>(p, s.B);
      else launch_dkdv<DQK, DV, false, false>(p, s.B);
      launched = true;
    } else if constexpr (head_dims_dma(DQK, DV)) {
      static_assert(DQK == DV, "the DMA kernels take d_qk = d_v");
      launch_dkdv<DQK, DV, false, true>(p, s.B);
      launched = true;
    }
  });
  if (!launched) no_kernel(dma ? "mma.sync DMA dK/dV" : "mma.sync dK/dV", s);
}

void launch_bwd_dq_sm80(const BwdParams& p, const AttnShape& s, bool dma, int n_tiles) {
  bool launched = false;
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    if (!dma) {
      launch_dq<DQK, DV, false>(p, s.B, n_tiles);
      launched = true;
    } else if constexpr (head_dims_dma(DQK, DV)) {
      static_assert(DQK == DV, "the DMA kernels take d_qk = d_v");
      launch_dq<DQK, DV, true>(p, s.B, n_tiles);
      launched = true;
    }
  });
  if (!launched) no_kernel(dma ? "mma.sync DMA dQ" : "mma.sync dQ", s);
}

void launch_bwd_dq_convert(const BwdParams& p, const AttnShape& s) {
  const int64_t n_acc = s.B * int64_t(p.T) * p.H * s.Dqk;
  flash_dq_convert_kernel<<<detail::grid_for(n_acc / 8, 256, 8), 256, 0, stream()>>>(p.dq, p.dq_acc, p.scale,
                                                                                       n_acc / 8);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda::flash
