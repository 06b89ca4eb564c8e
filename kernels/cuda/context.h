// The CUDA execution context of this process: the compute stream every kernel runs on, the
// cuBLASLt handle, and a growable device workspace for kernels that need scratch (stream-ordered:
// a kernel may use it until the next workspace() call on the same stream). Created on first use
// for the current device; one per process (each MPI rank drives one GPU).
// Why a process-wide context instead of passing one through every op: every op of a step runs on
// one stream in order, and the ops layer stays device-agnostic. Communication (issue 6) uses its
// own stream, ordered against this one by events; so do the side streams (SideStream) that an op
// may use inside itself, joined back before it returns.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "core/error.h"
#include "core/kernel_options.h"

namespace dmat::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line);

cudaStream_t stream();  // the compute stream, or the side stream inside SideStream::run

// A second stream for independent kernels inside one composite op, so that they share the GPU with
// the compute stream's instead of running one after another (DMA's backward: key groups, lists
// and the dQ pass beside the delta kernel and the dK/dV pass). Ordered against the compute stream
// only by the calls below; every SideStream joins back (the compute stream waits for everything
// run on the side) before it goes out of scope, so callers outside see one stream as before.
// Mode 0 runs everything on the compute stream (the calls are no-ops); 1 uses a side stream of
// the device's greatest priority (its blocks are dispatched ahead of the compute stream's pending
// ones); 2 one of the same priority as the compute stream.
class SideStream {
 public:
  explicit SideStream(int mode);  // the side starts after the compute stream's work so far
  ~SideStream();                  // join() if not done (errors ignored: may run during unwinding)
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  template <class F>
  void run(F&& f) {  // f's kernels (through stream()) go to the side stream
    Scope scope(side_);
    f();
  }
  void side_waits_main();  // the side's later work waits for the compute stream's work so far
  void main_waits_side();  // the compute stream's later work waits for the side's work so far
  void mark();             // remembers the side's work so far (one mark at a time) ...
  void main_waits_mark();  // ... for the compute stream's later work to wait for
  void join() { main_waits_side(), joined_ = true; }

 private:
  struct Scope {
    explicit Scope(cudaStream_t s);
    ~Scope();
    cudaStream_t saved;
  };
  cudaStream_t side_ = nullptr;  // null: mode 0
  bool joined_ = false;
};
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
// The kernel tuning switches every kernel of this process reads (core/kernel_options.h). Until
// set_kernel_options is called they are the defaults with the DMAT_* environment overrides applied
// (read once, on first use: test binaries and tools without a config); a run sets its resolved
// run.kernels at start-up, before its first kernel. Tests may set other values between calls.
const KernelOptions& kernel_options();
void set_kernel_options(const KernelOptions& o);
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
