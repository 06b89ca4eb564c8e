// Export of a run's checkpoint as a Hugging Face model folder, and import of one (hf_convert.h).
#include "interop/hf_convert.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "core/bf16.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "interop/hf_config.h"
#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "tokenizer/bpe.h"
#include "train/checkpoint.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

// ---- output folders ------------------------------------------------------------------------------

void refuse_existing(const std::string& dir, const char* cmd) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec))
    fail("{}: {} exists and is not a folder; refusing to replace it (name another --out)", cmd, dir);
  if (!fs::is_empty(dir, ec))
    fail("{}: {} already exists and is not empty; refusing to overwrite it (remove it or name another --out)", cmd,
         dir);
}

// The output is built in a sibling folder and renamed into place when complete, so a failure
// leaves nothing half-written under the name asked for.
class Staging {
 public:
  Staging(const std::string& dir, const char* cmd) : dir_(dir), cmd_(cmd) {
    refuse_existing(dir, cmd);
    fs::path p = fs::path(dir).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();  // "out/" names out
    target_ = p.string();
    if (!p.parent_path().empty()) fs::create_directories(p.parent_path());
    path_ = target_ + fmt::format(".tmp-{}", ::getpid());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~Staging() {
    std::error_code ec;
    if (!done_) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  void commit() {
    refuse_existing(dir_, cmd_);  // still nothing there (or an empty folder, which rename replaces)
    fs::rename(path_, target_);
    done_ = true;
  }

 private:
  std::string dir_, target_, path_;
  const char* cmd_;
  bool done_ = false;
};

void write_json(const std::string& path, const ojson& j) { write_file_atomic(path, j.dump(2) + "\n"); }

// ---- tokenizers ----------------------------------------------------------------------------------

// The byte tokenizer (ids 0-255 the bytes, 256 the end of a document) as a byte-level BPE: every
// byte its own token at the id of its value, no merges, so both encode every text to the same ids.
BpeTokenizer byte_tokenizer_as_bpe() {
  BpeDefinition d;
  d.tokens.resize(257);
  for (int b = 0; b < 256; ++b) d.tokens[size_t(b)] = std::string(1, char(b));
  d.eot = "<|endoftext|>";
  d.tokens[256] = d.eot;
  d.added = {{256, d.eot}};
  d.pretok = {PreTokStage{}};  // ByteLevel alone
  return BpeTokenizer(std::move(d), "byte");
}

BpeTokenizer tokenizer_from_spec(const std::string& spec) {
  return spec == "byte" ? byte_tokenizer_as_bpe() : BpeTokenizer::load(spec);
}

// The manifest `data prepare` wrote beside the training shards (OUT/manifest.json for shards in
// OUT/train), if there is one.
std::optional<std::string> data_manifest(const std::string& train) {
  const fs::path p(train);
  std::error_code ec;
  for (const fs::path& dir : {p, p.parent_path(), p.parent_path().parent_path()})
    if (!dir.empty() && fs::is_regular_file(dir / "manifest.json", ec)) return (dir / "manifest.json").string();
  return std::nullopt;
}

// The tokenizer a run was trained with: RUN/tokenizer.json (imported runs), else the one the
// training data's manifest names, if it is at hand and unchanged.
BpeTokenizer run_tokenizer(const HfExportOptions& o, const Config& cfg, std::string* source) {
  if (!o.tokenizer.empty()) return *source = o.tokenizer, tokenizer_from_spec(o.tokenizer);
  const std::string own = o.run_dir + "/tokenizer.json";
  if (fs::is_regular_file(own)) return *source = own, BpeTokenizer::load(own);
  const std::string hint = "pass --tokenizer T.json (or --tokenizer byte) naming the tokenizer the run was trained with";
  const auto manifest = data_manifest(cfg.data.train);
  if (!manifest) fail("export: no manifest.json found beside the training data {}: {}", cfg.data.train, hint);
  json m;
  try {
    m = json::parse(read_file(*manifest)).at("tokenizer");
  } catch (const json::exception& e) {
    fail("export: {} names no tokenizer ({}): {}", *manifest, e.what(), hint);
  }
  const std::string path = m.value("path", std::string()), hash = m.value("hash", std::string());
  if (path != "byte" && !fs::is_regular_file(path))
    fail("export: the tokenizer {} named in {} is not at hand (paths are relative to the folder data prepare ran "
         "in): {}",
         path, *manifest, hint);
  if (path == "byte") {
    *source = "byte";
    return byte_tokenizer_as_bpe();
  }
  BpeTokenizer t = BpeTokenizer::load(path);
  if (t.hash() != hash)
    fail("export: the tokenizer {} has changed since the data in {} was prepared (hash {}, manifest {}): {}", path,
         *manifest, t.hash(), hash, hint);
  *source = path;
  return t;
}

ojson tokenizer_config(const BpeTokenizer& tok, int64_t max_len) {
  const std::string eos = tok.definition().eot;
  ojson added = ojson::object();
  auto sorted = tok.definition().added;
  std::sort(sorted.begin(), sorted.end());
  for (const auto& [id, content] : sorted)
    added[std::to_string(id)] = {{"content", content}, {"lstrip", false}, {"normalized", false},
                                 {"rstrip", false},    {"single_word", false}, {"special", true}};
  ojson j;
  // the generic class: tokenizer.json as it is, whatever the model type
  j["tokenizer_class"] = "PreTrainedTokenizerFast";
  j["bos_token"] = eos;
  j["eos_token"] = eos;
  j["unk_token"] = nullptr;
  // dmatrain never adds special tokens around a text: documents end with the end token in the data
  j["add_bos_token"] = false;
  j["add_eos_token"] = false;
  j["clean_up_tokenization_spaces"] = false;
  j["model_max_length"] = max_len;
  j["added_tokens_decoder"] = added;
  return j;
}

// ---- checkpoints -----------------------------------------------------------------------------------

CheckpointRef pick_checkpoint(const std::string& run_dir, int64_t step) {
  if (!fs::is_directory(run_dir)) fail("export: run directory {} does not exist", run_dir);
  const auto all = list_checkpoints(run_dir);
  if (all.empty()) fail("export: no complete checkpoint in {} (expected {}/checkpoints/step_*/COMPLETE)", run_dir, run_dir);
  if (step < 0) return all.back();
  std::string steps;
  for (const auto& c : all) {
    if (c.step == step) return c;
    steps += (steps.empty() ? "" : ", ") + std::to_string(c.step);
  }
  fail("export: {} has no complete checkpoint of step {} (it has: {})", run_dir, step, steps);
}

}  // namespace

HfExportResult export_hf(const HfExportOptions& o) {
  if (o.dtype != "fp32" && o.dtype != "bf16") fail("export: --dtype must be fp32 or bf16 (got \"{}\")", o.dtype);
  refuse_existing(o.out_dir, "export");
  const CheckpointRef ck = pick_checkpoint(o.run_dir, o.step);
  const Config cfg = parse_saved_config(checkpoint_config(ck.path), o.run_dir);
  HfExportResult res;
  res.checkpoint = ck.path;
  res.architecture = hf_architecture(cfg.model);  // refuses what the peer cannot express, before anything is written

  const BpeTokenizer tok = run_tokenizer(o, cfg, &res.tokenizer);
  if (int64_t(tok.vocab_size()) > cfg.model.vocab_size)
    fail("export: the tokenizer {} has {} tokens but model.vocab_size is {}", res.tokenizer, tok.vocab_size(),
         cfg.model.vocab_size);
  const bool round_bf16 = o.dtype == "bf16";
  HfExtras x;
  x.max_positions = cfg.train.seq_len;
  x.eos_id = tok.eot_id();
  x.dtype = round_bf16 ? "bfloat16" : "float32";
  const ojson config = to_hf_config(cfg.model, x);

  // The tensors of our parameter table, in its order, under their (Hugging Face) names.
  const SafetensorsFile src(ck.path + "/model.safetensors");
  const ParamTable table = Model::declare_params(cfg.model);
  std::vector<NamedTensor> out;
  std::vector<std::vector<bf16>> rounded;
  rounded.reserve(table.info().size());
  for (const ParamInfo& p : table.info()) {
    const Tensor& t = src.get(p.name);
    if (t.dtype != DType::F32 || !(t.shape == p.shape))
      fail("export: {}: tensor {} is {} {}, expected F32 {}", ck.path, p.name, dtype_name(t.dtype), t.shape.str(),
           p.shape.str());
    if (!round_bf16) {
      out.push_back({p.name, t});
      continue;
    }
    auto& r = rounded.emplace_back(size_t(t.numel()));
    const float* f = static_cast<const float*>(t.data);
    for (size_t i = 0; i < r.size(); ++i) r[i] = to_bf16(f[i]);
    out.push_back({p.name, Tensor{r.data(), t.shape, DType::BF16, Device::CPU}});
  }
  if (src.names().size() != out.size())
    fail("export: {}: model.safetensors holds {} tensors, the model declares {}", ck.path, src.names().size(),
         out.size());
  res.tensors = int64_t(out.size());

  Staging stage(o.out_dir, "export");
  const std::string d = stage.path();
  write_json(d + "/config.json", config);
  // transformers refuses safetensors files whose metadata "format" is not one of its frameworks'
  write_safetensors(d + "/model.safetensors", out, {{"format", "pt"}});
  write_json(d + "/generation_config.json",
             ojson{{"bos_token_id", tok.eot_id()}, {"eos_token_id", tok.eot_id()}, {"pad_token_id", tok.eot_id()}});
  tok.save(d + "/tokenizer.json", false);
  write_json(d + "/tokenizer_config.json", tokenizer_config(tok, cfg.train.seq_len));
  stage.commit();
  return res;
}

HfImportResult import_hf(const HfImportOptions& o) {
  const std::string dir = o.hf_dir;
  if (!fs::is_directory(dir)) fail("import: {} is not a folder", dir);
  for (const char* f : {"config.json", "tokenizer.json"})
    if (!fs::is_regular_file(dir + "/" + f)) fail("import: {} has no {}", dir, f);
  if (!fs::is_regular_file(dir + "/model.safetensors"))
    fail("import: {} has no model.safetensors{}", dir,
         fs::exists(dir + "/model.safetensors.index.json") ? " (sharded checkpoints are not supported: merge the "
                                                             "shards into one model.safetensors)"
                                                           : "");
  refuse_existing(o.run_dir, "import");
  json hf;
  try {
    hf = json::parse(read_file(dir + "/config.json"));
  } catch (const json::exception& e) {
    fail("import: {}/config.json does not parse: {}", dir, e.what());
  }
  const FromHf h = from_hf_config(hf, dir + "/config.json");
  HfImportResult res;
  res.architecture = h.architecture;

  // The run's config: the model from config.json, training defaults, then the user's overrides.
  json j;
  j["model"] = h.model;
  j["train"] = {{"seq_len", h.extras.max_positions}};
  j["data"] = {{"train", o.run_dir + "/data/train"}, {"val", o.run_dir + "/data/val"}};
  j["run"] = {{"dir", o.run_dir}};
  const std::string name = fs::path(o.run_dir).lexically_normal().filename().string();
  if (std::regex_match(name, std::regex("[A-Za-z0-9._-]+")) && name != "." && name != "..") j["run"]["name"] = name;
  Config cfg;
  try {
    cfg = parse_config(j, ".", o.sets);
  } catch (const Error& e) {
    fail("import: {}/config.json gives a model dmatrain cannot build: {}", dir, e.what());
  }
  if (cfg.run.dir != o.run_dir) fail("import: run.dir is --out ({}); do not --set it", o.run_dir);

  BpeTokenizer tok = BpeTokenizer::load(dir + "/tokenizer.json");
  if (int64_t(tok.vocab_size()) > cfg.model.vocab_size)
    fail("import: {}/tokenizer.json has {} tokens but the model's vocab_size is {}", dir, tok.vocab_size(),
         cfg.model.vocab_size);
  if (h.extras.eos_id >= 0 && h.extras.eos_id != int64_t(tok.eot_id()))
    spdlog::warn("import: config.json's eos_token_id is {}, but dmatrain ends documents with {} (id {}) from "
                 "tokenizer.json",
                 h.extras.eos_id, tok.definition().eot, tok.eot_id());

  // Weights: our table's tensors by name, fp32 or bf16 widened exactly; anything else is refused.
  Model model(cfg.model, DType::F32, Device::CPU);
  const SafetensorsFile src(dir + "/model.safetensors");
  const auto& info = model.param_info();
  std::set<std::string> used;
  for (size_t i = 0; i < info.size(); ++i) {
    const Tensor dst = model.params().get(int(i));
    const Tensor& t = src.get(info[i].name);
    if (!(t.shape == dst.shape))
      fail("import: {}/model.safetensors: {} has shape {}, config.json implies {}", dir, info[i].name, t.shape.str(),
           dst.shape.str());
    float* d = static_cast<float*>(dst.data);
    if (t.dtype == DType::F32) {
      src.copy_to(info[i].name, dst);
    } else if (t.dtype == DType::BF16) {
      const bf16* b = static_cast<const bf16*>(t.data);
      for (int64_t k = 0; k < t.numel(); ++k) d[k] = to_float(b[k]);
    } else {
      fail("import: {}/model.safetensors: {} is {}; F32 and BF16 are supported", dir, info[i].name,
           dtype_name(t.dtype));
    }
    used.insert(info[i].name);
  }
  for (const std::string& n : src.names()) {
    if (used.count(n) || n.ends_with(".rotary_emb.inv_freq")) continue;  // a buffer older files saved
    // a tied head saved anyway: acceptable when it is the embedding
    if (n == "lm_head.weight" && cfg.model.tie_embeddings) {
      const Tensor& a = src.get(n);
      const Tensor& e = src.get("model.embed_tokens.weight");
      if (a.dtype == e.dtype && a.shape == e.shape && std::memcmp(a.data, e.data, a.bytes()) == 0) continue;
      fail("import: {}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight", dir);
    }
    fail("import: {}/model.safetensors holds {}, which the {} model dmatrain builds from config.json does not have",
         dir, n, h.architecture);
  }
  res.parameters = model.num_params();

  // A step-0 run directory in the usual format; zero AdamW moments with no step taken are exactly
  // a fresh optimizer.
  Staging stage(o.run_dir, "import");
  TrainState st;
  st.origin = fs::absolute(dir).lexically_normal().string();
  AdamW adam(model, cfg.train);
  const std::string ck = save_checkpoint(stage.path(), model, adam, st, cfg.resolved, cfg.run.keep_checkpoints,
                                         dist::world());
  write_file_atomic(stage.path() + "/config.json", cfg.resolved.dump(2) + "\n");
  tok.save(stage.path() + "/tokenizer.json", false);
  stage.commit();
  res.checkpoint = o.run_dir + "/checkpoints/" + fs::path(ck).filename().string();
  return res;
}

}  // namespace dmat
