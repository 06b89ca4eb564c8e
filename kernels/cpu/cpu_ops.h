// CPU reference kernels: the oracle for every CUDA kernel and a real backend for tiny models.
// Plain functions on raw row-major pointers, templated on the float type (float for training,
// double for finite-difference gradient checks). All are multi-threaded with OpenMP and
// deterministic: every output element is reduced in a fixed order that does not depend on the
// number of threads, so two runs (and a resumed run) agree bit for bit.
//
// Conventions: "overwrite" outputs are written completely; "+=" outputs are accumulated into
// (gradients of parameters accumulate across micro-steps). Sizes are int64_t.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/attention_types.h"

namespace dmat::cpu {

using ::dmat::AttnShape;
using ::dmat::DmaBiasForm;

// ---- dense linear algebra -------------------------------------------------------------------
// C[M,N] = alpha * op(A) · op(B) + beta * C, row-major, contiguous.
// op(A) is [M,K]: A is stored [M,K], or [K,M] when trans_a. op(B) is [K,N]: B is stored [K,N], or
// [N,K] when trans_b. beta == 0 ignores C's old contents (NaNs there do not propagate).
template <class T>
void gemm(T* C, const T* A, const T* B, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
          T alpha, T beta);

// ---- elementwise / reductions ------------------------------------------------------------------
template <class T> void fill(T* x, int64_t n, T value);
template <class T> void copy(T* dst, const T* src, int64_t n);
template <class T> void add_inplace(T* y, const T* x, int64_t n);   // y += x
template <class T> void scale_inplace(T* x, int64_t n, T s);        // x *= s
// Σ x² accumulated in double, in fixed-size chunks combined in order (thread-count independent).
template <class T> double sum_squares(const T* x, int64_t n);

// ---- embedding ---------------------------------------------------------------------------------
// out[i, :] = table[tokens[i], :]   (overwrite), i < n, table is [V, D]. Tokens are not range
// checked here: callers (ops::embedding_*) check 0 <= token < V.
template <class T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t n, int64_t D);
// dtable[tokens[i], :] += dout[i, :]; rows summed in increasing i (deterministic).
template <class T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t D);

// ---- RMSNorm over the last dimension ----------------------------------------------------------
// rstd[r] = 1/sqrt(mean_d x[r,d]² + eps);  y[r,d] = x[r,d] * rstd[r] * w[d]  (w == nullptr: w = 1)
// y overwrite, rstd overwrite ([rows]). y may alias x.
template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t rows, int64_t D, double eps);
// dx: overwrite (accumulate_dx=false) or += (true). dw: += (skipped when w or dw is nullptr).
template <class T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t rows,
                      int64_t D, bool accumulate_dx);

// ---- rotary position embedding (rotate-half convention, as Hugging Face LLaMA / Doge) ----------
// x is [B, Tn, H, Dh]; position of row (b, t) is t. For i < Dh/2, f_i = theta^(-2i/Dh), a = t·f_i:
//   y[i] = x[i]·cos a − x[i+Dh/2]·sin a,   y[i+Dh/2] = x[i+Dh/2]·cos a + x[i]·sin a.
// Angles are computed in double. y may alias x. Dh must be even.
template <class T>
void rope_forward(T* y, const T* x, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta);
// The transpose of the rotation (rotation by −a): dx from dy. dx may alias dy.
template <class T>
void rope_backward(T* dx, const T* dy, int64_t B, int64_t Tn, int64_t H, int64_t Dh, double theta);
// The packed output of one q/k/v GEMM, qkv [B·Tn, (H + 2·Hkv)·Dh] (q heads, then k, then v), into
// q = rope(q part) [B,Tn,H,Dh], k = rope(k part) [B,Tn,Hkv,Dh] and v (a copy) [B,Tn,Hkv,Dh]: the same
// values as rope_forward on unpacked q and k. No output may overlap qkv.
template <class T>
void rope_unpack_qkv(T* q, T* k, T* v, const T* qkv, int64_t B, int64_t Tn, int64_t H, int64_t Hkv, int64_t Dh,
                     double theta);
// Its transpose: dqkv (overwrite, packed as above) from dq, dk (through rope_backward) and dv.
template <class T>
void rope_pack_qkv_backward(T* dqkv, const T* dq, const T* dk, const T* dv, int64_t B, int64_t Tn, int64_t H,
                            int64_t Hkv, int64_t Dh, double theta);

