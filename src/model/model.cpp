#include "model/model.h"

#include <cmath>

#include "core/rng.h"
#include "ops/ops.h"

namespace dmat {

// One transformer block: pre-norm attention and pre-norm SwiGLU MLP, each with a (scaled) residual.
struct Model::Block {
  int64_t D, F;
  double eps;
  bool rscale;
  // gate and up as one GEMM over the two adjacent weights (N = 2F), their outputs packed in one
  // [N, 2F] tensor: wherever the arena places up_proj right after gate_proj (F·D a multiple of
  // its alignment), else one GEMM each.
  bool packed_gu;
  std::unique_ptr<Attention> attn;
  // parameters
  int ln1 = -1, ln2 = -1, r1 = -1, r2 = -1, wg = -1, wu = -1, wd = -1;
  // saved activations
  int ln1_out = -1, rstd1 = -1, mid = -1, ln2_out = -1, rstd2 = -1, g = -1, u = -1, gu = -1, a = -1;
  // scratch shared across blocks
  int attn_out = -1, s1 = -1, s2 = -1, da = -1, dg = -1, du = -1, dgu = -1;

  explicit Block(const ModelConfig& c)
      : D(c.d_model), F(c.ffn_dim), eps(c.norm_eps), rscale(c.residual_scale),
        packed_gu((c.ffn_dim * c.d_model) % kArenaAlign == 0), attn(make_attention(c)) {}

  void declare_params(ParamTable& t, const std::string& p, const ModelConfig& c) {
    const double std = c.init_std, out_std = c.init_std / std::sqrt(2.0 * double(c.n_layers));
    ln1 = t.add({p + "input_layernorm.weight", {D}, "norm", Init::Ones, 0, false});
    attn->declare_params(t, p + "self_attn.");
    if (rscale) r1 = t.add({p + "input_residual", {D}, "residual", Init::Ones, 0, false});
    ln2 = t.add({p + "post_attention_layernorm.weight", {D}, "norm", Init::Ones, 0, false});
    wg = t.add({p + "mlp.gate_proj.weight", {F, D}, "mlp", Init::Normal, std, true});
    wu = t.add({p + "mlp.up_proj.weight", {F, D}, "mlp", Init::Normal, std, true});
    wd = t.add({p + "mlp.down_proj.weight", {D, F}, "mlp", Init::Normal, out_std, true});
    if (rscale) r2 = t.add({p + "post_attention_residual", {D}, "residual", Init::Ones, 0, false});
  }

  void declare_acts(TensorTable& t, const std::string& p, int64_t B, int64_t T) {
    const int64_t N = B * T;
    ln1_out = t.add(p + "ln1", {N, D});
    rstd1 = t.add_stat(p + "rstd1", {N});
    attn->declare_acts(t, p + "attn.", B, T);
    mid = t.add(p + "mid", {N, D});
    ln2_out = t.add(p + "ln2", {N, D});
    rstd2 = t.add_stat(p + "rstd2", {N});
    if (packed_gu) {
      gu = t.add(p + "gu", {N, 2 * F});
    } else {
      g = t.add(p + "g", {N, F});
      u = t.add(p + "u", {N, F});
    }
    a = t.add(p + "a", {N, F});
    attn_out = t.add_shared("scratch.block.attn_out", {N, D});  // consumed at once by the residual
    s1 = t.add_shared("scratch.block.s1", {N, D});
    s2 = t.add_shared("scratch.block.s2", {N, D});
    da = t.add_shared("scratch.block.da", {N, F});
    if (packed_gu) {
      dgu = t.add_shared("scratch.block.dgu", {N, 2 * F});
    } else {
      dg = t.add_shared("scratch.block.dg", {N, F});
      du = t.add_shared("scratch.block.du", {N, F});
    }
  }

  static Tensor P(const LayerCtx& c, int h) { return h < 0 ? Tensor{} : c.P(h); }
  static Tensor G(const LayerCtx& c, int h) { return h < 0 ? Tensor{} : c.G(h); }
  static Tensor joined(const Tensor& a, const Tensor& b) {
    Tensor t = join_rows(a, b);
    DMAT_CHECK(t.defined(), "model: gate_proj and up_proj are not adjacent in the arena");
    return t;
  }

