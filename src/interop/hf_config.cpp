// Model section ↔ transformers config.json (hf_config.h). The field lists follow transformers'
// LlamaConfig, MistralConfig, DogeConfig and DeepseekV3Config; every field whose transformers
// default differs from our model is written explicitly.
#include "interop/hf_config.h"

#include <cmath>
#include <optional>
#include <set>

#include <fmt/format.h>

#include "core/error.h"

namespace dmat {
namespace {

using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

// DeepseekV3's kv_a_layernorm and q_a_layernorm are built with the RMSNorm default epsilon, not
// config.rms_norm_eps, so only this value of model.norm_eps is expressible.
constexpr double kDeepseekLatentNormEps = 1e-6;

void require_plain(const ModelConfig& m, const char* arch) {
  if (m.qk_norm)
    fail("export: model.qk_norm is true, but {} has no QK-norm (of the peers only DogeForCausalLM, attention type "
         "dma, has it)",
         arch);
  if (m.residual_scale)
    fail("export: model.residual_scale is true, but {} has no residual scales (of the peers only DogeForCausalLM, "
         "attention type dma, has them)",
         arch);
}

ojson rope_parameters(double theta) { return ojson{{"rope_type", "default"}, {"rope_theta", theta}}; }

ojson token_id(int64_t id) { return id >= 0 ? ojson(id) : ojson(nullptr); }

}  // namespace

std::string hf_architecture(const ModelConfig& m) {
  const std::string& t = m.attention.type;
  if (t == "mha") {
    require_plain(m, "LlamaForCausalLM");
    // transformers' LlamaConfig.validate_architecture refuses this even with an explicit head_dim
    if (m.d_model % m.n_heads != 0)
      fail("export: LlamaForCausalLM needs model.d_model ({}) divisible by model.n_heads ({}) (transformers' "
           "LlamaConfig checks it even when head_dim is given)",
           m.d_model, m.n_heads);
    return "LlamaForCausalLM";
  }
  if (t == "swa") {
    require_plain(m, "MistralForCausalLM");
    return "MistralForCausalLM";
  }
  if (t == "dma") {
    if (!m.qk_norm || !m.residual_scale)
      fail("export: DogeForCausalLM always has QK-norm and residual scales, so attention type dma exports only with "
           "model.qk_norm = true and model.residual_scale = true (got {} and {})",
           m.qk_norm, m.residual_scale);
    if (m.attention.dma.bias_form != "exp")
      fail("export: model.attention.bias_form \"{}\": DogeForCausalLM computes the key bias as exp(A·softplus(z)) "
           "only (bias_form \"exp\")",
           m.attention.dma.bias_form);
    if (m.attention.dma.local_window != 0)
      fail("export: model.attention.local_window {} is our extension; DogeForCausalLM keeps the top-w keys only "
           "(local_window 0)",
           m.attention.dma.local_window);
    return "DogeForCausalLM";
  }
  if (t == "mla") {
    require_plain(m, "DeepseekV3ForCausalLM");
    if (m.norm_eps != kDeepseekLatentNormEps)
      fail("export: model.norm_eps {} cannot be expressed: DeepseekV3ForCausalLM normalises the latents "
           "(kv_a_layernorm, q_a_layernorm) with epsilon 1e-6 whatever rms_norm_eps says; use norm_eps 1e-6",
           m.norm_eps);
    return "DeepseekV3ForCausalLM";
  }
  fail("export: model.attention.type \"{}\" has no Hugging Face peer architecture (exported: mha as "
       "LlamaForCausalLM, swa as MistralForCausalLM, dma as DogeForCausalLM, mla as DeepseekV3ForCausalLM)",
       t);
}

ojson to_hf_config(const ModelConfig& m, const HfExtras& x) {
  const std::string arch = hf_architecture(m);
  const std::string& t = m.attention.type;
  ojson j;
  j["architectures"] = ojson::array({arch});
  j["model_type"] = t == "mha" ? "llama" : t == "swa" ? "mistral" : t == "dma" ? "doge" : "deepseek_v3";
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.d_model;
  j["intermediate_size"] = m.ffn_dim;
  j["num_hidden_layers"] = m.n_layers;
  j["num_attention_heads"] = m.n_heads;
  if (t == "mla") {
    const MlaConfig& a = m.attention.mla;
    // One key and value head per query head; no head_dim key: DeepseekV3Config derives it
    // (= qk_rope_head_dim), and a written one would override that.
    j["num_key_value_heads"] = m.n_heads;
    j["kv_lora_rank"] = a.kv_rank;
    j["q_lora_rank"] = a.q_rank > 0 ? ojson(a.q_rank) : ojson(nullptr);
    j["qk_rope_head_dim"] = a.rope_dim;
    j["qk_nope_head_dim"] = a.nope_dim;
    j["v_head_dim"] = a.v_dim;
    j["rope_interleave"] = false;  // our RoPE rotates halves (LLaMA convention) over the rotary dims
    // Dense SwiGLU MLPs in every layer: the first first_k_dense_replace layers are dense, so no
    // expert is ever built; the expert fields only need valid values.
    j["first_k_dense_replace"] = m.n_layers;
    j["moe_intermediate_size"] = m.ffn_dim;
    j["n_routed_experts"] = 1;
    j["n_shared_experts"] = 1;
    j["num_experts_per_tok"] = 1;
    j["n_group"] = 1;
    j["topk_group"] = 1;
    j["routed_scaling_factor"] = 1.0;
    j["norm_topk_prob"] = true;
  } else {
    j["num_key_value_heads"] = m.n_kv_heads;
    j["head_dim"] = m.head_dim;
  }
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = x.max_positions;
  j["rms_norm_eps"] = m.norm_eps;
  // rope_theta for transformers 4.x; rope_parameters is what 5.x reads (it also accepts rope_theta)
  j["rope_theta"] = m.rope_theta;
  j["rope_scaling"] = nullptr;
  j["rope_parameters"] = rope_parameters(m.rope_theta);
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  if (t == "mha" || t == "dma") j["mlp_bias"] = false;
  if (t == "swa") j["sliding_window"] = m.attention.swa.window;  // keys i−w+1 … i, as ours
  if (t == "dma") {
    j["keep_window_size"] = m.attention.dma.window;  // top-k only once a row has more keys than this
    j["sliding_window"] = nullptr;
    j["is_moe"] = false;
    j["hidden_dropout"] = 0.0;
  }
  j["tie_word_embeddings"] = m.tie_embeddings;
  j["initializer_range"] = m.init_std;
  j["use_cache"] = true;
  // No BOS of its own: every document follows the end-of-document token, so that token is also
  // what a generation from nothing starts with.
  j["bos_token_id"] = token_id(x.eos_id);
  j["eos_token_id"] = token_id(x.eos_id);
  j["pad_token_id"] = nullptr;
  j["torch_dtype"] = x.dtype;
  return j;
}

// ---- import --------------------------------------------------------------------------------------

namespace {

// Reads the fields of one config.json, remembering which it has read, so that the rest can be
// refused by name.
class Fields {
 public:
  Fields(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

  bool has(const char* k) const { return j_.contains(k) && !j_.at(k).is_null(); }
  const json* get(const char* k) {
    used_.insert(k);
    return has(k) ? &j_.at(k) : nullptr;
  }
  int64_t integer(const char* k, std::optional<int64_t> def = std::nullopt) {
    const json* v = get(k);
    if (!v) {
      if (!def) fail("import: {}: config.json has no \"{}\"", origin_, k);
      return *def;
    }
    if (v->is_number_integer()) return v->get<int64_t>();
    if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>()) return int64_t(v->get<double>());
    fail("import: {}: \"{}\" must be an integer (got {})", origin_, k, v->dump());
  }
  double number(const char* k, double def) {
    const json* v = get(k);
    if (!v) return def;
    if (!v->is_number()) fail("import: {}: \"{}\" must be a number (got {})", origin_, k, v->dump());
    return v->get<double>();
  }
  bool boolean(const char* k, bool def) {
    const json* v = get(k);
    if (!v) return def;
    if (!v->is_boolean()) fail("import: {}: \"{}\" must be true or false (got {})", origin_, k, v->dump());
    return v->get<bool>();
  }
  // A field whose only supported value is `want` (absent counts as the transformers default `def`).
  template <class T>
  void expect(const char* k, const T& want, const T& def, const std::string& why) {
    const json* v = get(k);
    const json got = v ? *v : json(def);
    if (got != json(want)) fail("import: {}: \"{}\" = {} is not supported: {}", origin_, k, got.dump(), why);
  }
  void ignore(const char* k) { used_.insert(k); }
  // Refuses every field not read or ignored.
  void refuse_rest(const std::string& arch) const {
    std::string rest;
    for (const auto& [k, v] : j_.items())
      if (!used_.count(k)) rest += (rest.empty() ? "" : ", ") + k;
    if (!rest.empty())
      fail("import: {}: {} fields that dmatrain does not map: {} (refused rather than ignored: they may change "
           "what the model computes)",
           origin_, arch, rest);
  }

 private:
  const json& j_;
  std::string origin_;
  std::set<std::string> used_;
};

}  // namespace

FromHf from_hf_config(const json& hf, const std::string& origin) {
  if (!hf.is_object()) fail("import: {}: config.json must hold a JSON object", origin);
  Fields f(hf, origin);
  const json* mt = f.get("model_type");
  const std::string type = mt && mt->is_string() ? mt->get<std::string>() : "";
  FromHf r;
  if (type == "llama") r.architecture = "LlamaForCausalLM";
  else if (type == "doge") r.architecture = "DogeForCausalLM";
  else
    fail("import: {}: model_type {} is not supported (import reads LlamaForCausalLM checkpoints, model_type "
         "\"llama\", and DogeForCausalLM checkpoints, model_type \"doge\")",
         origin, mt ? mt->dump() : "(missing)");
  if (const json* a = f.get("architectures"); a && *a != json::array({r.architecture}))
    fail("import: {}: architectures {} (expected [\"{}\"] for model_type \"{}\")", origin, a->dump(), r.architecture,
         type);
  const bool doge = type == "doge";

  json& m = r.model;
  m["vocab_size"] = f.integer("vocab_size");
  m["d_model"] = f.integer("hidden_size");
  m["n_layers"] = f.integer("num_hidden_layers");
  const int64_t heads = f.integer("num_attention_heads");
  m["n_heads"] = heads;
  m["n_kv_heads"] = f.integer("num_key_value_heads", heads);
  if (heads <= 0) fail("import: {}: num_attention_heads must be > 0 (got {})", origin, heads);
  m["head_dim"] = f.integer("head_dim", m["d_model"].get<int64_t>() / heads);
  m["ffn_dim"] = f.integer("intermediate_size");
  m["tie_embeddings"] = f.boolean("tie_word_embeddings", false);
  m["norm_eps"] = f.number("rms_norm_eps", 1e-6);
  m["init_std"] = f.number("initializer_range", 0.02);
  m["qk_norm"] = doge;          // DogeAttention always normalises q and k
  m["residual_scale"] = doge;   // DogeDecoderLayer always scales its residuals

  // RoPE: rope_theta (transformers 4.x) or rope_parameters (5.x), default rotation only
  double theta = f.number("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* p = f.get(key);
    if (!p) continue;
    if (!p->is_object()) fail("import: {}: \"{}\" must be an object or null (got {})", origin, key, p->dump());
    auto unsupported = [&](const std::string& k, const json& v) {
      fail("import: {}: {}.{} = {} is not supported: dmatrain rotates every head dimension with the default RoPE "
           "(rope_type \"default\", no scaling)",
           origin, key, k, v.dump());
    };
    for (const char* k : {"rope_type", "type"})  // the kind first: it says the most
      if (p->contains(k) && p->at(k) != "default") unsupported(k, p->at(k));
    for (const auto& [k, v] : p->items()) {
      if (k == "rope_theta" && v.is_number()) theta = v.get<double>();
      else if ((k == "rope_type" || k == "type") && v == "default") continue;
      else if (k == "partial_rotary_factor" && v == 1.0) continue;
      else unsupported(k, v);
    }
  }
  m["rope_theta"] = theta;

  f.expect("hidden_act", std::string("silu"), std::string("silu"), "the MLP is SwiGLU (silu)");
  f.expect("attention_bias", false, false, "the projections have no biases");
  f.expect("mlp_bias", false, false, "the MLP has no biases");
  f.expect("attention_dropout", 0.0, 0.0, "dmatrain trains without dropout");
  r.extras.max_positions = f.integer("max_position_embeddings", 2048);
  if (const json* e = f.get("eos_token_id"); e && e->is_number_integer()) r.extras.eos_id = e->get<int64_t>();
  // numerically irrelevant or about generation only
  for (const char* k : {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
                        "bos_token_id", "pad_token_id", "pretraining_tp", "_name_or_path"})
    f.ignore(k);
  if (doge) {
    f.expect("hidden_dropout", 0.0, 0.0, "dmatrain trains without dropout");
    f.expect("sliding_window", json(nullptr), json(nullptr), "Doge's sliding window has no dmatrain counterpart");
    f.expect("is_moe", false, false, "the cross-domain mixture of experts has no dmatrain counterpart");
    // only read by the mixture of experts, which is off
    for (const char* k : {"num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
                          "router_aux_loss_coef"})
      f.ignore(k);
    m["attention"] = {{"type", "dma"}, {"window", f.integer("keep_window_size", 2048)}, {"bias_form", "exp"}};
  } else {
    m["attention"] = {{"type", "mha"}};
  }
  f.refuse_rest(r.architecture);
  return r;
}

}  // namespace dmat
