#include "ops/ops.h"

#ifdef DMAT_WITH_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/dma.h"
#include "kernels/cuda/flash_attention.h"
#include "kernels/cuda/head_dims.h"
#include "kernels/cuda/nsa.h"
#include "kernels/cuda/profile.h"
#endif

namespace dmat::ops {
namespace {

// CUDA tensors: true when the op should take its CUDA path (which each op writes out beside the
// CPU one); a build without CUDA refuses them here.
bool on_cuda(const char* op, const Tensor& t) {
  if (t.device != Device::CUDA) return false;
#ifndef DMAT_WITH_CUDA
  fail("op {}: a CUDA tensor in a build without the CUDA backend (configure with -DDMAT_CUDA=ON)", op);
#endif
  return true;
}

#ifdef DMAT_WITH_CUDA
// Typed device pointers with the precision the CUDA backend expects (cuda_ops.h): activations and
// weights bf16, parameter gradients and statistics fp32. Undefined tensors give nullptr.
bf16* bf(const Tensor& t, const char* op) {
  if (!t.defined()) return nullptr;
  DMAT_CHECK(t.device == Device::CUDA && t.dtype == DType::BF16, "op {}: expected a bf16 CUDA tensor, got {} on {}",
             op, dtype_name(t.dtype), device_name(t.device));
  return static_cast<bf16*>(t.data);
}
float* f32(const Tensor& t, const char* op) {
  if (!t.defined()) return nullptr;
  DMAT_CHECK(t.device == Device::CUDA && t.dtype == DType::F32, "op {}: expected an fp32 CUDA tensor, got {} on {}",
             op, dtype_name(t.dtype), device_name(t.device));
  return static_cast<float*>(t.data);
}
#endif

// Calls f(T{}) with T the tensor's float type (CPU reference kernels).
template <class F>
void dispatch(const char* op, const Tensor& t, F&& f) {
  if (t.device != Device::CPU) fail("op {}: no CUDA implementation", op);
  switch (t.dtype) {
    case DType::F32: f(float{}); return;
    case DType::F64: f(double{}); return;
    default: fail("op {}: unsupported dtype {} on cpu (f32 or f64)", op, dtype_name(t.dtype));
  }
}

void same_type(const char* op, const Tensor& a, const Tensor& b) {
  if (!b.defined()) return;
  DMAT_CHECK(a.dtype == b.dtype && a.device == b.device, "op {}: mixed dtypes/devices ({} vs {})", op,
             dtype_name(a.dtype), dtype_name(b.dtype));
}

int64_t last_dim(const Tensor& t) { return t.shape[t.shape.n - 1]; }
int64_t rows_of(const Tensor& t) { return t.numel() / last_dim(t); }

template <class T> T* p(const Tensor& t) { return t.defined() ? t.as<T>() : nullptr; }

}  // namespace

void set_kernel_options(const KernelOptions& o) {
#ifdef DMAT_WITH_CUDA
  cuda::set_kernel_options(o);
#else
  (void)o;
#endif
}

void linear_forward(const Tensor& y, const Tensor& x, const Tensor& W) {
  const int64_t K = last_dim(x), M = rows_of(x), N = W.shape[0];
  DMAT_CHECK(W.shape.n == 2 && W.shape[1] == K && y.numel() == M * N,
             "linear: x {} W {} y {}", x.shape.str(), W.shape.str(), y.shape.str());
  same_type("linear", y, x);
  same_type("linear", y, W);
  if (on_cuda("linear", y)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("linear");
    cuda::gemm(bf(y, "linear"), false, bf(x, "linear"), bf(W, "linear"), M, N, K, false, true, 1.f, 0.f);
#endif
    return;
  }
  dispatch("linear", y, [&](auto t) {
    using T = decltype(t);
    cpu::gemm<T>(p<T>(y), p<T>(x), p<T>(W), M, N, K, false, true, T(1), T(0));
  });
}

void linear_backward(const Tensor& dx, const Tensor& dW, const Tensor& dy, const Tensor& x, const Tensor& W,
                     bool accumulate_dx) {
  const int64_t K = last_dim(x), M = rows_of(x), N = W.shape[0];
  DMAT_CHECK(W.shape.n == 2 && W.shape[1] == K && dy.numel() == M * N && dW.shape == W.shape,
             "linear_backward: x {} W {} dy {}", x.shape.str(), W.shape.str(), dy.shape.str());
  if (on_cuda("linear_backward", dy)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("linear_backward");
    if (dx.defined()) {
      DMAT_CHECK(dx.numel() == x.numel(), "linear_backward: dx {} x {}", dx.shape.str(), x.shape.str());
      cuda::gemm(bf(dx, "linear_backward"), false, bf(dy, "linear_backward"), bf(W, "linear_backward"), M, K, N, false,
                 false, 1.f, accumulate_dx ? 1.f : 0.f);
    }
    cuda::gemm(f32(dW, "linear_backward"), true, bf(dy, "linear_backward"), bf(x, "linear_backward"), N, K, M, true,
               false, 1.f, 1.f);
#endif
    return;
  }
  dispatch("linear_backward", dy, [&](auto t) {
    using T = decltype(t);
    if (dx.defined()) {
      DMAT_CHECK(dx.numel() == x.numel(), "linear_backward: dx {} x {}", dx.shape.str(), x.shape.str());
      cpu::gemm<T>(p<T>(dx), p<T>(dy), p<T>(W), M, K, N, false, false, T(1), accumulate_dx ? T(1) : T(0));
    }
    cpu::gemm<T>(p<T>(dW), p<T>(dy), p<T>(x), N, K, M, true, false, T(1), T(1));
  });
}

static void check_tokens(const char* op, const int32_t* tokens, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= V) fail("{}: input token {} at position {} is outside the vocabulary [0, {})", op, tokens[i], i, V);
}

void embedding_forward(const Tensor& out, const Tensor& table, const int32_t* tokens) {
  const int64_t D = table.shape[1];
  DMAT_CHECK(last_dim(out) == D, "embedding: out {} table {}", out.shape.str(), table.shape.str());
  if (on_cuda("embedding", out)) {  // tokens are on the device; the caller checked their range
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("embedding");
    cuda::embedding_forward(bf(out, "embedding"), bf(table, "embedding"), tokens, rows_of(out), D);
#endif
    return;
  }
  check_tokens("embedding", tokens, rows_of(out), table.shape[0]);
  dispatch("embedding", out, [&](auto t) {
    using T = decltype(t);
    cpu::embedding_forward<T>(p<T>(out), p<T>(table), tokens, rows_of(out), D);
  });
}

void embedding_backward(const Tensor& dtable, const Tensor& dout, const int32_t* tokens) {
  const int64_t D = dtable.shape[1];
  DMAT_CHECK(last_dim(dout) == D, "embedding_backward: dout {} table {}", dout.shape.str(), dtable.shape.str());
  if (on_cuda("embedding_backward", dout)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("embedding_backward");
    cuda::embedding_backward(f32(dtable, "embedding_backward"), bf(dout, "embedding_backward"), tokens, rows_of(dout),
                             D, dtable.shape[0]);
#endif
    return;
  }
  check_tokens("embedding_backward", tokens, rows_of(dout), dtable.shape[0]);
  dispatch("embedding_backward", dout, [&](auto t) {
    using T = decltype(t);
    cpu::embedding_backward<T>(p<T>(dtable), p<T>(dout), tokens, rows_of(dout), D);
  });
}

void rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, double eps) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(y.numel() == x.numel() && rstd.numel() == R && (!w.defined() || w.numel() == D),
             "rmsnorm: x {} y {} rstd {}", x.shape.str(), y.shape.str(), rstd.shape.str());
  if (on_cuda("rmsnorm", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rmsnorm");
    cuda::rmsnorm_forward(bf(y, "rmsnorm"), f32(rstd, "rmsnorm"), bf(x, "rmsnorm"), bf(w, "rmsnorm"), R, D, float(eps));
#endif
    return;
  }
  dispatch("rmsnorm", x, [&](auto t) {
    using T = decltype(t);
    cpu::rmsnorm_forward<T>(p<T>(y), p<T>(rstd), p<T>(x), p<T>(w), R, D, eps);
  });
}

