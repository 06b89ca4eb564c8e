// Our flash attention (forward and backward) on tensor cores: causal, grouped KV heads, sliding
// window, the (d_qk, d_v) pairs of kernels/cuda/head_dims.h (32/32, 64/64, 128/128, and 192/128 for
// MLA). Two kernel families: mma.sync (every GPU, every pair) and wgmma (compute capability 9.0,
// built for sm_90a; the pairs the table marks wgmma); which one runs is chosen per direction (see
// FlashPath below).
// Semantics are cpu::attention_* with bf16 q, k, v, out, dq, dk, dv and fp32 lse [B,H,T]
// (natural log of Σ_j exp(s_ij)).
// Layout: q [B,T,H,Dqk], k [B,T,Hkv,Dqk], v [B,T,Hkv,Dv], out [B,T,H,Dv], row-major.
#pragma once
#include <cstdint>
#include <functional>

#include "core/bf16.h"
#include "kernels/attention_types.h"

namespace dmat::cuda {

using AttnShape = ::dmat::AttnShape;

// The head dims (head_dims.h) and the sizes (T < 2^31, H and B <= 65535, H a multiple of Hkv) the
// kernels are built for.
bool flash_attention_supported(const AttnShape& s);
void flash_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const AttnShape& s);
// dq, dk, dv overwrite. deterministic = true: no floating-point atomics (dQ in its own pass);
// false may use fp32 atomics for dQ (faster; run-to-run bits may differ).
void flash_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                              const bf16* q, const bf16* k, const bf16* v, const AttnShape& s, bool deterministic);

// ---- hooks for the sparse variants (DMA, NSA) ---------------------------------------------------
// Queries per tile of the forward kernel; a gathered key list is given per tile of this many.
int flash_attention_block_q();
// The attention backwards' side-stream mode (SideStream, kernels/cuda/context.h: 0 none, 1 a side
// stream of the greatest priority, 2 one of the compute stream's): with 1 or 2 the wgmma path's dQ
// pass runs beside its dK/dV pass, and the DMA backward's key groups, lists and dQ passes beside
// its delta kernel and dK/dV pass. kernel_options().attn_side_stream (default 2, measured
// fastest, docs/perf-log.md).
int attention_side_stream();
// Gathered keys: keys[((b·Hkv + hk)·n_tiles + tile)·capacity + n], n < count[(b·Hkv + hk)·n_tiles
// + tile], n_tiles = ceil(T / flash_attention_block_q()); key positions, each still masked per
// element by causality and the window (so a superset of the visible keys is always correct).
// thr (DMA, nullptr: none; needs key_bias): per-query threshold [B, Hkv, T] fp32; element (i, j)
// is also masked where key_bias[(b·Hkv + hk)·T + j] < thr[(b·Hkv + hk)·T + i] (raw fp32 values
// compared exactly: cpu::dma_attention_forward's kept(i, j) with the causal test above).
// A tile whose count exceeds capacity (biases tied at the threshold) visits every key below its
// last query instead: slower, still exact.
// tile0 / tiles: the lists cover query tiles tile0 .. tile0 + tiles − 1 only (their layout then has
// `tiles` tiles per row in place of n_tiles) and the call computes those tiles only; tiles < 0:
// every tile from tile0 on. Lists built in batches of tiles keep their memory bounded.
// keys == nullptr (with thr and the key bias, all tiles): no lists — dense DMA, every causal key
// visited with the threshold mask on every tile (the faster choice where most causal pairs are kept).
// clean (nullptr: none): per list, how many of its first keys every query of the tile keeps
// (dma_gather_keys' partitioned lists); the kernels skip the element mask on key tiles made only of
// those.
struct FlashGather {
  const int32_t* keys = nullptr;
  const int32_t* count = nullptr;
  int64_t capacity = 0;
  const float* thr = nullptr;
  int64_t tile0 = 0, tiles = -1;
  const int32_t* clean = nullptr;
};
// Builds (into scratch the caller owns) the gathered lists of query tiles tile0 .. tile0 + tiles − 1.
using FlashGatherSource = std::function<FlashGather(int64_t tile0, int64_t tiles)>;
// flash_attention_forward with an optional per-key additive fp32 bias (s_ij = scale·q_i·k_j +
// key_bias[(b·Hkv + hk)·T + j], natural-log units, nullptr: none) and an optional gathered key
// list (nullptr: every causal / windowed key). With a gather without lists (dense DMA) s.window is
// DMA's local window L, as in flash_attention_backward_dma.
void flash_attention_forward_ext(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                 const AttnShape& s, const float* key_bias, const FlashGather* gather);

// The DMA backward's key groups (built by dma_key_groups, kernels/cuda/dma.h): the dK/dV pass runs
// one block per group of kFlashGroupKeys key positions (any positions: every key of the row in
// exactly one group), visiting the queries range[0] .. range[1] (range[1] < range[0]: none).
// keys [B·Hkv][n_groups][kFlashGroupKeys] (−1: padding), range [B·Hkv][n_groups][2]. Groups are
// numbered region-major (regions × n_groups/regions); blocks run class by class across regions
// (class 0, the longest ranges, first).
constexpr int kFlashGroupKeys = 128;
class SideStream;  // kernels/cuda/context.h
struct FlashKeyGroups {
  const int32_t* keys = nullptr;
  const int32_t* range = nullptr;
  int64_t n_groups = 0, regions = 1;
};
// DMA backward (flash_attention_backward_dma below; deterministic, no atomics): dq, dk, dv (bf16)
// and dbias (fp32 [B,Hkv,T], Σ over the group's query heads and queries of dS_ij) overwrite.
// dK/dV/dbias key-major over `groups`, dQ query-major over gather (with gather.thr, the forward's
// lists). Head dims: the pairs head_dims.h marks dma (d_qk = d_v); s.window is DMA's local window L
// (thr from dma_thresholds with that L; L > 0 only dense), not a sliding window.


