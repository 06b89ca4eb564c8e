// Dynamic Mask Attention (type "dma"; README "The model", arXiv 2508.02124, Hugging Face's DogeAttention): the
// q/k/v/o projections, optional QK-norm and RoPE of the causal layer (attention_qkv.h), plus a
// per-key bias computed from the values, bias = exp(A·softplus(v·W_dtᵀ)) (or A·softplus(·),
// bias_form "linear"), one per KV head and shared by its query group. Query i attends to the keys
// j <= i whose bias reaches the w-th largest bias among keys 0..i (ties all kept, see
// kernels/cpu/cpu_ops.h), with the bias added to its scores. Parameters dt_proj.weight
// [Hkv, Hkv·Dh] and A [Hkv] (A = 0 at init, so in the "exp" form every bias starts at 1, all keys
// tie and the layer starts as causal attention). Options for the investigation of DMA's quality
// (README "DMA options"): A's initial value, dt_proj's init spread, a learning-rate multiplier
// for both, and a local window of L most recent keys kept besides the top-w (our extension).
#include <fmt/format.h>

#include "model/attention.h"
#include "model/attention_qkv.h"
#include "ops/ops.h"

namespace dmat {
namespace {

class DmaAttention final : public Attention {
 public:
  explicit DmaAttention(const ModelConfig& c)
      : cfg_(c), qkv_(c), H_(c.n_heads), Hkv_(c.n_kv_heads), Dh_(c.head_dim), window_(c.attention.dma.window),
        local_(c.attention.dma.local_window),
        form_(c.attention.dma.bias_form == "linear" ? ops::DmaBiasForm::Linear : ops::DmaBiasForm::Exp),
        dt_std_(c.attention.dma.dt_init_std > 0 ? c.attention.dma.dt_init_std : c.init_std),
        a_init_(c.attention.dma.a_init), lr_scale_(c.attention.dma.bias_lr_scale) {
    DMAT_CHECK(window_ > 0, "dma attention needs window > 0 (got {})", window_);
    DMAT_CHECK(local_ >= 0, "dma attention needs local_window >= 0 (got {})", local_);
  }

  AttentionDims dims() const override { return qkv_.dims(cuda::AttnKernel::dma); }
  std::string cuda_unsupported() const override {
    // The local window's CUDA kernels (dense mode, dma.h) have not yet passed the gpu tests on a GPU;
    // until they have, a CUDA run is refused.
    if (local_ > 0)
      return fmt::format("model.attention.local_window {} is not yet verified on CUDA (its kernels await the gpu "
                         "tests); set it to 0 or run on the CPU with run.device=\"cpu\"",
                         local_);
    return cuda_unsupported_head_dim(cfg_, cuda::AttnKernel::dma);
  }

  void declare_params(ParamTable& t, const std::string& p) override {
    qkv_.declare_params(t, p);
    wdt_ = t.add({.name = p + "dt_proj.weight", .shape = {Hkv_, Hkv_ * Dh_}, .group = "attention",
                  .init = Init::Normal, .std = dt_std_, .decay = true, .lr_scale = lr_scale_});
    a_ = t.add({.name = p + "A", .shape = {Hkv_}, .group = "attention",
                .init = a_init_ == 0 ? Init::Zeros : Init::Constant, .std = a_init_, .decay = false,
                .lr_scale = lr_scale_});
  }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) override {
    qkv_.declare_acts(t, p, B, T);
    lse_ = t.add_stat(p + "lse", {B, H_, T});
    // The mask: two O(T) vectors per KV head (statistics: fp32 on CUDA). dbias too, per layer:
    // B·Hkv·T values, negligible, and a bias gradient summed over queries wants fp32.
    z_ = t.add_stat(p + "dma_z", {B, Hkv_, T});
    bias_ = t.add_stat(p + "dma_bias", {B, Hkv_, T});
    thr_ = t.add_stat(p + "dma_thr", {B, Hkv_, T});
    dbias_ = t.add_stat(p + "dma_dbias", {B, Hkv_, T});
    qkv_.declare_norm_and_scratch(t, p, B, T);
  }

  // The shape's window is the local window (0 for the paper's DMA): w lives in the thresholds.
  cpu::AttnShape shape(const LayerCtx& c) const {
    cpu::AttnShape s = qkv_.shape(c);
    s.window = local_;
    return s;
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) override {
    qkv_.forward_qkv(c, x);
    const auto [q, k, v, o] = qkv_.saved(c);
    ops::dma_bias_forward(c.A(z_), c.A(bias_), v, c.P(wdt_), c.P(a_), form_);
    ops::dma_thresholds(c.A(thr_), c.A(bias_), window_, local_);
    ops::dma_attention_forward(o, c.A(lse_), q, k, v, c.A(bias_), c.A(thr_), shape(c), window_);
    qkv_.forward_out(c, out);
  }

  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) override {
    const auto [q, k, v, o] = qkv_.saved(c);
    const auto [dq, dk, dv, dO] = qkv_.grads(c);
    qkv_.backward_out(c, dout);
    ops::dma_attention_backward(dq, dk, dv, c.A(dbias_), dO, o, c.A(lse_), q, k, v, c.A(bias_), c.A(thr_), shape(c),
                                window_);
    // v feeds the bias too: its second share of dv, and dW_dt, dA.
    ops::dma_bias_backward(dv, c.G(wdt_), c.G(a_), c.A(dbias_), c.A(z_), c.A(bias_), v, c.P(wdt_), c.P(a_), form_);
    qkv_.backward_qkv(c, x, dx);
  }

