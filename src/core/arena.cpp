#include "core/arena.h"

#include <cstdlib>
#include <cstring>

namespace dmat {

static int64_t align_up(int64_t n) { return (n + kArenaAlign - 1) / kArenaAlign * kArenaAlign; }

int TensorTable::add(const std::string& name, Shape shape) {
  DMAT_CHECK(index_.count(name) == 0, "tensor {} declared twice", name);
  index_[name] = int(specs_.size());
  specs_.push_back({name, shape});
  return int(specs_.size()) - 1;
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

int64_t TensorTable::total_elements() const {
  int64_t t = 0;
  for (const auto& s : specs_) t += align_up(s.shape.numel());
  return t;
}

Arena::Arena(const TensorTable& table, DType dtype, Device device)
    : specs_(table.specs()), dtype_(dtype), device_(device) {
  for (const auto& s : specs_) {
    offsets_.push_back(total_);
    total_ += align_up(s.shape.numel());
  }
  if (device != Device::CPU) fail("arena: {} memory needs the CUDA backend, which this build does not provide yet",
                                  device_name(device));
  size_t nbytes = std::max<size_t>(bytes(), 64);
  void* p = std::aligned_alloc(64, (nbytes + 63) / 64 * 64);
  if (!p) fail("arena: out of memory allocating {} bytes", nbytes);
  std::memset(p, 0, nbytes);
  mem_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

Tensor Arena::get(int handle) const {
  DMAT_CHECK(handle >= 0 && size_t(handle) < specs_.size(), "arena handle {}", handle);
  Tensor t;
  t.data = static_cast<char*>(mem_.get()) + size_t(offsets_[handle]) * dtype_size(dtype_);
  t.shape = specs_[handle].shape;
  t.dtype = dtype_;
  t.device = device_;
  return t;
}

Tensor Arena::flat() const {
  Tensor t;
  t.data = mem_.get();
  t.shape = Shape{total_};
  t.dtype = dtype_;
  t.device = device_;
  return t;
}

void Arena::zero() { std::memset(mem_.get(), 0, bytes()); }

}  // namespace dmat
