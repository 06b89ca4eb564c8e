// Native Sparse Attention (NSA; Yuan et al., arXiv 2502.11089), CPU reference. Contracts in nsa_ops.h.
//
// Definitions (the paper leaves these open or ambiguous; the CUDA kernels, the model layer and the
// PyTorch oracle follow these):
// - Three branches, each with its own keys and values projected from the block input; one query
//   q = RoPE(x·W_qᵀ) for all three. RoPE (rotate-half, θ as the model's) applies to q, to the
//   selected and window branches' keys at their positions, and to the compressed keys AFTER
//   compression, at the position of the block's last key c·d + l − 1. The raw k_cmp is not rotated:
//   the MLP is not equivariant under rotation, so rotating before it would make a compressed key
//   depend on the block's absolute position; rotating after makes q_t·kc_c depend on t − (c·d + l − 1)
//   only, as in the other branches. Values are never rotated.
// - Compression (the paper's φ, "an MLP with intra-block position encoding"), one φ for keys and one
//   for values, each shared by all KV heads, no biases (as every projection here):
//     kc_c = W2 · silu(W1 · flatten_j(k[c·d + j] + pos[j]))   j = 0 … l−1
//   pos [l, D] (the intra-block position embedding), W1 [F, l·D], W2 [D, F]; F is the hidden width.
//   Block c covers [c·d, c·d + l); only complete blocks exist: Nc = ⌊(T − l)/d⌋ + 1 (0 if T < l).
// - Compressed attention: query t sees block c iff c·d + l − 1 <= t. Queries t < l − 1 see no block:
//   their output is 0 and their lse −inf; they get no gradient (the gate of an all-zero output gets
//   none either).
// - Selection, per (batch, KV head, query), not differentiated: the importance of selection block j
//   is the compressed attention mass on it, Σ_c ov(j, c)·p(t, c), with ov(j, c) the number of
//   d-strides compression block c shares with block j, summed over the query heads of the group.
//   This is eq. 9, Σ_{m<l'/d} Σ_{n<l/d} p_cmp[(l'/d)·j + m − n]: the paper prints the index as
//   (l'/d)·j − m − n, which with 0-based blocks credits block j with compression blocks that lie
//   mostly in block j − 1 (and with l = d, l' = 4d, credits it with positions [l'·j − 3d, l'·j + d)
//   instead of its own); the overlap reading is the one that reduces to p_slc = p_cmp when the two
//   blockings coincide, as the paper says it must. Block 0, the query's own block J = ⌊t/l'⌋ and
//   block J − 1 are always selected and count in the n; the rest by importance, ties to the lower
//   block index. Importances are sums of probabilities rounded to multiples of 2^−40 in int64:
//   exact, so a tie in exact arithmetic (e.g. uniform probabilities) is a tie in every summation
//   order, and the rule "lower index first" means the same thing on every backend. Early queries
//   (J + 1 <= n) select all their J + 1 blocks; lists are padded with −1.
// - Selected attention: softmax over the keys p <= t of the selected blocks (causal in the own block).
// - Window: keys t − w + 1 … t (attention_forward with AttnShape::window = w).
// - Gates: g = σ(x·W_gᵀ), 3 per query head, o = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win.
// - Parameters (Hugging Face names under self_attn.): q_proj.weight [H·D, d_model];
//   {cmp,slc,win}_{k,v}_proj.weight [Hkv·D, d_model]; cmp_{k,v}_mlp.pos_embed [l, D],
//   cmp_{k,v}_mlp.fc1.weight [F, l·D], cmp_{k,v}_mlp.fc2.weight [D, F]; g_proj.weight [3H, d_model]
//   (row 3h + c: c = 0 compressed, 1 selected, 2 window); o_proj.weight [d_model, H·D].
// - Forward FLOPs per token beyond the projections (nsa_core_flops_per_token):
//   4·H·D·(n̄_cmp + n̄_slc + n̄_win) + 4·Hkv·F·D·(l + 1)·Nc/T, n̄ the mean keys per query of a branch.
//
// The compressed and selected attentions are attend.h's loop with their key sets (as attention.cpp
// and dma_attention.cpp): exact and simple (O(keys) per query row, probabilities recomputed from the
// saved lse in backward); every output element is reduced in a fixed order
// by one thread, so results do not depend on the thread count. Memory: the compression keeps its
// gathered blocks and hidden activations, [B·Nc·Hkv, l·D] and [B·Nc·Hkv, F] (about l/d times k);
// the selected backward keeps, per (batch, KV head), the queries that selected each block (T·n
// ints); nothing is T × T.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/attend.h"
#include "kernels/cpu/column_chunks.h"
#include "kernels/cpu/nsa_ops.h"

