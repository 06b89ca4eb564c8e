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

// Rows (b, c, h) of [B, C, H, Dh] rotated at position c·stride + offset (NSA's compressed keys:
// block c at its last key, c·d + l − 1), through the table of those positions' range.
template <bool VEC>
__global__ void __launch_bounds__(256)
    rope_strided_kernel(nv_bf16* y, const nv_bf16* x, const float* table, int64_t rows, int64_t C, int64_t H,
                        int64_t half, int64_t table_T, int64_t stride, int64_t offset, float sign) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t per_row = half / W;
  const int64_t total = rows * per_row;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += step) {
    const int64_t row = id / per_row;  // row = (b·C + c)·H + h
    const int64_t i = (id - row * per_row) * W;
    const int64_t o = row * 2 * half + i;
    rotate_pairs<VEC>(y + o, x + o, table, table_T, ((row / H) % C) * stride + offset, half, i, sign);
  }
}

void rope_strided(bf16* y, const bf16* x, int64_t B, int64_t C, int64_t H, int64_t Dh, double theta, int64_t stride,
                  int64_t offset, float sign) {
  if (B <= 0 || C <= 0 || H <= 0 || Dh <= 0) return;
  DMAT_CHECK(Dh % 2 == 0 && stride > 0 && offset >= 0, "rope_strided: head dim {} stride {} offset {}", Dh, stride,
             offset);
  const int64_t half = Dh / 2, rows = B * C * H, table_T = (C - 1) * stride + offset + 1;
  const float* table = rope_table(table_T, Dh, theta);
  const bool vec = half % 8 == 0 && aligned16(y) && aligned16(x);
  const int64_t work = rows * (vec ? half / 8 : half);
  if (vec)
    rope_strided_kernel<true><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, C, H, half,
                                                                          table_T, stride, offset, sign);
  else
    rope_strided_kernel<false><<<grid_for(work, 256), 256, 0, stream()>>>(nv(y), nv(x), table, rows, C, H, half,
                                                                           table_T, stride, offset, sign);
  DMAT_CUDA_LAUNCH_CHECK();
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

// Copies W values (one 16-byte vector on the vector path).
template <bool VEC>
__device__ __forceinline__ void copy_w(nv_bf16* dst, const nv_bf16* src) {
  if constexpr (VEC) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  else *dst = *src;
}

// MLA's operands (cpu::rope_unpack_mla's layouts): one thread per (token, head, unit of W values);
// a (token, head) row has units for q's nope dims (copied, only when q is not qp itself), q's rotary
// pairs (rotated from qp), k's nope dims (from kv), k's rotary pairs (kr rotated: every head of a
// token rotates the same shared key) and v (from kv). TO_PACKED: the transpose, from dq, dk, dv
// into dqp and dkv (the rotary key's gradient is rope_mla_dkr_kernel's).
template <bool VEC, bool TO_PACKED>
__global__ void __launch_bounds__(256)
    rope_mla_kernel(nv_bf16* q, nv_bf16* k, nv_bf16* v, nv_bf16* qp, nv_bf16* kv, const nv_bf16* kr,
                    const float* table, int64_t tokens, int64_t T, int H, int nope, int half, int Dv, bool copy_q_nope,
                    float sign) {
  constexpr int W = VEC ? 8 : 1;
  const int uq = copy_q_nope ? nope / W : 0, ur = half / W, un = nope / W, uv = Dv / W;
  const int units = uq + ur + un + (TO_PACKED ? 0 : ur) + uv;
  const int64_t Dqk = nope + 2 * half, Dkv = nope + Dv, total = tokens * H * units;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
    const int64_t row = id / units;  // row = token·H + h
    int u = int(id - row * units);
    const int64_t token = row / H, t = token % T;
    nv_bf16* qr = q + row * Dqk;     // q's row (dq's with TO_PACKED)
    nv_bf16* pr = qp + row * Dqk;    // qp's row (dqp's)
    nv_bf16* kh = k + row * Dqk;     // k's row (dk's)
    nv_bf16* kvr = kv + row * Dkv;   // kv's row (dkv's)
    nv_bf16* vr = v + row * Dv;      // v's row (dv's)
    // the unpacked tensors are the destination in the forward, the source in the transpose
    auto copy = [&](nv_bf16* unpacked, nv_bf16* packed) {
      if constexpr (TO_PACKED) copy_w<VEC>(packed, unpacked);
      else copy_w<VEC>(unpacked, packed);
    };
    if (u < uq) {  // q's nope dims
      copy(qr + u * W, pr + u * W);
    } else if ((u -= uq) < ur) {  // q's rotary dims
      const int i = u * W;
      if constexpr (TO_PACKED) rotate_pairs<VEC>(pr + nope + i, qr + nope + i, table, T, t, half, i, sign);
      else rotate_pairs<VEC>(qr + nope + i, pr + nope + i, table, T, t, half, i, sign);
    } else if ((u -= ur) < un) {  // k's nope dims
      copy(kh + u * W, kvr + u * W);
    } else if ((u -= un) < (TO_PACKED ? 0 : ur)) {  // k's rotary dims (forward): the shared key, rotated
      if constexpr (!TO_PACKED) {
        const int i = u * W;
        rotate_pairs<VEC>(kh + nope + i, kr + token * 2 * half + i, table, T, t, half, i, sign);
      }
    } else {  // v
      u -= TO_PACKED ? 0 : ur;
      copy(vr + u * W, kvr + nope + u * W);
    }
  }
}

