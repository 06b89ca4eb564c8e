// Rotary position embedding (rotate-half) on [B,T,H,Dh] bf16. The cos/sin table [T, Dh/2] is
// computed on the host in double exactly as cpu::rope_* does (angle = t · theta^(−2i/Dh), rounded
// once to float), uploaded once and cached by (T, Dh, theta): GPU and CPU rotate by the same
// floats. Backward rotates by −angle (sin negated; negation is exact).
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

// Device table: cos at [0, T·half), sin at [T·half, 2·T·half). Lives for the process.
const float* rope_table(int64_t T, int64_t Dh, double theta) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, double>, float*>* cache =
      new std::map<std::tuple<int64_t, int64_t, double>, float*>();
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(T, Dh, theta);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  const int64_t half = Dh / 2;
  std::vector<float> h(size_t(2 * T * half));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double f = std::pow(theta, -2.0 * double(i) / double(Dh));
      const double a = double(t) * f;
      h[size_t(t * half + i)] = float(std::cos(a));
      h[size_t(T * half + t * half + i)] = float(std::sin(a));
    }
  auto* d = static_cast<float*>(device_alloc(h.size() * sizeof(float)));
  memcpy_h2d(d, h.data(), h.size() * sizeof(float));
  cache->emplace(key, d);
  return d;
}

// Rotates the pairs (x[i + e], x[i + e + half]), e < W (8 on the vector path, else 1), of the head
// row at src into dst by sign · the angles of position t: the arithmetic every RoPE kernel shares.
template <bool VEC>
__device__ __forceinline__ void rotate_pairs(nv_bf16* dst, const nv_bf16* src, const float* table, int64_t T,
                                             int64_t t, int64_t half, int64_t i, float sign) {
  const float* cs = table + t * half + i;
  const float* sn = table + T * half + t * half + i;
  if constexpr (VEC) {
    float x1[8], x2[8], c[8], s[8];
    load8(src, x1);
    load8(src + half, x2);
    load8f(cs, c);
    load8f(sn, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float sk = sign * s[k];
      const float a = x1[k] * c[k] - x2[k] * sk;
      const float b = x2[k] * c[k] + x1[k] * sk;
      x1[k] = a;
      x2[k] = b;
    }
    store8(dst, x1);
    store8(dst + half, x2);
  } else {
    const float x1 = ld(src), x2 = ld(src + half), c = *cs, s = sign * *sn;
    st(dst, x1 * c - x2 * s);
    st(dst + half, x2 * c + x1 * s);
  }
}

// One thread per (row, group of 8 pairs) on the vector path; per pair on the scalar path.
template <bool VEC>
__global__ void __launch_bounds__(256)
    rope_kernel(nv_bf16* y, const nv_bf16* x, const float* table, int64_t rows, int64_t T, int64_t H, int64_t half,
                float sign) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t per_row = half / W;
  const int64_t total = rows * per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
    const int64_t row = id / per_row;  // row = (b·T + t)·H + h
    const int64_t i = (id - row * per_row) * W;
    const int64_t o = row * 2 * half + i;
    rotate_pairs<VEC>(y + o, x + o, table, T, (row / H) % T, half, i, sign);
  }
}

void rope(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta, float sign) {
  if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0) return;
  DMAT_CHECK(Dh % 2 == 0, "rope: head dim {} must be even", Dh);
  const int64_t half = Dh / 2, rows = B * T * H;
  const float* table = rope_table(T, Dh, theta);
  // The table's float rows are 16-byte aligned when half % 8 == 0 (cudaMalloc base).
  const bool vec = half % 8 == 0 && aligned16(y) && aligned16(x);
  const int64_t work = rows * (vec ? half / 8 : half);
  if (vec)
    rope_kernel<true><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, T, H, half, sign);
  else
    rope_kernel<false><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, T, H, half, sign);
  DMAT_CUDA_LAUNCH_CHECK();
}

