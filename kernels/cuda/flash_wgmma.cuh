// Hopper (sm_90a) building blocks of the flash-attention kernels (private to
// kernels/cuda/flash_*_sm90.cu): 128-byte-swizzled shared tiles filled by cp.async, wgmma
// shared-memory descriptors, the warpgroup MMAs used (m64n64k16 / m64n128k16, bf16 -> fp32),
// mbarriers and the fences between the generic and async proxies. Everything here assembles only
// for sm_90a: callers guard with DMAT_FLASH_SM90A.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Shared Memory Layout"):
// * A shared tile of R rows x C bf16 (C a multiple of 64) is stored as C/64 panels; panel p holds
//   columns 64p..64p+63 of every row, one 128-byte line per row, rows 128 B apart, panels
//   R·128 B apart. Inside a line the 16-byte chunk c of row r sits at chunk position c ^ (r % 8):
//   the 128B swizzle, which the hardware applies to address bits [4,7) ^ [7,10), so every panel
//   must start 1024-byte aligned (8 rows = one 1024-byte swizzle atom).
// * K-major operand (rows = M or N, columns = the contraction dim k: Q and K for S = Q·Kᵀ):
//   the descriptor starts at (panel k0/64, byte 2·(k0 % 64) of row 0) for the k16 step at k0;
//   SBO = 1024 (from one 8-row group to the next); LBO is unused with swizzling (set to 16 B).
// * N-major operand (rows = k, columns = n: V for O = P·V, imm-trans-b = 1): the descriptor
//   starts at row k0 of the panel holding n0..n0+63; within a k16 step there are two 8-row groups
//   1024 B apart. We issue one n64 MMA per panel, so the MN-direction stride between panels is
//   never used; the PTX ISA names the two strides of an MN-major layout differently from the
//   K-major one (LBO: between 64-wide MN panels, SBO: between 8-row k groups), and we set both to
//   1024 so either reading gives the same addresses.
// Register fragments (PTX ISA, "Register Fragments", wgmma .m64nNk16): warp w (0..3) of the
// warpgroup owns rows 16w..16w+15; for lane = 4g + t, accumulator register 4·j + x holds
// (row 16w + g + 8·(x >= 2), column 8j + 2t + (x & 1)) — per warp exactly the mma.m16n8 C layout,
// so flash::Acc<N> (c[N/8][4]) is the accumulator of an m64nN MMA. The A fragment of a k16 step
// (4 registers) has the mma.m16n8k16 A layout: Acc::to_a turns a score accumulator into it.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/flash_tiles.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DMAT_FLASH_SM90A 1
#endif

