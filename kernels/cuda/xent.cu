// Softmax cross-entropy over bf16 logits, fused with its gradient: a block per row, fp32 math.
// Rows of 4096..57344 (vocabulary sizes of real models) stream through shared memory: 256 threads
// keep 4 16-byte loads each in flight with an online max/sum, the row is kept in shared memory
// for the gradient pass, and three or more rows run per SM, so loads overlap the reductions (v2;
// v1 held the row in the registers of a 512-thread block, one row per SM: 2.4 TB/s). Narrower rows
// stay in registers (packed bf16, 512 threads x up to 8 vectors of 8), so
// logits are read once and dlogits written once. Wider (or unaligned / not a multiple of 8) rows
// take a two-pass path: an online max/sum pass, then the gradient pass re-reading the row (mostly
// from L2). The target logit is read before the block's first barrier, so dlogits may alias logits.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

constexpr int kRegThreads = 512, kWideThreads = 1024;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float exp_shift(float x, float m) { return exp2f((x - m) * kLog2e); }

template <bool VEC>
__device__ void zero_row(nv_bf16* d, int64_t V) {
  if constexpr (VEC) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < V; c += int64_t(blockDim.x) * 8)
      *reinterpret_cast<uint4*>(d + c) = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) d[c] = __float2bfloat16_rn(0.f);
  }
}

// A row with target < 0 is ignored: loss 0 and a zero gradient. Returns true when it was.
template <bool VEC>
__device__ bool ignored_row(int32_t t, float* loss, nv_bf16* dlogits, int64_t row, int64_t V) {
  if (t >= 0) return false;
  if (threadIdx.x == 0) loss[row] = 0.f;
  if (dlogits) zero_row<VEC>(dlogits + row * V, V);
  return true;
}

template <int VPT>
__global__ void __launch_bounds__(kRegThreads)
    xent_reg_kernel(float* loss, nv_bf16* dlogits, const nv_bf16* logits, const int32_t* targets, int64_t V,
                    float grad_scale) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const nv_bf16* x = logits + row * V;
  if (ignored_row<true>(t, loss, dlogits, row, V)) return;
  const float xt = ld(x + t);
  uint4 raw[VPT];
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = (int64_t(k) * kRegThreads + threadIdx.x) * 8;
    if (c < V) {
      raw[k] = *reinterpret_cast<const uint4*>(x + c);
      float f[8];
      unpack8(raw[k], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) mx = fmaxf(mx, f[j]);
    }
  }
  mx = block_max(mx, red);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = (int64_t(k) * kRegThreads + threadIdx.x) * 8;
    if (c < V) {
      float f[8];
      unpack8(raw[k], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) s += exp_shift(f[j], mx);
    }
  }
  s = block_sum(s, red);
  const float lse = mx + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - xt;
  if (!dlogits) return;
  nv_bf16* d = dlogits + row * V;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = (int64_t(k) * kRegThreads + threadIdx.x) * 8;
    if (c < V) {
      float f[8];
      unpack8(raw[k], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float p = exp_shift(f[j], lse);
        f[j] = grad_scale * (c + j == t ? p - 1.f : p);
      }
      store8(d + c, f);
    }
  }
}

constexpr int kSmemThreads = 256, kSmemUnroll = 4;
constexpr int64_t kSmemMinV = 4096, kSmemMaxV = 57344;  // 112 KiB of row: still 2 blocks per SM

__global__ void __launch_bounds__(kSmemThreads)
    xent_smem_kernel(float* loss, nv_bf16* dlogits, const nv_bf16* logits, const int32_t* targets, int64_t V,
                     float grad_scale) {
  extern __shared__ uint4 row_smem[];
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const nv_bf16* x = logits + row * V;
  if (ignored_row<true>(t, loss, dlogits, row, V)) return;
  const float xt = ld(x + t);
  const int nvec = int(V / 8);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  // Pass 1: stream the row into shared memory, online max / sum per thread. Each thread owns the
  // vectors threadIdx.x + k·256 in both passes, so an in-place gradient never overwrites a value
  // another thread still has to read.
  float m = -INFINITY, s = 0.f;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kSmemUnroll * kSmemThreads) {
    uint4 r[kSmemUnroll];
#pragma unroll
    for (int k = 0; k < kSmemUnroll; ++k) {
      const int idx = v0 + k * kSmemThreads;
      if (idx < nvec) r[k] = xv[idx];
    }
#pragma unroll
    for (int k = 0; k < kSmemUnroll; ++k) {
      const int idx = v0 + k * kSmemThreads;
      if (idx < nvec) {
        row_smem[idx] = r[k];
        float f[8];
        unpack8(r[k], f);
        float lm = f[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) lm = fmaxf(lm, f[j]);
        if (lm > m) {
          s *= exp_shift(m, lm);
          m = lm;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) s += exp_shift(f[j], m);
      }
    }
  }
  const float mx = block_max(m, red);
  s = s > 0.f ? s * exp_shift(m, mx) : 0.f;
  s = block_sum(s, red);
  const float lse = mx + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - xt;
  if (!dlogits) return;
  uint4* dv = reinterpret_cast<uint4*>(dlogits + row * V);
  for (int idx = threadIdx.x; idx < nvec; idx += kSmemThreads) {
    float f[8];
    unpack8(row_smem[idx], f);
    const int64_t c = int64_t(idx) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float p = exp_shift(f[j], lse);
      f[j] = grad_scale * (c + j == t ? p - 1.f : p);
    }
    dv[idx] = pack8(f);
  }
}

