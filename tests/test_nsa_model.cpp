// Native Sparse Attention in the model (model.attention.type "nsa", src/model/attention_nsa.cpp) on
// the CPU: the config's rules and defaults, the parameter names and shapes, parameter and FLOP
// counts against a hand count (and what `dmatrain info` prints), recomputation, and a tiny model
// training through the CLI with a bit-exact resume. (The layer against the CPU reference ops is in
// test_nsa.cpp, the fp64 finite-difference check of the whole model in test_model.cpp, the PyTorch
// oracle of the whole model in test_oracle.cpp, the CUDA refusal in test_attention_dims.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "core/rng.h"
#include "model/attention.h"
#include "model/model.h"
#include "test_util.h"
#include "test_model_util.h"
#include "train/info.h"

namespace dmat {
namespace {

std::string config_error(const nlohmann::json& model) {
  try {
    parse_config({{"model", model}, {"data", {{"train", "x"}, {"val", "y"}}}});
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- config ------------------------------------------------------------------------------------

TEST(NsaConfig, DefaultsResolveAndBadInputIsNamed) {
  const Config c = parse_config({{"model", {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "nsa"}}}}},
                                 {"data", {{"train", "x"}, {"val", "y"}}}});
  const NsaConfig& a = c.model.attention.nsa;
  EXPECT_EQ(a.cmp_block, 32);
  EXPECT_EQ(a.cmp_stride, 16);
  EXPECT_EQ(a.sel_block, 64);
  EXPECT_EQ(a.sel_count, 16);
  EXPECT_EQ(a.window, 512);
  EXPECT_EQ(a.cmp_hidden, 32);  // model.head_dim
  EXPECT_EQ(c.resolved["model"]["attention"],
            nlohmann::json({{"type", "nsa"}, {"cmp_block", 32}, {"cmp_stride", 16}, {"sel_block", 64},
                            {"sel_count", 16}, {"window", 512}, {"cmp_hidden", 32}}));

  auto with = [&](nlohmann::json attention, nlohmann::json model = nlohmann::json::object()) {
    nlohmann::json m = {{"d_model", 64}, {"n_heads", 2}};
    m.update(model);
    attention["type"] = "nsa";
    m["attention"] = attention;
    return config_error(m);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {with({{"cmp_stride", 0}}), "model.attention.cmp_stride must be >= 1 for attention type nsa (the compression "
                                  "stride d) (got 0)"},
      {with({{"cmp_block", 24}}), "model.attention.cmp_block must be a positive multiple of model.attention.cmp_stride "
                                  "= 16 for attention type nsa"},
      {with({{"cmp_block", 0}}), "model.attention.cmp_block must be a positive multiple"},
      {with({{"sel_block", 40}}), "model.attention.sel_block must be a positive multiple of "
                                  "model.attention.cmp_stride = 16 for attention type nsa"},
      {with({{"sel_count", 2}}), "model.attention.sel_count must be >= 3 for attention type nsa (the first block and "
                                 "the 2 most recent blocks are always selected and count in it) (got 2)"},
      {with({{"window", 0}}), "model.attention.window must be > 0 for attention type nsa"},
      {with({{"cmp_hidden", -1}}), "model.attention.cmp_hidden must be >= 0"},
      {with(nlohmann::json::object(), {{"qk_norm", true}}), "model.qk_norm must be false for attention type nsa"},
      {with({{"sel_cuont", 4}}), "did you mean model.attention.sel_count?"},
      {with({{"kv_rank", 4}}), "model.attention.kv_rank must be absent for attention type nsa (only mla has it"},
      // NSA's options on another variant
      {config_error({{"attention", {{"type", "swa"}, {"window", 4}, {"sel_block", 64}}}}),
       "model.attention.sel_block must be absent for attention type swa (only nsa has it; got 64)"},
  };
  for (const auto& [got, want] : cases) EXPECT_NE(got.find(want), std::string::npos) << got << "\n  wanted: " << want;
  // n_kv_heads applies: a GQA group shares one selection
  EXPECT_NE(config_error({{"n_heads", 4}, {"n_kv_heads", 3}, {"attention", {{"type", "nsa"}}}})
                .find("model.n_kv_heads must divide model.n_heads = 4"),
            std::string::npos);
}

// ---- the layer's parameters -------------------------------------------------------------------

ModelConfig small_nsa() {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.ffn_dim = 20;
  c.attention.type = "nsa";
  c.attention.nsa = {.cmp_block = 4, .cmp_stride = 2, .sel_block = 4, .sel_count = 3, .window = 5, .cmp_hidden = 7};
  return c;
}

TEST(NsaModelLayer, ParameterNamesAndShapes) {
  const ModelConfig m = small_nsa();
  const AttentionDims d = make_attention(m)->dims();
  EXPECT_EQ(d.d_qk, 6);
  EXPECT_EQ(d.d_v, 6);
  EXPECT_EQ(d.rope_dim, 6);
  std::vector<std::pair<std::string, Shape>> got;
  const ParamTable t = Model::declare_params(m);
  for (const auto& p : t.info()) {
    if (p.name.rfind("model.layers.1.self_attn.", 0) != 0) continue;
    got.push_back({p.name.substr(25), p.shape});
    EXPECT_EQ(p.group, "attention") << p.name;
    EXPECT_TRUE(p.decay) << p.name;
    EXPECT_EQ(p.init, Init::Normal) << p.name;
    EXPECT_DOUBLE_EQ(p.std, p.name.find("o_proj") != std::string::npos ? 0.02 / std::sqrt(4.0) : 0.02) << p.name;
  }
  // H·Dh = 24, Hkv·Dh = 12, l = 4, F = 7
  const std::vector<std::pair<std::string, Shape>> want = {
      {"q_proj.weight", {24, 16}},        {"cmp_k_proj.weight", {12, 16}},    {"cmp_v_proj.weight", {12, 16}},
      {"slc_k_proj.weight", {12, 16}},    {"slc_v_proj.weight", {12, 16}},    {"win_k_proj.weight", {12, 16}},
      {"win_v_proj.weight", {12, 16}},    {"cmp_k_mlp.pos_embed", {4, 6}},    {"cmp_k_mlp.fc1.weight", {7, 24}},
      {"cmp_k_mlp.fc2.weight", {6, 7}},   {"cmp_v_mlp.pos_embed", {4, 6}},    {"cmp_v_mlp.fc1.weight", {7, 24}},
      {"cmp_v_mlp.fc2.weight", {6, 7}},   {"g_proj.weight", {12, 16}},        {"o_proj.weight", {16, 24}}};
  EXPECT_EQ(got, want);
  EXPECT_EQ(make_attention(m)->params_not_per_token(), 2 * (4 * 6 + 7 * 24 + 6 * 7));
}

// Recomputation re-runs the layer's forward before its backward; the scratch it shares across layers
// is rewritten in between: the same bits either way.
TEST(NsaModelLayer, RecomputationGivesBitIdenticalGradients) {
  ModelConfig m = small_nsa();
  m.n_layers = 3;
  std::vector<int32_t> x(2 * 13), y(x.size());
  Rng g(6);
  for (auto& t : x) t = int32_t(g.below(11));
  for (auto& t : y) t = int32_t(g.below(11));
  test::expect_recomputation_bit_identical(m, x, y, 2, 13);
}

// ---- counts -------------------------------------------------------------------------------------

// paper-80m-nsa by hand: parameters from the layer's shapes; FLOPs per token from closed-form key
// counts at T = 2048, l = 32, d = 16, l' = 64, n = 16, w = 512:
//   compressed: query t >= 31 sees ⌊(t − 31)/16⌋ + 1 blocks: Σ_{u=0}^{2016} (⌊u/16⌋ + 1)
//               = 16·(1 + … + 126) + 127 = 128,143
//   selected:   per selection block J (64 queries): (min(J + 1, 16) − 1)·64 keys of earlier blocks each,
//               plus 1 … 64 in the own block: Σ_J (min(J + 1, 16) − 1)·4096 + 32·2080,
//               Σ_{J=0}^{31} (min(J + 1, 16) − 1) = (0 + … + 14) + 17·15 = 360: 1,541,120
//   window:     Σ_t min(t + 1, 512) = 512·513/2 + 1536·512 = 917,760
// cores 4·H·Dh·(keys)/T; MLPs once per block (Nc = 127) and KV head: 4·Hkv·F·Dh·(l + 1)·Nc/T.
TEST(NsaCounts, Paper80mMatchesHandCount) {
  const Config cfg = load_config(test::source_dir() + "/configs/paper-80m-nsa.json");
  const ModelConfig& m = cfg.model;
  ASSERT_EQ(m.attention.type, "nsa");
  const int64_t V = 32768, D = 768, L = 12, H = 6, Hkv = 3, Dh = 128, Fm = 2304, T = 2048, l = 32, F = 128;
  const int64_t mlps = 2 * (l * Dh + F * l * Dh + Dh * F);  // pos_embed, fc1, fc2 for keys and values
  EXPECT_EQ(mlps, 1089536);
  const int64_t attn = H * Dh * D          // q_proj
                       + 6 * Hkv * Dh * D  // {cmp,slc,win}_{k,v}_proj
                       + mlps              // compression MLPs
                       + 3 * H * D         // g_proj
                       + D * H * Dh;       // o_proj
  EXPECT_EQ(attn, 4052480);
  const int64_t per_layer = attn + 3 * D * Fm + 2 * D;
  const int64_t total = 2 * V * D + L * per_layer + D;
  EXPECT_EQ(total, 162681600);
  const ModelCounts c = count_model(m, T);
  EXPECT_EQ(c.total, total);
  EXPECT_EQ(c.non_embedding, L * per_layer + D);
  EXPECT_EQ(c.by_group.at("attention"), L * attn);

  const double keys = 128143.0 + 1541120.0 + 917760.0;
  const double cores = 4.0 * H * Dh * keys / T;                // 3,880,534.5
  const double c_cmp = 4.0 * Hkv * F * Dh * (l + 1) * 127 / T;  // 402,336
  EXPECT_DOUBLE_EQ(cores, 3880534.5);
  EXPECT_DOUBLE_EQ(c_cmp, 402336.0);
  // executed: every per-token weight 6 FLOPs per token, the cores and MLPs as run, forward + backward
  const double executed = 6.0 * double(L * per_layer + D - L * mlps + V * D) + 3.0 * L * (cores + c_cmp);
  EXPECT_DOUBLE_EQ(c.matmul_flops_per_token, executed);
  // MFU convention: 6·(N − N_cmp) + L·(6·T·d + 3·C_cmp)
  const double mfu = 6.0 * double(total - L * mlps) + L * (6.0 * T * D + 3.0 * c_cmp);
  EXPECT_DOUBLE_EQ(mfu, 1025373312.0);
  EXPECT_DOUBLE_EQ(c.flops_per_token, mfu);
  EXPECT_EQ(c.flops_convention, "6·(N − N_cmp) + L·(6·T·d + 3·C_cmp)");

  auto r = test::run(test::dmatrain_bin() + " info " + test::source_dir() + "/configs/paper-80m-nsa.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("162681600"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1.02537e+09"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("9.00831e+08  executed matmuls"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("attention nsa (cmp_block 32, cmp_hidden 128, cmp_stride 16, sel_block 64, sel_count 16, "
                       "window 512)"),
            std::string::npos)
      << r.out;

  // the 200M shape: 16 layers of d 1024, 8 / 4 heads
  const ModelCounts c200 = count_model(load_config(test::source_dir() + "/configs/paper-200m-nsa.json").model, T);
  const int64_t attn200 = 8 * 128 * 1024 + 6 * 4 * 128 * 1024 + mlps + 3 * 8 * 1024 + 1024 * 8 * 128;
  EXPECT_EQ(c200.by_group.at("attention"), 16 * attn200);
  EXPECT_EQ(c200.total, 2 * V * 1024 + 16 * (attn200 + 3 * 1024 * 3072 + 2 * 1024) + 1024);
}

// ---- end to end through the CLI ------------------------------------------------------------------

std::vector<double> metric(const std::string& path, const char* key) {
  std::vector<double> v;
  for (auto& row : test::read_jsonl(path))
    if (row.contains(key)) v.push_back(row[key].get<double>());
  return v;
}

// configs/tiny-nsa.json (T = 128: compression blocks of 8 at stride 4, 4 selected blocks of 16, a
// window of 32): the loss falls, and stopping at step 10 then resuming gives the same losses and
// weights, bit for bit. A config breaking NSA's rules is refused before the run directory exists.
TEST(NsaTrain, TinyModelLearnsAndResumesBitExactlyOnCpu) {
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("nsa_train"), bin = test::dmatrain_bin();
  const std::string base = " train " + test::source_dir() + "/configs/tiny-nsa.json --set run.threads=2" +
                           test::prepare_bundled_data(dir);
  const std::string run = " --set train.steps=20 --set train.batch_size=4 --set run.log_interval=1" +
                          std::string(" --set train.eval_interval=20 --set train.eval_batches=2");

  auto bad = test::run(bin + base + " --set model.attention.sel_block=10" + run + " --out " + dir + "/bad");
  EXPECT_EQ(bad.rc, 1) << bad.out;
  EXPECT_NE(bad.out.find("model.attention.sel_block must be a positive multiple of model.attention.cmp_stride = 4"),
            std::string::npos)
      << bad.out;
  EXPECT_FALSE(fs::exists(dir + "/bad")) << "the run directory was created";

  auto a = test::run(bin + base + run + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  auto b = test::run(bin + base + run + " --out " + dir + "/b --stop-at 10");
  ASSERT_EQ(b.rc, 0) << b.out;
  b = test::run(bin + base + run + " --out " + dir + "/b --resume");
  ASSERT_EQ(b.rc, 0) << b.out;

  const auto la = metric(dir + "/a/metrics.jsonl", "loss"), lb = metric(dir + "/b/metrics.jsonl", "loss");
  ASSERT_EQ(la.size(), 20u);
  EXPECT_EQ(la, lb);
  EXPECT_EQ(metric(dir + "/a/metrics.jsonl", "val_loss"), metric(dir + "/b/metrics.jsonl", "val_loss"));
  double first = 0, last = 0;
  for (int i = 0; i < 3; ++i) first += la[size_t(i)] / 3, last += la[la.size() - 1 - size_t(i)] / 3;
  EXPECT_LT(last, first - 0.5) << "the byte model starts near ln 257 = 5.55";
  const std::string ck = "/checkpoints/step_00000020/model.safetensors";
  EXPECT_TRUE(test::file_bytes(dir + "/a" + ck) == test::file_bytes(dir + "/b" + ck)) << "final weights differ";
}

}  // namespace
}  // namespace dmat
