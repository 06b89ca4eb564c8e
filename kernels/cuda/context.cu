#include "kernels/cuda/context.h"

#include <fmt/format.h>

namespace dmat::cuda {
namespace {

void sync_compute_streams();

struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  void* get(size_t n) {
    if (n <= bytes) return p;
    if (p) {
      sync_compute_streams();  // the old buffer may still be in use
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
  cudaStream_t side[2] = {nullptr, nullptr};  // SideStream modes 1 and 2, created on first use
  cudaEvent_t to_side = nullptr, to_main = nullptr, marked = nullptr;
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
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&to_side, cudaEventDisableTiming));
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&to_main, cudaEventDisableTiming));
    DMAT_CUDA_CHECK(cudaEventCreateWithFlags(&marked, cudaEventDisableTiming));
  }
  cudaStream_t side_stream(int mode) {
    cudaStream_t& s = side[mode - 1];
    if (!s) {
      int least = 0, greatest = 0;
      DMAT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      int prio = 0;
      DMAT_CUDA_CHECK(cudaStreamGetPriority(stream, &prio));
      DMAT_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamDefault, mode == 1 ? greatest : prio));
    }
    return s;
  }
  // Process-lifetime: freeing at exit would race the driver's own teardown.
};

Context& ctx() {
  static Context* c = new Context();
  return *c;
}

// The context's switches: apart from Context so that reading them creates no stream on a device
// not yet chosen (peak_bf16_flops runs before the rank picks its GPU).
KernelOptions& options() {
  static KernelOptions o = [] {
    KernelOptions e;
    apply_kernel_env(e);
    return e;
  }();
  return o;
}

thread_local cudaStream_t t_current = nullptr;  // SideStream::run's stream on this thread

void sync_compute_streams() {  // the compute stream and the side streams (not the communication one)
  Context& c = ctx();
  DMAT_CUDA_CHECK(cudaStreamSynchronize(c.stream));
  for (cudaStream_t s : c.side)
    if (s) DMAT_CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace

SideStream::SideStream(int mode) {
  DMAT_CHECK(mode >= 0 && mode <= 2, "side stream mode {} (0, 1 or 2)", mode);
  if (mode == 0) return;
  side_ = ctx().side_stream(mode);
  side_waits_main();
}

SideStream::~SideStream() {
  if (side_ && !joined_) {
    (void)cudaEventRecord(ctx().to_main, side_);
    (void)cudaStreamWaitEvent(ctx().stream, ctx().to_main, 0);
  }
}

void SideStream::side_waits_main() {
  if (!side_) return;
  DMAT_CUDA_CHECK(cudaEventRecord(ctx().to_side, ctx().stream));
  DMAT_CUDA_CHECK(cudaStreamWaitEvent(side_, ctx().to_side, 0));
}

void SideStream::main_waits_side() {
  if (!side_) return;
  DMAT_CUDA_CHECK(cudaEventRecord(ctx().to_main, side_));
  DMAT_CUDA_CHECK(cudaStreamWaitEvent(ctx().stream, ctx().to_main, 0));
}

void SideStream::mark() {
  if (side_) DMAT_CUDA_CHECK(cudaEventRecord(ctx().marked, side_));
}

void SideStream::main_waits_mark() {
  if (side_) DMAT_CUDA_CHECK(cudaStreamWaitEvent(ctx().stream, ctx().marked, 0));
}

SideStream::Scope::Scope(cudaStream_t s) : saved(t_current) {
  if (s) t_current = s;
}
SideStream::Scope::~Scope() { t_current = saved; }

void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(e), cudaGetErrorString(e), what,
                          file, line));
}

cudaStream_t stream() { return t_current ? t_current : ctx().stream; }
void* workspace(size_t bytes) { return ctx().ws.get(bytes); }
void* workspace2(size_t bytes) { return ctx().ws2.get(bytes); }
void* workspace3(size_t bytes) { return ctx().ws3.get(bytes); }
size_t workspace_bytes() { return ctx().ws.bytes + ctx().ws2.bytes + ctx().ws3.bytes; }
void synchronize() { DMAT_CUDA_CHECK(cudaStreamSynchronize(stream())); }
int sm_count() { return ctx().sms; }
const KernelOptions& kernel_options() { return options(); }
void set_kernel_options(const KernelOptions& o) { options() = o; }
int64_t l2_bytes() { return ctx().l2; }
size_t max_smem_optin() { return ctx().smem_optin; }

}  // namespace dmat::cuda
