// Incremental decoding (Model::start_decode / decode, `dmatrain generate`): for every variant (mha,
// swa, dma, mla, nsa), greedy decoding with the cache picks the tokens and computes the logits that
// recomputing the whole prefix with forward() does; DMA's streamed thresholds and kept keys are the
// training rule's, ties included; NSA's selection is live in that check; the sampler's rules; the
// refusal of variants without decoding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/attention.h"
#include "model/model.h"
#include "train/generate.h"

namespace dmat {
namespace {

ModelConfig tiny(const std::string& type) {
  ModelConfig c;
  c.vocab_size = 61;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.init_std = 0.3;  // attention far from uniform, so a wrong key set shows in the logits
  c.attention.type = type;
  if (type == "swa") c.attention.swa.window = 5;
  if (type == "dma") c.attention.dma.window = 6;
  if (type == "mla") {
    c.n_kv_heads = 4;
    c.attention.mla = {.kv_rank = 8, .q_rank = 0, .rope_dim = 4, .nope_dim = 8, .v_dim = 6};
  }
  // NSA at a scale where 25 positions hold 11 compression blocks, 7 selection blocks of which the
  // importances choose one per query from J = 3 on, and a window shorter than the sequence.
  if (type == "nsa")
    c.attention.nsa = {.cmp_block = 4, .cmp_stride = 2, .sel_block = 4, .sel_count = 4, .window = 3, .cmp_hidden = 8};
  return c;
}

// Sets a parameter tensor (by its Hugging Face name) to uniform values in [lo, hi).
void set_param(Model& m, const std::string& name, double lo, double hi, uint64_t seed) {
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    if (info[i].name != name) continue;
    const Tensor t = m.params().get(int(i));
    Rng r(seed);
    for (int64_t j = 0; j < t.numel(); ++j) set_host_element(t, j, lo + (hi - lo) * r.uniform());
    return;
  }
  FAIL() << "no parameter " << name;
}

// exact: the decoded logits must equal the recomputed ones bit for bit (the same sums in the same
// order: the decode kernels run the training loops' rows); else within kLogitTol.
struct Case {
  std::string name;
  ModelConfig cfg;
  bool exact = true;
};

std::vector<Case> cases() {
  std::vector<Case> v;
  v.push_back({"mha", tiny("mha")});
  ModelConfig g = tiny("mha");
  g.qk_norm = g.residual_scale = true;
  g.n_kv_heads = 1;
  v.push_back({"mha_gqa_qknorm_rscale", g});
  v.push_back({"swa", tiny("swa")});
  v.push_back({"dma", tiny("dma")});
  ModelConfig lin = tiny("dma");
  lin.attention.dma.bias_form = "linear";
  lin.attention.dma.local_window = 3;
  v.push_back({"dma_linear_local3", lin});
  v.push_back({"mla", tiny("mla"), false});
  ModelConfig q = tiny("mla");
  q.attention.mla.q_rank = 12;
  v.push_back({"mla_q_rank", q, false});
  v.push_back({"nsa", tiny("nsa")});
  // l = d (disjoint compression blocks), one KV head for 4 query heads (importance summed over the
  // group), two free choices per query, window 2
  ModelConfig ns = tiny("nsa");
  ns.n_kv_heads = 1;
  ns.attention.nsa = {.cmp_block = 4, .cmp_stride = 4, .sel_block = 4, .sel_count = 5, .window = 2, .cmp_hidden = 6};
  v.push_back({"nsa_mqa_disjoint_blocks", ns});
  return v;
}

// DMA with A = 0 keeps every key (all biases tie): random A and dt_proj make the selection real,
// with biases of a few units (larger ones put all of a query's weight on its largest-bias key, and
// the keys dropped would not show in the logits).
void randomise_dma(Model& m) {
  for (int64_t l = 0; l < m.config().n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    set_param(m, p + "A", 0.1, 0.4, 11 + uint64_t(l));
    set_param(m, p + "dt_proj.weight", -0.3, 0.3, 21 + uint64_t(l));
  }
}

// The logits of the last position from forward() on the whole sequence.
std::vector<double> recompute(Model& m, const std::vector<int32_t>& seq) {
  const int64_t T = int64_t(seq.size());
  std::vector<int32_t> targets(seq.size(), -1);
  m.forward(seq.data(), targets.data(), 1, T, 0.0);
  const Tensor lg = m.logits();
  const int64_t V = m.config().vocab_size;
  std::vector<double> out(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) out[size_t(v)] = host_element(lg, (T - 1) * V + v);
  return out;
}

int32_t argmax(const std::vector<double>& x) { return int32_t(std::max_element(x.begin(), x.end()) - x.begin()); }

// Tolerance on MLA's logits (|logits| ~ 1–10 here): decoding forms its scores and outputs in the
// absorbed form, (W_kᵀ·q)·c instead of q·(W_k·c), which rounds differently in f32. Every other
// variant decodes with the training loops' own sums and must match exactly.
constexpr double kLogitTol = 2e-4;

TEST(Decode, GreedyWithTheCacheEqualsRecomputingThePrefix) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    Model m(c.cfg, DType::F32, Device::CPU);
    m.init_weights(7);
    if (c.cfg.attention.type == "dma") randomise_dma(m);
    const std::vector<int32_t> prompt = {3, 17, 42, 5, 60, 0, 23, 9, 31};
    const int64_t steps = 16;
    auto st = m.start_decode(int64_t(prompt.size()) + steps);
    // the prompt in two pieces: a prefill from position 0 and one from a later position
    std::vector<double> logits = m.decode(*st, prompt.data(), 4);
    logits = m.decode(*st, prompt.data() + 4, int64_t(prompt.size()) - 4);
    std::vector<int32_t> seq = prompt;
    double worst = 0;
    for (int64_t k = 0; k < steps; ++k) {
      const std::vector<double> ref = recompute(m, seq);
      for (size_t v = 0; v < ref.size(); ++v) worst = std::max(worst, std::abs(ref[v] - logits[v]));
      ASSERT_EQ(argmax(logits), argmax(ref)) << "step " << k;
      const int32_t next = argmax(logits);
      seq.push_back(next);
      if (k + 1 < steps) logits = m.decode(*st, &next, 1);
    }
    if (c.exact) EXPECT_EQ(worst, 0.0);
    else EXPECT_LE(worst, kLogitTol);
    std::printf("%s: largest logit difference %.3g\n", c.name.c_str(), worst);
    EXPECT_EQ(st->len(), int64_t(seq.size()) - 1);
    // the cache is full: one more position is refused
    if (st->len() == st->capacity()) {
      const int32_t t = 1;
      EXPECT_THROW(m.decode(*st, &t, 1), Error);
    }
  }
}

