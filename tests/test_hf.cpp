// Hugging Face interop (interop/hf_config.h, interop/hf_convert.h): the config.json written for each
// attention type field by field, the refusals, and through the CLI export → import → export giving
// the same bytes, the imported run evaluating and resuming like the original. Comparing logits with
// transformers itself needs transformers: tests/oracle/hf_parity.py (ctest HfParity, label gpu).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "interop/hf_config.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::run;

// ---- config.json, field by field ----------------------------------------------------------------

ModelConfig model_of(const json& model) {
  return parse_config(json{{"model", model}, {"data", {{"train", "t"}, {"val", "v"}}}}).model;
}

const json kGqa = {{"vocab_size", 300}, {"d_model", 96},  {"n_layers", 3},       {"n_heads", 6},
                   {"n_kv_heads", 2},   {"head_dim", 32}, {"ffn_dim", 256},     {"rope_theta", 500000.0},
                   {"norm_eps", 1e-5},  {"init_std", 0.03}};

json with(json base, const json& extra) {
  base.update(extra);
  return base;
}

std::string refusal(const ModelConfig& m) {
  try {
    to_hf_config(m, HfExtras{64, 256, "float32"});
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(HfConfig, MhaIsLlamaWithEveryFieldOfOurs) {
  const auto j = to_hf_config(model_of(kGqa), HfExtras{128, 299, "bfloat16"});
  EXPECT_EQ(json(j["architectures"]), json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["vocab_size"], 300);
  EXPECT_EQ(j["hidden_size"], 96);
  EXPECT_EQ(j["intermediate_size"], 256);
  EXPECT_EQ(j["num_hidden_layers"], 3);
  EXPECT_EQ(j["num_attention_heads"], 6);
  EXPECT_EQ(j["num_key_value_heads"], 2);
  EXPECT_EQ(j["head_dim"], 32);  // independent of hidden_size / heads (16 here)
  EXPECT_EQ(j["hidden_act"], "silu");
  EXPECT_EQ(j["rms_norm_eps"], 1e-5);
  EXPECT_EQ(j["rope_theta"], 500000.0);
  EXPECT_EQ(json(j["rope_parameters"]), (json{{"rope_type", "default"}, {"rope_theta", 500000.0}}));
  EXPECT_TRUE(j["rope_scaling"].is_null());
  EXPECT_EQ(j["tie_word_embeddings"], false);
  EXPECT_EQ(j["attention_bias"], false);
  EXPECT_EQ(j["mlp_bias"], false);
  EXPECT_EQ(j["max_position_embeddings"], 128);
  EXPECT_EQ(j["initializer_range"], 0.03);
  EXPECT_EQ(j["eos_token_id"], 299);
  EXPECT_EQ(j["bos_token_id"], 299);
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_FALSE(j.contains("sliding_window"));
  EXPECT_EQ(to_hf_config(model_of(with(kGqa, {{"tie_embeddings", true}})), HfExtras{})["tie_word_embeddings"], true);
}

TEST(HfConfig, SwaIsMistralWithTheSameWindow) {
  const auto j = to_hf_config(model_of(with(kGqa, {{"attention", {{"type", "swa"}, {"window", 24}}}})), HfExtras{});
  EXPECT_EQ(json(j["architectures"]), json::array({"MistralForCausalLM"}));
  EXPECT_EQ(j["model_type"], "mistral");
  // transformers' sliding_window_overlay keeps kv_idx > q_idx − sliding_window: keys i−w+1 … i, ours
  EXPECT_EQ(j["sliding_window"], 24);
  EXPECT_EQ(j["num_key_value_heads"], 2);
  EXPECT_EQ(j["head_dim"], 32);
}

TEST(HfConfig, DmaIsDogeWithKeepWindowSize) {
  const auto m = model_of(with(kGqa, {{"qk_norm", true}, {"residual_scale", true},
                                      {"attention", {{"type", "dma"}, {"window", 16}, {"a_init", -0.5}}}}));
  const auto j = to_hf_config(m, HfExtras{});
  EXPECT_EQ(json(j["architectures"]), json::array({"DogeForCausalLM"}));
  EXPECT_EQ(j["model_type"], "doge");
  EXPECT_EQ(j["keep_window_size"], 16);
  EXPECT_TRUE(j["sliding_window"].is_null());
  EXPECT_EQ(j["is_moe"], false);
  EXPECT_EQ(j["head_dim"], 32);
  EXPECT_EQ(j["num_key_value_heads"], 2);
  EXPECT_EQ(j["hidden_dropout"], 0.0);
}

TEST(HfConfig, MlaIsDeepseekV3WithDenseMlpsOnly) {
  const json mla = {{"vocab_size", 300}, {"d_model", 96}, {"n_layers", 3}, {"n_heads", 4}, {"ffn_dim", 256},
                    {"attention", {{"type", "mla"}, {"kv_rank", 24}, {"rope_dim", 16}, {"nope_dim", 32}, {"v_dim", 40}}}};
  auto j = to_hf_config(model_of(mla), HfExtras{});
  EXPECT_EQ(json(j["architectures"]), json::array({"DeepseekV3ForCausalLM"}));
  EXPECT_EQ(j["model_type"], "deepseek_v3");
  EXPECT_EQ(j["first_k_dense_replace"], 3);  // every layer dense: no expert is built
  EXPECT_EQ(j["intermediate_size"], 256);
  EXPECT_EQ(j["kv_lora_rank"], 24);
  EXPECT_TRUE(j["q_lora_rank"].is_null());
  EXPECT_EQ(j["qk_rope_head_dim"], 16);
  EXPECT_EQ(j["qk_nope_head_dim"], 32);
  EXPECT_EQ(j["v_head_dim"], 40);
  EXPECT_EQ(j["num_key_value_heads"], 4);
  EXPECT_EQ(j["rope_interleave"], false);
  EXPECT_FALSE(j.contains("head_dim")) << "DeepseekV3Config derives head_dim; a written one would override it";
  EXPECT_EQ(j["attention_bias"], false);
  json q = mla;
  q["attention"]["q_rank"] = 48;
  EXPECT_EQ(to_hf_config(model_of(q), HfExtras{})["q_lora_rank"], 48);
}

TEST(HfConfig, WhatNoPeerExpressesIsRefusedByName) {
  ModelConfig nsa = model_of(kGqa);
  nsa.attention.type = "nsa";  // no config accepts it yet; the export must refuse it whenever one does
  EXPECT_NE(refusal(nsa).find("\"nsa\""), std::string::npos) << refusal(nsa);
  EXPECT_NE(refusal(nsa).find("no Hugging Face peer"), std::string::npos) << refusal(nsa);

  const json dma = {{"type", "dma"}, {"window", 16}};
  const auto no_qk = model_of(with(kGqa, {{"residual_scale", true}, {"attention", dma}}));
  EXPECT_NE(refusal(no_qk).find("model.qk_norm"), std::string::npos) << refusal(no_qk);
  const auto no_rs = model_of(with(kGqa, {{"qk_norm", true}, {"attention", dma}}));
  EXPECT_NE(refusal(no_rs).find("model.residual_scale"), std::string::npos) << refusal(no_rs);
  const json doge = {{"qk_norm", true}, {"residual_scale", true}};
  const auto linear = model_of(with(with(kGqa, doge), {{"attention", with(dma, {{"bias_form", "linear"}})}}));
  EXPECT_NE(refusal(linear).find("model.attention.bias_form"), std::string::npos) << refusal(linear);
  const auto local = model_of(with(with(kGqa, doge), {{"attention", with(dma, {{"local_window", 4}})}}));
  EXPECT_NE(refusal(local).find("model.attention.local_window"), std::string::npos) << refusal(local);

  EXPECT_NE(refusal(model_of(with(kGqa, {{"qk_norm", true}}))).find("model.qk_norm"), std::string::npos);
  EXPECT_NE(refusal(model_of(with(kGqa, {{"residual_scale", true}}))).find("model.residual_scale"), std::string::npos);
  const auto swa_qk = model_of(with(kGqa, {{"qk_norm", true}, {"attention", {{"type", "swa"}, {"window", 8}}}}));
  EXPECT_NE(refusal(swa_qk).find("MistralForCausalLM"), std::string::npos) << refusal(swa_qk);
  // LlamaConfig insists on hidden_size % num_attention_heads == 0
  const auto odd = model_of(with(kGqa, {{"d_model", 100}, {"n_heads", 6}, {"n_kv_heads", 2}}));
  EXPECT_NE(refusal(odd).find("model.d_model"), std::string::npos) << refusal(odd);
  const json mla = {{"n_heads", 4}, {"norm_eps", 1e-5}, {"attention", {{"type", "mla"}, {"kv_rank", 24}}}};
  const auto mla_eps = model_of(with(kGqa, mla));
  EXPECT_NE(refusal(mla_eps).find("model.norm_eps"), std::string::npos) << refusal(mla_eps);
}

TEST(HfConfig, LlamaAndDogeConfigsReadBackToTheSameModel) {
  const json doge = with(kGqa, {{"qk_norm", true}, {"residual_scale", true},
                                {"attention", {{"type", "dma"}, {"window", 16}}}});
  for (const json& ours : {kGqa, with(kGqa, {{"tie_embeddings", true}}), doge}) {
    const ModelConfig m = model_of(ours);
    const FromHf back = from_hf_config(json(to_hf_config(m, HfExtras{77, 5, "float32"})), "test");
    EXPECT_EQ(back.extras.max_positions, 77);
    EXPECT_EQ(back.extras.eos_id, 5);
    const ModelConfig m2 = model_of(back.model);
    const json a = parse_config(json{{"model", ours}, {"data", {{"train", "t"}, {"val", "v"}}}}).resolved["model"];
    const json b = parse_config(json{{"model", back.model}, {"data", {{"train", "t"}, {"val", "v"}}}}).resolved["model"];
    EXPECT_EQ(a, b) << ours.dump();
    EXPECT_EQ(m2.attention.type, m.attention.type);
  }
}

std::string import_refusal(const json& hf) {
  try {
    from_hf_config(hf, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(HfConfig, ImportRefusesFieldsItDoesNotMapByName) {
  const json llama = json(to_hf_config(model_of(kGqa), HfExtras{64, 1, "float32"}));
  EXPECT_EQ(import_refusal(llama), "");
  EXPECT_NE(import_refusal(with(llama, {{"quantization_config", {{"bits", 4}}}})).find("quantization_config"),
            std::string::npos);
  EXPECT_NE(import_refusal(with(llama, {{"attention_bias", true}})).find("\"attention_bias\""), std::string::npos);
  EXPECT_NE(import_refusal(with(llama, {{"mlp_bias", true}})).find("\"mlp_bias\""), std::string::npos);
  EXPECT_NE(import_refusal(with(llama, {{"hidden_act", "gelu"}})).find("\"hidden_act\""), std::string::npos);
  const json yarn = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 10000.0}};
  EXPECT_NE(import_refusal(with(llama, {{"rope_parameters", yarn}})).find("rope_parameters.rope_type"),
            std::string::npos);
  EXPECT_NE(import_refusal(with(llama, {{"model_type", "mistral"}})).find("model_type \"mistral\""),
            std::string::npos);
  const json doge = json(to_hf_config(
      model_of(with(kGqa, {{"qk_norm", true}, {"residual_scale", true}, {"attention", {{"type", "dma"}, {"window", 8}}}})),
      HfExtras{64, 1, "float32"}));
  EXPECT_EQ(import_refusal(doge), "");
  EXPECT_NE(import_refusal(with(doge, {{"is_moe", true}})).find("\"is_moe\""), std::string::npos);
  EXPECT_NE(import_refusal(with(doge, {{"sliding_window", 32}})).find("\"sliding_window\""), std::string::npos);
}

// ---- the CLI: export, import, export --------------------------------------------------------------

std::string bin() { return test::dmatrain_bin(); }
// run.device=cpu: this is the cpu label, also on a machine with a GPU.
const std::string kTrain = " --set run.threads=2 --set run.device=cpu --set train.steps=3 --set train.seq_len=32"
                           " --set train.batch_size=4 --set train.eval_batches=1 --set train.eval_interval=0"
                           " --set run.log_interval=1";

std::string train(const std::string& dir, const std::string& data, const std::string& name, const std::string& sets) {
  auto r = run(bin() + " train " + test::source_dir() + "/configs/tiny.json" + data + kTrain + sets + " --out " + dir +
               "/" + name);
  EXPECT_EQ(r.rc, 0) << r.out;
  return dir + "/" + name;
}

const char* kFiles[] = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json"};

double printed_loss(const std::string& out) {
  double v = -1;
  const auto at = out.find("validation loss ");
  if (at != std::string::npos) std::sscanf(out.c_str() + at, "validation loss %lf", &v);
  return v;
}

// export → import → export, byte for byte, in fp32 and bf16; the imported run evaluates to the
// original's loss and `train --resume` continues it with a fresh optimizer.
void round_trip(const std::string& tag, const std::string& sets, const char* arch) {
  const std::string dir = test::temp_dir(tag);
  const std::string data = test::prepare_bundled_data(dir);
  const std::string a = train(dir, data, "a", sets);
  for (const char* dtype : {"fp32", "bf16"}) {
    const std::string x = dir + "/x_" + dtype, y = dir + "/y_" + dtype, b = dir + "/b_" + dtype;
    auto e1 = run(bin() + " export " + a + " --format hf --out " + x + " --dtype " + dtype);
    ASSERT_EQ(e1.rc, 0) << e1.out;
    EXPECT_NE(e1.out.find(arch), std::string::npos) << e1.out;
    auto i = run(bin() + " import " + x + " --out " + b + data + " --set train.batch_size=4");
    ASSERT_EQ(i.rc, 0) << i.out;
    EXPECT_NE(i.out.find("optimizer state starts fresh"), std::string::npos) << i.out;
    auto e2 = run(bin() + " export " + b + " --format hf --out " + y + " --dtype " + dtype);
    ASSERT_EQ(e2.rc, 0) << e2.out;
    for (const char* f : kFiles) {
      const std::string bx = test::file_bytes(x + "/" + f), by = test::file_bytes(y + "/" + f);
      EXPECT_FALSE(bx.empty()) << x << "/" << f;
      EXPECT_TRUE(bx == by) << dtype << ": " << f << " differs after export → import → export";
    }
    const json cfg = json::parse(test::file_bytes(x + "/config.json"));
    EXPECT_EQ(cfg["torch_dtype"], std::string(dtype) == "bf16" ? "bfloat16" : "float32");
    SafetensorsFile st(x + "/model.safetensors");
    EXPECT_EQ(st.metadata().at("format"), "pt") << "transformers refuses other formats";
    EXPECT_EQ(st.get("model.embed_tokens.weight").dtype, std::string(dtype) == "bf16" ? DType::BF16 : DType::F32);
    if (std::string(dtype) == "bf16") continue;
    // fp32: the imported run is the same model; it evaluates to the same loss and resumes
    auto ea = run(bin() + " eval " + a + " --batches 2");
    auto eb = run(bin() + " eval " + b + " --batches 2");
    ASSERT_EQ(ea.rc, 0) << ea.out;
    ASSERT_EQ(eb.rc, 0) << eb.out;
    EXPECT_EQ(printed_loss(ea.out), printed_loss(eb.out)) << ea.out << eb.out;
    auto t = run(bin() + " train " + b + "/config.json --resume --set run.threads=2 --set run.device=cpu" +
                 " --set train.steps=2 --set train.eval_batches=1");
    ASSERT_EQ(t.rc, 0) << t.out;
    EXPECT_NE(t.out.find("resumed from"), std::string::npos) << t.out;
    EXPECT_NE(t.out.find("optimizer state starts fresh"), std::string::npos) << t.out;
    EXPECT_TRUE(fs::exists(b + "/checkpoints/step_00000002/COMPLETE"));
  }
}

TEST(HfCli, MhaExportImportExportIsByteIdentical) { round_trip("hf_mha", "", "LlamaForCausalLM"); }

TEST(HfCli, TiedMhaExportImportExportIsByteIdentical) {
  round_trip("hf_mha_tied", " --set model.tie_embeddings=true", "LlamaForCausalLM");
}

TEST(HfCli, DmaExportImportExportIsByteIdentical) {
  round_trip("hf_dma", " --set model.qk_norm=true --set model.residual_scale=true"
                       " --set 'model.attention={\"type\":\"dma\",\"window\":8,\"a_init\":-0.5}'",
             "DogeForCausalLM");
}

// swa and mla export (import reads Llama and Doge only): config.json fields and the tensor names.
TEST(HfCli, SwaAndMlaExportTheirPeersFields) {
  const std::string dir = test::temp_dir("hf_swa_mla");
  const std::string data = test::prepare_bundled_data(dir);
  const std::string swa = train(dir, data, "swa", " --set 'model.attention={\"type\":\"swa\",\"window\":8}'");
  const std::string mla = train(dir, data, "mla", " --set 'model.attention={\"type\":\"mla\",\"kv_rank\":32,"
                                                  "\"rope_dim\":16,\"q_rank\":24}'");
  auto e1 = run(bin() + " export " + swa + " --format hf --out " + dir + "/swa_hf");
  ASSERT_EQ(e1.rc, 0) << e1.out;
  const json s = json::parse(test::file_bytes(dir + "/swa_hf/config.json"));
  EXPECT_EQ(s["architectures"], json::array({"MistralForCausalLM"}));
  EXPECT_EQ(s["sliding_window"], 8);
  EXPECT_EQ(s["max_position_embeddings"], 32);
  EXPECT_EQ(s["eos_token_id"], 256);  // the byte tokenizer's end of document
  auto e2 = run(bin() + " export " + mla + " --format hf --out " + dir + "/mla_hf");
  ASSERT_EQ(e2.rc, 0) << e2.out;
  const json m = json::parse(test::file_bytes(dir + "/mla_hf/config.json"));
  EXPECT_EQ(m["architectures"], json::array({"DeepseekV3ForCausalLM"}));
  EXPECT_EQ(m["first_k_dense_replace"], 2);
  EXPECT_EQ(m["q_lora_rank"], 24);
  EXPECT_EQ(m["kv_lora_rank"], 32);
  EXPECT_EQ(m["qk_rope_head_dim"], 16);
  EXPECT_EQ(m["qk_nope_head_dim"], 32);  // = head_dim of tiny.json
  EXPECT_EQ(m["v_head_dim"], 32);
  SafetensorsFile st(dir + "/mla_hf/model.safetensors");
  for (const char* n : {"model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.q_a_layernorm.weight",
                        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.gate_proj.weight"})
    EXPECT_TRUE(st.has(n)) << n;
  // the byte tokenizer as tokenizer.json: 256 byte tokens at their own ids, <|endoftext|> at 256
  const json tok = json::parse(test::file_bytes(dir + "/mla_hf/tokenizer.json"));
  EXPECT_EQ(tok["model"]["vocab"].size(), 256u);
  EXPECT_EQ(tok["model"]["merges"].size(), 0u);
  EXPECT_EQ(tok["added_tokens"][0]["id"], 256);
  EXPECT_EQ(tok["added_tokens"][0]["content"], "<|endoftext|>");
  const json tc = json::parse(test::file_bytes(dir + "/mla_hf/tokenizer_config.json"));
  EXPECT_EQ(tc["eos_token"], "<|endoftext|>");
  EXPECT_EQ(tc["add_bos_token"], false);
  const json gc = json::parse(test::file_bytes(dir + "/mla_hf/generation_config.json"));
  EXPECT_EQ(gc["eos_token_id"], 256);
}

TEST(HfCli, RefusesDmaWithoutQkNormAndExistingFolders) {
  const std::string dir = test::temp_dir("hf_refuse");
  const std::string data = test::prepare_bundled_data(dir);
  const std::string plain = train(dir, data, "dma", " --set 'model.attention={\"type\":\"dma\",\"window\":8}'");
  auto r = run(bin() + " export " + plain + " --format hf --out " + dir + "/out");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("model.qk_norm"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir + "/out")) << "a refused export must leave nothing behind";

  const std::string mha = train(dir, data, "mha", "");
  fs::create_directories(dir + "/full");
  std::ofstream(dir + "/full/keep.txt") << "mine";
  auto e = run(bin() + " export " + mha + " --format hf --out " + dir + "/full");
  EXPECT_EQ(e.rc, 1) << e.out;
  EXPECT_NE(e.out.find(dir + "/full"), std::string::npos) << e.out;
  EXPECT_NE(e.out.find("not empty"), std::string::npos) << e.out;
  EXPECT_EQ(test::file_bytes(dir + "/full/keep.txt"), "mine");
  // an existing empty folder is fine
  fs::create_directories(dir + "/empty");
  auto ok = run(bin() + " export " + mha + " --format hf --out " + dir + "/empty");
  EXPECT_EQ(ok.rc, 0) << ok.out;
  EXPECT_TRUE(fs::exists(dir + "/empty/model.safetensors"));
  // import refuses a run directory that holds anything (here: a run)
  auto i = run(bin() + " import " + dir + "/empty --out " + mha);
  EXPECT_EQ(i.rc, 1) << i.out;
  EXPECT_NE(i.out.find("not empty"), std::string::npos) << i.out;
  // usage errors
  EXPECT_EQ(run(bin() + " export " + mha + " --out " + dir + "/o2").rc, 2);  // no --format
  EXPECT_EQ(run(bin() + " export " + mha + " --format gguf --out " + dir + "/o2").rc, 2);
  EXPECT_EQ(run(bin() + " export " + mha + " --format hf --out " + dir + "/o2 --dtype fp16").rc, 2);
  auto s = run(bin() + " export " + mha + " --format hf --out " + dir + "/o2 --step 7");
  EXPECT_EQ(s.rc, 1) << s.out;
  EXPECT_NE(s.out.find("step 7"), std::string::npos) << s.out;
}

// `eval --logits`: the dumped logits are the model's; their cross-entropy is the loss eval prints.
TEST(HfCli, EvalLogitsAreWhatTheLossIsComputedFrom) {
  const std::string dir = test::temp_dir("hf_logits");
  const std::string data = test::prepare_bundled_data(dir);
  const std::string a = train(dir, data, "a", "");
  auto e = run(bin() + " eval " + a + " --batches 2 --logits " + dir + "/l.safetensors");
  ASSERT_EQ(e.rc, 0) << e.out;
  SafetensorsFile f(dir + "/l.safetensors");
  const Tensor& x = f.get("inputs");
  const Tensor& y = f.get("targets");
  const Tensor& l = f.get("logits");
  ASSERT_EQ(x.shape.n, 2);
  EXPECT_EQ(x.shape[0], 8);  // 2 batches of 4
  EXPECT_EQ(x.shape[1], 32);
  EXPECT_EQ(y.shape, x.shape);
  ASSERT_EQ(l.shape.n, 3);
  EXPECT_EQ(l.shape[2], 257);
  const int64_t V = l.shape[2], N = x.numel();
  const float* p = static_cast<const float*>(l.data);
  const int32_t* t = static_cast<const int32_t*>(y.data);
  const int32_t* in = static_cast<const int32_t*>(x.data);
  double sum = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (r % 32 != 31) EXPECT_EQ(t[r], in[r + 1]) << "targets are the next inputs";
    double mx = -1e30, z = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(p[r * V + v]));
    for (int64_t v = 0; v < V; ++v) z += std::exp(double(p[r * V + v]) - mx);
    sum += mx + std::log(z) - double(p[r * V + t[r]]);
  }
  EXPECT_NEAR(sum / double(N), printed_loss(e.out), 6e-5) << e.out;
  EXPECT_EQ(run(bin() + " eval " + a + " --logits " + dir + "/l.safetensors").rc, 1) << "an existing file is refused";
}

}  // namespace
}  // namespace dmat