  // Decoding caches k, v and every key's bias b_{h,j} ([Hkv, capacity]), and per KV head the w
  // largest biases among the keys the next query tests (cpu::DmaTopW): the new query's threshold
  // costs O(log w) per key, its kept keys one test per cached key, and no N×N mask exists. A
  // query keeps exactly the keys of the training forward (the same threshold value, ties all kept).
  struct DmaCache : QkvBlock::KvCache {
    Arena bias_arena;
    Tensor bias;  // [Hkv, capacity]
    std::vector<cpu::DmaTopW> top;
    int64_t window = 0, local = 0;
    // The running top-w rebuilt from the cached biases: the pushes decode() made for positions
    // 0 … new_len − 1 (key i − L for position i), in the same order.
    void rewind(int64_t new_len) override {
      DecodeCache::rewind(new_len);
      for (size_t h = 0; h < top.size(); ++h) {
        top[h] = cpu::DmaTopW(window);
        for (int64_t i = local; i < new_len; ++i) top[h].push(host_element(bias, int64_t(h) * capacity + i - local));
      }
    }
  };

  std::unique_ptr<DecodeCache> make_decode_cache(const LayerCtx& c, int64_t max_len) const override {
    auto cache = std::make_unique<DmaCache>();
    qkv_.init_cache(*cache, c, max_len);
    TensorTable t;
    t.add("bias", {Hkv_, max_len});
    cache->bias_arena = Arena(t, c.P(a_).dtype, Device::CPU);
    cache->bias = cache->bias_arena.get(0);
    cache->top.assign(size_t(Hkv_), cpu::DmaTopW(window_));
    cache->window = window_, cache->local = local_;
    cache->what += fmt::format("; key biases: {} per position, and the {} largest per KV head", Hkv_, window_);
    cache->values_per_position += Hkv_;
    return cache;
  }

  void decode(const LayerCtx& c, DecodeCache& dc, const Tensor& x, const Tensor& out) const override {
    auto& cache = dynamic_cast<DmaCache&>(dc);
    const int64_t n = x.shape[0], pos0 = cache.len, cap = cache.capacity;
    const DecodeScratch s(x.dtype, {{n, H_, Dh_}, {n, H_ * Dh_}, {1, Hkv_, n}, {1, Hkv_, n}, {n, Hkv_}});
    const Tensor q = s[0], o = s[1], z = s[2], b = s[3], thr = s[4];
    qkv_.decode_qkv(c, cache, x, q);
    // the new keys' biases, as dma_bias_forward computes them in training, into the cache
    ops::dma_bias_forward(z, b, cache.v.rows(pos0, n).view({1, n, Hkv_, Dh_}), c.P(wdt_), c.P(a_), form_);
    const Tensor bias_flat = cache.bias.view({Hkv_ * cap});
    for (int64_t h = 0; h < Hkv_; ++h) ops::copy(bias_flat.rows(h * cap + pos0, n), b.view({Hkv_ * n}).rows(h * n, n));
    // each new query's threshold: push the key it newly tests (i − L), read the w-th largest
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = pos0 + r;
      for (int64_t h = 0; h < Hkv_; ++h) {
        cpu::DmaTopW& top = cache.top[size_t(h)];
        if (i - local_ >= 0) top.push(host_element(bias_flat, h * cap + i - local_));
        if (top.saw_nan())
          fail("dma attention: a key bias is NaN (diverged? see model.attention.bias_form and the A parameters)");
        set_host_element(thr, r * Hkv_ + h, top.threshold());
      }
    }
    ops::DecodeShape sh = qkv_.decode_shape(cache, n);
    sh.window = local_;
    ops::attention_decode(o, q, cache.k, cache.v, sh, cache.bias, cap, thr);
    qkv_.decode_out(c, o, out);
    cache.len += n;
  }

  double core_flops_per_token(int64_t T) const override {
    // QKᵀ and P·V over the kept keys: min(i+1, w + L) per query (ties at the threshold aside), as SWA.
    const double w = double(window_ + local_), t = double(T);
    const double keys = w >= t ? (t + 1) / 2 : (w * (w + 1) / 2 + (t - w) * w) / t;
    return 2.0 * 2.0 * double(H_) * double(Dh_) * keys;
  }

 private:
  ModelConfig cfg_;
  QkvBlock qkv_;
  int64_t H_, Hkv_, Dh_;
  int64_t window_, local_;
  ops::DmaBiasForm form_;
  double dt_std_, a_init_, lr_scale_;
  int wdt_ = -1, a_ = -1;
  int lse_ = -1, z_ = -1, bias_ = -1, thr_ = -1, dbias_ = -1;
};

}  // namespace

std::unique_ptr<Attention> make_dma_attention(const ModelConfig& cfg) { return std::make_unique<DmaAttention>(cfg); }

}  // namespace dmat
