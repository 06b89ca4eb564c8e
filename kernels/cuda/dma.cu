// Dynamic Mask Attention kernels (declarations and semantics in dma.h): the key bias from the
// values (forward, backward), the per-query thresholds by sort + monotone scan, and the gathered
// key lists of the sparse attention forward.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "core/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/dma.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using detail::ceil_div;
using detail::grid_for;
using detail::ld;
using detail::nv;
using detail::nv_bf16;

// softplus(z) = log(1 + e^z) without overflow (as the CPU reference); its derivative the sigmoid.
__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }
__device__ __forceinline__ float sigmoid(float z) {
  if (z >= 0.f) return 1.f / (1.f + expf(-z));
  const float e = expf(z);
  return e / (1.f + e);
}

// ---- bias forward: one warp per (b, t) row of v, heads in turn ---------------------------------
// VEC: C % 8 == 0 and 16-byte aligned rows, 8 bf16 per lane and load; else one element per lane.
template <bool VEC>
__global__ void dma_bias_fwd_kernel(float* __restrict__ z, float* __restrict__ bias, const nv_bf16* __restrict__ v,
                                    const nv_bf16* __restrict__ w, const nv_bf16* __restrict__ A, int64_t rows,
                                    int T, int Hkv, int C, bool exp_form) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t b = r / T, t = r % T;
    const nv_bf16* vr = v + r * C;
    for (int h = 0; h < Hkv; ++h) {
      const nv_bf16* wh = w + int64_t(h) * C;
      float acc = 0.f;
      if constexpr (VEC) {
        for (int c = lane * 8; c < C; c += 256) {
          float a[8], x[8];
          detail::load8(vr + c, a);
          detail::load8(wh + c, x);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc = fmaf(a[k], x[k], acc);
        }
      } else {
        for (int c = lane; c < C; c += 32) acc = fmaf(ld(vr + c), ld(wh + c), acc);
      }
      acc = detail::group_sum(acc);
      if (lane == 0) {
        const int64_t at = (b * Hkv + h) * T + t;
        const float a = ld(A + h) * softplus(acc);
        z[at] = acc;
        bias[at] = exp_form ? expf(a) : a;
      }
    }
  }
}

// VEC with HK = Hkv ≤ 8 (known at compile time): every head in one pass over the row, so v is
// read once and the HK warp sums are independent (the per-head loop above reloads v and waits on
// each head's shuffle reduction in turn). The same per-lane order per head, so the same bits.
template <int HK>
__global__ void dma_bias_fwd_heads_kernel(float* __restrict__ z, float* __restrict__ bias,
                                          const nv_bf16* __restrict__ v, const nv_bf16* __restrict__ w,
                                          const nv_bf16* __restrict__ A, int64_t rows, int T, int C, bool exp_form) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t b = r / T, t = r % T;
    const nv_bf16* vr = v + r * C;
    float acc[HK];
#pragma unroll
    for (int h = 0; h < HK; ++h) acc[h] = 0.f;
    for (int c = lane * 8; c < C; c += 256) {
      float a[8];
      detail::load8(vr + c, a);
#pragma unroll
      for (int h = 0; h < HK; ++h) {
        float x[8];
        detail::load8(w + int64_t(h) * C + c, x);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[h] = fmaf(a[k], x[k], acc[h]);
      }
    }
#pragma unroll
    for (int h = 0; h < HK; ++h) acc[h] = detail::group_sum(acc[h]);
    if (lane < HK) {
      float zh = acc[0];
#pragma unroll
      for (int h = 1; h < HK; ++h) zh = lane == h ? acc[h] : zh;
      const int64_t at = (b * HK + lane) * T + t;
      const float a = ld(A + lane) * softplus(zh);
      z[at] = zh;
      bias[at] = exp_form ? expf(a) : a;
    }
  }
}

// Calls f(std::integral_constant<int, Hkv>) for Hkv in 1..8; false (f not called) otherwise.
template <class F>
bool with_heads(int64_t Hkv, F&& f) {
  switch (Hkv) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

// ---- bias backward -------------------------------------------------------------------------------
// da = ∂L/∂(A·softplus(z)): dbias·bias (exp form) or dbias (linear form).
__device__ __forceinline__ float dma_da(const float* dbias, const float* bias, int64_t x, bool exp_form) {
  return exp_form ? dbias[x] * bias[x] : dbias[x];
}

// dzr[(b·T + t)·Hkv + h] = da·A_h·sigmoid(z)  (row-major per (b, t): what the dv / dW kernels read)
__global__ void dma_dz_kernel(float* __restrict__ dzr, const float* __restrict__ dbias, const float* __restrict__ z,
                              const float* __restrict__ bias, const nv_bf16* __restrict__ A, int64_t n, int T,
                              int Hkv, bool exp_form) {
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = x % T, h = (x / T) % Hkv, b = x / (int64_t(T) * Hkv);
    dzr[(b * T + t) * Hkv + h] = dma_da(dbias, bias, x, exp_form) * ld(A + h) * sigmoid(z[x]);
  }
}

// dA[h] += Σ_{b,t} da·softplus(z): one block per head, fixed thread count and strides, fixed-order
// block reduction.
constexpr int kDaThreads = 256;
__global__ void __launch_bounds__(kDaThreads) dma_da_kernel(float* __restrict__ dA, const float* __restrict__ dbias,
                                                            const float* __restrict__ z,
                                                            const float* __restrict__ bias, int B, int T, int Hkv,
                                                            bool exp_form) {
  __shared__ float red[32];
  const int h = blockIdx.x;
  float acc = 0.f;
  for (int64_t r = threadIdx.x; r < int64_t(B) * T; r += kDaThreads) {
    const int64_t b = r / T, t = r % T, x = (b * Hkv + h) * T + t;
    acc = fmaf(dma_da(dbias, bias, x, exp_form), softplus(z[x]), acc);
  }
  acc = detail::block_sum(acc, red);
  if (threadIdx.x == 0) dA[h] += acc;
}

// The fused backward (dma_bias_backward where the rows are 16-byte vectors and Hkv ≤ 8):
// dzr as dma_dz_kernel, and per block of 256 positions of one (b, h) row its Σ da·softplus(z)
// (fixed-order block sum) in dapart[(b·Hkv + h)·gridDim.x + blockIdx.x]: no division per element,
// and dA's sum spread over the whole grid instead of Hkv blocks.
constexpr int kDzThreads = 256;
__global__ void __launch_bounds__(kDzThreads) dma_dz_da_kernel(float* __restrict__ dzr, float* __restrict__ dapart,
                                                               const float* __restrict__ dbias,
                                                               const float* __restrict__ z,
                                                               const float* __restrict__ bias,
                                                               const nv_bf16* __restrict__ A, int64_t BH, int T,
                                                               int Hkv, bool exp_form) {
  __shared__ float red[32];
  const int t = int(blockIdx.x) * kDzThreads + int(threadIdx.x);
  for (int64_t bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int64_t b = bh / Hkv;
    const int h = int(bh % Hkv);
    float term = 0.f;
    if (t < T) {
      const int64_t x = bh * T + t;
      const float da = dma_da(dbias, bias, x, exp_form);
      dzr[(b * T + t) * Hkv + h] = da * ld(A + h) * sigmoid(z[x]);
      term = da * softplus(z[x]);
    }
    term = detail::block_sum(term, red);
    if (threadIdx.x == 0) dapart[bh * gridDim.x + blockIdx.x] = term;
  }
}

// dA[h] += Σ_{b, block} dapart: one block per head, fixed thread count and strides, fixed-order sum.
__global__ void __launch_bounds__(kDaThreads) dma_da_sum_kernel(float* __restrict__ dA,
                                                                const float* __restrict__ dapart, int64_t B, int Hkv,
                                                                int nt) {
  __shared__ float red[32];
  const int h = blockIdx.x;
  float acc = 0.f;
  for (int64_t e = threadIdx.x; e < B * nt; e += kDaThreads) {
    const int64_t b = e / nt, k = e % nt;
    acc += dapart[(b * Hkv + h) * nt + k];
  }
  acc = detail::block_sum(acc, red);
  if (threadIdx.x == 0) dA[h] += acc;
}

// One pass over v and dv for both dv's share and dW's partial sums. A block per part of
// consecutive rows; thread (rl, cc): columns 8·cc .. 8·cc + 7 (cc = tid % NC, NC = C/8), rows
// r0 + rl, r0 + rl + RS, ... (RS = kDvThreads / NC). Per row: dv += Σ_h dzr[r, h]·W_dt[h, ·] (heads
// in increasing order, one bf16 rounding: as dma_dv_kernel) and acc[h][k] += dzr[r, h]·v[r, ·];
// then the RS row lanes' sums added in lane order through shared memory into
// partial[p·HK·C + h·C + c]. Shape-only part sizes, fixed orders: deterministic.
constexpr int kDvThreads = 256;
template <int HK>
__global__ void __launch_bounds__(kDvThreads) dma_dv_dw_kernel(nv_bf16* __restrict__ dv, float* __restrict__ partial,
                                                               const float* __restrict__ dzr,
                                                               const nv_bf16* __restrict__ v,
                                                               const nv_bf16* __restrict__ w, int64_t rows,
                                                               int64_t rows_per_part, int C) {
  extern __shared__ float lane_sum[];  // [HK·C]
  const int NC = C / 8, RS = kDvThreads / NC, tid = int(threadIdx.x), cc = tid % NC, rl = tid / NC;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_part, r1 = min(rows, r0 + rows_per_part);
  float wv[HK][8], acc[HK][8];
#pragma unroll
  for (int h = 0; h < HK; ++h) {
    if (rl < RS) detail::load8(w + int64_t(h) * C + 8 * cc, wv[h]);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[h][k] = 0.f;
  }
  if (rl < RS) {
#pragma unroll 2
    for (int64_t r = r0 + rl; r < r1; r += RS) {
      float dz[HK], x[8], g[8];
#pragma unroll
      for (int h = 0; h < HK; ++h) dz[h] = __ldg(dzr + r * HK + h);
      detail::load8(v + r * C + 8 * cc, x);
      detail::load8(dv + r * C + 8 * cc, g);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float s = 0.f;
#pragma unroll
        for (int h = 0; h < HK; ++h) {
          s = fmaf(dz[h], wv[h][k], s);
          acc[h][k] = fmaf(dz[h], x[k], acc[h][k]);
        }
        g[k] += s;
      }
      detail::store8(dv + r * C + 8 * cc, g);
    }
  }
  for (int l = 1; l < RS; ++l) {
    if (rl == l)
#pragma unroll
      for (int h = 0; h < HK; ++h) detail::store8f(lane_sum + h * C + 8 * cc, acc[h]);
    __syncthreads();
    if (rl == 0) {
#pragma unroll
      for (int h = 0; h < HK; ++h) {
        float y[8];
        detail::load8f(lane_sum + h * C + 8 * cc, y);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[h][k] += y[k];
      }
    }
    __syncthreads();
  }
  if (rl == 0)
