// Native Sparse Attention (type "nsa"; Yuan et al., DeepSeek, arXiv 2502.11089), on the CPU backend.
// Three branches over the same RoPE'd queries q = RoPE(x·W_qᵀ), each with its own keys and values
// projected from the block input (the paper gives each branch independent keys and values against
// shortcut learning), combined per query head by sigmoid gates z = x·W_gᵀ (3 per head):
//   compressed  blocks of l = cmp_block keys at stride d = cmp_stride, each block's keys and values
//               turned into one by an MLP with an intra-block position embedding (one MLP for keys,
//               one for values, shared by the KV heads); the compressed key rotated at the block's
//               last position; query t sees the blocks that end at or before t (none while t < l − 1:
//               output 0)
//   selected    n = sel_count blocks of l' = sel_block keys per query, the first block and the 2 most
//               recent always among them, the rest by the compressed branch's attention mass on them
//               (eq. 9), summed over the query heads of a GQA group (the group shares one selection;
//               not differentiated); causal inside the query's own block
//   window      keys t − w + 1 … t (w = window)
//   o = σ(z_cmp)·o_cmp + σ(z_slc)·o_slc + σ(z_win)·o_win,   out = o·W_oᵀ
// The exact definitions (MLP form, RoPE placement, early queries, the eq. 9 reading, the tie rule)
// are the CPU reference ops' (kernels/cpu/nsa_ops.h, nsa_attention.cpp). The layer is one list of
// ops for both backends: on CUDA they run kernels/cuda/nsa.h (compression around cuBLASLt GEMMs,
// the compressed and selected attentions on NSA's own kernels, the fixed-point selection) and the
// window branch on the flash kernels' sliding window.
#include <cmath>

#include <fmt/format.h>

#include "kernels/cuda/nsa_limits.h"
#include "model/attention.h"
#include "ops/ops.h"

namespace dmat {
namespace {

class NsaAttention final : public Attention {
 public:
  explicit NsaAttention(const ModelConfig& c)
      : cfg_(c), D_(c.d_model), H_(c.n_heads), Hkv_(c.n_kv_heads), Dh_(c.head_dim), l_(c.attention.nsa.cmp_block),
        d_(c.attention.nsa.cmp_stride), lp_(c.attention.nsa.sel_block), n_(c.attention.nsa.sel_count),
        w_(c.attention.nsa.window), F_(c.attention.nsa.cmp_hidden), theta_(c.rope_theta), std_(c.init_std),
        out_std_(c.init_std / std::sqrt(2.0 * double(c.n_layers))) {
    DMAT_CHECK(F_ > 0, "nsa attention: cmp_hidden {} (validated config expected)", F_);
    cpu::nsa_check_shape(shape(1, std::max<int64_t>(l_, 1)));
  }

  AttentionDims dims() const override { return {Dh_, Dh_, Dh_, cuda::AttnKernel::nsa}; }

  // The head dims (head_dims.h, the rows marked nsa) and the settings the NSA CUDA kernels are built
  // for (kernels/cuda/nsa_limits.h).
  std::string cuda_unsupported() const override {
    if (std::string why = cuda_unsupported_head_dim(cfg_, cuda::AttnKernel::nsa); !why.empty()) return why;
    const std::string why = cuda::nsa_cuda_unsupported(shape(1, 1));
    return why.empty() ? "" : why + "; change it or run on the CPU with run.device=\"cpu\"";
  }

