#include "kernels/cuda/context.h"

#include <fmt/format.h>

namespace dmat::cuda {
namespace {

struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  void* get(size_t n) {
    if (n <= bytes) return p;
    if (p) {
      DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));  // the old buffer may still be in use
      DMAT_CUDA_CHECK(cudaFree(p));
    }
    size_t want = std::max(n, bytes + bytes / 2);
    DMAT_CUDA_CHECK(cudaMalloc(&p, want));
    bytes = want;
    return p;
  }
};

struct Context {
  cudaStream_t stream = nullptr;
  Scratch ws, ws2, ws3;
  int sms = 0, l2 = 0;
  size_t smem_optin = 0;
  Context() {
    // A blocking stream: work on the legacy default stream (cudaMemset/cudaMemcpy of arenas and
    // uploads in core/) is ordered with the kernels on this one without explicit events.
    DMAT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamDefault));
    int dev = 0;
    DMAT_CUDA_CHECK(cudaGetDevice(&dev));
    DMAT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    DMAT_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    int optin = 0;
    DMAT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    smem_optin = size_t(optin);
  }
  // Process-lifetime: freeing at exit would race the driver's own teardown.
};

Context& ctx() {
  static Context* c = new Context();
  return *c;
}

}  // namespace

void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(e), cudaGetErrorString(e), what,
                          file, line));
}

cudaStream_t stream() { return ctx().stream; }
void* workspace(size_t bytes) { return ctx().ws.get(bytes); }
void* workspace2(size_t bytes) { return ctx().ws2.get(bytes); }
void* workspace3(size_t bytes) { return ctx().ws3.get(bytes); }
size_t workspace_bytes() { return ctx().ws.bytes + ctx().ws2.bytes + ctx().ws3.bytes; }
void synchronize() { DMAT_CUDA_CHECK(cudaStreamSynchronize(stream())); }
int sm_count() { return ctx().sms; }
int64_t l2_bytes() { return ctx().l2; }
size_t max_smem_optin() { return ctx().smem_optin; }

}  // namespace dmat::cuda