TEST(Decode, DmaSelectionIsActiveInTheDecodeTest) {
  // Guards the test above: with these weights DMA's thresholds are finite and drop keys (else DMA
  // would decode as plain causal attention and the check would prove less).
  Model m(tiny("dma"), DType::F32, Device::CPU);
  m.init_weights(7);
  randomise_dma(m);
  std::vector<int32_t> seq(20);
  for (size_t i = 0; i < seq.size(); ++i) seq[i] = int32_t((i * 7 + 3) % 61);
  std::vector<int32_t> targets(seq.size(), -1);
  m.forward(seq.data(), targets.data(), 1, int64_t(seq.size()), 0.0);
  // compare with DMA keeping every key (window ≥ T): the logits must differ
  ModelConfig all = tiny("dma");
  all.attention.dma.window = 64;
  Model m2(all, DType::F32, Device::CPU);
  m2.set_weights(m.host_weights());
  m2.forward(seq.data(), targets.data(), 1, int64_t(seq.size()), 0.0);
  double diff = 0;
  const Tensor a = m.logits(), b = m2.logits();
  for (int64_t i = 0; i < a.numel(); ++i) diff = std::max(diff, std::abs(host_element(a, i) - host_element(b, i)));
  EXPECT_GT(diff, 1e-3);
}