// Multi-head Latent Attention (DeepSeek-V2/V3): the core's operands from the projections' outputs
// (src/model/attention_mla.cpp). Per token n = (b, t): qp [B·Tn, H·Dqk], each head [nope | R] with
// Dqk = nope + R; kv [B·Tn, H·(nope + Dv)], each head [k_nope | v]; kr [B·Tn, R], the rotary key
// shared by all heads. RoPE as above over the R rotary dims (frequencies theta^(−2i/R)).
//   q[n,h] = [qp[n,h,:nope] | RoPE(qp[n,h,nope:])],  k[n,h] = [kv[n,h,:nope] | RoPE(kr[n])],
//   v[n,h] = kv[n,h,nope:];  q, k [B,Tn,H,Dqk], v [B,Tn,H,Dv] (overwrite).
// q may alias qp (element for element); no other output may overlap an input.
template <class T>
void rope_unpack_mla(T* q, T* k, T* v, const T* qp, const T* kv, const T* kr, int64_t B, int64_t Tn, int64_t H,
                     int64_t nope, int64_t R, int64_t Dv, double theta);
// RoPE of one sequence's rows at positions pos0 … pos0+n−1 (incremental decoding): the R dims of
// each of H heads per row rotated exactly as rope_forward rotates those positions. Row r of x starts
// at r·ldx and its head h at r·ldx + h·hsx (y likewise). y may alias x.
template <class T>
void rope_rows(T* y, const T* x, int64_t n, int64_t H, int64_t R, int64_t pos0, double theta, int64_t ldy,
               int64_t ldx, int64_t hsy, int64_t hsx);
// Its transpose (overwrite): dqp from dq (RoPEᵀ on the rotary dims), dkv from dk's nope dims and dv,
// dkr = RoPEᵀ(Σ_h dk[n,h,nope:]), the sum in increasing h. dqp may alias dq.
template <class T>
void rope_pack_mla_backward(T* dqp, T* dkv, T* dkr, const T* dq, const T* dk, const T* dv, int64_t B, int64_t Tn,
                            int64_t H, int64_t nope, int64_t R, int64_t Dv, double theta);

// ---- attention --------------------------------------------------------------------------------
// Causal softmax attention with grouped KV heads (query head h reads KV head h / (H / Hkv)).
// Key j is visible to query i iff j <= i and (window == 0 || j > i - window): window w keeps
// keys i-w+1 … i (sliding-window attention). Scores s_ij = scale · q_i·k_j. The shape: AttnShape
// (kernels/attention_types.h).
// q [B,T,H,Dqk], k [B,T,Hkv,Dqk], v [B,T,Hkv,Dv] -> out [B,T,H,Dv] (overwrite),
// lse [B,H,T] (overwrite): log Σ_j exp(s_ij), the softmax statistics backward needs.
template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const AttnShape& s);
// dq, dk, dv overwrite. dk/dv of a KV head sum over its query group, in a fixed order.
template <class T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q,
                        const T* k, const T* v, const AttnShape& s);

// ---- MLP ---------------------------------------------------------------------------------------
// out = silu(g) · u, silu(x) = x / (1 + exp(−x)). out overwrite, may alias g or u.
template <class T> void swiglu_forward(T* out, const T* g, const T* u, int64_t n);
// dg, du overwrite. Purely elementwise: any output may alias any input.
template <class T> void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n);
// The same on `rows` rows of F values: out and dout [rows, F] contiguous; row r of g, u, dg, du at
// r·ld (ld = 2F, u = g + F, du = dg + F: the packed [rows, 2F] gate/up layout). out must not alias
// g or u when ld != F; dg/du may alias g/u element for element.
template <class T> void swiglu_forward(T* out, const T* g, const T* u, int64_t rows, int64_t F, int64_t ld);
template <class T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t rows, int64_t F, int64_t ld);

// ---- residual with optional learned per-channel scale (Doge) -----------------------------------
// out[r,d] = (r_scale ? r_scale[d] : 1) · x[r,d] + branch[r,d]   (overwrite; may alias x or branch)
template <class T>
void residual_forward(T* out, const T* x, const T* r_scale, const T* branch, int64_t rows, int64_t D);
// dx = r_scale ⊙ dout (overwrite; may alias dout); dr_scale[d] += Σ_r dout[r,d]·x[r,d] (if non-null).
// (The branch's gradient is dout itself.)
template <class T>
void residual_backward(T* dx, T* dr_scale, const T* dout, const T* x, const T* r_scale, int64_t rows,
                       int64_t D);

