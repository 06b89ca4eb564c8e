// AdamW over a model's parameter arena: decoupled weight decay on the tensors that declare it (not
// on norms, gains, residual scales), and global-norm gradient clipping. On CUDA one multi-tensor
// launch updates the fp32 master weights and writes the bf16 working copy.
//
// The optimizer updates one range [lo, hi) of the flat arenas (parameters, gradients and master
// weights share one element layout): all of it for a single rank or plain data parallelism, this
// rank's shard under ZeRO-1. Moments (fp32 on CUDA) are held for that range only, so ZeRO-1 divides
// their memory by the number of ranks; the gradient norm is then summed over ranks.
#pragma once
#include <cstdint>
#include <vector>

#include "config/config.h"
#include "core/arena.h"
#include "model/model.h"
#include "ops/ops.h"

namespace dmat::dist {
class Communicator;
}

namespace dmat {

class AdamW {
 public:
  // hi < 0: to the end of the arena. comm: where a sharded gradient norm is summed (needed when
  // [lo, hi) is not everything; null otherwise).
  AdamW(const Model& model, const TrainConfig& cfg, int64_t lo = 0, int64_t hi = -1,
        dist::Communicator* comm = nullptr);

  // ‖g‖₂ over all parameters (computed in double; under ZeRO-1 from every rank's shard).
  double grad_norm() const;
  // Clips to cfg.grad_clip when it is > 0 and the norm exceeds it (scale clip / (norm + 1e-6), as
  // PyTorch's clip_grad_norm_). Returns the norm before clipping. On the GPU the scale is applied by
  // the next step() as it reads the gradients (same values; the gradient arena stays unscaled).
  double clip();
  // One update at learning rate lr; increments the step counter (bias correction uses it).
  void step(double lr);
  // Drops the update the last clip() prepared (a step whose update is skipped): the moments, the
  // weights and the step counter stay as they are.
  void discard_step() { clip_scale_ = 1.f; }

  int64_t steps_done() const { return t_; }
  void set_steps_done(int64_t t) { t_ = t; }
  int64_t lo() const { return lo_; }
  int64_t hi() const { return hi_; }
  // The moments of [lo, hi), flat (element i is arena element lo + i).
  Tensor m() const { return m_.flat().rows(0, hi_ - lo_); }
  Tensor v() const { return v_.flat().rows(0, hi_ - lo_); }

 private:
  const Model& model_;
  TrainConfig cfg_;
  int64_t lo_ = 0, hi_ = 0;
  dist::Communicator* comm_ = nullptr;
  Arena m_, v_;
  int64_t t_ = 0;
  float clip_scale_ = 1.f;  // CUDA: clip() scale awaiting step()
  using Segment = ops::AdamSegment;
  // The parameter tensors' parts inside [lo, hi) (arena offsets), in groups of one learning-rate
  // scale (ParamInfo::lr_scale): one update launch per group, so a model whose tensors all keep
  // scale 1 updates in one launch with exactly the unscaled arithmetic.
  struct Group {
    double lr_scale;
    std::vector<Segment> segs;
  };
  std::vector<Group> groups_;
};

}  // namespace dmat
