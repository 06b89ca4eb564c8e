#include "core/arena.h"

#include <cstdlib>
#include <cstring>

#ifdef DMAT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace dmat {

static int64_t align_up(int64_t n) { return (n + kArenaAlign - 1) / kArenaAlign * kArenaAlign; }

int TensorTable::add(const std::string& name, Shape shape) {
  if (share_all_ && index_.count(name)) return add_shared(name, shape);
  DMAT_CHECK(index_.count(name) == 0, "tensor {} declared twice", name);
  index_[name] = int(specs_.size());
  specs_.push_back({name, shape});
  return int(specs_.size()) - 1;
}

int TensorTable::add_stat(const std::string& name, Shape shape) {
  const int h = add(name, shape);
  specs_[h].stat = true;
  return h;
}

int TensorTable::add_shared(const std::string& name, Shape shape) {
  auto it = index_.find(name);
  if (it == index_.end()) return add(name, shape);
  TensorSpec& s = specs_[it->second];
  if (shape.numel() > s.shape.numel()) s.shape = shape;
  return it->second;
}

int TensorTable::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

static DType spec_dtype(const TensorSpec& s, DType arena) {
  return s.stat && arena == DType::BF16 ? DType::F32 : arena;
}

size_t TensorTable::total_bytes(DType dtype) const {
  size_t b = 0;
  for (const auto& s : specs_) b += size_t(align_up(s.shape.numel())) * dtype_size(spec_dtype(s, dtype));
  return b;
}

int64_t TensorTable::total_elements() const {
  int64_t t = 0;
  for (const auto& s : specs_) t += align_up(s.shape.numel());
  return t;
}


#ifdef DMAT_WITH_CUDA
static void cuda_ok(cudaError_t e, const char* what, size_t bytes) {
  if (e == cudaSuccess) return;
  size_t free_b = 0, total_b = 0;
  cudaGetLastError();
  cudaMemGetInfo(&free_b, &total_b);
  fail("arena: {} of {:.3f} GiB on the GPU failed: {} ({:.3f} GiB free of {:.3f} GiB)", what,
       double(bytes) / double(1ull << 30), cudaGetErrorString(e), double(free_b) / double(1ull << 30),
       double(total_b) / double(1ull << 30));
}
#endif

Arena::Arena(const TensorTable& table, DType dtype, Device device)
    : specs_(table.specs()), dtype_(dtype), device_(device) {
  for (const auto& s : specs_) {
    const DType t = spec_dtype(s, dtype);
    if (t != dtype) uniform_ = false;
    offsets_.push_back(total_bytes_);
    total_bytes_ += size_t(align_up(s.shape.numel())) * dtype_size(t);
  }
  size_t nbytes = std::max<size_t>(total_bytes_, 64);
  nbytes = (nbytes + 255) / 256 * 256;
  if (device == Device::CUDA) {
#ifdef DMAT_WITH_CUDA
    void* p = nullptr;
    cuda_ok(cudaMalloc(&p, nbytes), "allocating an arena", nbytes);
    cuda_ok(cudaMemset(p, 0, nbytes), "zeroing an arena", nbytes);
    mem_ = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
    return;
#else
    fail("arena: CUDA memory needs the CUDA backend, which this build does not have (configure with -DDMAT_CUDA=ON)");
#endif
  }
  void* p = std::aligned_alloc(64, nbytes);
  if (!p) fail("arena: out of memory allocating {} bytes", nbytes);
  std::memset(p, 0, nbytes);
  mem_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

Tensor Arena::get(int handle) const {
  DMAT_CHECK(handle >= 0 && size_t(handle) < specs_.size(), "arena handle {}", handle);
  Tensor t;
  t.data = static_cast<char*>(mem_.get()) + offsets_[handle];
  t.shape = specs_[handle].shape;
  t.dtype = spec_dtype(specs_[handle], dtype_);
  t.device = device_;
  return t;
}

int64_t Arena::offset(int handle) const {
  DMAT_CHECK(uniform_, "element offsets of a mixed-dtype arena");
  return int64_t(offsets_.at(handle) / dtype_size(dtype_));
}

Tensor Arena::flat() const {
  DMAT_CHECK(uniform_, "flat view of a mixed-dtype arena");
  Tensor t;
  t.data = mem_.get();
  t.shape = Shape{int64_t(total_bytes_ / dtype_size(dtype_))};
  t.dtype = dtype_;
  t.device = device_;
  return t;
}

void Arena::zero() {
  if (device_ == Device::CUDA) {
#ifdef DMAT_WITH_CUDA
    // On the legacy default stream, which the backend's (blocking) stream is ordered with.
    cuda_ok(cudaMemset(mem_.get(), 0, total_bytes_), "zeroing an arena", total_bytes_);
    return;
#endif
  }
  std::memset(mem_.get(), 0, total_bytes_);
}

Arena Arena::like(Device device) const {
  TensorTable t;
  for (const auto& s : specs_) {
    const int h = s.stat ? t.add_stat(s.name, s.shape) : t.add(s.name, s.shape);
    (void)h;
  }
  return Arena(t, dtype_, device);
}

void Arena::copy_from(const Arena& src) const {
  DMAT_CHECK(src.total_bytes_ == total_bytes_ && src.dtype_ == dtype_ && src.specs_.size() == specs_.size(),
             "arena copy between different layouts");
  if (device_ == Device::CPU && src.device_ == Device::CPU) {
    std::memcpy(mem_.get(), src.mem_.get(), total_bytes_);
    return;
  }
#ifdef DMAT_WITH_CUDA
  cuda_ok(cudaDeviceSynchronize(), "waiting for the GPU before an arena copy", total_bytes_);
  cuda_ok(cudaMemcpy(mem_.get(), src.mem_.get(), total_bytes_, cudaMemcpyDefault), "copying an arena", total_bytes_);
#else
  fail("arena: copy involving CUDA memory in a build without CUDA");
#endif
}

}  // namespace dmat