#pragma unroll
    for (int h = 0; h < HK; ++h) detail::store8f(partial + (int64_t(blockIdx.x) * HK + h) * C + 8 * cc, acc[h]);
}

// dv[r, c] += Σ_h dzr[r, h]·W_dt[h, c]  (heads in increasing order, one bf16 rounding)
__global__ void dma_dv_kernel(nv_bf16* __restrict__ dv, const float* __restrict__ dzr, const nv_bf16* __restrict__ w,
                              int64_t n, int C, int Hkv) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / C, c = e % C;
    float g = 0.f;
    for (int h = 0; h < Hkv; ++h) g = fmaf(dzr[r * Hkv + h], ld(w + int64_t(h) * C + c), g);
    detail::st(dv + e, ld(dv + e) + g);
  }
}

// partial[p, h·C + c] = Σ_{r in part p, ascending} dzr[r, h]·v[r, c]; parts of consecutive rows.
// Heads in groups of kHG per pass over the rows (v read once per group).
constexpr int kDwThreads = 128, kHG = 8;
__global__ void __launch_bounds__(kDwThreads) dma_dw_partial_kernel(float* __restrict__ partial,
                                                                    const float* __restrict__ dzr,
                                                                    const nv_bf16* __restrict__ v, int64_t rows,
                                                                    int64_t rows_per_part, int C, int Hkv) {
  const int64_t p = blockIdx.x, r0 = p * rows_per_part, r1 = min(rows, r0 + rows_per_part);
  const int64_t D = int64_t(Hkv) * C;
  for (int c = threadIdx.x; c < C; c += kDwThreads) {
    for (int h0 = 0; h0 < Hkv; h0 += kHG) {
      float acc[kHG];
#pragma unroll
      for (int k = 0; k < kHG; ++k) acc[k] = 0.f;
      for (int64_t r = r0; r < r1; ++r) {
        const float x = ld(v + r * C + c);
#pragma unroll
        for (int k = 0; k < kHG; ++k)
          if (h0 + k < Hkv) acc[k] = fmaf(__ldg(dzr + r * Hkv + h0 + k), x, acc[k]);
      }
#pragma unroll
      for (int k = 0; k < kHG; ++k)
        if (h0 + k < Hkv) partial[p * D + int64_t(h0 + k) * C + c] = acc[k];
    }
  }
}

// ---- thresholds ------------------------------------------------------------------------------------
// Order-preserving map of a float to uint32 (−0.0 first made +0.0, so the two tie).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float order_value(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// keys[r·T + j] = (r << 32) | order_key(bias), idx = j: one radix sort keeps rows apart and, being
// stable, breaks ties by position.
__global__ void dma_thr_keys_kernel(uint64_t* __restrict__ keys, int32_t* __restrict__ idx,
                                    const float* __restrict__ bias, int64_t n, int T) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    keys[e] = (uint64_t(e / T) << 32) | order_key(bias[e]);
    idx[e] = int32_t(e % T);
  }
}

// One step of the monotone scan: rank r was just inserted (its bit set) as the n-th key; p is the
// threshold's rank. n == w: p = the smallest inserted rank; n > w: if r is above p, p moves to the
// next inserted rank above it (w + 1 ranks were >= p), else stays. Returns the threshold rank after
// the step, −1 while n < w.
__device__ __forceinline__ int thr_scan_step(const uint32_t* bits, int& p, int r, int n, int window) {
  if (n == window) {
    int wd = 0;
    while (bits[wd] == 0u) ++wd;
    p = wd * 32 + __ffs(bits[wd]) - 1;
  } else if (n > window && r > p) {
    int wd = p >> 5;
    uint32_t m = (p & 31) == 31 ? 0u : bits[wd] & (~0u << ((p & 31) + 1));
    while (m == 0u) m = bits[++wd];
    p = wd * 32 + __ffs(m) - 1;
  }
  return n >= window ? p : -1;
}

// tr[k] = the bias at threshold rank chunk[k] (−inf where −1), for k < len; the whole block.
__device__ __forceinline__ void write_thresholds(float* tr, const int32_t* chunk, int len,
                                                 const uint64_t* sorted_keys) {
  for (int k = threadIdx.x; k < len; k += blockDim.x) {
    const int q = chunk[k];
    tr[k] = q < 0 ? -INFINITY : order_value(uint32_t(sorted_keys[q]));
  }
}

// One block per row. pos[j] = the rank of key j in the sorted row; then thread 0 scans i in
// order: insert rank(i) into the bitset; with n inserted, the threshold is the rank p of the
// w-th largest inserted. n == w: p = the smallest inserted rank. n > w: if the new rank is above p,
// p moves to the next inserted rank above it (w + 1 ranks were >= p); else p stays. The scan runs
// over chunks of kChunk queries staged in shared memory; the block writes each chunk's values.
constexpr int kThrThreads = 256, kChunk = 2048;
__global__ void __launch_bounds__(kThrThreads) dma_thr_scan_kernel(float* __restrict__ thr,
                                                                   const float* __restrict__ bias,
                                                                   const uint64_t* __restrict__ sorted_keys,
                                                                   const int32_t* __restrict__ sorted_idx,
                                                                   int32_t* __restrict__ pos,
                                                                   uint32_t* __restrict__ gbits, int T, int window,
                                                                   bool bits_in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int32_t* chunk = reinterpret_cast<int32_t*>(smem_raw);  // [kChunk]: ranks in, threshold ranks out
  const int64_t row = blockIdx.x, base = row * T;
  const int words = (T + 31) / 32;
  uint32_t* bits = bits_in_smem ? reinterpret_cast<uint32_t*>(smem_raw + kChunk * sizeof(int32_t))
                                : gbits + row * int64_t(words);
  float* tr = thr + base;

  int nan = 0;
  for (int j = threadIdx.x; j < T; j += kThrThreads) nan |= isnan(bias[base + j]);
  if (__syncthreads_or(nan)) {
    for (int j = threadIdx.x; j < T; j += kThrThreads) tr[j] = __int_as_float(0x7fc00000);
    return;
  }
  for (int r = threadIdx.x; r < T; r += kThrThreads) pos[base + sorted_idx[base + r]] = r;
  for (int k = threadIdx.x; k < words; k += kThrThreads) bits[k] = 0u;
  __syncthreads();  // pos complete (global writes by this block are visible after the barrier)

  int p = -1;  // the threshold's rank once n >= window (thread 0's state across chunks)
  for (int c0 = 0; c0 < T; c0 += kChunk) {
    const int len = min(kChunk, T - c0);
    for (int k = threadIdx.x; k < len; k += kThrThreads) chunk[k] = pos[base + c0 + k];
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < len; ++k) {
        const int i = c0 + k, r = chunk[k];
        bits[r >> 5] |= 1u << (r & 31);
        chunk[k] = thr_scan_step(bits, p, r, i + 1, window);
      }
    }
    __syncthreads();
    write_thresholds(tr + c0, chunk, len, sorted_keys + base);
    __syncthreads();  // chunk is rewritten next
  }
}

// The same scan cut into segments of kSeg queries, one block per (segment, row), all in parallel.
// The state entering segment [i0, i0 + kSeg) is rebuilt instead of carried: for i0 >= w it is the
// top-w of the prefix — found by walking the sorted row down from the largest rank and counting
// keys at positions < i0 until w (p = that rank; only ranks >= p are ever examined again, since p
// only moves up) — and for i0 < w every prefix rank with p unset. Then thread 0 scans the segment
// exactly as dma_thr_scan_kernel. Work per segment O(ranks above p + kSeg); the chain of dependent
// shared-memory steps is kSeg long instead of T.
constexpr int kSeg = 512;
// pos[r·T + sorted_idx[r·T + k]] = k (each key's rank in its row); nan_rows[r] |= row r has a NaN.
__global__ void dma_thr_pos_kernel(int32_t* __restrict__ pos, int32_t* __restrict__ nan_rows,
                                   const int32_t* __restrict__ sorted_idx, const float* __restrict__ bias, int64_t n,
                                   int T) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / T, k = e % T;
    pos[row * T + sorted_idx[e]] = int32_t(k);
    if (isnan(bias[e])) nan_rows[row] = 1;
  }
}