  void forward(const LayerCtx& c, const Tensor& x, const Tensor& y) {
    ops::rmsnorm_forward(c.A(ln1_out), c.A(rstd1), x, c.P(ln1), eps);
    attn->forward(c, c.A(ln1_out), c.A(attn_out));
    ops::residual_rmsnorm_forward(c.A(mid), c.A(ln2_out), c.A(rstd2), x, P(c, r1), c.A(attn_out), c.P(ln2), eps);
    if (packed_gu) {
      ops::linear_forward(c.A(gu), c.A(ln2_out), joined(c.P(wg), c.P(wu)));
      ops::swiglu_packed_forward(c.A(a), c.A(gu));
    } else {
      ops::linear_forward(c.A(g), c.A(ln2_out), c.P(wg));
      ops::linear_forward(c.A(u), c.A(ln2_out), c.P(wu));
      ops::swiglu_forward(c.A(a), c.A(g), c.A(u));
    }
    ops::linear_forward(y, c.A(a), c.P(wd));  // y holds the MLP output, then the residual adds in place
    ops::residual_forward(y, c.A(mid), P(c, r2), y);
  }

  // Incremental decoding of n positions: x, y [n, D]; the attention reads and extends its cache.
  void decode(const LayerCtx& c, DecodeCache& cache, const Tensor& x, const Tensor& y) const {
    const int64_t n = x.shape[0];
    const DecodeScratch s(x.dtype, {{n, D}, {n}, {n, D}, {n, D}, {n, D}, {n}, {n, 2 * F}, {n, F}});
    const Tensor ln1o = s[0], r1s = s[1], att = s[2], midv = s[3], ln2o = s[4], r2s = s[5], guv = s[6], av = s[7];
    ops::rmsnorm_forward(ln1o, r1s, x, c.P(ln1), eps);
    attn->decode(c, cache, ln1o, att);
    ops::residual_rmsnorm_forward(midv, ln2o, r2s, x, P(c, r1), att, c.P(ln2), eps);
    if (packed_gu) {
      ops::linear_forward(guv, ln2o, joined(c.P(wg), c.P(wu)));
      ops::swiglu_packed_forward(av, guv);
    } else {
      const Tensor gv = guv.view({2 * n, F}).rows(0, n), uv = guv.view({2 * n, F}).rows(n, n);
      ops::linear_forward(gv, ln2o, c.P(wg));
      ops::linear_forward(uv, ln2o, c.P(wu));
      ops::swiglu_forward(av, gv, uv);
    }
    ops::linear_forward(y, av, c.P(wd));
    ops::residual_forward(y, midv, P(c, r2), y);
  }

  // dy: gradient of the block output (read only); dx: gradient of the block input (overwrite).
  void backward(const LayerCtx& c, const Tensor& x, const Tensor& dy, const Tensor& dx) {
    Tensor S1 = c.A(s1), S2 = c.A(s2);
    // MLP half: y = r₂ ⊙ mid + down(silu(gate(ln2)) ⊙ up(ln2)). dx accumulates ∂/∂mid first.
    ops::residual_backward(dx, G(c, r2), dy, c.A(mid), P(c, r2));
    ops::linear_backward(c.A(da), c.G(wd), dy, c.A(a), c.P(wd), false);
    if (packed_gu) {
      ops::swiglu_packed_backward(c.A(dgu), c.A(da), c.A(gu));
      ops::linear_backward(S1, joined(c.G(wg), c.G(wu)), c.A(dgu), c.A(ln2_out), joined(c.P(wg), c.P(wu)), false);
    } else {
      ops::swiglu_backward(c.A(dg), c.A(du), c.A(da), c.A(g), c.A(u));
      ops::linear_backward(S1, c.G(wg), c.A(dg), c.A(ln2_out), c.P(wg), false);
      ops::linear_backward(S1, c.G(wu), c.A(du), c.A(ln2_out), c.P(wu), true);
    }
    ops::rmsnorm_backward(dx, c.G(ln2), S1, c.A(mid), c.P(ln2), c.A(rstd2), true);
    // Attention half: mid = r₁ ⊙ x + attn(ln1(x)); ∂/∂attn_out = ∂/∂mid (now in dx).
    attn->backward(c, c.A(ln1_out), dx, S1);
    if (r1 >= 0) {
      ops::copy(S2, dx);
      ops::residual_backward(dx, c.G(r1), S2, x, c.P(r1));
    }
    ops::rmsnorm_backward(dx, c.G(ln1), S1, x, c.P(ln1), c.A(rstd1), true);
  }
};

namespace {
struct Layout {
  ParamTable params;
  std::vector<std::unique_ptr<Model::Block>> blocks;
  int embed = -1, norm = -1, head = -1;
};

Layout build_layout(const ModelConfig& cfg) {
  Layout L;
  L.embed = L.params.add(
      {"model.embed_tokens.weight", {cfg.vocab_size, cfg.d_model}, "embedding", Init::Normal, cfg.init_std, true});
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    L.blocks.push_back(std::make_unique<Model::Block>(cfg));
    L.blocks.back()->declare_params(L.params, "model.layers." + std::to_string(l) + ".", cfg);
  }
  L.norm = L.params.add({"model.norm.weight", {cfg.d_model}, "norm", Init::Ones, 0, false});
  if (!cfg.tie_embeddings)
    L.head = L.params.add(
        {"lm_head.weight", {cfg.vocab_size, cfg.d_model}, "head", Init::Normal, cfg.init_std, true});
  return L;
}
}  // namespace

