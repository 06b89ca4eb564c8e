// RMSNorm forward/backward over the last dim (D from 16 up), plus the fused residual + RMSNorm
// forward. A row lives in registers: a group of TPR threads owns a row and each thread VPT
// 16-byte vectors of it (8 bf16 each). Small D packs several rows per warp (TPR = 2..32, shuffle
// reductions within the group), D up to 1024 is a warp per row, larger D a block per row (TPR =
// 128..512). Rows whose width is not a multiple of 8 (or unaligned pointers, or D > 16384) take
// a scalar block-per-row path. dw is deterministic: each group sums a fixed contiguous range of
// rows into fp32 partials, then reduce.cu adds the partials in a fixed order.
#include <type_traits>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

template <int N>
using IC = std::integral_constant<int, N>;

constexpr int kRowThreads = 256;  // block size when a block holds several rows

template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* red) {
  if constexpr (TPR > 32) return block_sum(v, red);
  else if constexpr (TPR == 1) return v;
  else return group_sum<TPR>(v);
}

// The row stays in registers as packed bf16 (4 registers per 8 values). RESID: the row is
// r ⊙ x + branch, rounded to bf16 and stored to `out` first; the norm uses the rounded values.
template <int TPR, int VPT, bool RESID>
__global__ void __launch_bounds__(TPR > 32 ? TPR : kRowThreads)
    rms_fwd_kernel(nv_bf16* out, nv_bf16* y, float* rstd, const nv_bf16* x, const nv_bf16* r,
                   const nv_bf16* branch, const nv_bf16* w, int64_t rows, int64_t D, float eps) {
  constexpr bool kBlock = TPR > 32;
  __shared__ float red[32];
  const int lane = kBlock ? int(threadIdx.x) : int(threadIdx.x) % TPR;
  const int64_t row = kBlock ? int64_t(blockIdx.x)
                             : int64_t(blockIdx.x) * (kRowThreads / TPR) + int64_t(threadIdx.x) / TPR;
  const bool active = row < rows;  // inactive groups still join the shuffles
  uint4 raw[VPT];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = int64_t(lane + k * TPR) * 8;
    raw[k] = make_uint4(0, 0, 0, 0);
    if (active && c < D) {
      const int64_t o = row * D + c;
      raw[k] = *reinterpret_cast<const uint4*>(x + o);
      float v[8];
      if constexpr (RESID) {
        float b[8];
        unpack8(raw[k], v);
        load8(branch + o, b);
        if (r) {
          float s[8];
          load8(r + c, s);
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = s[j] * v[j] + b[j];
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = v[j] + b[j];
        }
        raw[k] = pack8(v);
        *reinterpret_cast<uint4*>(out + o) = raw[k];
      }
      unpack8(raw[k], v);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
    }
  }
  ss = row_sum<TPR>(ss, red);
  const float rs = 1.f / sqrtf(ss / float(D) + eps);
  if (!active) return;
  if (lane == 0) rstd[row] = rs;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = int64_t(lane + k * TPR) * 8;
    if (c < D) {
      float v[8];
      unpack8(raw[k], v);
      if (w) {
        float wv[8];
        load8(w + c, wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = v[j] * rs * wv[j];
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = v[j] * rs;
      }
      store8(y + row * D + c, v);
    }
  }
}

