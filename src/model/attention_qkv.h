// The projections every attention variant wraps its core in: before it, x → q, k, v (q/k/v_proj,
// optional per-head QK RMSNorm, RoPE); after it, o → out (o_proj); and their backward. One copy, so
// that the variants agree on the parameter and tensor names (checkpoints and the memory estimate
// read them) and on the order of the ops. The core between (causal, SWA, DMA) stays in its layer.
#pragma once
#include <cstdint>
#include <string>

#include "model/attention.h"
#include "ops/ops.h"

namespace dmat {

class QkvBlock {
 public:
  explicit QkvBlock(const ModelConfig& c);

  // q/k/v/o_proj.weight, then q_norm/k_norm.weight with QK-norm, under the layer's prefix.
  void declare_params(ParamTable& t, const std::string& p);
  // Two calls, with the layer's own activations (its core's statistics) declared in between, so
  // that every tensor keeps its place in the activation arena. declare_acts: q, k, v as the core
  // reads them and o, the core's output. declare_norm_and_scratch: what QK-norm's backward needs,
  // and the gradient scratch shared by all layers (backward runs one layer at a time).
  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T);
  void declare_norm_and_scratch(TensorTable& t, const std::string& p, int64_t B, int64_t T);

  // The core's operands: q [B,T,H,Dh], k and v [B,T,Hkv,Dh], o [B·T, H·Dh]; for gradients the
  // shared scratch, viewed at this micro-batch's shape (it is sized for the largest).
  struct Tensors {
    Tensor q, k, v, o;
  };
  Tensors saved(const LayerCtx& c) const;
  Tensors grads(const LayerCtx& c) const;
  // The core's shape for these q, k, v: full causal (window 0), scale 1/√Dh.
  cpu::AttnShape shape(const LayerCtx& c) const;
  // One head size for q, k and v, all of it rotated: d_qk = d_v = rope_dim = model.head_dim.
  AttentionDims dims(cuda::AttnKernel kernel) const { return {Dh_, Dh_, Dh_, kernel}; }

  // x: [B·T, d_model] → q, k, v (overwrite).
  void forward_qkv(const LayerCtx& c, const Tensor& x) const;
  // out = o_proj(o) (overwrite).
  void forward_out(const LayerCtx& c, const Tensor& out) const;
  // grads().o = ∂/∂o from dout; dW_o accumulates.
  void backward_out(const LayerCtx& c, const Tensor& dout) const;
  // From grads().q/k/v, as the core left them, to dx (overwrite); projection and QK-norm gain
  // gradients accumulate.
  void backward_qkv(const LayerCtx& c, const Tensor& x, const Tensor& dx) const;

  // Incremental decoding. The cache: k and v of every position so far, as the core reads them
  // (after QK-norm and RoPE), [capacity, Hkv, Dh] each. decode_qkv: for x [n, d_model] at positions
  // cache.len … cache.len + n − 1, q [n, H, Dh] (overwrite) and their k, v written into the cache rows
  // (len is not advanced): the values forward_qkv computes at those positions. decode_out: out =
  // o_proj(o), o [n, H·Dh].
  struct KvCache : DecodeCache {
    Arena arena;
    Tensor k, v;
  };
  void init_cache(KvCache& cache, const LayerCtx& c, int64_t max_len) const;
  void decode_qkv(const LayerCtx& c, KvCache& cache, const Tensor& x, const Tensor& q) const;
  void decode_out(const LayerCtx& c, const Tensor& o, const Tensor& out) const;
  // attention_decode's shape for n queries from cache.len, scale 1/√Dh, window 0.
  ops::DecodeShape decode_shape(const KvCache& cache, int64_t n) const;

 private:
  int64_t D_, H_, Hkv_, Dh_;
  double theta_, eps_;
  bool qk_norm_;
  // One GEMM for q, k and v over the three adjacent weights (N = (H + 2·Hkv)·Dh), its packed output
  // unpacked by the RoPE pass, and one GEMM each for dx and dW in the backward: without QK-norm,
  // wherever the arena places the weights back to back (H·Dh·d and Hkv·Dh·d multiples of its
  // alignment). Else one GEMM per projection.
  bool packed_;
  double std_, out_std_;
  int wq_ = -1, wk_ = -1, wv_ = -1, wo_ = -1, gq_ = -1, gk_ = -1;
  int q_ = -1, k_ = -1, v_ = -1, o_ = -1, qpre_ = -1, kpre_ = -1, rq_ = -1, rk_ = -1;
  int dq_ = -1, dk_ = -1, dv_ = -1, do_ = -1, dqn_ = -1, dkn_ = -1, qkv_ = -1;
  // q/k/v_proj.weight of one arena (parameters or gradients) as one [(H + 2·Hkv)·Dh, d] tensor.
  Tensor joined(const Arena& a) const;
};

}  // namespace dmat
