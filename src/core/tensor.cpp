#include "core/tensor.h"

namespace dmat {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::U16: return "u16";
    case DType::U32: return "u32";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

Tensor Tensor::rows(int64_t r0, int64_t n) const {
  DMAT_CHECK(shape.n >= 1 && r0 >= 0 && r0 + n <= shape[0], "rows {}+{} of {}", r0, n, shape.str());
  Tensor t = *this;
  t.shape.d[0] = n;
  t.data = static_cast<char*>(data) + size_t(r0) * (numel() / shape[0]) * dtype_size(dtype);
  return t;
}

Tensor join_rows(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.dtype != b.dtype || a.device != b.device || a.shape.n < 1 ||
      a.shape.n != b.shape.n)
    return {};
  for (int i = 1; i < a.shape.n; ++i)
    if (a.shape[i] != b.shape[i]) return {};
  if (static_cast<const char*>(a.data) + a.bytes() != b.data) return {};
  Tensor t = a;
  t.shape.d[0] = a.shape[0] + b.shape[0];
  return t;
}

double host_element(const Tensor& t, int64_t i) {
  DMAT_CHECK(t.device == Device::CPU && i >= 0 && i < t.numel(), "host_element: {} of a {} tensor on {}", i,
             t.shape.str(), device_name(t.device));
  if (t.dtype == DType::F64) return t.as<double>()[i];
  return t.as<float>()[i];
}

void set_host_element(const Tensor& t, int64_t i, double v) {
  DMAT_CHECK(t.device == Device::CPU && i >= 0 && i < t.numel(), "set_host_element: {} of a {} tensor on {}", i,
             t.shape.str(), device_name(t.device));
  if (t.dtype == DType::F64) t.as<double>()[i] = v;
  else t.as<float>()[i] = float(v);
}

}  // namespace dmat
