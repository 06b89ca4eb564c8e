// Elementwise kernels: fill, conversions, in-place add/scale, SwiGLU, residual (forward and dx).
// One grid-stride skeleton: each op is a functor with a 16-byte vector body (8 bf16 / 4 fp32) and
// a scalar body; the vector loop runs when every pointer is 16-byte aligned, the scalar loop takes
// the tail (or everything otherwise). Math in fp32, one rounding per bf16 output. Every element is
// read before it is written by the same thread, so exact aliasing of an output with an input is
// safe where the contract allows it.
#include <cmath>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

template <class Op>
__global__ void __launch_bounds__(256) ew_kernel(Op op, int64_t nvec, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) op.vec(v * Op::kVec);
  for (int64_t i = nvec * Op::kVec + tid; i < n; i += stride) op.one(i);
}

template <class Op>
void launch_ew(const Op& op, int64_t n, bool vec_ok) {
  if (n <= 0) return;
  const int64_t nvec = vec_ok ? n / Op::kVec : 0;
  const int64_t work = std::max(nvec, n - nvec * Op::kVec);
  ew_kernel<<<grid_for(work, 256), 256, 0, stream()>>>(op, nvec, n);
  DMAT_CUDA_LAUNCH_CHECK();
}

struct FillF32 {
  static constexpr int kVec = 4;
  float* x;
  float v;
  __device__ void vec(int64_t i) const { *reinterpret_cast<float4*>(x + i) = make_float4(v, v, v, v); }
  __device__ void one(int64_t i) const { x[i] = v; }
};
struct FillBf16 {
  static constexpr int kVec = 8;
  nv_bf16* x;
  float v;
  __device__ void vec(int64_t i) const {
    float f[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = v;
    store8(x + i, f);
  }
  __device__ void one(int64_t i) const { st(x + i, v); }
};
struct F32ToBf16 {
  static constexpr int kVec = 8;
  nv_bf16* d;
  const float* s;
  __device__ void vec(int64_t i) const {
    float f[8];
    load8f(s + i, f);
    store8(d + i, f);
  }
  __device__ void one(int64_t i) const { st(d + i, s[i]); }
};
struct Bf16ToF32 {
  static constexpr int kVec = 8;
  float* d;
  const nv_bf16* s;
  __device__ void vec(int64_t i) const {
    float f[8];
    load8(s + i, f);
    store8f(d + i, f);
  }
  __device__ void one(int64_t i) const { d[i] = ld(s + i); }
};
struct AddF32 {
  static constexpr int kVec = 4;
  float* y;
  const float* x;
  __device__ void vec(int64_t i) const {
    float4 a = *reinterpret_cast<const float4*>(y + i);
    const float4 b = *reinterpret_cast<const float4*>(x + i);
    a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w;
    *reinterpret_cast<float4*>(y + i) = a;
  }
  __device__ void one(int64_t i) const { y[i] += x[i]; }
};
struct AddBf16 {
  static constexpr int kVec = 8;
  nv_bf16* y;
  const nv_bf16* x;
  __device__ void vec(int64_t i) const {
    float a[8], b[8];
    load8(y + i, a);
    load8(x + i, b);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] += b[k];
    store8(y + i, a);
  }
  __device__ void one(int64_t i) const { st(y + i, ld(y + i) + ld(x + i)); }
};
struct ScaleF32 {
  static constexpr int kVec = 4;
  float* x;
  float s;
  __device__ void vec(int64_t i) const {
    float4 a = *reinterpret_cast<const float4*>(x + i);
    a.x *= s, a.y *= s, a.z *= s, a.w *= s;
    *reinterpret_cast<float4*>(x + i) = a;
  }
  __device__ void one(int64_t i) const { x[i] *= s; }
};
struct ScaleBf16 {
  static constexpr int kVec = 8;
  nv_bf16* x;
  float s;
  __device__ void vec(int64_t i) const {
    float a[8];
    load8(x + i, a);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] *= s;
    store8(x + i, a);
  }
  __device__ void one(int64_t i) const { st(x + i, ld(x + i) * s); }
};

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// SwiGLU over rows of F values: out / dout index i (row-major [rows, F]) reads g, u and writes dg, du
// at in(i) = row·ld + column (ld = F: the same index).
struct SwigluRows {
  int64_t F, stride;
  __device__ int64_t in(int64_t i) const {
    if (stride == F) return i;
    const int64_t r = i / F;
    return r * stride + (i - r * F);
  }
};
struct SwigluFwd : SwigluRows {
  static constexpr int kVec = 8;
  nv_bf16* out;
  const nv_bf16 *g, *u;
  __device__ void vec(int64_t i) const {
    const int64_t j = in(i);
    float a[8], b[8];
    load8(g + j, a);
    load8(u + j, b);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = a[k] * sigmoid(a[k]) * b[k];
    store8(out + i, a);
  }
  __device__ void one(int64_t i) const {
    const int64_t j = in(i);
    const float gi = ld(g + j);
    st(out + i, gi * sigmoid(gi) * ld(u + j));
  }
};
struct SwigluBwd : SwigluRows {
  static constexpr int kVec = 8;
  nv_bf16 *dg, *du;
  const nv_bf16 *dout, *g, *u;
  __device__ static void f(float di, float gi, float ui, float& dgi, float& dui) {
    const float sig = sigmoid(gi);
    dgi = di * ui * sig * (1.f + gi * (1.f - sig));
    dui = di * gi * sig;
  }
  __device__ void vec(int64_t i) const {
    const int64_t j = in(i);
    float a[8], b[8], d[8];
    load8(g + j, a);
    load8(u + j, b);
    load8(dout + i, d);
#pragma unroll
    for (int k = 0; k < 8; ++k) f(d[k], a[k], b[k], a[k], b[k]);
    store8(dg + j, a);
    store8(du + j, b);
  }
  __device__ void one(int64_t i) const {
    const int64_t j = in(i);
    float a, b;
    f(ld(dout + i), ld(g + j), ld(u + j), a, b);
    st(dg + j, a);
    st(du + j, b);
  }
};
struct ResidualFwd {
  static constexpr int kVec = 8;
  nv_bf16* out;
  const nv_bf16 *x, *r, *branch;
  int64_t D;
  __device__ void vec(int64_t i) const {
    float a[8], b[8];
    load8(x + i, a);
    load8(branch + i, b);
    if (r) {
      float s[8];
      load8(r + i % D, s);  // D % 8 == 0 on this path: the 8 columns are contiguous
#pragma unroll
      for (int k = 0; k < 8; ++k) a[k] = s[k] * a[k] + b[k];
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) a[k] = a[k] + b[k];
    }
    store8(out + i, a);
  }
  __device__ void one(int64_t i) const {
    const float s = r ? ld(r + i % D) : 1.f;
    st(out + i, s * ld(x + i) + ld(branch + i));
  }
};
struct ScaleRowsBf16 {  // dx = r ⊙ dout (per-channel r)
  static constexpr int kVec = 8;
  nv_bf16* dx;
  const nv_bf16 *dout, *r;
  int64_t D;
  __device__ void vec(int64_t i) const {
    float a[8], s[8];
    load8(dout + i, a);
    load8(r + i % D, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] *= s[k];
    store8(dx + i, a);
  }
  __device__ void one(int64_t i) const { st(dx + i, ld(r + i % D) * ld(dout + i)); }
};

