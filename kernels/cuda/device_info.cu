#include "kernels/cuda/device_info.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

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
