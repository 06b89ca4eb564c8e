#include "optim/adamw.h"

#include <cmath>

#include "ops/ops.h"

#ifdef DMAT_WITH_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

namespace dmat {

AdamW::AdamW(const Model& model, const TrainConfig& cfg)
    : model_(model),
      cfg_(cfg),
      m_(model.param_table(), model.grads().dtype(), model.grads().device()),
      v_(model.param_table(), model.grads().dtype(), model.grads().device()) {
  const auto& info = model.param_info();
  for (size_t i = 0; i < info.size(); ++i)
    segs_.push_back({model.grads().offset(int(i)), info[i].shape.numel(),
                     float(info[i].decay ? cfg.weight_decay : 0.0)});
}

double AdamW::grad_norm() const { return std::sqrt(ops::sum_squares(model_.grads().flat())); }

double AdamW::clip() {
  const double norm = grad_norm();
  if (cfg_.grad_clip > 0 && norm > cfg_.grad_clip) ops::scale_inplace(model_.grads().flat(), cfg_.grad_clip / (norm + 1e-6));
  return norm;
}

void AdamW::step(double lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  if (model_.device() == Device::CUDA) {
#ifdef DMAT_WITH_CUDA
    static_assert(sizeof(Segment) == sizeof(cuda::AdamSegment));
    const Tensor master = model_.master().flat(), p = model_.params().flat(), g = model_.grads().flat();
    cuda::adamw_step(master.as<float>(), p.as<bf16>(), g.as<float>(), m_.flat().as<float>(), v_.flat().as<float>(),
                     reinterpret_cast<const cuda::AdamSegment*>(segs_.data()), int(segs_.size()), float(lr),
                     float(cfg_.beta1), float(cfg_.beta2), float(cfg_.eps), float(bc1), float(bc2), 1.0f);
    return;
#endif
  }
  const auto& info = model_.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    const int h = int(i);
    ops::adamw_step(model_.params().get(h), model_.grads().get(h), m_.get(h), v_.get(h), lr, cfg_.beta1, cfg_.beta2,
                    cfg_.eps, info[i].decay ? cfg_.weight_decay : 0.0, bc1, bc2);
  }
}

}  // namespace dmat