Model::Model(const ModelConfig& cfg, NoAlloc, bool recompute)
    : cfg_(cfg), dtype_(DType::F32), device_(Device::CPU), recompute_(recompute) {
  Layout L = build_layout(cfg);
  ptable_ = std::move(L.params);
  blocks_ = std::move(L.blocks);
  h_embed_ = L.embed;
  h_norm_ = L.norm;
  h_head_ = L.head;
}

Model::Model(const ModelConfig& cfg, DType dtype, Device device, bool recompute) : Model(cfg, NoAlloc{}, recompute) {
  if (device == Device::CUDA && dtype != DType::BF16)
    fail("model: the CUDA backend trains in bf16 with fp32 master weights (asked for {})", dtype_name(dtype));
  if (device == Device::CPU && dtype != DType::F32 && dtype != DType::F64)
    fail("model: the CPU backend runs in f32 or f64 (asked for {})", dtype_name(dtype));
  if (device == Device::CUDA)
    if (const std::string why = blocks_.front()->attn->cuda_unsupported(); !why.empty()) fail("model: {}", why);
  dtype_ = dtype;
  device_ = device;
  params_ = Arena(ptable_.table(), dtype, device);
  const DType gdt = dtype == DType::BF16 ? DType::F32 : dtype;  // gradients accumulate in fp32
  grads_ = Arena(ptable_.table(), gdt, device);
  if (dtype == DType::BF16) master_ = Arena(ptable_.table(), DType::F32, device);
}

Model::~Model() = default;

ParamTable Model::declare_params(const ModelConfig& cfg) { return build_layout(cfg).params; }

int64_t Model::num_params() const {
  int64_t n = 0;
  for (const auto& p : ptable_.info()) n += p.shape.numel();
  return n;
}

Arena Model::host_weights() const {
  const Arena& src = master_.defined() ? master_ : params_;
  Arena h = src.like(Device::CPU);
  h.copy_from(src);
  return h;
}

void Model::set_weights(const Arena& host) {
  if (master_.defined()) {
    master_.copy_from(host);
    sync_working_copy();
  } else {
    params_.copy_from(host);
  }
}

void Model::sync_working_copy() {
  if (master_.defined()) ops::convert(params_.flat(), master_.flat());
}

void Model::init_weights(uint64_t seed) {
  // Generated on the host in full precision, then set (CUDA: master, then the bf16 copy), so CPU
  // and GPU models of one seed start from the same weights.
  Arena h = (master_.defined() ? master_ : params_).like(Device::CPU);
  const auto& info = ptable_.info();
  for (size_t i = 0; i < info.size(); ++i) {
    Tensor t = h.get(int(i));
    switch (info[i].init) {
      case Init::Ones: ops::fill(t, 1.0); break;
      case Init::Zeros: ops::fill(t, 0.0); break;
      case Init::Constant: ops::fill(t, info[i].std); break;
      case Init::Normal: {
        // Each tensor draws from its own stream: hash(seed, tensor index). Values are generated in
        // double and rounded once, so f32 and f64 models start from the same weights.
        Rng r(hash64(seed, 0x1417ull, i));
        const int64_t n = t.numel();
        if (t.dtype == DType::F32) {
          float* p = t.as<float>();
          for (int64_t j = 0; j < n; ++j) p[j] = float(info[i].std * r.normal());
        } else {
          double* p = t.as<double>();
          for (int64_t j = 0; j < n; ++j) p[j] = info[i].std * r.normal();
        }
        break;
      }
    }
  }
  set_weights(h);
}