bool al(const void* a, const void* b = nullptr, const void* c = nullptr, const void* d = nullptr,
        const void* e = nullptr) {
  return aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d) && aligned16(e);
}

}  // namespace

void fill_f32(float* x, int64_t n, float v) { launch_ew(FillF32{x, v}, n, al(x)); }
void fill_bf16(bf16* x, int64_t n, float v) { launch_ew(FillBf16{nv(x), v}, n, al(x)); }
void f32_to_bf16(bf16* dst, const float* src, int64_t n) { launch_ew(F32ToBf16{nv(dst), src}, n, al(dst, src)); }
void bf16_to_f32(float* dst, const bf16* src, int64_t n) { launch_ew(Bf16ToF32{dst, nv(src)}, n, al(dst, src)); }
void add_inplace_f32(float* y, const float* x, int64_t n) { launch_ew(AddF32{y, x}, n, al(y, x)); }
void add_inplace_bf16(bf16* y, const bf16* x, int64_t n) { launch_ew(AddBf16{nv(y), nv(x)}, n, al(y, x)); }
void scale_inplace_f32(float* x, int64_t n, float s) { launch_ew(ScaleF32{x, s}, n, al(x)); }
void scale_inplace_bf16(bf16* x, int64_t n, float s) { launch_ew(ScaleBf16{nv(x), s}, n, al(x)); }

