// The decoder-only language model (LLaMA-style, Doge-compatible):
//   h = embed(tokens)
//   per block: h = r₁ ⊙ h + Attention(RMSNorm(h));  h = r₂ ⊙ h + SwiGLU(RMSNorm(h))
//   logits = RMSNorm(h) · W_outᵀ (W_out = embedding when tied); loss = mean cross-entropy.
// r₁, r₂ are learned per-channel residual scales (model.residual_scale) or 1.
// Forward and backward are written by hand as a list of op calls; parameters, gradients and
// activations each live in one arena.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "config/config.h"
#include "core/arena.h"
#include "model/attention.h"
#include "model/params.h"

namespace dmat {

class Model {
 public:
  Model(const ModelConfig& cfg, DType dtype = DType::F32, Device device = Device::CPU);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const std::vector<ParamInfo>& param_info() const { return ptable_.info(); }
  const TensorTable& param_table() const { return ptable_.table(); }
  const Arena& params() const { return params_; }
  const Arena& grads() const { return grads_; }
  int64_t num_params() const;  // real elements (no padding)
  void zero_grad() { grads_.zero(); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  // Deterministic from the seed (each tensor from its own counter-based stream), see README.
  void init_weights(uint64_t seed);

  // Sum of the loss over positions whose target is >= 0; *n_valid gets their count. When
  // grad_scale > 0 the logits' gradient (grad_scale · ∂Σloss/∂logits) is prepared for backward();
  // otherwise logits() holds the logits afterwards. inputs/targets: [B·T].
  double forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, double grad_scale,
                 int64_t* n_valid = nullptr);
  // Accumulates parameter gradients (+=) for the last forward (which must have had grad_scale > 0).
  void backward();
  Tensor logits() const;  // [B·T, vocab]

  // Sizes without allocating anything (for `dmatrain info`).
  static ParamTable declare_params(const ModelConfig& cfg);
  static int64_t activation_elements(const ModelConfig& cfg, int64_t B, int64_t T);

  struct Block;

 private:
  struct NoAlloc {};
  Model(const ModelConfig& cfg, NoAlloc);
  TensorTable act_table(int64_t B, int64_t T);
  void reserve(int64_t B, int64_t T);
  LayerCtx ctx() const;

  ModelConfig cfg_;
  DType dtype_;
  Device device_;
  ParamTable ptable_;
  Arena params_, grads_, acts_;
  std::vector<std::unique_ptr<Block>> blocks_;
  int h_embed_ = -1, h_norm_ = -1, h_head_ = -1;  // head: -1 when tied
  // activations
  int64_t B_ = 0, T_ = 0;
  std::vector<int> a_resid_;  // L+1 residual stream states [B·T, D]
  int a_lnf_ = -1, a_rstdf_ = -1, a_logits_ = -1, a_loss_ = -1, s_dres_ = -1, s_dres2_ = -1, s_dln_ = -1;
  std::vector<int32_t> inputs_, targets_;
  bool have_grad_ = false;
};

}  // namespace dmat
