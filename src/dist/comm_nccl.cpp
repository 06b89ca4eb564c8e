// The NCCL communicator: CUDA buffers, one NCCL communicator per process (one GPU per rank),
// bootstrapped by broadcasting rank 0's ncclUniqueId over the host (MPI) communicator. Collectives
// run on a stream of their own, ordered against the compute stream (dmat::cuda::stream()) by
// events; see Communicator::begin_async / join. Built only with DMAT_WITH_NCCL.
#include "dist/communicator.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(DMAT_WITH_CUDA)
#include "kernels/cuda/context.h"
#endif

#if defined(DMAT_WITH_NCCL)
#include <nccl.h>

#include "dist/watchdog.h"
#endif

namespace dmat::dist {

int select_local_device(const Communicator& comm) {
#if defined(DMAT_WITH_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return -1;
  }
  // One visible device per rank: the launcher already gave each rank its own (CUDA_VISIBLE_DEVICES).
  if (comm.local_size() > n && n != 1)
    fail("{} ranks run on this node but it has {} visible GPU(s): start one rank per GPU (mpirun -np / --map-by)",
         comm.local_size(), n);
  const int dev = n == 1 ? 0 : comm.local_rank();
  DMAT_CUDA_CHECK(cudaSetDevice(dev));
  return dev;
#else
  return -1;
#endif
}

#if !defined(DMAT_WITH_NCCL)

bool nccl_built() { return false; }

std::unique_ptr<Communicator> make_nccl(Communicator&) {
  fail("multi-GPU training needs NCCL, and this build has none (install NCCL where CMake finds nccl.h and "
       "libnccl, e.g. in the CUDA toolkit, and rebuild with -DDMAT_CUDA=ON)");
}

#else

bool nccl_built() { return true; }

namespace {

#define DMAT_NCCL_CHECK(call)                                                                   \
  do {                                                                                          \
    ncclResult_t _r = (call);                                                                   \
    if (_r != ncclSuccess) fail("NCCL: {} failed: {} ({})", #call, ncclGetErrorString(_r),      \
                                ncclGetLastError(nullptr) ? ncclGetLastError(nullptr) : ""); \
  } while (0)

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    case DType::U32: return ncclUint32;
    case DType::U16: return ncclBfloat16;  // moved, never reduced
  }
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
  }
  return ncclSum;
}

char* at(void* p, int64_t elems, DType dt) { return static_cast<char*>(p) + size_t(elems) * dtype_size(dt); }

