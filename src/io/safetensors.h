// Read and write the safetensors format (8-byte little-endian header length, a JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the raw little-endian data), so Hugging Face and PyTorch load our weights directly.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dmat {

struct NamedTensor {
  std::string name;
  Tensor tensor;  // CPU memory
};

// Writes the tensors in the given order, atomically (temp file + rename). dtypes F32, F64, BF16,
// I32, U16, U32 map to "F32", "F64", "BF16", "I32", "U16", "U32".
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A loaded file: owns its bytes; tensors are views into them, each aligned for its dtype.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // validates header, offsets and file size
  bool has(const std::string& name) const;
  // The tensor by name; error names the file and the tensor if missing.
  const Tensor& get(const std::string& name) const;
  // Copies into dst, checking dtype and shape match exactly (error names both shapes).
  void copy_to(const std::string& name, const Tensor& dst) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  std::vector<char> bytes_;
  std::map<std::string, Tensor> tensors_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dmat
