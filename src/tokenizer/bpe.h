// Byte-level BPE tokenizer (GPT-2 / LLaMA-3 / SmolLM family) and its Hugging Face tokenizer.json form.
//
// A token is a byte string. Encoding: split the text on added (special) tokens when asked to, run the
// pre-tokenizer stages (regex split, digits split, ByteLevel), then merge each piece's bytes by merge
// rank (lowest rank first, leftmost first among equal ranks, as HF does). Every byte has a token, so
// any byte string encodes, invalid UTF-8 included, and decode(encode(x)) == x.
//
// tokenizer.json support (what loads, everything else is refused with an error naming the file and the
// field): model.type "BPE" without dropout, byte_fallback, continuing_subword_prefix or
// end_of_word_suffix, a vocab holding all 256 byte tokens; merges as "a b" strings or ["a","b"] pairs;
// ignore_merges honoured; normalizer null or NFC (then decode(encode(x)) is NFC(x)); pre_tokenizer ByteLevel, or a Sequence of Split (the GPT-2,
// LLaMA-3 or Qwen2 regex, behavior Isolated, not inverted), Digits and a final ByteLevel; decoder
// ByteLevel. post_processor is ignored (dmatrain never adds BOS; data prepare appends the end token).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"
#include "tokenizer/pretokenize.h"

namespace dmat {

struct PreTokStage {
  enum Kind : uint8_t { kSplitGpt2, kSplitLlama3, kDigits, kByteLevel } kind = kByteLevel;
  int digit_run = 3;             // kSplitLlama3: \p{N}{1,digit_run}
  bool individual_digits = true; // kDigits
  bool add_prefix_space = false; // kByteLevel
  bool use_regex = true;         // kByteLevel: split with the GPT-2 regex
  bool operator==(const PreTokStage&) const = default;
};

// The two pre-tokenizers `tokenizer train` offers.
std::vector<PreTokStage> pretokenizer_preset(const std::string& name);  // "gpt2" | "llama3"

// Everything that defines a byte-level BPE tokenizer.
struct BpeDefinition {
  std::vector<std::string> tokens;                  // id -> bytes; empty = unused id
  std::vector<std::pair<uint32_t, uint32_t>> merges;  // in rank order; result is tokens[a] + tokens[b]
  std::vector<std::pair<uint32_t, std::string>> added;  // added tokens (id, content), all treated as special
  std::vector<PreTokStage> pretok = pretokenizer_preset("llama3");
  bool ignore_merges = false;
  bool nfc = false;  // normalizer NFC (GPT-NeoX): applied to text before pre-tokenization
  std::string eot;  // content of the end-of-document token (one of `added`)
};

class BpeTokenizer final : public Tokenizer {
 public:
  // origin names the definition in errors (a file path).
  BpeTokenizer(BpeDefinition def, std::string origin);
  static BpeTokenizer load(const std::string& path);
  static BpeTokenizer from_hf_json(const nlohmann::json& j, const std::string& origin);

  nlohmann::ordered_json to_hf_json() const;
  // Writes the tokenizer.json (temp file + rename); refuses an existing file unless overwrite.
  void save(const std::string& path, bool overwrite) const;

  std::string name() const override { return "bpe"; }
  uint32_t vocab_size() const override { return uint32_t(def_.tokens.size()); }
  uint32_t eot_id() const override { return eot_id_; }
  // Plain text: added-token strings in the text are ordinary text (a document cannot forge an end).
  void encode(std::string_view text, std::vector<uint32_t>& out) const override;
  // As HF tokenizers' encode(add_special_tokens=False): added-token strings become their ids.
  void encode_with_special(std::string_view text, std::vector<uint32_t>& out) const;
  std::string decode(const std::vector<uint32_t>& ids) const override;  // added tokens as their content
  std::string hash() const override { return hash_; }

  const BpeDefinition& definition() const { return def_; }
  const std::string& origin() const { return origin_; }
  // Pre-tokenizer pieces of text (no added-token handling), for tests and training.
  void pretokenize(std::string_view text, std::vector<std::string>& pieces) const;
  // Calls f on each pre-tokenizer piece of text, in order (the pieces concatenate to text, except for
  // ByteLevel's add_prefix_space).
  void each_piece(std::string_view text, const std::function<void(std::string_view)>& f) const;
  // Merges one piece's bytes (no pre-tokenization, no cache).
  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;

 private:
  struct Merge {
    uint32_t rank, id;
  };
  template <class F>
  void for_each_piece(std::string_view text, F&& f) const;
  void encode_plain(std::string_view text, std::vector<uint32_t>& out) const;
  const Merge* find_merge(uint32_t a, uint32_t b) const;

  BpeDefinition def_;
  std::string origin_, hash_;
  uint32_t eot_id_ = 0;
  uint64_t instance_ = 0;  // keys the per-thread encode cache
  uint32_t byte_id_[256] = {};
  // Open-addressing table of merges keyed by (a, b).
  std::vector<uint64_t> merge_keys_;
  std::vector<Merge> merge_vals_;
  uint64_t merge_mask_ = 0;
  std::unordered_map<std::string, uint32_t> whole_;  // ignore_merges: token bytes -> id
};

// GPT-2's map from bytes to printable characters (tokenizer.json spells token bytes with it).
const std::string& byte_to_unicode_utf8(uint8_t b);

}  // namespace dmat