// Group g handles rows [g·rpg, (g+1)·rpg): dx per row; with `partial`, dw partials for the group
// (Σ dy·x·rstd over its rows, in row order) stay in registers and are stored at the end. dy, x and
// w are held packed (bf16) to keep the register count low enough for 512-thread blocks.
template <int TPR, int VPT>
__global__ void __launch_bounds__(TPR > 32 ? TPR : kRowThreads)
    rms_bwd_kernel(nv_bf16* dx, float* partial, const nv_bf16* dy, const nv_bf16* x, const nv_bf16* w,
                   const float* rstd, int64_t rows, int64_t D, int64_t groups, int64_t rpg, bool acc_dx) {
  constexpr bool kBlock = TPR > 32;
  __shared__ float red[32];
  const int lane = kBlock ? int(threadIdx.x) : int(threadIdx.x) % TPR;
  const int64_t g = kBlock ? int64_t(blockIdx.x)
                           : int64_t(blockIdx.x) * (kRowThreads / TPR) + int64_t(threadIdx.x) / TPR;
  const bool want_dw = partial != nullptr;
  uint4 wp[VPT];
  float dwp[VPT][8];
  const uint4 ones = pack8({1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f});
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = int64_t(lane + k * TPR) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) dwp[k][j] = 0.f;
    wp[k] = (w && c < D) ? *reinterpret_cast<const uint4*>(w + c) : ones;
  }
  // Every group runs rpg iterations (uniform trip count: the shuffles need all lanes of a warp).
  for (int64_t it = 0; it < rpg; ++it) {
    const int64_t row = g * rpg + it;
    const bool active = g < groups && row < rows;
    uint4 dyp[VPT], xp[VPT];
    float gx = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t c = int64_t(lane + k * TPR) * 8;
      dyp[k] = xp[k] = make_uint4(0, 0, 0, 0);
      if (active && c < D) {
        dyp[k] = *reinterpret_cast<const uint4*>(dy + row * D + c);
        xp[k] = *reinterpret_cast<const uint4*>(x + row * D + c);
      }
    }
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      float a[8], b[8], s[8];
      unpack8(dyp[k], a);
      unpack8(xp[k], b);
      unpack8(wp[k], s);
#pragma unroll
      for (int j = 0; j < 8; ++j) gx += s[j] * a[j] * b[j];
    }
    gx = row_sum<TPR>(gx, red);
    if (!active) continue;
    const float rs = rstd[row];
    const float cc = rs * rs * rs * gx / float(D);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t c = int64_t(lane + k * TPR) * 8;
      if (c < D) {
        float a[8], b[8], s[8], o[8];
        unpack8(dyp[k], a);
        unpack8(xp[k], b);
        unpack8(wp[k], s);
        if (acc_dx) load8(dx + row * D + c, o);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float d = rs * s[j] * a[j] - b[j] * cc;
          o[j] = acc_dx ? o[j] + d : d;
          if (want_dw) dwp[k][j] += a[j] * b[j] * rs;
        }
        store8(dx + row * D + c, o);
      }
    }
  }
  if (want_dw && g < groups) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int64_t c = int64_t(lane + k * TPR) * 8;
      if (c < D) store8f(partial + g * D + c, dwp[k]);
    }
  }
}

// ---- scalar fallback (any D, any alignment): block per row, two passes over the row ----------
template <bool RESID>
__global__ void __launch_bounds__(256)
    rms_fwd_scalar_kernel(nv_bf16* out, nv_bf16* y, float* rstd, const nv_bf16* x, const nv_bf16* r,
                          const nv_bf16* branch, const nv_bf16* w, int64_t D, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    float v = ld(x + row * D + c);
    if constexpr (RESID) {
      v = (r ? ld(r + c) * v : v) + ld(branch + row * D + c);
      const nv_bf16 rounded = __float2bfloat16_rn(v);
      out[row * D + c] = rounded;
      v = __bfloat162float(rounded);
    }
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float rs = 1.f / sqrtf(ss / float(D) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  const nv_bf16* src = RESID ? out : x;  // this thread wrote these very elements of out above
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const float v = ld(src + row * D + c);
    st(y + row * D + c, w ? v * rs * ld(w + c) : v * rs);
  }
}

__global__ void __launch_bounds__(256)
    rms_bwd_scalar_kernel(nv_bf16* dx, const nv_bf16* dy, const nv_bf16* x, const nv_bf16* w,
                          const float* rstd, int64_t D, bool acc_dx) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  float gx = 0.f;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x)
    gx += (w ? ld(w + c) : 1.f) * ld(dy + row * D + c) * ld(x + row * D + c);
  gx = block_sum(gx, red);  // ends with __syncthreads-separated reads: all dy read before any dx write
  const float rs = rstd[row];
  const float cc = rs * rs * rs * gx / float(D);
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const int64_t o = row * D + c;
    const float d = rs * (w ? ld(w + c) : 1.f) * ld(dy + o) - ld(x + o) * cc;
    st(dx + o, acc_dx ? ld(dx + o) + d : d);
  }
}

