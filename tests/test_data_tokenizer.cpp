// Byte-level BPE tokenizer (suite of the data library, which links src/tokenizer): pre-tokenizer regexes, hand-checked merges, training, tokenizer.json I/O,
// HF reference encodings (tests/fixtures/tokenizer/hf, when generated), data prepare with BPE.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/bpe_train.h"
#include "tokenizer/normalize.h"
#include "tokenizer/pretokenize.h"

namespace fs = std::filesystem;
using dmat::test::expect_error;
using dmat::test::file_bytes;
using dmat::test::write_bytes;
using dmat::BpeTokenizer;
using dmat::Error;
using Ids = std::vector<uint32_t>;
using Pieces = std::vector<std::string>;

namespace {

std::string fixtures() { return dmat::test::source_dir() + "/tests/fixtures/tokenizer"; }

Pieces split(dmat::tok::SplitPattern p, std::string_view s, int digit_run = 3) {
  std::vector<std::string_view> v;
  dmat::tok::split_regex(p, s, v, digit_run);
  return Pieces(v.begin(), v.end());
}
Pieces gpt2(std::string_view s) { return split(dmat::tok::SplitPattern::kGpt2, s); }
Pieces llama3(std::string_view s) { return split(dmat::tok::SplitPattern::kLlama3, s); }

Ids enc(const BpeTokenizer& t, std::string_view s) {
  Ids ids;
  t.encode(s, ids);
  return ids;
}

std::vector<std::string> cases() {
  const auto j = nlohmann::json::parse(file_bytes(fixtures() + "/cases.json"));
  return j.at("cases").get<std::vector<std::string>>();
}

// A tokenizer trained on the bundled English corpus (cached per process).
const BpeTokenizer& english_tokenizer(const std::string& pretok) {
  static std::map<std::string, std::unique_ptr<BpeTokenizer>> cache;
  auto& t = cache[pretok];
  if (!t) {
    dmat::PieceCounter c(pretok, 2);
    std::vector<std::string> docs = {file_bytes(dmat::test::source_dir() + "/data/english/devils_dictionary.txt"),
                                     file_bytes(dmat::test::source_dir() + "/data/english/kjv_bible.txt")};
    c.add(docs);
    dmat::BpeTrainOptions o;
    o.vocab_size = 2000;
    o.pretokenizer = pretok;
    t = std::make_unique<BpeTokenizer>(dmat::train_bpe(c.finish(), o, "english-" + pretok));
  }
  return *t;
}

}  // namespace

// ---- pre-tokenizer ---------------------------------------------------------------------------------

TEST(TokenizerPretok, Gpt2HandChecked) {
  // "  end": the run of two spaces keeps its last space for the word; "\n\nx": a run of newlines before
  // a non-space gives up its last newline, which (not a space) then stands alone.
  EXPECT_EQ(gpt2("Hello world's  end\n\nx 123abc"),
            (Pieces{"Hello", " world", "'s", " ", " end", "\n", "\n", "x", " 123", "abc"}));
  EXPECT_EQ(gpt2("x!!\n\ny"), (Pieces{"x", "!!", "\n", "\n", "y"}));
  EXPECT_EQ(gpt2("don't ''s HE'S"), (Pieces{"don", "'t", " ''", "s", " HE", "'", "S"}));  // case-sensitive
  EXPECT_EQ(gpt2("trailing   "), (Pieces{"trailing", "   "}));  // whitespace to the end stays whole
  EXPECT_EQ(gpt2("café 😀😀 ١٢٣"), (Pieces{"café", " 😀😀", " ١٢٣"}));
  EXPECT_EQ(gpt2("a\xff\xfe" "b"), (Pieces{"a", "\xff\xfe", "b"}));  // invalid bytes: neither L, N nor space
  EXPECT_EQ(gpt2("\t\tx\u3000\u3000y"), (Pieces{"\t", "\t", "x", "\u3000", "\u3000", "y"}));
  EXPECT_EQ(gpt2(""), Pieces{});
}

