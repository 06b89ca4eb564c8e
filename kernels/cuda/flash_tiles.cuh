// Tile building blocks of the flash-attention kernels (private to kernels/cuda/flash_*.cu):
// swizzled shared-memory tiles, cp.async global->shared copies with zero fill, ldmatrix loads of
// mma fragments, and the m16n8k16 bf16 tensor-core mma. Kept small so the kernels read like the
// algorithm; every fragment layout is derived from the PTX ISA and written next to its helper.
//
// m16n8k16 (row.col, bf16 -> fp32), lane = 4·g + t (g = lane/4 "group", t = lane%4):
//   A (16x16, 4 regs of 2 bf16): a0 (row g,   k 2t..2t+1)  a1 (row g+8, k 2t..)
//                                a2 (row g,   k 2t+8..)    a3 (row g+8, k 2t+8..)
//   B (16x8, 2 regs):            b0 (k 2t..2t+1, col g)    b1 (k 2t+8.., col g)
//   C (16x8, 4 fp32):            c0,c1 (row g, col 2t,2t+1) c2,c3 (row g+8, col 2t,2t+1)
// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m of lane l then
// holds (row l/4, cols 2(l%4), +1) of matrix m, or with .trans (rows 2(l%4),+1, col l/4).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dmat::cuda::flash {

// ---- shared tiles: rows of COLS bf16, 16-byte chunks XOR-swizzled by row ----------------------
// ldmatrix reads one 16-byte chunk from each of 8 consecutive rows; rows are ≥ 128 B apart, so
// unswizzled they would all sit in the same 4 banks (8-way conflict). XOR-ing the chunk index
// with the row spreads the 8 rows over all 32 banks. For 64-byte rows (4 chunks) two rows share
// a 128-byte line, so the chunk is XOR-ed with row/2 instead.
template <int COLS>
struct Smem {
  static_assert(COLS % 32 == 0, "tile rows must be at least 4 chunks");
  static constexpr int kChunks = COLS / 8;
  // element offset of (row, col); col's chunk is swizzled, its position in the chunk kept
  __device__ __forceinline__ static int off(int row, int col) {
    const int sw = kChunks >= 8 ? (row & 7) : ((row >> 1) & 3);
    return row * COLS + ((((col >> 3) ^ sw)) << 3) + (col & 7);
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 2^x by the special-function unit alone (ex2.approx.ftz: results below 2^-126 flush to 0). exp2f
// compiles to the same MUFU.EX2 wrapped in a denormal-result fix-up (compare, two multiplies):
// three extra instructions per score, for probabilities under 1e-38 that no bf16 output or fp32
// sum can show. −inf gives +0, as the masks need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- cp.async ----------------------------------------------------------------------------------
// 16 bytes global -> shared, bypassing L1; valid == false writes 16 zero bytes (src not read), so
// tail rows are zeros, never garbage (a NaN there would survive P = 0 in P·V).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copy a ROWS x COLS bf16 tile into a swizzled shared tile, all threads of the block cooperating.
// row_src(r) gives the global address of row r, or nullptr for a zero row (`base`, any valid
// global address, is then passed to cp.async but not read).
template <int ROWS, int COLS, int THREADS, class RowSrc>
__device__ __forceinline__ void load_tile_async(__nv_bfloat16* s, const __nv_bfloat16* base, RowSrc row_src) {
  constexpr int kChunks = COLS / 8, kTotal = ROWS * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + THREADS - 1) / THREADS; ++it) {
    const int idx = it * THREADS + int(threadIdx.x);
    if (kTotal % THREADS == 0 || idx < kTotal) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const __nv_bfloat16* g = row_src(r);
      cp_async16(s + Smem<COLS>::off(r, c), g ? g + c : base, g != nullptr);
    }
  }
}

// ---- ldmatrix ----------------------------------------------------------------------------------
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// A fragment (16 rows x 16 k) of a row-major [m][k] shared tile at (m0, k0):
// matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
template <int COLS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int m0, int k0, int lane) {
  ldsm_x4(a, s + Smem<COLS>::off(m0 + (lane & 15), k0 + ((lane >> 4) << 3)));
}
// A fragment of the transpose of a shared tile stored [k][m] (A(m,k) = s[k][m]): .trans, with
// matrices 0..3 = stored (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15).
template <int COLS>
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const __nv_bfloat16* s, int m0, int k0, int lane) {
  ldsm_x4_t(a, s + Smem<COLS>::off(k0 + (lane & 7) + ((lane >> 4) << 3), m0 + (((lane >> 3) & 1) << 3)));
}
// B fragments of two adjacent n8 blocks (n0..n0+15) x k16 from a shared tile stored [n][k]
// (B(k,n) = s[n][k], e.g. K for S = Q·K^T): b[0],b[1] for block n0, b[2],b[3] for n0+8.
// matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <int COLS>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const __nv_bfloat16* s, int n0, int k0, int lane) {
  ldsm_x4(b, s + Smem<COLS>::off(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + (((lane >> 3) & 1) << 3)));
}
// Same two n8 blocks from a shared tile stored [k][n] (B(k,n) = s[k][n], e.g. V for O = P·V):
// .trans, matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int COLS>
__device__ __forceinline__ void load_b_t(uint32_t (&b)[4], const __nv_bfloat16* s, int n0, int k0, int lane) {
  ldsm_x4_t(b, s + Smem<COLS>::off(k0 + (lane & 15), n0 + ((lane >> 4) << 3)));
}

