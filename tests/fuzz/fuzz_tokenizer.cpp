// Fuzz target: the tokenizer.json reader (load_tokenizer, src/tokenizer/bpe.cpp) and the tokenizer
// it builds. Input: NUL-separated parts: the tokenizer.json text; then a text to encode (a fixed
// sample without a second part). Properties of an accepted tokenizer: every id it produces is in
// its vocabulary; decode(encode(x)) is x (NFC(x) with an NFC normalizer; ByteLevel's
// add_prefix_space puts a space before each piece that lacks one); its JSON form (what
// `tokenizer train` writes) loads back as the same tokenizer.
#include "tokenizer/tokenizer.h"
#include "fuzz_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/normalize.h"

using namespace dmat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  return fuzz::mutate_json(data, size, max_size, seed, 2);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  const std::string path = fuzz::scratch_dir() + "/tokenizer.json";
  fuzz::write_bytes(path, parts[0]);
  const std::string text = parts.size() > 1 ? std::string(parts[1])
                                            : std::string("Hello, world! It's 2025: 12345 caf\xc3\xa9 \xe2\x80\x94 <|endoftext|>\r\n\tx");
  return fuzz::rejecting([&] {
    const std::unique_ptr<Tokenizer> tok = load_tokenizer(path);
    const auto& bpe = dynamic_cast<const BpeTokenizer&>(*tok);
    std::vector<uint32_t> ids;
    tok->encode(text, ids);
    for (uint32_t id : ids) fuzz::fuzz_require(id < tok->vocab_size(), "encode: id outside the vocabulary");
    std::string normal = text;
    if (bpe.definition().nfc) normal.clear(), tok::nfc(text, normal);
    std::string pieces;
    bpe.each_piece(normal, [&](std::string_view p) { pieces.append(p); });
    fuzz::fuzz_require(tok->decode(ids) == pieces, "decode(encode(x)) is not x's pre-tokenizer pieces");
    if (!bpe.definition().pretok.back().add_prefix_space)
      fuzz::fuzz_require(pieces == normal, "decode(encode(x)) != x");
    ids.clear();
    bpe.encode_with_special(text, ids);
    for (uint32_t id : ids) fuzz::fuzz_require(id < tok->vocab_size(), "encode_with_special: id outside the vocabulary");
    fuzz::fuzz_require(tok->eot_id() < tok->vocab_size(), "eot id outside the vocabulary");
    const BpeTokenizer again = BpeTokenizer::from_hf_json(nlohmann::json::parse(bpe.to_hf_json().dump()), "again");
    fuzz::fuzz_require(again.hash() == bpe.hash(), "the tokenizer's JSON form loads as another tokenizer");
  });
}
