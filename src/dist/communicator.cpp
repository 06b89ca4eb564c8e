#include "dist/communicator.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dist/backends.h"

namespace dmat::dist {

Partition Partition::even(int64_t total, int world, int64_t align) {
  DMAT_CHECK(world >= 1 && align >= 1 && total >= 0, "partition of {} over {} (align {})", total, world, align);
  int64_t per = (total + world - 1) / world;
  per = (per + align - 1) / align * align;
  Partition p;
  for (int r = 0; r < world; ++r) {
    const int64_t lo = std::min(total, per * r);
    p.offset.push_back(lo);
    p.count.push_back(std::min(total, lo + per) - lo);
  }
  return p;
}

bool Partition::equal_counts() const {
  for (size_t r = 0; r < count.size(); ++r)
    if (count[r] != count[0] || offset[r] != int64_t(r) * count[0]) return false;
  return true;
}

void Communicator::broadcast(std::string& s, int root) {
  double n = double(s.size());  // exact up to 2^53
  broadcast(&n, 1, DType::F64, root);
  const size_t len = size_t(n);
  std::vector<uint32_t> words((len + 3) / 4, 0);  // the dtypes have no byte type: 4-byte words
  if (rank() == root && len) std::memcpy(words.data(), s.data(), len);
  if (!words.empty()) broadcast(words.data(), int64_t(words.size()), DType::U32, root);
  s.assign(reinterpret_cast<const char*>(words.data()), len);
}

namespace {

// A world of one: every collective is the identity (Avg of one value is the value).
class SingleComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  Device device() const override { return Device::CPU; }
  const char* backend() const override { return "single"; }
  void all_reduce(void*, int64_t, DType, ReduceOp) override {}
  void reduce_scatter(void*, const Partition&, DType, ReduceOp) override {}
  void all_gather(void*, const Partition&, DType) override {}
  void gather(const void* shard, void* full, const Partition& part, DType dt, int) override {
    if (shard != full) std::memmove(static_cast<char*>(full), shard, size_t(part.count[0]) * dtype_size(dt));
  }
  void broadcast(void*, int64_t, DType, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(const std::string& message) override {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(1);
  }
};

}  // namespace

std::unique_ptr<Communicator> make_single() { return std::make_unique<SingleComm>(); }

bool launched_by_mpi() {
  // Open MPI (mpirun), MPICH/Intel MPI (hydra: PMI_*), PMIx launchers (srun --mpi=pmix).
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE"})
    if (std::getenv(v)) return true;
  return false;
}

Communicator& world() {
  static std::unique_ptr<Communicator> w = launched_by_mpi() ? make_mpi() : make_single();
  return *w;
}

}  // namespace dmat::dist