__global__ void __launch_bounds__(kThrThreads) dma_thr_segment_kernel(float* __restrict__ thr,
                                                                      const uint64_t* __restrict__ sorted_keys,
                                                                      const int32_t* __restrict__ sorted_idx,
                                                                      const int32_t* __restrict__ pos,
                                                                      const int32_t* __restrict__ nan_rows, int T,
                                                                      int window) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int32_t* chunk = reinterpret_cast<int32_t*>(smem_raw);          // [kSeg]
  uint32_t* bits = reinterpret_cast<uint32_t*>(chunk + kSeg);     // [words]
  __shared__ int warp_n[kThrThreads / 32];
  __shared__ int p_start;
  const int64_t row = blockIdx.y, base = row * T;
  const int i0 = blockIdx.x * kSeg, len = min(kSeg, T - i0), words = (T + 31) / 32;
  float* tr = thr + base;
  if (nan_rows[row]) {
    for (int k = threadIdx.x; k < len; k += kThrThreads) tr[i0 + k] = __int_as_float(0x7fc00000);
    return;
  }
  for (int k = threadIdx.x; k < words; k += kThrThreads) bits[k] = 0u;
  for (int k = threadIdx.x; k < len; k += kThrThreads) chunk[k] = pos[base + i0 + k];
  if (threadIdx.x == 0) p_start = -1;
  __syncthreads();
  if (i0 < window) {  // fewer than w inserted so far: all of them, p unset
    for (int j = threadIdx.x; j < i0; j += kThrThreads) {
      const int r = pos[base + j];
      atomicOr(&bits[r >> 5], 1u << (r & 31));
    }
  } else {  // the top-w of the prefix: ranks from the top, counting positions < i0
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int total = 0;
    for (int hi = T - 1; hi >= 0; hi -= kThrThreads) {
      const int r = hi - int(threadIdx.x);
      const bool flag = r >= 0 && sorted_idx[base + r] < i0;
      const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
      if (lane == 0) warp_n[warp] = __popc(ballot);
      __syncthreads();
      int before = total, step = 0;
#pragma unroll
      for (int k = 0; k < kThrThreads / 32; ++k) {
        before += k < warp ? warp_n[k] : 0;
        step += warp_n[k];
      }
      const int incl = before + __popc(ballot & ((2u << lane) - 1u));
      if (flag && incl <= window) atomicOr(&bits[r >> 5], 1u << (r & 31));
      if (flag && incl == window) p_start = r;
      total += step;
      __syncthreads();  // warp_n rewritten next; p_start visible
      if (total >= window) break;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int p = p_start;
    for (int k = 0; k < len; ++k) {
      const int i = i0 + k, r = chunk[k];
      bits[r >> 5] |= 1u << (r & 31);
      chunk[k] = thr_scan_step(bits, p, r, i + 1, window);
    }
  }
  __syncthreads();
  write_thresholds(tr + i0, chunk, len, sorted_keys + base);
}

// Variant "bounds": segments of SEG queries (dma_thr_seg: 256 by default, shorter than the walk
// variant's kSeg since nothing here grows with the segment count but the O(S²) histogram), their
// entering and leaving threshold ranks P[s] = p after inserting positions < min(s·SEG, T) found
// first for every boundary s by rank searches, so a segment only needs the bits of ranks in
// [P[s], P[s + 1]] (p moves only up, and never past P[s + 1]). These windows of consecutive
// segments meet only at their ends, so all segments' walks together visit O(T + S) ranks. The
// searches: hp[c][s] = the ranks of descending chunk c (SEG ranks) whose position lies below
// s·SEG (a histogram over segments, prefix-summed), then per boundary a block-wide scan over the
// chunks and one chunk's ranks: O(S·T/SEG + T) per row. With the sort, O(T log T + T²/SEG²) per
// row: no worst case the walk variant has (biases increasing with position make every walk cross
// all later keys, O(T²/kSeg)).
template <int SEG>
__global__ void __launch_bounds__(SEG) dma_thr_hist_kernel(int32_t* __restrict__ hp,
                                                           const int32_t* __restrict__ sorted_idx, int T, int S) {
  extern __shared__ int h[];  // [S + 1]
  const int c = blockIdx.x;
  const int64_t row = blockIdx.y, base = row * T;
  for (int x = threadIdx.x; x <= S; x += SEG) h[x] = 0;
  __syncthreads();
  const int d = c * SEG + int(threadIdx.x);  // descending rank d: ascending rank T − 1 − d
  if (d < T) atomicAdd(&h[sorted_idx[base + (T - 1 - d)] / SEG], 1);
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix: h[s] = ranks of this chunk at positions < s·SEG
    int run = 0;
    for (int x = 0; x <= S; ++x) {
      const int v = h[x];
      h[x] = run;
      run += v;
    }
  }
  __syncthreads();
  int32_t* out = hp + (row * int64_t(gridDim.x) + c) * (S + 1);
  for (int x = threadIdx.x; x <= S; x += SEG) out[x] = h[x];
}

// P[row][s] for s = 0 .. S: the ascending rank of the w-th largest key at a position below
// min(s·SEG, T), or −1 where there are fewer than w such keys. The chunk holding it: the first c
// whose running count of ranks below i0 reaches w (a block scan over the chunks, SEG at a time).
template <int SEG>
__global__ void __launch_bounds__(SEG) dma_thr_bounds_kernel(int32_t* __restrict__ P, const int32_t* __restrict__ hp,
                                                             const int32_t* __restrict__ sorted_idx, int T, int S,
                                                             int n_chunks, int window) {
  using Scan = cub::BlockScan<int, SEG>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int s_chunk, s_before;
  __shared__ int warp_n[SEG / 32];
  const int s = blockIdx.x;
  const int64_t row = blockIdx.y, base = row * T;
  const int i0 = min(s * SEG, T);
  if (threadIdx.x == 0) s_chunk = n_chunks, s_before = 0;
  __syncthreads();
  const int32_t* h = hp + row * int64_t(n_chunks) * (S + 1) + s;
  int run = 0;  // the counts of the chunks before this stride
  for (int c0 = 0; c0 < n_chunks; c0 += SEG) {
    const int c = c0 + int(threadIdx.x);
    const int v = c < n_chunks ? h[int64_t(c) * (S + 1)] : 0;
    int incl = 0, total = 0;
    Scan(scan_tmp).InclusiveSum(v, incl, total);
    if (c < n_chunks && run + incl >= window && run + incl - v < window) s_chunk = c, s_before = run + incl - v;
    run += total;
    __syncthreads();  // s_chunk written (by at most one thread); scan_tmp free again
    if (s_chunk < n_chunks) break;  // uniform
  }
  const int c = s_chunk;
  if (c >= n_chunks) {
    if (threadIdx.x == 0) P[row * (S + 1) + s] = -1;
    return;
  }
  const int d = c * SEG + int(threadIdx.x), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool flag = d < T && sorted_idx[base + (T - 1 - d)] < i0;
  const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_n[warp] = __popc(ballot);
  __syncthreads();
  int incl = s_before + __popc(ballot & ((2u << lane) - 1u));
  for (int k = 0; k < warp; ++k) incl += warp_n[k];
  if (flag && incl == window) P[row * (S + 1) + s] = T - 1 - d;
}

// Shared memory of dma_thr_segment_bounds_kernel<seg>: the segment's ranks, its threshold ranks, the bits.
size_t thr_segment_bounds_smem(int seg, int64_t T) {
  return 2 * size_t(seg) * sizeof(int32_t) + size_t((T + 31) / 32) * sizeof(uint32_t);
}

// One block per (segment, row): the bits of the inserted ranks in [P[s], P[s + 1]], then thread 0
// steps through the segment (thr_scan_step), its ranks read kScanAhead at a time ahead of the
// chain of dependent shared-memory steps.
template <int SEG>
__global__ void __launch_bounds__(kThrThreads) dma_thr_segment_bounds_kernel(
    float* __restrict__ thr, const uint64_t* __restrict__ sorted_keys, const int32_t* __restrict__ sorted_idx,
    const int32_t* __restrict__ pos, const int32_t* __restrict__ nan_rows, const int32_t* __restrict__ P, int T,
    int S, int window) {
  constexpr int kScanAhead = 8;
  static_assert(SEG % kScanAhead == 0, "whole groups of ranks");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int32_t* chunk = reinterpret_cast<int32_t*>(smem_raw);      // [SEG]: ranks of the segment's positions
  int32_t* res = chunk + SEG;                                 // [SEG]: threshold ranks
  uint32_t* bits = reinterpret_cast<uint32_t*>(res + SEG);    // [words], only [lo, hi] used
  const int s = blockIdx.x;
  const int64_t row = blockIdx.y, base = row * T;
  const int i0 = s * SEG, len = min(SEG, T - i0);
  float* tr = thr + base;
  if (nan_rows[row]) {
    for (int k = threadIdx.x; k < len; k += kThrThreads) tr[i0 + k] = __int_as_float(0x7fc00000);
    return;
  }
  const int p0 = P[row * (S + 1) + s], p1 = P[row * (S + 1) + s + 1];
  if (p1 < 0) {  // fewer than w keys even after the segment
    for (int k = threadIdx.x; k < len; k += kThrThreads) tr[i0 + k] = -INFINITY;
    return;
  }
  const int lo = max(p0, 0), hi = p1;
  for (int k = threadIdx.x; k < SEG; k += kThrThreads) chunk[k] = k < len ? pos[base + i0 + k] : -1;
  for (int x = (lo >> 5) + int(threadIdx.x); x <= (hi >> 5); x += kThrThreads) bits[x] = 0u;
  __syncthreads();
  if (p0 < 0) {  // fewer than w inserted so far: every prefix rank up to hi
    for (int j = threadIdx.x; j < i0; j += kThrThreads) {
      const int r = pos[base + j];
      if (r <= hi) atomicOr(&bits[r >> 5], 1u << (r & 31));
    }
  } else {  // the inserted ranks in [p0, p1]
    for (int r = lo + int(threadIdx.x); r <= hi; r += kThrThreads)
      if (sorted_idx[base + r] < i0) atomicOr(&bits[r >> 5], 1u << (r & 31));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int p = p0;
    for (int k0 = 0; k0 < len; k0 += kScanAhead) {
      int rk[kScanAhead];
#pragma unroll
      for (int u = 0; u < kScanAhead; ++u) rk[u] = chunk[k0 + u];
#pragma unroll
      for (int u = 0; u < kScanAhead; ++u) {
        const int k = k0 + u, r = rk[u];
        if (k >= len) break;
        if (r >= lo && r <= hi) bits[r >> 5] |= 1u << (r & 31);
        res[k] = thr_scan_step(bits, p, r, i0 + k + 1, window);
      }
    }
  }
  __syncthreads();
  write_thresholds(tr + i0, res, len, sorted_keys + base);
}

