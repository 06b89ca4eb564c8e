// The decoder-only language model (LLaMA-style, Doge-compatible):
//   h = embed(tokens)
//   per block: h = r₁ ⊙ h + Attention(RMSNorm(h));  h = r₂ ⊙ h + SwiGLU(RMSNorm(h))
//   logits = RMSNorm(h) · W_outᵀ (W_out = embedding when tied); loss = mean cross-entropy.
// r₁, r₂ are learned per-channel residual scales (model.residual_scale) or 1.
// Forward and backward are written by hand as a list of op calls; parameters, gradients and
// activations each live in one arena.
//
// Precision: on the CPU one float type throughout (f32 to train, f64 for gradient checks). On CUDA
// (dtype BF16): bf16 weights and activations, fp32 master weights (the truth, saved in
// checkpoints), fp32 gradients accumulated across micro-steps, fp32 norm/softmax statistics.
// The LM head and the cross-entropy run in row chunks, with the head's backward done right after
// each chunk's loss, so logits for the whole batch never exist at once on the GPU.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/arena.h"
#include "model/attention.h"
#include "model/params.h"

namespace dmat {

class Model {
 public:
  // recompute: keep only each block's input and recompute its activations in backward.
  Model(const ModelConfig& cfg, DType dtype = DType::F32, Device device = Device::CPU, bool recompute = false);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const std::vector<ParamInfo>& param_info() const { return ptable_.info(); }
  const TensorTable& param_table() const { return ptable_.table(); }
  const Arena& params() const { return params_; }
  const Arena& grads() const { return grads_; }
  // fp32 master weights on CUDA (undefined on the CPU, where params() are the master copy).
  const Arena& master() const { return master_; }
  // The weights in full precision on the host (a copy), and setting them from such a copy
  // (CUDA: master updated, bf16 working copy re-derived).
  Arena host_weights() const;
  void set_weights(const Arena& host);
  // After the fp32 master changed (optimizer step on CUDA): refresh the bf16 working copy.
  void sync_working_copy();
  int64_t num_params() const;  // real elements (no padding)
  void zero_grad() { grads_.zero(); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  // Deterministic from the seed (each tensor from its own counter-based stream), see README.
  void init_weights(uint64_t seed);

  // Sum of the loss over positions whose target is >= 0; *n_valid gets their count. When
  // grad_scale > 0 the logits' gradient (grad_scale · ∂Σloss/∂logits) is prepared for backward();
  // otherwise logits() holds the logits afterwards (CPU). inputs/targets: host arrays [B·T].
  // n_correct (evaluation, grad_scale = 0): the positions with target >= 0 whose argmax over the
  // logits (the lowest id among equal maxima) is the target (CUDA: each logits chunk is copied to
  // the host for it).
  double forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, double grad_scale,
                 int64_t* n_valid = nullptr, int64_t* n_correct = nullptr);
  // Accumulates parameter gradients (+=) for the last forward (which must have had grad_scale > 0).
  void backward();
  Tensor logits() const;  // [B·T, vocab]
  // The last forward's loss of each of its B·T positions, in double on the host (0 where the
  // target was < 0): row b·T + t is sequence b, position t.
  std::vector<double> position_losses() const;

  // Incremental decoding (`dmatrain generate`; CPU backend, one sequence). A DecodeState holds every
  // layer's cache (attention.h) for up to max_len positions; decode() feeds n >= 1 tokens at
  // positions state.len() … (a prompt at once, then one token per step) and returns the logits of
  // the last one, as forward() on the whole sequence computes them at that position (to rounding).
  // A variant without decoding is refused by start_decode, naming it.
  class DecodeState {
   public:
    int64_t len() const { return len_; }
    int64_t capacity() const { return capacity_; }
    std::string describe() const;  // what a layer caches per position
    // Forgets the positions from new_len on (0 <= new_len <= len()): decoding then continues as if
    // only the first new_len tokens had been fed (DecodeCache::rewind, every layer).
    void rewind(int64_t new_len);

   private:
    friend class Model;
    std::vector<std::unique_ptr<DecodeCache>> layers_;
    int64_t len_ = 0, capacity_ = 0;
  };
  std::unique_ptr<DecodeState> start_decode(int64_t max_len) const;
  std::vector<double> decode(DecodeState& state, const int32_t* tokens, int64_t n) const;

  // Sizes without allocating anything (for `dmatrain info`).
  static ParamTable declare_params(const ModelConfig& cfg);
  // Activation arena bytes for a dtype (BF16: statistics in fp32), with or without recomputation.
  static size_t activation_bytes(const ModelConfig& cfg, int64_t B, int64_t T, DType dtype, bool recompute);
  // Rows of the LM head / cross-entropy chunk for N = B·T rows.
  static int64_t head_chunk_rows(const ModelConfig& cfg, int64_t N, Device device);
  void set_deterministic(bool on) { deterministic_ = on; }
  // Called by backward() with parameter handles [first, last] as soon as their gradients are
  // final for this backward: final norm and LM head, then each block from the last, then the
  // embedding. Data parallelism starts reducing those gradients while backward continues.
  void set_grad_ready_hook(std::function<void(int first, int last)> hook) { grad_ready_ = std::move(hook); }

  struct Block;

 private:
  struct NoAlloc {};
  Model(const ModelConfig& cfg, NoAlloc, bool recompute = false);
  TensorTable act_table(int64_t B, int64_t T);
  void reserve(int64_t B, int64_t T);
  LayerCtx ctx() const;

  void head_loss(const int32_t* targets, double grad_scale, int64_t* n_correct);
  double sum_loss(int64_t N);

  ModelConfig cfg_;
  DType dtype_;
  Device device_;
  bool recompute_ = false, deterministic_ = true;
  ParamTable ptable_;
  Arena params_, grads_, master_, acts_, tokens_dev_;
  std::vector<std::unique_ptr<Block>> blocks_;
  int h_embed_ = -1, h_norm_ = -1, h_head_ = -1;  // head: -1 when tied
  // activations
  int64_t B_ = 0, T_ = 0;
  std::vector<int> a_resid_;  // L+1 residual stream states [B·T, D]
  int a_lnf_ = -1, a_rstdf_ = -1, a_logits_ = -1, a_loss_ = -1, s_dres_ = -1, s_dres2_ = -1, s_dln_ = -1,
      s_block_out_ = -1;
  int64_t head_rows_ = 0;  // rows per LM-head chunk
  std::vector<int32_t> inputs_, targets_;
  bool have_grad_ = false;
  std::function<void(int, int)> grad_ready_;
};

}  // namespace dmat
