// Token embedding: gather (forward) and a deterministic scatter-add (backward).
//
// Backward without float atomics: (token, position) pairs are sorted by token with a stable radix
// sort (CUB), so each table row's contributions form one contiguous run, in increasing position.
// The sorted array is cut into fixed chunks of kChunk positions. Pass 1 (a block per chunk and
// column tile) sums each run inside its chunk in order: a run that is a whole segment (all the
// occurrences of its token) is added to dtable directly; the pieces of a segment that spans chunks
// go to per-chunk partial slots (head: the run the chunk starts with; tail: the run it ends with).
// Pass 2 lets the chunk where such a segment starts add its tail and the following chunks' heads
// in order. The summation order depends only on the tokens: bitwise reproducible; and a frequent
// token costs no more than any other chunk in pass 1 (the serial part is one add per 32 tokens).
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

constexpr int64_t kChunk = 32;

// A warp per row: out[i, :] = table[tokens[i], :].
template <bool VEC>
__global__ void __launch_bounds__(256)
    emb_fwd_kernel(nv_bf16* out, const nv_bf16* table, const int32_t* tokens, int64_t n, int64_t D) {
  const int64_t i = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (i >= n) return;
  const int lane = threadIdx.x & 31;
  const nv_bf16* src = table + int64_t(tokens[i]) * D;
  nv_bf16* dst = out + i * D;
  if constexpr (VEC) {
    for (int64_t c = int64_t(lane) * 8; c < D; c += 256)
      *reinterpret_cast<uint4*>(dst + c) = *reinterpret_cast<const uint4*>(src + c);
  } else {
    for (int64_t c = lane; c < D; c += 32) dst[c] = src[c];
  }
}

__global__ void iota_kernel(int32_t* v, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) v[i] = int32_t(i);
}

template <int W>
__device__ __forceinline__ void add_row(float (&acc)[W], const nv_bf16* p) {
  if constexpr (W == 8) {
    float f[8];
    load8(p, f);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] += f[k];
  } else {
    acc[0] += ld(p);
  }
}
template <int W>
__device__ __forceinline__ void add_to(float* dst, const float (&acc)[W]) {
  if constexpr (W == 8) {
    float f[8];
    load8f(dst, f);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] += acc[k];
    store8f(dst, f);
  } else {
    dst[0] += acc[0];
  }
}
template <int W>
__device__ __forceinline__ void put(float* dst, const float (&acc)[W]) {
  if constexpr (W == 8) store8f(dst, acc);
  else dst[0] = acc[0];
}

// Pass 1: block (chunk, column tile); partial[chunk, 0 | 1, :] = head | tail run sums.
template <bool VEC>
__global__ void __launch_bounds__(256)
    emb_chunk_kernel(float* dtable, float* partial, const nv_bf16* dout, const uint32_t* keys, const int32_t* pos,
                     int64_t n, int64_t D) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (c0 >= D) return;
  const int64_t chunk = blockIdx.x;
  const int64_t p0 = chunk * kChunk, p1 = min(n, p0 + kChunk);
  const bool head_continues = p0 > 0 && keys[p0 - 1] == keys[p0];
  const bool tail_continues = p1 < n && keys[p1] == keys[p1 - 1];
  float acc[W];
#pragma unroll
  for (int k = 0; k < W; ++k) acc[k] = 0.f;
  int64_t run_start = p0;
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t key = keys[p];
    add_row<W>(acc, dout + int64_t(pos[p]) * D + c0);
    if (p + 1 < p1 && keys[p + 1] == key) continue;
    // A run [run_start, p] ends here.
    const bool is_head = run_start == p0 && head_continues;
    const bool is_tail = p + 1 == p1 && tail_continues;
    if (is_head) put<W>(partial + (chunk * 2 + 0) * D + c0, acc);
    else if (is_tail) put<W>(partial + (chunk * 2 + 1) * D + c0, acc);
    else add_to<W>(dtable + int64_t(key) * D + c0, acc);
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] = 0.f;
    run_start = p + 1;
  }
}