namespace dmat::cpu {
namespace {

// attend.h's dims (and the layouts of nsa_ops.h) of a branch with Tk keys per sequence: T
// positions, or the Nc compressed blocks.
attend::Dims dims_of(const NsaShape& s, int64_t Tk) {
  return {.B = s.B, .Tq = s.T, .Tk = Tk, .H = s.H, .Hkv = s.Hkv, .Dqk = s.D, .Dv = s.D, .scale = s.scale};
}

// The gathered compression inputs u_r = flatten_j(x[b, c·d + j, hk, :] + pos[j, :]), [R, l·D].
template <class T>
std::vector<T> gather_blocks(const T* x, const T* pos, const NsaShape& s) {
  const int64_t Nc = s.n_cmp(), l = s.cmp_block, D = s.D, R = s.B * Nc * s.Hkv;
  const attend::Dims L = dims_of(s, s.T);
  std::vector<T> u(size_t(R * l * D));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hk = r % s.Hkv, c = (r / s.Hkv) % Nc, b = r / (s.Hkv * Nc);
    for (int64_t j = 0; j < l; ++j) {
      const T* xr = x + L.k(b, c * s.cmp_stride + j, hk);
      T* ur = u.data() + (r * l + j) * D;
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) ur[e] = xr[e] + pos[j * D + e];
    }
  }
  return u;
}

// Rotates compressed keys (rope.cpp's convention) by sign · (c·d + l − 1)·f_i: x and y [B, m, Hkv, D]
// hold blocks c = c0 … c0 + m − 1 (training: all Nc from 0; decoding: the blocks just completed).
// y may alias x.
template <class T>
void rotate_compressed(T* y, const T* x, double theta, double sign, const NsaShape& s, int64_t c0, int64_t Nc) {
  DMAT_CHECK(s.D % 2 == 0, "nsa: RoPE needs an even head dim (got {})", s.D);
  const int64_t half = s.D / 2;
  std::vector<T> cosv(size_t(Nc * half)), sinv(size_t(Nc * half));
  for (int64_t c = 0; c < Nc; ++c)
    for (int64_t i = 0; i < half; ++i) {
      const double f = std::pow(theta, -2.0 * double(i) / double(s.D));
      const double a = double((c0 + c) * s.cmp_stride + s.cmp_block - 1) * f;
      cosv[size_t(c * half + i)] = T(std::cos(a));
      sinv[size_t(c * half + i)] = T(sign * std::sin(a));
    }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < s.B * Nc * s.Hkv; ++r) {
    const int64_t c = (r / s.Hkv) % Nc;
    const T* cs = cosv.data() + c * half;
    const T* sn = sinv.data() + c * half;
    const T* xr = x + r * s.D;
    T* yr = y + r * s.D;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const T x1 = xr[i], x2 = xr[i + half];
      yr[i] = x1 * cs[i] - x2 * sn[i];
      yr[i + half] = x2 * cs[i] + x1 * sn[i];
    }
  }
}

