// Tokenizers turn bytes into token ids and back. The byte-level tokenizer (ids 0-255 are the bytes,
// 256 is the end-of-document token) needs no files; byte-level BPE tokenizers (src/tokenizer) load from
// Hugging Face tokenizer.json files behind the same interface.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dmat {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string name() const = 0;
  virtual uint32_t vocab_size() const = 0;
  virtual uint32_t eot_id() const = 0;  // appended after every document
  virtual void encode(std::string_view text, std::vector<uint32_t>& out) const = 0;  // appends
  virtual std::string decode(const std::vector<uint32_t>& ids) const = 0;
  // A stable hash of the tokenizer's definition (recorded in manifests).
  virtual std::string hash() const = 0;
};

// "byte" -> the byte-level tokenizer; the path of a tokenizer.json -> the byte-level BPE it holds
// (tokenizer/bpe.h); otherwise an error naming the spec and what is supported.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace dmat