// Variant "bounds" for short rows (T ≤ kShortMax): the whole computation in one block per row and
// shared memory, one launch instead of ~12 (at 96 rows × 2048 the global sort's passes and the
// 512-query serial segments cost ~0.16 ms; this is the model-scale case). A block radix sort of
// the unique keys order_key(bias) << 12 | position (the stable order without relying on the sort
// being stable), the ranks, then the bounds variant's boundary ranks P[s] and segment scans with
// segments of 32 queries, one warp each: h[c][s] counts the descending chunk c's ranks whose
// position lies below 32·s (one ballot each), thread s finds P[s] from them, and each warp builds
// its segment's bits of [P[s], P[s + 1]] a word per ballot before lane 0 steps through the
// segment (thr_scan_step). Work per row O(T log T + T²/1024).
constexpr int kShortThreads = 512, kShortWarps = kShortThreads / 32, kShortMax = 4096;
template <int ITEMS>
struct ShortThrSmem {
  static constexpr int N = kShortThreads * ITEMS, C = N / 32, S1 = N / 32 + 1;
  static_assert(N <= kShortMax, "positions take 12 bits of the sort key");
  using Sort = cub::BlockRadixSort<unsigned long long, kShortThreads, ITEMS>;
  static constexpr size_t kHist = size_t(C) * S1 * 2, kBits = size_t(kShortWarps) * C * 4;
  // the sort's storage, then (after it) the histogram and the warps' bitsets
  static constexpr size_t kR0 = std::max(sizeof(typename Sort::TempStorage), kHist + kBits);
  static constexpr size_t kOkey = (kR0 + 15) & ~size_t(15), kSidx = kOkey + N * 4, kPos = kSidx + N * 4,
                          kP = kPos + N * 4, kRes = kP + S1 * 4, kBytes = kRes + kShortThreads * 4;
};

template <int ITEMS>
__global__ void __launch_bounds__(kShortThreads) dma_thr_short_kernel(float* __restrict__ thr,
                                                                      const float* __restrict__ bias, int T,
                                                                      int window) {
  using L = ShortThrSmem<ITEMS>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sort_tmp = *reinterpret_cast<typename L::Sort::TempStorage*>(smem_raw);
  uint16_t* h = reinterpret_cast<uint16_t*>(smem_raw);                  // [C][S1], after the sort
  uint32_t* bits_all = reinterpret_cast<uint32_t*>(smem_raw + L::kHist);  // [warps][C], after the sort
  uint32_t* okey = reinterpret_cast<uint32_t*>(smem_raw + L::kOkey);      // [N]: order key at ascending rank
  int32_t* sidx = reinterpret_cast<int32_t*>(smem_raw + L::kSidx);        // [N]: position at ascending rank
  int32_t* pos = reinterpret_cast<int32_t*>(smem_raw + L::kPos);          // [N]: rank of position
  int32_t* P = reinterpret_cast<int32_t*>(smem_raw + L::kP);              // [S + 1]
  int32_t* res = reinterpret_cast<int32_t*>(smem_raw + L::kRes);          // [warps][32]
  const int64_t row = blockIdx.x;
  const float* br = bias + row * T;
  float* tr = thr + row * T;
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31, S = (T + 31) / 32;

  unsigned long long keys[ITEMS];
  int nan = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int e = tid * ITEMS + k;  // blocked arrangement
    if (e < T) {
      const float f = br[e];
      nan |= isnan(f);
      keys[k] = (static_cast<unsigned long long>(order_key(f)) << 12) | unsigned(e);
    } else {
      keys[k] = ~0ull;  // after every real key (order keys of non-NaN floats stay below 2^32 − 1)
    }
  }
  if (__syncthreads_or(nan)) {
    for (int i = tid; i < T; i += kShortThreads) tr[i] = __int_as_float(0x7fc00000);
    return;
  }
  typename L::Sort(sort_tmp).Sort(keys, 0, 44);
  __syncthreads();  // the sort's storage becomes h and the bitsets
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int r = tid * ITEMS + k;
    if (r < T) {
      const int j = int(keys[k] & 0xfffu);
      okey[r] = uint32_t(keys[k] >> 12);
      sidx[r] = j;
      pos[j] = r;
    }
  }
  __syncthreads();
  for (int c = warp; c < S; c += kShortWarps) {  // h[c][s]: descending ranks 32c .. 32c + 31
    const int d = 32 * c + lane;
    const int seg = d < T ? sidx[T - 1 - d] / 32 : INT_MAX;
    for (int s = 0; s <= S; ++s) {
      const uint32_t b = __ballot_sync(0xffffffffu, seg < s);
      if (lane == (s & 31)) h[c * L::S1 + s] = uint16_t(__popc(b));
    }
  }
  __syncthreads();
  for (int s = tid; s <= S; s += kShortThreads) {  // P[s] as dma_thr_bounds_kernel
    const int i0 = min(32 * s, T);
    int found = -1;
    if (i0 >= window) {
      int cum = 0, c = 0;
      for (; c < S; ++c) {
        const int v = h[c * L::S1 + s];
        if (cum + v >= window) break;
        cum += v;
      }
      for (int k = 0; k < 32 && found < 0; ++k) {
        const int d = 32 * c + k;
        if (d < T && sidx[T - 1 - d] < i0 && ++cum == window) found = T - 1 - d;
      }
    }
    P[s] = found;
  }
  __syncthreads();
  uint32_t* bits = bits_all + warp * L::C;
  for (int s = warp; s < S; s += kShortWarps) {
    const int i0 = 32 * s, len = min(32, T - i0), p0 = P[s], p1 = P[s + 1];
    int q = -1;
    if (p1 >= 0) {  // else fewer than w keys even after the segment: −inf throughout
      const int lo = max(p0, 0), hi = p1;
      for (int x = lo >> 5; x <= (hi >> 5); ++x) {  // the ranks in [lo, hi] at positions < i0
        const int r = 32 * x + lane;
        const uint32_t word = __ballot_sync(0xffffffffu, r >= lo && r <= hi && sidx[r] < i0);
        if (lane == 0) bits[x] = word;
      }
      __syncwarp();
      if (lane == 0) {
        int p = p0;
        for (int k = 0; k < len; ++k) {
          const int i = i0 + k, r = pos[i];
          if (r >= lo && r <= hi) bits[r >> 5] |= 1u << (r & 31);
          res[warp * 32 + k] = thr_scan_step(bits, p, r, i + 1, window);
        }
      }
      __syncwarp();
      q = res[warp * 32 + lane];
      __syncwarp();  // res is rewritten by the next segment
    }
    if (lane < len) tr[i0 + lane] = q < 0 ? -INFINITY : order_value(okey[q]);
  }
}

// ---- gathered key lists -----------------------------------------------------------------------------
// asc(q) = the keys j < i1(q) with bias_j >= thr[i0(q)], in increasing j. Since thr never
// decreases, asc(q + 1) = the keys of asc(q) still >= thr[i0(q + 1)], then those of tile q's own
// range [i1(q), i1(q + 1)) that are: O(capacity + block) from the previous list instead of a scan of
// the whole prefix. One block per segment of kGatherSeg consecutive tiles of a row: the first tile
// of a segment (and any tile after an overflowed list) scans its prefix, the others update. Work
// per row O(T²/(block·kGatherSeg) + T·(w + block)/block) instead of O(T²/block).
// With `clean` the list stored is asc(q) stably partitioned: first the keys every query of the tile
// keeps (j < i0 and bias_j >= thr[i1 − 1]: below the tile, above its highest threshold), then the
// rest, each part in increasing j; clean[list] counts the first part. The flash kernels run the
// key tiles made only of such keys without the element mask. asc(q) then lives in `work` (one
// list per block), updated in place (filtering moves a key only to a lower slot), each entry
// flagged in bit 31 as it is written where every query of the tile keeps it; one more pass over
// it writes the partitioned list.
// 1024 threads, each with up to kGatherUnroll candidates in flight per round: a pass over a list
// costs about two dependent load latencies (position, then bias) per round instead of per
// 256-candidate step, and one barrier per step (the per-warp counts alternate between two
// buffers, so a warp writing the next step's count never meets one still reading this step's).
constexpr int kGatherThreads = 1024, kGatherWarps = kGatherThreads / 32, kGatherUnroll = 4, kGatherSeg = 8;
static_assert(kGatherWarps == 32, "block_scan_packed: one lane per warp count");

