// One allocation per state (parameters, gradients, optimizer moments, activations), carved by a
// table of named tensor specs, as llm.c does. Flat, contiguous state makes checkpoints, gradient
// all-reduce buckets and ZeRO sharding simple. Every tensor starts at a multiple of kArenaAlign
// elements (vector loads), and the padding is zero.
//
// An arena has one dtype, except for "statistics" (add_stat: norm rstd, softmax lse, per-row loss),
// which are kept in at least fp32 when the arena is bf16. Arenas live on the host or on the CUDA
// device; copy_from moves a whole arena between devices (same table and dtype).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace dmat {

constexpr int64_t kArenaAlign = 64;  // elements

struct TensorSpec {
  std::string name;
  Shape shape;
  bool stat = false;  // at least fp32
};

// A list of specs; handles are indices. add_shared() returns the existing handle when the name is
// already declared (growing it to the larger size): buffers reused across layers, e.g. scratch
// gradients in backward, are declared once per name.
class TensorTable {
 public:
  int add(const std::string& name, Shape shape);
  int add_shared(const std::string& name, Shape shape);
  int add_stat(const std::string& name, Shape shape);
  // While set, add() and add_stat() of a name already declared return its handle (growing it), as
  // add_shared does: activation recomputation declares every block's buffers under one prefix.
  void set_share_all(bool on) { share_all_ = on; }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  int find(const std::string& name) const;  // -1 if absent
  int64_t total_elements() const;            // including alignment padding
  size_t total_bytes(DType dtype) const;     // what an Arena of this table and dtype allocates

 private:
  std::vector<TensorSpec> specs_;
  std::unordered_map<std::string, int> index_;
  bool share_all_ = false;
};

class Arena {
 public:
  Arena() = default;
  Arena(const TensorTable& table, DType dtype, Device device);
  Arena(Arena&&) noexcept = default;
  Arena& operator=(Arena&&) noexcept = default;

  Tensor get(int handle) const;   // the tensor with its declared shape
  // Everything, padding included, as one 1-D tensor (only for arenas of a single dtype).
  Tensor flat() const;
  // Element offset of a tensor from the start (arenas of a single dtype).
  int64_t offset(int handle) const;
  const std::vector<TensorSpec>& specs() const { return specs_; }
  size_t bytes() const { return total_bytes_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool defined() const { return mem_ != nullptr; }
  void zero();
  // Copies all bytes of `src` (same table and dtype; any devices).
  void copy_from(const Arena& src) const;  // writes the memory, not the layout (as get() hands out writable views)
  // A new zeroed arena with this one's layout and dtype on `device`.
  Arena like(Device device) const;

 private:
  std::vector<TensorSpec> specs_;
  std::vector<size_t> offsets_;  // bytes
  size_t total_bytes_ = 0;
  bool uniform_ = true;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  std::shared_ptr<void> mem_;
};

}  // namespace dmat
