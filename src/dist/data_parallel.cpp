#include "dist/data_parallel.h"

#include <algorithm>

namespace dmat::dist {

DataParallel::DataParallel(Model& model, Communicator& host, Communicator* device, int zero, int64_t bucket_bytes,
                           bool host_buckets)
    : model_(model), host_(host), device_(device), zero_(zero) {
  const Arena& g = model.grads();
  total_ = g.flat().numel();
  bucket_elems_ = std::max<int64_t>(1, bucket_bytes / int64_t(dtype_size(g.dtype())));
  if (model.device() == Device::CUDA && host.size() > 1)
    DMAT_CHECK(device_ && device_->device() == Device::CUDA, "CUDA data parallelism needs the NCCL communicator");
  if (zero_ == 1 && host.size() > 1) {
    part_ = Partition::even(total_, host.size(), kArenaAlign);
  } else {
    part_.offset.assign(size_t(host.size()), 0);
    part_.count.assign(size_t(host.size()), total_);
  }
  lo_ = part_.lo(host.rank());
  hi_ = part_.hi(host.rank());
  // Buckets during backward: only where a collective can run beside compute (its own CUDA stream).
  bucketed_ = zero_ == 0 && host.size() > 1 && (device_ != nullptr || host_buckets);
  if (bucketed_) model_.set_grad_ready_hook([this](int first, int last) { on_grads_ready(first, last); });
}

DataParallel::~DataParallel() {
  if (bucketed_) model_.set_grad_ready_hook(nullptr);
}

void DataParallel::begin_last_backward() {
  if (!bucketed_) return;
  armed_ = true;
  pend_lo_ = pend_hi_ = -1;
  launched_.clear();
  overlapped_ = 0;
  grad_comm().begin_async();
}

// Ranges arrive from the end of the arena towards its start (head, blocks L-1 … 0, embedding),
// each adjacent to the previous: they grow the pending bucket downwards until it is big enough.
void DataParallel::on_grads_ready(int first, int last) {
  if (!armed_) return;
  const Arena& g = model_.grads();
  const int n = int(model_.param_info().size());
  const int64_t lo = g.offset(first), hi = last + 1 < n ? g.offset(last + 1) : total_;  // padding included
  if (pend_lo_ >= 0 && hi != pend_lo_) {  // not adjacent: send what is pending first
    launch(pend_lo_, pend_hi_);
    pend_lo_ = pend_hi_ = -1;
  }
  if (pend_lo_ < 0) pend_hi_ = hi;
  pend_lo_ = lo;
  if (pend_hi_ - pend_lo_ >= bucket_elems_) {
    launch(pend_lo_, pend_hi_);
    pend_lo_ = pend_hi_ = -1;
  }
}

void DataParallel::launch(int64_t lo, int64_t hi) {
  if (hi <= lo) return;
  const Tensor f = model_.grads().flat();
  grad_comm().all_reduce(static_cast<char*>(f.data) + size_t(lo) * dtype_size(f.dtype), hi - lo, f.dtype, ReduceOp::Sum);
  launched_.push_back({lo, hi});
  overlapped_ += hi - lo;
}

void DataParallel::reduce_grads() {
  if (host_.size() == 1) return;
  const Tensor f = model_.grads().flat();
  if (zero_ == 1) {
    grad_comm().reduce_scatter(f.data, part_, f.dtype, ReduceOp::Sum);
    return;
  }
  if (!bucketed_) {
    grad_comm().all_reduce(f.data, total_, f.dtype, ReduceOp::Sum);
    return;
  }
  // The rest of the pending bucket, then whatever the hook did not report (nothing, normally).
  if (pend_lo_ >= 0) launch(pend_lo_, pend_hi_);
  pend_lo_ = pend_hi_ = -1;
  armed_ = false;
  std::sort(launched_.begin(), launched_.end());
  int64_t at = 0;
  const int64_t hooked = overlapped_;
  for (auto [lo, hi] : std::vector(launched_)) {
    if (lo > at) launch(at, lo);
    at = std::max(at, hi);
  }
  if (at < total_) launch(at, total_);
  overlapped_ = hooked;
  grad_comm().join();
}

void DataParallel::gather_weights() {
  if (zero_ != 1 || host_.size() == 1) return;
  const Tensor p = model_.params().flat();
  grad_comm().all_gather(p.data, part_, p.dtype);
}

void DataParallel::gather_master() {
  if (zero_ != 1 || host_.size() == 1 || !model_.master().defined()) return;
  const Tensor m = model_.master().flat();
  grad_comm().all_gather(m.data, part_, m.dtype);
}

}  // namespace dmat::dist