// This warp's exclusive prefix (.x) and the block's total (.y) of the per-warp value v (lane 0's),
// two 16-bit counts packed per int (each below 2^16: at most kGatherThreads per step).
__device__ __forceinline__ int2 block_scan_packed(int v, int (*warp_n)[kGatherWarps], int& phase) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_n[phase][warp] = v;
  __syncthreads();
  const int x = warp_n[phase][lane];
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  phase ^= 1;
  return make_int2(__shfl_sync(0xffffffffu, incl - x, warp), __shfl_sync(0xffffffffu, incl, 31));
}

// Appends, in order, the candidates cand(0 .. n−1) (key positions, −1: none) with bias br[j] >= t0
// to out[total ...] (slots past cap dropped, total still counts them), bit 31 set on those every
// query of the tile keeps (j < i0_flag and br[j] >= tl; i0_flag = 0: none), which flagged counts.
// All threads of the block call it. out may be the candidates' own array (in-place filtering):
// every candidate of a round is read before the round's first barrier and written to a slot no
// higher than its own. The last step's writes are not followed by a barrier.
template <class Cand>
__device__ void gather_append(int n, Cand cand, const float* __restrict__ br, float t0, float tl, int i0_flag,
                              int32_t* out, int64_t cap, int& total, int& flagged, int (*warp_n)[kGatherWarps],
                              int& phase) {
  const uint32_t below = (1u << (threadIdx.x & 31)) - 1u;
  for (int r0 = 0; r0 < n; r0 += kGatherThreads * kGatherUnroll) {
    int j[kGatherUnroll];
    float bj[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int k = r0 + u * kGatherThreads + int(threadIdx.x);
      j[u] = k < n ? cand(k) : -1;
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) bj[u] = j[u] >= 0 ? br[j[u]] : 0.f;
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (r0 + u * kGatherThreads >= n) break;  // uniform
      const bool keep = j[u] >= 0 && bj[u] >= t0, flag = keep && j[u] < i0_flag && bj[u] >= tl;
      const uint32_t kb = __ballot_sync(0xffffffffu, keep), fb = __ballot_sync(0xffffffffu, flag);
      const int2 sc = block_scan_packed(__popc(kb) | (__popc(fb) << 16), warp_n, phase);
      if (keep) {
        const int at = total + (sc.x & 0xffff) + __popc(kb & below);
        if (at < cap) out[at] = flag ? int32_t(uint32_t(j[u]) | 0x80000000u) : j[u];
      }
      total += sc.y & 0xffff;
      flagged += sc.y >> 16;
    }
  }
}

// Writes the n entries of asc (key positions, bit 31 set on those kept by every query of the
// tile) stably partitioned: the flagged ones to out[0 ..], the others to out[n_first ..].
__device__ void gather_partition(const int32_t* __restrict__ asc, int n, int n_first, int32_t* __restrict__ out,
                                 int (*warp_n)[kGatherWarps], int& phase) {
  const uint32_t below = (1u << (threadIdx.x & 31)) - 1u;
  int first = 0, rest = 0;
  for (int r0 = 0; r0 < n; r0 += kGatherThreads * kGatherUnroll) {
    int32_t v[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int k = r0 + u * kGatherThreads + int(threadIdx.x);
      v[u] = k < n ? asc[k] : 0;
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (r0 + u * kGatherThreads >= n) break;  // uniform
      const bool in = r0 + u * kGatherThreads + int(threadIdx.x) < n, f = in && v[u] < 0;
      const uint32_t fb = __ballot_sync(0xffffffffu, f), rb = __ballot_sync(0xffffffffu, in && !f);
      const int2 sc = block_scan_packed(__popc(fb) | (__popc(rb) << 16), warp_n, phase);
      if (f) out[first + (sc.x & 0xffff) + __popc(fb & below)] = v[u] & 0x7fffffff;
      else if (in) out[n_first + rest + (sc.x >> 16) + __popc(rb & below)] = v[u];
      first += sc.y & 0xffff;
      rest += sc.y >> 16;
    }
  }
}

__global__ void __launch_bounds__(kGatherThreads) dma_gather_kernel(int32_t* __restrict__ keys,
                                                                    int32_t* __restrict__ count,
                                                                    int32_t* __restrict__ clean,
                                                                    int32_t* __restrict__ work,
                                                                    int32_t* __restrict__ max_count, int64_t cap,
                                                                    const float* __restrict__ bias,
                                                                    const float* __restrict__ thr, int T, int bq,
                                                                    int qt0, int n_tiles) {
  __shared__ int warp_n[2][kGatherWarps];
  int phase = 0;
  const int64_t row = blockIdx.y;
  const float* br = bias + row * T;
  // the ascending list: in place of the output without partition, else this block's work list
  // (bit 31 set on the keys every query of the tile keeps)
  int32_t* asc = clean ? work + (row * gridDim.x + blockIdx.x) * cap : nullptr;
  int prev_total = 0, prev_i1 = 0;
  for (int s = 0; s < kGatherSeg; ++s) {
    const int lt = int(blockIdx.x) * kGatherSeg + s;  // tile within this launch
    if (lt >= n_tiles) break;
    const int64_t list = row * n_tiles + lt;
    const int i0 = (qt0 + lt) * bq, i1 = min(i0 + bq, T);
    const float t0 = thr[row * T + i0], tl = thr[row * T + i1 - 1];
    const int i0_flag = clean ? i0 : 0;  // without partition nothing is flagged
    int32_t* out = keys + list * cap;
    int32_t* dst = clean ? asc : out;
    int total = 0, n_clean = 0;
    if (s == 0 || prev_total > cap) {  // no complete previous list: scan the prefix
      gather_append(i1, [](int k) { return k; }, br, t0, tl, i0_flag, dst, cap, total, n_clean, warp_n, phase);
    } else {
      // the previous ascending list: this block's work list, or the previous output (written by
      // this block, visible after its barriers)
      const int32_t* prev = clean ? asc : keys + (list - 1) * cap;
      gather_append(prev_total, [&](int k) { return int(prev[k] & 0x7fffffff); }, br, t0, tl, i0_flag, dst, cap,
                    total, n_clean, warp_n, phase);
      gather_append(i1 - prev_i1, [&](int k) { return prev_i1 + k; }, br, t0, tl, i0_flag, dst, cap, total, n_clean,
                    warp_n, phase);
    }
    if (clean) {
      __syncthreads();  // asc complete (its last writes follow the appends' last barrier)
      if (total <= cap) gather_partition(asc, total, n_clean, out, warp_n, phase);
      else n_clean = 0;
      if (threadIdx.x == 0) clean[list] = n_clean;
    }
    if (threadIdx.x == 0) {
      count[list] = total;
      if (max_count) atomicMax(max_count, total);
    }
    prev_total = total;
    prev_i1 = i1;
    __syncthreads();  // this list is complete before the next tile reads it
  }
}

// ---- key groups of the backward's dK/dV pass ---------------------------------------------------------
// Key j is kept by the queries i in [j, last_j], last_j = (the first i > j with thr_i > bias_j) − 1
// (thr never decreases), or by none where bias_j < thr_j. One block per (region of R keys, row):
// last_j by binary search over thr, a bitonic sort of the region by (last desc, j asc), then groups
// of kFlashGroupKeys consecutive sorted keys. Keys of a group share a start region and have similar
// ends, so the dense (group × query range) blocks of the dK/dV pass stay mostly kept pairs even
// where a query's kept keys are scattered over the whole prefix (random biases). R grows with T
// (dma_group_region_size): the ends spread as w/u for a key at quantile u of its region, so longer
// rows need finer quantile classes (simulated on iid normal biases, w = 2048: dK/dV work over kept
// pairs 1.42 at T = 16K with R = 1024 and 1.34 with 2048; at 128K 4.17 with 1024, 1.38 with 16384).
constexpr int kGroupThreads = 512;

