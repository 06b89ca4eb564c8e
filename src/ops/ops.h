// Ops on tensor views, dispatched once per call on (device, dtype): CPU tensors go to the
// reference kernels in kernels/cpu (f32 or f64), CUDA tensors to kernels/cuda. Shapes are checked
// here, so kernels can trust them. Semantics (overwrite vs +=) follow kernels/cpu/cpu_ops.h.
#pragma once
#include <cstdint>
#include <vector>

#include "core/kernel_options.h"
#include "core/tensor.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/nsa_ops.h"

namespace dmat::ops {

// The kernel tuning switches (core/kernel_options.h, run.kernels) the CUDA backend uses from now
// on, set once at start-up before the first kernel; nothing in a build without CUDA.
void set_kernel_options(const KernelOptions& o);

using cpu::AttnShape;

// y[M,N] = x[M,K] · W[N,K]ᵀ  (overwrite)
void linear_forward(const Tensor& y, const Tensor& x, const Tensor& W);
// dx[M,K] = dy · W  (overwrite, or += when accumulate_dx);  dW[N,K] += dyᵀ · x
void linear_backward(const Tensor& dx, const Tensor& dW, const Tensor& dy, const Tensor& x, const Tensor& W,
                     bool accumulate_dx);

// tokens live on the tensors' device. CPU: range checked here; CUDA: the caller checks the range
// on the host before uploading (a device-side check would cost a synchronisation).
void embedding_forward(const Tensor& out, const Tensor& table, const int32_t* tokens);
void embedding_backward(const Tensor& dtable, const Tensor& dout, const int32_t* tokens);

// Rows are all leading dims; D is the last dim. w may be undefined (no gain).
void rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, double eps);
void rmsnorm_backward(const Tensor& dx, const Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate_dx);

// x, y: [B, T, H, Dh]
void rope_forward(const Tensor& y, const Tensor& x, double theta);
void rope_backward(const Tensor& dx, const Tensor& dy, double theta);
// One q/k/v GEMM's packed output qkv [B·T, (H + 2·Hkv)·Dh] into q = rope(q part) [B,T,H,Dh],
// k = rope(k part) and v [B,T,Hkv,Dh]; and back: dqkv (packed, overwrite) from dq, dk through the
// RoPE transpose and dv. Values as rope_forward / rope_backward on unpacked tensors.
void rope_unpack_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qkv, double theta);
void rope_pack_qkv_backward(const Tensor& dqkv, const Tensor& dq, const Tensor& dk, const Tensor& dv, double theta);

// Multi-head Latent Attention's operands (cpu_ops.h, rope_unpack_mla): q, k [B,T,H,Dqk], v [B,T,H,Dv]
// from qp (H·Dqk values per token; may be q itself), kv (H·(nope + Dv) per token) and the shared
// rotary key kr (R = Dqk − nope per token); and back (dqp may be dq itself). CUDA: bf16 throughout.
void rope_unpack_mla(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& qp, const Tensor& kv,
                     const Tensor& kr, int64_t nope, double theta);
void rope_pack_mla_backward(const Tensor& dqp, const Tensor& dkv, const Tensor& dkr, const Tensor& dq,
                            const Tensor& dk, const Tensor& dv, int64_t nope, double theta);

void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                       const AttnShape& s);
void attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                        const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                        const Tensor& v, const AttnShape& s);

void swiglu_forward(const Tensor& out, const Tensor& g, const Tensor& u);
void swiglu_backward(const Tensor& dg, const Tensor& du, const Tensor& dout, const Tensor& g, const Tensor& u);
// The same on the packed output of one gate/up GEMM: gu [rows, 2F] holds g in columns 0..F−1 and u
// in F..2F−1; out, dout [rows, F]; dgu [rows, 2F] (overwrite) in gu's layout; dgu may alias gu.
void swiglu_packed_forward(const Tensor& out, const Tensor& gu);
void swiglu_packed_backward(const Tensor& dgu, const Tensor& dout, const Tensor& gu);

// out = r ⊙ x + branch, then y = RMSNorm(out)·w with rstd: residual_forward followed by
// rmsnorm_forward, bit for bit (CUDA: one pass). y must not alias out, x or branch.
void residual_rmsnorm_forward(const Tensor& out, const Tensor& y, const Tensor& rstd, const Tensor& x,
                              const Tensor& r, const Tensor& branch, const Tensor& w, double eps);

// out = r ⊙ x + branch (r undefined: 1); dx = r ⊙ dout, dr += Σ_rows dout ⊙ x
void residual_forward(const Tensor& out, const Tensor& x, const Tensor& r, const Tensor& branch);
void residual_backward(const Tensor& dx, const Tensor& dr, const Tensor& dout, const Tensor& x, const Tensor& r);

