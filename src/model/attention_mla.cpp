// Multi-head Latent Attention (type "mla"; DeepSeek-V2, in the form and with the parameter names of
// Hugging Face's DeepseekV3Attention). Keys and values come from a latent of rank d_c shared by all
// heads, the rotary part of the keys from one more projection of the same input:
//   [c_pre | k_r] = x·W_kvaᵀ            kv_a_proj_with_mqa [d_c + R, d]
//   c = RMSNorm(c_pre)·g_kv              kv_a_layernorm [d_c]
//   [k_nope_h | v_h] = c·W_kvbᵀ         kv_b_proj [H·(nope + Dv), d_c], per head h
//   q = x·W_qᵀ                          q_proj [H·(nope + R), d]; or with query compression (q_rank > 0)
//   q = RMSNorm(x·W_qaᵀ)·g_q·W_qbᵀ       q_a_proj [q_rank, d], q_a_layernorm [q_rank], q_b_proj [H·(nope + R), q_rank]
//   q_h = [q_nope_h | RoPE(q_rope_h)],  k_h = [k_nope_h | RoPE(k_r)]  (k_r shared by every head)
//   o = softmax(q·kᵀ / √(nope + R))·v, causal;  out = o·W_oᵀ   o_proj [d, H·Dv]
// RoPE is the model's rotate-half convention over the R rotary dims (HF's rope_interleave = false).
// Training runs the expanded form: per-head k and v are materialised for the attention core, whose
// head dims differ (d_qk = nope + R, d_v = Dv; 192/128 by default); absorbing W_kvb into the query
// is a decoding optimisation, not done here. Every query head has its own keys: no GQA.
#include <cmath>

#include <fmt/format.h>

#include "model/attention.h"
#include "ops/ops.h"

namespace dmat {
namespace {

class MlaAttention final : public Attention {
 public:
  explicit MlaAttention(const ModelConfig& c)
      : D_(c.d_model), H_(c.n_heads), C_(c.attention.mla.kv_rank), Q_(c.attention.mla.q_rank),
        R_(c.attention.mla.rope_dim), nope_(c.attention.mla.nope_dim), Dv_(c.attention.mla.v_dim),
        Dqk_(nope_ + R_), theta_(c.rope_theta), eps_(c.norm_eps), std_(c.init_std),
        out_std_(c.init_std / std::sqrt(2.0 * double(c.n_layers))) {
    // (model.n_kv_heads does not apply: one key and value head per query head, from the latent)
    DMAT_CHECK(C_ > 0 && Q_ >= 0 && R_ > 0 && R_ % 2 == 0 && nope_ > 0 && Dv_ > 0,
               "mla attention: kv_rank {} q_rank {} rope_dim {} nope_dim {} v_dim {} (validated config expected)", C_,
               Q_, R_, nope_, Dv_);
  }

  AttentionDims dims() const override { return {Dqk_, Dv_, R_, cuda::AttnKernel::flash}; }

  std::string cuda_unsupported() const override {
    if (cuda::head_dims_supported(cuda::AttnKernel::flash, Dqk_, Dv_)) return "";
    return fmt::format("model.attention.nope_dim + rope_dim = {} + {} (q·k dims) with model.attention.v_dim = {} "
                       "has no CUDA attention kernel for attention type mla (d_qk/d_v pairs: {}; DeepSeek's is "
                       "nope_dim 128, rope_dim 64, v_dim 128); choose one of those or run on the CPU with "
                       "run.device=\"cpu\"",
                       nope_, R_, Dv_, cuda::head_dims_list(cuda::AttnKernel::flash));
  }