  void declare_params(ParamTable& t, const std::string& p) override {
    wq_ = t.add({p + "q_proj.weight", {H_ * Dh_, D_}, "attention", Init::Normal, std_, true});
    for (int b = 0; b < 3; ++b) {
      wk_[b] = t.add({p + kBranch[b] + "_k_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
      wv_[b] = t.add({p + kBranch[b] + "_v_proj.weight", {Hkv_ * Dh_, D_}, "attention", Init::Normal, std_, true});
    }
    for (int kv = 0; kv < 2; ++kv) {
      const std::string m = p + (kv == 0 ? "cmp_k_mlp." : "cmp_v_mlp.");
      pos_[kv] = t.add({m + "pos_embed", {l_, Dh_}, "attention", Init::Normal, std_, true});
      fc1_[kv] = t.add({m + "fc1.weight", {F_, l_ * Dh_}, "attention", Init::Normal, std_, true});
      fc2_[kv] = t.add({m + "fc2.weight", {Dh_, F_}, "attention", Init::Normal, std_, true});
    }
    wg_ = t.add({p + "g_proj.weight", {3 * H_, D_}, "attention", Init::Normal, std_, true});
    wo_ = t.add({p + "o_proj.weight", {D_, H_ * Dh_}, "attention", Init::Normal, out_std_, true});
  }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) override {
    const int64_t N = B * T, Nc = shape(B, T).n_cmp();
    q_ = t.add(p + "q", {B, T, H_, Dh_});  // after RoPE
    kraw_ = t.add(p + "cmp_k", {B, T, Hkv_, Dh_});  // the compression MLPs' inputs
    vraw_ = t.add(p + "cmp_v", {B, T, Hkv_, Dh_});
    hk_ = t.add(p + "cmp_k_hidden", {B, Nc, Hkv_, F_});
    hv_ = t.add(p + "cmp_v_hidden", {B, Nc, Hkv_, F_});
    kc_ = t.add(p + "kc", {B, Nc, Hkv_, Dh_});  // compressed keys (rotated) and values
    vc_ = t.add(p + "vc", {B, Nc, Hkv_, Dh_});
    ks_ = t.add(p + "slc_k", {B, T, Hkv_, Dh_});  // after RoPE
    vs_ = t.add(p + "slc_v", {B, T, Hkv_, Dh_});
    kw_ = t.add(p + "win_k", {B, T, Hkv_, Dh_});  // after RoPE
    vw_ = t.add(p + "win_v", {B, T, Hkv_, Dh_});
    z_ = t.add(p + "gate_logits", {N, 3 * H_});
    for (int b = 0; b < 3; ++b) {
      ob_[b] = t.add(p + "o_" + kBranch[b], {B, T, H_, Dh_});
      lse_[b] = t.add_stat(p + "lse_" + kBranch[b], {B, H_, T});
    }
    o_ = t.add(p + "o", {N, H_ * Dh_});  // the gated sum, o_proj's input
    // The selection, int32 [B, Hkv, T, n], kept in a statistic of as many elements (fp32 or wider:
    // room for an int32 each; selection()).
    sel_ = t.add_stat(p + "selection", {B, Hkv_, T, n_});
    // Shared by all layers (backward runs one layer at a time); dq, dk, dv, do as every variant names them.
    dq_ = t.add_shared("scratch.attn.dq", {B, T, H_, Dh_});
    dq2_ = t.add_shared("scratch.attn.nsa_dq_branch", {B, T, H_, Dh_});
    dk_ = t.add_shared("scratch.attn.dk", {B, T, Hkv_, Dh_});
    dv_ = t.add_shared("scratch.attn.dv", {B, T, Hkv_, Dh_});
    do_ = t.add_shared("scratch.attn.do", {N, H_ * Dh_});
    dz_ = t.add_shared("scratch.attn.nsa_dz", {N, 3 * H_});
    for (int b = 0; b < 3; ++b) dob_[b] = t.add_shared(std::string("scratch.attn.nsa_do_") + kBranch[b], {B, T, H_, Dh_});
    dkc_ = t.add_shared("scratch.attn.nsa_dkc", {B, Nc, Hkv_, Dh_});
    dvc_ = t.add_shared("scratch.attn.nsa_dvc", {B, Nc, Hkv_, Dh_});
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) override {
    const cpu::NsaShape s = shape(c.B, c.T);
    const Tensor q = c.A(q_), kc = c.A(kc_), vc = c.A(vc_);
    ops::linear_forward(q, x, c.P(wq_));
    ops::rope_forward(q, q, theta_);
    // compressed: the MLPs over the raw blocks, then RoPE at each block's last position
    ops::linear_forward(c.A(kraw_), x, c.P(wk_[kCmp]));
    ops::linear_forward(c.A(vraw_), x, c.P(wv_[kCmp]));
    ops::nsa_compress_forward(kc, c.A(hk_), c.A(kraw_), c.P(pos_[0]), c.P(fc1_[0]), c.P(fc2_[0]), s);
    ops::nsa_compress_forward(vc, c.A(hv_), c.A(vraw_), c.P(pos_[1]), c.P(fc1_[1]), c.P(fc2_[1]), s);
    ops::nsa_compressed_rope_forward(kc, kc, theta_, s);
    ops::nsa_cmp_attention_forward(c.A(ob_[kCmp]), c.A(lse_[kCmp]), q, kc, vc, s);
    // selected: blocks chosen from the compressed branch's probabilities
    ops::nsa_select(selection(c), q, kc, c.A(lse_[kCmp]), s);
    ops::linear_forward(c.A(ks_), x, c.P(wk_[kSlc]));
    ops::rope_forward(c.A(ks_), c.A(ks_), theta_);
    ops::linear_forward(c.A(vs_), x, c.P(wv_[kSlc]));
    ops::nsa_slc_attention_forward(c.A(ob_[kSlc]), c.A(lse_[kSlc]), q, c.A(ks_), c.A(vs_), selection(c), s);
    // window
    ops::linear_forward(c.A(kw_), x, c.P(wk_[kWin]));
    ops::rope_forward(c.A(kw_), c.A(kw_), theta_);
    ops::linear_forward(c.A(vw_), x, c.P(wv_[kWin]));
    ops::attention_forward(c.A(ob_[kWin]), c.A(lse_[kWin]), q, c.A(kw_), c.A(vw_), window_shape(c, s));
    // gates, o_proj
    ops::linear_forward(c.A(z_), x, c.P(wg_));
    ops::nsa_gate_forward(c.A(o_), c.A(z_), c.A(ob_[kCmp]), c.A(ob_[kSlc]), c.A(ob_[kWin]), H_);
    ops::linear_forward(out, c.A(o_), c.P(wo_));
  }

  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) override {
    const cpu::NsaShape s = shape(c.B, c.T);
    const int64_t N = c.B * c.T, Nc = s.n_cmp();
    const Tensor q = c.A(q_);
    const Tensor dq = view(c, dq_, {c.B, c.T, H_, Dh_}), dq2 = view(c, dq2_, {c.B, c.T, H_, Dh_}),
                 dk = view(c, dk_, {c.B, c.T, Hkv_, Dh_}), dv = view(c, dv_, {c.B, c.T, Hkv_, Dh_}),
                 dO = view(c, do_, {N, H_ * Dh_}), dz = view(c, dz_, {N, 3 * H_}),
                 dkc = view(c, dkc_, {c.B, Nc, Hkv_, Dh_}), dvc = view(c, dvc_, {c.B, Nc, Hkv_, Dh_});
    Tensor dob[3];
    for (int b = 0; b < 3; ++b) dob[b] = view(c, dob_[b], {c.B, c.T, H_, Dh_});
    const Tensor dk2 = dk.view({N, Hkv_ * Dh_}), dv2 = dv.view({N, Hkv_ * Dh_});

    ops::linear_backward(dO, c.G(wo_), dout, c.A(o_), c.P(wo_), false);
    ops::nsa_gate_backward(dz, dob[kCmp], dob[kSlc], dob[kWin], dO, c.A(z_), c.A(ob_[kCmp]), c.A(ob_[kSlc]),
                           c.A(ob_[kWin]), H_);
    ops::linear_backward(dx, c.G(wg_), dz, x, c.P(wg_), false);
    // window (dq starts here)
    ops::attention_backward(dq, dk, dv, dob[kWin], c.A(ob_[kWin]), c.A(lse_[kWin]), q, c.A(kw_), c.A(vw_),
                            window_shape(c, s));
    ops::rope_backward(dk, dk, theta_);
    ops::linear_backward(dx, c.G(wk_[kWin]), dk2, x, c.P(wk_[kWin]), true);
    ops::linear_backward(dx, c.G(wv_[kWin]), dv2, x, c.P(wv_[kWin]), true);
    // selected
    ops::nsa_slc_attention_backward(dq2, dk, dv, dob[kSlc], c.A(ob_[kSlc]), c.A(lse_[kSlc]), q, c.A(ks_), c.A(vs_),
                                    selection(c), s);
    ops::add_inplace(dq, dq2);
    ops::rope_backward(dk, dk, theta_);
    ops::linear_backward(dx, c.G(wk_[kSlc]), dk2, x, c.P(wk_[kSlc]), true);
    ops::linear_backward(dx, c.G(wv_[kSlc]), dv2, x, c.P(wv_[kSlc]), true);
    // compressed: through the attention, the compressed keys' RoPE, the MLPs
    ops::nsa_cmp_attention_backward(dq2, dkc, dvc, dob[kCmp], c.A(ob_[kCmp]), c.A(lse_[kCmp]), q, c.A(kc_), c.A(vc_),
                                    s);
    ops::add_inplace(dq, dq2);
    ops::nsa_compressed_rope_backward(dkc, dkc, theta_, s);
    ops::nsa_compress_backward(dk, c.G(pos_[0]), c.G(fc1_[0]), c.G(fc2_[0]), dkc, c.A(hk_), c.A(kraw_), c.P(pos_[0]),
                               c.P(fc1_[0]), c.P(fc2_[0]), s);
    ops::linear_backward(dx, c.G(wk_[kCmp]), dk2, x, c.P(wk_[kCmp]), true);
    ops::nsa_compress_backward(dv, c.G(pos_[1]), c.G(fc1_[1]), c.G(fc2_[1]), dvc, c.A(hv_), c.A(vraw_), c.P(pos_[1]),
                               c.P(fc1_[1]), c.P(fc2_[1]), s);
    ops::linear_backward(dx, c.G(wv_[kCmp]), dv2, x, c.P(wv_[kCmp]), true);
    // the shared query
    ops::rope_backward(dq, dq, theta_);
    ops::linear_backward(dx, c.G(wq_), dq.view({N, H_ * Dh_}), x, c.P(wq_), true);
  }