TEST(TokenizerPretok, Llama3HandChecked) {
  EXPECT_EQ(llama3("Hello world's  end\n\nx 123abc"),
            (Pieces{"Hello", " world", "'s", " ", " end", "\n\n", "x", " ", "123", "abc"}));
  EXPECT_EQ(llama3("x!!\n\ny"), (Pieces{"x", "!!\n\n", "y"}));  // punctuation takes the newlines after it
  EXPECT_EQ(llama3("HE'S it'LL (hello"), (Pieces{"HE", "'S", " it", "'LL", " (", "hello"}));  // case-insensitive
  EXPECT_EQ(llama3("(hello"), (Pieces{"(hello"}));  // one leading non-letter joins the word; " (" is two
  EXPECT_EQ(llama3("1234567"), (Pieces{"123", "456", "7"}));
  EXPECT_EQ(split(dmat::tok::SplitPattern::kLlama3, "1234", 1), (Pieces{"1", "2", "3", "4"}));  // Qwen2
  EXPECT_EQ(llama3("café 😀😀 ١٢٣"), (Pieces{"café", " 😀😀", " ", "١٢٣"}));
  EXPECT_EQ(llama3("a \n  b"), (Pieces{"a", " \n", " ", " b"}));  // \s*[\r\n]+ stops at the last newline
  EXPECT_EQ(llama3("x\r\n\r\n"), (Pieces{"x", "\r\n\r\n"}));
  EXPECT_EQ(llama3("\tword"), (Pieces{"\tword"}));  // any non-newline, non-L/N character may lead a word
  EXPECT_EQ(llama3("'ſ"), (Pieces{"'ſ"}));           // (?i) 's matches long s
}

TEST(TokenizerPretok, PiecesCoverEveryByteString) {
  dmat::Rng r(7);
  for (int round = 0; round < 200; ++round) {
    std::string s(size_t(r.below(200)), '\0');
    // Mix ASCII, spaces/newlines, multi-byte UTF-8 fragments and raw bytes.
    const char* alphabet[] = {"a", "Z", "7", " ", "\n", "\r", "\t", "'", "s", "!", "é", "中", "😀", "\xff", "\xc3",
                              "\u00a0", "\u3000", "١"};
    s.clear();
    for (int k = int(r.below(80)); k > 0; --k) s += alphabet[r.below(std::size(alphabet))];
    for (auto p : {dmat::tok::SplitPattern::kGpt2, dmat::tok::SplitPattern::kLlama3}) {
      std::string joined;
      for (const auto& piece : split(p, s)) {
        ASSERT_FALSE(piece.empty());
        joined += piece;
      }
      ASSERT_EQ(joined, s);
    }
  }
}

TEST(TokenizerPretok, UnicodeClasses) {
  using dmat::tok::CharClass;
  EXPECT_EQ(dmat::tok::char_class(U'é'), CharClass::kLetter);
  EXPECT_EQ(dmat::tok::char_class(U'中'), CharClass::kLetter);
  EXPECT_EQ(dmat::tok::char_class(U'١'), CharClass::kNumber);
  EXPECT_EQ(dmat::tok::char_class(U'½'), CharClass::kNumber);   // No
  EXPECT_EQ(dmat::tok::char_class(U'Ⅻ'), CharClass::kNumber);   // Nl
  EXPECT_EQ(dmat::tok::char_class(0x1F600), CharClass::kOther);  // emoji: So
  EXPECT_EQ(dmat::tok::char_class(0x0301), CharClass::kOther);   // combining mark: Mn
  EXPECT_EQ(dmat::tok::char_class(0x00A0), CharClass::kSpace);
  EXPECT_EQ(dmat::tok::char_class(0x200B), CharClass::kOther);   // zero-width space is not White_Space
  const unsigned char overlong[] = {0xC0, 0xAF}, surrogate[] = {0xED, 0xA0, 0x80};
  EXPECT_EQ(dmat::tok::decode_utf8(overlong, 2).len, 1u);
  EXPECT_EQ(dmat::tok::decode_utf8(surrogate, 3).len, 1u);
}

TEST(TokenizerPretok, NfcNormalization) {
  std::string out;
  auto nfc = [&](std::string_view s) {
    dmat::tok::nfc(s, out);
    return out;
  };
  EXPECT_EQ(nfc("cafe\u0301 plain ascii"), "caf\u00e9 plain ascii");        // compose onto an ASCII starter
  EXPECT_EQ(nfc("\u1e0b\u0323"), "\u1e0d\u0307");                         // reorder: dot below (220) first
  EXPECT_EQ(nfc("\u1100\u1161\u11a8"), "\uac01");                          // Hangul L V T
  EXPECT_EQ(nfc("\u212b \u2126"), "\u00c5 \u03a9");                        // singletons (Angstrom, Ohm)
  EXPECT_EQ(nfc("\ufb01 \u00bd \uff21"), "\ufb01 \u00bd \uff21");        // compatibility forms stay (NFC, not NFKC)
  EXPECT_EQ(nfc("a\u0328\u0301"), "\u0105\u0301");                         // a+ogonek composes; no precomposed form takes the acute too
  EXPECT_EQ(nfc("\xff\xfe e\u0301\xc3"), "\xff\xfe \u00e9\xc3");      // invalid bytes pass through
  EXPECT_EQ(nfc("\u0301leading mark"), "\u0301leading mark");
}

TEST(TokenizerPretok, NfcMatchesPythonUnicodedata) {
  const auto j = nlohmann::json::parse(file_bytes(fixtures() + "/nfc_cases.json"));
  std::string out;
  int changed = 0;
  for (const auto& c : j.at("cases")) {
    const std::string in = c[0], want = c[1];
    dmat::tok::nfc(in, out);
    EXPECT_EQ(out, want) << c.dump();
    changed += in != want;
  }
  EXPECT_GT(changed, 100);  // the cases do exercise composition and reordering
}

// ---- hand-checked BPE (tests/fixtures/tokenizer/ours/hand.json) --------------------------------------

// Merges by rank: 0 "Ġ t"->256, 1 "h e"->257, 2 "Ġt he"->258, 3 "l l"->259, 4 "e l"->260,
// 5 "he ll"->261, 6 "hell o"->262, 7 "Ġ w"->263, 8 "o r"->264, 9 "Ġw or"->265, 10 "a a"->266;
// <|endoftext|> = 267; every other id is its byte (Ġ is the space, byte 32).
TEST(TokenizerHand, IdsDerivedByHand) {
  const BpeTokenizer t = BpeTokenizer::load(fixtures() + "/ours/hand.json");
  EXPECT_EQ(t.vocab_size(), 268u);
  EXPECT_EQ(t.eot_id(), 267u);
  // h e l l o: he (rank 1) before ll (3); then he+ll (5), then hell+o (6).
  EXPECT_EQ(enc(t, "hello"), (Ids{262}));
  // Ġ t h e: Ġt (0), he (1), Ġt+he (2).
  EXPECT_EQ(enc(t, " the"), (Ids{258}));
  // Ġ w o r l d: Ġw (7), or (8), Ġw+or (9); l d stay bytes.
  EXPECT_EQ(enc(t, " world"), (Ids{265, 'l', 'd'}));
  // e l l e: ll (3) beats el (4) although el is further left; then nothing applies.
  EXPECT_EQ(enc(t, "elle"), (Ids{'e', 259, 'e'}));
  // H e l l o: no "H e" merge; ll (3) first, then "e ll" is no merge.
  EXPECT_EQ(enc(t, "Hello"), (Ids{'H', 'e', 259, 'o'}));
  // a a a a a: equal ranks merge leftmost first: aa aa a.
  EXPECT_EQ(enc(t, "aaaaa"), (Ids{266, 266, 'a'}));
  // Pre-tokenized by GPT-2's regex: "hello" " world" " the".
  EXPECT_EQ(enc(t, "hello world the"), (Ids{262, 265, 'l', 'd', 258}));
  // The end token's text is ordinary text for encode(), an id for encode_with_special().
  Ids special;
  t.encode_with_special("hello<|endoftext|> the", special);
  EXPECT_EQ(special, (Ids{262, 267, 258}));
  EXPECT_EQ(enc(t, "<|endoftext|>").size(), 13u);  // "<|" "endoftext" "|>": no merge applies, 13 bytes
  EXPECT_EQ(t.decode({262, 267, 258}), "hello<|endoftext|> the");
  expect_error([&] { t.decode({268}); }, {"hand.json", "id 268"});
}

// ---- round trips and training -----------------------------------------------------------------------

