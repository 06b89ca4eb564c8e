// The backward on Hopper (sm_90a; the head-dim pairs of head_dims.h marked wgmma, DMA's on those
// also marked dma): flash_bwd_dq_wgmma_kernel, flash_bwd_dkdv_wgmma_kernel and their launchers
// (launch_bwd_dq_sm90, launch_bwd_dkdv_sm90: flash_common.cuh). Both are deterministic (no
// atomics) and read the preprocess's delta and lse·log2(e) (BwdParams). The kernels' bodies are
// compiled for sm_90a only (DMAT_FLASH_SM90A); the dispatch runs them only where
// device_runs_sm90a.
#include <climits>
#include <type_traits>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_tiles.cuh"
#include "kernels/cuda/flash_wgmma.cuh"

namespace dmat::cuda::flash {
namespace {

// Deterministic dQ on Hopper (sm_90a): the forward's block structure (a producer warpgroup
// streaming K/V tiles into 128B-swizzled stages, two consumer warpgroups of 64 query rows) with Q
// and dO stationary. Per 64-key tile: S = Q·Kᵀ and dP = dO·Vᵀ (wgmma, both operands in shared
// memory, V read K-major), P = exp2(S·scale·log2e − lse2), dS = P∘(dP − delta) in registers,
// dQ += dS·K (wgmma, dS from registers, K read N-major). 64-key tiles keep dQ (Dqk/2 registers)
// + S + dP + dS within the consumers' 240 registers. Fixed summation order: deterministic.

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
              if (masked) CausalMask::apply(p, pv, 0.f, row0 + 8 * hf, j, braw, thr_r[hf]);
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
              if constexpr (decltype(masked)::value)  // branch-free over the tile
                pv = CausalMask::keeps_branchless<DMA>(p, i, kjm[hf], kbraw[hf], th, T) ? pv : 0.f;
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

template <int DQK, int DV, bool OVERLAP, bool DMA>
void launch_dq_wgmma(const BwdParams& p, int64_t B, int n_tiles) {
  using L = WgDqSmem<DQK, DV>;
  using Keys = std::conditional_t<DMA, GatherKeys<kWgDqBN>, DenseKeys<kWgDqBN>>;
  auto kernel = flash_bwd_dq_wgmma_kernel<DQK, DV, OVERLAP, Keys, DMA>;
  static const bool ready = (prepare(kernel, L::kAlloc), true);
  (void)ready;
  kernel<<<dim3(unsigned(n_tiles), unsigned(p.H), unsigned(B)), kWgThreads, L::kAlloc, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

template <int DQK, int DV, bool OVERLAP, bool DMA>
void launch_dkdv_wgmma(const BwdParams& p, int64_t B) {
  using L = WgKvSmem<DQK, DV>;
  static_assert(!DMA || L::BN == kFlashGroupKeys, "one key group per dK/dV block");
  auto kernel = flash_bwd_dkdv_wgmma_kernel<DQK, DV, OVERLAP, DMA>;
  static const bool ready = (prepare(kernel, L::kAlloc), true);
  (void)ready;
  const unsigned x = DMA ? unsigned(p.n_groups) : unsigned((p.T + L::BN - 1) / L::BN);
  kernel<<<dim3(x, unsigned(p.Hkv), unsigned(B)), kWgThreads, L::kAlloc, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_bwd_dq_sm90(const BwdParams& p, const AttnShape& s, bool dma, bool overlap, int n_tiles) {
  static_assert(kWgBM == kFwdBM, "the dQ pass reads the forward's per-tile lists");
  bool launched = false;
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    if constexpr (head_dims_wgmma(DQK, DV)) {
      if (!dma) {
        if (overlap) launch_dq_wgmma<DQK, DV, true, false>(p, s.B, n_tiles);
        else launch_dq_wgmma<DQK, DV, false, false>(p, s.B, n_tiles);
        launched = true;
      } else if constexpr (head_dims_dma(DQK, DV)) {
        static_assert(DQK == DV, "the DMA kernels take d_qk = d_v");
        launch_dq_wgmma<DQK, DV, false, true>(p, s.B, n_tiles);
        launched = true;
      }
    }
  });
  if (!launched) no_kernel(dma ? "wgmma DMA dQ" : "wgmma dQ", s);
}

bool launch_bwd_dkdv_sm90(const BwdParams& p, const AttnShape& s, bool dma, bool overlap) {
  bool launched = false;
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    // (192, 128): the accumulators need more than the consumers' 240 registers
    if constexpr (head_dims_wgmma(DQK, DV) && DQK <= 128) {
      if (!dma) {
        // the pipelined schedule holds two items' Sᵀ/dPᵀ state next to dK and dV: it fits the 240
        // registers for head dim 64 only (at 128 ptxas serialises the MMAs and spills, C7512)
        constexpr bool kCanOverlap = DQK + DV <= 128;
        if (kCanOverlap && overlap) launch_dkdv_wgmma<DQK, DV, kCanOverlap, false>(p, s.B);
        else launch_dkdv_wgmma<DQK, DV, false, false>(p, s.B);
        launched = true;
      } else if constexpr (head_dims_dma(DQK, DV)) {
        static_assert(DQK == DV, "the DMA kernels take d_qk = d_v");
        launch_dkdv_wgmma<DQK, DV, false, true>(p, s.B);
        launched = true;
      }
    }
  });
  return launched;
}

}  // namespace dmat::cuda::flash