// ---- softmax cross-entropy ---------------------------------------------------------------------
// For each row r with target t = targets[r] >= 0: loss[r] = logsumexp(logits[r,:]) − logits[r,t];
// rows with t < 0 are ignored (loss 0, gradient 0). If dlogits != nullptr it is overwritten with
// grad_scale · (softmax(logits[r,:]) − onehot(t)); dlogits may alias logits. Targets >= V are an
// error (throws dmat::Error naming the row and value).
template <class T>
void softmax_xent(T* loss, T* dlogits, const T* logits, const int32_t* targets, int64_t rows, int64_t V,
                  T grad_scale);

// ---- optimizer ---------------------------------------------------------------------------------
// AdamW as PyTorch's torch.optim.AdamW (decoupled weight decay):
//   p *= 1 − lr·wd;  m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
//   p −= lr · (m / bc1) / (sqrt(v / bc2) + eps),   bc1 = 1 − β1^t, bc2 = 1 − β2^t.
template <class T>
void adamw_step(T* p, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2, double eps,
                double weight_decay, double bc1, double bc2);

// ---- Dynamic Mask Attention (DMA; README "The model"; arXiv 2508.02124) -------------
// Per KV head h a bias per key from the values, a per-query threshold, and attention with that bias:
//   z[b,h,j]    = Σ_c v[b,j,c] · W_dt[h,c]        (c over Hkv·Dh: the heads of v concatenated;
//                                                 W_dt [Hkv, Hkv·Dh] as HF Doge's dt_proj.weight)
//   bias[b,h,j] = exp(A_h · softplus(z))  ("exp", the paper's)  or  A_h · softplus(z)  ("linear")
//   thr[b,h,i]  = the w-th largest of bias[b,h,0..i], or −inf while i + 1 < w
//   kept(i, j)  = j <= i  &&  bias[b,h,j] >= thr[b,h,i]
//   s_ij        = scale · q_i·k_j + bias[b,h,j] on kept keys, −inf elsewhere (h = the query head's KV head)
// Tie rule (the CUDA kernels must agree): keys whose bias equals the threshold are ALL kept, so a
// query keeps at least min(i+1, w) keys and more when biases tie at the threshold. With constant
// biases (A = 0 at initialisation in the "exp" form: every bias is 1) every causal key is kept.
// Since bias does not depend on the query, thr never decreases with i and the whole mask is the
// two O(T) vectors bias and thr. The selection is not differentiated.
// Local window (our extension, not the paper's; AttnShape::window = L > 0): query i also keeps its
// L most recent keys i−L+1 … i, and the threshold test applies to the keys before them:
//   thr[b,h,i]  = the w-th largest of bias[b,h,0..i−L], or −inf while i−L+1 < w
//   kept(i, j)  = j <= i  &&  (j > i − L  ||  bias[b,h,j] >= thr[b,h,i])
// (dma_thresholds with local = L: the thresholds of L = 0 shifted by L). A query keeps min(i+1, L+w)
// keys (ties aside); the mask is still two O(T) vectors and L.
// Layouts: v [B,T,Hkv,Dh]; z, bias, thr, dbias [B,Hkv,T]; W_dt [Hkv, Hkv·Dh]; A [Hkv].
// The bias form: DmaBiasForm (kernels/attention_types.h).

// z, bias overwrite.
template <class T>
void dma_bias_forward(T* z, T* bias, const T* v, const T* w_dt, const T* A, int64_t B, int64_t Tn, int64_t Hkv,
                      int64_t Dh, DmaBiasForm form);
// From dbias: dv += (the bias path's share), dw_dt += , dA += . z and bias as saved by the forward.
template <class T>
void dma_bias_backward(T* dv, T* dw_dt, T* dA, const T* dbias, const T* z, const T* bias, const T* v,
                       const T* w_dt, const T* A, int64_t B, int64_t Tn, int64_t Hkv, int64_t Dh, DmaBiasForm form);