  // Decoding caches per position the raw k_cmp, v_cmp (compressed once their block completes), the
  // selected branch's k (rotated) and v, the window branch's k (rotated) and v, and per completed
  // compression block its kc (rotated) and vc: block c is compressed when position c·d + l − 1 joins
  // the cache, from the same inputs, weights and ops as in training. Each new query then attends the
  // compressed blocks it sees, selects its blocks from those probabilities (nsa_select's routine:
  // the same fixed-point sums and tie rule), attends its selected blocks and its window over the
  // cache, and is gated as in forward(): every row is the training forward's, bit for bit
  // (tests/test_decode.cpp). All positions are kept, like SWA's cache (the window and the raw
  // compression inputs need only the last w and l of them).
  struct NsaCache : DecodeCache {
    Arena arena;
    Tensor raw[2], slc[2], win[2], cmp[2];  // [0]: keys, [1]: values
    int64_t blocks = 0;                     // compressed blocks held (complete ones)
    cpu::NsaShape shape;                    // the layer's, at the cache's capacity
    // The blocks complete within new_len positions stay; later ones are compressed again when their
    // last position is decoded again.
    void rewind(int64_t new_len) override {
      DecodeCache::rewind(new_len);
      blocks = new_len > 0 ? shape.cmp_visible(new_len - 1) : 0;
    }
  };