// The compressed branch's keys: query t attends blocks 0 … cmp_visible(t) − 1; block c is attended
// by the queries t >= c·d + l − 1. Query row i is position pos0 + i (decoding; training: pos0 = 0).
struct CompressedKeys {
  static constexpr bool kBias = false;
  const NsaShape& s;
  int64_t pos0 = 0;
  int64_t max_keys() const { return s.n_cmp(); }
  template <class F>
  void keys(int64_t, int64_t, int64_t i, F&& f) const {
    for (int64_t c = 0; c < s.cmp_visible(pos0 + i); ++c) f(c);
  }
  template <class F>
  void queries(int64_t, int64_t, int64_t c, F&& f) const {
    for (int64_t t = c * s.cmp_stride + s.cmp_block - 1; t < s.T; ++t) f(t);
  }
  double bias(int64_t, int64_t, int64_t) const { return 0; }
};

// The selected branch's keys: query t attends the keys p <= t of the blocks in its list; key p is
// attended by the queries t >= p that selected its block, found in a per-(batch, KV head) index of
// the queries that selected each block (CSR: who[start[j] … start[j+1]), ascending). The index is
// built only for backward (queries(), training only). Query row i is position pos0 + i and reads list
// i of its (batch, KV head)'s `rows` lists (training: pos0 = 0, rows = T; decoding: the new queries).
struct SelectedKeys {
  static constexpr bool kBias = false;
  const NsaShape& s;
  const int32_t* idx;                 // [B,Hkv,rows,n]
  const std::vector<int64_t>* start;  // [B·Hkv, Ns + 1]
  const std::vector<int32_t>* who;    // [B·Hkv, T·n]
  int64_t pos0, rows;
  int64_t Ns() const { return (s.T + s.sel_block - 1) / s.sel_block; }
  const int32_t* list(int64_t b, int64_t hk, int64_t i) const {
    return idx + ((b * s.Hkv + hk) * rows + i) * s.sel_count;
  }
  int64_t max_keys() const { return s.sel_count * s.sel_block; }
  template <class F>
  void keys(int64_t b, int64_t hk, int64_t i, F&& f) const {
    const int64_t t = pos0 + i;
    const int32_t* l = list(b, hk, i);
    for (int64_t i = 0; i < s.sel_count; ++i) {
      if (l[i] < 0) continue;
      const int64_t p0 = int64_t(l[i]) * s.sel_block, p1 = std::min(p0 + s.sel_block - 1, t);
      for (int64_t p = p0; p <= p1; ++p) f(p);
    }
  }
  template <class F>
  void queries(int64_t b, int64_t hk, int64_t p, F&& f) const {
    const int64_t r = b * s.Hkv + hk, j = p / s.sel_block;
    const int64_t* st = start->data() + r * (Ns() + 1);
    const int32_t* w = who->data() + r * s.T * s.sel_count;
    for (int64_t x = st[j]; x < st[j + 1]; ++x)
      if (w[x] >= p) f(int64_t(w[x]));  // causal inside the own block
  }
  double bias(int64_t, int64_t, int64_t) const { return 0; }
};

// The fixed-point importance sums stay far from overflow (nsa_importance_fixed).
void check_importance_range(const NsaShape& s) {
  const int64_t per_sel = s.sel_block / s.cmp_stride, per_cmp = s.cmp_block / s.cmp_stride;  // in d-strides
  DMAT_CHECK((s.H / s.Hkv) * std::min(per_sel, per_cmp) < (int64_t(1) << 22),
             "nsa selection: fixed-point importance could overflow (group {}, overlap {})", s.H / s.Hkv,
             std::min(per_sel, per_cmp));
}

