// AdamW over a model's parameter arena: moments in arenas laid out like the parameters (fp32 on
// CUDA), decoupled weight decay on the tensors that declare it (not on norms, gains, residual
// scales), and global-norm gradient clipping. On CUDA one multi-tensor launch updates the fp32
// master weights and writes the bf16 working copy.
#pragma once
#include <cstdint>
#include <vector>

#include "config/config.h"
#include "core/arena.h"
#include "model/model.h"

namespace dmat {

class AdamW {
 public:
  AdamW(const Model& model, const TrainConfig& cfg);

  // ‖g‖₂ over all parameters (computed in double).
  double grad_norm() const;
  // Clips to cfg.grad_clip when it is > 0 and the norm exceeds it (scale clip / (norm + 1e-6), as
  // PyTorch's clip_grad_norm_). Returns the norm before clipping.
  double clip();
  // One update at learning rate lr; increments the step counter (bias correction uses it).
  void step(double lr);

  int64_t steps_done() const { return t_; }
  void set_steps_done(int64_t t) { t_ = t; }
  const Arena& m() const { return m_; }
  const Arena& v() const { return v_; }

 private:
  const Model& model_;
  TrainConfig cfg_;
  Arena m_, v_;
  int64_t t_ = 0;
  struct Segment {
    int64_t offset, n;
    float weight_decay;
  };
  std::vector<Segment> segs_;  // CUDA: one per parameter tensor of the flat arenas
};

}  // namespace dmat