void rmsnorm_backward(const Tensor& dx, const Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate_dx) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(dx.numel() == x.numel() && dy.numel() == x.numel() && rstd.numel() == R,
             "rmsnorm_backward: x {} dx {} dy {}", x.shape.str(), dx.shape.str(), dy.shape.str());
  if (on_cuda("rmsnorm_backward", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rmsnorm_backward");
    const char* o = "rmsnorm_backward";
    cuda::rmsnorm_backward(bf(dx, o), f32(dw, o), bf(dy, o), bf(x, o), bf(w, o), f32(rstd, o), R, D, accumulate_dx);
#endif
    return;
  }
  dispatch("rmsnorm_backward", x, [&](auto t) {
    using T = decltype(t);
    cpu::rmsnorm_backward<T>(p<T>(dx), p<T>(dw), p<T>(dy), p<T>(x), p<T>(w), p<T>(rstd), R, D, accumulate_dx);
  });
}

void rope_forward(const Tensor& y, const Tensor& x, double theta) {
  DMAT_CHECK(x.shape.n == 4 && y.shape == x.shape, "rope: x {} y {}", x.shape.str(), y.shape.str());
  if (on_cuda("rope", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope");
    cuda::rope_forward(bf(y, "rope"), bf(x, "rope"), x.shape[0], x.shape[1], x.shape[2], x.shape[3], theta);
#endif
    return;
  }
  dispatch("rope", x, [&](auto t) {
    using T = decltype(t);
    cpu::rope_forward<T>(p<T>(y), p<T>(x), x.shape[0], x.shape[1], x.shape[2], x.shape[3], theta);
  });
}

void rope_backward(const Tensor& dx, const Tensor& dy, double theta) {
  DMAT_CHECK(dy.shape.n == 4 && dx.shape == dy.shape, "rope_backward: dy {} dx {}", dy.shape.str(), dx.shape.str());
  if (on_cuda("rope_backward", dy)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope_backward");
    cuda::rope_backward(bf(dx, "rope_backward"), bf(dy, "rope_backward"), dy.shape[0], dy.shape[1], dy.shape[2],
                        dy.shape[3], theta);
#endif
    return;
  }
  dispatch("rope_backward", dy, [&](auto t) {
    using T = decltype(t);
    cpu::rope_backward<T>(p<T>(dx), p<T>(dy), dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3], theta);
  });
}

namespace {
// q [B,T,H,Dh], k and v [B,T,Hkv,Dh], qkv [B·T, (H + 2·Hkv)·Dh].
void check_packed_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qkv) {
  DMAT_CHECK(q.shape.n == 4 && k.shape.n == 4 && v.shape == k.shape && q.shape[0] == k.shape[0] &&
                 q.shape[1] == k.shape[1] && q.shape[3] == k.shape[3],
             "{}: q {} k {} v {} (expected [B,T,H,Dh] and two [B,T,Hkv,Dh])", op, q.shape.str(), k.shape.str(),
             v.shape.str());
  const int64_t N = q.shape[0] * q.shape[1], W = (q.shape[2] + 2 * k.shape[2]) * q.shape[3];
  DMAT_CHECK(rows_of(qkv) == N && last_dim(qkv) == W, "{}: packed q/k/v {} (expected [{}, {}])", op, qkv.shape.str(),
             N, W);
  same_type(op, q, qkv);
  same_type(op, k, qkv);
  same_type(op, v, qkv);
}
}  // namespace

void rope_unpack_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qkv, double theta) {
  check_packed_qkv("rope_unpack_qkv", q, k, v, qkv);
  const int64_t B = q.shape[0], T = q.shape[1], H = q.shape[2], Hkv = k.shape[2], Dh = q.shape[3];
  if (on_cuda("rope", qkv)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope");
    const char* o = "rope_unpack_qkv";
    cuda::rope_unpack_qkv(bf(q, o), bf(k, o), bf(v, o), bf(qkv, o), B, T, H, Hkv, Dh, theta);
#endif
    return;
  }
  dispatch("rope_unpack_qkv", qkv, [&](auto t) {
    using T_ = decltype(t);
    cpu::rope_unpack_qkv<T_>(p<T_>(q), p<T_>(k), p<T_>(v), p<T_>(qkv), B, T, H, Hkv, Dh, theta);
  });
}

void rope_pack_qkv_backward(const Tensor& dqkv, const Tensor& dq, const Tensor& dk, const Tensor& dv, double theta) {
  check_packed_qkv("rope_pack_qkv_backward", dq, dk, dv, dqkv);
  const int64_t B = dq.shape[0], T = dq.shape[1], H = dq.shape[2], Hkv = dk.shape[2], Dh = dq.shape[3];
  if (on_cuda("rope_backward", dqkv)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope_backward");
    const char* o = "rope_pack_qkv_backward";
    cuda::rope_pack_qkv_backward(bf(dqkv, o), bf(dq, o), bf(dk, o), bf(dv, o), B, T, H, Hkv, Dh, theta);
#endif
    return;
  }
  dispatch("rope_pack_qkv_backward", dqkv, [&](auto t) {
    using T_ = decltype(t);
    cpu::rope_pack_qkv_backward<T_>(p<T_>(dqkv), p<T_>(dq), p<T_>(dk), p<T_>(dv), B, T, H, Hkv, Dh, theta);
  });
}

namespace {
// q, k [B,T,H,Dqk], v [B,T,H,Dv], qp N·H·Dqk values, kv N·H·(nope + Dv), kr N·R (N = B·T, R = Dqk − nope).
void check_mla(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qp, const Tensor& kv,
               const Tensor& kr, int64_t nope) {
  DMAT_CHECK(q.shape.n == 4 && k.shape == q.shape && v.shape.n == 4 && v.shape[0] == q.shape[0] &&
                 v.shape[1] == q.shape[1] && v.shape[2] == q.shape[2] && nope > 0 && nope < q.shape[3] &&
                 (q.shape[3] - nope) % 2 == 0,
             "{}: q {} k {} v {} nope {} (expected q, k [B,T,H,nope + R], v [B,T,H,Dv], R even)", op, q.shape.str(),
             k.shape.str(), v.shape.str(), nope);
  const int64_t N = q.shape[0] * q.shape[1], H = q.shape[2], R = q.shape[3] - nope, Dv = v.shape[3];
  DMAT_CHECK(qp.numel() == q.numel() && kv.numel() == N * H * (nope + Dv) && kr.numel() == N * R,
             "{}: qp {} kv {} kr {} (expected {}, {} and {} values)", op, qp.shape.str(), kv.shape.str(),
             kr.shape.str(), q.numel(), N * H * (nope + Dv), N * R);
  for (const Tensor* t : {&k, &v, &qp, &kv, &kr}) same_type(op, q, *t);
}
}  // namespace

void rope_unpack_mla(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qp, const Tensor& kv,
                     const Tensor& kr, int64_t nope, double theta) {
  check_mla("rope_unpack_mla", q, k, v, qp, kv, kr, nope);
  const int64_t B = q.shape[0], T = q.shape[1], H = q.shape[2], R = q.shape[3] - nope, Dv = v.shape[3];
  if (on_cuda("rope", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope");
    const char* o = "rope_unpack_mla";
    cuda::rope_unpack_mla(bf(q, o), bf(k, o), bf(v, o), bf(qp, o), bf(kv, o), bf(kr, o), B, T, H, nope, R, Dv, theta);
#endif
    return;
  }
  dispatch("rope_unpack_mla", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::rope_unpack_mla<T_>(p<T_>(q), p<T_>(k), p<T_>(v), p<T_>(qp), p<T_>(kv), p<T_>(kr), B, T, H, nope, R, Dv,
                             theta);
  });
}