template <bool VEC>
__global__ void __launch_bounds__(kWideThreads)
    xent_wide_kernel(float* loss, nv_bf16* dlogits, const nv_bf16* logits, const int32_t* targets, int64_t V,
                     float grad_scale) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  const nv_bf16* x = logits + row * V;
  if (ignored_row<VEC>(t, loss, dlogits, row, V)) return;
  const float xt = ld(x + t);
  // Online max / sum per thread, rescaled once per vector.
  float m = -INFINITY, s = 0.f;
  if constexpr (VEC) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < V; c += int64_t(kWideThreads) * 8) {
      float f[8];
      load8(x + c, f);
      float lm = f[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) lm = fmaxf(lm, f[j]);
      if (lm > m) {
        s *= exp_shift(m, lm);
        m = lm;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) s += exp_shift(f[j], m);
    }
  } else {
    for (int64_t c = threadIdx.x; c < V; c += kWideThreads) {
      const float f = ld(x + c);
      if (f > m) {
        s *= exp_shift(m, f);
        m = f;
      }
      s += exp_shift(f, m);
    }
  }
  const float mx = block_max(m, red);
  s = s > 0.f ? s * exp_shift(m, mx) : 0.f;
  s = block_sum(s, red);
  const float lse = mx + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - xt;
  if (!dlogits) return;
  nv_bf16* d = dlogits + row * V;
  if constexpr (VEC) {
    for (int64_t c = int64_t(threadIdx.x) * 8; c < V; c += int64_t(kWideThreads) * 8) {
      float f[8];
      load8(x + c, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float p = exp_shift(f[j], lse);
        f[j] = grad_scale * (c + j == t ? p - 1.f : p);
      }
      store8(d + c, f);
    }
  } else {
    for (int64_t c = threadIdx.x; c < V; c += kWideThreads) {
      const float p = exp_shift(ld(x + c), lse);
      st(d + c, grad_scale * (c == t ? p - 1.f : p));
    }
  }
}

}  // namespace

void softmax_xent(float* loss, bf16* dlogits, const bf16* logits, const int32_t* targets, int64_t rows, int64_t V,
                  float grad_scale) {
  if (rows <= 0) return;
  DMAT_CHECK(V > 0 && rows < (int64_t(1) << 31), "softmax_xent: rows = {}, V = {}", rows, V);
  const bool vec = V % 8 == 0 && aligned16(logits) && aligned16(dlogits);
  const int64_t nvec = V / 8;
  const unsigned grid = unsigned(rows);
  auto* d = nv(dlogits);
  auto* x = nv(logits);
  if (vec && V >= kSmemMinV && V <= kSmemMaxV) {
    const size_t smem = size_t(V) * sizeof(nv_bf16);
    static bool attr_set = false;  // one opt-in for the largest row this kernel accepts
    if (!attr_set) {
      DMAT_CUDA_CHECK(cudaFuncSetAttribute(xent_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(kSmemMaxV * sizeof(nv_bf16))));
      attr_set = true;
    }
    xent_smem_kernel<<<grid, kSmemThreads, smem, stream()>>>(loss, d, x, targets, V, grad_scale);
  } else if (vec && nvec <= int64_t(kRegThreads) * 8) {
    // 16 vectors per thread would exceed the 128 registers a 512-thread block allows (spills).
    const int64_t per = ceil_div(nvec, kRegThreads);
    if (per <= 1) xent_reg_kernel<1><<<grid, kRegThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
    else if (per <= 2) xent_reg_kernel<2><<<grid, kRegThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
    else if (per <= 4) xent_reg_kernel<4><<<grid, kRegThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
    else xent_reg_kernel<8><<<grid, kRegThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
  } else if (vec) {
    xent_wide_kernel<true><<<grid, kWideThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
  } else {
    xent_wide_kernel<false><<<grid, kWideThreads, 0, stream()>>>(loss, d, x, targets, V, grad_scale);
  }
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda
