// Run configuration: JSON read into typed, validated structs (README "Config reference").
//
// A config has four sections, `model`, `train`, `data`, `run`, plus an optional top-level
// "include": "base.json" or ["a.json", "b.json"] (paths relative to the including file; objects
// merge recursively, later includes win over earlier ones and the including file wins over all;
// includes may nest, cycles and missing files are errors naming the include chain), and an optional
// top-level "comment" (any JSON value, ignored: JSON has no comments). Every key is checked: unknown
// keys, wrong JSON types and out-of-range values throw dmat::Error with the key path, the value, and
// what is allowed, e.g. `config: model.attention.window must be > 0 (got -3)`. Integers may be
// written 100.0 (integral floats only); booleans must be true/false. data.train and data.val are
// required; everything else has the defaults below. The attention types accepted, and each one's
// keys, are listed once, in config.cpp (kAttentionKinds).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/kernel_options.h"

namespace dmat {

// Each attention variant has its own options object; model.attention holds "type" and that
// variant's keys only (config.cpp, kAttentionKinds: one entry per variant with its keys and rules).
// The objects of the variants not chosen keep their defaults and are never read.
struct SwaConfig {
  int64_t window = 0;         // query i sees keys i-window+1 … i; required, > 0
};

struct DmaConfig {
  int64_t window = 0;         // keys kept per query (top-w by the key bias); required, > 0
  std::string bias_form = "exp";  // bias exp(A·softplus(z)) ("exp") or A·softplus(z) ("linear")
  // Our extension (not in the paper): also keep the `local_window` most recent keys
  // i-local_window+1 … i of every query besides the top-`window` keys of the keys before them. 0: off.
  int64_t local_window = 0;
  double a_init = 0.0;        // initial value of every A_h (0: in the "exp" form all biases start at 1)
  double dt_init_std = 0.0;   // init spread of dt_proj.weight (0: model.init_std; resolved by validation)
  double bias_lr_scale = 1.0; // learning-rate multiplier of A and dt_proj.weight
};

// Multi-head Latent Attention (DeepSeek-V2/V3; README "MLA"). n_kv_heads must equal n_heads.
struct MlaConfig {
  int64_t kv_rank = 0;        // d_c: rank of the latent keys and values come from; required, 1 … d_model
  int64_t q_rank = 0;         // rank of the compressed queries (q_a_proj / q_b_proj); 0: no compression
  int64_t rope_dim = 64;      // rotary q/k dims per head (the rotary key is shared by all heads); even
  int64_t nope_dim = 0;       // q/k dims per head without RoPE; 0: model.head_dim (resolved by validation)
  int64_t v_dim = 0;          // value dims per head; 0: model.head_dim (resolved by validation)
};

// Native Sparse Attention (DeepSeek, arXiv 2502.11089; README "NSA"): compressed, selected and
// window branches with their own keys and values, combined by sigmoid gates. The defaults are the
// paper's (and the DMA paper's comparison's) settings.
struct NsaConfig {
  int64_t cmp_block = 32;     // l: compression block length; a multiple of cmp_stride
  int64_t cmp_stride = 16;    // d: compression stride (block c covers positions c·d … c·d + l − 1); > 0
  int64_t sel_block = 64;     // l': selection block length; a multiple of cmp_stride
  int64_t sel_count = 16;     // n: selected blocks per query, the first block and the 2 most recent included; >= 3
  int64_t window = 512;       // w: the window branch sees keys i-window+1 … i; > 0
  int64_t cmp_hidden = 0;     // F: hidden width of the compression MLPs; 0: model.head_dim (resolved by validation)
};

struct AttentionConfig {
  std::string type = "mha";   // "mha" (causal, GQA) | "swa" (sliding window) | "dma" (dynamic mask) | "mla" | "nsa"
  SwaConfig swa;
  DmaConfig dma;
  MlaConfig mla;
  NsaConfig nsa;
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t d_model = 128;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;     // 0: = n_heads. Must divide n_heads.
  int64_t head_dim = 0;       // 0: = d_model / n_heads. Must be even (RoPE).
  int64_t ffn_dim = 0;        // SwiGLU hidden size; 0: = 8/3 · d_model rounded up to a multiple of 64
  bool tie_embeddings = false;
  double rope_theta = 10000.0;
  bool qk_norm = false;       // per-head RMSNorm of q and k before RoPE (weight [head_dim])
  bool residual_scale = false;// Doge: h = r ⊙ h + branch(h) with learned r [d_model], init 1
  double norm_eps = 1e-6;
  double init_std = 0.02;
  AttentionConfig attention;
};

struct TrainConfig {
  int64_t steps = 1000;
  uint64_t seed = 1234;
  int64_t batch_size = 8;          // sequences per micro-batch (per rank)
  int64_t seq_len = 256;
  int64_t grad_accum = 1;          // micro-batches per optimizer step
  double lr = 1e-3;                // peak learning rate
  std::string schedule = "cosine"; // "constant" | "cosine" | "wsd"
  double warmup_frac = 0.0;        // fraction of steps of linear warmup, [0, 1)
  double decay_frac = 0.2;         // wsd: fraction of steps of final linear decay, (0, 1]
  double final_lr_ratio = 0.1;     // cosine / wsd: final lr = lr · final_lr_ratio, [0, 1]
  double weight_decay = 0.1;       // AdamW, decoupled; not applied to norms, gains, residual scales
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;          // global-norm clip; 0 disables
  int64_t eval_interval = 100;     // steps between validation passes (and at the end); 0: only at end
  int64_t eval_batches = 0;        // micro-batches of the validation set per pass; 0: all of it
  int64_t checkpoint_interval = 0; // steps between checkpoints; 0: only at the end
  bool recompute = false;          // recompute each block's activations in backward (less memory, ~1/3 more compute)
  int64_t zero = 0;                // ZeRO stage: 0 plain data parallel, 1 optimizer state sharded across ranks
  // A step whose loss or gradient norm is not finite: "stop" writes a checkpoint of the last good
  // state (the weights before that step) and fails; "skip" drops the step's update, counts it and goes on.
  std::string on_nonfinite = "stop";
  // Loss-spike guard (llm.c style), off at 0: a step whose loss lies more than loss_spike_z standard
  // deviations above the mean of the previous loss_spike_window steps' losses has its update skipped.
  double loss_spike_z = 0.0;
  int64_t loss_spike_window = 128;
};

struct DataConfig {
  std::string train;               // shard set: directory, glob or file
  std::string val;                 // shard set for validation (separate files)
};

struct RunConfig {
  std::string name = "run";
  std::string dir;                 // run directory; "" -> runs/<name>
  std::string device = "auto";     // "auto" | "cpu" | "cuda"
  int64_t threads = 0;             // CPU threads per rank; 0: the node's cores / ranks on the node
  int64_t log_interval = 10;       // steps between log lines / metrics rows
  int64_t keep_checkpoints = 3;    // newest complete checkpoints kept; 0 keeps all
  bool deterministic = true;       // CUDA: bitwise-reproducible kernels (attention dQ without atomics)
  double collective_timeout_s = 600;  // multi-rank: a collective running longer aborts the job; 0: no limit
  KernelOptions kernels;           // run.kernels: kernel tuning switches (core/kernel_options.h)
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  RunConfig run;
  nlohmann::json resolved;         // the resolved config (defaults filled in), as saved in the run dir
};

// Loads a file (following includes), applies `--set a.b=value` overrides in order (value parsed as
// JSON, falling back to the plain text; a string-typed key always takes the text, so
// run.name=123 names the run "123"), validates, and fills derived defaults.
// load_config is the start-up path: after validation it applies the DMAT_* environment overrides of
// run.kernels (apply_kernel_env), logging each value one changes; parse_config does not.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from an already-parsed JSON object (includes resolved relative to base_dir).
Config parse_config(const nlohmann::json& j, const std::string& base_dir = ".",
                    const std::vector<std::string>& overrides = {});
// A config saved in a run directory (RUN_DIR/config.json, a checkpoint's copy), written by this or
// an earlier version: as parse_config, after dropping the model.attention keys that belong to
// another attention variant and hold their default values (versions before per-variant options
// saved every variant's keys); any other key still fails as in parse_config.
Config parse_saved_config(const nlohmann::json& j, const std::string& base_dir = ".");
// The full config with every default made explicit (what is printed at start and saved):
// model.attention holds "type" and the chosen variant's keys only.
nlohmann::json to_json(const Config& c);

}  // namespace dmat