namespace dmat::cuda::flash::sm90 {

// ---- 128B-swizzled tiles -------------------------------------------------------------------
template <int ROWS, int COLS>
struct Sw128 {
  static_assert(COLS % 64 == 0 && ROWS % 8 == 0, "128B-swizzled tiles: 64-column panels, 8-row atoms");
  static constexpr int kPanels = COLS / 64;
  static constexpr int kBytes = ROWS * COLS * 2;
  static constexpr int kPanelBytes = ROWS * 128;
  // byte offset of the 16-byte chunk cc (columns 8cc..8cc+7) of row r
  __device__ __forceinline__ static uint32_t chunk(int r, int cc) {
    return uint32_t((cc >> 3) * kPanelBytes + r * 128 + (((cc & 7) ^ (r & 7)) << 4));
  }
  // byte offset of element (r, c)
  __device__ __forceinline__ static uint32_t elem(int r, int c) { return chunk(r, c >> 3) + uint32_t((c & 7) * 2); }
};

__device__ __forceinline__ void cp_async16_u32(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// cp.async of a ROWS x COLS bf16 tile into the Sw128 tile at shared address s, by THREADS threads
// (tid in [0, THREADS)). row_src(r): the global address of row r, nullptr for a zero row (`base`,
// any valid global address, is then handed to cp.async but not read). Consecutive threads take
// consecutive 16-byte chunks of a row: coalesced reads, and the 8 chunks of a 128-byte line land
// on 8 distinct positions of it (no bank conflicts).
// Where THREADS is a multiple of 8 rows' chunks (COLS 64 and 128 with 128 threads), each thread
// keeps one chunk column and rows r0, r0 + step, ... with step a multiple of 8, so its swizzled
// position is one constant plus step·128 per row: per chunk one row lookup, one multiply-add and
// the cp.async (the producer warpgroup's issue rate bounds the gathered tiles). Otherwise ((192,
// 128) head dims) the plain loop, not unrolled: the producer runs with few registers.
template <int ROWS, int COLS, int THREADS, class RowSrc>
__device__ __forceinline__ void load_sw128_async(uint32_t s, const __nv_bfloat16* base, RowSrc row_src, int tid) {
  constexpr int kChunks = COLS / 8, kTotal = ROWS * kChunks;
  if constexpr (THREADS % kChunks == 0 && (THREADS / kChunks) % 8 == 0 && ROWS % (THREADS / kChunks) == 0) {
    constexpr int kStep = THREADS / kChunks;  // rows per pass
    const int cc = tid % kChunks, r0 = tid / kChunks;
    const uint32_t s0 = s + Sw128<ROWS, COLS>::chunk(r0, cc);  // row r0 + k·kStep: s0 + k·kStep·128
#pragma unroll 4
    for (int k = 0; k < ROWS / kStep; ++k) {
      const __nv_bfloat16* g = row_src(r0 + k * kStep);
      cp_async16_u32(s0 + uint32_t(k * kStep * 128), g ? g + cc * 8 : base, g != nullptr);
    }
  } else {
#pragma unroll 1
    for (int it = 0; it < (kTotal + THREADS - 1) / THREADS; ++it) {
      const int idx = it * THREADS + tid;
      if (kTotal % THREADS == 0 || idx < kTotal) {
        const int r = idx / kChunks, cc = idx % kChunks;
        const __nv_bfloat16* g = row_src(r);
        cp_async16_u32(s + Sw128<ROWS, COLS>::chunk(r, cc), g ? g + cc * 8 : base, g != nullptr);
      }
    }
  }
}

// Gathered rows (the DMA key tiles: any positions) in load_sw128_async's fast mapping. Thread tid
// keeps chunk column tid % kChunks and rows r0 + k·kStep (r0 = tid / kChunks), so warp w reads only
// the ROWS/4 rows w·kPer + s + k·kStep (s < kPer, the rows one warp instruction covers). Lane m of
// warp w is given one of them, lane_row(w, m) (the one with k = m / kPer, s = m % kPer), loads its
// position once per tile, and every chunk takes its row's position from that lane by a shuffle:
// one load per lane and tile instead of one per chunk, and no load latency between the chunks.
template <int ROWS, int COLS>
struct GatherRows {
  static constexpr int kChunks = COLS / 8, kStep = 128 / kChunks, kPer = 32 / kChunks;
  static constexpr bool kOk = 32 % kChunks == 0 && kStep % 8 == 0 && ROWS % kStep == 0 && ROWS <= 128;
  // the row whose position lane m of warp w loads, −1 for lanes without one
  __device__ __forceinline__ static int lane_row(int w, int m) {
    return m < ROWS / 4 ? w * kPer + m % kPer + kStep * (m / kPer) : -1;
  }
};

// Two gathered ROWS x COLS tiles with the same rows (K and V), by the 128 threads of a producer
// warpgroup: j_lane is the position this lane was given (GatherRows::lane_row; −1: padding, a zero
// row), a and b the row-0 addresses of the two tensors' rows (row j at a + j·a_stride).
template <int ROWS, int COLS>
__device__ __forceinline__ void load_gathered_pair_async(uint32_t sa, uint32_t sb, const __nv_bfloat16* a,
                                                         int a_stride, const __nv_bfloat16* b, int b_stride,
                                                         int j_lane, int tid) {
  using G = GatherRows<ROWS, COLS>;
  static_assert(G::kOk, "rows and columns of the shuffle mapping");
  const int cc = tid % G::kChunks, sub = (tid & 31) / G::kChunks;
  const uint32_t o0 = Sw128<ROWS, COLS>::chunk(tid / G::kChunks, cc);
  a += cc * 8, b += cc * 8;
#pragma unroll 4
  for (int k = 0; k < ROWS / G::kStep; ++k) {
    const int j = __shfl_sync(0xffffffffu, j_lane, k * G::kPer + sub);
    const bool ok = j >= 0;
    const int jj = ok ? j : 0;  // row 0: a valid address, not read (zero fill)
    const uint32_t o = o0 + uint32_t(k * G::kStep * 128);
    cp_async16_u32(sa + o, a + int64_t(jj) * a_stride, ok);
    cp_async16_u32(sb + o, b + int64_t(jj) * b_stride, ok);
  }
}

// ---- descriptors ---------------------------------------------------------------------------
// bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset (0: atoms
// 1024-aligned), 62-63 swizzle (1 = 128B).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t((lbo >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}
// K-major operand: rows row0.. (a multiple of 8) of an Sw128<ROWS, COLS> tile at s, k16 step kk.
template <int ROWS, int COLS>
__device__ __forceinline__ uint64_t desc_kmajor(uint32_t s, int row0, int kk) {
  return desc_sw128(s + uint32_t((kk >> 2) * Sw128<ROWS, COLS>::kPanelBytes + row0 * 128 + (kk & 3) * 32), 16, 1024);
}
// N-major operand: the k16 step kk (rows 16kk..) of panel p (columns 64p..64p+63).
template <int ROWS, int COLS>
__device__ __forceinline__ uint64_t desc_nmajor(uint32_t s, int kk, int p) {
  return desc_sw128(s + uint32_t(p * Sw128<ROWS, COLS>::kPanelBytes + kk * 16 * 128), 1024, 1024);
}

// ---- warpgroup MMA -------------------------------------------------------------------------
// Order: wgmma_fence() after the last register write to an accumulator or A fragment and before
// the MMAs that use it; then the MMAs; commit; wait<0> before reading the accumulators (and
// before writing them or an A fragment again); fence_operands keeps the compiler from moving
// accumulator accesses across those points (the asm statements themselves only name the
// registers of their own MMA).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int NB>
__device__ __forceinline__ void fence_operands(float (&d)[NB][4]) {
#pragma unroll
  for (int i = 0; i < NB; ++i)
#pragma unroll
    for (int x = 0; x < 4; ++x) asm volatile("" : "+f"(d[i][x])::"memory");
}
__device__ __forceinline__ void fence_operands(uint32_t (&a)[4]) {
#pragma unroll
  for (int x = 0; x < 4; ++x) asm volatile("" : "+r"(a[x])::"memory");
}

#ifdef DMAT_FLASH_SM90A
// D(64 x 64, fp32) (+)= A(64 x 16, shared, K-major) . B(16 x 64, shared, K-major)
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(da), "l"(db), "r"(scale_d));
}

