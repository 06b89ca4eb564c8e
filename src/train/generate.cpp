// `dmatrain generate`: load a checkpoint into a CPU model, find the run's tokenizer, decode with the
// layers' caches and sample (generate.h).
#include "train/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "config/config.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "io/checkpoint_dir.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace dmat {
namespace fs = std::filesystem;

namespace {

// The data manifest of a shard set spec: DIR/train → DIR/manifest.json; a shard file or a glob →
// two levels up. "" when there is none.
std::string manifest_of(const std::string& spec) {
  std::error_code ec;
  fs::path p(spec);
  if (!fs::is_directory(p, ec)) p = p.parent_path();
  const fs::path m = p.parent_path() / "manifest.json";
  return fs::is_regular_file(m, ec) ? m.string() : "";
}

// The run's tokenizer (open_run_for_decoding).
std::unique_ptr<Tokenizer> run_tokenizer(const Config& cfg, const std::string& spec, std::string* why,
                                         const char* cmd) {
  if (!spec.empty()) return load_tokenizer(spec);
  const std::string mpath = manifest_of(cfg.data.train);
  if (mpath.empty()) {
    *why = fmt::format("no data manifest next to {}", cfg.data.train);
    return nullptr;
  }
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(read_file(mpath));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {} does not parse: {}", cmd, mpath, e.what());
  }
  if (m.contains("generator")) {
    *why = fmt::format("{} describes generated data of token ids ({})", mpath, m["generator"].get<std::string>());
    return nullptr;
  }
  const auto& t = m.at("tokenizer");
  const std::string path = t.value("path", std::string());
  if (path != "byte" && !fs::is_regular_file(path))
    fail("{}: the run's tokenizer {} (from {}) is not at hand; name it with --tokenizer", cmd, path, mpath);
  auto tok = load_tokenizer(path);
  if (tok->hash() != t.value("hash", std::string()))
    fail("{}: tokenizer {} has changed since the data was prepared (hash {}, manifest {} records {}); name the "
         "right one with --tokenizer",
         cmd, path, tok->hash(), mpath, t.value("hash", std::string()));
  return tok;
}

}  // namespace

DecodingRun open_run_for_decoding(const std::string& run_dir, int64_t step, const std::string& tokenizer,
                                  const char* cmd) {
  std::optional<CheckpointRef> ck;
  if (step < 0) {
    ck = latest_checkpoint(run_dir);
    if (!ck) fail("{}: no complete checkpoint in {} (expected {}/checkpoints/step_*/COMPLETE)", cmd, run_dir, run_dir);
  } else {
    std::string have;
    for (const CheckpointRef& c : list_checkpoints(run_dir)) {
      if (c.step == step) ck = c;
      have += (have.empty() ? "" : ", ") + std::to_string(c.step);
    }
    if (!ck) fail("{}: {} has no complete checkpoint of step {} (steps: {})", cmd, run_dir, step,
                  have.empty() ? "none" : have);
  }
  DecodingRun r{parse_saved_config(checkpoint_config(ck->path), run_dir), *ck, nullptr, ""};
  r.tok = run_tokenizer(r.cfg, tokenizer, &r.why_no_tokenizer, cmd);
  return r;
}

int32_t sample_token(const std::vector<double>& logits, double temperature, int64_t top_k, double top_p, Rng& rng) {
  const int64_t V = int64_t(logits.size());
  DMAT_CHECK(V > 0, "sample_token: no logits");
  if (temperature <= 0) return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<int32_t> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  int64_t keep = top_k > 0 ? std::min(top_k, V) : V;
  std::vector<double> p(static_cast<size_t>(keep));
  const double mx = logits[size_t(ids[0])];
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += p[size_t(i)] = std::exp((logits[size_t(ids[size_t(i)])] - mx) / temperature);
  if (top_p < 1) {
    double cum = 0;
    int64_t n = 0;
    while (n < keep && cum < top_p * sum) cum += p[size_t(n++)];
    keep = std::max<int64_t>(1, n);
    sum = cum > 0 ? cum : p[0];
  }
  const double u = rng.uniform() * sum;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += p[size_t(i)];
    if (u < cum) return ids[size_t(i)];
  }
  return ids[size_t(keep - 1)];
}

GenerateResult generate_run(const std::string& run_dir, const GenerateOptions& o,
                            const std::function<void(int32_t, const std::string&)>& on_token) {
  if (o.max_new_tokens < 0) fail("generate: --max-new-tokens must be >= 0 (got {})", o.max_new_tokens);
  if (!(o.temperature >= 0)) fail("generate: --temperature must be >= 0 (got {}; 0 is greedy)", o.temperature);
  if (o.top_k < 0) fail("generate: --top-k must be >= 0 (got {}; 0: off)", o.top_k);
  if (!(o.top_p > 0 && o.top_p <= 1)) fail("generate: --top-p must be in (0, 1] (got {}; 1: off)", o.top_p);
  DecodingRun run = open_run_for_decoding(run_dir, o.step, o.tokenizer, "generate");
  const Config& cfg = run.cfg;
  const CheckpointRef* ck = &run.ck;
  const Tokenizer* tok = run.tok.get();
  const std::string& why = run.why_no_tokenizer;
  set_cpu_threads(o.threads > 0 ? o.threads : cfg.run.threads, 1);

  std::vector<int32_t> prompt = o.prompt_ids;
  if (!o.use_ids) {
    if (!tok)
      fail("generate: --prompt TEXT needs the run's tokenizer, but {}: give the prompt as --prompt-ids, or name a "
           "tokenizer with --tokenizer",
           why);
    std::vector<uint32_t> ids;
    tok->encode(o.prompt, ids);
    prompt.assign(ids.begin(), ids.end());
  }
  if (prompt.empty()) fail("generate: the prompt is empty (at least one token is needed)");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= cfg.model.vocab_size)
      fail("generate: prompt token {} at position {} is outside the model's vocabulary [0, {})", prompt[i], i,
           cfg.model.vocab_size);

  // always the CPU backend: the checkpoint holds fp32 weights whatever device trained them
  Model model(cfg.model, DType::F32, Device::CPU);
  load_model_weights(model, ck->path + "/model.safetensors");
  const int64_t total = int64_t(prompt.size()) + o.max_new_tokens;
  if (total > cfg.train.seq_len)
    spdlog::warn("generate: {} positions, more than the {} the model was trained on (train.seq_len)", total,
                 cfg.train.seq_len);
  auto state = model.start_decode(std::max<int64_t>(total, 1));
  GenerateResult res;
  res.prompt_tokens = int64_t(prompt.size());
  res.step = ck->step;
  res.cache = state->describe();
  spdlog::info("generate: checkpoint {} (step {}), {} prompt tokens; cache per layer: {}", ck->path, ck->step,
               prompt.size(), res.cache);

  Rng rng(hash64(o.seed, 0x67656e));
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<double> logits = model.decode(*state, prompt.data(), int64_t(prompt.size()));
  const auto t1 = std::chrono::steady_clock::now();
  res.prefill_s = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t k = 0; k < o.max_new_tokens; ++k) {
    const int32_t id = sample_token(logits, o.temperature, o.top_k, o.top_p, rng);
    res.tokens.push_back(id);
    const bool eot = tok && uint32_t(id) == tok->eot_id();
    on_token(id, tok && !eot ? tok->decode({uint32_t(id)}) : std::string());
    if ((eot && o.stop_at_eot) || k + 1 == o.max_new_tokens) break;
    logits = model.decode(*state, &id, 1);
  }
  res.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return res;
}

}  // namespace dmat
