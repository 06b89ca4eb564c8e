// Tensor: a non-owning, typed view of contiguous memory (row-major) on one device.
// Memory itself lives in arenas (arena.h); ops take views and dispatch on device and dtype.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/bf16.h"
#include "core/error.h"

namespace dmat {

enum class DType : uint8_t { F32, F64, BF16, I32, U16, U32 };
enum class Device : uint8_t { CPU, CUDA };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::U16: return 2;
    case DType::U32: return 4;
  }
  return 0;
}
const char* dtype_name(DType t);
const char* device_name(Device d);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::U16; }
template <> constexpr DType dtype_of<uint32_t>() { return DType::U32; }

constexpr int kMaxDims = 4;

struct Shape {
  std::array<int64_t, kMaxDims> d{};
  int n = 0;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) {
    DMAT_CHECK(dims.size() <= kMaxDims, "at most {} dims", kMaxDims);
    for (int64_t x : dims) d[n++] = x;
  }
  int64_t numel() const {
    int64_t r = 1;
    for (int i = 0; i < n; ++i) r *= d[i];
    return r;
  }
  int64_t operator[](int i) const { return d[i]; }
  bool operator==(const Shape& o) const {
    if (n != o.n) return false;
    for (int i = 0; i < n; ++i)
      if (d[i] != o.d[i]) return false;
    return true;
  }
  std::string str() const;
};

struct Tensor {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::F32;
  Device device = Device::CPU;

  int64_t numel() const { return shape.numel(); }
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i]; }
  bool defined() const { return data != nullptr; }
  template <class T> T* as() const {
    DMAT_CHECK(dtype == dtype_of<T>(), "tensor holds {}, asked as another type", dtype_name(dtype));
    return static_cast<T*>(data);
  }
  // The same memory seen with another shape of equal element count.
  Tensor view(Shape s) const {
    DMAT_CHECK(s.numel() == numel(), "view {} of {}", s.str(), shape.str());
    Tensor t = *this;
    t.shape = s;
    return t;
  }
  // Rows [r0, r0+n) of the first dimension.
  Tensor rows(int64_t r0, int64_t n) const;
};

// a and b seen as one tensor of a.shape[0] + b.shape[0] rows, where b starts right where a ends in
// memory (same dtype, device and row shape): e.g. two weight matrices declared one after the other
// in an arena, used by one GEMM. Undefined (data == nullptr) where they are not adjacent.
Tensor join_rows(const Tensor& a, const Tensor& b);

// One element i (flat index) of a host tensor of f32 or f64, read or written as double: scalar
// bookkeeping on the CPU (decoding's thresholds), never a kernel's inner loop.
double host_element(const Tensor& t, int64_t i);
void set_host_element(const Tensor& t, int64_t i, double v);

}  // namespace dmat
