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

// One thread per (row, group of 8 pairs) on the vector path; per pair on the scalar path. A row is
// one head of one token; token rows lie ldy / ldx elements apart in y / x.
template <bool VEC>
__global__ void __launch_bounds__(256)
    rope_kernel(nv_bf16* y, const nv_bf16* x, const float* table, int64_t rows, int64_t T, int64_t H, int64_t half,
                float sign, int64_t ldy, int64_t ldx) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t per_row = half / W;
  const int64_t total = rows * per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
    const int64_t row = id / per_row;  // row = (b·T + t)·H + h
    const int64_t i = (id - row * per_row) * W;
    const int64_t token = row / H, h = row - token * H;
    const int64_t t = token % T;
    const float* cs = table + t * half + i;
    const float* sn = table + T * half + t * half + i;
    const int64_t o = token * ldx + h * 2 * half + i, oy = token * ldy + h * 2 * half + i;
    if constexpr (VEC) {
      float x1[8], x2[8], c[8], s[8];
      load8(x + o, x1);
      load8(x + o + half, x2);
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
      store8(y + oy, x1);
      store8(y + oy + half, x2);
    } else {
      const float x1 = ld(x + o), x2 = ld(x + o + half), c = *cs, s = sign * *sn;
      st(y + oy, x1 * c - x2 * s);
      st(y + oy + half, x2 * c + x1 * s);
    }
  }
}

void rope(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta, float sign, int64_t ldy,
          int64_t ldx) {
  if (B <= 0 || T <= 0 || H <= 0 || Dh <= 0) return;
  DMAT_CHECK(Dh % 2 == 0, "rope: head dim {} must be even", Dh);
  const int64_t half = Dh / 2, rows = B * T * H;
  const float* table = rope_table(T, Dh, theta);
  // The table's float rows are 16-byte aligned when half % 8 == 0 (cudaMalloc base).
  const bool vec = half % 8 == 0 && ldy % 8 == 0 && ldx % 8 == 0 && aligned16(y) && aligned16(x);
  const int64_t work = rows * (vec ? half / 8 : half);
  if (vec)
    rope_kernel<true><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, T, H, half, sign, ldy, ldx);
  else
    rope_kernel<false><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, T, H, half, sign, ldy,
                                                                  ldx);
  DMAT_CUDA_LAUNCH_CHECK();
}

void copy_rows(bf16* y, int64_t ldy, const bf16* x, int64_t ldx, int64_t rows, int64_t width) {
  if (rows <= 0 || width <= 0) return;
  DMAT_CUDA_CHECK(cudaMemcpy2DAsync(y, size_t(ldy) * 2, x, size_t(ldx) * 2, size_t(width) * 2, size_t(rows),
                                    cudaMemcpyDeviceToDevice, stream()));
}

}  // namespace

void rope_forward(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(y, x, B, T, H, Dh, theta, 1.f, H * Dh, H * Dh);
}
void rope_backward(bf16* dx, const bf16* dy, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(dx, dy, B, T, H, Dh, theta, -1.f, H * Dh, H * Dh);
}
void rope_unpack_qkv(bf16* q, bf16* k, bf16* v, const bf16* qkv, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                     int64_t Dh, double theta) {
  const int64_t ld = (H + 2 * Hkv) * Dh;
  rope(q, qkv, B, T, H, Dh, theta, 1.f, H * Dh, ld);
  rope(k, qkv + H * Dh, B, T, Hkv, Dh, theta, 1.f, Hkv * Dh, ld);
  copy_rows(v, Hkv * Dh, qkv + (H + Hkv) * Dh, ld, B * T, Hkv * Dh);
}
void rope_pack_qkv_backward(bf16* dqkv, const bf16* dq, const bf16* dk, const bf16* dv, int64_t B, int64_t T,
                            int64_t H, int64_t Hkv, int64_t Dh, double theta) {
  const int64_t ld = (H + 2 * Hkv) * Dh;
  rope(dqkv, dq, B, T, H, Dh, theta, -1.f, ld, H * Dh);
  rope(dqkv + H * Dh, dk, B, T, Hkv, Dh, theta, -1.f, ld, Hkv * Dh);
  copy_rows(dqkv + (H + Hkv) * Dh, ld, dv, Hkv * Dh, B * T, Hkv * Dh);
}

}  // namespace dmat::cuda