class NcclComm final : public Communicator {
 public:
  explicit NcclComm(Communicator& host) : host_(host) {
    DMAT_CUDA_CHECK(cudaGetDevice(&dev_));
    ncclUniqueId id;
    if (host.rank() == 0) DMAT_NCCL_CHECK(ncclGetUniqueId(&id));
    static_assert(sizeof(ncclUniqueId) % 4 == 0);
    host.broadcast(&id, int64_t(sizeof(id) / 4), DType::U32, 0);
    DMAT_NCCL_CHECK(ncclCommInitRank(&comm_, host.size(), id, host.rank()));
    DMAT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
  }
  ~NcclComm() override {
    watchdog_.reset();
    cudaStreamSynchronize(stream_);
    ncclCommDestroy(comm_);
    cudaEventDestroy(compute_done_);
    cudaEventDestroy(comm_done_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  int local_rank() const override { return host_.local_rank(); }
  int local_size() const override { return host_.local_size(); }
  Device device() const override { return Device::CUDA; }
  const char* backend() const override { return "nccl"; }

  void set_timeout(double seconds) override {
    watchdog_.reset();
    if (seconds > 0 && size() > 1)
      watchdog_ = std::make_unique<Watchdog>(seconds, [this](const std::string& m) { abort(m); });
  }

  void begin_async() override { async_ = true; }
  void join() override {
    async_ = false;
    DMAT_CUDA_CHECK(cudaEventRecord(comm_done_, stream_));
    DMAT_CUDA_CHECK(cudaStreamWaitEvent(cuda::stream(), comm_done_, 0));
  }

  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    before();
    DMAT_NCCL_CHECK(ncclAllReduce(buf, buf, size_t(count), nccl_type(dt), nccl_op(op), comm_, stream_));
    after("all_reduce", count, dt);
  }

  void reduce_scatter(void* buf, const Partition& part, DType dt, ReduceOp op) override {
    before();
    if (part.equal_counts()) {
      // in place: the result of rank r lands at buf + r·count, where NCCL expects it
      const size_t n = size_t(part.count[0]);
      DMAT_NCCL_CHECK(ncclReduceScatter(buf, at(buf, part.offset[rank()], dt), n, nccl_type(dt), nccl_op(op), comm_, stream_));
    } else {
      DMAT_NCCL_CHECK(ncclGroupStart());
      for (int r = 0; r < size(); ++r) {
        void* p = at(buf, part.offset[r], dt);
        DMAT_NCCL_CHECK(ncclReduce(p, p, size_t(part.count[r]), nccl_type(dt), nccl_op(op), r, comm_, stream_));
      }
      DMAT_NCCL_CHECK(ncclGroupEnd());
    }
    after("reduce_scatter", part.total(), dt);
  }

  void all_gather(void* buf, const Partition& part, DType dt) override {
    before();
    if (part.equal_counts()) {
      DMAT_NCCL_CHECK(ncclAllGather(at(buf, part.offset[rank()], dt), buf, size_t(part.count[0]), nccl_type(dt), comm_, stream_));
    } else {
      DMAT_NCCL_CHECK(ncclGroupStart());
      for (int r = 0; r < size(); ++r) {
        void* p = at(buf, part.offset[r], dt);
        DMAT_NCCL_CHECK(ncclBroadcast(p, p, size_t(part.count[r]), nccl_type(dt), r, comm_, stream_));
      }
      DMAT_NCCL_CHECK(ncclGroupEnd());
    }
    after("all_gather", part.total(), dt);
  }

  void gather(const void* shard, void* full, const Partition& part, DType dt, int root) override {
    before();
    DMAT_NCCL_CHECK(ncclGroupStart());
    if (rank() == root) {
      for (int r = 0; r < size(); ++r)
        if (r != root) DMAT_NCCL_CHECK(ncclRecv(at(full, part.offset[r], dt), size_t(part.count[r]), nccl_type(dt), r, comm_, stream_));
    } else {
      DMAT_NCCL_CHECK(ncclSend(shard, size_t(part.count[rank()]), nccl_type(dt), root, comm_, stream_));
    }
    DMAT_NCCL_CHECK(ncclGroupEnd());
    if (rank() == root && part.count[root] && at(full, part.offset[root], dt) != shard)
      DMAT_CUDA_CHECK(cudaMemcpyAsync(at(full, part.offset[root], dt), shard, size_t(part.count[root]) * dtype_size(dt),
                                      cudaMemcpyDeviceToDevice, stream_));
    after("gather", part.total(), dt);
  }

  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    before();
    DMAT_NCCL_CHECK(ncclBroadcast(buf, buf, size_t(count), nccl_type(dt), root, comm_, stream_));
    after("broadcast", count, dt);
  }

  void barrier() override {
    DMAT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    host_.barrier();
  }

  [[noreturn]] void abort(const std::string& message) override {
    ncclCommAbort(comm_);  // unblocks kernels waiting on peers
    host_.abort(message);
    std::_Exit(1);
  }

 private:
  // The collective starts after everything already queued on the compute stream.
  void before() {
    DMAT_CUDA_CHECK(cudaEventRecord(compute_done_, cuda::stream()));
    DMAT_CUDA_CHECK(cudaStreamWaitEvent(stream_, compute_done_, 0));
  }
  // Outside an async section the compute stream waits for it; the watchdog tracks its completion.
  void after(const char* what, int64_t count, DType dt) {
    if (!async_) {
      DMAT_CUDA_CHECK(cudaEventRecord(comm_done_, stream_));
      DMAT_CUDA_CHECK(cudaStreamWaitEvent(cuda::stream(), comm_done_, 0));
    }
    if (!watchdog_) return;
    cudaEvent_t ev;
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    DMAT_CUDA_CHECK(cudaEventRecord(ev, stream_));
    const int dev = dev_;
    watchdog_->watch_async(
        fmt::format("{} ({} × {}, NCCL)", what, count, dtype_name(dt)),
        [ev, dev] {
          cudaSetDevice(dev);  // the watchdog thread's current device
          return cudaEventQuery(ev) != cudaErrorNotReady;
        },
        [ev, dev] {
          cudaSetDevice(dev);
          cudaEventDestroy(ev);
        });
  }

  Communicator& host_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t compute_done_ = nullptr, comm_done_ = nullptr;
  int dev_ = 0;
  bool async_ = false;
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl(Communicator& host) {
  if (host.size() < 2) fail("internal: NCCL communicator asked for a world of {}", host.size());
  return std::make_unique<NcclComm>(host);
}

#endif

}  // namespace dmat::dist