// Pass 2: the chunk where a chunk-spanning segment starts sums its pieces in order.
template <bool VEC>
__global__ void __launch_bounds__(256)
    emb_span_kernel(float* dtable, const float* partial, const uint32_t* keys, int64_t n, int64_t D) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (c0 >= D) return;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  int64_t chunk = blockIdx.x;
  int64_t p0 = chunk * kChunk, p1 = min(n, p0 + kChunk);
  const uint32_t key = keys[p1 - 1];
  const bool tail_continues = p1 < n && keys[p1] == key;
  const bool head_is_whole = p0 > 0 && keys[p0 - 1] == keys[p0] && keys[p0] == key;
  if (!tail_continues || head_is_whole) return;  // not where a spanning segment starts
  float acc[W];
  if constexpr (VEC) load8f(partial + (chunk * 2 + 1) * D + c0, acc);
  else acc[0] = partial[(chunk * 2 + 1) * D + c0];
  for (++chunk; chunk < nchunks; ++chunk) {
    p0 = chunk * kChunk, p1 = min(n, p0 + kChunk);
    const float* h = partial + (chunk * 2 + 0) * D + c0;
    if constexpr (VEC) {
      float f[8];
      load8f(h, f);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += f[k];
    } else {
      acc[0] += h[0];
    }
    // Continue only while the segment covers this whole chunk and goes on past it.
    if (keys[p1 - 1] != key || !(p1 < n && keys[p1] == key)) break;
  }
  add_to<W>(dtable + int64_t(key) * D + c0, acc);
}

int bits_for(int64_t v) {  // bits to represent values < v
  int b = 1;
  while (b < 32 && (int64_t(1) << b) < v) ++b;
  return b;
}

}  // namespace

void embedding_forward(bf16* out, const bf16* table, const int32_t* tokens, int64_t n, int64_t D) {
  if (n <= 0 || D <= 0) return;
  DMAT_CHECK(ceil_div(n, 8) < (int64_t(1) << 31), "embedding_forward: n = {} too large", n);
  const unsigned blocks = unsigned(ceil_div(n, 8));
  if (D % 8 == 0 && aligned16(out) && aligned16(table))
    emb_fwd_kernel<true><<<blocks, 256, 0, stream()>>>(nv(out), nv(table), tokens, n, D);
  else
    emb_fwd_kernel<false><<<blocks, 256, 0, stream()>>>(nv(out), nv(table), tokens, n, D);
  DMAT_CUDA_LAUNCH_CHECK();
}

void embedding_backward(float* dtable, const bf16* dout, const int32_t* tokens, int64_t n, int64_t D, int64_t V) {
  if (n <= 0 || D <= 0) return;
  DMAT_CHECK(n < (int64_t(1) << 31) && V > 0 && V <= (int64_t(1) << 31), "embedding_backward: n = {}, V = {}", n,
             V);
  const int end_bit = bits_for(V);
  // Workspace: sorted keys | positions in | positions sorted | CUB temp | partials (2 per chunk).
  size_t cub_bytes = 0;
  DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint32_t*>(nullptr),
                                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), int(n), 0, end_bit, stream()));
  const int64_t nchunks = ceil_div(n, kChunk);
  auto round = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t keys_b = round(size_t(n) * 4), cub_b = round(cub_bytes);
  const size_t partial_b = size_t(nchunks) * 2 * size_t(D) * sizeof(float);
  char* ws = static_cast<char*>(workspace(3 * keys_b + cub_b + partial_b));
  auto* keys = reinterpret_cast<uint32_t*>(ws);
  auto* pos_in = reinterpret_cast<int32_t*>(ws + keys_b);
  auto* pos = reinterpret_cast<int32_t*>(ws + 2 * keys_b);
  void* cub_tmp = ws + 3 * keys_b;
  auto* partial = reinterpret_cast<float*>(ws + 3 * keys_b + cub_b);

  iota_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, stream()>>>(pos_in, n);
  DMAT_CUDA_LAUNCH_CHECK();
  // Tokens are in [0, V) (checked by the caller), so their int32 bits sort as uint32.
  DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(cub_tmp, cub_bytes, reinterpret_cast<const uint32_t*>(tokens),
                                                  keys, pos_in, pos, int(n), 0, end_bit, stream()));

  const bool vec = D % 8 == 0 && aligned16(dtable) && aligned16(dout);
  const int64_t cols = vec ? D / 8 : D;
  const int threads = int(std::min<int64_t>(256, ceil_div(cols, 32) * 32));
  const dim3 grid(unsigned(nchunks), unsigned(ceil_div(cols, threads)));
  if (vec) {
    emb_chunk_kernel<true><<<grid, threads, 0, stream()>>>(dtable, partial, nv(dout), keys, pos, n, D);
    DMAT_CUDA_LAUNCH_CHECK();
    emb_span_kernel<true><<<grid, threads, 0, stream()>>>(dtable, partial, keys, n, D);
  } else {
    emb_chunk_kernel<false><<<grid, threads, 0, stream()>>>(dtable, partial, nv(dout), keys, pos, n, D);
    DMAT_CUDA_LAUNCH_CHECK();
    emb_span_kernel<false><<<grid, threads, 0, stream()>>>(dtable, partial, keys, n, D);
  }
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda
