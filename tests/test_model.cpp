// Whole-model tests: gradient check of the full model in fp64 against central finite differences,
// determinism of initialisation and forward, and parameter / FLOP counts against hand counts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "model/model.h"
#include "ops/ops.h"
#include "test_gradcheck.h"
#include "test_util.h"
#include "test_model_util.h"
#include "train/info.h"

namespace dmat {
namespace {

ModelConfig tiny_model() {
  ModelConfig m;
  m.vocab_size = 11;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 6;  // H·Dh = 24 ≠ d_model
  m.ffn_dim = 20;
  m.qk_norm = true;
  m.residual_scale = true;
  m.init_std = 0.4;  // large enough that every path carries gradient
  return m;
}

// Random values for every parameter (norm gains and residual scales away from 1, so their
// gradients are exercised in general position).
void randomize(Model& m, uint64_t seed) {
  Rng r(seed);
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    Tensor t = m.params().get(int(i));
    double* p = t.as<double>();
    for (int64_t j = 0; j < t.numel(); ++j)
      p[j] = info[i].init == Init::Normal ? 0.4 * r.normal() : 1.0 + 0.3 * (2 * r.uniform() - 1);
  }
}

struct Batch {
  std::vector<int32_t> x, y;
};

Batch random_batch(const ModelConfig& m, int64_t B, int64_t T, uint64_t seed) {
  Batch b;
  Rng r(seed);
  for (int64_t i = 0; i < B * T; ++i) {
    b.x.push_back(int32_t(r.below(m.vocab_size)));
    b.y.push_back(int32_t(r.below(m.vocab_size)));
  }
  b.y[3] = -1;  // an ignored position
  return b;
}

// distinct_tokens: no token repeats within a sequence (T <= vocab_size). DMA needs it: a run of equal tokens at the
// start of a sequence gives positions whose states are equal in exact arithmetic but differ by
// rounding, so their biases tie only up to rounding and a finite-difference step reorders them.
void check_model_gradient(const ModelConfig& cfg, uint64_t seed, bool distinct_tokens = false, int64_t T = 7) {
  const int64_t B = 2;
  Model m(cfg, DType::F64);
  randomize(m, seed);
  Batch b = random_batch(cfg, B, T, seed + 1);
  if (distinct_tokens) {
    Rng r(seed + 2);
    for (int64_t s = 0; s < B; ++s) {
      std::vector<int32_t> perm(size_t(cfg.vocab_size));
      for (size_t i = 0; i < perm.size(); ++i) perm[i] = int32_t(i);
      for (size_t i = perm.size() - 1; i > 0; --i) std::swap(perm[i], perm[r.below(i + 1)]);
      std::copy(perm.begin(), perm.begin() + T, b.x.begin() + s * T);
    }
  }
  m.zero_grad();
  m.forward(b.x.data(), b.y.data(), B, T, 1.0);
  m.backward();
  // Central differences of L = Σ loss, coordinate by coordinate, on every parameter. One thread, as
  // test::numeric_grad: ~10^4 forwards of a tiny model, which the parallel regions' synchronisation
  // would dominate on a busy second core; the analytic side above ran with the default thread count.
  test::ThreadCountGuard guard;
  omp_set_num_threads(1);
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    Tensor p = m.params().get(int(i));
    const double* g = m.grads().get(int(i)).as<double>();
    double num = 0, den = 0;
    for (int64_t j = 0; j < p.numel(); ++j) {
      double& w = p.as<double>()[j];
      const double w0 = w, h = 1e-5 * std::max(1.0, std::abs(w0));
      w = w0 + h;
      const double lp = m.forward(b.x.data(), b.y.data(), B, T, 0.0);
      w = w0 - h;
      const double lm = m.forward(b.x.data(), b.y.data(), B, T, 0.0);
      w = w0;
      const double fd = (lp - lm) / (2 * h);
      num += (g[j] - fd) * (g[j] - fd);
      den += fd * fd;
    }
    const double rel = std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
    EXPECT_LT(rel, 1e-6) << info[i].name << " (|fd| = " << std::sqrt(den) << ")";
    EXPECT_GT(den, 0.0) << info[i].name << " gets no gradient at all";
  }
}

TEST(Model, GradientCheckGqaQkNormResidualScale) { check_model_gradient(tiny_model(), 101); }

TEST(Model, GradientCheckTiedMhaPlain) {
  ModelConfig c = tiny_model();
  c.tie_embeddings = true;
  c.qk_norm = false;
  c.residual_scale = false;
  c.n_kv_heads = 4;
  check_model_gradient(c, 202);
}

// One GEMM per projection: F·d = 288 and Hkv·Dh·d = 96 are not multiples of the arena's
// alignment, so gate/up and q/k/v are not adjacent and take the unpacked path (the other checks,
// with F·d = 320 and H·Dh·d = 384 and without QK-norm, take the packed one).
TEST(Model, GradientCheckUnpackedProjections) {
  ModelConfig c = tiny_model();
  c.ffn_dim = 18;
  c.qk_norm = false;
  c.n_kv_heads = 1;
  check_model_gradient(c, 250);
}

TEST(Model, GradientCheckSlidingWindow) {
  ModelConfig c = tiny_model();
  c.attention.type = "swa";
  c.attention.swa.window = 3;
  c.n_kv_heads = 1;
  check_model_gradient(c, 303);
}

TEST(Model, InitIsDeterministicAndSeedDependent) {
  ModelConfig c = tiny_model();
  Model a(c), b(c), d(c);
  a.init_weights(7);
  b.init_weights(7);
  d.init_weights(8);
  const Tensor fa = a.params().flat(), fb = b.params().flat(), fd = d.params().flat();
  EXPECT_EQ(0, std::memcmp(fa.data, fb.data, fa.bytes()));
  EXPECT_NE(0, std::memcmp(fa.data, fd.data, fa.bytes()));
  // norms start at one, weights at the configured spread
  const auto& info = a.param_info();
  for (size_t i = 0; i < info.size(); ++i) {
    Tensor t = a.params().get(int(i));
    const float* p = t.as<float>();
    if (info[i].init == Init::Ones) {
      for (int64_t j = 0; j < t.numel(); ++j) ASSERT_EQ(p[j], 1.0f) << info[i].name;
    } else {
      double ss = 0;
      for (int64_t j = 0; j < t.numel(); ++j) ss += double(p[j]) * p[j];
      const double sd = std::sqrt(ss / double(t.numel()));
      EXPECT_NEAR(sd, info[i].std, 0.35 * info[i].std) << info[i].name;
    }
  }
}

TEST(Model, ForwardIsBitwiseRepeatable) {
  ModelConfig c = tiny_model();
  Model m(c);
  m.init_weights(3);
  Batch b = random_batch(c, 3, 9, 4);
  const double l1 = m.forward(b.x.data(), b.y.data(), 3, 9, 1.0 / 26);
  m.backward();
  std::vector<float> g1((float*)m.grads().flat().data, (float*)m.grads().flat().data + m.grads().flat().numel());
  m.zero_grad();
  const double l2 = m.forward(b.x.data(), b.y.data(), 3, 9, 1.0 / 26);
  m.backward();
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(0, std::memcmp(g1.data(), m.grads().flat().data, g1.size() * sizeof(float)));
}

// Activation recomputation changes memory, not arithmetic: the same ops on the same inputs, so
// loss and every gradient are bit-identical to the stored-activation run (here with QK-norm,
// residual scales and GQA, so every saved activation of a block is recomputed).
TEST(Model, RecomputationGivesBitIdenticalGradients) {
  ModelConfig c = tiny_model();
  c.n_layers = 3;
  c.qk_norm = true;
  c.residual_scale = true;
  Batch b = random_batch(c, 2, 11, 6);
  test::expect_recomputation_bit_identical(c, b.x, b.y, 2, 11);
  // and it does save memory: one block's activations instead of three
  EXPECT_LT(Model::activation_bytes(c, 2, 11, DType::F32, true), Model::activation_bytes(c, 2, 11, DType::F32, false));
}

TEST(Model, RejectsTokensOutsideVocabulary) {
  ModelConfig c = tiny_model();
  Model m(c);
  std::vector<int32_t> x(4, 1), y(4, 1);
  x[2] = 11;
  try {
    m.forward(x.data(), y.data(), 1, 4, 0.0);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("input token 11 at position 2"), std::string::npos) << e.what();
  }
}

