// Native Sparse Attention on the GPU (README "NSA"; Yuan et al., arXiv 2502.11089): the CUDA ops of
// the layer, one per CPU reference op of kernels/cpu/nsa_ops.h, with its semantics, layouts and tie
// rule (NsaShape: kernels/attention_types.h). bf16 activations and weights (x, q, k, v, kc, vc, hid,
// outputs, activation gradients), fp32 lse, delta and parameter gradients (+=), int32 selection lists.
// All run on dmat::cuda::stream(), asynchronously unless said; pointers are device pointers. No
// floating-point atomics: every reduction runs in a fixed order, so the same inputs give the same
// bits. The window branch is the flash kernels' sliding window (flash_attention.h) and has no op here.
// Shapes the kernels do not support are refused by nsa_limits.h's rules (head dim, group, n, l/d).
//
// Workspace (cuda::workspace*(); none holds a T × T or T × T/l' structure):
//   compression forward   U [R, l·D] and silu(hid) [R, F] bf16, R = B·Nc·Hkv (about 2·(l/d)× k)
//   compression backward  U [R, l·D] bf16, dU [R, l·D] fp32, silu(hid), dhid [R, F] bf16, d silu [R, F]
//                         fp32, and the dpos column partials (≤ 32 MiB)
//   compressed backward   delta [B, H, T] fp32
//   selection             the importances of one batch of queries, int64 [B·Hkv·TB, T/l'] with TB
//                         queries per batch chosen so that it holds at most 64 MiB (at least one
//                         tile of queries); the selection runs in ceil(T / TB) batches
//   selected forward      per (b, KV head, query tile) the key tiles it visits: counts and offsets
//                         (int64, B·Hkv·ceil(T/bq) + 1) and lists of at most min(T/64, bq·n·(l'/64 + 2))
//                         int32 per tile (bq = 64 / group queries per tile): O(T·n) per (b, KV head)
//   selected backward     the same lists (exact size P: one device-to-host copy of P per call, to
//                         size the sort), their transpose (query tiles per key tile: a stable radix
//                         sort of P (key tile, query tile) pairs, 24 bytes each, and B·Hkv·T/64
//                         offsets), and delta [B, H, T] fp32
#pragma once
#include <cstdint>

#include "core/bf16.h"
#include "kernels/attention_types.h"

namespace dmat::cuda {

using NsaShape = ::dmat::NsaShape;

// ---- compression (cpu::nsa_compress_*) ----------------------------------------------------------------
// The gather of every block's l keys (plus the position embedding, one bf16 rounding) into
// U [R, l·D], then hid = U·W1ᵀ (cuBLASLt, bf16 out), y = silu(hid)·W2ᵀ with silu(hid) rounded to bf16
// (the backward recomputes it from the saved bf16 hid). y [B,Nc,Hkv,D], hid [B,Nc,Hkv,F] overwrite.
void nsa_compress_forward(bf16* y, bf16* hid, const bf16* x, const bf16* pos, const bf16* w1, const bf16* w2,
                          int64_t F, const NsaShape& s);
// dx [B,T,Hkv,D] overwrite (each position sums its blocks' rows of dU in fp32, c ascending, one
// rounding; 0 in no block); dpos [l,D], dw1 [F,l·D], dw2 [D,F] fp32 +=. The GEMMs: dW2 += dyᵀ·silu,
// d silu = dy·W2 (fp32), dhid = d silu·silu'(hid) (bf16), dW1 += dhidᵀ·U, dU = dhid·W1 (fp32);
// dpos: dU's column sums over the R rows in a fixed order (partials, then detail::column_sum_accumulate).
void nsa_compress_backward(bf16* dx, float* dpos, float* dw1, float* dw2, const bf16* dy, const bf16* hid,
                           const bf16* x, const bf16* pos, const bf16* w1, const bf16* w2, int64_t F,
                           const NsaShape& s);

// RoPE of the compressed keys [B,Nc,Hkv,D] at each block's last position c·d + l − 1 (rope_strided_*,
// cuda_ops.h; y may alias x), and its transpose.
void nsa_compressed_rope_forward(bf16* y, const bf16* x, double theta, const NsaShape& s);
void nsa_compressed_rope_backward(bf16* dx, const bf16* dy, double theta, const NsaShape& s);

// ---- compressed attention (cpu::nsa_cmp_attention_*) ---------------------------------------------------
// kc, vc [B,Nc,Hkv,D]; the flash loop with CompressedMask (nsa_flash.cuh). A query that sees no
// block (t < l − 1) gets out = 0 exactly and lse = −inf; its gradients are 0 and it adds nothing to
// dkc, dvc. dq, dkc, dvc overwrite.
void nsa_cmp_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* kc, const bf16* vc,
                               const NsaShape& s);