// ---- mma ---------------------------------------------------------------------------------------
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&h);
}

// A register tile of a warp: 16 rows x N columns of fp32 accumulators (N/8 C fragments).
template <int N>
struct Acc {
  float c[N / 8][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
  }
  // The A fragment of k-step kk (columns 16kk..16kk+15) for a following mma, rounded to bf16:
  // C blocks 2kk and 2kk+1 line up with A's (k 2t..) and (k 2t+8..) halves.
  __device__ __forceinline__ void to_a(uint32_t (&a)[4], int kk) const {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
};

// acc(16 x N) += A(16 x K, shared [m][k] at row m0) · B where B(k, n) = sB[n][k] (rows n of sB).
template <int K, int N, int COLS_A, int COLS_B>
__device__ __forceinline__ void mma_ss_abt(Acc<N>& acc, const __nv_bfloat16* sA, int m0, const __nv_bfloat16* sB,
                                           int n_off, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<COLS_A>(a, sA, m0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      load_b<COLS_B>(b, sB, n_off + np * 16, kk * 16, lane);
      mma16816(acc.c[2 * np], a, b[0], b[1]);
      mma16816(acc.c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The forward kernels' per-key-tile steps (flash_fwd_sm80.cu, nsa_attention_sm80.cu), on a warp's
// 16 rows: a thread holds rows g (C elements 0, 1) and g + 8 (2, 3) of each 8-column block.

// S(16 x N) += Q · Kᵀ with Q's K/16 A fragments already in registers (loaded once per query tile)
// and K(n, k) = sK[n][k]: the scores of one key tile.
template <int K, int N>
__device__ __forceinline__ void mma_qkt(Acc<N>& s, const uint32_t (&qa)[K / 16][4], const __nv_bfloat16* sK, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t kb[4];
      load_b<K>(kb, sK, np * 16, kk * 16, lane);
      mma16816(s.c[2 * np], qa[kk], kb[0], kb[1]);
      mma16816(s.c[2 * np + 1], qa[kk], kb[2], kb[3]);
    }
  }
}

// The online softmax over one key tile of scores s (log2 units, masked entries −inf): m (row max)
// and l (row sum of exp2(s − m)) move to include the tile, the running output o is rescaled by
// exp2(m_old − m_new), and s becomes the tile's unnormalised probabilities exp2(s − m_new). A row
// with nothing visible yet keeps m = −inf and gets p = 0 (exp2 of −inf against base 0).
template <int BN, int DV>
__device__ __forceinline__ void online_softmax_tile(Acc<BN>& s, Acc<DV>& o, float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s.c[nb][2 * hf], s.c[nb][2 * hf + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[hf], mx);
    const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
    const float alpha = fast_exp2(m[hf] - base);
    m[hf] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
      s.c[nb][2 * hf] = fast_exp2(s.c[nb][2 * hf] - base);
      s.c[nb][2 * hf + 1] = fast_exp2(s.c[nb][2 * hf + 1] - base);
      sum += s.c[nb][2 * hf] + s.c[nb][2 * hf + 1];
    }
    l[hf] = l[hf] * alpha + sum;
#pragma unroll
    for (int nb = 0; nb < DV / 8; ++nb) {
      o.c[nb][2 * hf] *= alpha;
      o.c[nb][2 * hf + 1] *= alpha;
    }
  }
}

// O(16 x DV) += P · V with P the bf16 rounding of the tile's probabilities s (16 x BN) and
// V(k, n) = sV[k][n] (rows k of sV).
template <int BN, int DV>
__device__ __forceinline__ void mma_pv(Acc<DV>& o, const Acc<BN>& s, const __nv_bfloat16* sV, int lane) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t pa[4];
    s.to_a(pa, kk);
#pragma unroll
    for (int np = 0; np < DV / 16; ++np) {
      uint32_t vb[4];
      load_b_t<DV>(vb, sV, np * 16, kk * 16, lane);
      mma16816(o.c[2 * np], pa, vb[0], vb[1]);
      mma16816(o.c[2 * np + 1], pa, vb[2], vb[3]);
    }
  }
}

}  // namespace dmat::cuda::flash