  std::unique_ptr<DecodeCache> make_decode_cache(const LayerCtx& c, int64_t max_len) const override {
    auto cache = std::make_unique<NsaCache>();
    const int64_t Nc = std::max<int64_t>(shape(1, max_len).n_cmp(), 1);  // (an arena tensor has a row at least)
    TensorTable t;
    for (const char* kv : {"k", "v"}) {
      t.add(std::string("cmp_raw_") + kv, {max_len, Hkv_, Dh_});
      t.add(std::string("slc_") + kv, {max_len, Hkv_, Dh_});
      t.add(std::string("win_") + kv, {max_len, Hkv_, Dh_});
      t.add(std::string("cmp_") + kv, {Nc, Hkv_, Dh_});
    }
    cache->arena = Arena(t, c.P(wq_).dtype, Device::CPU);
    for (int kv = 0; kv < 2; ++kv) {
      cache->raw[kv] = cache->arena.get(4 * kv);
      cache->slc[kv] = cache->arena.get(4 * kv + 1);
      cache->win[kv] = cache->arena.get(4 * kv + 2);
      cache->cmp[kv] = cache->arena.get(4 * kv + 3);
    }
    cache->capacity = max_len;
    cache->shape = shape(1, max_len);
    cache->what = fmt::format("raw k_cmp, v_cmp, slc k, v, win k, v ({} KV heads × {} each), and per {} positions "
                              "one compressed k, v",
                              Hkv_, Dh_, d_);
    cache->values_per_position = 6 * Hkv_ * Dh_ + (2 * Hkv_ * Dh_) / d_;
    return cache;
  }

