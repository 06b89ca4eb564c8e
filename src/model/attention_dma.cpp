// Dynamic Mask Attention (type "dma"; ../shared/DESIGN.md, Hugging Face's DogeAttention): the
// q/k/v/o projections, optional QK-norm and RoPE of the causal layer, plus a per-key bias computed
// from the values, bias = exp(A·softplus(v·W_dtᵀ)) (or A·softplus(·), bias_form "linear"), one per KV
// head and shared by its query group. Query i attends to the keys j <= i whose bias reaches the
// w-th largest bias among keys 0..i (ties all kept, see kernels/cpu/cpu_ops.h), with the bias added
// to its scores. Parameters dt_proj.weight [Hkv, Hkv·Dh] and A [Hkv] (A = 0 at init, so in the "exp"
// form every bias starts at 1, all keys tie and the layer starts as causal attention).
#include <cmath>

#include "model/attention.h"
#include "ops/ops.h"

namespace dmat {
namespace {

class DmaAttention final : public Attention {
 public:
  explicit DmaAttention(const ModelConfig& c)
      : D_(c.d_model), H_(c.n_heads), Hkv_(c.n_kv_heads), Dh_(c.head_dim), theta_(c.rope_theta),
        eps_(c.norm_eps), qk_norm_(c.qk_norm), window_(c.attention.window),
        form_(c.attention.bias_form == "linear" ? ops::DmaBiasForm::Linear : ops::DmaBiasForm::Exp),
        std_(c.init_std), out_std_(c.init_std / std::sqrt(2.0 * double(c.n_layers))) {
    DMAT_CHECK(window_ > 0, "dma attention needs window > 0 (got {})", window_);
  }

