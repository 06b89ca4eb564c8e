// CUDA kernels of the dense model, one per CPU reference op in kernels/cpu/cpu_ops.h, with the
// same semantics (overwrite vs +=, aliasing) unless a comment says otherwise. All run on
// dmat::cuda::stream() and are asynchronous; pointers are device pointers.
//
// Precision (README "The CUDA backend"): activations and weights bf16; parameter gradients fp32 (they accumulate
// across micro-steps); softmax / norm statistics fp32; accumulation in fp32 inside every kernel.
// Reductions that produce parameter gradients or reported numbers are deterministic: the same
// inputs give the same bits on every run (fixed-order partial sums, no float atomics).
#pragma once
#include <cstdint>

#include "core/bf16.h"

namespace dmat::cuda {

// ---- memory ---------------------------------------------------------------------------------
void* device_alloc(size_t bytes);  // throws dmat::Error naming the size and free memory on OOM
void device_free(void* p);
void memcpy_h2d(void* dst, const void* src, size_t bytes);  // synchronous w.r.t. the host
void memcpy_d2h(void* dst, const void* src, size_t bytes);  // waits for the compute stream
void memcpy_d2d(void* dst, const void* src, size_t bytes);  // async on the stream
void memset_zero(void* p, size_t bytes);                     // async on the stream

// ---- GEMM (cuBLASLt) ------------------------------------------------------------------------
// C[M,N] = alpha · op(A)·op(B) + beta · C, row-major like cpu::gemm: op(A) is [M,K] (A stored
// [K,M] when trans_a), op(B) is [K,N] (B stored [N,K] when trans_b). A, B bf16; fp32 accumulate;
// C is bf16 (c_f32 = false) or fp32 (c_f32 = true, e.g. weight gradients with beta = 1).
// beta == 0 ignores C's old contents.
void gemm(void* C, bool c_f32, const bf16* A, const bf16* B, int64_t M, int64_t N, int64_t K, bool trans_a,
          bool trans_b, float alpha, float beta);

// ---- elementwise / conversion / reductions ---------------------------------------------------
void fill_f32(float* x, int64_t n, float v);
void fill_bf16(bf16* x, int64_t n, float v);
void f32_to_bf16(bf16* dst, const float* src, int64_t n);
void bf16_to_f32(float* dst, const bf16* src, int64_t n);
void add_inplace_f32(float* y, const float* x, int64_t n);    // y += x
void add_inplace_bf16(bf16* y, const bf16* x, int64_t n);     // y += x (fp32 math, one rounding)
void scale_inplace_f32(float* x, int64_t n, float s);
void scale_inplace_bf16(bf16* x, int64_t n, float s);         // x *= s (fp32 math, one rounding)
// *out = Σ x² (double accumulation, fixed-order tree: deterministic). out is a device pointer.
void sum_squares_f32(double* out, const float* x, int64_t n);
// *out = Σ_i x[i] (double, deterministic). For the loss of a micro-batch.
void sum_f32(double* out, const float* x, int64_t n);

// ---- embedding --------------------------------------------------------------------------------
// out[i,:] = table[tokens[i],:]. tokens are device int32 in [0, V) (checked on the host).
void embedding_forward(bf16* out, const bf16* table, const int32_t* tokens, int64_t n, int64_t D);
// dtable[v,:] += Σ_{i: tokens[i]=v} dout[i,:], each row summed in increasing i (deterministic).
void embedding_backward(float* dtable, const bf16* dout, const int32_t* tokens, int64_t n, int64_t D, int64_t V);

// ---- RMSNorm over the last dim (D from 16 to 16384; also used per head for QK-norm) -----------
// rstd[r] = 1/sqrt(mean x² + eps); y = x · rstd · w (w may be null: 1). y may alias x.
void rmsnorm_forward(bf16* y, float* rstd, const bf16* x, const bf16* w, int64_t rows, int64_t D, float eps);
// dx overwrite (or += when accumulate_dx); dw += Σ_rows (deterministic; skipped when null).
void rmsnorm_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const float* rstd,
                      int64_t rows, int64_t D, bool accumulate_dx);

// Fused residual + RMSNorm (one pass over the row instead of two): out = r ⊙ x + branch (bf16,
// r may be null: 1; out may alias x or branch), then y = rmsnorm(out) · w and rstd exactly as
// rmsnorm_forward on the stored (bf16-rounded) out: the same bits as residual_forward followed by
// rmsnorm_forward. y must not alias out, x or branch.
void residual_rmsnorm_forward(bf16* out, bf16* y, float* rstd, const bf16* x, const bf16* r, const bf16* branch,
                              const bf16* w, int64_t rows, int64_t D, float eps);

