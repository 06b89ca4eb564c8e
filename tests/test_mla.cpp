// Multi-head Latent Attention (model.attention.type "mla", src/model/attention_mla.cpp) on the CPU:
// the layer's forward against a naive reference written here from the definition, Hugging Face
// DeepSeek-V3 parameter names and shapes, parameter and FLOP counts against a hand count (and what
// `dmatrain info` prints), the config's rules, and a tiny model training through the CLI with a
// bit-exact resume. (The fp64 finite-difference check of the whole model is in test_model.cpp, the
// PyTorch oracle in test_oracle.cpp, the op's own checks in test_ops_mla.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
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
#include "train/trainer.h"

namespace dmat {
namespace {

using Vec = std::vector<double>;

ModelConfig mla_config(int64_t q_rank) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 3;
  c.n_kv_heads = 3;
  c.head_dim = 8;
  c.ffn_dim = 20;
  c.rope_theta = 1000.0;
  c.attention.type = "mla";
  c.attention.mla = {.kv_rank = 5, .q_rank = q_rank, .rope_dim = 4, .nope_dim = 6, .v_dim = 3};
  return c;
}

// ---- the layer against its definition ----------------------------------------------------------

Vec matvec(const Vec& W, int64_t rows, int64_t cols, const double* x) {  // W [rows, cols] · x
  Vec y(size_t(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[size_t(r)] += W[size_t(r * cols + c)] * x[c];
  return y;
}

Vec rms_norm(const Vec& x, const Vec& g, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * g[i];
  return y;
}

// rotate-half RoPE of the R values at p, position t: pair (i, i + R/2) by t·theta^(−2i/R)
void rope(double* p, int64_t R, int64_t t, double theta) {
  for (int64_t i = 0; i < R / 2; ++i) {
    const double a = double(t) * std::pow(theta, -2.0 * double(i) / double(R));
    const double x1 = p[i], x2 = p[i + R / 2];
    p[i] = x1 * std::cos(a) - x2 * std::sin(a);
    p[i + R / 2] = x2 * std::cos(a) + x1 * std::sin(a);
  }
}

// out [B·T, d] of MLA on x [B·T, d], token by token and head by head (README "MLA").
Vec naive_mla(const Vec& x, std::map<std::string, Vec>& W, const ModelConfig& m, int64_t B, int64_t T) {
  const auto& a = m.attention.mla;
  const int64_t D = m.d_model, H = m.n_heads, C = a.kv_rank, R = a.rope_dim, P = a.nope_dim, Dv = a.v_dim,
                Dqk = P + R, N = B * T;
  std::vector<Vec> q(static_cast<size_t>(N)), k(static_cast<size_t>(N)), v(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    const double* xn = x.data() + n * D;
    const int64_t t = n % T;
    Vec qn = a.q_rank == 0 ? matvec(W["q_proj.weight"], H * Dqk, D, xn)
                           : matvec(W["q_b_proj.weight"], H * Dqk, a.q_rank,
                                    rms_norm(matvec(W["q_a_proj.weight"], a.q_rank, D, xn),
                                             W["q_a_layernorm.weight"], m.norm_eps)
                                        .data());
    const Vec ckv = matvec(W["kv_a_proj_with_mqa.weight"], C + R, D, xn);
    const Vec c = rms_norm(Vec(ckv.begin(), ckv.begin() + C), W["kv_a_layernorm.weight"], m.norm_eps);
    Vec kr(ckv.begin() + C, ckv.end());
    rope(kr.data(), R, t, m.rope_theta);
    const Vec kv = matvec(W["kv_b_proj.weight"], H * (P + Dv), C, c.data());
    for (int64_t h = 0; h < H; ++h) {
      rope(qn.data() + h * Dqk + P, R, t, m.rope_theta);
      for (int64_t i = 0; i < P; ++i) k[size_t(n)].push_back(kv[size_t(h * (P + Dv) + i)]);
      for (int64_t i = 0; i < R; ++i) k[size_t(n)].push_back(kr[size_t(i)]);
      for (int64_t i = 0; i < Dv; ++i) v[size_t(n)].push_back(kv[size_t(h * (P + Dv) + P + i)]);
    }
    q[size_t(n)] = qn;
  }
  Vec out(size_t(N * D), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = b * T + i;
      Vec o(size_t(H * Dv), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        std::vector<double> s(size_t(i + 1));
        double mx = -1e300, z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < Dqk; ++e) dot += q[size_t(n)][size_t(h * Dqk + e)] * k[size_t(b * T + j)][size_t(h * Dqk + e)];
          s[size_t(j)] = dot / std::sqrt(double(Dqk));
          mx = std::max(mx, s[size_t(j)]);
        }
        for (auto& e : s) z += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t e = 0; e < Dv; ++e) o[size_t(h * Dv + e)] += s[size_t(j)] / z * v[size_t(b * T + j)][size_t(h * Dv + e)];
      }
      const Vec y = matvec(W["o_proj.weight"], D, H * Dv, o.data());
      std::copy(y.begin(), y.end(), out.begin() + n * D);
    }
  return out;
}

TEST(MlaLayer, ForwardMatchesANaiveReference) {
  for (int64_t q_rank : {0, 7}) {
    const ModelConfig m = mla_config(q_rank);
    const int64_t B = 2, T = 6, N = B * T;
    auto attn = make_attention(m);
    ParamTable pt;
    attn->declare_params(pt, "");
    Arena params(pt.table(), DType::F64, Device::CPU), grads(pt.table(), DType::F64, Device::CPU);
    TensorTable at;
    attn->declare_acts(at, "attn.", B, T);
    Arena acts(at, DType::F64, Device::CPU);
    Rng r(31 + uint64_t(q_rank));
    std::map<std::string, Vec> W;
    for (size_t i = 0; i < pt.info().size(); ++i) {
      Tensor t = params.get(int(i));
      const bool gain = pt.info()[i].init == Init::Ones;
      for (int64_t j = 0; j < t.numel(); ++j) t.as<double>()[j] = gain ? 1.0 + 0.3 * r.normal() : 0.5 * r.normal();
      W[pt.info()[i].name] = Vec(t.as<double>(), t.as<double>() + t.numel());
    }
    Vec x(size_t(N * m.d_model)), out(x.size());
    for (auto& e : x) e = r.normal();
    LayerCtx c;
    c.params = &params;
    c.grads = &grads;
    c.acts = &acts;
    c.B = B;
    c.T = T;
    attn->forward(c, Tensor{x.data(), Shape{N, m.d_model}, DType::F64}, Tensor{out.data(), Shape{N, m.d_model}, DType::F64});
    const Vec want = naive_mla(x, W, m, B, T);
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) num += (out[i] - want[i]) * (out[i] - want[i]), den += want[i] * want[i];
    EXPECT_LT(std::sqrt(num / den), 1e-12) << "q_rank " << q_rank;
    EXPECT_GT(den, 0.0);
  }
}

TEST(MlaLayer, DimsAndHuggingFaceDeepseekV3ParameterNames) {
  const ModelConfig m = mla_config(0);
  const AttentionDims d = make_attention(m)->dims();
  EXPECT_EQ(d.d_qk, 10);
  EXPECT_EQ(d.d_v, 3);
  EXPECT_EQ(d.rope_dim, 4);
  auto layer = [](const ModelConfig& c) {
    std::vector<std::pair<std::string, Shape>> v;
    const ParamTable t = Model::declare_params(c);
    for (const auto& p : t.info())
      if (p.name.rfind("model.layers.1.self_attn.", 0) == 0) v.push_back({p.name.substr(25), p.shape});
    return v;
  };
  // kv_a_proj_with_mqa [d_c + R, d]; kv_b_proj [H·(nope + Dv), d_c]; q_proj [H·(nope + R), d]
  const std::vector<std::pair<std::string, Shape>> plain = {{"q_proj.weight", {30, 16}},
                                                            {"kv_a_proj_with_mqa.weight", {9, 16}},
                                                            {"kv_a_layernorm.weight", {5}},
                                                            {"kv_b_proj.weight", {27, 5}},
                                                            {"o_proj.weight", {16, 9}}};
  EXPECT_EQ(layer(m), plain);
  const std::vector<std::pair<std::string, Shape>> compressed = {{"q_a_proj.weight", {7, 16}},
                                                                 {"q_a_layernorm.weight", {7}},
                                                                 {"q_b_proj.weight", {30, 7}},
                                                                 {"kv_a_proj_with_mqa.weight", {9, 16}},
                                                                 {"kv_a_layernorm.weight", {5}},
                                                                 {"kv_b_proj.weight", {27, 5}},
                                                                 {"o_proj.weight", {16, 9}}};
  EXPECT_EQ(layer(mla_config(7)), compressed);
  const ParamTable compressed_table = Model::declare_params(mla_config(7));
  for (const auto& p : compressed_table.info()) {
    if (p.name.find("layernorm") != std::string::npos) {
      EXPECT_EQ(p.init, Init::Ones) << p.name;
      EXPECT_FALSE(p.decay) << p.name;
      EXPECT_EQ(p.group, "norm") << p.name;
    }
    if (p.name.find("o_proj") != std::string::npos) EXPECT_DOUBLE_EQ(p.std, 0.02 / std::sqrt(4.0)) << p.name;
  }
}

// Recomputation re-runs the layer's forward before its backward; the scratch it shares across
// layers (kv, the rotary key, their gradients) is rewritten in between: same bits either way.
TEST(MlaLayer, RecomputationGivesBitIdenticalGradients) {
  ModelConfig m = mla_config(7);
  m.n_layers = 3;
  std::vector<int32_t> x(22), y(22);
  Rng g(6);
  for (auto& t : x) t = int32_t(g.below(11));
  for (auto& t : y) t = int32_t(g.below(11));
  test::expect_recomputation_bit_identical(m, x, y, 2, 11);
}

// ---- counts: parameters by Hugging Face's DeepSeek-V3 layout, FLOPs by DeepSeek's accounting -----

TEST(MlaCounts, Paper80mMatchesHandCount) {
  const Config cfg = load_config(test::source_dir() + "/configs/paper-80m-mla.json");
  const ModelConfig& m = cfg.model;
  ASSERT_EQ(m.attention.type, "mla");
  const int64_t V = 32768, D = 768, L = 12, H = 6, C = 192, R = 64, P = 128, Dv = 128, F = 2304, T = 2048;
  const int64_t attn = H * (P + R) * D    // q_proj
                       + (C + R) * D      // kv_a_proj_with_mqa
                       + H * (P + Dv) * C // kv_b_proj
                       + D * H * Dv;      // o_proj
  EXPECT_EQ(attn, 1966080);
  const int64_t norms = 2 * D + C;  // input/post-attention layernorms, kv_a_layernorm
  const int64_t per_layer = attn + 3 * D * F + norms;
  EXPECT_EQ(per_layer, 7276224);
  const int64_t total = 2 * V * D + L * per_layer + D;
  EXPECT_EQ(total, 137647104);
  ModelCounts c = count_model(m, T);
  EXPECT_EQ(c.total, total);
  EXPECT_EQ(c.non_embedding, L * per_layer + D);
  EXPECT_EQ(c.by_group["attention"], L * attn);
  EXPECT_EQ(c.by_group["norm"], L * norms + D);
  // 6·N + 3·L·T·H·(d_qk + d_v): the causal core at its own widths (192 for scores, 128 for values)
  const double flops = 6.0 * double(total) + 3.0 * double(L * T * H * (P + R + Dv));
  EXPECT_DOUBLE_EQ(flops, 967440384.0);
  EXPECT_DOUBLE_EQ(c.flops_per_token, flops);
  // executed: every weight but the embedding 6 FLOPs per token, plus the core with (T+1)/2 keys
  EXPECT_DOUBLE_EQ(c.matmul_flops_per_token,
                   6.0 * double(L * per_layer + D + V * D) + 3.0 * double(L) * 2.0 * H * (P + R + Dv) * (T + 1) / 2.0);

  auto r = test::run(test::dmatrain_bin() + " info " + test::source_dir() + "/configs/paper-80m-mla.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("137647104"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("9.6744e+08"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("attention mla (kv_rank 192, nope_dim 128, q_rank 0, rope_dim 64, v_dim 128)"),
            std::string::npos)
      << r.out;

  // the 200M shape: d_c 256 of d 1024, 8 heads, 16 layers
  ModelCounts c200 = count_model(load_config(test::source_dir() + "/configs/paper-200m-mla.json").model, T);
  const int64_t attn200 = 8 * 192 * 1024 + 320 * 1024 + 8 * 256 * 256 + 1024 * 8 * 128;
  EXPECT_EQ(c200.by_group["attention"], 16 * attn200);
  EXPECT_EQ(c200.total, 2 * V * 1024 + 16 * (attn200 + 3 * 1024 * 3072 + 2 * 1024 + 256) + 1024);
}

// ---- config ------------------------------------------------------------------------------------

std::string config_error(const nlohmann::json& model) {
  try {
    parse_config({{"model", model}, {"data", {{"train", "x"}, {"val", "y"}}}});
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(MlaConfig, DefaultsResolveAndBadInputIsNamed) {
  const Config c = parse_config({{"model", {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "mla"}, {"kv_rank", 16}}}}},
                                 {"data", {{"train", "x"}, {"val", "y"}}}});
  const MlaConfig& a = c.model.attention.mla;
  EXPECT_EQ(a.kv_rank, 16);
  EXPECT_EQ(a.q_rank, 0);
  EXPECT_EQ(a.rope_dim, 64);
  EXPECT_EQ(a.nope_dim, 32);  // model.head_dim
  EXPECT_EQ(a.v_dim, 32);
  EXPECT_EQ(c.resolved["model"]["attention"],
            nlohmann::json({{"type", "mla"}, {"kv_rank", 16}, {"q_rank", 0}, {"rope_dim", 64}, {"nope_dim", 32}, {"v_dim", 32}}));

  const nlohmann::json base = {{"d_model", 64}, {"n_heads", 2}};
  auto with = [&](nlohmann::json attention, nlohmann::json model = nlohmann::json::object()) {
    nlohmann::json m = base;
    m.update(model);
    m["attention"] = attention;
    return config_error(m);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {with({{"type", "mla"}}), "model.attention.kv_rank must be in 1 … model.d_model = 64 for attention type mla"},
      {with({{"type", "mla"}, {"kv_rank", 65}}), "(got 65)"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"q_rank", -1}}), "model.attention.q_rank must be in 0 … model.d_model = 64"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"rope_dim", 7}}), "model.attention.rope_dim must be even and >= 2 (RoPE"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"rope_dim", 0}}), "model.attention.rope_dim must be even and >= 2"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"v_dim", -2}}), "model.attention.v_dim must be >= 0"},
      {with({{"type", "mla"}, {"kv_rank", 8}}, {{"qk_norm", true}}), "model.qk_norm must be false for attention type mla"},
      // MLA's options on another variant, and another variant's on MLA
      {with({{"type", "mha"}, {"kv_rank", 8}}), "model.attention.kv_rank must be absent for attention type mha (only mla has it"},
      {with({{"type", "swa"}, {"window", 4}, {"rope_dim", 64}}), "model.attention.rope_dim must be absent for attention type swa"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"window", 4}}),
       "model.attention.window must be absent for attention type mla (only swa, dma, nsa have it; got 4); the keys of mla: "
       "type, kv_rank, q_rank, rope_dim, nope_dim, v_dim"},
      {with({{"type", "mla"}, {"kv_rank", 8}, {"kv_rnak", 4}}), "did you mean model.attention.kv_rank?"},
  };
  for (const auto& [got, want] : cases) EXPECT_NE(got.find(want), std::string::npos) << got << "\n  wanted: " << want;
}

// On the CUDA backend the core's (d_qk, d_v) must be a pair of kernels/cuda/head_dims.h: refused
// before a run starts (no GPU needed to be refused).
TEST(MlaConfig, HeadDimsWithoutACudaKernelAreRefusedForCuda) {
  auto cfg = [](int64_t nope, int64_t rope, int64_t v) {
    return parse_config({{"model",
                          {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "mla"}, {"kv_rank", 16}, {"nope_dim", nope},
                                                                           {"rope_dim", rope}, {"v_dim", v}}}}},
                         {"data", {{"train", "x"}, {"val", "y"}}}});
  };
  EXPECT_NO_THROW(check_device_support(cfg(128, 64, 128), Device::CUDA));  // 192/128
  EXPECT_NO_THROW(check_device_support(cfg(64, 64, 128), Device::CUDA));   // 128/128
  try {
    check_device_support(cfg(96, 64, 128), Device::CUDA);
    FAIL() << "160/128 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config: model.attention.nope_dim + rope_dim = 96 + 64 (q·k dims) with "
                                         "model.attention.v_dim = 128 has no CUDA attention kernel for attention type "
                                         "mla (d_qk/d_v pairs: 32/32, 64/64, 128/128, 192/128"),
              std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(check_device_support(cfg(96, 64, 128), Device::CPU));  // the CPU runs any dims
}

// ---- end to end through the CLI ------------------------------------------------------------------

std::vector<double> metric(const std::string& path, const char* key) {
  std::vector<double> v;
  for (auto& row : test::read_jsonl(path))
    if (row.contains(key)) v.push_back(row[key].get<double>());
  return v;
}

// The tiny config with MLA (latent rank 32 of d 128, 16 rotary + 32 nope dims, query compression):
// the loss falls, and stopping at step 10 then resuming gives the same losses and weights, bit for
// bit. A config that leaves kv_rank out is refused before the run directory exists.
TEST(MlaTrain, TinyModelLearnsAndResumesBitExactlyOnCpu) {
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("mla_train"), bin = test::dmatrain_bin();
  const std::string base = " train " + test::source_dir() + "/configs/tiny.json --set run.threads=2 --set run.device=cpu" +
                           test::prepare_bundled_data(dir) + " --set model.n_kv_heads=0";
  const std::string mla = R"( --set 'model.attention={"type":"mla","kv_rank":32,"rope_dim":16,"q_rank":48}')";
  const std::string run = " --set train.steps=20 --set train.batch_size=4 --set run.log_interval=1" +
                          std::string(" --set train.eval_interval=20 --set train.eval_batches=2");

  auto bad = test::run(bin + base + R"( --set 'model.attention={"type":"mla"}')" + run + " --out " + dir + "/bad");
  EXPECT_EQ(bad.rc, 1) << bad.out;
  EXPECT_NE(bad.out.find("model.attention.kv_rank must be in 1"), std::string::npos) << bad.out;
  EXPECT_FALSE(fs::exists(dir + "/bad")) << "the run directory was created";

  auto a = test::run(bin + base + mla + run + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  auto b = test::run(bin + base + mla + run + " --out " + dir + "/b --stop-at 10");
  ASSERT_EQ(b.rc, 0) << b.out;
  b = test::run(bin + base + mla + run + " --out " + dir + "/b --resume");
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