void nsa_cmp_attention_backward(bf16* dq, bf16* dkc, bf16* dvc, const bf16* dout, const bf16* out, const float* lse,
                                const bf16* q, const bf16* kc, const bf16* vc, const NsaShape& s);

// ---- selection (cpu::nsa_select; not differentiated) ---------------------------------------------------
// idx [B,Hkv,T,n] overwrite: the CPU reference's lists. Each probability p_h(t, c) =
// exp(scale·q_h(t)·kc(c) − lse_h(t)) is computed in fp64 from the bf16 q, kc and the fp32 lse (the
// products of bf16 values are exact, so the dot product is the CPU fp64 reference's up to the order
// of its fp64 sum), rounded to nsa_importance_fixed's 2⁻⁴⁰ grid and summed in int64 with integer
// atomics (exact: any order gives the same sums). So importances equal in exact arithmetic are equal
// here, ties go to the lower block index as on the CPU, and the lists equal cpu::nsa_select<double>
// on the same values unless two importances differ by a few units of 2⁻⁴⁰ (an fp64 rounding of
// p(t, c) landing on the other side of a grid midpoint). A NaN probability adds nothing (the CPU
// reference throws; on the GPU the step's non-finite loss reports the divergence).
// Cost: O(T·Nc·group·D) fp64 multiply-adds per (b, KV head), SIMT — the slowest part of the layer
// at long T (fp64 for the exactness argument above; a tensor-core version would need a looser one).
void nsa_select(int32_t* idx, const bf16* q, const bf16* kc, const float* lse_cmp, const NsaShape& s);

// ---- selected attention (cpu::nsa_slc_attention_*) -----------------------------------------------------
// k, v [B,T,Hkv,D]; idx from nsa_select (every list holds the query's own block; not checked here).
// One block per (query tile of 64 / group queries × the group's heads, KV head, batch) loads the key
// tiles of the union of its queries' selected blocks once for all heads of the group, each query
// keeping the keys <= t of its own blocks (SelectedMask). Backward: dQ per query tile, dK/dV per key
// tile over the query tiles whose lists reach it (the transposed lists), each in ascending order; no
// atomics. dq, dk, dv overwrite.
void nsa_slc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* idx,
                               const NsaShape& s);
void nsa_slc_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                                const bf16* q, const bf16* k, const bf16* v, const int32_t* idx, const NsaShape& s);

// ---- gates (cpu::nsa_gate_*) ----------------------------------------------------------------------------
// z [rows, 3H], o_*, out [rows, H, D]: out = σ(z0)·o_cmp + σ(z1)·o_slc + σ(z2)·o_win in fp32, one rounding.
void nsa_gate_forward(bf16* out, const bf16* z, const bf16* o_cmp, const bf16* o_slc, const bf16* o_win, int64_t rows,
                      int64_t H, int64_t D);
// dz [rows, 3H], do_* overwrite: do_c = σ(z_c)·dout, dz_c = σ'(z_c)·(dout·o_c) (fp32 dot, fixed order).
void nsa_gate_backward(bf16* dz, bf16* do_cmp, bf16* do_slc, bf16* do_win, const bf16* dout, const bf16* z,
                       const bf16* o_cmp, const bf16* o_slc, const bf16* o_win, int64_t rows, int64_t H, int64_t D);

}  // namespace dmat::cuda

namespace dmat::cuda::testing {
// The selection's importance budget per batch of queries (default 64 MiB; <= 0 restores it). Returns
// the previous one. Tests shrink it to force many batches: the lists must not change.
int64_t set_nsa_select_budget(int64_t bytes);
}  // namespace dmat::cuda::testing