void rope_pack_mla_backward(const Tensor& dqp, const Tensor& dkv, const Tensor& dkr, const Tensor& dq,
                            const Tensor& dk, const Tensor& dv, int64_t nope, double theta) {
  check_mla("rope_pack_mla_backward", dq, dk, dv, dqp, dkv, dkr, nope);
  const int64_t B = dq.shape[0], T = dq.shape[1], H = dq.shape[2], R = dq.shape[3] - nope, Dv = dv.shape[3];
  if (on_cuda("rope_backward", dq)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope_backward");
    const char* o = "rope_pack_mla_backward";
    cuda::rope_pack_mla_backward(bf(dqp, o), bf(dkv, o), bf(dkr, o), bf(dq, o), bf(dk, o), bf(dv, o), B, T, H, nope,
                                 R, Dv, theta);
#endif
    return;
  }
  dispatch("rope_pack_mla_backward", dq, [&](auto t) {
    using T_ = decltype(t);
    cpu::rope_pack_mla_backward<T_>(p<T_>(dqp), p<T_>(dkv), p<T_>(dkr), p<T_>(dq), p<T_>(dk), p<T_>(dv), B, T, H,
                                    nope, R, Dv, theta);
  });
}

static void check_attn(const char* op, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                       const Tensor& v, const AttnShape& s) {
  DMAT_CHECK(s.H % s.Hkv == 0 && q.numel() == s.B * s.T * s.H * s.Dqk && k.numel() == s.B * s.T * s.Hkv * s.Dqk &&
                 v.numel() == s.B * s.T * s.Hkv * s.Dv && out.numel() == s.B * s.T * s.H * s.Dv &&
                 lse.numel() == s.B * s.H * s.T,
             "{}: shapes q {} k {} v {} out {} lse {}", op, q.shape.str(), k.shape.str(), v.shape.str(),
             out.shape.str(), lse.shape.str());
}

void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const AttnShape& s) {
  check_attn("attention", out, lse, q, k, v, s);
  if (on_cuda("attention", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("attention");
    if (!cuda::flash_attention_supported(s))
      fail("attention: head dims (qk {}, v {}) have no CUDA kernel (supported: {})", s.Dqk, s.Dv,
           cuda::head_dims_list(cuda::AttnKernel::flash));
    cuda::flash_attention_forward(bf(out, "attention"), f32(lse, "attention"), bf(q, "attention"), bf(k, "attention"),
                                  bf(v, "attention"), s);
#endif
    return;
  }
  dispatch("attention", q, [&](auto t) {
    using T = decltype(t);
    cpu::attention_forward<T>(p<T>(out), p<T>(lse), p<T>(q), p<T>(k), p<T>(v), s);
  });
}

void attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                        const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                        const Tensor& v, const AttnShape& s) {
  check_attn("attention_backward", out, lse, q, k, v, s);
  DMAT_CHECK(dq.numel() == q.numel() && dk.numel() == k.numel() && dv.numel() == v.numel() &&
                 dout.numel() == out.numel(),
             "attention_backward: gradient shapes");
  if (on_cuda("attention_backward", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("attention_backward");
    const char* o = "attention_backward";
    cuda::flash_attention_backward(bf(dq, o), bf(dk, o), bf(dv, o), bf(dout, o), bf(out, o), f32(lse, o), bf(q, o),
                                   bf(k, o), bf(v, o), s, s.deterministic);
#endif
    return;
  }
  dispatch("attention_backward", q, [&](auto t) {
    using T = decltype(t);
    cpu::attention_backward<T>(p<T>(dq), p<T>(dk), p<T>(dv), p<T>(dout), p<T>(out), p<T>(lse), p<T>(q), p<T>(k),
                               p<T>(v), s);
  });
}

void swiglu_forward(const Tensor& out, const Tensor& g, const Tensor& u) {
  DMAT_CHECK(out.numel() == g.numel() && u.numel() == g.numel(), "swiglu: shapes");
  if (on_cuda("swiglu", g)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("swiglu");
    cuda::swiglu_forward(bf(out, "swiglu"), bf(g, "swiglu"), bf(u, "swiglu"), g.numel());
#endif
    return;
  }
  dispatch("swiglu", g, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_forward<T>(p<T>(out), p<T>(g), p<T>(u), g.numel());
  });
}

void swiglu_backward(const Tensor& dg, const Tensor& du, const Tensor& dout, const Tensor& g, const Tensor& u) {
  DMAT_CHECK(dg.numel() == g.numel() && du.numel() == g.numel() && dout.numel() == g.numel(), "swiglu_backward: shapes");
  if (on_cuda("swiglu_backward", g)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("swiglu_backward");
    const char* o = "swiglu_backward";
    cuda::swiglu_backward(bf(dg, o), bf(du, o), bf(dout, o), bf(g, o), bf(u, o), g.numel());
#endif
    return;
  }
  dispatch("swiglu_backward", g, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_backward<T>(p<T>(dg), p<T>(du), p<T>(dout), p<T>(g), p<T>(u), g.numel());
  });
}

void swiglu_packed_forward(const Tensor& out, const Tensor& gu) {
  const int64_t F = last_dim(out), R = rows_of(out);
  DMAT_CHECK(last_dim(gu) == 2 * F && rows_of(gu) == R, "swiglu_packed: out {} needs gu [rows, {}], got {}",
             out.shape.str(), 2 * F, gu.shape.str());
  same_type("swiglu_packed", out, gu);
  if (on_cuda("swiglu", gu)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("swiglu");
    const bf16* g = bf(gu, "swiglu_packed");
    cuda::swiglu_forward(bf(out, "swiglu_packed"), g, g + F, R, F, 2 * F);
#endif
    return;
  }
  dispatch("swiglu_packed", gu, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_forward<T>(p<T>(out), p<T>(gu), p<T>(gu) + F, R, F, 2 * F);
  });
}

void swiglu_packed_backward(const Tensor& dgu, const Tensor& dout, const Tensor& gu) {
  const int64_t F = last_dim(dout), R = rows_of(dout);
  DMAT_CHECK(last_dim(gu) == 2 * F && rows_of(gu) == R && dgu.shape == gu.shape,
             "swiglu_packed_backward: dout {} needs gu and dgu [rows, {}], got {} and {}", dout.shape.str(), 2 * F,
             gu.shape.str(), dgu.shape.str());
  same_type("swiglu_packed_backward", dgu, gu);
  same_type("swiglu_packed_backward", dout, gu);
  if (on_cuda("swiglu_backward", gu)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("swiglu_backward");
    const char* o = "swiglu_packed_backward";
    bf16* d = bf(dgu, o);
    const bf16* g = bf(gu, o);
    cuda::swiglu_backward(d, d + F, bf(dout, o), g, g + F, R, F, 2 * F);
#endif
    return;
  }
  dispatch("swiglu_packed_backward", gu, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_backward<T>(p<T>(dgu), p<T>(dgu) + F, p<T>(dout), p<T>(gu), p<T>(gu) + F, R, F, 2 * F);
  });
}

void residual_forward(const Tensor& out, const Tensor& x, const Tensor& r, const Tensor& branch) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(out.numel() == x.numel() && branch.numel() == x.numel() && (!r.defined() || r.numel() == D),
             "residual: shapes");
  if (on_cuda("residual", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("residual");
    cuda::residual_forward(bf(out, "residual"), bf(x, "residual"), bf(r, "residual"), bf(branch, "residual"), R, D);
#endif
    return;
  }
  dispatch("residual", x, [&](auto t) {
    using T = decltype(t);
    cpu::residual_forward<T>(p<T>(out), p<T>(x), p<T>(r), p<T>(branch), R, D);
  });
}

