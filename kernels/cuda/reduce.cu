// Deterministic reductions: Σx² and Σx of an fp32 array (gradient norm, micro-batch loss) and the
// column sums behind every parameter-gradient reduction over rows. No float atomics anywhere:
// fixed-size chunks produce partial sums in workspace, then one block combines them in index
// order, so the bits depend on the input and its length only -- not on the GPU or the run.
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

constexpr int kSumThreads = 256;
constexpr int kSumPerThread = 32;  // elements per thread per chunk
constexpr int64_t kSumChunk = int64_t(kSumThreads) * kSumPerThread;

// Block b reduces x[b·chunk, (b+1)·chunk) in double: each thread its strided elements in order,
// then a fixed butterfly within warps, then warp sums in order.
template <bool SQUARE, bool VEC>
__global__ void __launch_bounds__(kSumThreads) chunk_sum_kernel(double* partial, const float* x, int64_t n) {
  const int64_t base = int64_t(blockIdx.x) * kSumChunk;
  const int64_t end = min(n, base + kSumChunk);
  double s = 0;
  if constexpr (VEC) {
#pragma unroll
    for (int k = 0; k < kSumPerThread / 4; ++k) {
      const int64_t i = base + (int64_t(k) * kSumThreads + threadIdx.x) * 4;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (i + 4 <= end) {
        const float4 t = *reinterpret_cast<const float4*>(x + i);
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
      } else {
        for (int j = 0; j < 4; ++j)
          if (i + j < end) v[j] = x[i + j];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) s += SQUARE ? double(v[j]) * double(v[j]) : double(v[j]);
    }
  } else {
#pragma unroll 8
    for (int k = 0; k < kSumPerThread; ++k) {
      const int64_t i = base + int64_t(k) * kSumThreads + threadIdx.x;
      const double v = i < end ? double(x[i]) : 0.0;
      s += SQUARE ? v * v : v;
    }
  }
  __shared__ double warp_part[kSumThreads / 32];
  s = warp_sum_d(s);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < kSumThreads / 32; ++w) t += warp_part[w];
    partial[blockIdx.x] = t;
  }
}

// One block: thread t sums partial[t], partial[t+1024], ... in order; then the fixed tree.
__global__ void __launch_bounds__(1024) final_sum_kernel(double* out, const double* partial, int64_t parts) {
  double s = 0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) s += partial[i];
  __shared__ double warp_part[32];
  s = warp_sum_d(s);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) t += warp_part[w];
    *out = t;
  }
}

template <bool SQUARE>
void sum_impl(double* out, const float* x, int64_t n) {
  if (n <= 0) {
    DMAT_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream()));
    return;
  }
  const int64_t chunks = ceil_div(n, kSumChunk);
  double* partial = static_cast<double*>(workspace(size_t(chunks) * sizeof(double)));
  DMAT_CHECK(chunks < (int64_t(1) << 31), "sum over {} elements needs too many chunks", n);
  if (aligned16(x))
    chunk_sum_kernel<SQUARE, true><<<unsigned(chunks), kSumThreads, 0, stream()>>>(partial, x, n);
  else
    chunk_sum_kernel<SQUARE, false><<<unsigned(chunks), kSumThreads, 0, stream()>>>(partial, x, n);
  DMAT_CUDA_LAUNCH_CHECK();
  final_sum_kernel<<<1, 1024, 0, stream()>>>(out, partial, chunks);
  DMAT_CUDA_LAUNCH_CHECK();
}

constexpr int kColTile = 32, kColLanes = 16, kColGroup = 64, kGroupLanes = 8;

// out[d] += Σ_p partial[p, d]: lane y sums parts y, y+16, ... in order, then lanes in order.
// Threads of a warp read 32 consecutive columns of one part (coalesced).
__global__ void __launch_bounds__(kColTile * kColLanes)
    column_sum_kernel(float* out, const float* partial, int64_t parts, int64_t D) {
  __shared__ float lane_sum[kColLanes][kColTile + 1];
  const int64_t d = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  float s = 0.f;
  if (d < D)
    for (int64_t p = threadIdx.y; p < parts; p += kColLanes) s += partial[p * D + d];
  lane_sum[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float t = 0.f;
    for (int y = 0; y < kColLanes; ++y) t += lane_sum[y][threadIdx.x];
    out[d] += t;
  }
}

// First level for many parts: block (column tile, g) sums parts [64g, 64g+64) into group[g, :].
__global__ void __launch_bounds__(kColTile * kGroupLanes)
    column_group_kernel(float* group, const float* partial, int64_t parts, int64_t D) {
  __shared__ float lane_sum[kGroupLanes][kColTile + 1];
  const int64_t d = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t p0 = int64_t(blockIdx.y) * kColGroup, p1 = min(parts, p0 + kColGroup);
  float s = 0.f;
  if (d < D)
    for (int64_t p = p0 + threadIdx.y; p < p1; p += kGroupLanes) s += partial[p * D + d];
  lane_sum[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float t = 0.f;
    for (int y = 0; y < kGroupLanes; ++y) t += lane_sum[y][threadIdx.x];
    group[int64_t(blockIdx.y) * D + d] = t;
  }
}

}  // namespace

void sum_squares_f32(double* out, const float* x, int64_t n) { sum_impl<true>(out, x, n); }
void sum_f32(double* out, const float* x, int64_t n) { sum_impl<false>(out, x, n); }

namespace detail {

int64_t column_sum_scratch(int64_t parts, int64_t D) {
  return parts > 2 * kColGroup ? ceil_div(parts, kColGroup) * D : 0;
}

void column_sum_accumulate(float* out, const float* partial, int64_t parts, int64_t D, float* scratch) {
  if (D <= 0 || parts <= 0) return;
  const unsigned tiles = unsigned(ceil_div(D, kColTile));
  if (parts > 2 * kColGroup) {
    const int64_t groups = ceil_div(parts, kColGroup);
    DMAT_CHECK(groups < 65536, "column_sum_accumulate: {} parts is too many", parts);
    column_group_kernel<<<dim3(tiles, unsigned(groups)), dim3(kColTile, kGroupLanes), 0, stream()>>>(
        scratch, partial, parts, D);
    DMAT_CUDA_LAUNCH_CHECK();
    partial = scratch;
    parts = groups;
  }
  column_sum_kernel<<<tiles, dim3(kColTile, kColLanes), 0, stream()>>>(out, partial, parts, D);
  DMAT_CUDA_LAUNCH_CHECK();
}

int64_t reduction_parts(int64_t rows, int64_t D, int64_t threads_per_part) {
  constexpr int64_t kThreads = 270336;  // 132 SMs x 2048 threads: a full H200
  const int64_t by_threads = ceil_div(kThreads, std::max<int64_t>(threads_per_part, 1));
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(32) << 20) / (4 * std::max<int64_t>(D, 1)));
  return std::max<int64_t>(1, std::min({rows, by_threads, by_memory}));
}

}  // namespace detail
}  // namespace dmat::cuda