// One query's selection, nsa_select's rule (nsa_ops.h), shared by training and decoding so both pick
// the same blocks: query t, row i of q and lse_cmp in the layout L (batch b), KV head hk; its n
// entries into out. imp and cand are the caller's scratch. Returns false if a probability is NaN
// (the row is still completed).
template <class T>
bool select_query(int32_t* out, std::vector<int64_t>& imp, std::vector<int32_t>& cand, const T* q, const T* kc,
                  const T* lse_cmp, const attend::Dims& L, int64_t b, int64_t hk, int64_t i, int64_t t,
                  const NsaShape& s) {
  const int64_t group = s.H / s.Hkv, n = s.sel_count;
  const int64_t per_sel = s.sel_block / s.cmp_stride, per_cmp = s.cmp_block / s.cmp_stride;  // in d-strides
  const T scale = T(s.scale);
  const int64_t J = t / s.sel_block, nv = s.cmp_visible(t);
  bool ok = true;
  imp.assign(size_t(J + 1), 0);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const T* qt = q + L.q(b, i, h);
    const T lse_t = lse_cmp[L.stat(b, h, i)];
    for (int64_t c = 0; c < nv; ++c) {
      const T p = std::exp(scale * dot(qt, kc + L.k(b, c, hk), s.D) - lse_t);
      if (std::isnan(p)) {
        ok = false;
        continue;
      }
      const int64_t fixed = nsa_importance_fixed(double(p));
      // Block c covers strides [c, c + per_cmp); block j covers [j·per_sel, (j+1)·per_sel).
      const int64_t j1 = std::min(J, (c + per_cmp - 1) / per_sel);
      for (int64_t j = c / per_sel; j <= j1; ++j) {
        const int64_t ov = std::min(c + per_cmp, (j + 1) * per_sel) - std::max(c, j * per_sel);
        imp[size_t(j)] += ov * fixed;
      }
    }
  }
  // Forced: 0, J − 1, J. The others, 1 … J − 2, compete for what is left of the n.
  cand.clear();
  for (int64_t j = 1; j <= J - 2; ++j) cand.push_back(int32_t(j));
  const int64_t forced = std::min<int64_t>(J + 1, 3);
  const int64_t take = std::min<int64_t>(int64_t(cand.size()), std::max<int64_t>(0, n - forced));
  std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), [&](int32_t a, int32_t b2) {
    const int64_t ia = imp[size_t(a)], ib = imp[size_t(b2)];
    return ia > ib || (ia == ib && a < b2);
  });
  cand.resize(size_t(take));
  cand.push_back(0);
  if (J >= 1) cand.push_back(int32_t(J));
  if (J >= 2) cand.push_back(int32_t(J - 1));
  std::sort(cand.begin(), cand.end());
  for (int64_t e = 0; e < n; ++e) out[e] = e < int64_t(cand.size()) ? cand[size_t(e)] : -1;
  return ok;
}

// Every list holds its query's own block (nsa_select), so no selected-attention row is empty.
void check_own_blocks(const int32_t* idx, int64_t lists, int64_t rows, int64_t pos0, const NsaShape& s) {
  for (int64_t r = 0; r < lists; ++r) {
    const int64_t t = pos0 + r % rows;
    const int32_t* l = idx + r * s.sel_count;
    DMAT_CHECK(std::find(l, l + s.sel_count, int32_t(t / s.sel_block)) != l + s.sel_count,
               "nsa selected attention: query {} has not selected its own block {}", t, t / s.sel_block);
  }
}

}  // namespace

void nsa_check_shape(const NsaShape& s) {
  if (s.B <= 0 || s.T <= 0 || s.H <= 0 || s.Hkv <= 0 || s.D <= 0)
    fail("nsa: sizes must be > 0 (B {}, T {}, H {}, Hkv {}, D {})", s.B, s.T, s.H, s.Hkv, s.D);
  if (s.H % s.Hkv != 0) fail("nsa: n_kv_heads {} must divide n_heads {}", s.Hkv, s.H);
  if (s.cmp_stride <= 0 || s.cmp_block <= 0 || s.cmp_block % s.cmp_stride != 0)
    fail("nsa: cmp_block {} must be a positive multiple of cmp_stride {}", s.cmp_block, s.cmp_stride);
  if (s.sel_block <= 0 || s.sel_block % s.cmp_stride != 0)
    fail("nsa: sel_block {} must be a positive multiple of cmp_stride {}", s.sel_block, s.cmp_stride);
  if (s.sel_count < 3)
    fail("nsa: sel_count {} must be >= 3 (block 0 and the two most recent blocks are always selected)", s.sel_count);
  if (s.window <= 0) fail("nsa: window must be > 0 (got {})", s.window);
}