__global__ void __launch_bounds__(kGroupThreads) dma_groups_kernel(int32_t* __restrict__ keys,
                                                                   int32_t* __restrict__ range,
                                                                   const float* __restrict__ bias,
                                                                   const float* __restrict__ thr, int T, int regions,
                                                                   int R) {
  extern __shared__ __align__(16) unsigned long long sk[];  // [R]
  constexpr unsigned long long kNone = ~0ull;
  const int reg = blockIdx.x, per_region = R / kFlashGroupKeys;
  const int64_t row = blockIdx.y;
  const float* br = bias + row * T;
  const float* tr = thr + row * T;
  for (int e = threadIdx.x; e < R; e += kGroupThreads) {
    const int j = reg * R + e;
    unsigned long long key = kNone;
    if (j < T) {
      const float bj = br[j];
      int last = -1;  // kept by no query (sorts after every kept key)
      if (bj >= tr[j]) {
        int lo = j + 1, hi = T;  // the first i in [j + 1, T] with thr_i > bj (T: none)
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (tr[mid] > bj) hi = mid;
          else lo = mid + 1;
        }
        last = lo - 1;
      }
      key = (static_cast<unsigned long long>(uint32_t(int64_t(INT32_MAX) - last)) << 32) | uint32_t(j);
    }
    sk[e] = key;
  }
  __syncthreads();
  for (int k = 2; k <= R; k <<= 1) {
    for (int d = k >> 1; d > 0; d >>= 1) {
      for (int x = threadIdx.x; x < R; x += kGroupThreads) {
        const int y = x ^ d;
        if (y > x) {
          const unsigned long long a = sk[x], c = sk[y];
          if ((a > c) == ((x & k) == 0)) {
            sk[x] = c;
            sk[y] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  const int64_t g0 = (row * regions + reg) * per_region;
  for (int e = threadIdx.x; e < R; e += kGroupThreads)
    keys[g0 * kFlashGroupKeys + e] = sk[e] == kNone ? -1 : int32_t(uint32_t(sk[e]));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int gg = warp; gg < per_region; gg += kGroupThreads / 32) {
    int lo = INT32_MAX, hi = -1;
    for (int e = lane; e < kFlashGroupKeys; e += 32) {
      const unsigned long long key = sk[gg * kFlashGroupKeys + e];
      if (key == kNone) continue;
      const int j = int(uint32_t(key)), last = int(int64_t(INT32_MAX) - int64_t(key >> 32));
      if (last >= j) {
        lo = min(lo, j);
        hi = max(hi, last);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) {
      range[2 * (g0 + gg)] = hi >= 0 ? lo : 0;
      range[2 * (g0 + gg) + 1] = hi;
    }
  }
}

int as_int(int64_t x, const char* what) {
  DMAT_CHECK(x >= 0 && x <= INT32_MAX, "dma: {}={} out of int32 range", what, x);
  return int(x);
}

}  // namespace

void dma_bias_forward(float* z, float* bias, const bf16* v, const bf16* w_dt, const bf16* A, int64_t B, int64_t T,
                      int64_t Hkv, int64_t Dh, DmaBiasForm form) {
  const int64_t rows = B * T, C = Hkv * Dh;
  if (rows == 0 || Hkv == 0) return;
  const bool vec = C % 8 == 0 && detail::aligned16(v) && detail::aligned16(w_dt);
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(rows, kThreads / 32);
  const bool ex = form == DmaBiasForm::Exp;
  const bool heads = vec && with_heads(Hkv, [&](auto hk) {
    dma_bias_fwd_heads_kernel<decltype(hk)::value><<<grid, kThreads, 0, stream()>>>(
        z, bias, nv(v), nv(w_dt), nv(A), rows, as_int(T, "T"), as_int(C, "C"), ex);
  });
  if (!heads && vec)
    dma_bias_fwd_kernel<true><<<grid, kThreads, 0, stream()>>>(z, bias, nv(v), nv(w_dt), nv(A), rows,
                                                               as_int(T, "T"), int(Hkv), as_int(C, "C"), ex);
  else if (!heads)
    dma_bias_fwd_kernel<false><<<grid, kThreads, 0, stream()>>>(z, bias, nv(v), nv(w_dt), nv(A), rows,
                                                                as_int(T, "T"), int(Hkv), as_int(C, "C"), ex);
  DMAT_CUDA_LAUNCH_CHECK();
}

void dma_bias_backward(bf16* dv, float* dw_dt, float* dA, const float* dbias, const float* z, const float* bias,
                       const bf16* v, const bf16* w_dt, const bf16* A, int64_t B, int64_t T, int64_t Hkv, int64_t Dh,
                       DmaBiasForm form) {
  const int64_t rows = B * T, C = Hkv * Dh, n = rows * Hkv, D = Hkv * C;
  if (rows == 0 || Hkv == 0) return;
  const bool ex = form == DmaBiasForm::Exp;
  const int Ti = as_int(T, "T"), Ci = as_int(C, "C");
  if (Hkv <= 8 && C % 8 == 0 && C / 8 <= kDvThreads && detail::aligned16(v) && detail::aligned16(dv) &&
      detail::aligned16(w_dt)) {
    // Fused: dzr + dA's partials (one pass over the keys), dv + dW's partials (one pass over v, dv).
    // Workspace: dzr [rows·Hkv] | dapart [B·Hkv·nt] | partial [parts·D] | column-sum scratch, each
    // slice 32-byte aligned. Parts of ~128 rows (fp32 partials ≤ 32 MiB), a function of the shape.
    const int64_t nt = ceil_div(T, kDzThreads), BH = B * Hkv;
    const int64_t parts = std::clamp<int64_t>(ceil_div(rows, 128), 1, std::max<int64_t>(1, (int64_t(8) << 20) / D));
    const int64_t rows_per_part = ceil_div(rows, parts), used_parts = ceil_div(rows, rows_per_part);
    const int64_t scratch = detail::column_sum_scratch(used_parts, D);
    auto up8 = [](int64_t x) { return (x + 7) & ~int64_t(7); };
    const int64_t n_dz = up8(n), n_da = up8(BH * nt), n_part = up8(used_parts * D);
    float* ws = static_cast<float*>(workspace(size_t(n_dz + n_da + n_part + scratch) * sizeof(float)));
    float* dzr = ws;
    float* dapart = ws + n_dz;
    float* partial = dapart + n_da;
    float* col_scratch = partial + n_part;
    const bool launched = with_heads(Hkv, [&](auto hk) {
      constexpr int HK = decltype(hk)::value;
      const dim3 zgrid(unsigned(nt), unsigned(std::min<int64_t>(BH, 65535)));
      dma_dz_da_kernel<<<zgrid, kDzThreads, 0, stream()>>>(dzr, dapart, dbias, z, bias, nv(A), BH, Ti, HK, ex);
      DMAT_CUDA_LAUNCH_CHECK();
      dma_da_sum_kernel<<<unsigned(HK), kDaThreads, 0, stream()>>>(dA, dapart, B, HK, int(nt));
      DMAT_CUDA_LAUNCH_CHECK();
      const size_t smem = size_t(HK) * size_t(C) * sizeof(float);
      auto kern = dma_dv_dw_kernel<HK>;
      if (smem > 48 * 1024)
        DMAT_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kern<<<unsigned(used_parts), kDvThreads, smem, stream()>>>(nv(dv), partial, dzr, nv(v), nv(w_dt), rows,
                                                                 rows_per_part, Ci);
      DMAT_CUDA_LAUNCH_CHECK();
    });
    DMAT_CHECK(launched, "dma bias backward: Hkv={}", Hkv);
    detail::column_sum_accumulate(dw_dt, partial, used_parts, D, col_scratch);
    return;
  }
  // Workspace: dzr [rows·Hkv] | partial [parts·D] | column-sum scratch.
  const int64_t parts = detail::reduction_parts(rows, D, kDwThreads);
  const int64_t rows_per_part = ceil_div(rows, parts), used_parts = ceil_div(rows, rows_per_part);
  const int64_t scratch = detail::column_sum_scratch(used_parts, D);
  float* ws = static_cast<float*>(workspace(size_t(n + used_parts * D + scratch) * sizeof(float)));
  float* dzr = ws;
  float* partial = ws + n;
  float* col_scratch = partial + used_parts * D;

  dma_dz_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(dzr, dbias, z, bias, nv(A), n, Ti, int(Hkv), ex);
  DMAT_CUDA_LAUNCH_CHECK();
  dma_da_kernel<<<unsigned(Hkv), kDaThreads, 0, stream()>>>(dA, dbias, z, bias, as_int(B, "B"), Ti, int(Hkv), ex);
  DMAT_CUDA_LAUNCH_CHECK();
  dma_dv_kernel<<<grid_for(rows * C, 256), 256, 0, stream()>>>(nv(dv), dzr, nv(w_dt), rows * C, Ci, int(Hkv));
  DMAT_CUDA_LAUNCH_CHECK();
  dma_dw_partial_kernel<<<unsigned(used_parts), kDwThreads, 0, stream()>>>(partial, dzr, nv(v), rows, rows_per_part,
                                                                           Ci, int(Hkv));
  DMAT_CUDA_LAUNCH_CHECK();
  detail::column_sum_accumulate(dw_dt, partial, used_parts, D, col_scratch);
}

namespace {
// The bounds variant's segment length, kernel_options().dma_thr_seg = 256|512|128 (default 256).
// The segment kernel's serial chain is the segment's length, so shorter segments are faster; 128
// gains ~2% over 256 but doubles the histogram (the workspace at N = 128K nears the 64 MiB budget),
// so 256 is the default (figures: docs/perf-log.md, "Dynamic Mask Attention").
int dma_thr_seg() { return kernel_options().dma_thr_seg; }
template <class F>
auto with_seg(int seg, F&& f) {
  if (seg == 512) return f(std::integral_constant<int, 512>{});
  if (seg == 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

void thresholds_rows(float* thr, const float* bias, int64_t rows, int64_t T, int64_t window, DmaThresholdScan scan) {
  const int64_t n = rows * T;
  if (n == 0) return;
  const int Ti = as_int(T, "T");
  DMAT_CHECK(rows < (int64_t(1) << 31), "dma thresholds: {} rows", rows);
  const int win = int(std::min<int64_t>(window, int64_t(T) + 1));  // window > T: every threshold is −inf
  const int row_bits = rows > 1 ? 64 - __builtin_clzll(uint64_t(rows - 1)) : 0;

  size_t cub_bytes = 0;
  DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint64_t*>(nullptr),
                                                  static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), n, 0, 32 + row_bits, stream()));
  const int64_t words = ceil_div(T, 32);
  const size_t smem = kChunk * sizeof(int32_t) + size_t(words) * sizeof(uint32_t);
  const bool bits_in_smem = smem <= max_smem_optin();
  auto align = [](size_t b) { return (b + 255) & ~size_t(255); };
  const int seg = scan == DmaThresholdScan::bounds ? dma_thr_seg() : kSeg;
  const size_t seg_smem = scan == DmaThresholdScan::bounds ? thr_segment_bounds_smem(seg, T)
                                                            : kSeg * sizeof(int32_t) + size_t(words) * sizeof(uint32_t);
  const bool segmented = scan != DmaThresholdScan::serial && seg_smem <= max_smem_optin() && rows < 65536;
  const bool bounds = segmented && scan == DmaThresholdScan::bounds;
  const int64_t S = ceil_div(T, seg);  // segments, and chunks of seg descending ranks
  const size_t keys_b = align(size_t(n) * 8), idx_b = align(size_t(n) * 4), cub_b = align(cub_bytes),
               bits_b = bits_in_smem ? 0 : align(size_t(rows * words) * 4),
               hp_b = bounds ? align(size_t(rows * (S + 1) * (S + 1)) * 4) : 0;
  char* ws = static_cast<char*>(workspace(2 * keys_b + 2 * idx_b + cub_b + bits_b + hp_b));
  uint64_t* keys_in = reinterpret_cast<uint64_t*>(ws);
  uint64_t* keys_out = reinterpret_cast<uint64_t*>(ws + keys_b);
  int32_t* idx_in = reinterpret_cast<int32_t*>(ws + 2 * keys_b);
  int32_t* idx_out = reinterpret_cast<int32_t*>(ws + 2 * keys_b + idx_b);
  void* cub_tmp = ws + 2 * keys_b + 2 * idx_b;
  uint32_t* gbits = bits_in_smem ? nullptr : reinterpret_cast<uint32_t*>(ws + 2 * keys_b + 2 * idx_b + cub_b);

  dma_thr_keys_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(keys_in, idx_in, bias, n, Ti);
  DMAT_CUDA_LAUNCH_CHECK();
  DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_tmp, cub_bytes, keys_in, keys_out, idx_in, idx_out, n, 0,
                                                  32 + row_bits, stream()));
  // idx_in is free after the sort: it becomes pos (rank of each key).
  if (segmented) {
    // after the sort idx_in and keys_in are free: pos over idx_in, the per-row NaN flags (and for
    // the bounds variant the boundary ranks) in keys_in
    int32_t* pos = idx_in;
    int32_t* nan_rows = reinterpret_cast<int32_t*>(keys_in);
    DMAT_CUDA_CHECK(cudaMemsetAsync(nan_rows, 0, size_t(rows) * sizeof(int32_t), stream()));
    dma_thr_pos_kernel<<<grid_for(n, 256), 256, 0, stream()>>>(pos, nan_rows, idx_out, bias, n, Ti);
    DMAT_CUDA_LAUNCH_CHECK();
    if (bounds) {
      // P [rows][S + 1] after the flags (rows + rows·(S + 1) ints fit in keys_in's 2·rows·T);
      // hp [rows][S chunks][S + 1] in its own slice
      int32_t* P = nan_rows + rows;
      int32_t* hp = reinterpret_cast<int32_t*>(ws + 2 * keys_b + 2 * idx_b + cub_b + bits_b);
      const int Si = int(S);
      with_seg(seg, [&](auto c) {
        constexpr int SEG = decltype(c)::value;
        const size_t hist_smem = size_t(S + 1) * sizeof(int);
        DMAT_CHECK(hist_smem <= max_smem_optin(), "dma thresholds: {} segments", S);
        if (hist_smem > 48 * 1024)
          DMAT_CUDA_CHECK(cudaFuncSetAttribute(dma_thr_hist_kernel<SEG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               int(hist_smem)));
        dma_thr_hist_kernel<SEG><<<dim3(unsigned(S), unsigned(rows)), SEG, hist_smem, stream()>>>(hp, idx_out, Ti, Si);
        DMAT_CUDA_LAUNCH_CHECK();
        dma_thr_bounds_kernel<SEG><<<dim3(unsigned(S + 1), unsigned(rows)), SEG, 0, stream()>>>(P, hp, idx_out, Ti, Si,
                                                                                               Si, win);
        DMAT_CUDA_LAUNCH_CHECK();
        if (seg_smem > 48 * 1024)
          DMAT_CUDA_CHECK(cudaFuncSetAttribute(dma_thr_segment_bounds_kernel<SEG>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(seg_smem)));
        dma_thr_segment_bounds_kernel<SEG><<<dim3(unsigned(S), unsigned(rows)), kThrThreads, seg_smem, stream()>>>(
            thr, keys_out, idx_out, pos, nan_rows, P, Ti, Si, win);
        DMAT_CUDA_LAUNCH_CHECK();
        return 0;
      });
      return;
    }
    if (seg_smem > 48 * 1024)
      DMAT_CUDA_CHECK(cudaFuncSetAttribute(dma_thr_segment_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(seg_smem)));
    dma_thr_segment_kernel<<<dim3(unsigned(S), unsigned(rows)), kThrThreads, seg_smem, stream()>>>(
        thr, keys_out, idx_out, pos, nan_rows, Ti, win);
    DMAT_CUDA_LAUNCH_CHECK();
    return;
  }
  const size_t launch_smem = bits_in_smem ? smem : kChunk * sizeof(int32_t);
  if (launch_smem > 48 * 1024)
    DMAT_CUDA_CHECK(cudaFuncSetAttribute(dma_thr_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(launch_smem)));
  dma_thr_scan_kernel<<<unsigned(rows), kThrThreads, launch_smem, stream()>>>(thr, bias, keys_out, idx_out, idx_in,
                                                                              gbits, Ti, win, bits_in_smem);
  DMAT_CUDA_LAUNCH_CHECK();
}

// kernel_options().dma_thresholds = walk|bounds|serial (default bounds: at least as fast as walk on
// every input measured, including biases increasing in position, and O(T log T) per row;
// docs/perf-log.md).
DmaThresholdScan env_threshold_scan() {
  switch (kernel_options().dma_thresholds) {
    case DmaThresholdOption::walk: return DmaThresholdScan::walk;
    case DmaThresholdOption::serial: return DmaThresholdScan::serial;
    default: return DmaThresholdScan::bounds;
  }
}

}  // namespace

