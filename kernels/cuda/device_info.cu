#include "kernels/cuda/device_info.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "kernels/cuda/context.h"

namespace dmat::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

std::string device_summary(int id) {
  cudaDeviceProp p{};
  cudaError_t e = cudaGetDeviceProperties(&p, id);
  if (e != cudaSuccess) return fmt::format("device {}: {}", id, cudaGetErrorString(e));
  return fmt::format("{}, sm_{}{}, {:.1f} GiB, {} SMs", p.name, p.major, p.minor,
                     double(p.totalGlobalMem) / (1ull << 30), p.multiProcessorCount);
}

}  // namespace dmat::cuda

namespace dmat::cuda {

bool cuda_built() { return true; }

double peak_bf16_flops(int id) {
  if (const double v = kernel_options().peak_tflops; v > 0) return v * 1e12;
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, id) != cudaSuccess) return 0.0;
  const std::string n = p.name;
  if (n.find("H100") != std::string::npos && n.find("PCIe") != std::string::npos) return 756e12;
  if (n.find("H100") != std::string::npos || n.find("H200") != std::string::npos) return 989e12;
  if (n.find("A100") != std::string::npos) return 312e12;
  return 0.0;
}

}  // namespace dmat::cuda