// Packed q/k/v rows: token n's heads 0 .. H − 1 (q), H .. H + Hkv − 1 (k), then Hkv of v lie at
// packed + n·ld + head·Dh; q, k and v are [tokens, heads, Dh] tensors. TO_PACKED = false: rotate q
// and k heads (sign) out of `packed`, copy v heads; true: the same from q, k, v into `packed`.
// One thread per (token, head, group of 8 pairs) — v heads copy their pairs unrotated.
template <bool VEC, bool TO_PACKED>
__global__ void __launch_bounds__(256)
    rope_qkv_kernel(nv_bf16* packed, nv_bf16* q, nv_bf16* k, nv_bf16* v, const float* table, int64_t tokens,
                    int64_t T, int H, int Hkv, int64_t half, float sign) {
  constexpr int W = VEC ? 8 : 1;
  const int heads = H + 2 * Hkv;
  const int64_t per_row = half / W, total = tokens * heads * per_row, Dh = 2 * half, width = heads * Dh;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
    const int64_t row = id / per_row;
    const int64_t i = (id - row * per_row) * W;
    const int64_t token = row / heads;
    const int hh = int(row - token * heads);
    nv_bf16* pk = packed + token * width + hh * Dh + i;
    nv_bf16* sp = hh < H         ? q + (token * H + hh) * Dh + i
                  : hh < H + Hkv ? k + (token * Hkv + (hh - H)) * Dh + i
                                 : v + (token * Hkv + (hh - H - Hkv)) * Dh + i;
    const nv_bf16* src = TO_PACKED ? sp : pk;
    nv_bf16* dst = TO_PACKED ? pk : sp;
    if (hh >= H + Hkv) {  // v: a copy
      if constexpr (VEC) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        *reinterpret_cast<uint4*>(dst + half) = *reinterpret_cast<const uint4*>(src + half);
      } else {
        dst[0] = src[0];
        dst[half] = src[half];
      }
      continue;
    }
    rotate_pairs<VEC>(dst, src, table, T, token % T, half, i, sign);
  }
}

template <bool TO_PACKED>
void rope_qkv(bf16* packed, bf16* q, bf16* k, bf16* v, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Dh,
              double theta, float sign) {
  if (B <= 0 || T <= 0 || H <= 0 || Hkv <= 0 || Dh <= 0) return;
  DMAT_CHECK(Dh % 2 == 0, "rope: head dim {} must be even", Dh);
  const int64_t half = Dh / 2, tokens = B * T, rows = tokens * (H + 2 * Hkv);
  const float* table = rope_table(T, Dh, theta);
  // Every head's start is 16-byte aligned when Dh % 16 == 0 and the bases are.
  const bool vec = half % 8 == 0 && aligned16(packed) && aligned16(q) && aligned16(k) && aligned16(v);
  const int64_t work = rows * (vec ? half / 8 : half);
  auto go = [&](auto kernel) {
    kernel<<<grid_for(work, 256), 256, 0, stream()>>>(nv(packed), nv(q), nv(k), nv(v), table, tokens, T, int(H),
                                                      int(Hkv), half, sign);
  };
  if (vec) go(rope_qkv_kernel<true, TO_PACKED>);
  else go(rope_qkv_kernel<false, TO_PACKED>);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rope_forward(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(y, x, B, T, H, Dh, theta, 1.f);
}
void rope_backward(bf16* dx, const bf16* dy, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(dx, dy, B, T, H, Dh, theta, -1.f);
}
void rope_unpack_qkv(bf16* q, bf16* k, bf16* v, const bf16* qkv, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                     int64_t Dh, double theta) {
  rope_qkv<false>(const_cast<bf16*>(qkv), q, k, v, B, T, H, Hkv, Dh, theta, 1.f);  // qkv is only read
}
void rope_pack_qkv_backward(bf16* dqkv, const bf16* dq, const bf16* dk, const bf16* dv, int64_t B, int64_t T,
                            int64_t H, int64_t Hkv, int64_t Dh, double theta) {
  // dq, dk, dv are only read
  rope_qkv<true>(dqkv, const_cast<bf16*>(dq), const_cast<bf16*>(dk), const_cast<bf16*>(dv), B, T, H, Hkv, Dh, theta,
                 -1.f);
}

}  // namespace dmat::cuda