int64_t Model::head_chunk_rows(const ModelConfig& cfg, int64_t N, Device device) {
  // CPU: all rows at once (logits() stays available). CUDA: about 2^27 logits (256 MiB of bf16)
  // per chunk: big enough for full-speed GEMMs, small next to the rest of the activations.
  if (device == Device::CPU) return N;
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 27) / cfg.vocab_size));
}

size_t Model::activation_bytes(const ModelConfig& cfg, int64_t B, int64_t T, DType dtype, bool recompute) {
  Model m(cfg, NoAlloc{}, recompute);
  m.device_ = dtype == DType::BF16 ? Device::CUDA : Device::CPU;
  return m.act_table(B, T).total_bytes(dtype);
}

TensorTable Model::act_table(int64_t B, int64_t T) {
  const int64_t N = B * T, D = cfg_.d_model, V = cfg_.vocab_size;
  head_rows_ = head_chunk_rows(cfg_, N, device_);
  TensorTable t;
  a_resid_.clear();
  for (int64_t l = 0; l <= cfg_.n_layers; ++l) a_resid_.push_back(t.add("resid." + std::to_string(l), {N, D}));
  // With recomputation every block declares the same names: one set of buffers for all blocks.
  t.set_share_all(recompute_);
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    blocks_[l]->declare_acts(t, recompute_ ? std::string("layers.recomputed.") : "layers." + std::to_string(l) + ".", B, T);
  t.set_share_all(false);
  if (recompute_) s_block_out_ = t.add("scratch.block_out", {N, D});
  a_lnf_ = t.add("final.ln", {N, D});
  a_rstdf_ = t.add_stat("final.rstd", {N});
  a_logits_ = t.add("final.logits", {head_rows_, V});  // one chunk; holds its gradient after a training chunk
  a_loss_ = t.add_stat("final.loss", {N});
  s_dres_ = t.add("scratch.dresid.a", {N, D});
  s_dres2_ = t.add("scratch.dresid.b", {N, D});
  s_dln_ = t.add("scratch.dln_final", {N, D});
  return t;
}

void Model::reserve(int64_t B, int64_t T) {
  if (B == B_ && T == T_) return;
  acts_ = Arena();  // free the old activations first
  acts_ = Arena(act_table(B, T), dtype_, device_);
  if (device_ == Device::CUDA) {
    TensorTable tt;
    tt.add("inputs", {B * T});
    tt.add("targets", {B * T});
    tokens_dev_ = Arena(tt, DType::I32, device_);
  }
  B_ = B;
  T_ = T;
}

LayerCtx Model::ctx() const {
  LayerCtx c;
  c.params = &params_;
  c.grads = &grads_;
  c.acts = &acts_;
  c.B = B_;
  c.T = T_;
  c.deterministic = deterministic_;
  return c;
}

double Model::forward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, double grad_scale,
                      int64_t* n_valid, int64_t* n_correct) {
  DMAT_CHECK(!(n_correct && grad_scale > 0), "forward: n_correct is for evaluation (grad_scale 0)");
  reserve(B, T);
  const int64_t N = B * T, V = cfg_.vocab_size;
  inputs_.assign(inputs, inputs + N);
  targets_.assign(targets, targets + N);
  const int32_t* tok_in = inputs_.data();
  const int32_t* tok_tgt = targets_.data();
  if (device_ == Device::CUDA) {
    // Range checks on the host (CPU kernels check their own), then one upload per micro-batch.
    for (int64_t i = 0; i < N; ++i) {
      if (inputs_[i] < 0 || inputs_[i] >= V)
        fail("model: input token {} at position {} is outside the vocabulary [0, {})", inputs_[i], i, V);
      if (targets_[i] >= V) fail("model: target {} at position {} is outside the vocabulary [0, {})", targets_[i], i, V);
    }
    Tensor in_d = tokens_dev_.get(0), tg_d = tokens_dev_.get(1);
    ops::copy(in_d, Tensor{inputs_.data(), in_d.shape, DType::I32, Device::CPU});
    ops::copy(tg_d, Tensor{targets_.data(), tg_d.shape, DType::I32, Device::CPU});
    tok_in = in_d.as<int32_t>();
    tok_tgt = tg_d.as<int32_t>();
  }
  LayerCtx c = ctx();

  ops::embedding_forward(acts_.get(a_resid_[0]), params_.get(h_embed_), tok_in);
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    blocks_[l]->forward(c, acts_.get(a_resid_[l]), acts_.get(a_resid_[l + 1]));
  ops::rmsnorm_forward(acts_.get(a_lnf_), acts_.get(a_rstdf_), acts_.get(a_resid_[cfg_.n_layers]),
                       params_.get(h_norm_), cfg_.norm_eps);
  have_grad_ = grad_scale > 0;
  head_loss(tok_tgt, grad_scale, n_correct);

  int64_t valid = 0;
  for (int64_t i = 0; i < N; ++i) valid += targets_[i] >= 0;
  if (n_valid) *n_valid = valid;
  return sum_loss(N);
}

