// The attention interface every variant implements (MHA/GQA and SWA now; DMA, MLA and NSA plug in
// here). A variant owns its parameters (declared under `prefix`), declares the activations it
// saves for backward, and runs forward and backward on the block's normalised input.
#pragma once
#include <memory>
#include <string>

#include "config/config.h"
#include "core/arena.h"
#include "model/params.h"

namespace dmat {

// What a layer sees while running: the model's arenas and the micro-batch shape.
struct LayerCtx {
  const Arena* params = nullptr;
  const Arena* grads = nullptr;
  const Arena* acts = nullptr;
  int64_t B = 0, T = 0;
  bool deterministic = true;  // CUDA kernels without float atomics
  Tensor P(int h) const { return params->get(h); }
  Tensor G(int h) const { return grads->get(h); }
  Tensor A(int h) const { return acts->get(h); }
};

class Attention {
 public:
  virtual ~Attention() = default;
  virtual void declare_params(ParamTable& t, const std::string& prefix) = 0;
  // Saved activations (per layer: unique names under prefix) and scratch (shared names).
  virtual void declare_acts(TensorTable& t, const std::string& prefix, int64_t B, int64_t T) = 0;
  // x: [B·T, d_model] normalised block input; out: [B·T, d_model] (overwrite).
  virtual void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) = 0;
  // dout: gradient of out; dx: gradient of x (overwrite). Parameter gradients accumulate.
  virtual void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) = 0;
  // Forward FLOPs per token of the attention core (scores and weighted sum) at sequence length T,
  // for `dmatrain info` (projections are counted with the parameters).
  virtual double core_flops_per_token(int64_t T) const = 0;
};

std::unique_ptr<Attention> make_attention(const ModelConfig& cfg);
// The variants in files of their own (make_attention picks by model.attention.type).
std::unique_ptr<Attention> make_dma_attention(const ModelConfig& cfg);  // attention_dma.cpp

}  // namespace dmat