// ---- RoPE, rotate-half, x [B,T,H,Dh]; angles as the CPU reference (double, rounded once) ------
void rope_forward(bf16* y, const bf16* x, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta);
void rope_backward(bf16* dx, const bf16* dy, int64_t B, int64_t T, int64_t H, int64_t Dh, double theta);
// Rows (b, c, h) of [B, C, H, Dh] rotated at position c·stride + offset instead of c (NSA's
// compressed keys: stride d, offset l − 1; cpu::nsa_compressed_rope_*), same table and arithmetic.
// y may alias x (dx, dy likewise).
void rope_strided_forward(bf16* y, const bf16* x, int64_t B, int64_t C, int64_t H, int64_t Dh, double theta,
                          int64_t stride, int64_t offset);
void rope_strided_backward(bf16* dx, const bf16* dy, int64_t B, int64_t C, int64_t H, int64_t Dh, double theta,
                           int64_t stride, int64_t offset);
// Packed q/k/v as cpu::rope_unpack_qkv / rope_pack_qkv_backward (the same bits as rope_forward /
// rope_backward on the unpacked tensors).
void rope_unpack_qkv(bf16* q, bf16* k, bf16* v, const bf16* qkv, int64_t B, int64_t T, int64_t H, int64_t Hkv,
                     int64_t Dh, double theta);
void rope_pack_qkv_backward(bf16* dqkv, const bf16* dq, const bf16* dk, const bf16* dv, int64_t B, int64_t T,
                            int64_t H, int64_t Hkv, int64_t Dh, double theta);
// Multi-head Latent Attention's operands as cpu::rope_unpack_mla / rope_pack_mla_backward (layouts
// there; R rotary dims per head, table of rope_forward with Dh = R). q may alias qp, dqp may alias
// dq. The rotary key's gradient sums the heads in fp32, in increasing h, then rotates once.
void rope_unpack_mla(bf16* q, bf16* k, bf16* v, const bf16* qp, const bf16* kv, const bf16* kr, int64_t B, int64_t T,
                     int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta);
void rope_pack_mla_backward(bf16* dqp, bf16* dkv, bf16* dkr, const bf16* dq, const bf16* dk, const bf16* dv,
                            int64_t B, int64_t T, int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta);

// ---- SwiGLU: out = silu(g)·u -------------------------------------------------------------------
void swiglu_forward(bf16* out, const bf16* g, const bf16* u, int64_t n);
void swiglu_backward(bf16* dg, bf16* du, const bf16* dout, const bf16* g, const bf16* u, int64_t n);
// Row-strided as cpu::swiglu_forward/backward(rows, F, ld): out/dout [rows, F]; g, u, dg, du rows ld apart.
void swiglu_forward(bf16* out, const bf16* g, const bf16* u, int64_t rows, int64_t F, int64_t ld);
void swiglu_backward(bf16* dg, bf16* du, const bf16* dout, const bf16* g, const bf16* u, int64_t rows, int64_t F,
                     int64_t ld);

// ---- residual with optional per-channel scale: out = r ⊙ x + branch ---------------------------
void residual_forward(bf16* out, const bf16* x, const bf16* r, const bf16* branch, int64_t rows, int64_t D);
// dx = r ⊙ dout (overwrite, may alias dout); dr += Σ_rows dout ⊙ x (deterministic; null: skipped).
void residual_backward(bf16* dx, float* dr, const bf16* dout, const bf16* x, const bf16* r, int64_t rows,
                       int64_t D);

// ---- softmax cross-entropy over bf16 logits (fp32 math) ----------------------------------------
// loss[r] (fp32, overwrite) = logsumexp(logits[r]) − logits[r, t]; rows with t < 0: loss 0 and
// zero gradient. dlogits (bf16, may alias logits, may be null) = grad_scale·(softmax − onehot).
// Targets >= V are checked on the host before the call.
void softmax_xent(float* loss, bf16* dlogits, const bf16* logits, const int32_t* targets, int64_t rows,
                  int64_t V, float grad_scale);

// ---- AdamW on fp32 master weights, writing the bf16 working copy ------------------------------
// One launch for many tensors: segment s covers elements [offset, offset+n) of the flat arenas and
// uses weight decay wd. g is multiplied by grad_scale first (clipping). PyTorch's order, as
// cpu::adamw_step. segs is a host array; it is uploaded once and cached by (pointer, count).
struct AdamSegment {
  int64_t offset, n;
  float weight_decay;
};
void adamw_step(float* master, bf16* p, const float* g, float* m, float* v, const AdamSegment* segs, int nsegs,
                float lr, float beta1, float beta2, float eps, float bc1, float bc2, float grad_scale);

}  // namespace dmat::cuda