void residual_rmsnorm_forward(const Tensor& out, const Tensor& y, const Tensor& rstd, const Tensor& x,
                              const Tensor& r, const Tensor& branch, const Tensor& w, double eps) {
  if (on_cuda("residual_rmsnorm", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("residual_rmsnorm");
    const int64_t D = last_dim(x), R = rows_of(x);
    const char* o = "residual_rmsnorm";
    DMAT_CHECK(out.numel() == x.numel() && branch.numel() == x.numel() && y.numel() == x.numel() &&
                   rstd.numel() == R && (!r.defined() || r.numel() == D) && (!w.defined() || w.numel() == D),
               "residual_rmsnorm: shapes");
    cuda::residual_rmsnorm_forward(bf(out, o), bf(y, o), f32(rstd, o), bf(x, o), bf(r, o), bf(branch, o), bf(w, o), R,
                                   D, float(eps));
#endif
    return;
  }
  residual_forward(out, x, r, branch);
  rmsnorm_forward(y, rstd, out, w, eps);
}

void residual_backward(const Tensor& dx, const Tensor& dr, const Tensor& dout, const Tensor& x, const Tensor& r) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(dx.numel() == x.numel() && dout.numel() == x.numel(), "residual_backward: shapes");
  if (on_cuda("residual_backward", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("residual_backward");
    const char* o = "residual_backward";
    cuda::residual_backward(bf(dx, o), f32(dr, o), bf(dout, o), bf(x, o), bf(r, o), R, D);
#endif
    return;
  }
  dispatch("residual_backward", x, [&](auto t) {
    using T = decltype(t);
    cpu::residual_backward<T>(p<T>(dx), p<T>(dr), p<T>(dout), p<T>(x), p<T>(r), R, D);
  });
}

void softmax_xent(const Tensor& loss, const Tensor& dlogits, const Tensor& logits, const int32_t* targets,
                  double grad_scale) {
  const int64_t V = last_dim(logits), R = rows_of(logits);
  DMAT_CHECK(loss.numel() == R && (!dlogits.defined() || dlogits.numel() == logits.numel()), "softmax_xent: shapes");
  if (on_cuda("softmax_xent", logits)) {  // targets on the device, range checked by the caller
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("softmax_xent");
    const char* o = "softmax_xent";
    cuda::softmax_xent(f32(loss, o), bf(dlogits, o), bf(logits, o), targets, R, V, float(grad_scale));
#endif
    return;
  }
  dispatch("softmax_xent", logits, [&](auto t) {
    using T = decltype(t);
    cpu::softmax_xent<T>(p<T>(loss), p<T>(dlogits), p<T>(logits), targets, R, V, T(grad_scale));
  });
}

void fill(const Tensor& x, double value) {
  if (on_cuda("fill", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("fill");
    if (x.dtype == DType::BF16) cuda::fill_bf16(bf(x, "fill"), x.numel(), float(value));
    else cuda::fill_f32(f32(x, "fill"), x.numel(), float(value));
#endif
    return;
  }
  dispatch("fill", x, [&](auto t) {
    using T = decltype(t);
    cpu::fill<T>(p<T>(x), x.numel(), T(value));
  });
}

void convert(const Tensor& dst, const Tensor& src) {
  DMAT_CHECK(dst.numel() == src.numel(), "convert: {} vs {}", dst.shape.str(), src.shape.str());
  if (dst.dtype == src.dtype) return copy(dst, src);
  if (on_cuda("convert", dst)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("convert");
    if (dst.dtype == DType::BF16 && src.dtype == DType::F32) cuda::f32_to_bf16(bf(dst, "convert"), f32(src, "convert"), dst.numel());
    else if (dst.dtype == DType::F32 && src.dtype == DType::BF16) cuda::bf16_to_f32(f32(dst, "convert"), bf(src, "convert"), dst.numel());
    else fail("convert: {} -> {} on cuda", dtype_name(src.dtype), dtype_name(dst.dtype));
#endif
    return;
  }
  fail("convert: {} -> {} on cpu", dtype_name(src.dtype), dtype_name(dst.dtype));
}

double sum(const Tensor& x) {
  double r = 0;
  if (on_cuda("sum", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("sum");
    double* d = static_cast<double*>(cuda::workspace2(sizeof(double)));
    cuda::sum_f32(d, f32(x, "sum"), x.numel());
    cuda::memcpy_d2h(&r, d, sizeof(double));
#endif
    return r;
  }
  dispatch("sum", x, [&](auto t) {
    using T = decltype(t);
    const T* p_ = p<T>(x);
    for (int64_t i = 0; i < x.numel(); ++i) r += double(p_[i]);
  });
  return r;
}

void copy(const Tensor& dst, const Tensor& src) {
  DMAT_CHECK(dst.numel() == src.numel() && dst.dtype == src.dtype, "copy: {} {} vs {} {}", dst.shape.str(),
             dtype_name(dst.dtype), src.shape.str(), dtype_name(src.dtype));
  if (dst.device == Device::CUDA || src.device == Device::CUDA) {
#ifdef DMAT_WITH_CUDA
    if (dst.device == Device::CUDA && src.device == Device::CUDA) cuda::memcpy_d2d(dst.data, src.data, dst.bytes());
    else if (dst.device == Device::CUDA) cuda::memcpy_h2d(dst.data, src.data, dst.bytes());
    else cuda::memcpy_d2h(dst.data, src.data, dst.bytes());
#else
    on_cuda("copy", dst.device == Device::CUDA ? dst : src);
#endif
    return;
  }
  dispatch("copy", dst, [&](auto t) {
    using T = decltype(t);
    cpu::copy<T>(p<T>(dst), p<T>(src), dst.numel());
  });
}

void add_inplace(const Tensor& y, const Tensor& x) {
  DMAT_CHECK(y.numel() == x.numel(), "add: {} vs {}", y.shape.str(), x.shape.str());
  if (on_cuda("add", y)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("add");
    same_type("add", y, x);
    if (y.dtype == DType::BF16) cuda::add_inplace_bf16(bf(y, "add"), bf(x, "add"), y.numel());
    else cuda::add_inplace_f32(f32(y, "add"), f32(x, "add"), y.numel());
#endif
    return;
  }
  dispatch("add", y, [&](auto t) {
    using T = decltype(t);
    cpu::add_inplace<T>(p<T>(y), p<T>(x), y.numel());
  });
}

void scale_inplace(const Tensor& x, double s) {
  if (on_cuda("scale", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("scale");
    cuda::scale_inplace_f32(f32(x, "scale"), x.numel(), float(s));
#endif
    return;
  }
  dispatch("scale", x, [&](auto t) {
    using T = decltype(t);
    cpu::scale_inplace<T>(p<T>(x), x.numel(), T(s));
  });
}

double sum_squares(const Tensor& x) {
  double r = 0;
  if (on_cuda("sum_squares", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("sum_squares");
    double* d = static_cast<double*>(cuda::workspace2(sizeof(double)));
    cuda::sum_squares_f32(d, f32(x, "sum_squares"), x.numel());
    cuda::memcpy_d2h(&r, d, sizeof(double));
#endif
    return r;
  }
  dispatch("sum_squares", x, [&](auto t) {
    using T = decltype(t);
    r = cpu::sum_squares<T>(p<T>(x), x.numel());
  });
  return r;
}

void adamw_step(const Tensor& p_, const Tensor& g, const Tensor& m, const Tensor& v, double lr, double beta1,
                double beta2, double eps, double weight_decay, double bc1, double bc2) {
  DMAT_CHECK(g.numel() == p_.numel() && m.numel() == p_.numel() && v.numel() == p_.numel(), "adamw: shapes");
  dispatch("adamw", p_, [&](auto t) {
    using T = decltype(t);
    cpu::adamw_step<T>(p<T>(p_), p<T>(g), p<T>(m), p<T>(v), p_.numel(), lr, beta1, beta2, eps, weight_decay, bc1, bc2);
  });
}

void adamw_step_segments(const Tensor& master, const Tensor& p_, const Tensor& g, const Tensor& m, const Tensor& v,
                         int64_t moments_lo, const std::vector<AdamSegment>& segs, double lr, double beta1,
                         double beta2, double eps, double bc1, double bc2, float grad_scale) {
  DMAT_CHECK(on_cuda("adamw", p_), "adamw: the segment update is the CUDA path");
  DMAT_CHECK(g.numel() == p_.numel() && master.numel() == p_.numel() && m.numel() == v.numel(), "adamw: shapes");
  for (const AdamSegment& s : segs)
    DMAT_CHECK(s.offset >= moments_lo && s.offset + s.n <= moments_lo + m.numel() && s.offset + s.n <= p_.numel(),
               "adamw: segment [{}, {}) outside the moments [{}, {})", s.offset, s.offset + s.n, moments_lo,
               moments_lo + m.numel());
#ifdef DMAT_WITH_CUDA
  static_assert(sizeof(AdamSegment) == sizeof(cuda::AdamSegment));
  if (segs.empty()) return;
  // The kernel indexes every array by arena offset; the moments' base is shifted back by moments_lo
  // (only offsets inside the segments are touched).
  float* mb = p<float>(m) - moments_lo;
  float* vb = p<float>(v) - moments_lo;
  cuda::ProfileScope prof_("adamw");
  cuda::adamw_step(p<float>(master), p<bf16>(p_), p<float>(g), mb, vb,
                   reinterpret_cast<const cuda::AdamSegment*>(segs.data()), int(segs.size()), float(lr),
                   float(beta1), float(beta2), float(eps), float(bc1), float(bc2), grad_scale);
#endif
}

// ---- Dynamic Mask Attention ----------------------------------------------------------------------

void dma_bias_forward(const Tensor& z, const Tensor& bias, const Tensor& v, const Tensor& w_dt, const Tensor& A,
                      DmaBiasForm form) {
  DMAT_CHECK(v.shape.n == 4, "dma_bias: v {}", v.shape.str());
  const int64_t B = v.shape[0], T = v.shape[1], Hkv = v.shape[2], Dh = v.shape[3];
  DMAT_CHECK(w_dt.shape.n == 2 && w_dt.shape[0] == Hkv && w_dt.shape[1] == Hkv * Dh && A.numel() == Hkv &&
                 z.numel() == B * Hkv * T && bias.numel() == B * Hkv * T,
             "dma_bias: v {} w_dt {} A {} z {} bias {}", v.shape.str(), w_dt.shape.str(), A.shape.str(),
             z.shape.str(), bias.shape.str());
  if (on_cuda("dma_bias", v)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("dma_bias");
    cuda::dma_bias_forward(f32(z, "dma_bias"), f32(bias, "dma_bias"), bf(v, "dma_bias"), bf(w_dt, "dma_bias"),
                           bf(A, "dma_bias"), B, T, Hkv, Dh, form);
#endif
    return;
  }
  dispatch("dma_bias", v, [&](auto t) {
    using T_ = decltype(t);
    cpu::dma_bias_forward<T_>(p<T_>(z), p<T_>(bias), p<T_>(v), p<T_>(w_dt), p<T_>(A), B, T, Hkv, Dh, form);
  });
}

void dma_bias_backward(const Tensor& dv, const Tensor& dw_dt, const Tensor& dA, const Tensor& dbias, const Tensor& z,
                       const Tensor& bias, const Tensor& v, const Tensor& w_dt, const Tensor& A, DmaBiasForm form) {
  DMAT_CHECK(v.shape.n == 4, "dma_bias_backward: v {}", v.shape.str());
  const int64_t B = v.shape[0], T = v.shape[1], Hkv = v.shape[2], Dh = v.shape[3];
  DMAT_CHECK(w_dt.shape.n == 2 && w_dt.shape[0] == Hkv && w_dt.shape[1] == Hkv * Dh && A.numel() == Hkv &&
                 z.numel() == B * Hkv * T && bias.numel() == B * Hkv * T && dbias.numel() == B * Hkv * T &&
                 dv.numel() == v.numel() && dw_dt.shape == w_dt.shape && dA.numel() == Hkv,
             "dma_bias_backward: v {} dv {} w_dt {} dw_dt {} A {} dA {} dbias {}", v.shape.str(), dv.shape.str(),
             w_dt.shape.str(), dw_dt.shape.str(), A.shape.str(), dA.shape.str(), dbias.shape.str());
  if (on_cuda("dma_bias_backward", v)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("dma_bias_backward");
    const char* op = "dma_bias_backward";
    cuda::dma_bias_backward(bf(dv, op), f32(dw_dt, op), f32(dA, op), f32(dbias, op), f32(z, op), f32(bias, op),
                            bf(v, op), bf(w_dt, op), bf(A, op), B, T, Hkv, Dh, form);
#endif
    return;
  }
  dispatch("dma_bias_backward", v, [&](auto t) {
    using T_ = decltype(t);
    cpu::dma_bias_backward<T_>(p<T_>(dv), p<T_>(dw_dt), p<T_>(dA), p<T_>(dbias), p<T_>(z), p<T_>(bias), p<T_>(v),
                               p<T_>(w_dt), p<T_>(A), B, T, Hkv, Dh, form);
  });
}

void dma_thresholds(const Tensor& thr, const Tensor& bias, int64_t window, int64_t local) {
  const int64_t T = last_dim(bias), rows = rows_of(bias);
  DMAT_CHECK(thr.numel() == bias.numel() && window > 0 && local >= 0,
             "dma_thresholds: bias {} thr {} window {} local {}", bias.shape.str(), thr.shape.str(), window, local);
  if (on_cuda("dma_thresholds", bias)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("dma_thresholds");
    cuda::dma_thresholds(f32(thr, "dma_thresholds"), f32(bias, "dma_thresholds"), rows, T, window, local);
#endif
    return;
  }
  dispatch("dma_thresholds", bias, [&](auto t) {
    using T_ = decltype(t);
    cpu::dma_thresholds<T_>(p<T_>(thr), p<T_>(bias), rows, T, window, local);
  });
}

static void check_dma(const char* op, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& bias, const Tensor& thr, const AttnShape& s, int64_t window) {
  check_attn(op, out, lse, q, k, v, s);
  DMAT_CHECK(s.window >= 0 && window > 0 && bias.numel() == s.B * s.Hkv * s.T && thr.numel() == s.B * s.Hkv * s.T,
             "{}: bias {} thr {} shape window {} window {} (w > 0 is the keys kept; the shape's window, the local "
             "window, >= 0)",
             op, bias.shape.str(), thr.shape.str(), s.window, window);
}

void dma_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& bias, const Tensor& thr, const AttnShape& s, int64_t window) {
  check_dma("dma_attention", out, lse, q, k, v, bias, thr, s, window);
  if (on_cuda("dma_attention", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("dma_attention");
    const char* op = "dma_attention";
    DMAT_CHECK(cuda::head_dims_supported(cuda::AttnKernel::dma, s.Dqk, s.Dv),
               "dma_attention: head dims ({}, {}) have no CUDA kernel (supported: {})", s.Dqk, s.Dv,
               cuda::head_dims_list(cuda::AttnKernel::dma));
    cuda::dma_attention_forward(bf(out, op), f32(lse, op), bf(q, op), bf(k, op), bf(v, op), f32(bias, op),
                                f32(thr, op), s, window);
#endif
    return;
  }
  dispatch("dma_attention", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::dma_attention_forward<T_>(p<T_>(out), p<T_>(lse), p<T_>(q), p<T_>(k), p<T_>(v), p<T_>(bias), p<T_>(thr), s);
  });
}

void dma_attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dbias,
                            const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q,
                            const Tensor& k, const Tensor& v, const Tensor& bias, const Tensor& thr,
                            const AttnShape& s, int64_t window) {
  check_dma("dma_attention_backward", out, lse, q, k, v, bias, thr, s, window);
  DMAT_CHECK(dq.numel() == q.numel() && dk.numel() == k.numel() && dv.numel() == v.numel() &&
                 dout.numel() == out.numel() && dbias.numel() == bias.numel(),
             "dma_attention_backward: gradient shapes");
  if (on_cuda("dma_attention_backward", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("dma_attention_backward");
    const char* op = "dma_attention_backward";
    cuda::dma_attention_backward(bf(dq, op), bf(dk, op), bf(dv, op), f32(dbias, op), bf(dout, op), bf(out, op),
                                 f32(lse, op), bf(q, op), bf(k, op), bf(v, op), f32(bias, op), f32(thr, op), s,
                                 window);
#endif
    return;
  }
  dispatch("dma_attention_backward", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::dma_attention_backward<T_>(p<T_>(dq), p<T_>(dk), p<T_>(dv), p<T_>(dbias), p<T_>(dout), p<T_>(out),
                                    p<T_>(lse), p<T_>(q), p<T_>(k), p<T_>(v), p<T_>(bias), p<T_>(thr), s);
  });
}

// ---- Native Sparse Attention ----------------------------------------------------------------------

namespace {

int64_t nsa_numel_t(const NsaShape& s, int64_t heads) { return s.B * s.T * heads * s.D; }
int64_t nsa_numel_c(const NsaShape& s) { return s.B * s.n_cmp() * s.Hkv * s.D; }

void check_nsa_attn(const char* op, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                    const Tensor& v, int64_t keys, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  DMAT_CHECK(q.numel() == nsa_numel_t(s, s.H) && out.numel() == q.numel() && lse.numel() == s.B * s.H * s.T &&
                 k.numel() == keys && v.numel() == keys,
             "{}: shapes q {} k {} v {} out {} lse {} (B {} T {} H {} Hkv {} D {}, {} key values)", op, q.shape.str(),
             k.shape.str(), v.shape.str(), out.shape.str(), lse.shape.str(), s.B, s.T, s.H, s.Hkv, s.D, keys);
  same_type(op, q, k);
  same_type(op, q, v);
  same_type(op, q, out);
}

void check_nsa_idx(const char* op, const Tensor& idx, const NsaShape& s) {
  DMAT_CHECK(idx.dtype == DType::I32 && idx.numel() == s.B * s.Hkv * s.T * s.sel_count,
             "{}: idx {} {} (expected int32 [B, Hkv, T, sel_count] = [{}, {}, {}, {}])", op, dtype_name(idx.dtype),
             idx.shape.str(), s.B, s.Hkv, s.T, s.sel_count);
}

void check_nsa_compress(const char* op, const Tensor& y, const Tensor& hid, const Tensor& x, const Tensor& pos,
                        const Tensor& w1, const Tensor& w2, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  const int64_t F = w1.shape.n == 2 ? w1.shape[0] : -1;
  DMAT_CHECK(F > 0 && w1.shape[1] == s.cmp_block * s.D && w2.numel() == s.D * F && pos.numel() == s.cmp_block * s.D &&
                 x.numel() == nsa_numel_t(s, s.Hkv) && y.numel() == nsa_numel_c(s) &&
                 hid.numel() == s.B * s.n_cmp() * s.Hkv * F,
             "{}: shapes x {} pos {} fc1 {} fc2 {} y {} hid {} (B {} T {} Hkv {} D {} l {} d {})", op, x.shape.str(),
             pos.shape.str(), w1.shape.str(), w2.shape.str(), y.shape.str(), hid.shape.str(), s.B, s.T, s.Hkv, s.D,
             s.cmp_block, s.cmp_stride);
  same_type(op, x, y);
  same_type(op, x, w1);
}

}  // namespace

void nsa_compress_forward(const Tensor& y, const Tensor& hid, const Tensor& x, const Tensor& pos, const Tensor& w1,
                          const Tensor& w2, const NsaShape& s) {
  check_nsa_compress("nsa_compress", y, hid, x, pos, w1, w2, s);
  if (on_cuda("nsa_compress", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_compress");
    const char* o = "nsa_compress";
    cuda::nsa_compress_forward(bf(y, o), bf(hid, o), bf(x, o), bf(pos, o), bf(w1, o), bf(w2, o), w1.shape[0], s);
#endif
    return;
  }
  dispatch("nsa_compress", x, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_compress_forward<T_>(p<T_>(y), p<T_>(hid), p<T_>(x), p<T_>(pos), p<T_>(w1), p<T_>(w2), w1.shape[0], s);
  });
}

void nsa_compress_backward(const Tensor& dx, const Tensor& dpos, const Tensor& dw1, const Tensor& dw2,
                           const Tensor& dy, const Tensor& hid, const Tensor& x, const Tensor& pos, const Tensor& w1,
                           const Tensor& w2, const NsaShape& s) {
  check_nsa_compress("nsa_compress_backward", dy, hid, x, pos, w1, w2, s);
  DMAT_CHECK(dx.numel() == x.numel() && dpos.numel() == pos.numel() && dw1.numel() == w1.numel() &&
                 dw2.numel() == w2.numel(),
             "nsa_compress_backward: gradient shapes");
  if (on_cuda("nsa_compress_backward", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_compress_backward");
    const char* o = "nsa_compress_backward";
    cuda::nsa_compress_backward(bf(dx, o), f32(dpos, o), f32(dw1, o), f32(dw2, o), bf(dy, o), bf(hid, o), bf(x, o),
                                bf(pos, o), bf(w1, o), bf(w2, o), w1.shape[0], s);
#endif
    return;
  }
  dispatch("nsa_compress_backward", x, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_compress_backward<T_>(p<T_>(dx), p<T_>(dpos), p<T_>(dw1), p<T_>(dw2), p<T_>(dy), p<T_>(hid), p<T_>(x),
                                   p<T_>(pos), p<T_>(w1), p<T_>(w2), w1.shape[0], s);
  });
}

void nsa_compressed_rope_forward(const Tensor& y, const Tensor& x, double theta, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  DMAT_CHECK(x.numel() == nsa_numel_c(s) && y.numel() == x.numel(), "nsa_compressed_rope: x {} y {}", x.shape.str(),
             y.shape.str());
  if (on_cuda("nsa_compressed_rope", x)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope");
    cuda::nsa_compressed_rope_forward(bf(y, "nsa_compressed_rope"), bf(x, "nsa_compressed_rope"), theta, s);
#endif
    return;
  }
  dispatch("nsa_compressed_rope", x, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_compressed_rope_forward<T_>(p<T_>(y), p<T_>(x), theta, s);
  });
}

void nsa_compressed_rope_backward(const Tensor& dx, const Tensor& dy, double theta, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  DMAT_CHECK(dy.numel() == nsa_numel_c(s) && dx.numel() == dy.numel(), "nsa_compressed_rope_backward: dx {} dy {}",
             dx.shape.str(), dy.shape.str());
  if (on_cuda("nsa_compressed_rope_backward", dy)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("rope_backward");
    const char* o = "nsa_compressed_rope_backward";
    cuda::nsa_compressed_rope_backward(bf(dx, o), bf(dy, o), theta, s);
#endif
    return;
  }
  dispatch("nsa_compressed_rope_backward", dy, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_compressed_rope_backward<T_>(p<T_>(dx), p<T_>(dy), theta, s);
  });
}

void nsa_cmp_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                               const Tensor& vc, const NsaShape& s) {
  check_nsa_attn("nsa_cmp_attention", out, lse, q, kc, vc, nsa_numel_c(s), s);
  if (on_cuda("nsa_cmp_attention", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_cmp_attention");
    const char* o = "nsa_cmp_attention";
    cuda::nsa_cmp_attention_forward(bf(out, o), f32(lse, o), bf(q, o), bf(kc, o), bf(vc, o), s);
#endif
    return;
  }
  dispatch("nsa_cmp_attention", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_cmp_attention_forward<T_>(p<T_>(out), p<T_>(lse), p<T_>(q), p<T_>(kc), p<T_>(vc), s);
  });
}