// D(64 x 128, fp32) (+)= A(64 x 16, shared, K-major) . B(16 x 128, shared, K-major)
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(da), "l"(db), "r"(scale_d));
}

// D(64 x 64, fp32) += A(64 x 16, registers) . B(16 x 64, shared, N-major: imm-trans-b = 1)
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}

#endif  // DMAT_FLASH_SM90A

// ---- mbarriers and fences ------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// After initialising barriers that the copy engine will update (complete_tx): make the inits
// visible to it, then a block barrier.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
// arrive (release semantics at CTA scope, the default)
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `parity` has completed (acquire). A fresh barrier is in phase 0,
// so waiting for parity 1 returns at once: the "previous phase" counts as complete.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MBAR_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// The completion of every cp.async this thread issued so far, as one arrival on `bar` (.noinc: the
// barrier's expected count includes it). The producer moves on at once; the consumer that waits
// on the barrier then issues fence_proxy_async before its wgmma reads the copied tiles.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Generic-proxy writes (cp.async, plain stores) made visible to the async proxy (wgmma operand
// reads): in each writing thread after cp.async.wait_group and before the barrier that hands the
// data over; or, where the copies complete on the barrier itself (cp_async_mbar_arrive: the writer
// never sees them land), in each reading thread after its wait and before its wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- TMA (bulk tensor copies) ---------------------------------------------------------------
// The tensor maps are 3-D {head dim, heads, B·T rows} with a {64, 1, rows} box and the 128B
// swizzle: one copy writes one Sw128 panel (rows x 128 B, chunk c of row r at c ^ r % 8, given a
// 1024-aligned destination), exactly the layout above. Completion: the copy engine decrements the
// mbarrier's transaction count by the bytes written (complete_tx); the thread that issues the copies
// first arms the barrier with arrive.expect_tx(total bytes). Written through the async proxy and
// read by wgmma through it: no proxy fence.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// tmap: the generic address of a __grid_constant__ CUtensorMap kernel parameter
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// A plain bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) completing on
// the same kind of barrier: the key biases of a tile beside its K/V panels.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}

#ifdef DMAT_FLASH_SM90A
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

}  // namespace dmat::cuda::flash::sm90
