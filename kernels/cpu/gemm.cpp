// CPU GEMM: the GotoBLAS/BLIS structure. op(A) and op(B) are packed, per block of KC k's, into
// panels of MR rows / NR columns laid out k-major; a register-tiled MR x NR micro-kernel (plain
// loops the compiler turns into FMA vectors) then runs over the tile grid.
//
// One parallel region per call with two barriers (after packing, at the end): on a machine shared
// with other processes every barrier can cost a time slice, so the K loop is inside each thread's
// task rather than around the parallel loops.
//
// Determinism: tiles sit on a fixed MR x NR grid from the origin, each C element is summed over k
// in increasing order inside a KC block and the KC blocks are applied in increasing order; the
// thread count only changes which thread computes a tile, never how.
#include <algorithm>
#include <cstddef>
#include <new>

#include <omp.h>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {
namespace {

template <class T> struct Blocking;
// float: 8 rows x 2 AVX-512 vectors (16 accumulators of 32 registers); B micro-panel KC x NR = 16 KiB (L1).
template <> struct Blocking<float> { static constexpr int64_t MR = 8, NR = 32, KC = 128, MC = 128, NC = 4096; };
template <> struct Blocking<double> { static constexpr int64_t MR = 8, NR = 16, KC = 128, MC = 128, NC = 2048; };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned scratch, not zero-initialized (packing writes every element it reads back).
template <class T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<T*>(::operator new[](size_t(std::max<int64_t>(n, 1)) * sizeof(T), std::align_val_t(64)))) {}
  ~Scratch() { ::operator delete[](p_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// Packs op(A)[0:M, p0:p0+kc], panel r (rows r*MR ...) into dst (MR*kc values): element (i, k) at
// k*MR + i. Rows past M are zero.
template <class T>
void pack_a_panel(T* d, const T* A, int64_t M, int64_t K, bool trans_a, int64_t p0, int64_t kc, int64_t r) {
  constexpr int64_t MR = Blocking<T>::MR;
  const int64_t i0 = r * MR, mr = std::min(MR, M - i0);
  if (trans_a) {  // A stored [K, M]: a k-row of the panel is contiguous
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = A + (p0 + k) * M + i0;
      for (int64_t i = 0; i < mr; ++i) d[k * MR + i] = src[i];
      for (int64_t i = mr; i < MR; ++i) d[k * MR + i] = T(0);
    }
  } else {  // A stored [M, K]
    for (int64_t i = 0; i < mr; ++i) {
      const T* src = A + (i0 + i) * K + p0;
      for (int64_t k = 0; k < kc; ++k) d[k * MR + i] = src[k];
    }
    for (int64_t i = mr; i < MR; ++i)
      for (int64_t k = 0; k < kc; ++k) d[k * MR + i] = T(0);
  }
}

// Packs op(B)[p0:p0+kc, :], panel r (columns r*NR ...) into dst (kc*NR values): element (k, j) at
// k*NR + j. Columns past N are zero.
template <class T>
void pack_b_panel(T* d, const T* B, int64_t N, int64_t K, bool trans_b, int64_t p0, int64_t kc, int64_t r) {
  constexpr int64_t NR = Blocking<T>::NR;
  const int64_t j0 = r * NR, nr = std::min(NR, N - j0);
  if (trans_b) {  // B stored [N, K]
    for (int64_t j = 0; j < nr; ++j) {
      const T* src = B + (j0 + j) * K + p0;
      for (int64_t k = 0; k < kc; ++k) d[k * NR + j] = src[k];
    }
    for (int64_t j = nr; j < NR; ++j)
      for (int64_t k = 0; k < kc; ++k) d[k * NR + j] = T(0);
  } else {  // B stored [K, N]
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = B + (p0 + k) * N + j0;
      for (int64_t j = 0; j < nr; ++j) d[k * NR + j] = src[j];
      for (int64_t j = nr; j < NR; ++j) d[k * NR + j] = T(0);
    }
  }
}