void nsa_cmp_attention_backward(const Tensor& dq, const Tensor& dkc, const Tensor& dvc, const Tensor& dout,
                                const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                                const Tensor& vc, const NsaShape& s) {
  check_nsa_attn("nsa_cmp_attention_backward", out, lse, q, kc, vc, nsa_numel_c(s), s);
  DMAT_CHECK(dq.numel() == q.numel() && dkc.numel() == kc.numel() && dvc.numel() == vc.numel() &&
                 dout.numel() == out.numel(),
             "nsa_cmp_attention_backward: gradient shapes");
  if (on_cuda("nsa_cmp_attention_backward", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_cmp_attention_backward");
    const char* o = "nsa_cmp_attention_backward";
    cuda::nsa_cmp_attention_backward(bf(dq, o), bf(dkc, o), bf(dvc, o), bf(dout, o), bf(out, o), f32(lse, o), bf(q, o),
                                     bf(kc, o), bf(vc, o), s);
#endif
    return;
  }
  dispatch("nsa_cmp_attention_backward", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_cmp_attention_backward<T_>(p<T_>(dq), p<T_>(dkc), p<T_>(dvc), p<T_>(dout), p<T_>(out), p<T_>(lse),
                                        p<T_>(q), p<T_>(kc), p<T_>(vc), s);
  });
}

void nsa_select(const Tensor& idx, const Tensor& q, const Tensor& kc, const Tensor& lse_cmp, const NsaShape& s) {
  check_nsa_attn("nsa_select", q, lse_cmp, q, kc, kc, nsa_numel_c(s), s);
  check_nsa_idx("nsa_select", idx, s);
  if (on_cuda("nsa_select", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_select");
    DMAT_CHECK(idx.device == Device::CUDA && lse_cmp.dtype == DType::F32, "nsa_select: idx on {}, lse {}",
               device_name(idx.device), dtype_name(lse_cmp.dtype));
    cuda::nsa_select(idx.as<int32_t>(), bf(q, "nsa_select"), bf(kc, "nsa_select"), f32(lse_cmp, "nsa_select"), s);
#endif
    return;
  }
  dispatch("nsa_select", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_select<T_>(idx.as<int32_t>(), p<T_>(q), p<T_>(kc), p<T_>(lse_cmp), s);
  });
}

void nsa_slc_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& idx, const NsaShape& s) {
  check_nsa_attn("nsa_slc_attention", out, lse, q, k, v, nsa_numel_t(s, s.Hkv), s);
  check_nsa_idx("nsa_slc_attention", idx, s);
  if (on_cuda("nsa_slc_attention", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_slc_attention");
    const char* o = "nsa_slc_attention";
    DMAT_CHECK(idx.device == Device::CUDA, "nsa_slc_attention: idx on {}", device_name(idx.device));
    cuda::nsa_slc_attention_forward(bf(out, o), f32(lse, o), bf(q, o), bf(k, o), bf(v, o), idx.as<int32_t>(), s);
#endif
    return;
  }
  dispatch("nsa_slc_attention", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_slc_attention_forward<T_>(p<T_>(out), p<T_>(lse), p<T_>(q), p<T_>(k), p<T_>(v), idx.as<int32_t>(), s);
  });
}