// loss[rows] overwrite; dlogits (may be undefined, may alias logits) = grad_scale · (softmax − onehot)
void softmax_xent(const Tensor& loss, const Tensor& dlogits, const Tensor& logits, const int32_t* targets,
                  double grad_scale);

void fill(const Tensor& x, double value);
// dst = src converted (CUDA f32 -> bf16, the master-to-working-copy step; same dtype: a copy).
void convert(const Tensor& dst, const Tensor& src);
// Σ x in double: CPU in index order, CUDA a fixed-order tree (both deterministic).
double sum(const Tensor& x);
void copy(const Tensor& dst, const Tensor& src);
void add_inplace(const Tensor& y, const Tensor& x);
void scale_inplace(const Tensor& x, double s);
double sum_squares(const Tensor& x);

void adamw_step(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v, double lr, double beta1,
                double beta2, double eps, double weight_decay, double bc1, double bc2);
// CUDA, one launch for many tensors: the AdamW update of segments of the flat arenas, on the fp32
// master weights master, writing the bf16 working copy p; segment s covers arena elements
// [offset, offset + n) with weight decay weight_decay, and g is multiplied by grad_scale first
// (clipping). The moments m and v hold arena elements [moments_lo, moments_lo + m.numel()) only.
struct AdamSegment {
  int64_t offset, n;
  float weight_decay;
};
void adamw_step_segments(const Tensor& master, const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                         int64_t moments_lo, const std::vector<AdamSegment>& segs, double lr, double beta1,
                         double beta2, double eps, double bc1, double bc2, float grad_scale);

// Dynamic Mask Attention (definitions, layouts and the tie rule in kernels/cpu/cpu_ops.h). On CUDA
// (kernels/cuda/dma.h: bf16 v, w_dt, A, dv, q, k, out and their gradients; fp32 z, bias, thr, dbias,
// dw_dt, dA, lse). v [B,T,Hkv,Dh]; z, bias, thr, dbias [B,Hkv,T]; w_dt [Hkv, Hkv·Dh]; A [Hkv].
// The attention ops take w (`window`, the keys kept per query; s.window stays 0): the CUDA kernels
// size their gathered key lists by it.
using cpu::DmaBiasForm;
void dma_bias_forward(const Tensor& z, const Tensor& bias, const Tensor& v, const Tensor& w_dt, const Tensor& A,
                      DmaBiasForm form);
// dv, dw_dt, dA: +=
void dma_bias_backward(const Tensor& dv, const Tensor& dw_dt, const Tensor& dA, const Tensor& dbias, const Tensor& z,
                       const Tensor& bias, const Tensor& v, const Tensor& w_dt, const Tensor& A, DmaBiasForm form);
// local: the local window L (cpu_ops.h: the thresholds apply to the keys before it); 0: none.
void dma_thresholds(const Tensor& thr, const Tensor& bias, int64_t window, int64_t local = 0);
// window: the keys kept by the bias (w); s.window: the local window L of cpu_ops.h (0: none; CPU only).
void dma_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& bias, const Tensor& thr, const AttnShape& s, int64_t window);
// dq, dk, dv, dbias overwrite
void dma_attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dbias,
                            const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q,
                            const Tensor& k, const Tensor& v, const Tensor& bias, const Tensor& thr,
                            const AttnShape& s, int64_t window);

// Native Sparse Attention (definitions, layouts and the selection's tie rule in kernels/cpu/nsa_ops.h).
// Every branch's q, k, v, out [B,T,heads,D]; compressed kc, vc [B,Nc,Hkv,D]; lse [B,H,T]; idx I32
// [B,Hkv,T,n] (on the tensors' device). On CUDA (kernels/cuda/nsa.h): bf16 activations and weights,
// fp32 lse and parameter gradients; shapes outside kernels/cuda/nsa_limits.h are refused.
using cpu::NsaShape;
// y [B,Nc,Hkv,D], hid [B,Nc,Hkv,F] overwrite from x [B,T,Hkv,D], pos [l,D], w1 [F,l·D], w2 [D,F].
void nsa_compress_forward(const Tensor& y, const Tensor& hid, const Tensor& x, const Tensor& pos, const Tensor& w1,
                          const Tensor& w2, const NsaShape& s);
// dx overwrite; dpos, dw1, dw2 +=.
void nsa_compress_backward(const Tensor& dx, const Tensor& dpos, const Tensor& dw1, const Tensor& dw2,
                           const Tensor& dy, const Tensor& hid, const Tensor& x, const Tensor& pos, const Tensor& w1,
                           const Tensor& w2, const NsaShape& s);
