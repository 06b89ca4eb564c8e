#include "ops/ops.h"

namespace dmat::ops {
namespace {

// Calls f(T{}) with T the tensor's float type; CUDA tensors are refused until the CUDA backend
// (kernels/cuda) provides the op.
template <class F>
void dispatch(const char* op, const Tensor& t, F&& f) {
  if (t.device != Device::CPU) fail("op {}: no CUDA implementation in this build yet", op);
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

void linear_forward(const Tensor& y, const Tensor& x, const Tensor& W) {
  const int64_t K = last_dim(x), M = rows_of(x), N = W.shape[0];
  DMAT_CHECK(W.shape.n == 2 && W.shape[1] == K && y.numel() == M * N,
             "linear: x {} W {} y {}", x.shape.str(), W.shape.str(), y.shape.str());
  same_type("linear", y, x);
  same_type("linear", y, W);
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
  check_tokens("embedding", tokens, rows_of(out), table.shape[0]);
  dispatch("embedding", out, [&](auto t) {
    using T = decltype(t);
    cpu::embedding_forward<T>(p<T>(out), p<T>(table), tokens, rows_of(out), D);
  });
}

void embedding_backward(const Tensor& dtable, const Tensor& dout, const int32_t* tokens) {
  const int64_t D = dtable.shape[1];
  DMAT_CHECK(last_dim(dout) == D, "embedding_backward: dout {} table {}", dout.shape.str(), dtable.shape.str());
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
  dispatch("rmsnorm_backward", x, [&](auto t) {
    using T = decltype(t);
    cpu::rmsnorm_backward<T>(p<T>(dx), p<T>(dw), p<T>(dy), p<T>(x), p<T>(w), p<T>(rstd), R, D, accumulate_dx);
  });
}

void rope_forward(const Tensor& y, const Tensor& x, double theta) {
  DMAT_CHECK(x.shape.n == 4 && y.shape == x.shape, "rope: x {} y {}", x.shape.str(), y.shape.str());
  dispatch("rope", x, [&](auto t) {
    using T = decltype(t);
    cpu::rope_forward<T>(p<T>(y), p<T>(x), x.shape[0], x.shape[1], x.shape[2], x.shape[3], theta);
  });
}

void rope_backward(const Tensor& dx, const Tensor& dy, double theta) {
  DMAT_CHECK(dy.shape.n == 4 && dx.shape == dy.shape, "rope_backward: dy {} dx {}", dy.shape.str(), dx.shape.str());
  dispatch("rope_backward", dy, [&](auto t) {
    using T = decltype(t);
    cpu::rope_backward<T>(p<T>(dx), p<T>(dy), dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3], theta);
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
  dispatch("attention_backward", q, [&](auto t) {
    using T = decltype(t);
    cpu::attention_backward<T>(p<T>(dq), p<T>(dk), p<T>(dv), p<T>(dout), p<T>(out), p<T>(lse), p<T>(q), p<T>(k),
                               p<T>(v), s);
  });
}

void swiglu_forward(const Tensor& out, const Tensor& g, const Tensor& u) {
  DMAT_CHECK(out.numel() == g.numel() && u.numel() == g.numel(), "swiglu: shapes");
  dispatch("swiglu", g, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_forward<T>(p<T>(out), p<T>(g), p<T>(u), g.numel());
  });
}

void swiglu_backward(const Tensor& dg, const Tensor& du, const Tensor& dout, const Tensor& g, const Tensor& u) {
  DMAT_CHECK(dg.numel() == g.numel() && du.numel() == g.numel() && dout.numel() == g.numel(), "swiglu_backward: shapes");
  dispatch("swiglu_backward", g, [&](auto t) {
    using T = decltype(t);
    cpu::swiglu_backward<T>(p<T>(dg), p<T>(du), p<T>(dout), p<T>(g), p<T>(u), g.numel());
  });
}

void residual_forward(const Tensor& out, const Tensor& x, const Tensor& r, const Tensor& branch) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(out.numel() == x.numel() && branch.numel() == x.numel() && (!r.defined() || r.numel() == D),
             "residual: shapes");
  dispatch("residual", x, [&](auto t) {
    using T = decltype(t);
    cpu::residual_forward<T>(p<T>(out), p<T>(x), p<T>(r), p<T>(branch), R, D);
  });
}

void residual_backward(const Tensor& dx, const Tensor& dr, const Tensor& dout, const Tensor& x, const Tensor& r) {
  const int64_t D = last_dim(x), R = rows_of(x);
  DMAT_CHECK(dx.numel() == x.numel() && dout.numel() == x.numel(), "residual_backward: shapes");
  dispatch("residual_backward", x, [&](auto t) {
    using T = decltype(t);
    cpu::residual_backward<T>(p<T>(dx), p<T>(dr), p<T>(dout), p<T>(x), p<T>(r), R, D);
  });
}

void softmax_xent(const Tensor& loss, const Tensor& dlogits, const Tensor& logits, const int32_t* targets,
                  double grad_scale) {
  const int64_t V = last_dim(logits), R = rows_of(logits);
  DMAT_CHECK(loss.numel() == R && (!dlogits.defined() || dlogits.numel() == logits.numel()), "softmax_xent: shapes");
  dispatch("softmax_xent", logits, [&](auto t) {
    using T = decltype(t);
    cpu::softmax_xent<T>(p<T>(loss), p<T>(dlogits), p<T>(logits), targets, R, V, T(grad_scale));
  });
}

void fill(const Tensor& x, double value) {
  dispatch("fill", x, [&](auto t) {
    using T = decltype(t);
    cpu::fill<T>(p<T>(x), x.numel(), T(value));
  });
}

void copy(const Tensor& dst, const Tensor& src) {
  DMAT_CHECK(dst.numel() == src.numel(), "copy: {} vs {}", dst.shape.str(), src.shape.str());
  same_type("copy", dst, src);
  dispatch("copy", dst, [&](auto t) {
    using T = decltype(t);
    cpu::copy<T>(p<T>(dst), p<T>(src), dst.numel());
  });
}

void add_inplace(const Tensor& y, const Tensor& x) {
  DMAT_CHECK(y.numel() == x.numel(), "add: {} vs {}", y.shape.str(), x.shape.str());
  dispatch("add", y, [&](auto t) {
    using T = decltype(t);
    cpu::add_inplace<T>(p<T>(y), p<T>(x), y.numel());
  });
}

void scale_inplace(const Tensor& x, double s) {
  dispatch("scale", x, [&](auto t) {
    using T = decltype(t);
    cpu::scale_inplace<T>(p<T>(x), x.numel(), T(s));
  });
}

double sum_squares(const Tensor& x) {
  double r = 0;
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

}  // namespace dmat::ops