TEST(TokenizerBpe, RoundTripRandomBytesAndText) {
  for (const char* pre : {"llama3", "gpt2"}) {
    const BpeTokenizer& t = english_tokenizer(pre);
    dmat::Rng r(99);
    for (int round = 0; round < 50; ++round) {
      std::string s(size_t(r.below(3000)), '\0');
      for (auto& c : s) c = char(r.below(256));
      ASSERT_EQ(t.decode(enc(t, s)), s) << pre;
    }
    for (const auto& c : cases()) ASSERT_EQ(t.decode(enc(t, c)), c) << pre << ": " << c;
    const std::string text = file_bytes(dmat::test::source_dir() + "/data/english/devils_dictionary.txt");
    const Ids ids = enc(t, text);
    ASSERT_EQ(t.decode(ids), text);
    // A real compression: English with 2000 tokens should need well under half a token per byte.
    EXPECT_LT(double(ids.size()) / double(text.size()), 0.4) << pre;
    // Encoding a piece at a time (no cache) gives the same ids as the cached path.
    std::vector<std::string> pieces;
    t.pretokenize(text.substr(0, 20000), pieces);
    Ids direct;
    for (const auto& p : pieces) t.encode_piece(p, direct);
    EXPECT_EQ(direct, enc(t, text.substr(0, 20000)));
  }
}

TEST(TokenizerTrain, SmallCorpusByHand) {
  // GPT-2 pieces of "ab ab ab cd": "ab" x1, " ab" x2, " cd" x1. Pair counts: (a,b) 3, (' ',a) 2,
  // (' ',c) 1, (c,d) 1 -> merge a+b (256); then (' ',ab) 2 -> merge (257); the rest occur once,
  // below min_frequency 2, so training stops with 2 merges and a smaller vocabulary than asked.
  dmat::PieceCounter c("gpt2", 1);
  c.add({"ab ab ab cd"});
  dmat::BpeTrainOptions o;
  o.vocab_size = 300;
  o.pretokenizer = "gpt2";
  const BpeTokenizer t = dmat::train_bpe(c.finish(), o);
  const auto& d = t.definition();
  ASSERT_EQ(d.merges.size(), 2u);
  EXPECT_EQ(d.merges[0], (std::pair<uint32_t, uint32_t>{'a', 'b'}));
  EXPECT_EQ(d.merges[1], (std::pair<uint32_t, uint32_t>{' ', 256}));
  EXPECT_EQ(t.vocab_size(), 259u);
  EXPECT_EQ(t.eot_id(), 258u);
  EXPECT_EQ(enc(t, "ab ab cd"), (Ids{256, 257, ' ', 'c', 'd'}));
  // Vocabulary too small for bytes + specials.
  o.vocab_size = 256;
  expect_error([&] { dmat::train_bpe(c.finish(), o); }, {"--vocab 256", "at least 257"});
}

TEST(TokenizerTrain, DeterministicAcrossThreadsAndOrder) {
  const std::string text = file_bytes(dmat::test::source_dir() + "/data/english/devils_dictionary.txt");
  std::vector<std::string> docs;
  for (size_t i = 0; i < text.size(); i += 5000) docs.push_back(text.substr(i, 5000));
  dmat::BpeTrainOptions o;
  o.vocab_size = 1500;
  o.special = {"<|endoftext|>", "<|pad|>"};
  dmat::PieceCounter c1("llama3", 1), c2("llama3", 2);
  c1.add(docs);
  std::vector<std::string> rev(docs.rbegin(), docs.rend());
  c2.add(rev);
  const auto j1 = dmat::train_bpe(c1.finish(), o).to_hf_json().dump();
  const auto j2 = dmat::train_bpe(c2.finish(), o).to_hf_json().dump();
  EXPECT_EQ(j1, j2);
  const auto t = BpeTokenizer::from_hf_json(nlohmann::json::parse(j1), "j1");
  EXPECT_EQ(t.vocab_size(), 1500u);
  EXPECT_EQ(t.definition().added.size(), 2u);
  EXPECT_EQ(t.eot_id(), 1498u);
}