// dkr[token] = RoPEᵀ(Σ_h dk[token, h, nope:]): one thread per (token, group of W pairs), the heads
// summed in fp32 in increasing h, then rotated by −angle and rounded to bf16 once.
template <bool VEC>
__global__ void __launch_bounds__(256)
    rope_mla_dkr_kernel(nv_bf16* dkr, const nv_bf16* dk, const float* table, int64_t tokens, int64_t T, int H,
                        int nope, int half) {
  constexpr int W = VEC ? 8 : 1;
  const int per_token = half / W;
  const int64_t Dqk = nope + 2 * half, total = tokens * per_token;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
    const int64_t token = id / per_token, t = token % T;
    const int i = int(id - token * per_token) * W;
    float a1[W], a2[W];
#pragma unroll
    for (int e = 0; e < W; ++e) a1[e] = a2[e] = 0.f;
    for (int h = 0; h < H; ++h) {
      const nv_bf16* src = dk + (token * H + h) * Dqk + nope + i;
      if constexpr (VEC) {
        float x1[8], x2[8];
        load8(src, x1);
        load8(src + half, x2);
#pragma unroll
        for (int e = 0; e < 8; ++e) a1[e] += x1[e], a2[e] += x2[e];
      } else {
        a1[0] += ld(src);
        a2[0] += ld(src + half);
      }
    }
    const float* cs = table + t * half + i;
    const float* sn = table + T * half + t * half + i;
    float y1[W], y2[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float c = cs[e], s = -sn[e];
      y1[e] = a1[e] * c - a2[e] * s;
      y2[e] = a2[e] * c + a1[e] * s;
    }
    nv_bf16* dst = dkr + token * 2 * half + i;
    if constexpr (VEC) {
      store8(dst, y1);
      store8(dst + half, y2);
    } else {
      st(dst, y1[0]);
      st(dst + half, y2[0]);
    }
  }
}

template <bool TO_PACKED>
void rope_mla(bf16* q, bf16* k, bf16* v, bf16* qp, bf16* kv, const bf16* kr, int64_t B, int64_t T, int64_t H,
              int64_t nope, int64_t R, int64_t Dv, double theta) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  DMAT_CHECK(R > 0 && R % 2 == 0 && nope > 0 && Dv > 0, "rope (mla): nope {} rotary {} (even) v {}", nope, R, Dv);
  const int64_t half = R / 2, tokens = B * T;
  const float* table = rope_table(T, R, theta);
  const bool copy_q_nope = q != qp;
  // Every head's parts start on 16-byte boundaries when the dims are multiples of 8 and the bases
  // are aligned (the table's rows too, half % 8 == 0).
  const bool vec = half % 8 == 0 && nope % 8 == 0 && Dv % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                   aligned16(qp) && aligned16(kv) && (TO_PACKED || aligned16(kr));
  const int64_t W = vec ? 8 : 1;
  const int64_t units =
      ((copy_q_nope ? nope : 0) + half + nope + (TO_PACKED ? 0 : half) + Dv) / W;
  const int64_t work = tokens * H * units;
  const float sign = TO_PACKED ? -1.f : 1.f;
  auto go = [&](auto kernel) {
    kernel<<<grid_for(work, 256), 256, 0, stream()>>>(nv(q), nv(k), nv(v), nv(qp), nv(kv), nv(kr), table, tokens, T,
                                                      int(H), int(nope), int(half), int(Dv), copy_q_nope, sign);
  };
  if (vec) go(rope_mla_kernel<true, TO_PACKED>);
  else go(rope_mla_kernel<false, TO_PACKED>);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rope_forward(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(y, x, B, T, H, Dh, theta, 1.f);
}
void rope_backward(bf16* dx, const bf16* dy, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta) {
  rope(dx, dy, B, T, H, Dh, theta, -1.f);
}
void rope_strided_forward(bf16* y, const bf16* x, int64_t B, int64_t C, int64_t H, int64_t Dh, double theta,
                          int64_t stride, int64_t offset) {
  rope_strided(y, x, B, C, H, Dh, theta, stride, offset, 1.f);
}
void rope_strided_backward(bf16* dx, const bf16* dy, int64_t B, int64_t C, int64_t H, int64_t Dh, double theta,
                           int64_t stride, int64_t offset) {
  rope_strided(dx, dy, B, C, H, Dh, theta, stride, offset, -1.f);
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

void rope_unpack_mla(bf16* q, bf16* k, bf16* v, const bf16* qp, const bf16* kv, const bf16* kr, int64_t B, int64_t T,
                     int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta) {
  // qp, kv, kr are only read
  rope_mla<false>(q, k, v, const_cast<bf16*>(qp), const_cast<bf16*>(kv), kr, B, T, H, nope, R, Dv, theta);
}

void rope_pack_mla_backward(bf16* dqp, bf16* dkv, bf16* dkr, const bf16* dq, const bf16* dk, const bf16* dv,
                            int64_t B, int64_t T, int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta) {
  // dq, dk, dv are only read (dqp may be dq itself: each element is read, then written, by one thread)
  rope_mla<true>(const_cast<bf16*>(dq), const_cast<bf16*>(dk), const_cast<bf16*>(dv), dqp, dkv, nullptr, B, T, H, nope,
                 R, Dv, theta);
  if (B <= 0 || T <= 0 || H <= 0) return;
  const int64_t half = R / 2, tokens = B * T;
  const float* table = rope_table(T, R, theta);
  const bool vec = half % 8 == 0 && nope % 8 == 0 && aligned16(dkr) && aligned16(dk);
  const int64_t work = tokens * (vec ? half / 8 : half);
  if (vec)
    rope_mla_dkr_kernel<true><<<grid_for(work, 256), 256, 0, stream()>>>(nv(dkr), nv(dk), table, tokens, T, int(H),
                                                                        int(nope), int(half));
  else
    rope_mla_dkr_kernel<false><<<grid_for(work, 256), 256, 0, stream()>>>(nv(dkr), nv(dk), table, tokens, T, int(H),
                                                                         int(nope), int(half));
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda
