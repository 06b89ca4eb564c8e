// Config loading: includes, --set overrides, a schema table per section, strict validation.
//
// The schema lives in one place per section (the k*Fields tables below): reading, writing
// (to_json), the list of known keys and the "did you mean" hint all come from those tables.
// Range checks and derived defaults follow in validate_*(), one line per documented rule.
#include "config/config.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <limits>
#include <sstream>
#include <string_view>
#include <variant>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace dmat {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr std::array kDmaBiasForms = {"exp", "linear"};

constexpr std::array kSchedules = {"constant", "cosine", "wsd"};
constexpr std::array kDevices = {"auto", "cpu", "cuda"};
constexpr std::array kOnNonfinite = {"stop", "skip"};

// Top-level keys besides the four sections. "comment" (any JSON value) is ignored: it lets a
// config file document itself, since JSON has no comments.
constexpr const char* kCommentKey = "comment";
constexpr const char* kIncludeKey = "include";

// ---- schema tables ---------------------------------------------------------------------------
template <class S>
using Member = std::variant<int64_t S::*, uint64_t S::*, double S::*, bool S::*, std::string S::*>;

template <class S>
struct Field {
  const char* key;
  Member<S> member;
};

const std::vector<Field<ModelConfig>> kModelFields = {
    {"vocab_size", &ModelConfig::vocab_size},
    {"d_model", &ModelConfig::d_model},
    {"n_layers", &ModelConfig::n_layers},
    {"n_heads", &ModelConfig::n_heads},
    {"n_kv_heads", &ModelConfig::n_kv_heads},
    {"head_dim", &ModelConfig::head_dim},
    {"ffn_dim", &ModelConfig::ffn_dim},
    {"tie_embeddings", &ModelConfig::tie_embeddings},
    {"rope_theta", &ModelConfig::rope_theta},
    {"qk_norm", &ModelConfig::qk_norm},
    {"residual_scale", &ModelConfig::residual_scale},
    {"norm_eps", &ModelConfig::norm_eps},
    {"init_std", &ModelConfig::init_std},
};
constexpr const char* kModelAttentionKey = "attention";  // nested section of model

const std::vector<Field<TrainConfig>> kTrainFields = {
    {"steps", &TrainConfig::steps},
    {"seed", &TrainConfig::seed},
    {"batch_size", &TrainConfig::batch_size},
    {"seq_len", &TrainConfig::seq_len},
    {"grad_accum", &TrainConfig::grad_accum},
    {"lr", &TrainConfig::lr},
    {"schedule", &TrainConfig::schedule},
    {"warmup_frac", &TrainConfig::warmup_frac},
    {"decay_frac", &TrainConfig::decay_frac},
    {"final_lr_ratio", &TrainConfig::final_lr_ratio},
    {"weight_decay", &TrainConfig::weight_decay},
    {"beta1", &TrainConfig::beta1},
    {"beta2", &TrainConfig::beta2},
    {"eps", &TrainConfig::eps},
    {"grad_clip", &TrainConfig::grad_clip},
    {"eval_interval", &TrainConfig::eval_interval},
    {"eval_batches", &TrainConfig::eval_batches},
    {"checkpoint_interval", &TrainConfig::checkpoint_interval},
    {"recompute", &TrainConfig::recompute},
    {"zero", &TrainConfig::zero},
    {"on_nonfinite", &TrainConfig::on_nonfinite},
    {"loss_spike_z", &TrainConfig::loss_spike_z},
    {"loss_spike_window", &TrainConfig::loss_spike_window},
};

const std::vector<Field<DataConfig>> kDataFields = {
    {"train", &DataConfig::train},
    {"val", &DataConfig::val},
};

const std::vector<Field<RunConfig>> kRunFields = {
    {"name", &RunConfig::name},
    {"dir", &RunConfig::dir},
    {"device", &RunConfig::device},
    {"threads", &RunConfig::threads},
    {"log_interval", &RunConfig::log_interval},
    {"keep_checkpoints", &RunConfig::keep_checkpoints},
    {"deterministic", &RunConfig::deterministic},
    {"collective_timeout_s", &RunConfig::collective_timeout_s},
};
constexpr const char* kRunKernelsKey = "kernels";  // nested section of run (core/kernel_options.h)

// ---- small helpers ---------------------------------------------------------------------------
// A JSON value as shown in messages: compact, cut short when long (bytes that are not UTF-8, which
// only --set text can bring, shown as U+FFFD rather than failing the message).
std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

std::string join_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

template <class Range>
std::string join(const Range& items, const char* sep = ", ") {
  std::string out;
  for (const auto& it : items) {
    if (!out.empty()) out += sep;
    out += it;
  }
  return out;
}

template <class Range>
bool contains(const Range& items, const std::string& s) {
  return std::any_of(std::begin(items), std::end(items), [&](const auto& x) { return s == x; });
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_float: return "a number";
    default: return "an integer";
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

[[noreturn]] void unknown_key(const std::string& section, const std::string& key,
                              const std::vector<std::string>& known) {
  std::string hint;
  size_t best = std::numeric_limits<size_t>::max();
  for (const auto& k : known) {
    size_t d = edit_distance(key, k);
    if (d < best && d <= 2 && d < k.size() / 2 + 1) {
      best = d;
      hint = fmt::format("; did you mean {}?", join_path(section, k));
    }
  }
  fail("config: unknown key {} (known keys in {}: {}){}", join_path(section, key),
       section.empty() ? "the top level" : section, join(known), hint);
}

// Object check plus unknown-key check for one section.
void check_section(const json& j, const std::string& path, const std::vector<std::string>& known) {
  if (!j.is_object())
    fail("config: {} must be an object (got {})", path.empty() ? "the config" : path, show(j));
  for (const auto& [key, value] : j.items())
    if (!contains(known, key)) unknown_key(path, key, known);
}

// ---- typed reads: strict JSON types, integers may be written as integral floats --------------
int64_t read_int(const json& v, const std::string& path) {
  if (v.is_number_integer() && !v.is_number_unsigned()) return v.get<int64_t>();
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u <= uint64_t(std::numeric_limits<int64_t>::max())) return int64_t(u);
    fail("config: {} is out of the integer range (got {})", path, show(v));
  }
  if (v.is_number_float()) {
    double d = v.get<double>();
    // 2^63 is exactly representable; anything >= it (or < -2^63) does not fit in int64.
    if (std::isfinite(d) && d == std::trunc(d) && d >= -9223372036854775808.0 &&
        d < 9223372036854775808.0)
      return int64_t(d);
  }
  fail("config: {} must be an integer (got {})", path, show(v));
}

uint64_t read_uint(const json& v, const std::string& path) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return uint64_t(v.get<int64_t>());
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::trunc(d) && d >= 0 && d < 18446744073709551616.0)
      return uint64_t(d);
  }
  fail("config: {} must be a non-negative integer (got {})", path, show(v));
}

double read_double(const json& v, const std::string& path) {
  if (v.is_number()) return v.get<double>();
  fail("config: {} must be a number (got {})", path, show(v));
}

bool read_bool(const json& v, const std::string& path) {
  if (v.is_boolean()) return v.get<bool>();
  fail("config: {} must be true or false (got {})", path, show(v));
}

std::string read_string(const json& v, const std::string& path) {
  if (v.is_string()) return v.get<std::string>();
  fail("config: {} must be a string (got {})", path, show(v));
}

template <class S>
std::vector<std::string> field_keys(const std::vector<Field<S>>& fields) {
  std::vector<std::string> keys;
  for (const auto& f : fields) keys.push_back(f.key);
  return keys;
}

// Reads the fields present in `j` into `out`; absent keys keep the struct's defaults.
template <class S>
void read_fields(const json& j, const std::string& path, const std::vector<Field<S>>& fields,
                 S& out) {
  for (const auto& f : fields) {
    auto it = j.find(f.key);
    if (it == j.end()) continue;
    const std::string p = join_path(path, f.key);
    std::visit(
        [&](auto m) {
          using T = std::remove_reference_t<decltype(out.*m)>;
          if constexpr (std::is_same_v<T, int64_t>) out.*m = read_int(*it, p);
          else if constexpr (std::is_same_v<T, uint64_t>) out.*m = read_uint(*it, p);
          else if constexpr (std::is_same_v<T, double>) out.*m = read_double(*it, p);
          else if constexpr (std::is_same_v<T, bool>) out.*m = read_bool(*it, p);
          else out.*m = read_string(*it, p);
        },
        f.member);
  }
}

template <class S>
json write_fields(const std::vector<Field<S>>& fields, const S& s) {
  json j = json::object();
  for (const auto& f : fields) std::visit([&](auto m) { j[f.key] = s.*m; }, f.member);
  return j;
}

// ---- range checks ----------------------------------------------------------------------------
template <class T>
void require(bool ok, const std::string& path, const T& value, std::string_view allowed) {
  if (!ok) fail("config: {} must be {} (got {})", path, allowed, show(json(value)));
}

void require_choice(const std::string& value, const std::string& path,
                    const std::vector<std::string>& choices, const std::string& note = "") {
  if (!contains(choices, value))
    fail("config: {} must be one of {} (got {}{})", path, join(choices), show(json(value)), note);
}

// ---- run.kernels -------------------------------------------------------------------------------
// The switches' values are text (core/kernel_options.h: kernel_knobs); in JSON a value may be
// written as a string or, where its text is a number or 0/1, as a number or a boolean.
void read_kernels(const json& j, KernelOptions& o) {
  std::vector<std::string> keys;
  for (const auto& k : kernel_knobs()) keys.push_back(k.key);
  check_section(j, "run.kernels", keys);
  for (const auto& k : kernel_knobs()) {
    auto it = j.find(k.key);
    if (it == j.end()) continue;
    const std::string p = join_path("run.kernels", k.key);
    std::string text;
    if (it->is_string()) text = it->get<std::string>();
    else if (it->is_boolean()) text = it->get<bool>() ? "1" : "0";
    else if (it->is_number_integer()) text = std::to_string(it->get<int64_t>());
    else if (it->is_number() && k.choices.empty()) text = fmt::format("{}", it->get<double>());
    else fail("config: {} must be a string or a number (got {})", p, show(*it));
    set_kernel_option(o, k, text, "config: " + p);
  }
}

json kernels_json(const KernelOptions& o) {
  json j = json::object();
  for (const auto& k : kernel_knobs()) {
    const std::string t = k.get(o);
    if (k.choices.empty()) j[k.key] = o.peak_tflops;
    else if (!t.empty() && t.find_first_not_of("0123456789") == std::string::npos) j[k.key] = std::stoll(t);
    else j[k.key] = t;
  }
  return j;
}

// ---- attention variants ---------------------------------------------------------------------
// One entry per variant: its name, its options' schema (a Field table over its own struct in
// config.h, which drives reading, writing and the known keys) and its rules (range checks and
// derived defaults, run after the model's own). Adding a variant: its struct and AttentionConfig
// member in config.h, one entry in attention_kinds().
struct AttentionKind {
  std::string name;
  std::vector<std::string> keys;  // its keys besides "type"
  std::function<void(const json&, const std::string&, AttentionConfig&)> read;
  std::function<json(const AttentionConfig&)> write;  // its keys only
  json defaults;                                      // its keys at their default values
  std::function<void(ModelConfig&)> validate;
};

template <class S>
AttentionKind attention_kind(const char* name, S AttentionConfig::*options, std::vector<Field<S>> fields,
                             void (*validate)(ModelConfig&)) {
  AttentionKind k;
  k.name = name;
  k.keys = field_keys(fields);
  k.read = [options, fields](const json& j, const std::string& path, AttentionConfig& a) {
    read_fields(j, path, fields, a.*options);
  };
  k.write = [options, fields](const AttentionConfig& a) { return write_fields(fields, a.*options); };
  k.defaults = write_fields(fields, S{});
  k.validate = validate;
  return k;
}

void validate_swa(ModelConfig& m) {
  const SwaConfig& s = m.attention.swa;
  require(s.window > 0, "model.attention.window", s.window, "> 0 for attention type swa (keys i-window+1 ... i)");
}

void validate_dma(ModelConfig& m) {
  DmaConfig& d = m.attention.dma;
  require(d.window > 0, "model.attention.window", d.window, "> 0 for attention type dma (keys kept per query)");
  require_choice(d.bias_form, "model.attention.bias_form", {kDmaBiasForms.begin(), kDmaBiasForms.end()});
  require(d.local_window >= 0, "model.attention.local_window", d.local_window, ">= 0 (0: no local window)");
  require(std::isfinite(d.a_init), "model.attention.a_init", d.a_init, "finite");
  require(d.dt_init_std >= 0, "model.attention.dt_init_std", d.dt_init_std, ">= 0 (0: model.init_std)");
  require(d.bias_lr_scale > 0, "model.attention.bias_lr_scale", d.bias_lr_scale, "> 0");
  if (d.dt_init_std == 0) d.dt_init_std = m.init_std;
}

void validate_mla(ModelConfig& m) {
  MlaConfig& a = m.attention.mla;
  require(a.kv_rank >= 1 && a.kv_rank <= m.d_model, "model.attention.kv_rank", a.kv_rank,
          fmt::format("in 1 … model.d_model = {} for attention type mla (the rank d_c of the latent keys and values "
                      "come from: required; a latent wider than the input it compresses adds parameters, not rank)",
                      m.d_model));
  require(a.q_rank >= 0 && a.q_rank <= m.d_model, "model.attention.q_rank", a.q_rank,
          fmt::format("in 0 … model.d_model = {} (the rank of the compressed queries; 0: no query compression)",
                      m.d_model));
  require(a.rope_dim >= 2 && a.rope_dim % 2 == 0, "model.attention.rope_dim", a.rope_dim,
          "even and >= 2 (RoPE rotates pairs of the rotary key's dims)");
  require(a.nope_dim >= 0, "model.attention.nope_dim", a.nope_dim, ">= 0 (0: = model.head_dim)");
  require(a.v_dim >= 0, "model.attention.v_dim", a.v_dim, ">= 0 (0: = model.head_dim)");
  if (a.nope_dim == 0) a.nope_dim = m.head_dim;
  if (a.v_dim == 0) a.v_dim = m.head_dim;
  // model.n_kv_heads does not apply: every query head gets its own keys and values, expanded from the
  // shared latent. It is left as written, so the rungs of a size keep one model section besides
  // model.attention (the ladder compares variants that differ in nothing else).
  if (m.qk_norm)
    fail("config: model.qk_norm must be false for attention type mla (got true): MLA normalises its latent "
         "(kv_a_layernorm) and compressed queries (q_a_layernorm) instead");
}

void validate_nsa(ModelConfig& m) {
  NsaConfig& a = m.attention.nsa;
  require(a.cmp_stride >= 1, "model.attention.cmp_stride", a.cmp_stride,
          ">= 1 for attention type nsa (the compression stride d)");
  require(a.cmp_block >= 1 && a.cmp_block % a.cmp_stride == 0, "model.attention.cmp_block", a.cmp_block,
          fmt::format("a positive multiple of model.attention.cmp_stride = {} for attention type nsa (the "
                      "compression block length l; the selection maps blocks by whole strides)",
                      a.cmp_stride));
  require(a.sel_block >= 1 && a.sel_block % a.cmp_stride == 0, "model.attention.sel_block", a.sel_block,
          fmt::format("a positive multiple of model.attention.cmp_stride = {} for attention type nsa (the "
                      "selection block length l'; its importance sums whole compression strides, eq. 9)",
                      a.cmp_stride));
  require(a.sel_count >= 3, "model.attention.sel_count", a.sel_count,
          ">= 3 for attention type nsa (the first block and the 2 most recent blocks are always selected and "
          "count in it)");
  require(a.window >= 1, "model.attention.window", a.window, "> 0 for attention type nsa (keys i-window+1 ... i)");
  require(a.cmp_hidden >= 0, "model.attention.cmp_hidden", a.cmp_hidden,
          ">= 0 (the compression MLPs' hidden width; 0: = model.head_dim)");
  if (a.cmp_hidden == 0) a.cmp_hidden = m.head_dim;
  if (m.qk_norm)
    fail("config: model.qk_norm must be false for attention type nsa (got true): the NSA layer has no QK-norm");
}

const std::vector<AttentionKind>& attention_kinds() {
  static const std::vector<AttentionKind> kinds = {
      {"mha", {}, [](const json&, const std::string&, AttentionConfig&) {},
       [](const AttentionConfig&) { return json::object(); }, json::object(), [](ModelConfig&) {}},
      attention_kind<SwaConfig>("swa", &AttentionConfig::swa, {{"window", &SwaConfig::window}}, validate_swa),
      attention_kind<DmaConfig>("dma", &AttentionConfig::dma,
                                {{"window", &DmaConfig::window},
                                 {"bias_form", &DmaConfig::bias_form},
                                 {"local_window", &DmaConfig::local_window},
                                 {"a_init", &DmaConfig::a_init},
                                 {"dt_init_std", &DmaConfig::dt_init_std},
                                 {"bias_lr_scale", &DmaConfig::bias_lr_scale}},
                                validate_dma),
      attention_kind<MlaConfig>("mla", &AttentionConfig::mla,
                                {{"kv_rank", &MlaConfig::kv_rank},
                                 {"q_rank", &MlaConfig::q_rank},
                                 {"rope_dim", &MlaConfig::rope_dim},
                                 {"nope_dim", &MlaConfig::nope_dim},
                                 {"v_dim", &MlaConfig::v_dim}},
                                validate_mla),
      attention_kind<NsaConfig>("nsa", &AttentionConfig::nsa,
                                {{"cmp_block", &NsaConfig::cmp_block},
                                 {"cmp_stride", &NsaConfig::cmp_stride},
                                 {"sel_block", &NsaConfig::sel_block},
                                 {"sel_count", &NsaConfig::sel_count},
                                 {"window", &NsaConfig::window},
                                 {"cmp_hidden", &NsaConfig::cmp_hidden}},
                                validate_nsa),
  };
  return kinds;
}

std::vector<std::string> attention_names() {
  std::vector<std::string> v;
  for (const auto& k : attention_kinds()) v.push_back(k.name);
  return v;
}

// The entry of a type (an error naming the types there are otherwise).
const AttentionKind& find_attention_kind(const std::string& type) {
  for (const auto& k : attention_kinds())
    if (k.name == type) return k;
  require_choice(type, "model.attention.type", attention_names());
  fail("unreachable");
}

// The variants other than `type` that have `key`.
std::vector<std::string> attention_owners(const std::string& key, const std::string& type) {
  std::vector<std::string> v;
  for (const auto& k : attention_kinds())
    if (k.name != type && contains(k.keys, key)) v.push_back(k.name);
  return v;
}

// model.attention: "type" first, then only that variant's keys. A key of another variant is an
// error naming the variants that have it; any other key an unknown key, with the nearest key of
// any variant as a hint.
void read_attention(const json& j, AttentionConfig& a) {
  const std::string path = "model.attention";
  if (!j.is_object()) fail("config: {} must be an object (got {})", path, show(j));
  if (auto t = j.find("type"); t != j.end()) a.type = read_string(*t, path + ".type");
  const AttentionKind& kind = find_attention_kind(a.type);
  std::vector<std::string> own = {"type"};
  own.insert(own.end(), kind.keys.begin(), kind.keys.end());
  for (const auto& [key, value] : j.items()) {
    if (contains(own, key)) continue;
    const std::vector<std::string> owners = attention_owners(key, a.type);
    if (!owners.empty())
      fail("config: {}.{} must be absent for attention type {} (only {} {} it; got {}); the keys of {}: {}", path,
           key, a.type, join(owners), owners.size() == 1 ? "has" : "have", show(value), a.type, join(own));
    std::string hint;
    size_t best = std::numeric_limits<size_t>::max();
    for (const auto& k : attention_kinds())
      for (const auto& candidate : k.name == a.type ? own : k.keys) {
        const size_t d = edit_distance(key, candidate);
        if (d < best && d <= 2 && d < candidate.size() / 2 + 1) {
          best = d;
          const std::vector<std::string> by = attention_owners(candidate, a.type);
          hint = contains(own, candidate)
                     ? fmt::format("; did you mean {}.{}?", path, candidate)
                     : fmt::format("; did you mean {}.{} (a key of attention type {})?", path, candidate, join(by));
        }
      }
    fail("config: unknown key {}.{} (known keys in {} for attention type {}: {}){}", path, key, path, a.type,
         join(own), hint);
  }
  kind.read(j, path, a);
}

json attention_json(const AttentionConfig& a) {
  json j = find_attention_kind(a.type).write(a);
  j["type"] = a.type;
  return j;
}

void validate_model(ModelConfig& m) {
  require(m.vocab_size >= 2, "model.vocab_size", m.vocab_size, ">= 2");
  require(m.d_model >= 1, "model.d_model", m.d_model, ">= 1");
  require(m.n_layers >= 1, "model.n_layers", m.n_layers, ">= 1");
  require(m.n_heads >= 1, "model.n_heads", m.n_heads, ">= 1");
  require(m.n_kv_heads >= 0, "model.n_kv_heads", m.n_kv_heads, ">= 0 (0: = n_heads)");
  require(m.head_dim >= 0, "model.head_dim", m.head_dim, ">= 0 (0: = d_model / n_heads)");
  require(m.ffn_dim >= 0, "model.ffn_dim", m.ffn_dim, ">= 0 (0: = 8/3 d_model rounded up to 64)");
  // (check_dimensions bounded d_model, so the 8 · d_model below cannot overflow)

  if (m.n_kv_heads == 0) m.n_kv_heads = m.n_heads;
  if (m.n_heads % m.n_kv_heads != 0)
    fail("config: model.n_kv_heads must divide model.n_heads = {} (got {})", m.n_heads,
         m.n_kv_heads);
  if (m.head_dim == 0) {
    if (m.d_model % m.n_heads != 0)
      fail("config: model.head_dim is 0 (derive as d_model / n_heads) but model.d_model = {} is "
           "not divisible by model.n_heads = {}; set model.head_dim explicitly",
           m.d_model, m.n_heads);
    m.head_dim = m.d_model / m.n_heads;
  }
  require(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "even (RoPE rotates pairs)");
  if (m.ffn_dim == 0) {
    int64_t x = (8 * m.d_model + 2) / 3;  // ceil(8/3 d_model)
    m.ffn_dim = (x + 63) / 64 * 64;
  }
  require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "> 0");
  require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "> 0");
  require(m.init_std > 0, "model.init_std", m.init_std, "> 0");

  find_attention_kind(m.attention.type).validate(m);
}

void validate_train(const TrainConfig& t) {
  require(t.steps >= 1, "train.steps", t.steps, ">= 1");
  require(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1");
  require(t.seq_len >= 1, "train.seq_len", t.seq_len, ">= 1");
  require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1");
  require(t.lr > 0, "train.lr", t.lr, "> 0");
  require_choice(t.schedule, "train.schedule", {kSchedules.begin(), kSchedules.end()});
  require(t.warmup_frac >= 0 && t.warmup_frac < 1, "train.warmup_frac", t.warmup_frac,
          "in [0, 1)");
  require(t.decay_frac > 0 && t.decay_frac <= 1, "train.decay_frac", t.decay_frac, "in (0, 1]");
  if (t.schedule == "wsd" && t.warmup_frac + t.decay_frac > 1)
    fail("config: train.warmup_frac + train.decay_frac must be <= 1 for schedule wsd (got {} + {})",
         show(json(t.warmup_frac)), show(json(t.decay_frac)));
  require(t.final_lr_ratio >= 0 && t.final_lr_ratio <= 1, "train.final_lr_ratio", t.final_lr_ratio,
          "in [0, 1]");
  require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0");
  require(t.beta1 >= 0 && t.beta1 < 1, "train.beta1", t.beta1, "in [0, 1)");
  require(t.beta2 >= 0 && t.beta2 < 1, "train.beta2", t.beta2, "in [0, 1)");
  require(t.eps > 0, "train.eps", t.eps, "> 0");
  require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 disables clipping)");
  require(t.zero == 0 || t.zero == 1, "train.zero", t.zero, "0 (plain data parallel) or 1 (ZeRO-1: optimizer state sharded)");
  require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, ">= 0 (0: only at the end)");
  require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, ">= 0 (0: the whole set)");
  require(t.checkpoint_interval >= 0, "train.checkpoint_interval", t.checkpoint_interval,
          ">= 0 (0: only at the end)");
  require_choice(t.on_nonfinite, "train.on_nonfinite", {kOnNonfinite.begin(), kOnNonfinite.end()});
  require(t.loss_spike_z >= 0 && std::isfinite(t.loss_spike_z), "train.loss_spike_z", t.loss_spike_z,
          ">= 0 (0: no loss-spike guard)");
  require(t.loss_spike_window >= 2, "train.loss_spike_window", t.loss_spike_window, ">= 2");
}

void validate_data(const json& j, const DataConfig& d) {
  for (const char* key : {"train", "val"}) {
    if (!j.contains(key))
      fail("config: data.{} is required (a token shard set: directory, glob or file)", key);
  }
  require(!d.train.empty(), "data.train", d.train, "a non-empty path");
  require(!d.val.empty(), "data.val", d.val, "a non-empty path");
}

void validate_run(RunConfig& r) {
  bool name_ok = !r.name.empty() && r.name != "." && r.name != ".." &&
                 std::all_of(r.name.begin(), r.name.end(), [](char ch) {
                   return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                          (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
                 });
  require(name_ok, "run.name", r.name,
          "a non-empty name of letters, digits, '.', '_' and '-' (it names the run directory)");
  require(r.name.size() <= 255, "run.name", r.name, "at most 255 characters (it names the run directory)");
  require_choice(r.device, "run.device", {kDevices.begin(), kDevices.end()});
  require(r.threads >= 0, "run.threads", r.threads, ">= 0 (0: all cores)");
  require(r.log_interval >= 1, "run.log_interval", r.log_interval, ">= 1");
  require(r.keep_checkpoints >= 0, "run.keep_checkpoints", r.keep_checkpoints, ">= 0 (0 keeps all)");
  require(r.collective_timeout_s >= 0, "run.collective_timeout_s", r.collective_timeout_s, ">= 0 (0: no limit)");
  if (r.dir.empty()) r.dir = "runs/" + r.name;
}

// ---- size limits -----------------------------------------------------------------------------
// Every dimension has an upper bound, and so have the size products made of them: far above any
// model this framework trains, low enough that no size arithmetic after the config (int64 element
// and byte counts, int32 token ids, the CUDA kernels' 32-bit window and row arithmetic) can wrap,
// and checked before anything is sized or allocated. check_dimensions bounds the values as written
// (the derived ones, head_dim = d_model / n_heads and the like, then stay inside the same bounds);
// check_products the products, once the derived values are filled in.
struct Limit {
  std::string what;   // the key, or the product's factors
  int64_t value;
  int64_t max;
  const char* why;
};

std::string pow2(int64_t v) {
  for (int e = 0; e < 63; ++e)
    if (v == int64_t(1) << e) return fmt::format("2^{} = {}", e, v);
  return std::to_string(v);
}

void check_limits(const std::vector<Limit>& limits) {
  for (const Limit& l : limits)
    if (l.value > l.max) fail("config: {} must be <= {} ({}) (got {})", l.what, pow2(l.max), l.why, l.value);
}

// a · b, or INT64_MAX where that does not fit (every product below is bounded far lower)
int64_t mul_sat(int64_t a, int64_t b) {
  int64_t r = 0;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}
template <class... T>
int64_t mul_sat(int64_t a, int64_t b, T... rest) {
  return mul_sat(mul_sat(a, b), rest...);
}

int64_t add_sat(int64_t a, int64_t b) {
  int64_t r = 0;
  return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

constexpr int64_t k2(int e) { return int64_t(1) << e; }

void check_dimensions(const Config& c) {
  const ModelConfig& m = c.model;
  const TrainConfig& t = c.train;
  const char* width = "a layer width far above any trained model";
  std::vector<Limit> dims = {
      {"model.vocab_size", m.vocab_size, k2(31), "token ids are 32-bit"},
      {"model.d_model", m.d_model, k2(16), width},
      {"model.n_layers", m.n_layers, k2(12), "the deepest trained models have ~10^2 layers"},
      {"model.n_heads", m.n_heads, k2(12), "far above any trained model"},
      {"model.n_kv_heads", m.n_kv_heads, k2(12), "at most model.n_heads"},
      {"model.head_dim", m.head_dim, k2(16), width},
      {"model.ffn_dim", m.ffn_dim, k2(20), width},
      {"train.seq_len", t.seq_len, k2(24), "positions are 32-bit in the kernels"},
      {"train.batch_size", t.batch_size, k2(20), "sequences per micro-batch"},
      {"train.grad_accum", t.grad_accum, k2(20), "micro-batches per step"},
      {"train.steps", t.steps, k2(40), "step counters"},
      {"train.eval_interval", t.eval_interval, k2(40), "a step count"},
      {"train.eval_batches", t.eval_batches, k2(40), "a batch count"},
      {"train.checkpoint_interval", t.checkpoint_interval, k2(40), "a step count"},
      {"train.loss_spike_window", t.loss_spike_window, k2(20), "losses kept in checkpoints"},
      {"run.threads", c.run.threads, k2(16), "threads per process"},
      {"run.log_interval", c.run.log_interval, k2(40), "a step count"},
      {"run.keep_checkpoints", c.run.keep_checkpoints, k2(20), "a checkpoint count"},
  };
  const AttentionConfig& a = m.attention;
  const char* window = "the attention kernels' window arithmetic is 32-bit; a window >= train.seq_len sees every "
                       "earlier key";
  if (a.type == "swa") dims.push_back({"model.attention.window", a.swa.window, k2(31) - 1, window});
  if (a.type == "dma") {
    dims.push_back({"model.attention.window", a.dma.window, k2(31) - 1, window});
    dims.push_back({"model.attention.local_window", a.dma.local_window, k2(31) - 1, window});
  }
  if (a.type == "mla") {
    dims.push_back({"model.attention.rope_dim", a.mla.rope_dim, k2(16), width});
    dims.push_back({"model.attention.nope_dim", a.mla.nope_dim, k2(16), width});
    dims.push_back({"model.attention.v_dim", a.mla.v_dim, k2(16), width});
  }
  check_limits(dims);
}

void check_products(const Config& c) {
  const ModelConfig& m = c.model;
  const TrainConfig& t = c.train;
  // the widest per-token activation of a block, and a bound on one block's weights
  int64_t head = m.head_dim;
  if (m.attention.type == "mla")
    head = std::max(m.attention.mla.nope_dim + m.attention.mla.rope_dim, m.attention.mla.v_dim);
  const int64_t attn_width = mul_sat(m.n_heads, head);
  const int64_t widest = std::max({m.d_model, m.ffn_dim, attn_width});
  const int64_t block_weights = mul_sat(m.d_model, 4 * attn_width + 3 * m.ffn_dim + 4);
  const int64_t params = add_sat(mul_sat(m.n_layers, block_weights), mul_sat(2, m.vocab_size, m.d_model));
  check_limits({
      {fmt::format("train.batch_size × train.seq_len = {} × {} (tokens per micro-batch)", t.batch_size, t.seq_len),
       mul_sat(t.batch_size, t.seq_len), k2(31), "token positions are 32-bit in the kernels"},
      {fmt::format("train.steps × train.grad_accum × train.batch_size × train.seq_len = {} × {} × {} × {} (tokens "
                   "per rank)",
                   t.steps, t.grad_accum, t.batch_size, t.seq_len),
       mul_sat(t.steps, t.grad_accum, t.batch_size, t.seq_len), k2(50), "token counters over every rank are int64"},
      {"the parameter count (about model.n_layers × d_model × (4 · n_heads · head_dim + 3 · ffn_dim) + 2 · "
       "vocab_size × d_model)",
       params, k2(40), "4 TiB of fp32 weights"},
      {fmt::format("the activations per micro-batch (about train.batch_size × train.seq_len × (model.n_layers + 1) × "
                   "the widest layer {})",
                   widest),
       mul_sat(t.batch_size, t.seq_len, m.n_layers + 1, widest), k2(46), "256 TiB of fp32 activations"},
  });
}

// ---- includes --------------------------------------------------------------------------------
// Recursive merge: objects merge key by key, anything else in `over` replaces `base`.
void merge_into(json& base, const json& over) {
  if (!base.is_object() || !over.is_object()) {
    base = over;
    return;
  }
  for (const auto& [key, value] : over.items()) {
    auto it = base.find(key);
    if (it != base.end() && it->is_object() && value.is_object())
      merge_into(*it, value);
    else
      base[key] = value;
  }
}

std::string show_chain(const std::vector<std::string>& chain, const std::string& last = "") {
  std::vector<std::string> all = chain;
  if (!last.empty()) all.push_back(last);
  return join(all, " -> ");
}

// ":LINE" of the first occurrence in `text` of the token a JSON error message quotes ('1e400'), or "".
std::string line_of_quoted(const std::string& text, const std::string& message) {
  const size_t a = message.find('\''), b = message.rfind('\'');
  if (a == std::string::npos || b <= a + 1) return "";
  const size_t at = text.find(message.substr(a + 1, b - a - 1));
  if (at == std::string::npos) return "";
  return fmt::format(":{}", 1 + std::count(text.begin(), text.begin() + std::ptrdiff_t(at), '\n'));
}

json read_json_file(const fs::path& path, const std::vector<std::string>& chain) {
  std::string where = chain.empty() ? "" : fmt::format(" (included via {})", show_chain(chain));
  std::error_code ec;
  if (!fs::exists(path, ec))
    fail("config: config file {} does not exist{}", path.string(), where);
  if (!fs::is_regular_file(path, ec))
    fail("config: config file {} is not a regular file{}", path.string(), where);
  std::ifstream in(path);
  if (!in) fail("config: cannot open config file {}: {}{}", path.string(), std::strerror(errno), where);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  try {
    return json::parse(text);
  } catch (const json::out_of_range& e) {
    // a number beyond the double range (1e400): the library names the number, not where it is
    fail("config: cannot parse {}{}: a number must fit a double (|x| < 1.8e308): {}{}", path.string(),
         line_of_quoted(text, e.what()), e.what(), where);
  } catch (const json::exception& e) {
    fail("config: cannot parse {}: {}{}", path.string(), e.what(), where);
  }
}

json resolve_includes(json j, const fs::path& dir, std::vector<std::string>& chain,
                      std::vector<fs::path>& canon_chain);

json load_with_includes(const fs::path& path, std::vector<std::string>& chain,
                        std::vector<fs::path>& canon_chain) {
  std::error_code ec;
  fs::path canon = fs::weakly_canonical(path, ec);
  if (ec) canon = path.lexically_normal();
  if (std::find(canon_chain.begin(), canon_chain.end(), canon) != canon_chain.end())
    fail("config: include cycle: {}", show_chain(chain, path.lexically_normal().string()));
  json j = read_json_file(path, chain);
  if (!j.is_object())
    fail("config: {} must hold a JSON object (got {})", path.string(), type_name(j));
  chain.push_back(path.lexically_normal().string());
  canon_chain.push_back(canon);
  json out = resolve_includes(std::move(j), path.parent_path(), chain, canon_chain);
  chain.pop_back();
  canon_chain.pop_back();
  return out;
}

// Replaces j's "include" by the included files' contents, j's own keys winning; later includes
// in an array win over earlier ones.
json resolve_includes(json j, const fs::path& dir, std::vector<std::string>& chain,
                      std::vector<fs::path>& canon_chain) {
  if (!j.is_object() || !j.contains(kIncludeKey)) return j;
  const json inc = j[kIncludeKey];
  j.erase(kIncludeKey);
  std::vector<std::string> files;
  auto bad = [&] {
    fail("config: include must be a file name or an array of file names (got {}){}", show(inc),
         chain.empty() ? "" : " in " + chain.back());
  };
  if (inc.is_string()) {
    files.push_back(inc.get<std::string>());
  } else if (inc.is_array()) {
    for (const auto& e : inc) {
      if (!e.is_string()) bad();
      files.push_back(e.get<std::string>());
    }
  } else {
    bad();
  }
  json merged = json::object();
  for (const auto& f : files) {
    if (f.empty()) bad();
    fs::path p = fs::path(f).is_absolute() ? fs::path(f) : dir / f;
    merge_into(merged, load_with_includes(p, chain, canon_chain));
  }
  merge_into(merged, j);
  return merged;
}

// ---- --set overrides -------------------------------------------------------------------------
// JSON text is UTF-8 (the parser refuses anything else), and a config is written back as JSON
// (RUN_DIR/config.json): the library's serializer decides.
bool is_utf8(const std::string& s) {
  try {
    (void)json(s).dump();
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

void apply_override(json& root, const std::string& spec, const json& defaults) {
  if (!is_utf8(spec))
    fail("config: override {} is not UTF-8 text (a config is JSON, saved as RUN_DIR/config.json)", show(json(spec)));
  auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0)
    fail("config: override '{}' must look like key.path=value (e.g. train.lr=3e-4)", spec);
  const std::string key = spec.substr(0, eq);
  const std::string text = spec.substr(eq + 1);
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    size_t dot = key.find('.', start);
    parts.push_back(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  for (const auto& p : parts)
    if (p.empty()) fail("config: override '{}' has an empty part in key path '{}'", spec, key);

  // The value: JSON when it parses, else the plain text. A string-typed key always takes the
  // text itself (so --set run.name=123 gives the name "123"), unless it is a quoted JSON string.
  const json* def = &defaults;
  for (const auto& p : parts) {
    if (def && def->is_object() && def->contains(p)) def = &(*def)[p];
    else def = nullptr;
  }
  json value;
  try {
    value = json::parse(text);
  } catch (const json::out_of_range&) {
    fail("config: override '{}': {} must fit a double (|x| < 1.8e308; got {})", spec, key, text);
  } catch (const json::exception&) {
    value = text;
  }
  if (def && def->is_string() && !value.is_string()) value = text;

  json* node = &root;
  std::string path;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    path = join_path(path, parts[i]);
    json& next = (*node)[parts[i]];
    if (next.is_null()) next = json::object();
    if (!next.is_object())
      fail("config: override '{}': {} is not an object (got {})", spec, path, show(next));
    node = &next;
  }
  (*node)[parts.back()] = std::move(value);
}

// ---- the whole config ------------------------------------------------------------------------
Config build(const json& j) {
  check_section(j, "", {"model", "train", "data", "run", kIncludeKey, kCommentKey});
  // Includes are resolved before overrides, so one can only appear here through --set.
  if (j.contains(kIncludeKey))
    fail("config: include cannot be set with --set (got {}); put it in the config file",
         show(j[kIncludeKey]));
  Config c;
  const json empty = json::object();
  auto section = [&](const char* name) -> const json& {
    auto it = j.find(name);
    return it == j.end() ? empty : *it;
  };

  const json& jm = section("model");
  auto model_keys = field_keys(kModelFields);
  model_keys.push_back(kModelAttentionKey);
  check_section(jm, "model", model_keys);
  read_fields(jm, "model", kModelFields, c.model);
  if (auto it = jm.find(kModelAttentionKey); it != jm.end()) read_attention(*it, c.model.attention);

  const json& jt = section("train");
  check_section(jt, "train", field_keys(kTrainFields));
  read_fields(jt, "train", kTrainFields, c.train);

  if (!j.contains("data"))
    fail("config: data is required: an object with data.train and data.val (token shard sets)");
  const json& jd = section("data");
  check_section(jd, "data", field_keys(kDataFields));
  read_fields(jd, "data", kDataFields, c.data);

  const json& jr = section("run");
  auto run_keys = field_keys(kRunFields);
  run_keys.push_back(kRunKernelsKey);
  check_section(jr, "run", run_keys);
  read_fields(jr, "run", kRunFields, c.run);
  if (auto it = jr.find(kRunKernelsKey); it != jr.end()) read_kernels(*it, c.run.kernels);

  check_dimensions(c);
  validate_model(c.model);
  validate_train(c.train);
  validate_data(jd, c.data);
  validate_run(c.run);
  check_products(c);
  c.resolved = to_json(c);
  return c;
}

Config finish(json j, const std::vector<std::string>& overrides) {
  // Every key's default, those of every attention variant included: a string-typed key's
  // override takes the text as given.
  json defaults = to_json(Config{});
  for (const auto& k : attention_kinds()) defaults["model"][kModelAttentionKey].update(k.defaults);
  for (const auto& o : overrides) apply_override(j, o, defaults);
  return build(j);
}

}  // namespace

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::vector<std::string> chain;
  std::vector<fs::path> canon_chain;
  json j = load_with_includes(fs::path(path), chain, canon_chain);
  Config c = finish(std::move(j), overrides);
  for (const std::string& line : apply_kernel_env(c.run.kernels)) spdlog::info("environment override: {}", line);
  c.resolved = to_json(c);
  return c;
}

Config parse_config(const json& j, const std::string& base_dir,
                    const std::vector<std::string>& overrides) {
  if (!j.is_object()) fail("config: the config must be a JSON object (got {})", show(j));
  std::vector<std::string> chain;
  std::vector<fs::path> canon_chain;
  json r = resolve_includes(j, fs::path(base_dir), chain, canon_chain);
  return finish(std::move(r), overrides);
}

Config parse_saved_config(const json& j, const std::string& base_dir) {
  json upgraded = j;
  auto m = upgraded.find("model");
  if (m != upgraded.end() && m->is_object()) {
    auto a = m->find(kModelAttentionKey);
    if (a != m->end() && a->is_object()) {
      const json type = a->value("type", json("mha"));
      const AttentionKind* own = nullptr;
      for (const auto& k : attention_kinds())
        if (type == k.name) own = &k;
      std::vector<std::string> drop;
      for (const auto& [key, value] : a->items()) {
        if (key == "type" || (own && contains(own->keys, key))) continue;
        for (const auto& k : attention_kinds())
          if (auto d = k.defaults.find(key); d != k.defaults.end() && *d == value) drop.push_back(key);
      }
      for (const auto& key : drop) a->erase(key);
    }
  }
  return parse_config(upgraded, base_dir);
}

json to_json(const Config& c) {
  json j = json::object();
  j["model"] = write_fields(kModelFields, c.model);
  j["model"][kModelAttentionKey] = attention_json(c.model.attention);
  j["train"] = write_fields(kTrainFields, c.train);
  j["data"] = write_fields(kDataFields, c.data);
  j["run"] = write_fields(kRunFields, c.run);
  j["run"][kRunKernelsKey] = kernels_json(c.run.kernels);
  return j;
}

}  // namespace dmat