TEST(Decode, RewindForgetsThePositionsAfterIt) {
  // Decoding other tokens after a rewind gives the logits a fresh cache fed only the kept prefix and
  // those tokens gives, exactly (the same computations): for every variant, including DMA's running
  // top-w and NSA's compressed blocks, rewound to the end of the prompt and into it.
  const std::vector<int32_t> prompt = {3, 17, 42, 5, 60, 0, 23, 9, 31}, a = {7, 8, 9, 10, 11, 12},
                             b = {50, 2, 44, 13, 1, 30};
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    Model m(c.cfg, DType::F32, Device::CPU);
    m.init_weights(7);
    if (c.cfg.attention.type == "dma") randomise_dma(m);
    for (int64_t keep : {int64_t(prompt.size()), int64_t(3)}) {
      auto st = m.start_decode(int64_t(prompt.size() + a.size()));
      m.decode(*st, prompt.data(), int64_t(prompt.size()));
      m.decode(*st, a.data(), int64_t(a.size()));
      st->rewind(keep);
      EXPECT_EQ(st->len(), keep);
      auto fresh = m.start_decode(int64_t(prompt.size() + a.size()));
      m.decode(*fresh, prompt.data(), keep);
      for (size_t k = 0; k < b.size(); ++k)
        ASSERT_EQ(m.decode(*st, &b[k], 1), m.decode(*fresh, &b[k], 1)) << "keep " << keep << ", token " << k;
    }
    auto st = m.start_decode(4);
    m.decode(*st, prompt.data(), 2);
    EXPECT_THROW(st->rewind(3), Error);
    EXPECT_THROW(st->rewind(-1), Error);
  }
}

TEST(Decode, NsaSelectionIsActiveInTheDecodeTest) {
  // Guards the NSA cases above: the importances' choice changes the logits (selecting every block
  // instead gives others), so a decoded selection that differed from training's would show.
  const ModelConfig cfg = tiny("nsa");
  Model m(cfg, DType::F32, Device::CPU);
  m.init_weights(7);
  std::vector<int32_t> seq(25);
  for (size_t i = 0; i < seq.size(); ++i) seq[i] = int32_t((i * 7 + 3) % 61);
  std::vector<int32_t> targets(seq.size(), -1);
  m.forward(seq.data(), targets.data(), 1, int64_t(seq.size()), 0.0);
  ModelConfig all = cfg;
  all.attention.nsa.sel_count = 16;
  Model m2(all, DType::F32, Device::CPU);
  m2.set_weights(m.host_weights());
  m2.forward(seq.data(), targets.data(), 1, int64_t(seq.size()), 0.0);
  double diff = 0;
  const Tensor a = m.logits(), b = m2.logits();
  for (int64_t i = 0; i < a.numel(); ++i) diff = std::max(diff, std::abs(host_element(a, i) - host_element(b, i)));
  EXPECT_GT(diff, 1e-3);
}

TEST(Decode, DmaStreamedThresholdsAndKeptKeysMatchTrainingWithTies) {
  // Biases from a set of 4 values: many ties at every threshold. For w and the local window L, the
  // thresholds streamed key by key (DmaTopW) equal dma_thresholds', and decoding each query against
  // the cache gives dma_attention_forward's output row (the same kept keys, ties all kept).
  const int64_t T = 40, H = 2, Hkv = 1, D = 4;
  Rng r(5);
  std::vector<double> bias(static_cast<size_t>(T)), q(static_cast<size_t>(T * H * D)), k(static_cast<size_t>(T * Hkv * D)),
      v(static_cast<size_t>(T * Hkv * D));
  const double levels[4] = {0.5, 1.0, 1.5, 2.5};
  for (auto& b : bias) b = levels[r.below(4)];
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = 2 * r.uniform() - 1;
  for (int64_t w : {1, 3, 7, 40})
    for (int64_t L : {0, 2}) {
      SCOPED_TRACE("w " + std::to_string(w) + " L " + std::to_string(L));
      std::vector<double> thr(static_cast<size_t>(T));
      cpu::dma_thresholds(thr.data(), bias.data(), 1, T, w, L);
      cpu::DmaTopW top(w);
      std::vector<double> streamed(static_cast<size_t>(T));
      for (int64_t i = 0; i < T; ++i) {
        if (i - L >= 0) top.push(bias[size_t(i - L)]);
        streamed[size_t(i)] = top.threshold();
      }
      EXPECT_EQ(streamed, thr);
      cpu::AttnShape s;
      s.B = 1, s.T = T, s.H = H, s.Hkv = Hkv, s.Dqk = D, s.Dv = D, s.scale = 0.5, s.window = L;
      std::vector<double> out(static_cast<size_t>(T * H * D)), lse(static_cast<size_t>(H * T));
      cpu::dma_attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), bias.data(), thr.data(), s);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> o(static_cast<size_t>(H * D));
        const double t_i = streamed[size_t(i)];
        cpu::attention_decode(o.data(), q.data() + i * H * D, k.data(), v.data(), 1, i, H, Hkv, D, D, Hkv * D,
                              Hkv * D, 0.5, L, bias.data(), T, &t_i);
        for (int64_t j = 0; j < H * D; ++j) ASSERT_EQ(o[size_t(j)], out[size_t(i * H * D + j)]) << "query " << i;
      }
    }
}

