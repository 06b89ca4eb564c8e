// Our `model` section and a Hugging Face transformers config.json, both ways (README "Hugging Face
// interop"). Each attention type has one peer architecture that computes exactly our model:
//   mha → LlamaForCausalLM       swa → MistralForCausalLM (sliding_window = w: keys i−w+1 … i)
//   dma → DogeForCausalLM        mla → DeepseekV3ForCausalLM with dense MLPs in every layer
//   nsa → none
// The parameter names are already the peers' (model.cpp, attention_*.cpp), so weights map one to
// one. What a peer cannot express is refused with the config key and the reason; nothing is
// approximated. The reverse direction reads the Llama and Doge configs, refusing any field it
// does not map, by name.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "config/config.h"

namespace dmat {

// What a config.json records beyond the model itself.
struct HfExtras {
  int64_t max_positions = 0;  // max_position_embeddings: the sequence length the model was trained at
  int64_t eos_id = -1;        // the end-of-document token: eos_token_id and bos_token_id (-1: null)
  std::string dtype = "float32";  // torch_dtype of the weights: "float32" or "bfloat16"
};

// The peer's class name for a model ("LlamaForCausalLM", ...); refuses a model it cannot express
// (error names the config key: "model.qk_norm ...").
std::string hf_architecture(const ModelConfig& m);
// config.json for a resolved model section (every default filled in); refuses as hf_architecture.
nlohmann::ordered_json to_hf_config(const ModelConfig& m, const HfExtras& x);

// A config.json of a LlamaForCausalLM or DogeForCausalLM as our `model` section (JSON, to be
// validated by parse_config) and the extras. origin names the file in errors.
struct FromHf {
  nlohmann::json model;   // the `model` section of a dmatrain config
  HfExtras extras;
  std::string architecture;
};
FromHf from_hf_config(const nlohmann::json& hf, const std::string& origin);

}  // namespace dmat
