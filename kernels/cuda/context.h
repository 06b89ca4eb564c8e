// The CUDA execution context of this process: the compute stream every kernel runs on, the
// cuBLASLt handle, and a growable device workspace for kernels that need scratch (stream-ordered:
// a kernel may use it until the next workspace() call on the same stream). Created on first use
// for the current device; one per process (each MPI rank drives one GPU).
// Why a process-wide context instead of passing one through every op: every op of a step runs on
// one stream in order, and the ops layer stays device-agnostic. Communication (issue 6) uses its
// own stream, ordered against this one by events.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "core/error.h"

namespace dmat::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line);

cudaStream_t stream();
// Device scratch of at least `bytes` (contents undefined). Grows; never shrinks.
void* workspace(size_t bytes);
// Second, independent scratch for callers that hold workspace() while calling a kernel that
// itself needs scratch (e.g. the flash-attention backward's dQ accumulator while a reduction runs).
void* workspace2(size_t bytes);
// Third scratch: structures a composite op builds and then holds across calls into kernels that use
// workspace() / workspace2() themselves (DMA's gathered key lists and key groups).
void* workspace3(size_t bytes);
size_t workspace_bytes();  // the three scratch buffers' current sizes together (benchmarks)
void synchronize();  // the compute stream
int sm_count();
int64_t l2_bytes();        // the device's L2 cache size
size_t max_smem_optin();  // bytes of shared memory a block may opt into

}  // namespace dmat::cuda

#define DMAT_CUDA_CHECK(call)                                                            \
  do {                                                                                   \
    cudaError_t _e = (call);                                                             \
    if (_e != cudaSuccess) ::dmat::cuda::throw_cuda_error(_e, #call, __FILE__, __LINE__); \
  } while (0)

// After every launch: the launch error always (cheap); a full sync in debug builds.
#ifdef NDEBUG
#define DMAT_CUDA_LAUNCH_CHECK() DMAT_CUDA_CHECK(cudaGetLastError())
#else
#define DMAT_CUDA_LAUNCH_CHECK()                              \
  do {                                                        \
    DMAT_CUDA_CHECK(cudaGetLastError());                      \
    DMAT_CUDA_CHECK(cudaStreamSynchronize(::dmat::cuda::stream())); \
  } while (0)
#endif
