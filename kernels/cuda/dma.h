// Dynamic Mask Attention on the GPU (README "The model"; arXiv 2508.02124): the
// per-key bias from the values and its backward, the per-query thresholds, the gathered key lists
// and key groups, and the sparse attention forward and backward built on flash_attention.h.
// Semantics, layouts and the tie rule are those of the CPU reference (kernels/cpu/cpu_ops.h,
// "Dynamic Mask Attention"):
//   v [B,T,Hkv,Dh] bf16; W_dt [Hkv, Hkv·Dh] bf16; A [Hkv] bf16 (a parameter, like W_dt);
//   z, bias, thr [B,Hkv,T] fp32; dbias [B,Hkv,T] fp32; dW_dt, dA fp32 (+=); dv bf16 (+=).
// All run on dmat::cuda::stream(), asynchronously; pointers are device pointers. Every reduction
// runs in a fixed order (no floating-point atomics): same inputs, same bits.
#pragma once
#include <cstdint>

#include "core/bf16.h"
#include "kernels/attention_types.h"
#include "kernels/cuda/flash_attention.h"  // FlashPath

namespace dmat::cuda {

using DmaBiasForm = ::dmat::DmaBiasForm;
using AttnShape = ::dmat::AttnShape;

// z[b,h,t] = Σ_c v[b,t,c]·W_dt[h,c] (c over Hkv·Dh, fp32 accumulation);
// bias = exp(A_h·softplus(z)) (Exp) or A_h·softplus(z) (Linear). z, bias overwrite.
void dma_bias_forward(float* z, float* bias, const bf16* v, const bf16* w_dt, const bf16* A, int64_t B, int64_t T,
                      int64_t Hkv, int64_t Dh, DmaBiasForm form);
// From dbias (and z, bias as saved by the forward): dv += the bias path's share (fp32 math, one
// bf16 rounding per element), dw_dt += Σ_{b,t} dz·v, dA += Σ_{b,t} ∂bias/∂A·dbias (fp32).
void dma_bias_backward(bf16* dv, float* dw_dt, float* dA, const float* dbias, const float* z, const float* bias,
                       const bf16* v, const bf16* w_dt, const bf16* A, int64_t B, int64_t T, int64_t Hkv, int64_t Dh,
                       DmaBiasForm form);

// thr[r, i] = the window-th largest of bias[r, 0..i], −inf while i + 1 < window; rows = B·Hkv.
// Pure selection (values are copied, never computed), so bit-identical to cpu::dma_thresholds,
// except that −0.0 is returned as +0.0 (the two compare equal; the CPU heap may return either).
// A row holding a NaN bias gets NaN thresholds (the CPU reference throws instead).
// Per row: one stable radix sort of (bias, position) pairs, then a scan of i = 0..T−1 keeping the
// rank p of the current threshold in a bitset of inserted ranks; p only moves up (thresholds
// never decrease). The scan runs in segments of queries (256 by default; 512 for the walk
// variant), one block each, all in parallel: a segment rebuilds its entering state (the top-w ranks
// of its prefix, read off the sorted row) and then steps serially through its queries. Where the T-bit bitset does not fit in shared
// memory (T beyond ~1.8M) one block per row scans all of T serially, the bitset in global memory.
// No T×T buffer; workspace ≈ 36 bytes per element, rows taken in batches of at most 16 MiB.
// local > 0 (the local window of cpu_ops.h): thr[r, i] = the window-th largest of bias[r, 0..i−local]
// (−inf before), i.e. the thresholds above shifted by `local` in place, one block per row.
void dma_thresholds(float* thr, const float* bias, int64_t rows, int64_t T, int64_t window, int64_t local = 0);
// The scan behind dma_thresholds (run.kernels.dma_thresholds = walk|bounds|serial picks it; default bounds):
// bounds — every segment's entering and leaving threshold rank first, by rank searches over
// per-chunk histograms, then each segment walks only the ranks between the two (O(T log T +
// T²/SEG²) per row for segments of SEG = 256 queries, run.kernels.dma_thr_seg = 128|256|512; measured the
// fastest on the H200 for random and position-ordered biases;
// rows of T ≤ 4096 run it in one block each, sort included, with 32-query segments: one launch,
// no workspace);
// walk — segments rebuild their entering state by walking the sorted row down from the top
// (O(T²/512) per row when biases increase with position); serial — one block per row. Same
// results bit for bit (the thresholds tests run all three).
enum class DmaThresholdScan { walk, bounds, serial };
void dma_thresholds_scan(float* thr, const float* bias, int64_t rows, int64_t T, int64_t window,
                         DmaThresholdScan scan);

// Gathered key lists for flash_attention_forward_ext (flash_attention.h, FlashGather layout):
// for row r = b·Hkv + hk and query tile q of rows [i0, i1) (i0 = q·flash_attention_block_q(),
// i1 = min(i0 + block, T)): every key j < i1 with bias[r, j] >= thr[r, i0], in increasing j —
// the keys some query of the tile may keep (thr never decreases, so a key below thr[i0] is kept by
// no query of the tile). Without ties at most min(i1, window + block − 1) keys; ties at the
// threshold add more (all biases equal: every causal key). keys[(r·n_tiles + q)·capacity + n] for
// n < min(count, capacity); count[r·n_tiles + q] is the true count, which may exceed capacity (the
// list is then truncated: the caller must check). max_count (nullptr: skipped) receives
// max(*max_count, every count) (integer atomics); initialise it before the call.
// Work: tile q + 1's list is tile q's filtered by the new threshold plus the keys of tile q's own
// range, O(w + block) per tile; every 16th tile (and one after an overflowed list) scans its
// prefix, O(i1): per row O(T·w/block + T²/(16·block)).
int64_t dma_gather_tiles(int64_t T);  // n_tiles = ceil(T / flash_attention_block_q())
// tile0 / tiles (tiles < 0: to the end): only those query tiles, laid out with `tiles` per row.
// clean (nullptr: lists in increasing j): each list stably partitioned, first the keys every query
// of the tile keeps (j < i0, bias_j >= thr[i1 − 1]), then the others, each part in increasing j;
// clean[r·n_tiles + q] counts the first part (0 where the list overflows). It needs `work`,
// dma_gather_work_ints(rows, T, capacity, tiles) int32 of scratch.
void dma_gather_keys(int32_t* keys, int32_t* count, int32_t* max_count, int64_t capacity, const float* bias,
                     const float* thr, int64_t rows, int64_t T, int64_t tile0 = 0, int64_t tiles = -1,
                     int32_t* clean = nullptr, int32_t* work = nullptr);
int64_t dma_gather_work_ints(int64_t rows, int64_t T, int64_t capacity, int64_t tiles);
// min(T, window + block − 1): the longest list without ties (the w keys query i0 keeps plus the
// tile's own). Tiles with more (ties at the threshold) run densely (FlashGather).
int64_t dma_gather_capacity(int64_t T, int64_t window);

// Key groups of the backward's dK/dV pass (FlashKeyGroups in flash_attention.h): per row, regions of
// R = dma_group_region_size(T) keys (T/8 as a power of two in [1024, 16384], and R·8 bytes within
// the device's shared memory per block), each sorted by last_j
// (the last query keeping key j: by monotone thresholds the queries keeping j are exactly
// j .. last_j) descending, then cut into groups of kFlashGroupKeys; a group's range is
// [min j, max last_j] over its kept keys. keys [rows][dma_group_count(T)][128],
// range [rows][dma_group_count(T)][2]. Work O(T log² R) per row, no T×T anything.
int64_t dma_group_region_size(int64_t T);
int64_t dma_group_regions(int64_t T);
int64_t dma_group_count(int64_t T);
void dma_key_groups(int32_t* keys, int32_t* range, const float* bias, const float* thr, int64_t rows, int64_t T);

// The DMA attention ops (cpu::dma_attention_forward / _backward semantics; s.window is the local
// window L, 0 for the paper's DMA, with thr from dma_thresholds(…, L); `window` is w, which sizes the
// gathered lists; a local window runs dense in both directions). bf16 q, k, v, out, dout, dq, dk, dv; fp32 lse
// [B,H,T], bias, thr, dbias [B,Hkv,T]. The forward: lists (dma_gather_keys), then the gathered flash
// forward with the bias and threshold mask. The backward: lists and key groups, then
// flash_attention_backward_dma; with attention_side_stream() (flash_attention.h, default on) the
// key groups, lists and dQ passes run on a side stream beside the delta kernel and the dK/dV pass,
// and the call returns with the compute stream ordered after both. Lists are built per batch of query tiles of at most 24 MiB
// (the kernels then run on that batch), so the workspace (workspace3: key groups, ~rows·T int32,
// plus one batch of lists) stays bounded at any T; no T×T buffer.
// Where w keeps at least half the causal pairs the forward runs dense instead (every causal pair
// visited, the threshold mask per element; no lists): gathering costs more per pair (~1.5× the
// dense forward's). The backward stays gathered (measured faster there). run.kernels.dma_dense = 0|1 forces either mode for
// both directions.
// path: the flash kernel family (flash_attention.h; automatic: the library's choice).
void dma_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const float* bias,
                           const float* thr, const AttnShape& s, int64_t window,
                           FlashPath path = FlashPath::automatic);
void dma_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* dbias, const bf16* dout, const bf16* out,
                            const float* lse, const bf16* q, const bf16* k, const bf16* v, const float* bias,
                            const float* thr, const AttnShape& s, int64_t window,
                            FlashPath path = FlashPath::automatic);

}  // namespace dmat::cuda

namespace dmat::cuda::testing {
// The byte budget of one batch of gathered lists (default 24 MiB; <= 0 restores it). Returns the
// previous budget. Tests shrink it to force many batches: results must not change by a bit.
int64_t set_dma_list_budget(int64_t bytes);
// The DMA ops' mode: 1 dense (no lists, no key groups), 0 gathered, −1 by the kept fraction
// (dma.cu); kernel_options().dma_dense. Returns the previous mode.
int set_dma_dense(int mode);
// The bounds threshold scan's segment length (128, 256 or 512; kernel_options().dma_thr_seg). Returns
// the previous one. Results must not change by a bit.
int set_dma_thr_seg(int seg);
}  // namespace dmat::cuda::testing
