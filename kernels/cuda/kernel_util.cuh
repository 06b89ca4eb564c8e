// Device-side helpers shared by the dense CUDA kernels (private to kernels/cuda/*.cu): 16-byte
// vector loads/stores of 8 bf16 or 4 fp32 values, alignment tests, warp/block reductions in a
// fixed order (so results are bitwise reproducible), launch-size helpers, and the deterministic
// column reduction used by every "dw += Σ_rows" gradient.
#pragma once
#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/bf16.h"
#include "kernels/cuda/context.h"

namespace dmat::cuda::detail {

using nv_bf16 = __nv_bfloat16;

inline const nv_bf16* nv(const bf16* p) { return reinterpret_cast<const nv_bf16*>(p); }
inline nv_bf16* nv(bf16* p) { return reinterpret_cast<nv_bf16*>(p); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `work` items with `threads` per block: enough to fill the
// device several times over (memory-bound kernels need many loads in flight), never more than
// the work needs.
inline unsigned grid_for(int64_t work, int threads, int waves = 32) {
  const int64_t cap = int64_t(sm_count()) * waves;
  return unsigned(std::max<int64_t>(1, std::min(ceil_div(work, threads), cap)));
}

// ---- 8 x bf16 <-> 8 x float through one 16-byte access ----------------------------------------
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 t = __bfloat1622float2(h[k]);
    f[2 * k] = t.x;
    f[2 * k + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const nv_bf16* p, float (&f)[8]) {
  unpack8(*reinterpret_cast<const uint4*>(p), f);
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
  return u;
}
__device__ __forceinline__ void store8(nv_bf16* p, const float (&f)[8]) {
  *reinterpret_cast<uint4*>(p) = pack8(f);
}
// 8 floats as two float4 (32 bytes; the pointer must be 16-byte aligned).
__device__ __forceinline__ void load8f(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void store8f(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ float ld(const nv_bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(nv_bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---- reductions in a fixed order (butterfly: every lane ends with the same bits) --------------
template <int kWidth = 32>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, kWidth);
  return v;
}
template <int kWidth = 32>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, kWidth));
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
// `red` is 32 floats of shared memory; the call contains two __syncthreads.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = group_sum(v);
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return group_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = group_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : -INFINITY;
  return group_max(t);
}

}  // namespace dmat::cuda::detail

namespace dmat::cuda::detail {
// Deterministic column sums (reduce.cu), used by every "dw += Σ_rows" parameter gradient: a row
// kernel leaves fp32 partial sums partial[parts, D] (each over a fixed contiguous range of rows,
// in row order); this adds out[d] += Σ_p partial[p, d] in a fixed order (groups of parts first,
// into `scratch`, when there are many). scratch holds column_sum_scratch(parts, D) floats.
int64_t column_sum_scratch(int64_t parts, int64_t D);
void column_sum_accumulate(float* out, const float* partial, int64_t parts, int64_t D, float* scratch);
// How many row parts to split `rows` into when each part is worked on by `threads_per_part`
// threads: enough threads for a full H200 (~270K), fp32 partials ≤ 32 MiB. A function of the
// shape only (never of the device), so the summation order -- hence the bits -- is fixed.
int64_t reduction_parts(int64_t rows, int64_t D, int64_t threads_per_part);
}  // namespace dmat::cuda::detail