// The paper's 80M shape, counted by hand from its definition.
TEST(Model, Paper80mCountsMatchHandCount) {
  ModelConfig m;
  m.vocab_size = 32768;
  m.d_model = 768;
  m.n_layers = 12;
  m.n_heads = 6;
  m.n_kv_heads = 3;
  m.head_dim = 128;
  m.ffn_dim = 2304;
  const int64_t V = 32768, D = 768, L = 12, Hq = 6 * 128, Hk = 3 * 128, F = 2304, T = 2048;
  const int64_t attn = D * Hq + 2 * D * Hk + Hq * D;  // q, k, v, o
  const int64_t mlp = 3 * D * F;
  const int64_t norms = 2 * D;
  const int64_t per_layer = attn + mlp + norms;
  EXPECT_EQ(per_layer, 7079424);
  const int64_t total = V * D /*embedding*/ + L * per_layer + D /*final norm*/ + V * D /*head*/;
  EXPECT_EQ(total, 135285504);
  ModelCounts c = count_model(m, T);
  EXPECT_EQ(c.total, total);
  EXPECT_EQ(c.non_embedding, L * per_layer + D);
  EXPECT_EQ(c.by_group["attention"], L * attn);
  EXPECT_EQ(c.by_group["mlp"], L * mlp);
  EXPECT_EQ(c.by_group["norm"], L * norms + D);
  EXPECT_EQ(c.by_group["embedding"], V * D);
  EXPECT_EQ(c.by_group["head"], V * D);
  EXPECT_DOUBLE_EQ(c.flops_per_token, 6.0 * 135285504 + 6.0 * 12 * 2048 * 768);  // 924,959,232

  // ... and the CLI prints the same figures.
  auto r = test::run(test::dmatrain_bin() + " info " + test::source_dir() + "/configs/paper-80m.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("135285504"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("84953856"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("9.24959e+08"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("with ZeRO-1 (train.zero: 1), per GPU"), std::string::npos) << r.out;

  // ZeRO-1 on n ranks keeps 1/n of the two fp32 moments per GPU: 8·(1 − 1/n) bytes per parameter
  // saved (the padded arena; measured on 2 H200s: 516 MiB for this model, predicted 0.504 GiB)
  Config cfg;
  cfg.model = m;
  cfg.train.batch_size = 16;
  cfg.train.seq_len = T;
  const int64_t padded = Model::declare_params(m).table().total_elements();
  const MemoryEstimate one = estimate_memory(cfg, Device::CUDA);
  cfg.train.zero = 1;
  EXPECT_EQ(estimate_memory(cfg, Device::CUDA, 1).total(), one.total());
  EXPECT_EQ(one.total() - estimate_memory(cfg, Device::CUDA, 2).total(), 8 * padded - 8 * ((padded + 1) / 2));
  EXPECT_EQ(one.total() - estimate_memory(cfg, Device::CUDA, 4).total(), 8 * padded - 8 * ((padded + 3) / 4));
}

// Dynamic Mask Attention as Doge uses it (QK-norm, residual scales), with w < T so the top-w
// selection is active (randomize() moves A off 0, so the biases differ and most queries drop keys).
TEST(Model, GradientCheckDynamicMaskAttention) {
  ModelConfig c = tiny_model();
  c.attention.type = "dma";
  c.attention.dma.window = 3;
  check_model_gradient(c, 404, true);
}

TEST(Model, GradientCheckDynamicMaskAttentionLinearBiasGqa4) {
  ModelConfig c = tiny_model();
  c.attention.type = "dma";
  c.attention.dma.window = 2;
  c.attention.dma.bias_form = "linear";
  c.n_kv_heads = 1;
  c.qk_norm = false;
  check_model_gradient(c, 505, true);
}

// Our extension: a local window of 2 recent keys besides the top-2 of the keys before them.
TEST(Model, GradientCheckDynamicMaskAttentionLocalWindow) {
  ModelConfig c = tiny_model();
  c.attention.type = "dma";
  c.attention.dma.window = 2;
  c.attention.dma.local_window = 2;
  check_model_gradient(c, 808, true);
}

// Multi-head Latent Attention (DeepSeek-V2/V3): GQA-free, d_qk = nope + rope = 10 ≠ d_v = 4, a latent
// of rank 6 < d_model; without and with query compression (q_a_proj, q_a_layernorm, q_b_proj).
ModelConfig mla_model(int64_t q_rank) {
  ModelConfig c = tiny_model();
  c.n_kv_heads = c.n_heads;
  c.qk_norm = false;
  c.attention.type = "mla";
  c.attention.mla.kv_rank = 6;
  c.attention.mla.q_rank = q_rank;
  c.attention.mla.rope_dim = 4;
  c.attention.mla.nope_dim = 6;
  c.attention.mla.v_dim = 4;
  return c;
}

TEST(Model, GradientCheckMultiHeadLatentAttention) { check_model_gradient(mla_model(0), 606); }
TEST(Model, GradientCheckMultiHeadLatentAttentionQueryCompression) { check_model_gradient(mla_model(5), 707); }

// Native Sparse Attention (GQA 4/2): compression blocks of 2 at stride 1, selection blocks of 2,
// 4 selected, a window of 2, T = 11: query 0 sees no compressed block, the window drops keys from
// t = 2 on, and from t = 8 on the ranking picks 1 of the blocks between the first and the 2 most
// recent. Through the gates, the compression MLPs and their position embeddings, every projection.
// Distinct tokens: repeated ones make equal blocks, whose importances tie only up to rounding, and a
// finite-difference step could then flip the selection.
ModelConfig nsa_model() {
  ModelConfig c = tiny_model();
  c.qk_norm = false;
  c.vocab_size = 13;
  c.attention.type = "nsa";
  c.attention.nsa = {.cmp_block = 2, .cmp_stride = 1, .sel_block = 2, .sel_count = 4, .window = 2, .cmp_hidden = 3};
  return c;
}

TEST(Model, GradientCheckNativeSparseAttention) { check_model_gradient(nsa_model(), 909, true, 11); }

// MQA, l' = 2l (a selection block's importance sums 4 strides of compression blocks 2 strides long),
// the ranking active from t = 16 on (T = 20).
TEST(Model, GradientCheckNativeSparseAttentionMqa) {
  ModelConfig c = nsa_model();
  c.n_kv_heads = 1;
  c.vocab_size = 23;
  c.attention.nsa = {.cmp_block = 2, .cmp_stride = 1, .sel_block = 4, .sel_count = 4, .window = 3, .cmp_hidden = 4};
  check_model_gradient(c, 910, true, 20);
}

}  // namespace
}  // namespace dmat
