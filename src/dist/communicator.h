// Ranks and collectives. One interface, three implementations:
//   single  world of one, no MPI at all (plain `dmatrain train` without mpirun);
//   mpi     host buffers over MPI (CPU training, and the host side of every multi-rank run:
//           checkpoint gathers, metric reductions, agreement on signals);
//   nccl    CUDA buffers over NCCL (GPU gradients and weights), bootstrapped through the MPI
//           communicator (rank 0's ncclUniqueId is broadcast), compiled only with DMAT_WITH_NCCL.
// Collectives are in place and every rank passes the same count, dtype and partition.
//
// Faults: abort() prints the message and ends every rank (MPI_Abort); a collective that runs longer
// than set_timeout() allows is turned into such an abort by a watchdog thread (watchdog.h), so a
// lost or stuck peer becomes an error within a bounded time, never a hang.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dmat::dist {

enum class ReduceOp { Sum, Avg, Max };

// A flat buffer cut into one contiguous range per rank: rank r owns [offset[r], offset[r]+count[r]).
// Ranges tile [0, total) in rank order.
struct Partition {
  std::vector<int64_t> offset, count;
  // Near-equal ranges whose boundaries are multiples of `align` elements (the last may be shorter).
  static Partition even(int64_t total, int world, int64_t align = 1);
  int64_t lo(int r) const { return offset[size_t(r)]; }
  int64_t hi(int r) const { return offset[size_t(r)] + count[size_t(r)]; }
  int64_t total() const { return offset.empty() ? 0 : hi(int(offset.size()) - 1); }
  bool equal_counts() const;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int local_rank() const = 0;  // rank among the ranks of this node (shared-memory split)
  virtual int local_size() const = 0;
  virtual Device device() const = 0;   // where buffers live: CPU (single, mpi) or CUDA (nccl)
  virtual const char* backend() const = 0;

  // buf (count elements of dt) ← the reduction over ranks. Avg divides the sum by size().
  virtual void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) = 0;
  // On a full-size buffer: afterwards this rank's range of `part` holds the reduction of that range
  // over ranks; the rest of buf is undefined.
  virtual void reduce_scatter(void* buf, const Partition& part, DType dt, ReduceOp op) = 0;
  // On a full-size buffer holding (at least) this rank's range: afterwards all ranges everywhere.
  virtual void all_gather(void* buf, const Partition& part, DType dt) = 0;
  // Rank r's range of `part` from `shard` (count[r] elements) into `full` on root (a full-size
  // buffer; ignored elsewhere).
  virtual void gather(const void* shard, void* full, const Partition& part, DType dt, int root) = 0;
  virtual void broadcast(void* buf, int64_t count, DType dt, int root) = 0;
  virtual void barrier() = 0;
  // Prints "error: [rank R] message" to stderr and ends all ranks with a non-zero exit status.
  [[noreturn]] virtual void abort(const std::string& message) = 0;
  // A collective still running after `seconds` aborts the job (0: no limit). No-op for a world of one.
  virtual void set_timeout(double seconds) {}

  // Device backends (NCCL) queue collectives on their own stream after the work already queued on
  // the compute stream. Normally the compute stream then waits for each one (plain stream order).
  // Between begin_async() and join() it does not: backward keeps computing while gradient buckets
  // are reduced, and join() makes the compute stream wait for all of them. Host backends are
  // synchronous, so both are no-ops there.
  virtual void begin_async() {}
  virtual void join() {}

  // Conveniences on host values.
  double all_reduce(double x, ReduceOp op) {
    all_reduce(&x, 1, DType::F64, op);
    return x;
  }
  void broadcast(std::string& s, int root);
};

// The communicator of this process's ranks: MPI when launched by mpirun/srun (the launcher's
// environment variables are present; MPI is initialised once, finalised at exit), otherwise the
// single-process one. Process-wide, like MPI itself.
Communicator& world();
// Whether the environment says this process was started by an MPI launcher.
bool launched_by_mpi();

// The NCCL communicator over the ranks of `host` (an MPI world), on the CUDA device already
// selected. Throws naming the cause when this build has no NCCL.
std::unique_ptr<Communicator> make_nccl(Communicator& host);
bool nccl_built();

// Selects this rank's GPU: device local_rank, or device 0 when each rank sees only one (a launcher
// that sets CUDA_VISIBLE_DEVICES per rank); more ranks than GPUs on a node is an error. Returns the
// device (-1 without CUDA or without a device).
int select_local_device(const Communicator& comm);

}  // namespace dmat::dist
