// Causal softmax attention with grouped KV heads (MHA/GQA), RoPE, optional per-head QK RMSNorm,
// and optional sliding window (type "swa": query i sees keys i-w+1 … i). The projections around
// the softmax are attention_qkv.h's.
#include <fmt/format.h>

#include "model/attention.h"
#include "model/attention_qkv.h"
#include "ops/ops.h"

namespace dmat {
namespace {

class CausalAttention final : public Attention {
 public:
  explicit CausalAttention(const ModelConfig& c)
      : cfg_(c), qkv_(c), H_(c.n_heads), Dh_(c.head_dim), window_(c.attention.type == "swa" ? c.attention.swa.window : 0) {}

  AttentionDims dims() const override { return qkv_.dims(cuda::AttnKernel::flash); }
  std::string cuda_unsupported() const override { return cuda_unsupported_head_dim(cfg_, cuda::AttnKernel::flash); }

  void declare_params(ParamTable& t, const std::string& p) override { qkv_.declare_params(t, p); }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) override {
    qkv_.declare_acts(t, p, B, T);
    lse_ = t.add_stat(p + "lse", {B, H_, T});
    qkv_.declare_norm_and_scratch(t, p, B, T);
  }

  cpu::AttnShape shape(const LayerCtx& c) const {
    cpu::AttnShape s = qkv_.shape(c);
    s.window = window_;
    return s;
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) override {
    qkv_.forward_qkv(c, x);
    const auto [q, k, v, o] = qkv_.saved(c);
    ops::attention_forward(o, c.A(lse_), q, k, v, shape(c));
    qkv_.forward_out(c, out);
  }

  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) override {
    const auto [q, k, v, o] = qkv_.saved(c);
    const auto [dq, dk, dv, dO] = qkv_.grads(c);
    qkv_.backward_out(c, dout);
    ops::attention_backward(dq, dk, dv, dO, o, c.A(lse_), q, k, v, shape(c));
    qkv_.backward_qkv(c, x, dx);
  }

  // Decoding caches k and v of every position (SWA too: its window needs only the last w, but one
  // cache layout serves both; the window is applied when reading).
  std::unique_ptr<DecodeCache> make_decode_cache(const LayerCtx& c, int64_t max_len) const override {
    auto cache = std::make_unique<QkvBlock::KvCache>();
    qkv_.init_cache(*cache, c, max_len);
    return cache;
  }

  void decode(const LayerCtx& c, DecodeCache& dc, const Tensor& x, const Tensor& out) const override {
    auto& cache = dynamic_cast<QkvBlock::KvCache&>(dc);
    const int64_t n = x.shape[0];
    const DecodeScratch s(x.dtype, {{n, H_, Dh_}, {n, H_ * Dh_}});
    qkv_.decode_qkv(c, cache, x, s[0]);
    ops::DecodeShape sh = qkv_.decode_shape(cache, n);
    sh.window = window_;
    ops::attention_decode(s[1], s[0], cache.k, cache.v, sh);
    qkv_.decode_out(c, s[1], out);
    cache.len += n;
  }

  double core_flops_per_token(int64_t T) const override {
    // QKᵀ and P·V, 2 flops per multiply-add, averaged over positions: causal sees (T+1)/2 keys,
    // a window at most w of them.
    double keys = window_ > 0 ? 0.0 : double(T + 1) / 2.0;
    if (window_ > 0) {
      double w = double(window_), t = double(T);
      keys = w >= t ? (t + 1) / 2 : (w * (w + 1) / 2 + (t - w) * w) / t;
    }
    return 2.0 * 2.0 * double(H_) * double(Dh_) * keys;
  }

 private:
  ModelConfig cfg_;
  QkvBlock qkv_;
  int64_t H_, Dh_;
  int64_t window_;
  int lse_ = -1;
};

}  // namespace

std::string cuda_unsupported_head_dim(const ModelConfig& cfg, cuda::AttnKernel kernel) {
  if (cuda::head_dims_supported(kernel, cfg.head_dim, cfg.head_dim)) return "";
  std::string sizes;  // the square pairs: those one head_dim can make
  for (const cuda::HeadDims& h : cuda::kHeadDims)
    if (h.dqk == h.dv && cuda::head_dims_supported(kernel, h.dqk, h.dv))
      sizes += (sizes.empty() ? "" : ", ") + std::to_string(h.dqk);
  return fmt::format("model.head_dim {} has no CUDA attention kernel for attention type {} (supported: {}); choose "
                     "one of those or run on the CPU with run.device=\"cpu\"",
                     cfg.head_dim, cfg.attention.type, sizes);
}

std::unique_ptr<Attention> make_attention(const ModelConfig& cfg) {
  const std::string& t = cfg.attention.type;
  if (t == "mha" || t == "swa") return std::make_unique<CausalAttention>(cfg);
  if (t == "dma") return make_dma_attention(cfg);
  if (t == "mla") return make_mla_attention(cfg);
  if (t == "nsa") return make_nsa_attention(cfg);
  fail("model.attention.type \"{}\" has no implementation in this build", t);
}

}  // namespace dmat