AttnShape nsa_window_shape(const NsaShape& s) {
  AttnShape a;
  a.B = s.B; a.T = s.T; a.H = s.H; a.Hkv = s.Hkv; a.Dqk = s.D; a.Dv = s.D;
  a.scale = s.scale;
  a.window = s.window;
  return a;
}

// ---- compression --------------------------------------------------------------------------------

template <class T>
void nsa_compress_forward(T* y, T* hid, const T* x, const T* pos, const T* w1, const T* w2, int64_t F,
                          const NsaShape& s) {
  nsa_check_shape(s);
  const int64_t R = s.B * s.n_cmp() * s.Hkv, K = s.cmp_block * s.D;
  if (R == 0) return;
  const std::vector<T> u = gather_blocks(x, pos, s);
  gemm(hid, u.data(), w1, R, F, K, false, true, T(1), T(0));  // hid = U · W1ᵀ
  std::vector<T> act(size_t(R * F));
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < R * F; ++i) act[size_t(i)] = hid[i] * sigmoid(hid[i]);
  gemm(y, act.data(), w2, R, s.D, F, false, true, T(1), T(0));  // y = silu(hid) · W2ᵀ
}

template <class T>
void nsa_compress_backward(T* dx, T* dpos, T* dw1, T* dw2, const T* dy, const T* hid, const T* x, const T* pos,
                           const T* w1, const T* w2, int64_t F, const NsaShape& s) {
  nsa_check_shape(s);
  const int64_t Nc = s.n_cmp(), l = s.cmp_block, d = s.cmp_stride, D = s.D, R = s.B * Nc * s.Hkv, K = l * D;
  if (R == 0) {
    fill(dx, s.B * s.T * s.Hkv * D, T(0));
    return;
  }
  // silu(a) = a·σ(a), silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
  std::vector<T> act(size_t(R * F)), dhid(size_t(R * F));
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < R * F; ++i) act[size_t(i)] = hid[i] * sigmoid(hid[i]);
  gemm(dw2, dy, act.data(), D, F, R, true, false, T(1), T(1));      // dW2 += dyᵀ · silu(hid)
  gemm(dhid.data(), dy, w2, R, F, D, false, false, T(1), T(0));     // d silu(hid) = dy · W2
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < R * F; ++i) {
    const T a = hid[i], g = sigmoid(a);
    dhid[size_t(i)] *= g * (T(1) + a * (T(1) - g));
  }
  const std::vector<T> u = gather_blocks(x, pos, s);
  gemm(dw1, dhid.data(), u.data(), F, K, R, true, false, T(1), T(1));  // dW1 += dhidᵀ · U
  std::vector<T> du(size_t(R * K));
  gemm(du.data(), dhid.data(), w1, R, K, F, false, false, T(1), T(0));  // dU = dhid · W1

  // dx: each position gathers the rows of the blocks covering it, c ascending.
  const attend::Dims Lo = dims_of(s, s.T);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < s.B * s.T * s.Hkv; ++row) {
    const int64_t hk = row % s.Hkv, p = (row / s.Hkv) % s.T, b = row / (s.Hkv * s.T);
    T* dxr = dx + Lo.k(b, p, hk);
    std::fill(dxr, dxr + D, T(0));
    const int64_t c0 = p >= l ? (p - l) / d + 1 : 0, c1 = std::min(Nc - 1, p / d);
    for (int64_t c = c0; c <= c1; ++c) {
      const T* g = du.data() + (((b * Nc + c) * s.Hkv + hk) * l + (p - c * d)) * D;
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) dxr[e] += g[e];
    }
  }
  // dpos[j, e] += Σ_r dU[r, j·D + e], rows ascending (threads own column chunks).
  parallel_column_chunks(K, [&](int64_t k0, int64_t k1) {
    for (int64_t r = 0; r < R; ++r) {
      const T* g = du.data() + r * K;
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) dpos[k] += g[k];
    }
  });
}

