#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "dist/communicator.h"
#include "ops/ops.h"

namespace dmat {

namespace {
Arena moments(int64_t n, DType dt, Device dev) {
  TensorTable t;
  t.add("moments", {std::max<int64_t>(n, 1)});
  return Arena(t, dt, dev);
}
}  // namespace

AdamW::AdamW(const Model& model, const TrainConfig& cfg, int64_t lo, int64_t hi, dist::Communicator* comm)
    : model_(model), cfg_(cfg), comm_(comm) {
  const int64_t total = model.grads().flat().numel();
  lo_ = lo;
  hi_ = hi < 0 ? total : hi;
  DMAT_CHECK(0 <= lo_ && lo_ <= hi_ && hi_ <= total, "optimizer range [{}, {}) of {}", lo_, hi_, total);
  DMAT_CHECK(comm_ || (lo_ == 0 && hi_ == total), "a sharded optimizer needs a communicator for the norm");
  m_ = moments(hi_ - lo_, model.grads().dtype(), model.grads().device());
  v_ = moments(hi_ - lo_, model.grads().dtype(), model.grads().device());
  const auto& info = model.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    const int64_t a = model.grads().offset(int(i)), b = a + info[i].shape.numel();
    const int64_t s = std::max(a, lo_), e = std::min(b, hi_);
    if (s >= e) continue;
    auto g = std::find_if(groups_.begin(), groups_.end(), [&](const Group& x) { return x.lr_scale == info[i].lr_scale; });
    if (g == groups_.end()) g = groups_.insert(groups_.end(), Group{info[i].lr_scale, {}});
    g->segs.push_back({s, e - s, float(info[i].decay ? cfg.weight_decay : 0.0)});
  }
}

double AdamW::grad_norm() const {
  double ss = ops::sum_squares(model_.grads().flat().rows(lo_, hi_ - lo_));
  if (lo_ != 0 || hi_ != model_.grads().flat().numel()) ss = comm_->all_reduce(ss, dist::ReduceOp::Sum);
  return std::sqrt(ss);
}

double AdamW::clip() {
  const double norm = grad_norm();
  if (cfg_.grad_clip > 0 && norm > cfg_.grad_clip) {
    const double s = cfg_.grad_clip / (norm + 1e-6);
    // CUDA: the update kernel scales each gradient as it reads it (the same fp32 product), which
    // saves a pass over the gradient arena.
    if (model_.device() == Device::CUDA) clip_scale_ = float(s);
    else ops::scale_inplace(model_.grads().flat().rows(lo_, hi_ - lo_), s);
  }
  return norm;
}

void AdamW::step(double lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t_)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t_));
  if (model_.device() == Device::CUDA) {
    const Tensor master = model_.master().flat(), p = model_.params().flat(), g = model_.grads().flat();
    for (const Group& gr : groups_)
      ops::adamw_step_segments(master, p, g, m_.flat(), v_.flat(), lo_, gr.segs, lr * gr.lr_scale, cfg_.beta1,
                               cfg_.beta2, cfg_.eps, bc1, bc2, clip_scale_);
    clip_scale_ = 1.f;
    return;
  }
  const Tensor p = model_.params().flat(), g = model_.grads().flat(), m = m_.flat(), v = v_.flat();
  for (const Group& gr : groups_)
    for (const Segment& s : gr.segs)
      ops::adamw_step(p.rows(s.offset, s.n), g.rows(s.offset, s.n), m.rows(s.offset - lo_, s.n),
                      v.rows(s.offset - lo_, s.n), lr * gr.lr_scale, cfg_.beta1, cfg_.beta2, cfg_.eps,
                      s.weight_decay, bc1, bc2);
}

}  // namespace dmat