// acc = Σ_k a[:, k] b[k, :] over a full MR x NR tile, then c[0:mr, 0:nr] = alpha*acc + beta*c
// (beta == 0: c's old value is not read).
template <class T>
void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c, int64_t ldc,
                  int64_t mr, int64_t nr, T alpha, T beta) {
  constexpr int64_t MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  alignas(64) T acc[MR][NR];
  for (int64_t i = 0; i < MR; ++i)
#pragma omp simd
    for (int64_t j = 0; j < NR; ++j) acc[i][j] = T(0);
  for (int64_t k = 0; k < kc; ++k) {
    const T* ak = a + k * MR;
    const T* bk = b + k * NR;
    for (int64_t i = 0; i < MR; ++i) {
      const T ai = ak[i];
#pragma omp simd
      for (int64_t j = 0; j < NR; ++j) acc[i][j] += ai * bk[j];
    }
  }
  if (beta == T(0)) {
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = alpha * acc[i][j];
  } else {
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = alpha * acc[i][j] + beta * c[i * ldc + j];
  }
}

}  // namespace

template <class T>
void gemm(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, T alpha,
          T beta) {
  using Blk = Blocking<T>;
  constexpr int64_t MR = Blk::MR, NR = Blk::NR, KC = Blk::KC;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // op(A)·op(B) is zero
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * N + j] = beta == T(0) ? T(0) : beta * C[i * N + j];
    return;
  }
  // All of op(A) and op(B) packed up front: K block p0 of A starts at p0 * m_panels * MR, and
  // its panel r at r * MR * kc within it (likewise for B).
  const int64_t m_panels = ceil_div(M, MR), n_panels = ceil_div(N, NR), k_blocks = ceil_div(K, KC);
  Scratch<T> apack(m_panels * MR * K);
  Scratch<T> bpack(n_panels * NR * K);
  T* const ap = apack.get();
  T* const bp = bpack.get();

  // Work split: blocks of MC rows (fewer when M is small, so every thread gets work) times
  // groups of NR panels. Changing it moves tiles between threads, never changes a tile's sum.
  const int64_t threads = omp_get_max_threads();
  const int64_t mc_panels = std::clamp<int64_t>(ceil_div(m_panels, 4 * threads), 1, Blk::MC / MR);
  const int64_t m_blocks = ceil_div(m_panels, mc_panels);
  int64_t n_groups = m_blocks >= 2 * threads ? 1 : std::min(n_panels, ceil_div(4 * threads, m_blocks));
  const int64_t group_panels = ceil_div(n_panels, n_groups);
  n_groups = ceil_div(n_panels, group_panels);
  constexpr int64_t nc_panels = Blk::NC / NR;  // B columns kept hot in cache across a K block

#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < k_blocks * (m_panels + n_panels); ++item) {
      const int64_t pb = item / (m_panels + n_panels), r = item % (m_panels + n_panels);
      const int64_t p0 = pb * KC, kc = std::min(KC, K - p0);
      if (r < m_panels)
        pack_a_panel(ap + p0 * m_panels * MR + r * MR * kc, A, M, K, trans_a, p0, kc, r);
      else
        pack_b_panel(bp + p0 * n_panels * NR + (r - m_panels) * NR * kc, B, N, K, trans_b, p0, kc, r - m_panels);
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < m_blocks * n_groups; ++task) {
      const int64_t mb = task / n_groups, g = task % n_groups;
      const int64_t ip_begin = mb * mc_panels, ip_end = std::min(m_panels, ip_begin + mc_panels);
      const int64_t jp_begin = g * group_panels, jp_end = std::min(n_panels, jp_begin + group_panels);
      for (int64_t jc = jp_begin; jc < jp_end; jc += nc_panels) {
        for (int64_t p0 = 0; p0 < K; p0 += KC) {
          const int64_t kc = std::min(KC, K - p0);
          const T beta_here = p0 == 0 ? beta : T(1);
          const T* a_blk = ap + p0 * m_panels * MR;
          const T* b_blk = bp + p0 * n_panels * NR;
          for (int64_t jp = jc; jp < std::min(jp_end, jc + nc_panels); ++jp) {
            const int64_t j = jp * NR, nr = std::min(NR, N - j);
            for (int64_t ip = ip_begin; ip < ip_end; ++ip) {
              const int64_t i = ip * MR, mr = std::min(MR, M - i);
              micro_kernel<T>(kc, a_blk + ip * MR * kc, b_blk + jp * NR * kc, C + i * N + j, N, mr, nr, alpha,
                              beta_here);
            }
          }
        }
      }
    }
  }
}

template void gemm<float>(float*, const float*, const float*, int64_t, int64_t, int64_t, bool, bool, float, float);
template void gemm<double>(double*, const double*, const double*, int64_t, int64_t, int64_t, bool, bool, double,
                           double);

}  // namespace dmat::cpu