template <class T>
void nsa_compressed_rope_forward(T* y, const T* x, double theta, const NsaShape& s) {
  rotate_compressed(y, x, theta, 1.0, s, 0, s.n_cmp());
}

template <class T>
void nsa_compressed_rope_backward(T* dx, const T* dy, double theta, const NsaShape& s) {
  rotate_compressed(dx, dy, theta, -1.0, s, 0, s.n_cmp());
}

// ---- compressed attention -----------------------------------------------------------------------

template <class T>
void nsa_cmp_attention_forward(T* out, T* lse, const T* q, const T* kc, const T* vc, const NsaShape& s) {
  nsa_check_shape(s);
  attend::forward(out, lse, q, kc, vc, dims_of(s, s.n_cmp()), CompressedKeys{s});
}

template <class T>
void nsa_cmp_attention_backward(T* dq, T* dkc, T* dvc, const T* dout, const T* out, const T* lse, const T* q,
                                const T* kc, const T* vc, const NsaShape& s) {
  nsa_check_shape(s);
  attend::backward(dq, dkc, dvc, static_cast<T*>(nullptr), dout, out, lse, q, kc, vc, dims_of(s, s.n_cmp()),
                   CompressedKeys{s});
}

// ---- selection ----------------------------------------------------------------------------------

template <class T>
void nsa_select(int32_t* idx, const T* q, const T* kc, const T* lse_cmp, const NsaShape& s) {
  nsa_check_shape(s);
  check_importance_range(s);
  const attend::Dims L = dims_of(s, s.n_cmp());  // q and the compressed keys
  bool nan = false;
#pragma omp parallel reduction(|| : nan)
  {
    std::vector<int64_t> imp;  // exact: fixed point, see nsa_importance_fixed
    std::vector<int32_t> cand;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.B * s.Hkv * s.T; ++row) {
      const int64_t t = row % s.T, hk = (row / s.T) % s.Hkv, b = row / (s.T * s.Hkv);
      if (!select_query(idx + row * s.sel_count, imp, cand, q, kc, lse_cmp, L, b, hk, t, t, s)) nan = true;
    }
  }
  if (nan) fail("nsa selection: a block importance is NaN (diverged?)");
}

// ---- selected attention -------------------------------------------------------------------------

template <class T>
void nsa_slc_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, const int32_t* idx,
                               const NsaShape& s) {
  nsa_check_shape(s);
  check_own_blocks(idx, s.B * s.Hkv * s.T, s.T, 0, s);
  attend::forward(out, lse, q, k, v, dims_of(s, s.T), SelectedKeys{s, idx, nullptr, nullptr, 0, s.T});
}

template <class T>
void nsa_slc_attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse, const T* q,
                                const T* k, const T* v, const int32_t* idx, const NsaShape& s) {
  nsa_check_shape(s);
  const int64_t n = s.sel_count, Ns = (s.T + s.sel_block - 1) / s.sel_block, rows = s.B * s.Hkv;
  // Per (batch, KV head): the queries that selected each block, ascending.
  std::vector<int64_t> start(size_t(rows * (Ns + 1)), 0);
  std::vector<int32_t> who(size_t(rows * s.T * n));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t* st = start.data() + r * (Ns + 1);
    int32_t* w = who.data() + r * s.T * n;
    const int32_t* lists = idx + r * s.T * n;
    std::vector<int64_t> fill_at(size_t(Ns), 0);
    for (int64_t x = 0; x < s.T * n; ++x) {
      const int32_t j = lists[x];
      if (j >= 0) {
        DMAT_CHECK(j < Ns, "nsa selected attention: block {} out of range (blocks {})", j, Ns);
        ++st[j + 1];
      }
    }
    for (int64_t j = 0; j < Ns; ++j) st[j + 1] += st[j];
    for (int64_t x = 0; x < s.T * n; ++x) {
      const int32_t j = lists[x];
      if (j >= 0) w[st[j] + fill_at[size_t(j)]++] = int32_t(x / n);
    }
  }
  attend::backward(dq, dk, dv, static_cast<T*>(nullptr), dout, out, lse, q, k, v, dims_of(s, s.T),
                   SelectedKeys{s, idx, &start, &who, 0, s.T});
}

