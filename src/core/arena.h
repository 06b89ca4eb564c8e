// One allocation per state (parameters, gradients, optimizer moments, activations), carved by a
// table of named tensor specs, as llm.c does. Flat, contiguous state makes checkpoints, gradient
// all-reduce buckets and ZeRO sharding simple. Every tensor starts at a multiple of kArenaAlign
// elements (vector loads), and the padding is zero.
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
};

// A list of specs; handles are indices. add_shared() returns the existing handle when the name is
// already declared (growing it to the larger size): buffers reused across layers, e.g. scratch
// gradients in backward, are declared once per name.
class TensorTable {
 public:
  int add(const std::string& name, Shape shape);
  int add_shared(const std::string& name, Shape shape);
  const std::vector<TensorSpec>& specs() const { return specs_; }
  int find(const std::string& name) const;  // -1 if absent
  int64_t total_elements() const;            // including alignment padding

 private:
  std::vector<TensorSpec> specs_;
  std::unordered_map<std::string, int> index_;
};

class Arena {
 public:
  Arena() = default;
  Arena(const TensorTable& table, DType dtype, Device device);
  Arena(Arena&&) noexcept = default;
  Arena& operator=(Arena&&) noexcept = default;

  Tensor get(int handle) const;   // the tensor with its declared shape
  Tensor flat() const;            // everything, padding included, as one 1-D tensor
  int64_t offset(int handle) const { return offsets_.at(handle); }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  size_t bytes() const { return size_t(total_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  void zero();

 private:
  std::vector<TensorSpec> specs_;
  std::vector<int64_t> offsets_;
  int64_t total_ = 0;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  std::shared_ptr<void> mem_;
};

}  // namespace dmat