// dw partials for the scalar path: block (part, column tile), a thread per column, rows in order.
__global__ void __launch_bounds__(256)
    rms_dw_scalar_kernel(float* partial, const nv_bf16* dy, const nv_bf16* x, const float* rstd, int64_t rows,
                         int64_t D, int64_t rpp) {
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= D) return;
  const int64_t r0 = int64_t(blockIdx.x) * rpp, r1 = min(rows, r0 + rpp);
  float acc = 0.f;
  for (int64_t row = r0; row < r1; ++row) acc += ld(dy + row * D + c) * ld(x + row * D + c) * rstd[row];
  partial[int64_t(blockIdx.x) * D + c] = acc;
}

// ---- launch configuration -------------------------------------------------------------------
struct RowCfg {
  int tpr = 0, vpt = 0;  // tpr == 0: use the scalar path
};

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

RowCfg pick(int64_t D, bool aligned) {
  if (D % 8 != 0 || !aligned) return {};
  const int64_t nv = D / 8;
  if (nv <= 32) return {pow2_at_least(nv), 1};
  if (nv <= 128) return {32, int(ceil_div(nv, 32))};
  const int tpr = std::max(128, pow2_at_least(ceil_div(nv, 4)));
  if (tpr > 512) return {};  // D > 16384: 1024-thread blocks would cap registers at 64
  return {tpr, int(ceil_div(nv, tpr))};
}

// Calls f(IC<TPR>, IC<VPT>) for the configuration (only the combinations pick() produces).
template <class F>
void dispatch(const RowCfg& c, F&& f) {
  auto vpt_1to4 = [&](auto tpr) {
    switch (c.vpt) {
      case 1: return f(tpr, IC<1>{});
      case 2: return f(tpr, IC<2>{});
      case 3: return f(tpr, IC<3>{});
      default: return f(tpr, IC<4>{});
    }
  };
  switch (c.tpr) {
    case 1: return f(IC<1>{}, IC<1>{});
    case 2: return f(IC<2>{}, IC<1>{});
    case 4: return f(IC<4>{}, IC<1>{});
    case 8: return f(IC<8>{}, IC<1>{});
    case 16: return f(IC<16>{}, IC<1>{});
    case 32: return vpt_1to4(IC<32>{});
    case 128: return vpt_1to4(IC<128>{});
    case 256: return vpt_1to4(IC<256>{});
    default: return vpt_1to4(IC<512>{});
  }
}

// Blocks for `groups` row groups of TPR threads.
unsigned row_blocks(int tpr, int64_t groups) {
  const int64_t b = tpr > 32 ? groups : ceil_div(groups, kRowThreads / tpr);
  DMAT_CHECK(b < (int64_t(1) << 31), "rmsnorm: {} row groups are too many for one grid", groups);
  return unsigned(b);
}

template <bool RESID>
void forward_impl(bf16* out, bf16* y, float* rstd, const bf16* x, const bf16* r, const bf16* branch,
                  const bf16* w, int64_t rows, int64_t D, float eps) {
  if (rows <= 0 || D <= 0) return;
  const RowCfg cfg = pick(D, aligned16(out) && aligned16(y) && aligned16(x) && aligned16(r) &&
                                 aligned16(branch) && aligned16(w));
  if (cfg.tpr == 0) {
    rms_fwd_scalar_kernel<RESID><<<unsigned(rows), 256, 0, stream()>>>(nv(out), nv(y), rstd, nv(x), nv(r),
                                                                       nv(branch), nv(w), D, eps);
  } else {
    dispatch(cfg, [&](auto tpr, auto vpt) {
      constexpr int TPR = decltype(tpr)::value, VPT = decltype(vpt)::value;
      rms_fwd_kernel<TPR, VPT, RESID><<<row_blocks(TPR, rows), TPR > 32 ? TPR : kRowThreads, 0, stream()>>>(
          nv(out), nv(y), rstd, nv(x), nv(r), nv(branch), nv(w), rows, D, eps);
    });
  }
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t rows, int64_t D, float eps) {
  forward_impl<false>(nullptr, y, rstd, x, nullptr, nullptr, w, rows, D, eps);
}

