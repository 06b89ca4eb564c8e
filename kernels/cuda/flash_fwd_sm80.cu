// The forward on mma.sync tensor cores (bf16 in, fp32 accumulate; every GPU, every head-dim pair of
// head_dims.h): flash_fwd_kernel and its launcher, launch_fwd_sm80 (flash_common.cuh).
//
// One block per (query tile of 16·warps rows, head, batch); each warp owns 16 query rows and keeps
// its Q fragments in registers; K/V tiles of kBN keys stream through a 2-stage cp.async pipeline;
// scores are pre-scaled by scale·log2(e) so the online softmax uses exp2 (fast_exp2). The key tiles
// a query tile visits come from a key-tile policy (DenseKeys: causal ± window, GatherKeys: an
// explicit key list per query tile), the pairs of those tiles it keeps from the element mask
// (CausalMask), and an optional per-key bias is added to the scores; DMA reuses this loop through
// the key-tile policy and the bias template parameters.
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_tiles.cuh"

namespace dmat::cuda::flash {
namespace {

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
    mma_qkt<DQK>(s, qa, sKs, lane);

    // log2-domain scores, bias, mask
    const bool masked = keys.needs_mask(n);
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
          if (masked) CausalMask::apply(p, x, -INFINITY, row0 + 8 * hf, j, braw, thr_r[hf]);
        }
      }
    }

    // online softmax: rescale the running output by exp2(m_old - m_new)
    online_softmax_tile<BN, DV>(s, o, m, l);

    // O += P V
    mma_pv<BN, DV>(o, s, sVs, lane);
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

// Shared memory of flash_fwd_kernel, in the kernel's order: Q [BM][DQK], K [2][BN][DQK], V [2][BN][DV].
template <int DQK, int DV>
struct FwdSmem {
  static constexpr size_t kBytes = size_t(kFwdBM * DQK + 2 * kFwdBN * (DQK + DV)) * sizeof(nv_bf16);
};

template <int DQK, int DV, class Keys, bool BIAS>
void launch_fwd(const FwdParams& p, int64_t B) {
  constexpr size_t smem = FwdSmem<DQK, DV>::kBytes;
  auto kernel = flash_fwd_kernel<DQK, DV, kFwdWarps, kFwdBN, Keys, BIAS>;
  static const bool ready = (prepare(kernel, smem), true);
  (void)ready;
  const dim3 grid(unsigned(Keys::kGathered ? p.n_tiles : (p.T + kFwdBM - 1) / kFwdBM), unsigned(p.H), unsigned(B));
  kernel<<<grid, kFwdWarps * 32, smem, stream()>>>(p);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_fwd_sm80(const FwdParams& p, const AttnShape& s, KeyTiles keys, bool bias) {
  const bool known = head_dims_switch(s.Dqk, s.Dv, [&](auto dqk, auto dv) {
    constexpr int DQK = decltype(dqk)::value, DV = decltype(dv)::value;
    bool_switch(bias, [&](auto bias_c) {
      constexpr bool BIAS = decltype(bias_c)::value;
      if (keys == KeyTiles::gathered) launch_fwd<DQK, DV, GatherKeys<kFwdBN>, BIAS>(p, s.B);
      else launch_fwd<DQK, DV, DenseKeys<kFwdBN>, BIAS>(p, s.B);
    });
  });
  if (!known) no_kernel("mma.sync forward", s);
}

}  // namespace dmat::cuda::flash