  void decode(const LayerCtx& c, DecodeCache& dc, const Tensor& x, const Tensor& out) const override {
    auto& cache = dynamic_cast<NsaCache&>(dc);
    const int64_t n = x.shape[0], pos0 = cache.len, HD = H_ * Dh_, KD = Hkv_ * Dh_;
    DMAT_CHECK(pos0 + n <= cache.capacity, "decode: {} + {} positions exceed the cache's {}", pos0, n,
               cache.capacity);
    const cpu::NsaShape s = shape(1, cache.capacity);
    const DecodeScratch sc(x.dtype, {{n, H_, Dh_}, {n, 3 * H_}, {n, H_, Dh_}, {n, H_, Dh_}, {n, H_, Dh_}, {H_, n},
                                     {n, HD}});
    const Tensor q = sc[0], z = sc[1], lse = sc[5], o = sc[6];
    const Tensor ob[3] = {sc[2], sc[3], sc[4]};
    std::vector<int32_t> idx_mem(size_t(Hkv_ * n * n_));
    const Tensor idx{idx_mem.data(), {Hkv_, n, n_}, DType::I32, Device::CPU};

    ops::linear_forward(q.view({n, HD}), x, c.P(wq_));
    ops::rope_rows_inplace(q, n, H_, Dh_, pos0, theta_, HD, Dh_, 0);
    // the new positions' keys and values of every branch into the cache (selected and window keys rotated)
    const Tensor* caches[3] = {cache.raw, cache.slc, cache.win};
    for (int b = 0; b < 3; ++b)
      for (int kv = 0; kv < 2; ++kv) {
        const Tensor rows = caches[b][kv].rows(pos0, n);
        ops::linear_forward(rows.view({n, KD}), x, c.P(kv == 0 ? wk_[b] : wv_[b]));
        if (kv == 0 && b != kCmp) ops::rope_rows_inplace(rows, n, Hkv_, Dh_, pos0, theta_, KD, Dh_, 0);
      }
    // blocks completed by these positions: compressed (keys rotated at their last position)
    const int64_t c1 = s.cmp_visible(pos0 + n - 1), c0 = cache.blocks;
    for (int kv = 0; kv < 2; ++kv)
      ops::nsa_compress_blocks(cache.cmp[kv].rows(c0, c1 - c0), cache.raw[kv], c.P(pos_[kv]), c.P(fc1_[kv]),
                               c.P(fc2_[kv]), c0, c1 - c0, kv == 0, theta_, s);
    cache.blocks = c1;
    // the three branches, then the gates (the compressed cache's rows: s.n_cmp(), 0 under l positions)
    const Tensor kc = cache.cmp[0].rows(0, s.n_cmp()), vc = cache.cmp[1].rows(0, s.n_cmp());
    ops::nsa_cmp_attention_decode(ob[kCmp], lse, q, kc, vc, pos0, s);
    ops::nsa_select_decode(idx, q, kc, lse, pos0, s);
    ops::nsa_slc_attention_decode(ob[kSlc], q, cache.slc[0], cache.slc[1], idx, pos0, s);
    ops::DecodeShape w;
    w.n = n, w.pos0 = pos0, w.H = H_, w.Hkv = Hkv_, w.Dqk = w.Dv = Dh_, w.ldk = w.ldv = KD;
    w.scale = s.scale, w.window = w_;
    ops::attention_decode(ob[kWin], q, cache.win[0], cache.win[1], w);
    ops::linear_forward(z, x, c.P(wg_));
    ops::nsa_gate_forward(o, z, ob[kCmp], ob[kSlc], ob[kWin], H_);
    ops::linear_forward(out, o, c.P(wo_));
    cache.len += n;
  }