// thr overwrite ([B·Hkv rows, Tn]); window w > 0; local L >= 0 (the local window above; 0: none).
// Exact (a size-w min-heap over the prefix).
template <class T>
void dma_thresholds(T* thr, const T* bias, int64_t rows, int64_t Tn, int64_t window, int64_t local = 0);
// As attention_forward, with the mask and bias above (s.window: the local window L, 0 for the paper's DMA).
template <class T>
void dma_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const T* bias, const T* thr,
                           const AttnShape& s);
// dq, dk, dv, dbias overwrite. dbias[b,h,j] = Σ over the query heads of KV head h (ascending), then
// queries i (ascending), of dS_ij: deterministic, no N×N buffer.
template <class T>
void dma_attention_backward(T* dq, T* dk, T* dv, T* dbias, const T* dout, const T* out, const T* lse, const T* q,
                            const T* k, const T* v, const T* bias, const T* thr, const AttnShape& s);

// ---- incremental decoding (one sequence against a cache of its earlier positions) --------------
// n queries at positions pos0 … pos0+n−1, q [n, H, Dqk]; the cache holds the keys and values of
// positions 0 … pos0+n−1 at least: key j of KV head hk at kc[j·ldk + hk·Dqk], its value at
// vc[j·ldv + hk·Dv] (query head h reads KV head h / (H / Hkv)). out [n, H, Dv] (overwrite).
// Keys visible to query i: without a bias, attention_forward's (window w > 0: keys i−w+1 … i);
// with DMA's bias (bias[hk·ldb + j]) and thresholds (thr[r·Hkv + hk] for query r), DMA's kept rule
// with local window L = window: j <= i && (j > i − L || bias_j >= thr), the bias added to the
// scores. Each output is the same sum in the same order as attention_forward /
// dma_attention_forward computes for that query row.
template <class T>
void attention_decode(T* out, const T* q, const T* kc, const T* vc, int64_t n, int64_t pos0, int64_t H, int64_t Hkv,
                      int64_t Dqk, int64_t Dv, int64_t ldk, int64_t ldv, double scale, int64_t window,
                      const T* bias = nullptr, int64_t ldb = 0, const T* thr = nullptr);

// MLA decoding with the up-projection absorbed (DeepSeek-V2): with W_kvb [H·(nope + Dv), C] holding
// per head h W_k,h [nope, C] then W_v,h [Dv, C], a query head's score against key j is
// q_nope·(W_k,h·c_j) + q_rope·kr_j = [W_k,hᵀ·q_nope | q_rope]·[c_j | kr_j], and its output is
// W_v,h·Σ_j p_j·c_j. mla_absorb_query: qa [n, H, C + R] (overwrite) from q [n, H, nope + R] (rotary
// dims already rotated). mla_expand_output: o [n, H, Dv] (overwrite) = W_v,h · ctx [n, H, C].
template <class T>
void mla_absorb_query(T* qa, const T* q, const T* w_kvb, int64_t n, int64_t H, int64_t nope, int64_t R, int64_t C,
                      int64_t Dv);
template <class T>
void mla_expand_output(T* o, const T* ctx, const T* w_kvb, int64_t n, int64_t H, int64_t nope, int64_t C, int64_t Dv);

// DMA's thresholds one query at a time (decoding): push the biases of the keys a query tests, in
// key order (0, 1, …; with a local window L, key i − L before query i); threshold() is then the w-th
// largest pushed value, equal values counted separately, −inf while fewer than w were pushed:
// exactly dma_thresholds' thr for that query. Values are held in double (exact for f32 and f64),
// O(log w) per key. A NaN bias is an error (as in dma_thresholds).
class DmaTopW {
 public:
  explicit DmaTopW(int64_t window) : w_(window) {}
  void push(double bias) {
    if (std::isnan(bias)) nan_ = true;
    heap_.push_back(bias);
    std::push_heap(heap_.begin(), heap_.end(), std::greater<double>());
    if (int64_t(heap_.size()) > w_) {
      std::pop_heap(heap_.begin(), heap_.end(), std::greater<double>());
      heap_.pop_back();
    }
  }
  double threshold() const { return int64_t(heap_.size()) == w_ ? heap_.front() : -INFINITY; }
  bool saw_nan() const { return nan_; }

 private:
  int64_t w_;
  std::vector<double> heap_;  // min-heap of the w largest pushed
  bool nan_ = false;
};

}  // namespace dmat::cpu
