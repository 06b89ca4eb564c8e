// Device memory: allocation with an actionable out-of-memory error, and copies ordered on the
// compute stream (so a copy never overtakes a kernel that produces or consumes its data).
#include <fmt/format.h>

#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"

namespace dmat::cuda {

void* device_alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // an OOM is not sticky; clear it so later checks do not report it again
    size_t free_b = 0, total_b = 0;
    const bool have_info = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
    if (!have_info) cudaGetLastError();
    const double gib = double(1ull << 30);
    throw Error(fmt::format(
        "CUDA out of device memory: requested {} bytes ({:.3f} GiB); free {:.3f} GiB of {:.3f} GiB{}", bytes,
        double(bytes) / gib, double(free_b) / gib, double(total_b) / gib,
        have_info ? "" : " (cudaMemGetInfo failed)"));
  }
  if (e != cudaSuccess) throw_cuda_error(e, "cudaMalloc", __FILE__, __LINE__);
  return p;
}

void device_free(void* p) {
  if (p) DMAT_CUDA_CHECK(cudaFree(p));
}

void memcpy_h2d(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  DMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()));
  DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));  // the host buffer may be reused on return
}

void memcpy_d2h(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  DMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()));
  DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void memcpy_d2d(void* dst, const void* src, size_t bytes) {
  if (bytes == 0 || dst == src) return;
  DMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
}

void memset_zero(void* p, size_t bytes) {
  if (bytes == 0) return;
  DMAT_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream()));
}

}  // namespace dmat::cuda