// ---- kernel path (tests, benchmarks) -----------------------------------------------------------
// automatic: per direction, the path measured faster on Hopper — forward mma.sync, backward wgmma
// where flash_attention_wgmma_available (else mma). kernel_options().attn_path
// (run.kernels.attn_path, or DMAT_ATTN_PATH) = mma|wgmma overrides automatic for both directions
// (wgmma: an error without an sm_90a-capable device; head dims without a wgmma kernel still use
// mma). An explicit FlashPath::wgmma fails where no wgmma kernel can run.
enum class FlashPath : int { automatic = 0, mma = 1, wgmma = 2 };
bool flash_attention_wgmma_available(const AttnShape& s);
FlashPath flash_attention_forward_path_for(const AttnShape& s, FlashPath requested);   // the path a call takes
FlashPath flash_attention_backward_path_for(const AttnShape& s, FlashPath requested);  // the path a call takes
void flash_attention_forward_path(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                  const AttnShape& s, const float* key_bias, const FlashGather* gather,
                                  FlashPath path);
// Backward with the same path choice. wgmma: dK/dV by a Hopper kernel (head dims 64, 128; the
// mma.sync one for (192, 128)) and dQ by a deterministic Hopper pass, for either value of
// deterministic (no atomics); mma: the mma.sync kernels, atomics for dQ when !deterministic.
void flash_attention_backward_path(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                                   const bf16* q, const bf16* k, const bf16* v, const AttnShape& s, bool deterministic,
                                   FlashPath path);
// The DMA backward described above (FlashKeyGroups): wgmma kernels for head dims 64 and 128 where
// the path resolves to wgmma, mma.sync otherwise; deterministic on both. The dQ pass runs in
// batches of tiles_per_batch query tiles, each over lists(tile0, tiles) (with thr = this thr),
// built just before it runs. groups.keys == nullptr with an empty `lists`: dense DMA — dK/dV
// over blocks of 128 consecutive keys and dQ over every causal key, the threshold mask applied
// per element wherever a tile may hold a dropped pair. With `side` (not null), the key groups
// must have been queued on it and marked (SideStream::mark); the lists and the dQ passes then run
// on the side stream, the delta kernel and the dK/dV pass on the compute stream (the caller joins).
void flash_attention_backward_dma(bf16* dq, bf16* dk, bf16* dv, float* dbias, const bf16* dout, const bf16* out,
                                  const float* lse, const bf16* q, const bf16* k, const bf16* v, const AttnShape& s,
                                  const float* key_bias, const float* thr, const FlashKeyGroups& groups,
                                  int64_t tiles_per_batch, const FlashGatherSource& lists,
                                  FlashPath path = FlashPath::automatic, SideStream* side = nullptr);

}  // namespace dmat::cuda

namespace dmat::cuda::testing {
// GPU self-check of the sm_90a building blocks on one tile (device pointers, row-major): a (64 x
// 128), b (128 x 128, [n][k]), v (128 x 128, [k][n]) bf16 -> s128 = a·bᵀ (64 x 128, m64n128k16
// from shared memory), s64 = a·b[0:64]ᵀ (64 x 64, m64n64k16), o = a·v (64 x 128, A from registers,
// V N-major), raw_a = a's 128B-swizzled shared tile (64·128 bf16, panel-major). false (nothing
// run) where the wgmma path is not available.
bool flash_wgmma_selftest(float* s128, float* s64, float* o, bf16* raw_a, const bf16* a, const bf16* b,
                          const bf16* v);
// GPU self-check of the TMA tile load (the forward's attn_wg_tma producer): rows row0 ..
// row0 + 127 of head `head` of src [rows][heads][128] bf16 into raw (128 x 128 bf16, the
// 128B-swizzled panel-major shared tile; rows past `rows` zero). false where not available.
bool flash_tma_selftest(bf16* raw, const bf16* src, int64_t rows, int64_t heads, int row0, int head);
// The attention kernels' block order (grid_pos) on a grid of X × Y × Z blocks with `order` (0:
// launch order; g > 0: heaviest tiles first in groups of g (y, z) pairs): out[3·l .. 3·l + 2] =
// the (x, y, z) that launch-linear block l = bx + X·(by + Y·bz) works on (device pointer, int32).
void flash_grid_order(int32_t* out, int X, int Y, int Z, int order);
// The order the forward, dQ and dK/dV grids use for shape s (kernel_options().attn_order; 0 = launch order).
int flash_grid_order_group(const AttnShape& s, int which);  // which: 0 forward, 1 dQ, 2 dK/dV, 3 DMA dK/dV
// Sets kernel_options().attn_side_stream (0, 1 or 2); returns the previous one.
// Results must not change by a bit.
int set_attention_side_stream(int mode);
}  // namespace dmat::cuda::testing