// Rows in batches whose sort workspace (~36 B per element: keys and indices in and out, and CUB's
// alternate buffers) stays within 16 MiB (at least one row).
void dma_thresholds_scan(float* thr, const float* bias, int64_t rows, int64_t T, int64_t window,
                         DmaThresholdScan scan) {
  DMAT_CHECK(window > 0, "dma thresholds: window={}", window);
  if (rows == 0 || T == 0) return;
  if (scan == DmaThresholdScan::bounds && T <= kShortMax && rows < (int64_t(1) << 31)) {
    const int win = int(std::min<int64_t>(window, T + 1));  // window > T: every threshold is −inf
    auto launch = [&](auto kern, size_t smem) {
      DMAT_CHECK(smem <= max_smem_optin(), "dma thresholds: {} B of shared memory", smem);
      if (smem > 48 * 1024)
        DMAT_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kern<<<unsigned(rows), kShortThreads, smem, stream()>>>(thr, bias, int(T), win);
      DMAT_CUDA_LAUNCH_CHECK();
    };
    if (T <= kShortMax / 2) launch(dma_thr_short_kernel<kShortMax / 2 / kShortThreads>, ShortThrSmem<4>::kBytes);
    else launch(dma_thr_short_kernel<kShortMax / kShortThreads>, ShortThrSmem<8>::kBytes);
    return;
  }
  const int64_t batch = std::clamp<int64_t>((int64_t(16) << 20) / (36 * T), 1, rows);
  for (int64_t r0 = 0; r0 < rows; r0 += batch)
    thresholds_rows(thr + r0 * T, bias + r0 * T, std::min(batch, rows - r0), T, window, scan);
}

namespace {
// thr[r, i] ← thr[r, i − L] (−inf for i < L), in place: one block per row walks its chunks from the
// end, each thread reading its source before the block's barrier and writing after it; a chunk's
// sources lie below its own start or inside it, and everything below is written only later.
constexpr int kShiftThreads = 256;
__global__ void __launch_bounds__(kShiftThreads) dma_thr_shift_kernel(float* thr, int64_t T, int64_t L) {
  float* row = thr + int64_t(blockIdx.x) * T;
  for (int64_t c0 = (T - 1) / kShiftThreads * kShiftThreads; c0 >= 0; c0 -= kShiftThreads) {
    const int64_t i = c0 + threadIdx.x;
    const float v = i < T && i >= L ? row[i - L] : -INFINITY;
    __syncthreads();
    if (i < T) row[i] = v;
    __syncthreads();
  }
}
}  // namespace

void dma_thresholds(float* thr, const float* bias, int64_t rows, int64_t T, int64_t window, int64_t local) {
  DMAT_CHECK(local >= 0, "dma thresholds: local window {}", local);
  dma_thresholds_scan(thr, bias, rows, T, window, env_threshold_scan());
  if (local == 0 || rows == 0 || T == 0) return;
  DMAT_CHECK(rows < (int64_t(1) << 31), "dma thresholds: {} rows", rows);
  dma_thr_shift_kernel<<<unsigned(rows), kShiftThreads, 0, stream()>>>(thr, T, local);
  DMAT_CUDA_LAUNCH_CHECK();
}

int64_t dma_gather_tiles(int64_t T) { return ceil_div(T, flash_attention_block_q()); }

int64_t dma_gather_work_ints(int64_t rows, int64_t T, int64_t capacity, int64_t tiles) {
  const int64_t n = tiles < 0 ? dma_gather_tiles(T) : tiles;
  return rows * ceil_div(n, kGatherSeg) * std::max<int64_t>(capacity, 1);
}