// ---- gates and combination ------------------------------------------------------------------------

template <class T>
void nsa_gate_forward(T* out, const T* z, const T* o_cmp, const T* o_slc, const T* o_win, int64_t rows, int64_t H,
                      int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t rh = 0; rh < rows * H; ++rh) {
    const T g0 = sigmoid(z[rh * 3]), g1 = sigmoid(z[rh * 3 + 1]), g2 = sigmoid(z[rh * 3 + 2]);
    const int64_t o = rh * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) out[o + e] = g0 * o_cmp[o + e] + g1 * o_slc[o + e] + g2 * o_win[o + e];
  }
}

template <class T>
void nsa_gate_backward(T* dz, T* do_cmp, T* do_slc, T* do_win, const T* dout, const T* z, const T* o_cmp,
                       const T* o_slc, const T* o_win, int64_t rows, int64_t H, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t rh = 0; rh < rows * H; ++rh) {
    const int64_t o = rh * D;
    const T* branch[3] = {o_cmp + o, o_slc + o, o_win + o};
    T* dbranch[3] = {do_cmp + o, do_slc + o, do_win + o};
    for (int c = 0; c < 3; ++c) {
      const T g = sigmoid(z[rh * 3 + c]);
      dz[rh * 3 + c] = g * (T(1) - g) * dot(dout + o, branch[c], D);
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) dbranch[c][e] = g * dout[o + e];
    }
  }
}

// ---- incremental decoding ------------------------------------------------------------------------
// The training ops' loops on the cache's layout: B = 1, the new queries as rows 0 … n − 1 at
// positions pos0 + i, keys at their positions (or block indices) in the cache.

namespace {

attend::Dims decode_dims(const NsaShape& s, int64_t n, int64_t Tk) {
  return {.B = 1, .Tq = n, .Tk = Tk, .H = s.H, .Hkv = s.Hkv, .Dqk = s.D, .Dv = s.D, .scale = s.scale};
}

void check_decode(const char* op, int64_t n, int64_t pos0, const NsaShape& s) {
  nsa_check_shape(s);
  DMAT_CHECK(s.B == 1 && n >= 1 && pos0 >= 0 && pos0 + n <= s.T,
             "{}: {} queries from position {} in a cache of {} positions (B {}; expected B = 1)", op, n, pos0, s.T,
             s.B);
}

}  // namespace

template <class T>
void nsa_compress_blocks(T* y, const T* x, const T* pos, const T* w1, const T* w2, int64_t F, int64_t c0, int64_t m,
                         bool rotate, double theta, const NsaShape& s) {
  nsa_check_shape(s);
  DMAT_CHECK(c0 >= 0 && m >= 0, "nsa_compress_blocks: blocks {} … {}", c0, c0 + m - 1);
  if (m == 0) return;
  // the sub-sequence from block c0's first position holding exactly blocks c0 … c0 + m − 1
  NsaShape sub = s;
  sub.B = 1;
  sub.T = (m - 1) * s.cmp_stride + s.cmp_block;
  std::vector<T> hid(size_t(m * s.Hkv * F));
  nsa_compress_forward(y, hid.data(), x + c0 * s.cmp_stride * s.Hkv * s.D, pos, w1, w2, F, sub);
  if (rotate) rotate_compressed(y, y, theta, 1.0, sub, c0, m);
}

template <class T>
void nsa_cmp_attention_decode(T* out, T* lse, const T* q, const T* kc, const T* vc, int64_t n, int64_t pos0,
                              const NsaShape& s) {
  check_decode("nsa_cmp_attention_decode", n, pos0, s);
  attend::forward(out, lse, q, kc, vc, decode_dims(s, n, s.n_cmp()), CompressedKeys{s, pos0});
}