  void declare_params(ParamTable& t, const std::string& p) override {
    // Hugging Face's DeepseekV3Attention order and names
    if (Q_ == 0) {
      wq_ = t.add({p + "q_proj.weight", {H_ * Dqk_, D_}, "attention", Init::Normal, std_, true});
    } else {
      wqa_ = t.add({p + "q_a_proj.weight", {Q_, D_}, "attention", Init::Normal, std_, true});
      gq_ = t.add({p + "q_a_layernorm.weight", {Q_}, "norm", Init::Ones, 0, false});
      wqb_ = t.add({p + "q_b_proj.weight", {H_ * Dqk_, Q_}, "attention", Init::Normal, std_, true});
    }
    wkva_ = t.add({p + "kv_a_proj_with_mqa.weight", {C_ + R_, D_}, "attention", Init::Normal, std_, true});
    gkv_ = t.add({p + "kv_a_layernorm.weight", {C_}, "norm", Init::Ones, 0, false});
    wkvb_ = t.add({p + "kv_b_proj.weight", {H_ * (nope_ + Dv_), C_}, "attention", Init::Normal, std_, true});
    wo_ = t.add({p + "o_proj.weight", {D_, H_ * Dv_}, "attention", Init::Normal, out_std_, true});
  }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) override {
    const int64_t N = B * T;
    q_ = t.add(p + "q", {B, T, H_, Dqk_});  // after RoPE: what the core read
    k_ = t.add(p + "k", {B, T, H_, Dqk_});
    v_ = t.add(p + "v", {B, T, H_, Dv_});
    o_ = t.add(p + "o", {N, H_ * Dv_});  // the core's output before o_proj
    lse_ = t.add_stat(p + "lse", {B, H_, T});
    cpre_ = t.add(p + "c_pre", {N, C_});  // kv_a_layernorm's input and output
    c_ = t.add(p + "c", {N, C_});
    rc_ = t.add_stat(p + "c_rstd", {N});
    if (Q_ > 0) {
      qa_ = t.add(p + "q_a", {N, Q_});
      qn_ = t.add(p + "q_a_norm", {N, Q_});
      rq_ = t.add_stat(p + "q_a_rstd", {N});
    }
    // Shared by all layers (backward runs one layer at a time). kv and k_r are only needed until
    // the core's operands exist: backward reuses them for their gradients.
    kv_ = t.add_shared("scratch.attn.mla_kv", {N, H_ * (nope_ + Dv_)});
    kr_ = t.add_shared("scratch.attn.mla_kr", {N, R_});
    dq_ = t.add_shared("scratch.attn.dq", {B, T, H_, Dqk_});
    dk_ = t.add_shared("scratch.attn.dk", {B, T, H_, Dqk_});
    dv_ = t.add_shared("scratch.attn.dv", {B, T, H_, Dv_});
    do_ = t.add_shared("scratch.attn.do", {N, H_ * Dv_});
    dc_ = t.add_shared("scratch.attn.mla_dc", {N, C_});
    dcpre_ = t.add_shared("scratch.attn.mla_dc_pre", {N, C_});
    if (Q_ > 0) {
      dqn_ = t.add_shared("scratch.attn.mla_dq_a_norm", {N, Q_});
      dqa_ = t.add_shared("scratch.attn.mla_dq_a", {N, Q_});
    }
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) override {
    const int64_t N = c.B * c.T;
    const Tensor q = c.A(q_), kv = c.A(kv_).rows(0, N), kr = c.A(kr_).rows(0, N);
    if (Q_ == 0) {
      ops::linear_forward(q, x, c.P(wq_));
    } else {
      ops::linear_forward(c.A(qa_), x, c.P(wqa_));
      ops::rmsnorm_forward(c.A(qn_), c.A(rq_), c.A(qa_), c.P(gq_), eps_);
      ops::linear_forward(q, c.A(qn_), c.P(wqb_));
    }
    // kv_a_proj_with_mqa's rows: the latent's d_c, then the rotary key's R (one GEMM each, so that
    // both outputs are contiguous)
    ops::linear_forward(c.A(cpre_), x, c.P(wkva_).rows(0, C_));
    ops::linear_forward(kr, x, c.P(wkva_).rows(C_, R_));
    ops::rmsnorm_forward(c.A(c_), c.A(rc_), c.A(cpre_), c.P(gkv_), eps_);
    ops::linear_forward(kv, c.A(c_), c.P(wkvb_));
    ops::rope_unpack_mla(q, c.A(k_), c.A(v_), q, kv, kr, nope_, theta_);  // q rotated in place
    ops::attention_forward(c.A(o_), c.A(lse_), q, c.A(k_), c.A(v_), shape(c));
    ops::linear_forward(out, c.A(o_), c.P(wo_));
  }

  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) override {
    const int64_t N = c.B * c.T;
    const Tensor dq = c.A(dq_).view({c.B, c.T, H_, Dqk_}), dk = c.A(dk_).view({c.B, c.T, H_, Dqk_}),
                 dv = c.A(dv_).view({c.B, c.T, H_, Dv_}), dO = c.A(do_).view({N, H_ * Dv_});
    const Tensor dkv = c.A(kv_).rows(0, N), dkr = c.A(kr_).rows(0, N), dcn = c.A(dc_).rows(0, N),
                 dcpre = c.A(dcpre_).rows(0, N);
    ops::linear_backward(dO, c.G(wo_), dout, c.A(o_), c.P(wo_), false);
    ops::attention_backward(dq, dk, dv, dO, c.A(o_), c.A(lse_), c.A(q_), c.A(k_), c.A(v_), shape(c));
    ops::rope_pack_mla_backward(dq, dkv, dkr, dq, dk, dv, nope_, theta_);  // dq becomes ∂/∂(q before RoPE)
    const Tensor dqp = dq.view({N, H_ * Dqk_});
    if (Q_ == 0) {
      ops::linear_backward(dx, c.G(wq_), dqp, x, c.P(wq_), false);
    } else {
      const Tensor dqn = c.A(dqn_).rows(0, N), dqa = c.A(dqa_).rows(0, N);
      ops::linear_backward(dqn, c.G(wqb_), dqp, c.A(qn_), c.P(wqb_), false);
      ops::rmsnorm_backward(dqa, c.G(gq_), dqn, c.A(qa_), c.P(gq_), c.A(rq_), false);
      ops::linear_backward(dx, c.G(wqa_), dqa, x, c.P(wqa_), false);
    }
    ops::linear_backward(dcn, c.G(wkvb_), dkv, c.A(c_), c.P(wkvb_), false);
    ops::rmsnorm_backward(dcpre, c.G(gkv_), dcn, c.A(cpre_), c.P(gkv_), c.A(rc_), false);
    ops::linear_backward(dx, c.G(wkva_).rows(0, C_), dcpre, x, c.P(wkva_).rows(0, C_), true);
    ops::linear_backward(dx, c.G(wkva_).rows(C_, R_), dkr, x, c.P(wkva_).rows(C_, R_), true);
  }