TEST(Decode, CausalAndWindowedRowsMatchTheTrainingKernel) {
  const int64_t T = 23, H = 4, Hkv = 2, D = 6;
  Rng r(8);
  std::vector<double> q(static_cast<size_t>(T * H * D)), k(static_cast<size_t>(T * Hkv * D)),
      v(static_cast<size_t>(T * Hkv * D));
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = 2 * r.uniform() - 1;
  for (int64_t window : {0, 1, 4}) {
    cpu::AttnShape s;
    s.B = 1, s.T = T, s.H = H, s.Hkv = Hkv, s.Dqk = D, s.Dv = D, s.scale = 0.4, s.window = window;
    std::vector<double> out(static_cast<size_t>(T * H * D)), lse(static_cast<size_t>(H * T)),
        o(static_cast<size_t>(T * H * D));
    cpu::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s);
    // all queries at once (a prompt), then one at a time
    cpu::attention_decode(o.data(), q.data(), k.data(), v.data(), T, 0, H, Hkv, D, D, Hkv * D, Hkv * D, 0.4, window);
    EXPECT_EQ(o, out) << "window " << window;
    for (int64_t i = 0; i < T; ++i)
      cpu::attention_decode(o.data() + i * H * D, q.data() + i * H * D, k.data(), v.data(), 1, i, H, Hkv, D, D,
                            Hkv * D, Hkv * D, 0.4, window);
    EXPECT_EQ(o, out) << "window " << window;
  }
}

TEST(Decode, VariantsWithoutDecodingAreRefusedByName) {
  // The interface's defaults refuse (a variant added without decoding gets this).
  struct NoDecode final : Attention {
    AttentionDims dims() const override { return {}; }
    std::string cuda_unsupported() const override { return ""; }
    void declare_params(ParamTable&, const std::string&) override {}
    void declare_acts(TensorTable&, const std::string&, int64_t, int64_t) override {}
    void forward(const LayerCtx&, const Tensor&, const Tensor&) override {}
    void backward(const LayerCtx&, const Tensor&, const Tensor&, const Tensor&) override {}
    double core_flops_per_token(int64_t) const override { return 0; }
  } layer;
  LayerCtx c;
  try {
    layer.make_decode_cache(c, 8);
    ADD_FAILURE() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not implemented for this attention variant"), std::string::npos) << e.what();
  }
  // on a CUDA model or with no positions: refused with the reason
  Model m(tiny("mha"), DType::F32, Device::CPU);
  EXPECT_THROW(m.start_decode(0), Error);
}

TEST(Sample, GreedyTopKTopPAndSeeds) {
  const std::vector<double> logits = {0.1, 2.0, 2.0, -1.0, 1.5};
  Rng r(1);
  EXPECT_EQ(sample_token(logits, 0.0, 0, 1.0, r), 1);  // greedy: the lower id of a tie
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(sample_token(logits, 5.0, 1, 1.0, r), 1);       // top-k 1 is greedy at any temperature
    EXPECT_EQ(sample_token(logits, 1.0, 0, 1e-9, r), 1);      // a tiny nucleus: the most likely token
    const int32_t t = sample_token(logits, 1.0, 3, 1.0, r);  // top-3: ids 1, 2, 4
    EXPECT_TRUE(t == 1 || t == 2 || t == 4) << t;
  }
  // temperature 1: frequencies follow the softmax (20000 draws, 4σ bands)
  std::map<int32_t, int> n;
  Rng s(2);
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) n[sample_token(logits, 1.0, 0, 1.0, s)]++;
  double z = 0;
  for (double l : logits) z += std::exp(l);
  for (int32_t id = 0; id < 5; ++id) {
    const double p = std::exp(logits[size_t(id)]) / z, sd = std::sqrt(draws * p * (1 - p));
    EXPECT_NEAR(n[id], draws * p, 4 * sd) << id;
  }
  // top-p 0.6 over probabilities ≈ {0.06, 0.34, 0.34, 0.02, 0.21}: ids 1 and 2 only
  for (int i = 0; i < 200; ++i) {
    const int32_t t = sample_token(logits, 1.0, 0, 0.6, s);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
  // the same seed draws the same tokens
  Rng a(9), b(9);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits, 1.3, 0, 0.9, a), sample_token(logits, 1.3, 0, 0.9, b));
}

}  // namespace
}  // namespace dmat