// RoPE of the compressed keys at each block's last position (y may alias x), and its transpose.
void nsa_compressed_rope_forward(const Tensor& y, const Tensor& x, double theta, const NsaShape& s);
void nsa_compressed_rope_backward(const Tensor& dx, const Tensor& dy, double theta, const NsaShape& s);
void nsa_cmp_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                               const Tensor& vc, const NsaShape& s);
// dq, dkc, dvc overwrite
void nsa_cmp_attention_backward(const Tensor& dq, const Tensor& dkc, const Tensor& dvc, const Tensor& dout,
                                const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                                const Tensor& vc, const NsaShape& s);
// idx overwrite, from the compressed branch's q, kc (rotated) and lse.
void nsa_select(const Tensor& idx, const Tensor& q, const Tensor& kc, const Tensor& lse_cmp, const NsaShape& s);
void nsa_slc_attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& idx, const NsaShape& s);
// dq, dk, dv overwrite
void nsa_slc_attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dout,
                                const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                                const Tensor& v, const Tensor& idx, const NsaShape& s);
// z [rows, 3H] gate logits; o_* and out [rows, H, D] (any shape of rows·H·D values, H given).
void nsa_gate_forward(const Tensor& out, const Tensor& z, const Tensor& o_cmp, const Tensor& o_slc,
                      const Tensor& o_win, int64_t H);
// dz, do_cmp, do_slc, do_win overwrite
void nsa_gate_backward(const Tensor& dz, const Tensor& do_cmp, const Tensor& do_slc, const Tensor& do_win,
                       const Tensor& dout, const Tensor& z, const Tensor& o_cmp, const Tensor& o_slc,
                       const Tensor& o_win, int64_t H);
// ---- incremental decoding (one sequence against its cache; CPU only: cpu_ops.h) ------------------
// In place: the R rotary dims at offset `off` of each of H heads (head stride hs) of n rows (row
// stride ld) of x, rotated for positions pos0 … pos0+n−1 (rope_rows).
void rope_rows_inplace(const Tensor& x, int64_t n, int64_t H, int64_t R, int64_t pos0, double theta, int64_t ld,
                       int64_t hs, int64_t off);
// attention_decode's shapes: n queries from position pos0, key / value rows ldk / ldv elements apart
// in the cache; window: SWA's w, or with a bias DMA's local window L (0: none).
struct DecodeShape {
  int64_t n = 0, pos0 = 0, H = 0, Hkv = 0, Dqk = 0, Dv = 0, ldk = 0, ldv = 0;
  double scale = 0;
  int64_t window = 0;
};
// out [n, H, Dv], q [n, H, Dqk]; kc, vc the caches; DMA: bias [Hkv, ldb] and thr [n, Hkv] (else undefined).
void attention_decode(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const DecodeShape& s,
                      const Tensor& bias = {}, int64_t ldb = 0, const Tensor& thr = {});
// NSA's decoding against the layer's cache (nsa_ops.h, "incremental decoding"): s has B = 1 and T =
// the cache's capacity; n queries from position pos0. y [m, Hkv, D]: blocks c0 … c0 + m − 1 compressed
// from x [T, Hkv, D] (rotated when rotate). out [n, H, D], lse [H, n], idx I32 [Hkv, n, sel_count];
// kc, vc [s.n_cmp(), Hkv, D]; k, v [T, Hkv, D].
void nsa_compress_blocks(const Tensor& y, const Tensor& x, const Tensor& pos, const Tensor& w1, const Tensor& w2,
                         int64_t c0, int64_t m, bool rotate, double theta, const NsaShape& s);
void nsa_cmp_attention_decode(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kc,
                              const Tensor& vc, int64_t pos0, const NsaShape& s);
void nsa_select_decode(const Tensor& idx, const Tensor& q, const Tensor& kc, const Tensor& lse_cmp, int64_t pos0,
                       const NsaShape& s);
void nsa_slc_attention_decode(const Tensor& out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                              int64_t pos0, const NsaShape& s);
// MLA's absorbed decoding (cpu_ops.h): qa [n, H, C + R] from q [n, H, nope + R]; o [n, H, Dv] from ctx [n, H, C].
void mla_absorb_query(const Tensor& qa, const Tensor& q, const Tensor& w_kvb, int64_t nope, int64_t R, int64_t C,
                      int64_t Dv);
void mla_expand_output(const Tensor& o, const Tensor& ctx, const Tensor& w_kvb, int64_t nope, int64_t C, int64_t Dv);

}  // namespace dmat::ops