void residual_rmsnorm_forward(bf16* out, bf16* y, float* rstd, const bf16* x, const bf16* r, const bf16* branch,
                              const bf16* w, int64_t rows, int64_t D, float eps) {
  forward_impl<true>(out, y, rstd, x, r, branch, w, rows, D, eps);
}

void rmsnorm_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                      int64_t rows, int64_t D, bool accumulate_dx) {
  if (rows <= 0 || D <= 0) return;
  const bool want_dw = w && dw;
  const RowCfg cfg = pick(D, aligned16(dx) && aligned16(dy) && aligned16(x) && aligned16(w));
  if (cfg.tpr == 0) {
    if (want_dw) {  // before dx: dx may overwrite dy
      const int threads = int(std::min<int64_t>(256, ceil_div(D, 32) * 32));
      const int64_t rpp = ceil_div(rows, reduction_parts(rows, D, std::min<int64_t>(D, 256)));
      const int64_t parts = ceil_div(rows, rpp);
      float* partial =
          static_cast<float*>(workspace(size_t(parts * D + column_sum_scratch(parts, D)) * sizeof(float)));
      rms_dw_scalar_kernel<<<dim3(unsigned(parts), unsigned(ceil_div(D, threads))), threads, 0, stream()>>>(
          partial, nv(dy), nv(x), rstd, rows, D, rpp);
      DMAT_CUDA_LAUNCH_CHECK();
      column_sum_accumulate(dw, partial, parts, D, partial + parts * D);
    }
    if (dx) {
      rms_bwd_scalar_kernel<<<unsigned(rows), 256, 0, stream()>>>(nv(dx), nv(dy), nv(x), nv(w), rstd, D,
                                                                  accumulate_dx);
      DMAT_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  if (!dx && !want_dw) return;
  // The row kernel always writes dx; without a dx buffer there is nothing to fuse with, so the
  // contract's dx == nullptr case (dw only) is served by a scratch dx.
  int64_t groups = rows, rpg = 1;
  if (want_dw) {
    rpg = ceil_div(rows, reduction_parts(rows, D, cfg.tpr));
    groups = ceil_div(rows, rpg);
  }
  const size_t partial_floats = want_dw ? size_t(groups * D + column_sum_scratch(groups, D)) : 0;
  const size_t dx_bytes = dx ? 0 : size_t(rows * D) * sizeof(bf16);
  char* ws = static_cast<char*>(workspace(partial_floats * sizeof(float) + dx_bytes + 16));
  float* partial = want_dw ? reinterpret_cast<float*>(ws) : nullptr;
  bf16* dxk = dx ? dx : reinterpret_cast<bf16*>(ws + ((partial_floats * sizeof(float) + 15) / 16) * 16);
  dispatch(cfg, [&](auto tpr, auto vpt) {
    constexpr int TPR = decltype(tpr)::value, VPT = decltype(vpt)::value;
    rms_bwd_kernel<TPR, VPT><<<row_blocks(TPR, groups), TPR > 32 ? TPR : kRowThreads, 0, stream()>>>(
        nv(dxk), partial, nv(dy), nv(x), nv(w), rstd, rows, D, groups, rpg, accumulate_dx && dx);
  });
  DMAT_CUDA_LAUNCH_CHECK();
  if (want_dw) column_sum_accumulate(dw, partial, groups, D, partial + groups * D);
}

}  // namespace dmat::cuda
