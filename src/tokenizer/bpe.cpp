// Byte-level BPE: encode (pre-tokenize, merge by rank, per-thread cache), decode, tokenizer.json I/O.
#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <unordered_map>

#include <unistd.h>

#include "core/error.h"
#include "tokenizer/normalize.h"

namespace dmat {

namespace {

using ojson = nlohmann::ordered_json;

// The exact pattern strings of the Split pre-tokenizers we implement by hand.
constexpr const char* kGpt2Regex = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) s.push_back(char(cp));
  else if (cp < 0x800) s += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
  else s += {char(0xE0 | (cp >> 12)), char(0x80 | ((cp >> 6) & 0x3F)), char(0x80 | (cp & 0x3F))};
  return s;
}

struct ByteMap {
  std::string to[256];     // byte -> UTF-8 of its character
  int16_t from[512];       // code point (< 512) -> byte, -1 if none
  ByteMap() {
    std::fill(std::begin(from), std::end(from), int16_t(-1));
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = keep ? uint32_t(b) : uint32_t(256 + extra++);
      to[b] = utf8(cp);
      from[cp] = int16_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string to_byte_level(std::string_view bytes) {
  std::string s;
  for (unsigned char c : bytes) s += byte_map().to[c];
  return s;
}

// A tokenizer.json token string (byte-level characters) back to bytes; false if some character is
// not one of the 256 byte characters.
bool from_byte_level(std::string_view s, std::string& out) {
  out.clear();
  size_t i = 0;
  while (i < s.size()) {
    const auto c = tok::decode_utf8(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i);
    if (c.cp >= 512 || byte_map().from[c.cp] < 0) return false;
    out.push_back(char(byte_map().from[c.cp]));
    i += c.len;
  }
  return true;
}

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

inline uint64_t mix(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  return k;
}

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
};

// Per-thread cache of piece -> ids, keyed by the tokenizer instance that filled it.
struct PieceCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<uint32_t>, SvHash, std::equal_to<>> map;
};
constexpr size_t kCacheLimit = 1 << 19;

std::string describe_json(const nlohmann::json& j) {
  std::string s = j.dump();
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

// A string field of a JSON object: `def` when absent or null, an error naming the field when it is
// not a string (nlohmann's value() would throw its own type_error, naming neither file nor field).
std::string string_field(const nlohmann::json& obj, const char* key, const std::string& def, const std::string& origin,
                         const std::string& where) {
  if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return def;
  if (!obj[key].is_string())
    fail("tokenizer {}: {}.{} must be a string (got {})", origin, where, key, describe_json(obj[key]));
  return obj[key].get<std::string>();
}

}  // namespace

const std::string& byte_to_unicode_utf8(uint8_t b) { return byte_map().to[b]; }

std::vector<PreTokStage> pretokenizer_preset(const std::string& name) {
  if (name == "gpt2") return {PreTokStage{PreTokStage::kByteLevel, 3, true, false, true}};
  if (name == "llama3")
    return {PreTokStage{PreTokStage::kSplitLlama3, 3, true, false, false},
            PreTokStage{PreTokStage::kByteLevel, 3, true, false, false}};
  fail("tokenizer: unknown pre-tokenizer \"{}\" (expected gpt2 or llama3)", name);
}

// ---- construction ------------------------------------------------------------------------------

BpeTokenizer::BpeTokenizer(BpeDefinition def, std::string origin) : def_(std::move(def)), origin_(std::move(origin)) {
  static std::atomic<uint64_t> next_instance{1};
  instance_ = next_instance.fetch_add(1);
  const auto& T = def_.tokens;
  if (T.size() > uint64_t(UINT32_MAX)) fail("tokenizer {}: vocabulary too large", origin_);
  if (def_.pretok.empty() || def_.pretok.back().kind != PreTokStage::kByteLevel)
    fail("tokenizer {}: the pre-tokenizer must end with ByteLevel", origin_);
  for (size_t k = 0; k + 1 < def_.pretok.size(); ++k)
    if (def_.pretok[k].kind == PreTokStage::kByteLevel)
      fail("tokenizer {}: ByteLevel must be the last pre-tokenizer stage", origin_);
  // Byte tokens: the first id whose bytes are that single byte (an added token never counts).
  std::vector<uint8_t> is_added(T.size(), 0);
  for (const auto& [id, content] : def_.added) {
    if (id >= T.size()) fail("tokenizer {}: added token id {} outside the vocabulary", origin_, id);
    is_added[id] = 1;
  }
  std::vector<int64_t> byte_id(256, -1);
  for (size_t id = 0; id < T.size(); ++id)
    if (T[id].size() == 1 && !is_added[id] && byte_id[static_cast<unsigned char>(T[id][0])] < 0)
      byte_id[static_cast<unsigned char>(T[id][0])] = int64_t(id);
  for (int b = 0; b < 256; ++b) {
    if (byte_id[size_t(b)] < 0)
      fail("tokenizer {}: the vocabulary has no token for byte 0x{:02X} (\"{}\"); a byte-level BPE needs all 256",
           origin_, b, byte_map().to[b]);
    byte_id_[b] = uint32_t(byte_id[size_t(b)]);
  }
  // Merge table: open addressing, key (a << 32 | b) + 1, 0 = empty slot.
  size_t cap = 16;
  while (cap < def_.merges.size() * 2 + 2) cap <<= 1;
  merge_keys_.assign(cap, 0);
  merge_vals_.assign(cap, Merge{0, 0});
  merge_mask_ = cap - 1;
  std::unordered_map<std::string_view, uint32_t> by_bytes;
  for (size_t id = 0; id < T.size(); ++id)
    if (!T[id].empty() && !is_added[id]) by_bytes.emplace(T[id], uint32_t(id));
  std::string joined;
  for (size_t r = 0; r < def_.merges.size(); ++r) {
    const auto [a, b] = def_.merges[r];
    if (a >= T.size() || b >= T.size() || T[a].empty() || T[b].empty())
      fail("tokenizer {}: merge {} refers to an id outside the vocabulary", origin_, r);
    joined = T[a] + T[b];
    auto it = by_bytes.find(joined);
    if (it == by_bytes.end())
      fail("tokenizer {}: merge {} (\"{} {}\") makes \"{}\", which is not in the vocabulary", origin_, r,
           to_byte_level(T[a]), to_byte_level(T[b]), to_byte_level(joined));
    const uint64_t key = ((uint64_t(a) << 32) | b) + 1;
    size_t slot = mix(key) & merge_mask_;
    while (merge_keys_[slot] != 0 && merge_keys_[slot] != key) slot = (slot + 1) & merge_mask_;
    if (merge_keys_[slot] == key) continue;  // a repeated merge: the first (lowest rank) wins
    merge_keys_[slot] = key;
    merge_vals_[slot] = Merge{uint32_t(r), it->second};
  }
  if (def_.ignore_merges)
    for (const auto& [bytes, id] : by_bytes) whole_.emplace(std::string(bytes), id);
  // The end-of-document token.
  bool found = false;
  for (const auto& [id, content] : def_.added)
    if (content == def_.eot) eot_id_ = id, found = true;
  if (!found) fail("tokenizer {}: the end-of-document token \"{}\" is not an added token", origin_, def_.eot);
  hash_ = fmt::format("bpe-{:016x}", fnv1a64(to_hf_json().dump()));
}

BpeTokenizer BpeTokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("tokenizer {}: cannot open: {}", path, std::strerror(errno));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("tokenizer {}: not valid JSON ({})", path, e.what());
  }
  return from_hf_json(j, path);
}

namespace {

void parse_stage(const nlohmann::json& s, const std::string& origin, std::vector<PreTokStage>& out) {
  if (!s.is_object() || !s.contains("type") || !s["type"].is_string())
    fail("tokenizer {}: pre_tokenizer entry {} has no \"type\"", origin, describe_json(s));
  const std::string type = s["type"];
  auto flag = [&](const char* k, bool def) {
    if (!s.contains(k) || s[k].is_null()) return def;
    if (!s[k].is_boolean()) fail("tokenizer {}: pre_tokenizer {}.{} must be true or false", origin, type, k);
    return s[k].get<bool>();
  };
  PreTokStage st;
  if (type == "Sequence") {
    if (!s.contains("pretokenizers") || !s["pretokenizers"].is_array())
      fail("tokenizer {}: pre_tokenizer Sequence needs a \"pretokenizers\" array", origin);
    for (const auto& x : s["pretokenizers"]) parse_stage(x, origin, out);
    return;
  } else if (type == "ByteLevel") {
    st.kind = PreTokStage::kByteLevel;
    st.add_prefix_space = flag("add_prefix_space", false);
    st.use_regex = flag("use_regex", true);
  } else if (type == "Digits") {
    st.kind = PreTokStage::kDigits;
    st.individual_digits = flag("individual_digits", false);
  } else if (type == "Split") {
    const auto& p = s.value("pattern", nlohmann::json());
    const std::string behavior = string_field(s, "behavior", "", origin, "pre_tokenizer Split");
    if (!p.is_object() || !p.contains("Regex") || !p["Regex"].is_string())
      fail("tokenizer {}: Split pre-tokenizer with pattern {} is not supported (expected one of the GPT-2, "
           "LLaMA-3 or Qwen2 regexes)", origin, describe_json(p));
    const std::string re = p["Regex"];
    if (re == kGpt2Regex) st.kind = PreTokStage::kSplitGpt2;
    else if (re == kLlama3Regex) st.kind = PreTokStage::kSplitLlama3, st.digit_run = 3;
    else if (re == kQwen2Regex) st.kind = PreTokStage::kSplitLlama3, st.digit_run = 1;
    else
      fail("tokenizer {}: Split regex {} is not supported (dmatrain implements the GPT-2, LLaMA-3 and Qwen2 "
           "regexes by hand)", origin, describe_json(p["Regex"]));
    if (behavior != "Isolated" || flag("invert", false))
      fail("tokenizer {}: Split pre-tokenizer must have behavior \"Isolated\" and invert false (got {}, {})", origin,
           behavior, s.value("invert", nlohmann::json()).dump());
  } else {
    fail("tokenizer {}: pre_tokenizer type \"{}\" is not supported (supported: ByteLevel, Split, Digits, Sequence)",
         origin, type);
  }
  out.push_back(st);
}

nlohmann::ordered_json stage_json(const PreTokStage& s) {
  ojson j;
  switch (s.kind) {
    case PreTokStage::kByteLevel:
      j["type"] = "ByteLevel";
      j["add_prefix_space"] = s.add_prefix_space;
      j["trim_offsets"] = true;
      j["use_regex"] = s.use_regex;
      break;
    case PreTokStage::kDigits:
      j["type"] = "Digits";
      j["individual_digits"] = s.individual_digits;
      break;
    case PreTokStage::kSplitGpt2:
    case PreTokStage::kSplitLlama3:
      j["type"] = "Split";
      j["pattern"] = {{"Regex", s.kind == PreTokStage::kSplitGpt2 ? kGpt2Regex
                                : s.digit_run == 1                  ? kQwen2Regex
                                                                    : kLlama3Regex}};
      j["behavior"] = "Isolated";
      j["invert"] = false;
      break;
  }
  return j;
}

}  // namespace

BpeTokenizer BpeTokenizer::from_hf_json(const nlohmann::json& j, const std::string& origin) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    fail("tokenizer {}: not a Hugging Face tokenizer.json (no \"model\" object)", origin);
  const auto& m = j["model"];
  const std::string type = string_field(m, "type", "(none)", origin, "model");
  if (type != "BPE")
    fail("tokenizer {}: model type \"{}\" is not supported (dmatrain reads byte-level BPE models, type \"BPE\")",
         origin, type);
  auto must_be_off = [&](const char* key) {
    if (!m.contains(key) || m[key].is_null() || m[key] == false || m[key] == "") return;
    fail("tokenizer {}: model.{} = {} is not supported (byte-level BPE without it)", origin, key, m[key].dump());
  };
  for (const char* k : {"dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"}) must_be_off(k);
  BpeDefinition d;
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    // null, NFC, or a Sequence of at most one NFC.
    const auto& n = j["normalizer"];
    const bool seq = string_field(n, "type", "", origin, "normalizer") == "Sequence" && n.contains("normalizers") &&
                     n["normalizers"].is_array();
    const auto& list = seq ? n["normalizers"] : nlohmann::json::array({n});
    if (list.size() > 1 ||
        (list.size() == 1 && (!list[0].is_object() || string_field(list[0], "type", "", origin, "normalizer") != "NFC")))
      fail("tokenizer {}: normalizer {} is not supported (dmatrain implements null and NFC)", origin, describe_json(n));
    d.nfc = list.size() == 1;
  }
  d.pretok.clear();
  if (!j.contains("pre_tokenizer") || j["pre_tokenizer"].is_null())
    fail("tokenizer {}: no pre_tokenizer (a byte-level BPE needs ByteLevel)", origin);
  parse_stage(j["pre_tokenizer"], origin, d.pretok);
  if (d.pretok.empty() || d.pretok.back().kind != PreTokStage::kByteLevel)
    fail("tokenizer {}: the pre_tokenizer must end with ByteLevel (got {})", origin, describe_json(j["pre_tokenizer"]));
  if (!j.contains("decoder") || !j["decoder"].is_object() ||
      string_field(j["decoder"], "type", "", origin, "decoder") != "ByteLevel")
    fail("tokenizer {}: decoder {} is not supported (expected ByteLevel)", origin,
         describe_json(j.value("decoder", nlohmann::json())));
  d.ignore_merges = m.contains("ignore_merges") && m["ignore_merges"].is_boolean() && m["ignore_merges"].get<bool>();

  // Vocabulary: ids may have gaps; the size is the largest id + 1 (model vocab and added tokens).
  if (!m.contains("vocab") || !m["vocab"].is_object()) fail("tokenizer {}: model.vocab must be an object", origin);
  // Ids are compared as uint64 (an id beyond INT64_MAX read as int64 would turn negative and slip past the bound).
  uint64_t max_id = 0;
  bool any = false;
  for (const auto& [tok, id] : m["vocab"].items()) {
    if (!id.is_number_unsigned()) fail("tokenizer {}: model.vocab[\"{}\"] is not a non-negative integer", origin, tok);
    max_id = std::max(max_id, id.get<uint64_t>()), any = true;
  }
  if (j.contains("added_tokens") && !j["added_tokens"].is_null() && !j["added_tokens"].is_array())
    fail("tokenizer {}: added_tokens must be an array (got {})", origin, describe_json(j["added_tokens"]));
  const auto added_json = j.value("added_tokens", nlohmann::json::array());
  for (const auto& a : added_json) {
    if (!a.is_object() || !a.contains("id") || !a["id"].is_number_unsigned() || !a.contains("content") ||
        !a["content"].is_string())
      fail("tokenizer {}: added_tokens entry {} needs an \"id\" and a \"content\"", origin, describe_json(a));
    max_id = std::max(max_id, a["id"].get<uint64_t>()), any = true;
  }
  if (!any) fail("tokenizer {}: empty vocabulary", origin);
  // Ids may leave gaps (reserved ids, an added token at a round number), but the table below has
  // max_id + 1 entries: an id of 2^31 in a 3 KB file must not allocate gigabytes. So the ids are
  // bounded by the tokens the file defines plus at most 2^20 unused ids.
  const uint64_t defined = m["vocab"].size() + added_json.size(), limit = defined + (uint64_t(1) << 20);
  if (max_id >= limit)
    fail("tokenizer {}: token id {} is outside the vocabulary: the file defines {} tokens (model.vocab and "
         "added_tokens) and ids may leave at most 2^20 unused, so ids must be < {}",
         origin, max_id, defined, limit);
  d.tokens.assign(size_t(max_id + 1), std::string());
  std::unordered_map<std::string, uint32_t> by_text;
  std::string bytes;
  for (const auto& [tok, idj] : m["vocab"].items()) {
    const auto id = idj.get<uint32_t>();
    if (!from_byte_level(tok, bytes) || bytes.empty())
      fail("tokenizer {}: vocab token \"{}\" (id {}) is not spelled in byte-level characters", origin, tok, id);
    if (!d.tokens[id].empty()) fail("tokenizer {}: id {} is used by two vocab tokens", origin, id);
    d.tokens[id] = bytes;
    by_text.emplace(tok, id);
  }
  for (const auto& a : added_json) {
    const auto id = a["id"].get<uint32_t>();
    const std::string content = a["content"];
    if (content.empty()) fail("tokenizer {}: added token {} has empty content", origin, id);
    d.tokens[id] = content;
    d.added.emplace_back(id, content);
  }
  // Merges: "a b" strings (older files) or ["a", "b"] pairs.
  if (!m.contains("merges") || !m["merges"].is_array()) fail("tokenizer {}: model.merges must be an array", origin);
  const auto& merges = m["merges"];
  d.merges.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    std::string a, b;
    const auto& x = merges[r];
    if (x.is_string()) {
      const std::string s = x;
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("tokenizer {}: merge {} \"{}\" is not two tokens separated by one space", origin, r, s);
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else if (x.is_array() && x.size() == 2 && x[0].is_string() && x[1].is_string()) {
      a = x[0], b = x[1];
    } else {
      fail("tokenizer {}: merge {} is {} (expected \"a b\" or [\"a\", \"b\"])", origin, r, describe_json(x));
    }
    auto ia = by_text.find(a), ib = by_text.find(b);
    if (ia == by_text.end() || ib == by_text.end())
      fail("tokenizer {}: merge {} (\"{} {}\") uses a token that is not in the vocabulary", origin, r, a, b);
    d.merges.emplace_back(ia->second, ib->second);
  }
  // The end-of-document token: the first of these names that is an added token.
  for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>"}) {
    for (const auto& [id, content] : d.added)
      if (content == name) d.eot = content;
    if (!d.eot.empty()) break;
  }
  if (d.eot.empty()) {
    std::string names;
    for (size_t i = 0; i < d.added.size() && i < 8; ++i) names += (i ? ", " : "") + d.added[i].second;
    fail("tokenizer {}: no end-of-document token among the added tokens (looked for <|endoftext|>, "
         "<|end_of_text|>, </s>, <eos>, <|eos|>, <|im_end|>; found: {})", origin, names.empty() ? "none" : names);
  }
  return BpeTokenizer(std::move(d), origin);
}

nlohmann::ordered_json BpeTokenizer::to_hf_json() const {
  ojson j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  ojson added = ojson::array();
  std::vector<std::pair<uint32_t, std::string>> sorted_added = def_.added;
  std::sort(sorted_added.begin(), sorted_added.end());
  for (const auto& [id, content] : sorted_added)
    added.push_back({{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
  j["added_tokens"] = added;
  if (def_.nfc) j["normalizer"] = {{"type", "NFC"}};
  else j["normalizer"] = nullptr;
  if (def_.pretok.size() == 1) {
    j["pre_tokenizer"] = stage_json(def_.pretok[0]);
  } else {
    ojson seq = ojson::array();
    for (const auto& s : def_.pretok) seq.push_back(stage_json(s));
    j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", seq}};
  }
  j["post_processor"] = nullptr;
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = def_.ignore_merges;
  ojson vocab = ojson::object();
  std::vector<uint8_t> is_added(def_.tokens.size(), 0);
  for (const auto& a : def_.added) is_added[a.first] = 1;
  for (size_t id = 0; id < def_.tokens.size(); ++id)
    if (!def_.tokens[id].empty() && !is_added[id]) vocab[to_byte_level(def_.tokens[id])] = id;
  model["vocab"] = vocab;
  ojson merges = ojson::array();
  for (const auto& [a, b] : def_.merges) merges.push_back(to_byte_level(def_.tokens[a]) + " " + to_byte_level(def_.tokens[b]));
  model["merges"] = merges;
  j["model"] = model;
  return j;
}

void BpeTokenizer::save(const std::string& path, bool overwrite) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(path, ec) && !overwrite)
    fail("tokenizer: {} already exists; refusing to overwrite it (pass --overwrite)", path);
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  const std::string tmp = path + fmt::format(".tmp-{}", ::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("tokenizer: cannot write {}: {}", tmp, std::strerror(errno));
    const std::string s = to_hf_json().dump(1, ' ', false, nlohmann::json::error_handler_t::strict);
    f.write(s.data(), std::streamsize(s.size()));
    f.put('\n');
    if (!f) fail("tokenizer: write failed for {}", tmp);
  }
  fs::rename(tmp, path, ec);
  if (ec) fail("tokenizer: cannot rename {} to {}: {}", tmp, path, ec.message());
}

// ---- encoding ------------------------------------------------------------------------------------

const BpeTokenizer::Merge* BpeTokenizer::find_merge(uint32_t a, uint32_t b) const {
  const uint64_t key = ((uint64_t(a) << 32) | b) + 1;
  size_t slot = mix(key) & merge_mask_;
  for (;;) {
    const uint64_t k = merge_keys_[slot];
    if (k == key) return &merge_vals_[slot];
    if (k == 0) return nullptr;
    slot = (slot + 1) & merge_mask_;
  }
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  if (n == 0) return;
  if (n == 1) {
    out.push_back(byte_id_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (def_.ignore_merges) {
    auto it = whole_.find(std::string(piece));
    if (it != whole_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Symbols in a linked list; a heap of candidate merges ordered by (rank, position), validated on
  // pop (the two symbols must still be there with the same ids), as HF's BPE does.
  struct Cand {
    uint32_t rank, pos, left, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<uint32_t> id;
  thread_local std::vector<int32_t> next, prev;
  thread_local std::vector<Cand> heap_buf;
  id.resize(n), next.resize(n), prev.resize(n);
  for (size_t i = 0; i < n; ++i) {
    id[i] = byte_id_[static_cast<unsigned char>(piece[i])];
    next[i] = i + 1 < n ? int32_t(i + 1) : -1;
    prev[i] = int32_t(i) - 1;
  }
  heap_buf.clear();
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap(std::greater<Cand>(), std::move(heap_buf));
  auto consider = [&](int32_t i) {
    if (i < 0 || next[size_t(i)] < 0) return;
    if (const Merge* m = find_merge(id[size_t(i)], id[size_t(next[size_t(i)])]))
      heap.push(Cand{m->rank, uint32_t(i), id[size_t(i)], m->id});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(int32_t(i));
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int32_t j = next[c.pos];
    if (id[c.pos] != c.left || j < 0) continue;  // merged away or changed
    const Merge* m = find_merge(id[c.pos], id[size_t(j)]);
    if (!m || m->id != c.id) continue;
    id[c.pos] = c.id;
    id[size_t(j)] = UINT32_MAX;  // dead
    next[c.pos] = next[size_t(j)];
    if (next[c.pos] >= 0) prev[size_t(next[c.pos])] = int32_t(c.pos);
    consider(prev[c.pos]);
    consider(int32_t(c.pos));
  }
  for (int32_t i = 0; i >= 0; i = next[size_t(i)]) out.push_back(id[size_t(i)]);
}

template <class F>
void BpeTokenizer::for_each_piece(std::string_view text, F&& f) const {
  thread_local std::vector<std::vector<std::string_view>> bufs;
  if (bufs.size() < def_.pretok.size()) bufs.resize(def_.pretok.size());
  std::string prefixed;
  auto stage = [&](auto&& self, size_t k, std::string_view s) -> void {
    const PreTokStage& st = def_.pretok[k];
    std::vector<std::string_view>& out = bufs[k];
    out.clear();
    if (st.kind == PreTokStage::kByteLevel) {
      if (st.add_prefix_space && (s.empty() || s[0] != ' ')) {
        prefixed.assign(1, ' ');
        prefixed.append(s);
        s = prefixed;
      }
      if (!st.use_regex) return f(s);
      tok::split_regex(tok::SplitPattern::kGpt2, s, out);
      for (auto p : out) f(p);
      return;
    }
    if (st.kind == PreTokStage::kDigits) tok::split_digits(s, st.individual_digits, out);
    else tok::split_regex(st.kind == PreTokStage::kSplitGpt2 ? tok::SplitPattern::kGpt2 : tok::SplitPattern::kLlama3, s, out,
                          st.digit_run);
    const size_t n = out.size();
    for (size_t i = 0; i < n; ++i) self(self, k + 1, bufs[k][i]);
  };
  if (!text.empty()) stage(stage, 0, text);
}

void BpeTokenizer::each_piece(std::string_view text, const std::function<void(std::string_view)>& f) const {
  for_each_piece(text, f);
}

void BpeTokenizer::pretokenize(std::string_view text, std::vector<std::string>& pieces) const {
  for_each_piece(text, [&](std::string_view p) { pieces.emplace_back(p); });
}

void BpeTokenizer::encode_plain(std::string_view text, std::vector<uint32_t>& out) const {
  thread_local PieceCache cache;
  if (cache.owner != instance_ || cache.map.size() > kCacheLimit) {
    cache.map.clear();
    cache.owner = instance_;
  }
  thread_local std::string normalized;
  if (def_.nfc) {
    tok::nfc(text, normalized);
    text = normalized;
  }
  for_each_piece(text, [&](std::string_view p) {
    if (p.size() == 1) {
      out.push_back(byte_id_[static_cast<unsigned char>(p[0])]);
      return;
    }
    auto it = cache.map.find(p);
    if (it != cache.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
    const size_t start = out.size();
    encode_piece(p, out);
    if (p.size() <= 256) cache.map.emplace(std::string(p), std::vector<uint32_t>(out.begin() + int64_t(start), out.end()));
  });
}

void BpeTokenizer::encode(std::string_view text, std::vector<uint32_t>& out) const { encode_plain(text, out); }

void BpeTokenizer::encode_with_special(std::string_view text, std::vector<uint32_t>& out) const {
  size_t i = 0;
  while (i < text.size()) {
    size_t best = std::string_view::npos, best_len = 0;
    uint32_t best_id = 0;
    for (const auto& [id, content] : def_.added) {
      const size_t p = text.find(content, i);
      if (p < best || (p == best && content.size() > best_len)) best = p, best_len = content.size(), best_id = id;
    }
    if (best == std::string_view::npos) break;
    encode_plain(text.substr(i, best - i), out);
    out.push_back(best_id);
    i = best + best_len;
  }
  if (i < text.size()) encode_plain(text.substr(i), out);
}

std::string BpeTokenizer::decode(const std::vector<uint32_t>& ids) const {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint32_t id = ids[i];
    if (id >= def_.tokens.size() || def_.tokens[id].empty())
      fail("tokenizer {}: id {} at position {} is not in the vocabulary (size {})", origin_, id, i, def_.tokens.size());
    s += def_.tokens[id];
  }
  return s;
}

}  // namespace dmat
