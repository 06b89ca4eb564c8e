// Native Sparse Attention (NSA; Yuan et al., arXiv 2502.11089), CPU reference: the ops of the
// layer, forward and backward, fp32 and fp64, deterministic across thread counts (as cpu_ops.h).
// The exact definitions (MLP form, RoPE, early queries, the eq. 9 mapping, the tie rule) are written
// at the top of nsa_attention.cpp and in the README ("NSA"); the contracts are here.
//
// The layer, per query t and query head h (KV head hk = h / (H / Hkv)), three branches with their
// own keys and values over the same RoPE'd queries q, combined by sigmoid gates:
//   compressed: k_cmp, v_cmp [B,T,Hkv,D] --nsa_compress--> kc, vc [B,Nc,Hkv,D]; kc is then rotated
//               (nsa_compressed_rope) and attended by nsa_cmp_attention_*.
//   selected:   nsa_select picks, per (b, hk, t), sel_count blocks of sel_block keys from the
//               compressed branch's probabilities; nsa_slc_attention_* attends the RoPE'd k_slc,
//               v_slc of those blocks.
//   window:     attention_forward/backward (cpu_ops.h) on the RoPE'd k_win, v_win with
//               nsa_window_shape(s) (keys t−w+1 … t).
//   o = σ(z_cmp)·o_cmp + σ(z_slc)·o_slc + σ(z_win)·o_win   (nsa_gate_*), z = x·W_gᵀ [B·T, 3H].
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/cpu/cpu_ops.h"