  // Decoding caches, per position, the latent c (after kv_a_layernorm) and the rotated shared key
  // RoPE(k_r): d_c + R values instead of the H·(d_qk + d_v) of the expanded keys and values, and
  // attends in the absorbed form (cpu_ops.h, mla_absorb_query): the scores and outputs of the
  // training forward, summed in another order (agreement to rounding, not bit for bit).
  struct MlaCache : DecodeCache {
    Arena arena;
    Tensor ckr;  // [capacity, d_c + R]: c | RoPE(k_r)
  };

  std::unique_ptr<DecodeCache> make_decode_cache(const LayerCtx& c, int64_t max_len) const override {
    auto cache = std::make_unique<MlaCache>();
    TensorTable t;
    t.add("ckr", {max_len, C_ + R_});
    cache->arena = Arena(t, c.P(wkva_).dtype, Device::CPU);
    cache->ckr = cache->arena.get(0);
    cache->capacity = max_len;
    cache->what = fmt::format("latent c ({}) and rotated shared key k_r ({}); attention in the absorbed form", C_, R_);
    cache->values_per_position = C_ + R_;
    return cache;
  }

  void decode(const LayerCtx& c, DecodeCache& dc, const Tensor& x, const Tensor& out) const override {
    auto& cache = dynamic_cast<MlaCache&>(dc);
    const int64_t n = x.shape[0], pos0 = cache.len, W = C_ + R_;
    DMAT_CHECK(pos0 + n <= cache.capacity, "decode: {} + {} positions exceed the cache's {}", pos0, n,
               cache.capacity);
    const DecodeScratch s(x.dtype, {{n, H_ * Dqk_}, {n, C_}, {n, C_}, {n}, {n, R_}, {n, H_, W}, {n, H_, C_},
                                    {n, H_ * Dv_}, {n, std::max<int64_t>(Q_, 1)}, {n, std::max<int64_t>(Q_, 1)}});
    const Tensor q = s[0], cpre = s[1], cn = s[2], rc = s[3], kr = s[4], qa = s[5], ctx = s[6], o = s[7];
    if (Q_ == 0) {
      ops::linear_forward(q, x, c.P(wq_));
    } else {
      ops::linear_forward(s[8], x, c.P(wqa_));
      ops::rmsnorm_forward(s[9], s[3], s[8], c.P(gq_), eps_);  // (s[3]: rstd scratch, reused below)
      ops::linear_forward(q, s[9], c.P(wqb_));
    }
    ops::linear_forward(cpre, x, c.P(wkva_).rows(0, C_));
    ops::linear_forward(kr, x, c.P(wkva_).rows(C_, R_));
    ops::rmsnorm_forward(cn, rc, cpre, c.P(gkv_), eps_);
    // the new positions' [c | k_r] into the cache, then k_r and q's rotary dims rotated in place
    const Tensor rows = cache.ckr.rows(pos0, n), flat = rows.view({n * W});
    for (int64_t r = 0; r < n; ++r) {
      ops::copy(flat.rows(r * W, C_), cn.rows(r, 1).view({C_}));
      ops::copy(flat.rows(r * W + C_, R_), kr.rows(r, 1).view({R_}));
    }
    ops::rope_rows_inplace(rows, n, 1, R_, pos0, theta_, W, 0, C_);
    ops::rope_rows_inplace(q, n, H_, R_, pos0, theta_, H_ * Dqk_, Dqk_, nope_);
    // scores against [c | k_r] with [W_k,hᵀ·q_nope | q_rope]; one shared key head; values c
    ops::mla_absorb_query(qa, q, c.P(wkvb_), nope_, R_, C_, Dv_);
    ops::DecodeShape sh;
    sh.n = n, sh.pos0 = pos0, sh.H = H_, sh.Hkv = 1, sh.Dqk = W, sh.Dv = C_, sh.ldk = W, sh.ldv = W;
    sh.scale = 1.0 / std::sqrt(double(Dqk_));
    ops::attention_decode(ctx, qa, cache.ckr, cache.ckr, sh);
    ops::mla_expand_output(o, ctx, c.P(wkvb_), nope_, C_, Dv_);
    ops::linear_forward(out, o, c.P(wo_));
    cache.len += n;
  }

