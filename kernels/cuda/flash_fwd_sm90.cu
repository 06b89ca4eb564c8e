// The forward on Hopper (sm_90a): warp-specialised, wgmma, K/V tiles by TMA or cp.async (the pairs
// of head_dims.h marked wgmma): flash_fwd_wgmma_kernel and its launcher, launch_fwd_sm90
// (flash_common.cuh); and what tells whether this family runs at all (device_runs_sm90a, by a
// probe kernel) and checks its building blocks on a GPU (testing::flash_wgmma_selftest,
// flash_tma_selftest). The kernels' bodies are compiled for sm_90a only (DMAT_FLASH_SM90A);
// another target gets empty stubs, which device_runs_sm90a keeps from running.
//
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
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from the runtime)

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_tiles.cuh"
#include "kernels/cuda/flash_wgmma.cuh"

namespace dmat::cuda::flash {
namespace {

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
              CausalMask::apply(p, x, -INFINITY, row0 + 8 * hf, j, braw, thr_r[hf]);
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
void launch_fwd_wgmma(const FwdParams& p, int64_t B, bool overlap, bool tma) {
  if constexpr (!Keys::kGathered) {
    // TMA coordinates are int32; a bias comes by bulk copies of 16-byte multiples from 16-byte
    // aligned rows (else the cp.async producer stages it)
    const bool bias_ok = !BIAS || (p.T % 4 == 0 && detail::aligned16(p.bias));
    if (tma && bias_ok && B * int64_t(p.T) < (int64_t(1) << 31) - 256) {
      if (overlap) launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, true, true>(p, B);
      else launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, false, true>(p, B);
      return;
    }
  }
  if (overlap) launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, true, false>(p, B);
  else launch_fwd_wgmma_variant<DQK, DV, Keys, BIAS, false, false>(p, B);
}

}  // namespace

void launch_fwd_sm90(const FwdParams& p, const AttnShape& s, KeyTiles keys, bool bias, bool overlap, bool tma) {
  static_assert(kWgBM == kFwdBM, "one query tile (and gather list) size for both paths");
  bool launched = false;
  head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    if constexpr (head_dims_wgmma(DQK, DV)) {
      launched = true;
      bool_switch(bias, [&](auto bias_c) {
        constexpr bool BIAS = decltype(bias_c)::value;
        // the key-tile policy at this kernel's key-tile size
        if (keys == KeyTiles::gathered) launch_fwd_wgmma<DQK, DV, GatherKeys<wg_bn<DQK>()>, BIAS>(p, s.B, overlap, tma);
        else launch_fwd_wgmma<DQK, DV, DenseKeys<wg_bn<DQK>()>, BIAS>(p, s.B, overlap, tma);
      });
    }
  });
  if (!launched) no_kernel("wgmma forward", s);
}

// Compute capability 9.0 and sm_90a code in this build: the probe kernel reports which code the
// driver picked (once).
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

}  // namespace dmat::cuda::flash

namespace dmat::cuda::testing {

bool flash_wgmma_selftest(float* s128, float* s64, float* o, bf16* raw_a, const bf16* a, const bf16* b,
                          const bf16* v) {
  if (!flash::device_runs_sm90a()) return false;
  constexpr size_t smem = 1024 + size_t(64 * 128 + 2 * 128 * 128) * 2;
  static const bool ready = (flash::prepare(flash::flash_wgmma_selftest_kernel, smem), true);
  (void)ready;
  flash::flash_wgmma_selftest_kernel<<<1, 128, smem, stream()>>>(s128, s64, o, flash::nv(raw_a), flash::nv(a),
                                                                  flash::nv(b), flash::nv(v));
  DMAT_CUDA_LAUNCH_CHECK();
  return true;
}

bool flash_tma_selftest(bf16* raw, const bf16* src, int64_t rows, int64_t heads, int row0, int head) {
  if (!flash::device_runs_sm90a()) return false;
  const CUtensorMap map = flash::make_tmap(src, 128, heads, rows, 128);
  constexpr size_t smem = 1024 + size_t(128 * 128) * 2 + 8;
  static const bool ready = (flash::prepare(flash::flash_tma_selftest_kernel, smem), true);
  (void)ready;
  flash::flash_tma_selftest_kernel<<<1, 128, smem, stream()>>>(flash::nv(raw), map, row0, head);
  DMAT_CUDA_LAUNCH_CHECK();
  return true;
}

}  // namespace dmat::cuda::testing