void nsa_slc_attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                                const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                                const Tensor& v, const Tensor& idx, const NsaShape& s) {
  check_nsa_attn("nsa_slc_attention_backward", out, lse, q, k, v, nsa_numel_t(s, s.Hkv), s);
  check_nsa_idx("nsa_slc_attention_backward", idx, s);
  DMAT_CHECK(dq.numel() == q.numel() && dk.numel() == k.numel() && dv.numel() == v.numel() &&
                 dout.numel() == out.numel(),
             "nsa_slc_attention_backward: gradient shapes");
  if (on_cuda("nsa_slc_attention_backward", q)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_slc_attention_backward");
    const char* o = "nsa_slc_attention_backward";
    DMAT_CHECK(idx.device == Device::CUDA, "nsa_slc_attention_backward: idx on {}", device_name(idx.device));
    cuda::nsa_slc_attention_backward(bf(dq, o), bf(dk, o), bf(dv, o), bf(dout, o), bf(out, o), f32(lse, o), bf(q, o),
                                     bf(k, o), bf(v, o), idx.as<int32_t>(), s);
#endif
    return;
  }
  dispatch("nsa_slc_attention_backward", q, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_slc_attention_backward<T_>(p<T_>(dq), p<T_>(dk), p<T_>(dv), p<T_>(dout), p<T_>(out), p<T_>(lse),
                                        p<T_>(q), p<T_>(k), p<T_>(v), idx.as<int32_t>(), s);
  });
}

void nsa_gate_forward(const Tensor& out, const Tensor& z, const Tensor& o_cmp, const Tensor& o_slc,
                      const Tensor& o_win, int64_t H) {
  const int64_t rows = z.numel() / (3 * H), D = rows > 0 ? out.numel() / (rows * H) : 0;
  DMAT_CHECK(H > 0 && z.numel() == rows * 3 * H && out.numel() == rows * H * D && o_cmp.numel() == out.numel() &&
                 o_slc.numel() == out.numel() && o_win.numel() == out.numel(),
             "nsa_gate: z {} out {} (H {})", z.shape.str(), out.shape.str(), H);
  if (on_cuda("nsa_gate", out)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_gate");
    const char* o = "nsa_gate";
    cuda::nsa_gate_forward(bf(out, o), bf(z, o), bf(o_cmp, o), bf(o_slc, o), bf(o_win, o), rows, H, D);
#endif
    return;
  }
  dispatch("nsa_gate", out, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_gate_forward<T_>(p<T_>(out), p<T_>(z), p<T_>(o_cmp), p<T_>(o_slc), p<T_>(o_win), rows, H, D);
  });
}

void nsa_gate_backward(const Tensor& dz, const Tensor& do_cmp, const Tensor& do_slc, const Tensor& do_win,
                       const Tensor& dout, const Tensor& z, const Tensor& o_cmp, const Tensor& o_slc,
                       const Tensor& o_win, int64_t H) {
  const int64_t rows = z.numel() / (3 * H), D = rows > 0 ? dout.numel() / (rows * H) : 0;
  DMAT_CHECK(H > 0 && z.numel() == rows * 3 * H && dz.numel() == z.numel() && dout.numel() == rows * H * D &&
                 o_cmp.numel() == dout.numel() && o_slc.numel() == dout.numel() && o_win.numel() == dout.numel() &&
                 do_cmp.numel() == dout.numel() && do_slc.numel() == dout.numel() && do_win.numel() == dout.numel(),
             "nsa_gate_backward: z {} dout {} (H {})", z.shape.str(), dout.shape.str(), H);
  if (on_cuda("nsa_gate_backward", dout)) {
#ifdef DMAT_WITH_CUDA
    cuda::ProfileScope prof_("nsa_gate_backward");
    const char* o = "nsa_gate_backward";
    cuda::nsa_gate_backward(bf(dz, o), bf(do_cmp, o), bf(do_slc, o), bf(do_win, o), bf(dout, o), bf(z, o),
                            bf(o_cmp, o), bf(o_slc, o), bf(o_win, o), rows, H, D);
#endif
    return;
  }
  dispatch("nsa_gate_backward", dout, [&](auto t) {
    using T_ = decltype(t);
    cpu::nsa_gate_backward<T_>(p<T_>(dz), p<T_>(do_cmp), p<T_>(do_slc), p<T_>(do_win), p<T_>(dout), p<T_>(z),
                               p<T_>(o_cmp), p<T_>(o_slc), p<T_>(o_win), rows, H, D);
  });
}

// ---- incremental decoding ------------------------------------------------------------------------

void rope_rows_inplace(const Tensor& x, int64_t n, int64_t H, int64_t R, int64_t pos0, double theta, int64_t ld,
                       int64_t hs, int64_t off) {
  DMAT_CHECK(n >= 0 && R % 2 == 0 && off + (H - 1) * hs + R <= ld && x.numel() >= n * ld && pos0 >= 0,
             "rope_rows: x {} n {} H {} R {} ld {} hs {} off {}", x.shape.str(), n, H, R, ld, hs, off);
  dispatch("rope_rows", x, [&](auto t) {
    using T = decltype(t);
    T* base = p<T>(x) + off;
    cpu::rope_rows<T>(base, base, n, H, R, pos0, theta, ld, ld, hs, hs);
  });
}

void attention_decode(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const DecodeShape& s,
                      const Tensor& bias, int64_t ldb, const Tensor& thr) {
  const int64_t last = s.pos0 + s.n - 1;  // the last key read
  DMAT_CHECK(s.H > 0 && s.Hkv > 0 && s.H % s.Hkv == 0 && q.numel() == s.n * s.H * s.Dqk &&
                 out.numel() == s.n * s.H * s.Dv && kc.numel() >= last * s.ldk + s.Hkv * s.Dqk &&
                 vc.numel() >= last * s.ldv + s.Hkv * s.Dv,
             "attention_decode: q {} out {} kc {} vc {} (n {} pos0 {} H {} Hkv {} Dqk {} Dv {} ldk {} ldv {})",
             q.shape.str(), out.shape.str(), kc.shape.str(), vc.shape.str(), s.n, s.pos0, s.H, s.Hkv, s.Dqk, s.Dv,
             s.ldk, s.ldv);
  DMAT_CHECK(bias.defined() == thr.defined() &&
                 (!bias.defined() || (bias.numel() >= (s.Hkv - 1) * ldb + last + 1 && thr.numel() == s.n * s.Hkv)),
             "attention_decode: bias {} (ldb {}) thr {}", bias.shape.str(), ldb, thr.shape.str());
  for (const Tensor* t : {&q, &kc, &vc, &bias, &thr}) same_type("attention_decode", out, *t);
  dispatch("attention_decode", out, [&](auto t) {
    using T = decltype(t);
    cpu::attention_decode<T>(p<T>(out), p<T>(q), p<T>(kc), p<T>(vc), s.n, s.pos0, s.H, s.Hkv, s.Dqk, s.Dv, s.ldk,
                             s.ldv, s.scale, s.window, p<T>(bias), ldb, p<T>(thr));
  });
}

