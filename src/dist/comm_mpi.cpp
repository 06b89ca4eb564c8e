// The MPI communicator: host buffers, MPI collectives. Counts are 64-bit here and cut into chunks
// of at most 2^30 elements for MPI's int counts. Reduce-scatter and all-gather over uneven ranges
// are one rooted MPI_Reduce / MPI_Bcast per rank: simple, count-safe, and the reduction of every
// element is the same as MPI_Allreduce's for two ranks (a + b), which is what the tests compare.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include <spdlog/spdlog.h>

#include "dist/backends.h"
#include "dist/watchdog.h"

namespace dmat::dist {

namespace {

constexpr int64_t kChunk = int64_t(1) << 30;

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT32_T;
    case DType::U32: return MPI_UINT32_T;
    case DType::U16: return MPI_UINT16_T;
    case DType::BF16: return MPI_UINT16_T;  // moved, never reduced
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(ReduceOp op, DType dt) {
  DMAT_CHECK(dt != DType::BF16 && dt != DType::U16, "host reductions of {} are not supported", dtype_name(dt));
  return op == ReduceOp::Max ? MPI_MAX : MPI_SUM;
}

void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("MPI: {} failed: {}", what, std::string(msg, size_t(len)));
}

template <class F>
void chunked(int64_t count, F&& f) {
  for (int64_t o = 0; o < count; o += kChunk) f(o, int(std::min(kChunk, count - o)));
}

char* at(void* p, int64_t elems, DType dt) { return static_cast<char*>(p) + size_t(elems) * dtype_size(dt); }

void scale(void* buf, int64_t n, DType dt, double s) {
  if (dt == DType::F32)
    for (int64_t i = 0; i < n; ++i) static_cast<float*>(buf)[i] = float(static_cast<float*>(buf)[i] * s);
  else if (dt == DType::F64)
    for (int64_t i = 0; i < n; ++i) static_cast<double*>(buf)[i] *= s;
  else
    DMAT_CHECK(false, "average of {} is not supported", dtype_name(dt));
}

void finalize_at_exit() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Finalize();
}

class MpiComm final : public Communicator {
 public:
  MpiComm() {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      std::atexit(finalize_at_exit);
    }
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup");
    // Errors come back as codes (turned into exceptions by check()) instead of MPI's default abort
    // without a word of what failed.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_), "MPI_Comm_split_type");
    MPI_Comm_rank(local_, &local_rank_);
    MPI_Comm_size(local_, &local_size_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  Device device() const override { return Device::CPU; }
  const char* backend() const override { return "mpi"; }

  void set_timeout(double seconds) override {
    watchdog_.reset();
    if (seconds > 0 && size_ > 1)
      watchdog_ = std::make_unique<Watchdog>(seconds, [this](const std::string& m) { abort(m); });
  }

  void all_reduce(void* buf, int64_t count, DType dt, ReduceOp op) override {
    auto g = watch("all_reduce", count, dt);
    chunked(count, [&](int64_t o, int n) {
      check(MPI_Allreduce(MPI_IN_PLACE, at(buf, o, dt), n, mpi_type(dt), mpi_op(op, dt), comm_), "MPI_Allreduce");
    });
    if (op == ReduceOp::Avg) scale(buf, count, dt, 1.0 / size_);
  }

  void reduce_scatter(void* buf, const Partition& part, DType dt, ReduceOp op) override {
    auto g = watch("reduce_scatter", part.total(), dt);
    for (int r = 0; r < size_; ++r) {
      chunked(part.count[r], [&](int64_t o, int n) {
        char* p = at(buf, part.offset[r] + o, dt);
        check(MPI_Reduce(r == rank_ ? MPI_IN_PLACE : p, p, n, mpi_type(dt), mpi_op(op, dt), r, comm_), "MPI_Reduce");
      });
    }
    if (op == ReduceOp::Avg) scale(at(buf, part.offset[rank_], dt), part.count[rank_], dt, 1.0 / size_);
  }

  void all_gather(void* buf, const Partition& part, DType dt) override {
    auto g = watch("all_gather", part.total(), dt);
    for (int r = 0; r < size_; ++r)
      chunked(part.count[r], [&](int64_t o, int n) {
        check(MPI_Bcast(at(buf, part.offset[r] + o, dt), n, mpi_type(dt), r, comm_), "MPI_Bcast");
      });
  }

  void gather(const void* shard, void* full, const Partition& part, DType dt, int root) override {
    auto g = watch("gather", part.total(), dt);
    if (rank_ == root) {
      if (part.count[root] && at(full, part.offset[root], dt) != shard)
        std::memmove(at(full, part.offset[root], dt), shard, size_t(part.count[root]) * dtype_size(dt));
      for (int r = 0; r < size_; ++r) {
        if (r == root) continue;
        chunked(part.count[r], [&](int64_t o, int n) {
          check(MPI_Recv(at(full, part.offset[r] + o, dt), n, mpi_type(dt), r, 7, comm_, MPI_STATUS_IGNORE), "MPI_Recv");
        });
      }
    } else {
      chunked(part.count[rank_], [&](int64_t o, int n) {
        check(MPI_Send(at(const_cast<void*>(shard), o, dt), n, mpi_type(dt), root, 7, comm_), "MPI_Send");
      });
    }
  }

  void broadcast(void* buf, int64_t count, DType dt, int root) override {
    auto g = watch("broadcast", count, dt);
    chunked(count, [&](int64_t o, int n) { check(MPI_Bcast(at(buf, o, dt), n, mpi_type(dt), root, comm_), "MPI_Bcast"); });
  }

  void barrier() override {
    auto g = watch("barrier", 0, DType::F32);
    check(MPI_Barrier(comm_), "MPI_Barrier");
  }

  [[noreturn]] void abort(const std::string& message) override {
    std::fprintf(stderr, "error: [rank %d of %d] %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    spdlog::default_logger()->flush();
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);  // MPI_Abort does not return; if it did, still never continue
  }

 private:
  std::optional<Watchdog::Guard> watch(const char* what, int64_t count, DType dt) {
    if (!watchdog_) return std::nullopt;
    return watchdog_->watch(fmt::format("{} ({} × {}, MPI)", what, count, dtype_name(dt)));
  }

  MPI_Comm comm_ = MPI_COMM_NULL, local_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi() { return std::make_unique<MpiComm>(); }

}  // namespace dmat::dist