template <class T>
void nsa_select_decode(int32_t* idx, const T* q, const T* kc, const T* lse_cmp, int64_t n, int64_t pos0,
                       const NsaShape& s) {
  check_decode("nsa_select_decode", n, pos0, s);
  check_importance_range(s);
  const attend::Dims L = decode_dims(s, n, s.n_cmp());
  bool nan = false;
#pragma omp parallel reduction(|| : nan)
  {
    std::vector<int64_t> imp;
    std::vector<int32_t> cand;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.Hkv * n; ++row) {
      const int64_t i = row % n, hk = row / n;
      if (!select_query(idx + row * s.sel_count, imp, cand, q, kc, lse_cmp, L, 0, hk, i, pos0 + i, s)) nan = true;
    }
  }
  if (nan) fail("nsa selection: a block importance is NaN (diverged?)");
}

template <class T>
void nsa_slc_attention_decode(T* out, const T* q, const T* k, const T* v, const int32_t* idx, int64_t n, int64_t pos0,
                              const NsaShape& s) {
  check_decode("nsa_slc_attention_decode", n, pos0, s);
  check_own_blocks(idx, s.Hkv * n, n, pos0, s);
  std::vector<T> lse(size_t(s.H * n));  // the training op's statistic, not needed here
  attend::forward(out, lse.data(), q, k, v, decode_dims(s, n, s.T), SelectedKeys{s, idx, nullptr, nullptr, pos0, n});
}

// ---- cost ---------------------------------------------------------------------------------------

double nsa_core_flops_per_token(const NsaShape& s, int64_t F) {
  nsa_check_shape(s);
  double keys = 0;  // Σ_t (compressed + selected + window keys of query t)
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t J = t / s.sel_block;
    keys += double(s.cmp_visible(t));
    keys += double((std::min(J + 1, s.sel_count) - 1) * s.sel_block + t % s.sel_block + 1);
    keys += double(std::min(t + 1, s.window));
  }
  return 4.0 * double(s.H * s.D) * keys / double(s.T) + nsa_compress_flops_per_token(s, F);
}

double nsa_compress_flops_per_token(const NsaShape& s, int64_t F) {
  nsa_check_shape(s);
  return 2.0 * 2.0 * double(s.Hkv * F * s.D * (s.cmp_block + 1)) * double(s.n_cmp()) / double(s.T);
}

#define DMAT_INSTANTIATE(T)                                                                                        \
  template void nsa_compress_forward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t, const NsaShape&); \
  template void nsa_compress_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T*,         \
                                         const T*, int64_t, const NsaShape&);                                      \
  template void nsa_compressed_rope_forward<T>(T*, const T*, double, const NsaShape&);                             \
  template void nsa_compressed_rope_backward<T>(T*, const T*, double, const NsaShape&);                            \
  template void nsa_cmp_attention_forward<T>(T*, T*, const T*, const T*, const T*, const NsaShape&);               \
  template void nsa_cmp_attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*,        \
                                              const T*, const NsaShape&);                                          \
  template void nsa_select<T>(int32_t*, const T*, const T*, const T*, const NsaShape&);                            \
  template void nsa_slc_attention_forward<T>(T*, T*, const T*, const T*, const T*, const int32_t*,                 \
                                             const NsaShape&);                                                     \
  template void nsa_slc_attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*,        \
                                              const T*, const int32_t*, const NsaShape&);                          \
  template void nsa_gate_forward<T>(T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);        \
  template void nsa_gate_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T*, int64_t,    \
                                     int64_t, int64_t);                                                            \
  template void nsa_compress_blocks<T>(T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, bool, \
                                       double, const NsaShape&);                                                   \
  template void nsa_cmp_attention_decode<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t,                \
                                            const NsaShape&);                                                      \
  template void nsa_select_decode<T>(int32_t*, const T*, const T*, const T*, int64_t, int64_t, const NsaShape&);   \
  template void nsa_slc_attention_decode<T>(T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t,    \
                                            const NsaShape&);
DMAT_INSTANTIATE(float)
DMAT_INSTANTIATE(double)
#undef DMAT_INSTANTIATE

}  // namespace dmat::cpu