void mla_absorb_query(const Tensor& qa, const Tensor& q, const Tensor& w_kvb, int64_t nope, int64_t R, int64_t C,
                      int64_t Dv) {
  const int64_t H = w_kvb.shape[0] / (nope + Dv), n = q.numel() / (H * (nope + R));
  DMAT_CHECK(w_kvb.shape.n == 2 && w_kvb.shape[1] == C && q.numel() == n * H * (nope + R) &&
                 qa.numel() == n * H * (C + R),
             "mla_absorb_query: qa {} q {} w_kvb {}", qa.shape.str(), q.shape.str(), w_kvb.shape.str());
  same_type("mla_absorb_query", qa, q);
  same_type("mla_absorb_query", qa, w_kvb);
  dispatch("mla_absorb_query", qa, [&](auto t) {
    using T = decltype(t);
    cpu::mla_absorb_query<T>(p<T>(qa), p<T>(q), p<T>(w_kvb), n, H, nope, R, C, Dv);
  });
}

void mla_expand_output(const Tensor& o, const Tensor& ctx, const Tensor& w_kvb, int64_t nope, int64_t C, int64_t Dv) {
  const int64_t H = w_kvb.shape[0] / (nope + Dv), n = ctx.numel() / (H * C);
  DMAT_CHECK(w_kvb.shape.n == 2 && w_kvb.shape[1] == C && ctx.numel() == n * H * C && o.numel() == n * H * Dv,
             "mla_expand_output: o {} ctx {} w_kvb {}", o.shape.str(), ctx.shape.str(), w_kvb.shape.str());
  same_type("mla_expand_output", o, ctx);
  same_type("mla_expand_output", o, w_kvb);
  dispatch("mla_expand_output", o, [&](auto t) {
    using T = decltype(t);
    cpu::mla_expand_output<T>(p<T>(o), p<T>(ctx), p<T>(w_kvb), n, H, nope, C, Dv);
  });
}

// ---- NSA decoding (CPU only) ----------------------------------------------------------------------

namespace {

// n queries of q [n, H, D] from pos0 in the cache shape s (B = 1, T = capacity); the blocks the last
// query sees exist in the compressed cache (s.n_cmp() rows).
int64_t check_nsa_decode(const char* op, const Tensor& q, int64_t pos0, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  const int64_t n = q.numel() / (s.H * s.D);
  DMAT_CHECK(s.B == 1 && n >= 1 && q.numel() == n * s.H * s.D && pos0 >= 0 && pos0 + n <= s.T &&
                 s.cmp_visible(pos0 + n - 1) <= s.n_cmp(),
             "{}: q {} from position {} (cache of {} positions, B {}, H {}, D {})", op, q.shape.str(), pos0, s.T, s.B,
             s.H, s.D);
  return n;
}

}  // namespace

void nsa_compress_blocks(const Tensor& y, const Tensor& x, const Tensor& pos, const Tensor& w1, const Tensor& w2,
                         int64_t c0, int64_t m, bool rotate, double theta, const NsaShape& s) {
  cpu::nsa_check_shape(s);
  const int64_t F = w1.shape.n == 2 ? w1.shape[0] : -1, row = s.Hkv * s.D;
  DMAT_CHECK(F > 0 && w1.shape[1] == s.cmp_block * s.D && w2.numel() == s.D * F && pos.numel() == s.cmp_block * s.D &&
                 c0 >= 0 && m >= 0 && y.numel() == m * row &&
                 (m == 0 || x.numel() >= ((c0 + m - 1) * s.cmp_stride + s.cmp_block) * row),
             "nsa_compress_blocks: blocks {} … {} from x {} into y {} (fc1 {} fc2 {} pos {}, Hkv {} D {} l {} d {})", c0,
             c0 + m - 1, x.shape.str(), y.shape.str(), w1.shape.str(), w2.shape.str(), pos.shape.str(), s.Hkv, s.D,
             s.cmp_block, s.cmp_stride);
  same_type("nsa_compress_blocks", x, y);
  same_type("nsa_compress_blocks", x, w1);
  dispatch("nsa_compress_blocks", x, [&](auto t) {
    using T = decltype(t);
    cpu::nsa_compress_blocks<T>(p<T>(y), p<T>(x), p<T>(pos), p<T>(w1), p<T>(w2), F, c0, m, rotate, theta, s);
  });
}

void nsa_cmp_attention_decode(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                              const Tensor& vc, int64_t pos0, const NsaShape& s) {
  const int64_t n = check_nsa_decode("nsa_cmp_attention_decode", q, pos0, s);
  DMAT_CHECK(out.numel() == q.numel() && lse.numel() == s.H * n && kc.numel() == s.n_cmp() * s.Hkv * s.D &&
                 vc.numel() == kc.numel(),
             "nsa_cmp_attention_decode: out {} lse {} kc {} vc {} for q {}", out.shape.str(), lse.shape.str(),
             kc.shape.str(), vc.shape.str(), q.shape.str());
  for (const Tensor* t : {&lse, &q, &kc, &vc}) same_type("nsa_cmp_attention_decode", out, *t);
  dispatch("nsa_cmp_attention_decode", q, [&](auto t) {
    using T = decltype(t);
    cpu::nsa_cmp_attention_decode<T>(p<T>(out), p<T>(lse), p<T>(q), p<T>(kc), p<T>(vc), n, pos0, s);
  });
}

void nsa_select_decode(const Tensor& idx, const Tensor& q, const Tensor& kc, const Tensor& lse_cmp, int64_t pos0,
                       const NsaShape& s) {
  const int64_t n = check_nsa_decode("nsa_select_decode", q, pos0, s);
  DMAT_CHECK(idx.dtype == DType::I32 && idx.numel() == s.Hkv * n * s.sel_count && lse_cmp.numel() == s.H * n &&
                 kc.numel() == s.n_cmp() * s.Hkv * s.D,
             "nsa_select_decode: idx {} {} (expected int32 [{}, {}, {}]), lse {} kc {}", dtype_name(idx.dtype),
             idx.shape.str(), s.Hkv, n, s.sel_count, lse_cmp.shape.str(), kc.shape.str());
  same_type("nsa_select_decode", q, kc);
  same_type("nsa_select_decode", q, lse_cmp);
  dispatch("nsa_select_decode", q, [&](auto t) {
    using T = decltype(t);
    cpu::nsa_select_decode<T>(idx.as<int32_t>(), p<T>(q), p<T>(kc), p<T>(lse_cmp), n, pos0, s);
  });
}

void nsa_slc_attention_decode(const Tensor& out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                              int64_t pos0, const NsaShape& s) {
  const int64_t n = check_nsa_decode("nsa_slc_attention_decode", q, pos0, s);
  DMAT_CHECK(out.numel() == q.numel() && k.numel() == s.T * s.Hkv * s.D && v.numel() == k.numel() &&
                 idx.dtype == DType::I32 && idx.numel() == s.Hkv * n * s.sel_count,
             "nsa_slc_attention_decode: out {} k {} v {} idx {} for q {}", out.shape.str(), k.shape.str(),
             v.shape.str(), idx.shape.str(), q.shape.str());
  for (const Tensor* t : {&q, &k, &v}) same_type("nsa_slc_attention_decode", out, *t);
  dispatch("nsa_slc_attention_decode", q, [&](auto t) {
    using T = decltype(t);
    cpu::nsa_slc_attention_decode<T>(p<T>(out), p<T>(q), p<T>(k), p<T>(v), idx.as<int32_t>(), n, pos0, s);
  });
}

}  // namespace dmat::ops