  void declare_params(ParamTable& t, const std::string& p) override {
    wq_ = t.add({p + "q_proj.weight", {H_ * Dh_, D_}, "attention", Init::Normal, std_, true});
    wk_ = t.add({p + "k_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
    wv_ = t.add({p + "v_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
    wo_ = t.add({p + "o_proj.weight", {D_, H_ * Dh_}, "attention", Init::Normal, out_std_, true});
    if (qk_norm_) {
      gq_ = t.add({p + "q_norm.weight", {Dh_}, "norm", Init::Ones, 0, false});
      gk_ = t.add({p + "k_norm.weight", {Dh_}, "norm", Init::Ones, 0, false});
    }
    wdt_ = t.add({p + "dt_proj.weight", {Hkv_, Hkv_ * Dh_}, "attention", Init::Normal, std_, true});
    a_ = t.add({p + "A", {Hkv_}, "attention", Init::Zeros, 0, false});
  }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    q_ = t.add(p + "q", {B, T, H_, Dh_});  // after QK-norm and RoPE: what attention read
    k_ = t.add(p + "k", {B, T, Hkv_, Dh_});
    v_ = t.add(p + "v", {B, T, Hkv_, Dh_});
    o_ = t.add(p + "o", {N, H_ * Dh_});
    lse_ = t.add_stat(p + "lse", {B, H_, T});
    // The mask: two O(T) vectors per KV head (statistics: fp32 on CUDA). dbias too, per layer:
    // B·Hkv·T values, negligible, and a bias gradient summed over queries wants fp32.
    z_ = t.add_stat(p + "dma_z", {B, Hkv_, T});
    bias_ = t.add_stat(p + "dma_bias", {B, Hkv_, T});
    thr_ = t.add_stat(p + "dma_thr", {B, Hkv_, T});
    dbias_ = t.add_stat(p + "dma_dbias", {B, Hkv_, T});
    if (qk_norm_) {
      qpre_ = t.add(p + "q_pre", {B, T, H_, Dh_});
      kpre_ = t.add(p + "k_pre", {B, T, Hkv_, Dh_});
      rq_ = t.add_stat(p + "q_rstd", {N * H_});
      rk_ = t.add_stat(p + "k_rstd", {N * Hkv_});
    }
    // scratch shared by all layers (and with the other attention variants' names)
    dq_ = t.add_shared("scratch.attn.dq", {B, T, H_, Dh_});
    dk_ = t.add_shared("scratch.attn.dk", {B, T, Hkv_, Dh_});
    dv_ = t.add_shared("scratch.attn.dv", {B, T, Hkv_, Dh_});
    do_ = t.add_shared("scratch.attn.do", {N, H_ * Dh_});
    if (qk_norm_) {
      dqn_ = t.add_shared("scratch.attn.dq_pre", {B, T, H_, Dh_});
      dkn_ = t.add_shared("scratch.attn.dk_pre", {B, T, Hkv_, Dh_});
    }
  }

  cpu::AttnShape shape(const LayerCtx& c) const {
    cpu::AttnShape s;
    s.B = c.B; s.T = c.T; s.H = H_; s.Hkv = Hkv_; s.Dqk = Dh_; s.Dv = Dh_;
    s.scale = 1.0 / std::sqrt(double(Dh_));
    s.window = 0;  // the window lives in the thresholds
    s.deterministic = c.deterministic;
    return s;
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) override {
    Tensor q = c.A(q_), k = c.A(k_), v = c.A(v_);
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
    ops::dma_bias_forward(c.A(z_), c.A(bias_), v, c.P(wdt_), c.P(a_), form_);
    ops::dma_thresholds(c.A(thr_), c.A(bias_), window_);
    ops::dma_attention_forward(c.A(o_), c.A(lse_), q, k, v, c.A(bias_), c.A(thr_), shape(c), window_);
    ops::linear_forward(out, c.A(o_), c.P(wo_));
  }

  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) override {
    const int64_t N = c.B * c.T;
    Tensor dq = c.A(dq_).view({c.B, c.T, H_, Dh_}), dk = c.A(dk_).view({c.B, c.T, Hkv_, Dh_});
    Tensor dv = c.A(dv_).view({c.B, c.T, Hkv_, Dh_}), dO = c.A(do_).view({N, H_ * Dh_});
    ops::linear_backward(dO, c.G(wo_), dout, c.A(o_), c.P(wo_), false);
    ops::dma_attention_backward(dq, dk, dv, c.A(dbias_), dO, c.A(o_), c.A(lse_), c.A(q_), c.A(k_), c.A(v_),
                                c.A(bias_), c.A(thr_), shape(c), window_);
    // v feeds the bias too: its second share of dv, and dW_dt, dA.
    ops::dma_bias_backward(dv, c.G(wdt_), c.G(a_), c.A(dbias_), c.A(z_), c.A(bias_), c.A(v_), c.P(wdt_), c.P(a_),
                           form_);
    ops::rope_backward(dq, dq, theta_);
    ops::rope_backward(dk, dk, theta_);
    Tensor dqp = dq, dkp = dk;
    if (qk_norm_) {
      dqp = c.A(dqn_).view({c.B, c.T, H_, Dh_});
      dkp = c.A(dkn_).view({c.B, c.T, Hkv_, Dh_});
      ops::rmsnorm_backward(dqp, c.G(gq_), dq, c.A(qpre_), c.P(gq_), c.A(rq_), false);
      ops::rmsnorm_backward(dkp, c.G(gk_), dk, c.A(kpre_), c.P(gk_), c.A(rk_), false);
    }
    ops::linear_backward(dx, c.G(wq_), dqp.view({N, H_ * Dh_}), x, c.P(wq_), false);
    ops::linear_backward(dx, c.G(wk_), dkp.view({N, Hkv_ * Dh_}), x, c.P(wk_), true);
    ops::linear_backward(dx, c.G(wv_), dv.view({N, Hkv_ * Dh_}), x, c.P(wv_), true);
  }

  double core_flops_per_token(int64_t T) const override {
    // QKᵀ and P·V over the kept keys: min(i+1, w) per query (ties at the threshold aside), as SWA.
    const double w = double(window_), t = double(T);
    const double keys = w >= t ? (t + 1) / 2 : (w * (w + 1) / 2 + (t - w) * w) / t;
    return 2.0 * 2.0 * double(H_) * double(Dh_) * keys;
  }

 private:
  int64_t D_, H_, Hkv_, Dh_;
  double theta_, eps_;
  bool qk_norm_;
  int64_t window_;
  ops::DmaBiasForm form_;
  double std_, out_std_;
  int wq_ = -1, wk_ = -1, wv_ = -1, wo_ = -1, gq_ = -1, gk_ = -1, wdt_ = -1, a_ = -1;
  int q_ = -1, k_ = -1, v_ = -1, o_ = -1, lse_ = -1, z_ = -1, bias_ = -1, thr_ = -1, dbias_ = -1;
  int qpre_ = -1, kpre_ = -1, rq_ = -1, rk_ = -1;
  int dq_ = -1, dk_ = -1, dv_ = -1, do_ = -1, dqn_ = -1, dkn_ = -1;
};

}  // namespace

std::unique_ptr<Attention> make_dma_attention(const ModelConfig& cfg) { return std::make_unique<DmaAttention>(cfg); }

}  // namespace dmat
