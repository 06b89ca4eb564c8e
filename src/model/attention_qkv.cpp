// The q/k/v/o projections, QK-norm and RoPE around every attention core (attention_qkv.h).
#include "model/attention_qkv.h"

#include <cmath>

#include <fmt/format.h>

namespace dmat {

QkvBlock::QkvBlock(const ModelConfig& c)
    : D_(c.d_model), H_(c.n_heads), Hkv_(c.n_kv_heads), Dh_(c.head_dim), theta_(c.rope_theta), eps_(c.norm_eps),
      qk_norm_(c.qk_norm),
      packed_(!c.qk_norm && (c.n_heads * c.head_dim * c.d_model) % kArenaAlign == 0 &&
              (c.n_kv_heads * c.head_dim * c.d_model) % kArenaAlign == 0),
      std_(c.init_std), out_std_(c.init_std / std::sqrt(2.0 * double(c.n_layers))) {}

void QkvBlock::declare_params(ParamTable& t, const std::string& p) {
  wq_ = t.add({p + "q_proj.weight", {H_ * Dh_, D_}, "attention", Init::Normal, std_, true});
  wk_ = t.add({p + "k_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
  wv_ = t.add({p + "v_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
  wo_ = t.add({p + "o_proj.weight", {D_, H_ * Dh_}, "attention", Init::Normal, out_std_, true});
  if (qk_norm_) {
    gq_ = t.add({p + "q_norm.weight", {Dh_}, "norm", Init::Ones, 0, false});
    gk_ = t.add({p + "k_norm.weight", {Dh_}, "norm", Init::Ones, 0, false});
  }
}

void QkvBlock::declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) {
  q_ = t.add(p + "q", {B, T, H_, Dh_});  // after QK-norm and RoPE: what attention read
  k_ = t.add(p + "k", {B, T, Hkv_, Dh_});
  v_ = t.add(p + "v", {B, T, Hkv_, Dh_});
  o_ = t.add(p + "o", {B * T, H_ * Dh_});  // attention output before o_proj
}

void QkvBlock::declare_norm_and_scratch(TensorTable& t, const std::string& p, int64_t B, int64_t T) {
  const int64_t N = B * T;
  if (qk_norm_) {
    qpre_ = t.add(p + "q_pre", {B, T, H_, Dh_});
    kpre_ = t.add(p + "k_pre", {B, T, Hkv_, Dh_});
    rq_ = t.add_stat(p + "q_rstd", {N * H_});
    rk_ = t.add_stat(p + "k_rstd", {N * Hkv_});
  }
  // The scratch names are the same in every attention variant.
  dq_ = t.add_shared("scratch.attn.dq", {B, T, H_, Dh_});
  dk_ = t.add_shared("scratch.attn.dk", {B, T, Hkv_, Dh_});
  dv_ = t.add_shared("scratch.attn.dv", {B, T, Hkv_, Dh_});
  do_ = t.add_shared("scratch.attn.do", {N, H_ * Dh_});
  if (packed_) qkv_ = t.add_shared("scratch.attn.qkv", {N, (H_ + 2 * Hkv_) * Dh_});
  if (qk_norm_) {
    dqn_ = t.add_shared("scratch.attn.dq_pre", {B, T, H_, Dh_});
    dkn_ = t.add_shared("scratch.attn.dk_pre", {B, T, Hkv_, Dh_});
  }
}

QkvBlock::Tensors QkvBlock::saved(const LayerCtx& c) const { return {c.A(q_), c.A(k_), c.A(v_), c.A(o_)}; }

QkvBlock::Tensors QkvBlock::grads(const LayerCtx& c) const {
  return {c.A(dq_).view({c.B, c.T, H_, Dh_}), c.A(dk_).view({c.B, c.T, Hkv_, Dh_}),
          c.A(dv_).view({c.B, c.T, Hkv_, Dh_}), c.A(do_).view({c.B * c.T, H_ * Dh_})};
}

cpu::AttnShape QkvBlock::shape(const LayerCtx& c) const {
  cpu::AttnShape s;
  s.B = c.B; s.T = c.T; s.H = H_; s.Hkv = Hkv_; s.Dqk = Dh_; s.Dv = Dh_;
  s.scale = 1.0 / std::sqrt(double(Dh_));
  s.window = 0;
  s.deterministic = c.deterministic;
  return s;
}

Tensor QkvBlock::joined(const Arena& a) const {
  const Tensor t = join_rows(join_rows(a.get(wq_), a.get(wk_)), a.get(wv_));
  DMAT_CHECK(t.defined(), "attention: q_proj, k_proj and v_proj are not adjacent in the arena");
  return t;
}

void QkvBlock::forward_qkv(const LayerCtx& c, const Tensor& x) const {
  Tensor q = c.A(q_), k = c.A(k_), v = c.A(v_);
  if (packed_) {
    const Tensor qkv = c.A(qkv_).rows(0, c.B * c.T);
    ops::linear_forward(qkv, x, joined(*c.params));
    ops::rope_unpack_qkv(q, k, v, qkv, theta_);
    return;
  }
  if (qk_norm_) {
    Tensor qp = c.A(qpre_), kp = c.A(kpre_);
    ops::linear_forward(qp, x, c.P(wq_));
    ops::linear_forward(kp, x, c.P(wk_));
    ops::rmsnorm_forward(q, c.A(rq_), qp, c.P(gq_), eps_);
    ops::rmsnorm_forward(k, c.A(rk_), kp, c.P(gk_), eps_);
  } else {
    ops::linear_forward(q, x, c.P(wq_));
    ops::linear_forward(k, x, c.P(wk_));
  }
  ops::linear_forward(v, x, c.P(wv_));
  ops::rope_forward(q, q, theta_);
  ops::rope_forward(k, k, theta_);
}

void QkvBlock::forward_out(const LayerCtx& c, const Tensor& out) const {
  ops::linear_forward(out, c.A(o_), c.P(wo_));
}

void QkvBlock::backward_out(const LayerCtx& c, const Tensor& dout) const {
  ops::linear_backward(grads(c).o, c.G(wo_), dout, c.A(o_), c.P(wo_), false);
}

void QkvBlock::backward_qkv(const LayerCtx& c, const Tensor& x, const Tensor& dx) const {
  const int64_t N = c.B * c.T;
  const auto [dq, dk, dv, dO] = grads(c);
  if (packed_) {
    const Tensor dqkv = c.A(qkv_).rows(0, N);
    ops::rope_pack_qkv_backward(dqkv, dq, dk, dv, theta_);
    ops::linear_backward(dx, joined(*c.grads), dqkv, x, joined(*c.params), false);
    return;
  }
  ops::rope_backward(dq, dq, theta_);
  ops::rope_backward(dk, dk, theta_);
  Tensor dqp = dq, dkp = dk;
  if (qk_norm_) {
    // q = RMSNorm(q_pre) before RoPE; the rotation was undone above, so dq is ∂/∂RMSNorm(q_pre).
    dqp = c.A(dqn_).view({c.B, c.T, H_, Dh_});
    dkp = c.A(dkn_).view({c.B, c.T, Hkv_, Dh_});
    ops::rmsnorm_backward(dqp, c.G(gq_), dq, c.A(qpre_), c.P(gq_), c.A(rq_), false);
    ops::rmsnorm_backward(dkp, c.G(gk_), dk, c.A(kpre_), c.P(gk_), c.A(rk_), false);
  }
  ops::linear_backward(dx, c.G(wq_), dqp.view({N, H_ * Dh_}), x, c.P(wq_), false);
  ops::linear_backward(dx, c.G(wk_), dkp.view({N, Hkv_ * Dh_}), x, c.P(wk_), true);
  ops::linear_backward(dx, c.G(wv_), dv.view({N, Hkv_ * Dh_}), x, c.P(wv_), true);
}

void QkvBlock::init_cache(KvCache& cache, const LayerCtx& c, int64_t max_len) const {
  TensorTable t;
  t.add("k", {max_len, Hkv_, Dh_});
  t.add("v", {max_len, Hkv_, Dh_});
  cache.arena = Arena(t, c.P(wq_).dtype, Device::CPU);
  cache.k = cache.arena.get(0);
  cache.v = cache.arena.get(1);
  cache.capacity = max_len;
  cache.what = fmt::format("k, v after RoPE: {} KV heads × {} each", Hkv_, Dh_);
  cache.values_per_position = 2 * Hkv_ * Dh_;
}

void QkvBlock::decode_qkv(const LayerCtx& c, KvCache& cache, const Tensor& x, const Tensor& q) const {
  const int64_t n = x.shape[0], pos0 = cache.len;
  DMAT_CHECK(pos0 + n <= cache.capacity, "decode: {} + {} positions exceed the cache's {}", pos0, n, cache.capacity);
  const Tensor k = cache.k.rows(pos0, n), v = cache.v.rows(pos0, n);
  ops::linear_forward(q.view({n, H_ * Dh_}), x, c.P(wq_));
  ops::linear_forward(k.view({n, Hkv_ * Dh_}), x, c.P(wk_));
  ops::linear_forward(v.view({n, Hkv_ * Dh_}), x, c.P(wv_));
  if (qk_norm_) {
    const DecodeScratch s(q.dtype, {{n * H_}, {n * Hkv_}});
    ops::rmsnorm_forward(q, s[0], q, c.P(gq_), eps_);
    ops::rmsnorm_forward(k, s[1], k, c.P(gk_), eps_);
  }
  ops::rope_rows_inplace(q, n, H_, Dh_, pos0, theta_, H_ * Dh_, Dh_, 0);
  ops::rope_rows_inplace(k, n, Hkv_, Dh_, pos0, theta_, Hkv_ * Dh_, Dh_, 0);
}

void QkvBlock::decode_out(const LayerCtx& c, const Tensor& o, const Tensor& out) const {
  ops::linear_forward(out, o, c.P(wo_));
}

ops::DecodeShape QkvBlock::decode_shape(const KvCache& cache, int64_t n) const {
  ops::DecodeShape s;
  s.n = n;
  s.pos0 = cache.len;
  s.H = H_;
  s.Hkv = Hkv_;
  s.Dqk = s.Dv = Dh_;
  s.ldk = s.ldv = Hkv_ * Dh_;
  s.scale = 1.0 / std::sqrt(double(Dh_));
  return s;
}

}  // namespace dmat