void dma_gather_keys(int32_t* keys, int32_t* count, int32_t* max_count, int64_t capacity, const float* bias,
                     const float* thr, int64_t rows, int64_t T, int64_t tile0, int64_t tiles, int32_t* clean,
                     int32_t* work) {
  DMAT_CHECK(capacity >= 0, "dma gather: capacity={}", capacity);
  DMAT_CHECK(!clean || work, "dma gather: partitioned lists (clean counts) need a work buffer");
  const int64_t all = dma_gather_tiles(T), n = tiles < 0 ? all - tile0 : tiles;
  DMAT_CHECK(tile0 >= 0 && n >= 0 && tile0 + n <= all, "dma gather: tiles {} + {} of {}", tile0, n, all);
  if (rows == 0 || n == 0) return;
  DMAT_CHECK(n < (int64_t(1) << 31) && rows < 65536, "dma gather: {} tiles x {} rows", n, rows);
  dma_gather_kernel<<<dim3(unsigned(ceil_div(n, kGatherSeg)), unsigned(rows)), kGatherThreads, 0, stream()>>>(
      keys, count, clean, work, max_count, capacity, bias, thr, as_int(T, "T"), flash_attention_block_q(),
      int(tile0), int(n));
  DMAT_CUDA_LAUNCH_CHECK();
}

int64_t dma_group_region_size(int64_t T) {  // T/8 as a power of two in [1024, 16384], within shared memory
  int64_t cap = 16384;
  while (cap > 1024 && size_t(cap) * sizeof(unsigned long long) > max_smem_optin()) cap /= 2;
  int64_t r = 1024;
  while (r < cap && r * 8 < T) r *= 2;
  return r;
}
int64_t dma_group_regions(int64_t T) { return ceil_div(T, dma_group_region_size(T)); }
int64_t dma_group_count(int64_t T) { return dma_group_regions(T) * (dma_group_region_size(T) / kFlashGroupKeys); }

void dma_key_groups(int32_t* keys, int32_t* range, const float* bias, const float* thr, int64_t rows, int64_t T) {
  const int64_t regions = dma_group_regions(T), R = dma_group_region_size(T);
  if (rows == 0 || regions == 0) return;
  DMAT_CHECK(rows < 65536, "dma key groups: {} rows", rows);
  const size_t smem = size_t(R) * sizeof(unsigned long long);
  if (smem > 48 * 1024)
    DMAT_CUDA_CHECK(cudaFuncSetAttribute(dma_groups_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dma_groups_kernel<<<dim3(unsigned(regions), unsigned(rows)), kGroupThreads, smem, stream()>>>(
      keys, range, bias, thr, as_int(T, "T"), int(regions), int(R));
  DMAT_CUDA_LAUNCH_CHECK();
}

int64_t dma_gather_capacity(int64_t T, int64_t window) {
  return std::max<int64_t>(1, std::min<int64_t>(T, window + flash_attention_block_q() - 1));
}

namespace {
// Gathered lists are built in batches of query tiles whose lists fit kListBudget (at least one
// tile): the workspace stays bounded at any T (N = 128K, 16 KV heads, w = 2048: 5 batches).
constexpr int64_t kListBudget = int64_t(24) << 20;
int64_t g_list_budget = kListBudget;  // testing::set_dma_list_budget

// workspace3() layout: key groups (backward) | lists of one batch | their counts | their clean
// counts | the list builder's work lists.
struct DmaScratch {
  int64_t rows, tiles_per_batch, cap, n_groups;
  int32_t *group_keys, *group_range, *keys, *count, *clean, *work;
};
DmaScratch dma_scratch(const AttnShape& s, int64_t window) {
  DmaScratch d{};
  d.rows = s.B * s.Hkv;
  d.cap = dma_gather_capacity(s.T, window);
  const int64_t tiles = dma_gather_tiles(s.T), per_tile = d.rows * d.cap * int64_t(sizeof(int32_t));
  d.tiles_per_batch = std::clamp<int64_t>(g_list_budget / std::max<int64_t>(per_tile, 1), 1, tiles);
  d.n_groups = dma_group_count(s.T);
  auto align = [](int64_t n) { return (n + 63) & ~int64_t(63); };  // int32 elements, 256-byte alignment
  const int64_t n_gk = align(d.rows * d.n_groups * kFlashGroupKeys), n_gr = align(d.rows * d.n_groups * 2);
  const int64_t n_keys = align(d.rows * d.tiles_per_batch * d.cap), n_count = align(d.rows * d.tiles_per_batch);
  const int64_t n_work = align(dma_gather_work_ints(d.rows, s.T, d.cap, d.tiles_per_batch));
  // one size for forward and backward, so the scratch is allocated once
  int32_t* ws =
      static_cast<int32_t*>(workspace3(size_t(n_gk + n_gr + n_keys + 2 * n_count + n_work) * sizeof(int32_t)));
  d.group_keys = ws, d.group_range = ws + n_gk, d.keys = ws + n_gk + n_gr, d.count = d.keys + n_keys;
  d.clean = d.count + n_count, d.work = d.clean + n_count;
  return d;
}
FlashGather dma_lists(const DmaScratch& d, const float* bias, const float* thr, int64_t T, int64_t tile0,
                      int64_t tiles) {
  dma_gather_keys(d.keys, d.count, nullptr, d.cap, bias, thr, d.rows, T, tile0, tiles, d.clean, d.work);
  FlashGather g;
  g.keys = d.keys, g.count = d.count, g.capacity = d.cap, g.thr = thr, g.tile0 = tile0, g.tiles = tiles;
  g.clean = d.clean;
  return g;
}
}  // namespace

// Dense DMA (no lists, no key groups: every causal pair visited, the mask per element). The forward
// runs dense where w keeps at least half the causal pairs: the gathered forward costs more than the
// dense one per pair visited (~1.4× on the H200), so with most pairs kept gathering does not pay
// (T = 2048, w = 1024: the dense forward measured slightly faster; docs/perf-log.md). The backward
// stays gathered there: run
// dense, its mask runs on every tile (a block of 128 consecutive keys almost never has every key kept by
// a whole query tile) and it measured slower (2.67 against 2.45 ms). kernel_options().dma_dense
// = 0|1 (testing::set_dma_dense) forces one mode for both directions.
// A local window (s.window > 0) runs dense in both directions: the gathered lists and key groups
// know only the threshold rule.
bool dma_dense(const AttnShape& s, int64_t window, bool forward) {
  if (s.window > 0) return true;
  if (const DmaDenseOption m = kernel_options().dma_dense; m != DmaDenseOption::automatic)
    return m == DmaDenseOption::always;
  if (!forward) return false;
  const double T = double(s.T), w = double(std::min(window, s.T));
  const double kept = w * (w + 1) / 2 + (T - w) * w, causal = T * (T + 1) / 2;
  return kept >= 0.5 * causal;
}

void dma_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const float* bias,
                           const float* thr, const AttnShape& s, int64_t window, FlashPath path) {
  DMAT_CHECK(window > 0 && s.window >= 0, "dma attention: window {} (shape window {}: the local window, >= 0)", window,
             s.window);
  const DmaScratch d = dma_scratch(s, window);  // allocated in either mode: one workspace size
  if (dma_dense(s, window, true)) {
    FlashGather g;
    g.thr = thr;
    flash_attention_forward_path(out, lse, q, k, v, s, bias, &g, path);
    return;
  }
  const int64_t all = dma_gather_tiles(s.T);
  for (int64_t t0 = 0; t0 < all; t0 += d.tiles_per_batch) {
    const FlashGather g = dma_lists(d, bias, thr, s.T, t0, std::min(d.tiles_per_batch, all - t0));
    flash_attention_forward_path(out, lse, q, k, v, s, bias, &g, path);
  }
}

void dma_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dbias, const bf16* dout, const bf16* out,
                            const float* lse, const bf16* q, const bf16* k, const bf16* v, const float* bias,
                            const float* thr, const AttnShape& s, int64_t window, FlashPath path) {
  DMAT_CHECK(window > 0 && s.window >= 0, "dma attention: window {} (shape window {}: the local window, >= 0)", window,
             s.window);
  const DmaScratch d = dma_scratch(s, window);
  if (dma_dense(s, window, false)) {
    flash_attention_backward_dma(dq, dk, dv, dbias, dout, out, lse, q, k, v, s, bias, thr, FlashKeyGroups{}, 0,
                                 FlashGatherSource{}, path);
    return;
  }
  // The key groups, the lists and the dQ passes on a side stream, beside the delta kernel and the
  // dK/dV pass (attention_side_stream, flash_attention.h).
  SideStream side(attention_side_stream());
  side.run([&] { dma_key_groups(d.group_keys, d.group_range, bias, thr, d.rows, s.T); });
  side.mark();
  FlashKeyGroups groups;
  groups.keys = d.group_keys, groups.range = d.group_range, groups.n_groups = d.n_groups;
  groups.regions = dma_group_regions(s.T);
  flash_attention_backward_dma(dq, dk, dv, dbias, dout, out, lse, q, k, v, s, bias, thr, groups, d.tiles_per_batch,
                               [&](int64_t t0, int64_t n) { return dma_lists(d, bias, thr, s.T, t0, n); }, path,
                               &side);
  side.join();
}

}  // namespace dmat::cuda

namespace dmat::cuda::testing {
int set_dma_dense(int mode) {
  DMAT_CHECK(mode >= -1 && mode <= 1, "dma dense mode {} (−1 auto, 0 never, 1 always)", mode);
  KernelOptions o = kernel_options();
  const int old = int(o.dma_dense) - 1;
  o.dma_dense = DmaDenseOption(mode + 1);
  set_kernel_options(o);
  return old;
}
int set_dma_thr_seg(int seg) {
  DMAT_CHECK(seg == 128 || seg == 256 || seg == 512, "dma thresholds: segment length {} (128, 256, 512)", seg);
  KernelOptions o = kernel_options();
  const int old = o.dma_thr_seg;
  o.dma_thr_seg = seg;
  set_kernel_options(o);
  return old;
}
int64_t set_dma_list_budget(int64_t bytes) {
  const int64_t old = g_list_budget;
  g_list_budget = bytes > 0 ? bytes : kListBudget;
  return old;
}
}  // namespace dmat::cuda::testing