  double core_flops_per_token(int64_t T) const override {
    // q·kᵀ over d_qk and P·v over d_v, 2 flops per multiply-add, (T+1)/2 causal keys on average
    return 2.0 * double(H_) * double(Dqk_ + Dv_) * double(T + 1) / 2.0;
  }

  double mfu_core_flops_per_token(int64_t T, int64_t /*d_model*/) const override {
    // DeepSeek's accounting of the core: 3 (forward + backward) · 2 (flops per multiply-add) ·
    // T/2 (causal keys) · H·(d_qk + d_v); = 6·T·d for MHA heads with H·head_dim = d
    return 3.0 * double(T) * double(H_) * double(Dqk_ + Dv_);
  }
  std::string mfu_convention() const override { return "6·N + 3·L·T·H·(d_qk + d_v)"; }

 private:
  cpu::AttnShape shape(const LayerCtx& c) const {
    cpu::AttnShape s;
    s.B = c.B, s.T = c.T, s.H = H_, s.Hkv = H_, s.Dqk = Dqk_, s.Dv = Dv_;
    s.scale = 1.0 / std::sqrt(double(Dqk_));  // HF: qk_head_dim^-0.5, over the rotary dims too
    s.window = 0;
    s.deterministic = c.deterministic;
    return s;
  }

  int64_t D_, H_, C_, Q_, R_, nope_, Dv_, Dqk_;
  double theta_, eps_, std_, out_std_;
  int wq_ = -1, wqa_ = -1, gq_ = -1, wqb_ = -1, wkva_ = -1, gkv_ = -1, wkvb_ = -1, wo_ = -1;
  int q_ = -1, k_ = -1, v_ = -1, o_ = -1, lse_ = -1, cpre_ = -1, c_ = -1, rc_ = -1, qa_ = -1, qn_ = -1, rq_ = -1;
  int kv_ = -1, kr_ = -1, dq_ = -1, dk_ = -1, dv_ = -1, do_ = -1, dc_ = -1, dcpre_ = -1, dqn_ = -1, dqa_ = -1;
};

}  // namespace

std::unique_ptr<Attention> make_mla_attention(const ModelConfig& cfg) { return std::make_unique<MlaAttention>(cfg); }

}  // namespace dmat
