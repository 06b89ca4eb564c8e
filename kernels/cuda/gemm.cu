// GEMM through cuBLASLt: bf16 A/B, fp32 compute, bf16 or fp32 C. Row-major C = op(A)·op(B) is
// computed as the column-major product C^T = op(B)^T · op(A)^T, so no data is ever transposed:
// cuBLASLt's "A" is our B and its "B" is our A. Descriptors and the heuristic's algorithm are
// cached per (shape, transposes, C type, pointer alignments); the handle and a dedicated 32 MiB
// workspace are created on first use (cuda::workspace() belongs to the other kernels, which may
// hold it across a GEMM).
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

#include <fmt/format.h>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/profile.h"

namespace dmat::cuda {
namespace {

#define DMAT_CUBLAS_CHECK(call)                                                                          \
  do {                                                                                                   \
    cublasStatus_t _s = (call);                                                                          \
    if (_s != CUBLAS_STATUS_SUCCESS)                                                                     \
      throw Error(fmt::format("cuBLASLt error {} ({}) in {} at {}:{}", int(_s), cublasLtGetStatusString(_s), \
                              #call, __FILE__, __LINE__));                                               \
  } while (0)

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

struct Lt {
  cublasLtHandle_t handle = nullptr;
  void* ws = nullptr;
};

Lt& lt() {
  static std::once_flag once;
  static Lt* l = new Lt();  // process lifetime: destroying at exit would race the driver's teardown
  std::call_once(once, [] {
    DMAT_CUBLAS_CHECK(cublasLtCreate(&l->handle));
    l->ws = device_alloc(kWorkspaceBytes);
  });
  return *l;
}

// Largest power of two ≤ 256 dividing the address: what the algorithm may assume.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a & (al - 1)) != 0) al >>= 1;
  return al;
}

using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, bool, uint32_t, uint32_t, uint32_t>;

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// kernel_options().gemm_tuned (run.kernels.gemm_algo = tuned): time the heuristic's first candidates once per plan, on the call's own
// operands, and keep the fastest (D goes to a scratch buffer, so C is read but not changed). The
// choice can differ between runs, and with it the rounding: for measurements, not for runs that
// must reproduce bit for bit. The default keeps the heuristic's first choice.
bool tuning() { return kernel_options().gemm_tuned; }

struct Operands {
  const void *A, *B, *C;
  float alpha, beta;
};

int pick_fastest(const Plan& p, const cublasLtMatmulHeuristicResult_t* res, int found, const Operands& o,
                 size_t c_bytes);

const Plan& plan(const Key& key, const Operands& o) {
  static std::mutex mu;
  static std::map<Key, Plan>* cache = new std::map<Key, Plan>();
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  const auto [M, N, K, trans_a, trans_b, c_f32, al_a, al_b, al_c] = key;
  Plan p;
  DMAT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major view: Lt-A = our B (op(B)^T is [N,K]), Lt-B = our A (op(A)^T is [K,M]).
  const cublasOperation_t lt_ta = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t lt_tb = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  DMAT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &lt_ta, sizeof(lt_ta)));
  DMAT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &lt_tb, sizeof(lt_tb)));
  // Our B stored row-major [K,N] is column-major N x K (ld N); stored [N,K] (trans_b) it is K x N (ld K).
  if (trans_b) DMAT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, uint64_t(K), uint64_t(N), K));
  else DMAT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, uint64_t(N), uint64_t(K), N));
  // Our A stored [M,K] is column-major K x M (ld K); stored [K,M] (trans_a) it is M x K (ld M).
  if (trans_a) DMAT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, uint64_t(M), uint64_t(K), M));
  else DMAT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, uint64_t(K), uint64_t(M), K));
  // C row-major [M,N] is column-major N x M (ld N).
  DMAT_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&p.c, c_f32 ? CUDA_R_32F : CUDA_R_16BF, uint64_t(N), uint64_t(M), N));

  cublasLtMatmulPreference_t pref = nullptr;
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                         sizeof(ws)));
  // Lt-A is our B, Lt-B our A.
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b,
                                                         sizeof(al_b)));
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a,
                                                         sizeof(al_a)));
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c,
                                                         sizeof(al_c)));
  DMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c,
                                                         sizeof(al_c)));
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t res[kCandidates]{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt().handle, p.op, p.a, p.b, p.c, p.c, pref,
                                                           tuning() ? kCandidates : 1, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw Error(fmt::format("gemm: cuBLASLt has no algorithm for M={} N={} K={} trans_a={} trans_b={} C={} "
                            "(alignments A {} B {} C {} bytes): {}",
                            M, N, K, trans_a, trans_b, c_f32 ? "fp32" : "bf16", al_a, al_b, al_c,
                            cublasLtGetStatusString(st)));
  p.algo = res[tuning() ? pick_fastest(p, res, found, o, size_t(M * N) * (c_f32 ? 4 : 2)) : 0].algo;
  return cache->emplace(key, p).first->second;
}

int pick_fastest(const Plan& p, const cublasLtMatmulHeuristicResult_t* res, int found, const Operands& o,
                 size_t c_bytes) {
  void* D = device_alloc(c_bytes);
  cudaEvent_t e0, e1;
  DMAT_CUDA_CHECK(cudaEventCreate(&e0));
  DMAT_CUDA_CHECK(cudaEventCreate(&e1));
  int best = 0;
  float best_ms = 1e30f;
  for (int i = 0; i < found; ++i) {
    auto run = [&] {
      return cublasLtMatmul(lt().handle, p.op, &o.alpha, o.B, p.a, o.A, p.b, &o.beta, o.C, p.c, D, p.c, &res[i].algo,
                            lt().ws, kWorkspaceBytes, stream());
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;
    DMAT_CUDA_CHECK(cudaEventRecord(e0, stream()));
    for (int r = 0; r < 3; ++r) DMAT_CUBLAS_CHECK(run());
    DMAT_CUDA_CHECK(cudaEventRecord(e1, stream()));
    DMAT_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    DMAT_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (ms < best_ms) best_ms = ms, best = i;
  }
  DMAT_CUDA_CHECK(cudaEventDestroy(e0));
  DMAT_CUDA_CHECK(cudaEventDestroy(e1));
  device_free(D);
  return best;
}

}  // namespace

void gemm(void* C, bool c_f32, const bf16* A, const bf16* B, int64_t M, int64_t N, int64_t K, bool trans_a,
          bool trans_b, float alpha, float beta) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: C = beta·C (cuBLASLt does not take k = 0)
    if (beta == 0.f) memset_zero(C, size_t(M * N) * (c_f32 ? 4 : 2));
    else if (beta != 1.f && c_f32) scale_inplace_f32(static_cast<float*>(C), M * N, beta);
    else if (beta != 1.f) scale_inplace_bf16(static_cast<bf16*>(C), M * N, beta);
    return;
  }
  const Key key{M, N, K, trans_a, trans_b, c_f32, alignment(A), alignment(B), alignment(C)};
  const Plan& p = plan(key, Operands{A, B, C, alpha, beta});
  Lt& l = lt();
  const bool prof = profiling_gemms();
  if (prof)
    profile_detail_begin(fmt::format("gemm {}×{}×{} {}{} {}", M, N, K, trans_a ? 'T' : 'N', trans_b ? 'T' : 'N',
                                     c_f32 ? "f32" : "bf16"),
                         2.0 * double(M) * double(N) * double(K));
  DMAT_CUBLAS_CHECK(cublasLtMatmul(l.handle, p.op, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo, l.ws,
                                   kWorkspaceBytes, stream()));
  if (prof) profile_detail_end();
}

}  // namespace dmat::cuda