void swiglu_forward(bf16* out, const bf16* g, const bf16* u, int64_t rows, int64_t F, int64_t ld) {
  SwigluFwd op{};
  op.F = F, op.stride = ld, op.out = nv(out), op.g = nv(g), op.u = nv(u);
  launch_ew(op, rows * F, (ld == F || (F % 8 == 0 && ld % 8 == 0)) && al(out, g, u));
}
void swiglu_backward(bf16* dg, bf16* du, const bf16* dout, const bf16* g, const bf16* u, int64_t rows, int64_t F,
                     int64_t ld) {
  SwigluBwd op{};
  op.F = F, op.stride = ld, op.dg = nv(dg), op.du = nv(du), op.dout = nv(dout), op.g = nv(g), op.u = nv(u);
  launch_ew(op, rows * F, (ld == F || (F % 8 == 0 && ld % 8 == 0)) && al(dg, du, dout, g, u));
}
void swiglu_forward(bf16* out, const bf16* g, const bf16* u, int64_t n) { swiglu_forward(out, g, u, 1, n, n); }
void swiglu_backward(bf16* dg, bf16* du, const bf16* dout, const bf16* g, const bf16* u, int64_t n) {
  swiglu_backward(dg, du, dout, g, u, 1, n, n);
}

void residual_forward(bf16* out, const bf16* x, const bf16* r, const bf16* branch, int64_t rows, int64_t D) {
  launch_ew(ResidualFwd{nv(out), nv(x), nv(r), nv(branch), D}, rows * D, D % 8 == 0 && al(out, x, r, branch));
}

namespace {

// dr partials: block (part, column tile) sums dout·x over its rows [r0, r1) in increasing row order
// into partial[part, :]; the same pass writes dx = r ⊙ dout when asked (read before written: dx may
// alias dout). VEC: each thread owns 8 contiguous columns.
template <bool VEC>
__global__ void __launch_bounds__(256) residual_bwd_kernel(float* partial, nv_bf16* dx, const nv_bf16* dout,
                                                           const nv_bf16* x, const nv_bf16* r, int64_t rows,
                                                           int64_t D, int64_t rows_per_part) {
  constexpr int W = VEC ? 8 : 1;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (c0 >= D) return;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_part, r1 = min(rows, r0 + rows_per_part);
  float acc[W], s[W];
#pragma unroll
  for (int k = 0; k < W; ++k) acc[k] = 0.f, s[k] = 1.f;
  if (r) {
    if constexpr (VEC) load8(r + c0, s);
    else s[0] = ld(r + c0);
  }
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * D + c0;
    float d[W], xv[W];
    if constexpr (VEC) {
      load8(dout + o, d);
      load8(x + o, xv);
    } else {
      d[0] = ld(dout + o);
      xv[0] = ld(x + o);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] += d[k] * xv[k];
    if (dx) {
#pragma unroll
      for (int k = 0; k < W; ++k) d[k] *= s[k];
      if constexpr (VEC) store8(dx + o, d);
      else st(dx + o, d[0]);
    }
  }
  float* p = partial + int64_t(blockIdx.x) * D + c0;
  if constexpr (VEC) store8f(p, acc);
  else p[0] = acc[0];
}

}  // namespace

void residual_backward(bf16* dx, float* dr, const bf16* dout, const bf16* x, const bf16* r, int64_t rows,
                       int64_t D) {
  if (rows <= 0 || D <= 0) return;
  if (!dr) {  // dx only: purely elementwise
    if (!dx) return;
    if (!r) {
      if (dx != dout) memcpy_d2d(dx, dout, size_t(rows * D) * sizeof(bf16));
      return;
    }
    launch_ew(ScaleRowsBf16{nv(dx), nv(dout), nv(r), D}, rows * D, D % 8 == 0 && al(dx, dout, r));
    return;
  }
  // Without r, dx is a copy: do it first (a no-op when dx == dout), then only reduce.
  nv_bf16* dxk = nv(dx);
  if (!r) {
    if (dx && dx != dout) memcpy_d2d(dx, dout, size_t(rows * D) * sizeof(bf16));
    dxk = nullptr;
  }
  const bool vec = D % 8 == 0 && al(dx, dout, x, r);
  const int64_t cols = vec ? D / 8 : D;
  const int threads = int(std::min<int64_t>(256, ceil_div(cols, 32) * 32));
  const int64_t rpp = ceil_div(rows, reduction_parts(rows, D, cols));
  const int64_t parts = ceil_div(rows, rpp);
  float* partial =
      static_cast<float*>(workspace(size_t(parts * D + column_sum_scratch(parts, D)) * sizeof(float)));
  const dim3 grid(unsigned(parts), unsigned(ceil_div(cols, threads)));
  if (vec)
    residual_bwd_kernel<true><<<grid, threads, 0, stream()>>>(partial, dxk, nv(dout), nv(x), nv(r), rows, D, rpp);
  else
    residual_bwd_kernel<false><<<grid, threads, 0, stream()>>>(partial, dxk, nv(dout), nv(x), nv(r), rows, D, rpp);
  DMAT_CUDA_LAUNCH_CHECK();
  column_sum_accumulate(dr, partial, parts, D, partial + parts * D);
}

}  // namespace dmat::cuda