namespace dmat::cpu {

// The layer's sizes and layouts: NsaShape (kernels/attention_types.h, shared with the CUDA backend).
using ::dmat::NsaShape;

// Throws dmat::Error unless: sizes > 0, Hkv divides H, d > 0, d divides l and l', n >= 3 (room
// for the forced blocks), w > 0.
void nsa_check_shape(const NsaShape& s);

// The window branch's shape for attention_forward/backward.
AttnShape nsa_window_shape(const NsaShape& s);

// ---- compression --------------------------------------------------------------------------------
// Per KV head and block c (rows r = (b·Nc + c)·Hkv + hk of the [R = B·Nc·Hkv, ·] matrices), with
// the weights shared by all KV heads (one set for keys, another for values):
//   u_r  = flatten_j(x[b, c·d + j, hk, :] + pos[j, :]),  j = 0 … l−1      [l·D], index j·D + e
//   hid_r = W1 · u_r                                                      [F]  (W1 [F, l·D])
//   y_r  = W2 · silu(hid_r)                                               [D]  (W2 [D, F])
// y [B,Nc,Hkv,D] and hid [B,Nc,Hkv,F] (saved for backward) overwrite; nothing when Nc = 0.
template <class T>
void nsa_compress_forward(T* y, T* hid, const T* x, const T* pos, const T* w1, const T* w2, int64_t F,
                          const NsaShape& s);
// dx overwrite [B,T,Hkv,D] (a position sums over the blocks that cover it, c ascending; positions in
// no complete block get 0); dpos [l,D], dw1, dw2 +=.
template <class T>
void nsa_compress_backward(T* dx, T* dpos, T* dw1, T* dw2, const T* dy, const T* hid, const T* x, const T* pos,
                           const T* w1, const T* w2, int64_t F, const NsaShape& s);

// RoPE (rope_forward's rotate-half convention and frequencies) of the compressed keys [B,Nc,Hkv,D]
// at the position of each block's last key, c·d + l − 1: the first query that sees block c sees it
// at relative distance 0. y may alias x. backward: the transposed rotation (dx may alias dy).
template <class T>
void nsa_compressed_rope_forward(T* y, const T* x, double theta, const NsaShape& s);
template <class T>
void nsa_compressed_rope_backward(T* dx, const T* dy, double theta, const NsaShape& s);

// ---- compressed attention -----------------------------------------------------------------------
// out [B,T,H,D], lse [B,H,T] overwrite: softmax attention of q over the compressed blocks visible to
// t (s.cmp_visible(t) of them). A query with no visible block (t < l − 1) gets out = 0 and
// lse = −inf (the log of an empty sum); its gradients are 0 and it adds nothing to dkc, dvc.
template <class T>
void nsa_cmp_attention_forward(T* out, T* lse, const T* q, const T* kc, const T* vc, const NsaShape& s);
// dq [B,T,H,D], dkc, dvc [B,Nc,Hkv,D] overwrite. dkc/dvc of a block sum over the KV head's query
// heads (ascending), then queries (ascending).
template <class T>
void nsa_cmp_attention_backward(T* dq, T* dkc, T* dvc, const T* dout, const T* out, const T* lse, const T* q,
                                const T* kc, const T* vc, const NsaShape& s);

// ---- selection (not differentiated) -------------------------------------------------------------
// idx [B,Hkv,T,n] overwrite. For query t, with J = t / l' its own selection block:
//   p_h(t, c)  = exp(scale·q_h(t)·kc(c) − lse_h(t))   (the compressed branch's probabilities, c < cmp_visible(t))
//   imp(t, j)  = Σ_{h in the group of hk} Σ_c ov(j, c) · p_h(t, c),  j = 0 … J
//   ov(j, c)   = |[c, c + l/d) ∩ [j·l'/d, (j+1)·l'/d)|: the d-strides block c shares with block j
//                (eq. 9 of the paper read as an overlap: Σ_{m<l'/d} Σ_{n<l/d} p[(l'/d)·j + m − n])
//   selected   = {0, J−1, J} ∩ [0, J] (forced), then the other candidates 1 … J−2 by imp descending,
//                ties to the lower block index, until min(J + 1, n) blocks are chosen.
// A list holds its blocks in ascending order, then −1 up to n. imp is summed exactly, in fixed
// point: each p_h(t, c) (computed in type T) becomes nsa_importance_fixed(p), an int64, so that
// importances equal in exact arithmetic compare equal whatever the order of summation (a CUDA
// reduction may use any order and still break ties as this reference does). A NaN probability
// throws dmat::Error.
// q [B,T,H,D], kc [B,Nc,Hkv,D] (as attended, i.e. rotated), lse_cmp from nsa_cmp_attention_forward.
template <class T>
void nsa_select(int32_t* idx, const T* q, const T* kc, const T* lse_cmp, const NsaShape& s);
// round(p · 2^40). With p <= 1 and Σ_c p(t, c) = 1 per head, one head adds at most
// min(l/d, l'/d) · 2^40 to a block (plus rounding), far from 2^63 for any real group size.
inline int64_t nsa_importance_fixed(double p) { return std::llround(p * 0x1p40); }

// ---- selected attention -------------------------------------------------------------------------
// Query t (head h, KV head hk) attends the keys p <= t of the blocks in idx[b,hk,t,:] (ascending,
// distinct, −1 entries ignored). Its own block is always in the list (nsa_select), so no row is
// empty. out [B,T,H,D], lse [B,H,T] overwrite; k, v [B,T,Hkv,D].
template <class T>
void nsa_slc_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int32_t* idx,
                               const NsaShape& s);
// dq, dk, dv overwrite; dk/dv of a key sum over the query heads of its KV head (ascending), then the
// queries that selected its block (ascending).
template <class T>
void nsa_slc_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q,
                                const T* k, const T* v, const int32_t* idx, const NsaShape& s);

// ---- gates and combination ------------------------------------------------------------------------
// z [rows, 3H] gate logits (z[r, 3h + c]; c = 0 compressed, 1 selected, 2 window), o_* and out
// [rows, H, D]: out = σ(z_0)·o_cmp + σ(z_1)·o_slc + σ(z_2)·o_win (summed in that order), overwrite.
template <class T>
void nsa_gate_forward(T* out, const T* z, const T* o_cmp, const T* o_slc, const T* o_win, int64_t rows, int64_t H,
                      int64_t D);
