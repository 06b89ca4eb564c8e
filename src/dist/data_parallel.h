// Data parallelism over a model's flat arenas (parameters, gradients, fp32 master weights share
// one element layout, so a gradient bucket or an optimizer shard is just a range [lo, hi)).
//
//   DDP (zero 0): gradients are summed over ranks (each rank's loss is already scaled by
//     1/(global tokens), so the sum is the global mean). On CUDA with NCCL the sum runs in buckets
//     of ~bucket_bytes launched from Model's grad-ready hook during the last micro-step's backward,
//     on the communicator's stream; on the CPU it is one MPI all-reduce after backward.
//   ZeRO-1 (zero 1): gradients are reduce-scattered; each rank's optimizer updates its range of
//     the master weights and holds moments for that range only; the updated weights (bf16 working
//     copy on CUDA, fp32 on the CPU) are all-gathered. The fp32 master outside a rank's range goes
//     stale on CUDA and is gathered only when needed in full (checkpoints: gather_master()).
//
// With one rank every call is a no-op and the optimizer covers everything.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/communicator.h"
#include "model/model.h"

namespace dmat::dist {

class DataParallel {
 public:
  // host: the process's world (MPI or single). device: the NCCL communicator when the model is on
  // CUDA and there is more than one rank (else null). zero: 0 or 1.
  // host_buckets: run the bucketed all-reduce from the grad-ready hook on the host communicator too
  // (synchronous there, so nothing overlaps: used by tests to exercise the GPU path's bucketing).
  DataParallel(Model& model, Communicator& host, Communicator* device, int zero, int64_t bucket_bytes = 32 << 20,
               bool host_buckets = false);
  ~DataParallel();

  int rank() const { return host_.rank(); }
  int world() const { return host_.size(); }
  int zero() const { return zero_; }
  // The range of the flat arenas this rank's optimizer updates (everything unless ZeRO-1), and the
  // partition it belongs to (ZeRO: one range per rank; otherwise every rank the whole).
  int64_t shard_lo() const { return lo_; }
  int64_t shard_hi() const { return hi_; }
  const Partition& partition() const { return part_; }

  // Call right before the backward of the last micro-step of an update: gradients of that backward
  // may start being reduced as soon as they are final (CUDA + NCCL + DDP).
  void begin_last_backward();
  // After the last backward: gradients averaged over ranks (DDP: everywhere; ZeRO-1: this rank's range).
  void reduce_grads();
  // After the optimizer step (ZeRO-1): every rank's updated weights everywhere.
  void gather_weights();
  // Makes the full fp32 master weights valid on every rank (ZeRO-1 on CUDA; otherwise a no-op).
  void gather_master();

  // Elements reduced while backward was running in the last update (for the log; 0 on CPU).
  int64_t overlapped_elements() const { return overlapped_; }

 private:
  void on_grads_ready(int first, int last);
  void launch(int64_t lo, int64_t hi);
  Communicator& grad_comm() { return device_ ? *device_ : host_; }

  Model& model_;
  Communicator& host_;
  Communicator* device_;
  int zero_;
  int64_t bucket_elems_;
  int64_t total_ = 0, lo_ = 0, hi_ = 0;
  Partition part_;
  bool bucketed_ = false, armed_ = false;
  int64_t pend_lo_ = -1, pend_hi_ = -1, overlapped_ = 0;
  std::vector<std::pair<int64_t, int64_t>> launched_;
};

}  // namespace dmat::dist
