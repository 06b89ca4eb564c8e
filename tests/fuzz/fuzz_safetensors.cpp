// Fuzz target: the safetensors reader (src/io/safetensors.h).
// Input: the bytes of one .safetensors file. Every tensor of an accepted file lies inside the
// file's data (ASan checks each byte read here) and copies out unchanged.
#include <cstring>

#include "fuzz_util.h"
#include "io/safetensors.h"

using namespace dmat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  return fuzz::mutate_json(data, size, max_size, seed, 1);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/model.safetensors";
  fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
  return fuzz::rejecting([&] {
    SafetensorsFile f(path);
    size_t total = 0;
    for (const std::string& name : f.names()) {
      fuzz::fuzz_require(f.has(name), "a listed tensor is missing");
      const Tensor& t = f.get(name);
      fuzz::fuzz_require(t.numel() >= 0 && t.bytes() <= size, "a tensor larger than the file");
      std::vector<char> out(t.bytes() + 1);
      f.copy_to(name, Tensor{out.data(), t.shape, t.dtype, Device::CPU});
      fuzz::fuzz_require(t.bytes() == 0 || std::memcmp(out.data(), t.data, t.bytes()) == 0, "copy_to changed bytes");
      total += t.bytes();
    }
    fuzz::fuzz_require(total <= size, "tensors cover more bytes than the file has");
    for (const auto& [k, v] : f.metadata()) (void)k, (void)v;
  });
}