// LM head and cross-entropy, chunk by chunk of rows. In training the head's backward follows each
// chunk at once (dln_final and the head's gradient), so only one chunk of logits ever exists.
namespace {

// Rows of a logits chunk [n, V] whose argmax (the lowest id among equal maxima) is their target;
// rows with target < 0 are skipped. targets: host.
template <class T, class F>
int64_t argmax_hits(const T* lg, const int32_t* targets, int64_t n, int64_t V, F&& value) {
  int64_t hits = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (targets[r] < 0) continue;
    const T* x = lg + r * V;
    int64_t best = 0;
    for (int64_t j = 1; j < V; ++j)
      if (value(x[j]) > value(x[best])) best = j;
    hits += best == targets[r];
  }
  return hits;
}

int64_t count_hits(const Tensor& lg, const int32_t* targets, int64_t n, int64_t V) {
  if (lg.device == Device::CUDA) {
    std::vector<bf16> h(size_t(n * V));
    ops::copy(Tensor{h.data(), lg.shape, DType::BF16, Device::CPU}, lg);
    return argmax_hits(h.data(), targets, n, V, [](bf16 x) { return to_float(x); });
  }
  if (lg.dtype == DType::F64) return argmax_hits(lg.as<double>(), targets, n, V, [](double x) { return x; });
  return argmax_hits(lg.as<float>(), targets, n, V, [](float x) { return x; });
}

}  // namespace

void Model::head_loss(const int32_t* targets, double grad_scale, int64_t* n_correct) {
  const int64_t N = B_ * T_;
  if (n_correct) *n_correct = 0;
  const int h_out = h_head_ >= 0 ? h_head_ : h_embed_;
  Tensor W = params_.get(h_out), lnf = acts_.get(a_lnf_), loss = acts_.get(a_loss_), dln = acts_.get(s_dln_);
  Tensor logits = acts_.get(a_logits_);
  for (int64_t r0 = 0; r0 < N; r0 += head_rows_) {
    const int64_t n = std::min(head_rows_, N - r0);
    Tensor lg = logits.rows(0, n), x = lnf.rows(r0, n);
    ops::linear_forward(lg, x, W);
    if (n_correct) *n_correct += count_hits(lg, targets_.data() + r0, n, cfg_.vocab_size);
    ops::softmax_xent(loss.rows(r0, n), have_grad_ ? lg : Tensor{}, lg, targets + r0, grad_scale);
    if (have_grad_) ops::linear_backward(dln.rows(r0, n), grads_.get(h_out), lg, x, W, false);
  }
}

// Σ loss over the rows, in double (rows with target < 0 hold 0). Reproducible bit for bit.
double Model::sum_loss(int64_t N) {
  Tensor loss = acts_.get(a_loss_);
  if (device_ == Device::CUDA) return ops::sum(loss);
  double sum = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (targets_[i] < 0) continue;
    sum += dtype_ == DType::F32 ? double(loss.as<float>()[i]) : loss.as<double>()[i];
  }
  return sum;
}

void Model::backward() {
  DMAT_CHECK(have_grad_, "backward() needs a forward() with grad_scale > 0");
  have_grad_ = false;
  LayerCtx c = ctx();
  Tensor dres = acts_.get(s_dres_), dres2 = acts_.get(s_dres2_), dln = acts_.get(s_dln_);
  // The LM head's backward already ran chunk by chunk in forward (head_loss): dln is ∂/∂RMSNorm(h_L).
  ops::rmsnorm_backward(dres, grads_.get(h_norm_), dln, acts_.get(a_resid_[cfg_.n_layers]), params_.get(h_norm_),
                        acts_.get(a_rstdf_), false);
  if (grad_ready_) grad_ready_(h_norm_, h_head_ >= 0 ? h_head_ : h_norm_);
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    // (the last block's activations are still those of the forward pass)
    if (recompute_ && l + 1 < cfg_.n_layers) blocks_[l]->forward(c, acts_.get(a_resid_[l]), acts_.get(s_block_out_));
    blocks_[l]->backward(c, acts_.get(a_resid_[l]), dres, dres2);
    std::swap(dres, dres2);
    // a block's parameters are declared contiguously, from input_layernorm to its last one
    if (grad_ready_) grad_ready_(blocks_[l]->ln1, blocks_[l]->r2 >= 0 ? blocks_[l]->r2 : blocks_[l]->wd);
  }
  const int32_t* tok_in = device_ == Device::CUDA ? tokens_dev_.get(0).as<int32_t>() : inputs_.data();
  ops::embedding_backward(grads_.get(h_embed_), dres, tok_in);
  if (grad_ready_) grad_ready_(h_embed_, h_embed_);
}