TEST(TokenizerJson, SaveLoadEncodesIdentically) {
  const auto dir = dmat::test::temp_dir("tok_json");
  for (const char* pre : {"llama3", "gpt2"}) {
    const BpeTokenizer& t = english_tokenizer(pre);
    const std::string p = dir + "/" + pre + ".json";
    t.save(p, false);
    expect_error([&] { t.save(p, false); }, {p, "already exists"});
    const BpeTokenizer u = BpeTokenizer::load(p);
    EXPECT_EQ(u.hash(), t.hash());
    EXPECT_EQ(u.vocab_size(), t.vocab_size());
    for (const auto& c : cases()) EXPECT_EQ(enc(u, c), enc(t, c)) << c;
    // Saving the loaded file again gives the same bytes.
    u.save(dir + "/again.json", true);
    EXPECT_EQ(file_bytes(dir + "/again.json"), file_bytes(p));
    // load_tokenizer (the data layer's entry point) returns it too.
    const auto via = dmat::load_tokenizer(p);
    EXPECT_EQ(via->name(), "bpe");
    EXPECT_EQ(via->hash(), t.hash());
  }
  // Merges written as ["a", "b"] pairs (tokenizers >= 0.20) load the same as "a b" strings.
  auto j = nlohmann::json::parse(file_bytes(dir + "/gpt2.json"));
  for (auto& m : j["model"]["merges"]) {
    const std::string s = m;
    m = nlohmann::json::array({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  EXPECT_EQ(BpeTokenizer::from_hf_json(j, "pairs").hash(), english_tokenizer("gpt2").hash());
}

TEST(TokenizerJson, RejectsWhatItCannotRead) {
  const auto dir = dmat::test::temp_dir("tok_json_bad");
  const auto good = nlohmann::json::parse(file_bytes(fixtures() + "/ours/hand.json"));
  auto write = [&](const std::string& name, const nlohmann::json& j) {
    write_bytes(dir + "/" + name, j.dump());
    return dir + "/" + name;
  };
  auto with = [&](const std::string& ptr, const nlohmann::json& v) {
    auto j = good;
    j[nlohmann::json::json_pointer(ptr)] = v;
    return j;
  };
  const std::string wp = write("wordpiece.json", with("/model/type", "WordPiece"));
  expect_error([&] { BpeTokenizer::load(wp); }, {wp, "model type \"WordPiece\"", "BPE"});
  const std::string nfkc = write("nfkc.json", with("/normalizer", {{"type", "NFKC"}}));
  expect_error([&] { BpeTokenizer::load(nfkc); }, {nfkc, "normalizer", "NFKC", "null and NFC"});
  const std::string re = write("regex.json", with("/pre_tokenizer", {{"type", "Split"},
                                                                     {"pattern", {{"Regex", "\\w+"}}},
                                                                     {"behavior", "Isolated"},
                                                                     {"invert", false}}));
  expect_error([&] { BpeTokenizer::load(re); }, {re, "regex", "not supported"});
  const std::string meta = write("meta.json", with("/pre_tokenizer", {{"type", "Metaspace"}}));
  expect_error([&] { BpeTokenizer::load(meta); }, {meta, "Metaspace"});
  const std::string fb = write("fallback.json", with("/model/byte_fallback", true));
  expect_error([&] { BpeTokenizer::load(fb); }, {fb, "byte_fallback"});
  auto nobyte = good;
  nobyte["model"]["vocab"].erase("Ā");  // byte 0x00
  const std::string nb = write("nobyte.json", nobyte);
  expect_error([&] { BpeTokenizer::load(nb); }, {nb, "byte 0x00"});
  auto badmerge = good;
  badmerge["model"]["merges"].push_back("x yz");
  const std::string bm = write("badmerge.json", badmerge);
  expect_error([&] { BpeTokenizer::load(bm); }, {bm, "merge 11"});
  auto noeot = good;
  noeot["added_tokens"][0]["content"] = "<|something|>";
  const std::string ne = write("noeot.json", noeot);
  expect_error([&] { BpeTokenizer::load(ne); }, {ne, "end-of-document"});
  // one id far beyond the tokens the file defines: an error at once, not gigabytes of empty entries
  for (const int64_t id : {int64_t(1) << 27, (int64_t(1) << 31) - 1}) {
    auto huge = good;
    huge["model"]["vocab"]["Ā"] = id;
    const std::string hv = write("huge_id.json", huge);
    expect_error([&] { BpeTokenizer::load(hv); }, {hv, "token id " + std::to_string(id) + " is outside the vocabulary",
                                                   "ids must be <"});
    auto added = good;
    added["added_tokens"][0]["id"] = id;
    const std::string ha = write("huge_added_id.json", added);
    expect_error([&] { BpeTokenizer::load(ha); }, {ha, "token id " + std::to_string(id) + " is outside"});
  }
  write_bytes(dir + "/broken.json", "{\"model\": ");
  expect_error([&] { BpeTokenizer::load(dir + "/broken.json"); }, {"broken.json", "not valid JSON"});
  expect_error([&] { BpeTokenizer::load(dir + "/missing.json"); }, {"missing.json", "cannot open"});
  expect_error([&] { dmat::load_tokenizer(dir + "/missing.json"); }, {"missing.json", "tokenizer.json"});
}

// Fields of the wrong JSON type name the file and the field (they reached the user as the JSON
// library's type_error, naming neither), and an id beyond INT64_MAX is out of range (read as int64
// it turned negative, passed the bound and was written past the token table: SIGSEGV). Found by
// fuzz_tokenizer (tests/fuzz/corpus/tokenizer/crash-*): model.type, normalizer, decoder and the id;
// by reading the code beside them: Split.behavior and an added_tokens that is not an array.
TEST(TokenizerJson, FieldsOfTheWrongTypeAndIdsBeyondInt64AreErrors) {
  const auto dir = dmat::test::temp_dir("tok_json_types");
  const auto good = nlohmann::json::parse(file_bytes(fixtures() + "/ours/hand.json"));
  auto check = [&](const std::string& ptr, const nlohmann::json& v, std::initializer_list<std::string> parts) {
    auto j = good;
    j[nlohmann::json::json_pointer(ptr)] = v;
    const std::string path = dir + "/t.json";
    write_bytes(path, j.dump());
    std::vector<std::string> all = {path};
    all.insert(all.end(), parts);
    try {
      BpeTokenizer::load(path);
      ADD_FAILURE() << ptr << ": expected dmat::Error";
    } catch (const dmat::Error& e) {
      for (const auto& p : all) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << ptr << ": " << e.what();
    }
  };
  check("/normalizer", 5, {"normalizer 5 is not supported"});
  check("/normalizer", {{"type", 5}}, {"normalizer.type must be a string (got 5)"});
  check("/model/type", 5, {"model.type must be a string (got 5)"});
  check("/decoder", {{"type", 5}}, {"decoder.type must be a string (got 5)"});
  check("/pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", 3}},
        {"pre_tokenizer Split.behavior must be a string (got 3)"});
  check("/added_tokens", {{"a", {{"id", 267}, {"content", "<|endoftext|>"}}}}, {"added_tokens must be an array"});
  for (const uint64_t id : {uint64_t(UINT64_MAX), uint64_t(1) << 63, uint64_t(1) << 32}) {
    check("/model/vocab/\u0120t", id, {"token id " + std::to_string(id) + " is outside the vocabulary"});
    check("/added_tokens/0/id", id, {"token id " + std::to_string(id) + " is outside the vocabulary"});
  }
}

// ---- Hugging Face reference encodings (tests/fixtures/tokenizer/hf, made by make_hf_fixtures.py) ------

namespace {

// Compares our encode_with_special against HF's ids for every case of an encodings.json.
void check_encodings(const BpeTokenizer& t, const nlohmann::json& e, const std::string& what) {
  int checked = 0;
  for (const auto& c : e.at("cases")) {
    if (!c.contains("ids")) continue;
    Ids ours;
    t.encode_with_special(c.at("text").get<std::string>(), ours);
    EXPECT_EQ(ours, c.at("ids").get<Ids>()) << what << ": " << c.at("text").dump() << "\nHF tokens: " << c["tokens"].dump();
    ++checked;
  }
  EXPECT_GT(checked, 0) << what;
}

}  // namespace

TEST(TokenizerHf, BuiltAndRealTokenizersMatchHf) {
  const std::string hf = fixtures() + "/hf";
  if (!fs::exists(hf + "/summary.json"))
    GTEST_SKIP() << "no HF reference fixtures in " << hf
                 << " (generate them with tests/fixtures/tokenizer/make_hf_fixtures.py, see its README)";
  int n = 0;
  for (const char* kind : {"built", "real"}) {
    if (!fs::exists(hf + "/" + kind)) continue;
    std::vector<fs::path> dirs;
    for (const auto& d : fs::directory_iterator(hf + "/" + kind)) dirs.push_back(d.path());
    std::sort(dirs.begin(), dirs.end());
    for (const auto& d : dirs) {
      const std::string tj = (d / "tokenizer.json").string(), ej = (d / "encodings.json").string();
      if (!fs::exists(tj) || !fs::exists(ej)) continue;
      SCOPED_TRACE(tj);
      const BpeTokenizer t = BpeTokenizer::load(tj);
      check_encodings(t, nlohmann::json::parse(file_bytes(ej)), tj);
      ++n;
    }
  }
  EXPECT_GE(n, 6);  // hand, gpt2, gpt2_prefix, llama3, smollm, neox_nfc
}

TEST(TokenizerHf, OurFilesEncodeIdenticallyInHf) {
  const std::string hf = fixtures() + "/hf/ours";
  if (!fs::exists(hf))
    GTEST_SKIP() << "no HF encodings of our tokenizer.json files in " << hf
                 << " (generate them with tests/fixtures/tokenizer/make_hf_fixtures.py, see its README)";
  int n = 0;
  for (const auto& e : fs::directory_iterator(fixtures() + "/ours")) {
    if (e.path().extension() != ".json") continue;
    const std::string stem = e.path().stem().string();
    const std::string ej = hf + "/" + stem + ".encodings.json";
    if (!fs::exists(ej)) {
      ADD_FAILURE() << ej << " is missing: regenerate the HF fixtures after adding " << e.path();
      continue;
    }
    const auto j = nlohmann::json::parse(file_bytes(ej));
    ASSERT_FALSE(j.contains("load_error")) << e.path() << " did not load in HF tokenizers: " << j["load_error"];
    check_encodings(BpeTokenizer::load(e.path().string()), j, e.path().string());
    ++n;
  }
  EXPECT_GE(n, 1);
}

// ---- data prepare with a BPE tokenizer --------------------------------------------------------------

TEST(TokenizerPrepare, BpeShardsDeterministicAcrossThreads) {
  const auto dir = dmat::test::temp_dir("tok_prepare");
  const std::string tp = dir + "/tok.json";
  english_tokenizer("llama3").save(tp, true);
  dmat::PrepareOptions o;
  o.tokenizer = tp;
  o.inputs = {dmat::test::source_dir() + "/data/english"};
  o.val_fraction = 0.03;
  o.shard_tokens = 200000;
  o.threads = 1;
  o.out_dir = dir + "/out1";
  const auto r1 = dmat::prepare_data(o);
  o.threads = 2;
  o.out_dir = dir + "/out2";
  const auto r2 = dmat::prepare_data(o);
  EXPECT_EQ(file_bytes(dir + "/out1/manifest.json"), file_bytes(dir + "/out2/manifest.json"));
  EXPECT_EQ(r1.train_tokens, r2.train_tokens);
  const auto m = nlohmann::json::parse(file_bytes(dir + "/out1/manifest.json"));
  EXPECT_EQ(m["tokenizer"]["hash"], english_tokenizer("llama3").hash());
  EXPECT_EQ(m["tokenizer"]["vocab_size"], 2000);
  EXPECT_EQ(m["sources"][0]["files"], 2);
  EXPECT_EQ(m["documents"], 1689);
  // The token stream decodes back to the documents, each followed by the end token.
  const auto& t = english_tokenizer("llama3");
  std::vector<int32_t> toks;
  for (const auto& p : dmat::list_shards(dir + "/out1/val")) {
    dmat::ShardReader rd(p);
    EXPECT_EQ(rd.info().vocab_size, 2000u);
    EXPECT_EQ(rd.info().token_bytes, 2u);
    std::vector<int32_t> v(rd.info().n_tokens);
    rd.read(0, v.size(), v.data());
    toks.insert(toks.end(), v.begin(), v.end());
  }
  ASSERT_FALSE(toks.empty());
  EXPECT_EQ(uint32_t(toks.back()), t.eot_id());
  Ids first;
  for (int32_t x : toks) {
    if (uint32_t(x) == t.eot_id()) break;
    first.push_back(uint32_t(x));
  }
  const std::string doc = t.decode(first);
  ASSERT_GT(doc.size(), 10u);
  EXPECT_TRUE(file_bytes(dmat::test::source_dir() + "/data/english/kjv_bible.txt").find(doc) != std::string::npos ||
              file_bytes(dmat::test::source_dir() + "/data/english/devils_dictionary.txt").find(doc) != std::string::npos)
      << doc.substr(0, 200);
}

TEST(TokenizerPrepare, LargeVocabWritesUint32) {
  // A tokenizer whose ids exceed 65535 (an added token at id 70000) needs uint32 shards.
  const auto dir = dmat::test::temp_dir("tok_prepare_u32");
  auto j = nlohmann::json::parse(file_bytes(fixtures() + "/ours/hand.json"));
  j["added_tokens"][0]["id"] = 70000;
  write_bytes(dir + "/big.json", j.dump());
  write_bytes(dir + "/in/a.txt", "hello world the\n\n\nanother document\n");
  dmat::PrepareOptions o;
  o.tokenizer = dir + "/big.json";
  o.inputs = {dir + "/in"};
  o.val_fraction = 0;
  o.out_dir = dir + "/out";
  dmat::prepare_data(o);
  const auto shards = dmat::list_shards(dir + "/out/train");
  ASSERT_EQ(shards.size(), 1u);
  const auto info = dmat::read_shard_info(shards[0]);
  EXPECT_EQ(info.token_bytes, 4u);
  EXPECT_EQ(info.vocab_size, 70001u);
  dmat::ShardReader rd(shards[0]);
  std::vector<int32_t> v(info.n_tokens);
  rd.read(0, v.size(), v.data());
  // "hello world the\n": hello, Ġw+or l d, Ġthe, \n; "another document\n": only h+e (257) applies.
  EXPECT_EQ(v, (std::vector<int32_t>{262, 265, 'l', 'd', 258, '\n', 70000, 'a', 'n', 'o', 't', 257, 'r', ' ', 'd', 'o',
                                     'c', 'u', 'm', 'e', 'n', 't', '\n', 70000}));
}

TEST(TokenizerPrepare, IncludeExcludeGlobs) {
  const auto dir = dmat::test::temp_dir("tok_prepare_globs");
  write_bytes(dir + "/in/pkg/mod.py", "def f():\n    return 1\n\n\n\ndef g():\n    return 2\n");  // one document
  write_bytes(dir + "/in/pkg/README.md", "Readme text.\n");
  write_bytes(dir + "/in/pkg/tests/test_mod.py", "assert True\n");
  write_bytes(dir + "/in/pkg/data.bin", std::string("\0\1\2", 3));
  write_bytes(dir + "/in/notes.txt", "notes\n");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.include = {"*.py", "*.md"};
  o.exclude = {"tests"};
  o.val_fraction = 0;
  o.out_dir = dir + "/out";
  const auto r = dmat::prepare_data(o);
  EXPECT_EQ(r.documents, 2);  // mod.py (whole file) and README.md
  const auto m = nlohmann::json::parse(file_bytes(dir + "/out/manifest.json"));
  EXPECT_EQ(m["files_read"], 2);
  EXPECT_EQ(m["include"], (nlohmann::json{"*.py", "*.md"}));
  EXPECT_EQ(r.train_tokens, int64_t(std::string("def f():\n    return 1\n\n\n\ndef g():\n    return 2\n").size() + 1 +
                                    std::string("Readme text.\n").size() + 1));
}

// The shipped corpus tokenizer (data/tokenizer/*.json) against HF, once make_hf_fixtures.py has seen it.
TEST(TokenizerHf, ShippedTokenizerEncodesIdenticallyInHf) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dmat::test::source_dir() + "/data/tokenizer")) {
    if (e.path().extension() != ".json") continue;
    const std::string ej = fixtures() + "/hf/ours/" + e.path().stem().string() + ".encodings.json";
    if (!fs::exists(ej)) {
      std::cout << "[ SKIPPED  ] " << e.path() << ": no HF encodings yet (" << ej
                << "); rerun tests/fixtures/tokenizer/make_hf_fixtures.py\n";
      continue;
    }
    const auto j = nlohmann::json::parse(file_bytes(ej));
    ASSERT_FALSE(j.contains("load_error")) << e.path() << " did not load in HF tokenizers: " << j["load_error"];
    check_encodings(BpeTokenizer::load(e.path().string()), j, e.path().string());
    ++n;
  }
  if (n == 0) GTEST_SKIP() << "no HF encodings of data/tokenizer/*.json yet (rerun make_hf_fixtures.py)";
}