// dz [rows, 3H], do_cmp, do_slc, do_win overwrite: do_c = σ(z_c)·dout, dz_c = σ'(z_c)·(dout·o_c).
template <class T>
void nsa_gate_backward(T* dz, T* do_cmp, T* do_slc, T* do_win, const T* dout, const T* z, const T* o_cmp,
                       const T* o_slc, const T* o_win, int64_t rows, int64_t H, int64_t D);

// ---- incremental decoding (one sequence against its cache; the layer's decode, attention_nsa.cpp) --
// The cache of one sequence, in the shape s with B = 1 and T = the cache's capacity in positions:
// raw k_cmp / v_cmp, the selected branch's k (rotated) and v, [T, Hkv, D] (position p at row p);
// the compressed kc (rotated) and vc [s.n_cmp(), Hkv, D] (block c at row c). n queries at positions
// pos0 … pos0 + n − 1, q [n, H, D] (rotated); the cache holds every position up to pos0 + n − 1 and
// every block complete by then (c < s.cmp_visible(pos0 + n − 1)). Each function computes, for those
// queries, the rows its training op computes at those positions of the whole sequence, with the same
// loop in the same order (attend.h; the selection's shared per-query routine), so a decoded row
// equals the training row bit for bit.
//
// y [m, Hkv, D] (overwrite): blocks c0 … c0 + m − 1 compressed from x (raw k_cmp or v_cmp of
// positions 0 … (c0 + m − 1)·d + l − 1, [≥ that, Hkv, D]) as nsa_compress_forward computes them, then
// with rotate, rotated at each block's last position as nsa_compressed_rope_forward (the keys).
template <class T>
void nsa_compress_blocks(T* y, const T* x, const T* pos, const T* w1, const T* w2, int64_t F, int64_t c0, int64_t m,
                         bool rotate, double theta, const NsaShape& s);
// out [n, H, D], lse [H, n] overwrite: nsa_cmp_attention_forward's rows (query t sees blocks
// c < cmp_visible(t); none: out 0, lse −inf).
template <class T>
void nsa_cmp_attention_decode(T* out, T* lse, const T* q, const T* kc, const T* vc, int64_t n, int64_t pos0,
                              const NsaShape& s);
// idx [Hkv, n, sel_count] overwrite: nsa_select's lists for those queries, from lse_cmp [H, n] of
// nsa_cmp_attention_decode (the same probabilities, fixed-point sums and tie rule).
template <class T>
void nsa_select_decode(int32_t* idx, const T* q, const T* kc, const T* lse_cmp, int64_t n, int64_t pos0,
                       const NsaShape& s);
// out [n, H, D] overwrite: nsa_slc_attention_forward's rows over the cached k, v and idx [Hkv, n, sel_count].
template <class T>
void nsa_slc_attention_decode(T* out, const T* q, const T* k, const T* v, const int32_t* idx, int64_t n, int64_t pos0,
                              const NsaShape& s);

// ---- cost ---------------------------------------------------------------------------------------
// Forward FLOPs per token of the layer's attention work (2 per multiply-add), averaged over the
// positions 0 … T−1: the three cores, 4·H·D·(n̄_cmp + n̄_slc + n̄_win) with n̄ the mean number of keys
// a query attends in each branch, plus the compression MLPs (nsa_compress_flops_per_token).
// Projections and gates are not counted here, nor the selection's scores (a kernel reuses the
// compressed branch's probabilities; this reference recomputes them).
double nsa_core_flops_per_token(const NsaShape& s, int64_t F);
// The compression MLPs' share of it (keys and values), run once per block per KV head:
// 2 · 2·Hkv·F·D·(l + 1) · Nc / T (fc1 l·D → F, fc2 F → D).
double nsa_compress_flops_per_token(const NsaShape& s, int64_t F);

}  // namespace dmat::cpu
