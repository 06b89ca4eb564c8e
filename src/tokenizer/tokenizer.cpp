// Tokenizer registry and the byte-level tokenizer.
#include "tokenizer/tokenizer.h"

#include <filesystem>

#include "core/error.h"
#include "tokenizer/bpe.h"

namespace dmat {

namespace {

// Ids 0-255 are the bytes themselves (any byte string, valid UTF-8 or not, round-trips);
// 256 marks the end of a document and decodes to nothing.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr uint32_t kEot = 256;
  std::string name() const override { return "byte"; }
  uint32_t vocab_size() const override { return 257; }
  uint32_t eot_id() const override { return kEot; }
  void encode(std::string_view text, std::vector<uint32_t>& out) const override {
    out.reserve(out.size() + text.size());
    for (char c : text) out.push_back(uint32_t(static_cast<unsigned char>(c)));
  }
  std::string decode(const std::vector<uint32_t>& ids) const override {
    std::string s;
    s.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const uint32_t id = ids[i];
      if (id < 256) s.push_back(char(static_cast<unsigned char>(id)));
      else if (id != kEot) fail("byte tokenizer: id {} at position {} is outside the vocabulary (0-256)", id, i);
    }
    return s;
  }
  // Bump the version if the id assignment ever changes: shards made before are then recognisably stale.
  std::string hash() const override { return "byte-v1"; }
};

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  std::error_code ec;
  if (std::filesystem::is_regular_file(spec, ec)) return std::make_unique<BpeTokenizer>(BpeTokenizer::load(spec));
  fail("tokenizer \"{}\": not \"byte\" and not an existing file (expected \"byte\" or the path of a Hugging Face "
       "tokenizer.json holding a byte-level BPE)", spec);
}

}  // namespace dmat