std::string Model::DecodeState::describe() const {
  if (layers_.empty()) return "";
  return fmt::format("{} ({} values per position and layer)", layers_.front()->what,
                     layers_.front()->values_per_position);
}

void Model::DecodeState::rewind(int64_t new_len) {
  if (new_len < 0 || new_len > len_) fail("model: cannot rewind a decoding state of {} positions to {}", len_, new_len);
  for (auto& l : layers_) l->rewind(new_len);
  len_ = new_len;
}

std::unique_ptr<Model::DecodeState> Model::start_decode(int64_t max_len) const {
  if (device_ != Device::CPU)
    fail("model: incremental decoding runs on the CPU backend (load the checkpoint with run.device=\"cpu\")");
  if (max_len < 1) fail("model: a decoding cache needs at least 1 position (got {})", max_len);
  auto st = std::make_unique<DecodeState>();
  LayerCtx c = ctx();
  for (const auto& b : blocks_) {
    try {
      st->layers_.push_back(b->attn->make_decode_cache(c, max_len));
    } catch (const Error& e) {
      fail("model.attention.type \"{}\": {}", cfg_.attention.type, e.what());
    }
  }
  st->capacity_ = max_len;
  return st;
}

std::vector<double> Model::decode(DecodeState& st, const int32_t* tokens, int64_t n) const {
  if (n < 1) fail("model: decode needs at least one token (got {})", n);
  if (st.len_ + n > st.capacity_)
    fail("model: decoding {} more tokens after {} exceeds the cache's {} positions", n, st.len_, st.capacity_);
  const int64_t D = cfg_.d_model, V = cfg_.vocab_size;
  LayerCtx c = ctx();
  c.B = 1;
  c.T = n;
  const DecodeScratch s(dtype_, {{n, D}, {n, D}, {1, D}, {1}, {1, V}});
  Tensor h = s[0], next = s[1];
  ops::embedding_forward(h, params_.get(h_embed_), tokens);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    blocks_[l]->decode(c, *st.layers_[l], h, next);
    std::swap(h, next);
  }
  // only the last position's logits: the final norm and the head are per position
  ops::rmsnorm_forward(s[2], s[3], h.rows(n - 1, 1), params_.get(h_norm_), cfg_.norm_eps);
  ops::linear_forward(s[4], s[2], params_.get(h_head_ >= 0 ? h_head_ : h_embed_));
  st.len_ += n;
  std::vector<double> logits(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) logits[size_t(v)] = host_element(s[4], v);
  return logits;
}

std::vector<double> Model::position_losses() const {
  const int64_t N = B_ * T_;
  DMAT_CHECK(a_loss_ >= 0 && N > 0, "position_losses() before any forward()");
  const Tensor loss = acts_.get(a_loss_).rows(0, N);
  std::vector<double> out(size_t(N), 0.0);
  if (loss.dtype == DType::F64 && loss.device == Device::CPU) {
    std::copy(loss.as<double>(), loss.as<double>() + N, out.begin());
  } else {
    std::vector<float> f(static_cast<size_t>(N));
    DMAT_CHECK(loss.dtype == DType::F32, "position_losses: loss dtype");
    ops::copy(Tensor{f.data(), loss.shape, DType::F32, Device::CPU}, loss);
    std::copy(f.begin(), f.end(), out.begin());
  }
  for (int64_t i = 0; i < N; ++i)
    if (targets_[size_t(i)] < 0) out[size_t(i)] = 0.0;
  return out;
}

Tensor Model::logits() const {
  DMAT_CHECK(a_logits_ >= 0 && !have_grad_, "logits() after a forward() with grad_scale == 0");
  DMAT_CHECK(head_rows_ == B_ * T_, "logits() needs the whole batch in one head chunk (CPU)");
  return acts_.get(a_logits_);
}

}  // namespace dmat