  // Forward FLOPs per token as run (cpu::nsa_core_flops_per_token): the three cores,
  // 4·H·Dh·(n̄_cmp + n̄_slc + n̄_win), with n̄ the keys a query attends averaged over t = 0 … T−1
  // (n_cmp(t) = visible compressed blocks, ⌊(t + 1 − l)/d⌋ + 1 once t ≥ l − 1; n_slc(t) =
  // (min(J + 1, n) − 1)·l' + t mod l' + 1 with J = ⌊t/l'⌋; n_win(t) = min(t + 1, w)), plus the
  // compression MLPs, C_cmp = 4·Hkv·F·Dh·(l + 1)·Nc/T (once per block and KV head, keys and values).
  double core_flops_per_token(int64_t T) const override { return cpu::nsa_core_flops_per_token(shape(1, T), F_); }

  // The MFU convention's dense core (as for SWA and DMA: 6·T·d whatever keys are visited), plus the
  // compression MLPs as run, forward and backward (3·C_cmp), since 6·N leaves their parameters out.
  double mfu_core_flops_per_token(int64_t T, int64_t d_model) const override {
    return 6.0 * double(T) * double(d_model) + 3.0 * cpu::nsa_compress_flops_per_token(shape(1, T), F_);
  }
  std::string mfu_convention() const override { return "6·(N − N_cmp) + L·(6·T·d + 3·C_cmp)"; }
  // The two MLPs and their position embeddings, 2·(l·Dh + F·l·Dh + Dh·F) per layer (N_cmp: all layers').
  int64_t params_not_per_token() const override { return 2 * (l_ * Dh_ + F_ * l_ * Dh_ + Dh_ * F_); }

 private:
  static constexpr int kCmp = 0, kSlc = 1, kWin = 2;
  static constexpr const char* kBranch[3] = {"cmp", "slc", "win"};

  cpu::NsaShape shape(int64_t B, int64_t T) const {
    cpu::NsaShape s;
    s.B = B, s.T = T, s.H = H_, s.Hkv = Hkv_, s.D = Dh_;
    s.scale = 1.0 / std::sqrt(double(Dh_));
    s.cmp_block = l_, s.cmp_stride = d_, s.sel_block = lp_, s.sel_count = n_, s.window = w_;
    return s;
  }
  cpu::AttnShape window_shape(const LayerCtx& c, const cpu::NsaShape& s) const {
    cpu::AttnShape a = cpu::nsa_window_shape(s);
    a.deterministic = c.deterministic;
    return a;
  }
  // The selection lists as int32 (the statistic's memory holds 4 or more bytes per element).
  Tensor selection(const LayerCtx& c) const {
    const Tensor t = c.A(sel_);
    return Tensor{t.data, t.shape, DType::I32, t.device};
  }
  // Scratch at this micro-batch's shape (it is sized for the largest).
  static Tensor view(const LayerCtx& c, int h, Shape s) {
    const Tensor t = c.A(h);
    DMAT_CHECK(s.numel() <= t.numel(), "nsa attention: scratch {} too small for {}", t.shape.str(), s.str());
    return Tensor{t.data, s, t.dtype, t.device};
  }

  ModelConfig cfg_;
  int64_t D_, H_, Hkv_, Dh_, l_, d_, lp_, n_, w_, F_;
  double theta_, std_, out_std_;
  int wq_ = -1, wk_[3] = {-1, -1, -1}, wv_[3] = {-1, -1, -1}, pos_[2] = {-1, -1}, fc1_[2] = {-1, -1},
      fc2_[2] = {-1, -1}, wg_ = -1, wo_ = -1;
  int q_ = -1, kraw_ = -1, vraw_ = -1, hk_ = -1, hv_ = -1, kc_ = -1, vc_ = -1, ks_ = -1, vs_ = -1, kw_ = -1, vw_ = -1,
      z_ = -1, o_ = -1, sel_ = -1, ob_[3] = {-1, -1, -1}, lse_[3] = {-1, -1, -1};
  int dq_ = -1, dq2_ = -1, dk_ = -1, dv_ = -1, do_ = -1, dz_ = -1, dob_[3] = {-1, -1, -1}, dkc_ = -1, dvc_ = -1;
};

}  // namespace

std::unique_ptr<Attention> make_nsa_attention(const ModelConfig& cfg) { return std::make_unique<NsaAttention>(cfg); }

}  // namespace dmat
