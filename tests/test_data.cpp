// Data layer: shard format, shard sets, window sampling, byte tokenizer, prepare/inspect.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using dmat::test::expect_error;
using dmat::test::file_bytes;
using dmat::test::write_bytes;
using dmat::Error;

namespace {

std::vector<uint32_t> random_tokens(size_t n, uint32_t vocab, uint64_t seed) {
  dmat::Rng r(seed);
  std::vector<uint32_t> t(n);
  for (auto& x : t) x = uint32_t(r.below(vocab));
  return t;
}

std::vector<int32_t> read_all(const std::string& path) {
  dmat::ShardReader r(path);
  std::vector<int32_t> v(r.info().n_tokens);
  r.read(0, v.size(), v.data());
  return v;
}

// Overwrites 4 bytes at offset of a file (header surgery).
void poke_u32(const std::string& path, size_t offset, uint32_t v) {
  std::string b = file_bytes(path);
  std::memcpy(b.data() + offset, &v, 4);
  write_bytes(path, b);
}

}  // namespace

// ---- shards -------------------------------------------------------------------------------------

TEST(DataShard, RoundTripUint16) {
  const auto dir = dmat::test::temp_dir("data_shard_u16");
  const auto toks = random_tokens(100003, 50000, 11);
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, toks, 50000);
  EXPECT_EQ(fs::file_size(p), 64u + 2u * toks.size());
  const auto info = dmat::read_shard_info(p);
  EXPECT_EQ(info.token_bytes, 2u);
  EXPECT_EQ(info.n_tokens, toks.size());
  EXPECT_EQ(info.vocab_size, 50000u);
  EXPECT_EQ(info.version, 1u);  // no mask, no sequence length: readable by older builds
  EXPECT_FALSE(info.has_mask);
  const auto got = read_all(p);
  ASSERT_EQ(got.size(), toks.size());
  for (size_t i = 0; i < toks.size(); ++i) ASSERT_EQ(uint32_t(got[i]), toks[i]) << i;
  // An offset read in the middle.
  dmat::ShardReader r(p);
  std::vector<int32_t> mid(17);
  r.read(40000, 17, mid.data());
  for (size_t i = 0; i < 17; ++i) EXPECT_EQ(uint32_t(mid[i]), toks[40000 + i]);
  // Little-endian on disk, header layout as documented.
  const std::string bytes = file_bytes(p);
  EXPECT_EQ(std::memcmp(bytes.data(), "DMATOKS\0", 8), 0);
  EXPECT_EQ(uint8_t(bytes[64]) | uint8_t(bytes[65]) << 8, int(toks[0]));
}

TEST(DataShard, RoundTripUint32) {
  const auto dir = dmat::test::temp_dir("data_shard_u32");
  auto toks = random_tokens(5000, 100000, 12);
  toks[7] = 99999;  // needs more than 16 bits
  dmat::write_shard(dir + "/a.bin", toks, 100000);
  EXPECT_EQ(dmat::read_shard_info(dir + "/a.bin").token_bytes, 4u);
  const auto got = read_all(dir + "/a.bin");
  for (size_t i = 0; i < toks.size(); ++i) ASSERT_EQ(uint32_t(got[i]), toks[i]);
  // An explicit 4-byte width for a small vocab works; a 2-byte width for a big vocab does not.
  dmat::write_shard(dir + "/b.bin", {1, 2, 3}, 257, 4);
  EXPECT_EQ(dmat::read_shard_info(dir + "/b.bin").token_bytes, 4u);
  expect_error([&] { dmat::write_shard(dir + "/c.bin", {1}, 70000, 2); }, {"c.bin", "70000"});
  expect_error([&] { dmat::write_shard(dir + "/d.bin", {1, 300}, 257); }, {"d.bin", "300", "position 1"});
  EXPECT_FALSE(fs::exists(dir + "/d.bin"));
}

TEST(DataShard, EmptyShardIsValid) {
  const auto dir = dmat::test::temp_dir("data_shard_empty");
  dmat::write_shard(dir + "/e.bin", {}, 257);
  EXPECT_EQ(dmat::read_shard_info(dir + "/e.bin").n_tokens, 0u);
}

TEST(DataShard, RejectsWrongMagic) {
  const auto dir = dmat::test::temp_dir("data_shard_magic");
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, {1, 2, 3}, 257);
  std::string b = file_bytes(p);
  b[0] = 'X';
  write_bytes(p, b);
  expect_error([&] { dmat::read_shard_info(p); }, {p, "magic"});
  write_bytes(p, "hello");
  expect_error([&] { dmat::read_shard_info(p); }, {p, "too short"});
}

TEST(DataShard, RejectsWrongVersionAndWidth) {
  const auto dir = dmat::test::temp_dir("data_shard_version");
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, {1, 2, 3}, 257);
  poke_u32(p, 8, 3);
  expect_error([&] { dmat::read_shard_info(p); }, {p, "version 3"});
  poke_u32(p, 8, 1);
  poke_u32(p, 12, 3);
  expect_error([&] { dmat::read_shard_info(p); }, {p, "width 3"});
}

// Found by fuzzing (tests/fuzz/corpus/shard/crash-vocab-above-2g): a header vocab above 2^31 let
// tokens >= 2^31 pass the vocab check and come out of read() as negative int32 ids.
TEST(DataShard, RejectsVocabAboveTwoToThe31) {
  const auto dir = dmat::test::temp_dir("data_shard_vocab_2g");
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, {1, 2, 3}, 100000);
  poke_u32(p, 24, 0x86a00000u);
  poke_u32(p, 64, 0x869b9f00u);  // token 0 is 2258345728 < the header's vocab
  expect_error([&] { dmat::read_shard_info(p); }, {p, "vocab size 2258632704", "2^31"});
  poke_u32(p, 24, 0x80000000u);  // 2^31 itself is a valid vocab size
  EXPECT_EQ(dmat::read_shard_info(p).vocab_size, 0x80000000u);
  expect_error([&] { read_all(p); }, {p, "2258345728", "position 0"});
  expect_error([&] { dmat::write_shard(dir + "/b.bin", {1}, 0x80000001u); }, {"vocab size must be in 1 … 2^31"});
}

TEST(DataShard, RejectsTruncatedAndTrailing) {
  const auto dir = dmat::test::temp_dir("data_shard_size");
  const std::string p = dir + "/x.bin";
  dmat::write_shard(p, std::vector<uint32_t>(1000, 5), 257);
  std::string b = file_bytes(p);
  write_bytes(p, b.substr(0, 2000));
  expect_error([&] { dmat::read_shard_info(p); },
               {"shard " + p + ": truncated: header says 1000 tokens (2064 bytes), file has 2000 bytes"});
  expect_error([&] { dmat::ShardReader r(p); }, {p, "truncated"});
  write_bytes(p, b + "zz");
  expect_error([&] { dmat::read_shard_info(p); }, {p, "2 trailing bytes"});
}

TEST(DataShard, RejectsTokenOutOfVocabOnRead) {
  const auto dir = dmat::test::temp_dir("data_shard_vocab");
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, {1, 2, 3, 4}, 257);
  std::string b = file_bytes(p);
  b[64 + 2 * 2] = char(0x01);  // token 2 becomes 0x0101 = 257
  b[64 + 2 * 2 + 1] = char(0x01);
  write_bytes(p, b);
  dmat::ShardReader r(p);  // the header is fine
  std::vector<int32_t> out(4);
  r.read(0, 2, out.data());  // tokens before the bad one read fine
  expect_error([&] { r.read(0, 4, out.data()); }, {p, "257", "position 2", "vocab size 257"});
  expect_error([&] { r.read(3, 2, out.data()); }, {p, "past the end"});
}

TEST(DataShard, RefusesOverwrite) {
  const auto dir = dmat::test::temp_dir("data_shard_overwrite");
  const std::string p = dir + "/a.bin";
  dmat::write_shard(p, {1, 2, 3}, 257);
  expect_error([&] { dmat::write_shard(p, {4, 5}, 257); }, {p, "already exists"});
  EXPECT_EQ(dmat::read_shard_info(p).n_tokens, 3u);
  dmat::write_shard(p, {4, 5}, 257, 0, /*overwrite=*/true);
  EXPECT_EQ(read_all(p), (std::vector<int32_t>{4, 5}));
  // No temp files left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(DataShardSet, DirectoryGlobFileAndNothing) {
  const auto dir = dmat::test::temp_dir("data_list");
  for (const char* n : {"b.bin", "a.bin", "c.bin"}) dmat::write_shard(dir + "/" + n, {1}, 257);
  write_bytes(dir + "/notes.txt", "x");
  fs::create_directories(dir + "/sub");
  dmat::write_shard(dir + "/sub/z.bin", {1}, 257);
  const std::vector<std::string> abc = {dir + "/a.bin", dir + "/b.bin", dir + "/c.bin"};
  EXPECT_EQ(dmat::list_shards(dir), abc);  // sorted, not recursive, only *.bin
  EXPECT_EQ(dmat::list_shards(dir + "/[ab].bin"), (std::vector<std::string>{dir + "/a.bin", dir + "/b.bin"}));
  EXPECT_EQ(dmat::list_shards(dir + "/*.bin"), abc);
  EXPECT_EQ(dmat::list_shards(dir + "/c.bin"), std::vector<std::string>{dir + "/c.bin"});
  expect_error([&] { dmat::list_shards(dir + "/*.nope"); }, {dir + "/*.nope", "no files match"});
  expect_error([&] { dmat::list_shards(dir + "/missing"); }, {dir + "/missing", "no such file"});
  const auto empty = dmat::test::temp_dir("data_list_empty");
  expect_error([&] { dmat::list_shards(empty); }, {empty, "no *.bin"});
}

// ---- permutation and loader ---------------------------------------------------------------------

TEST(DataPermute, BijectionForManySizes) {
  for (int64_t n : {int64_t(1), int64_t(2), int64_t(3), int64_t(5), int64_t(1000), int64_t(1024), int64_t(1025),
                    (int64_t(1) << 16) + 7}) {
    for (uint64_t key : {uint64_t(0), uint64_t(1), uint64_t(0xdeadbeef)}) {
      std::vector<char> hit(size_t(n), 0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = dmat::permute_index(i, n, key);
        ASSERT_GE(j, 0);
        ASSERT_LT(j, n);
        ASSERT_FALSE(hit[size_t(j)]) << "n=" << n << " key=" << key << " i=" << i;
        hit[size_t(j)] = 1;
      }
    }
  }
  EXPECT_THROW(dmat::permute_index(5, 5, 0), Error);
  EXPECT_THROW(dmat::permute_index(0, 0, 0), Error);
}

TEST(DataPermute, DependsOnKeyAndShuffles) {
  const int64_t n = 1000;
  auto perm = [&](uint64_t key) {
    std::vector<int64_t> p(n);
    for (int64_t i = 0; i < n; ++i) p[size_t(i)] = dmat::permute_index(i, n, key);
    return p;
  };
  const auto a = perm(1), b = perm(2), a2 = perm(1);
  EXPECT_EQ(a, a2);
  EXPECT_NE(a, b);
  int fixed = 0, same = 0;
  for (int64_t i = 0; i < n; ++i) {
    fixed += a[size_t(i)] == i;
    same += a[size_t(i)] == b[size_t(i)];
  }
  EXPECT_LT(fixed, 20);  // ~1 expected for a random permutation
  EXPECT_LT(same, 20);
}

namespace {

// Three shards of a known token stream (token value = position mod 257 within the shard, offset
// by the shard number, so the source of every token is identifiable).
struct LoaderFixture {
  std::string dir;
  std::vector<std::string> paths;
  std::vector<std::vector<uint32_t>> data;
  explicit LoaderFixture(const std::string& tag, std::vector<size_t> sizes = {1000, 37, 2501}) {
    dir = dmat::test::temp_dir(tag);
    for (size_t s = 0; s < sizes.size(); ++s) {
      data.push_back(random_tokens(sizes[s], 257, 100 + s));
      paths.push_back(fmt::format("{}/shard_{:06d}.bin", dir, s));
      dmat::write_shard(paths.back(), data.back(), 257);
    }
  }
};

}  // namespace

TEST(DataLoader, WindowsMatchTheTokenStreamOncePerEpoch) {
  LoaderFixture fx("data_loader_windows");
  const int64_t T = 50;
  // floor((n-1)/T) windows per shard: 19 + 0 + 50.
  dmat::TokenLoader L(fx.paths, T, 7, true);
  ASSERT_EQ(L.num_windows(), 19 + 0 + 50);
  EXPECT_EQ(L.total_tokens(), 1000u + 37u + 2501u);
  EXPECT_EQ(L.vocab_size(), 257u);
  // Every (shard, offset) window a sequence can be: the expected set of windows.
  std::map<std::vector<int32_t>, int> expected;
  for (size_t s = 0; s < fx.data.size(); ++s)
    for (size_t c = 0; c * T + T + 1 <= fx.data[s].size(); ++c)
      expected[std::vector<int32_t>(fx.data[s].begin() + c * T, fx.data[s].begin() + c * T + T + 1)] += 1;
  ASSERT_EQ(expected.size(), size_t(L.num_windows()));  // random data: windows are distinct
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::map<std::vector<int32_t>, int> seen;
    for (int64_t i = 0; i < L.num_windows(); ++i) {
      std::vector<int32_t> x(T), y(T);
      L.get(epoch * L.num_windows() + i, x.data(), y.data());
      for (int64_t t = 0; t + 1 < T; ++t) ASSERT_EQ(y[t], x[t + 1]);  // targets shifted by one
      std::vector<int32_t> w(x);
      w.push_back(y[T - 1]);
      seen[w] += 1;  // a window that crossed shards would not be in `expected`
    }
    EXPECT_EQ(seen, expected) << "epoch " << epoch;
  }
  // Epochs visit the windows in different orders.
  std::vector<int32_t> x0(T), y0(T), x1(T), y1(T);
  int differ = 0;
  for (int64_t i = 0; i < 10; ++i) {
    L.get(i, x0.data(), y0.data());
    L.get(L.num_windows() + i, x1.data(), y1.data());
    differ += x0 != x1;
  }
  EXPECT_GT(differ, 5);
}

TEST(DataLoader, SameIndexSameSampleAndBatchMatchesSingle) {
  LoaderFixture fx("data_loader_determinism");
  const int64_t T = 16, B = 13;
  dmat::TokenLoader a(fx.paths, T, 99, true), b(fx.paths, T, 99, true), c(fx.paths, T, 100, true);
  std::vector<int32_t> xa(B * T), ya(B * T), xb(B * T), yb(B * T), xc(B * T), yc(B * T);
  a.get_batch(1000, B, xa.data(), ya.data());
  b.get_batch(1000, B, xb.data(), yb.data());
  c.get_batch(1000, B, xc.data(), yc.data());
  EXPECT_EQ(xa, xb);
  EXPECT_EQ(ya, yb);
  EXPECT_NE(xa, xc);  // another seed, another order
  for (int64_t i = 0; i < B; ++i) {
    std::vector<int32_t> x(T), y(T);
    a.get(1000 + i, x.data(), y.data());
    EXPECT_TRUE(std::equal(x.begin(), x.end(), xa.begin() + i * T));
    EXPECT_TRUE(std::equal(y.begin(), y.end(), ya.begin() + i * T));
  }
  EXPECT_THROW(a.get(-1, xa.data(), ya.data()), Error);
}

TEST(DataLoader, NoShuffleIsSequential) {
  LoaderFixture fx("data_loader_seq", {300, 201});
  const int64_t T = 100;
  dmat::TokenLoader L(fx.paths, T, 5, false);
  ASSERT_EQ(L.num_windows(), 2 + 2);
  std::vector<int32_t> x(T), y(T);
  const std::vector<std::pair<size_t, size_t>> order = {{0, 0}, {0, 100}, {1, 0}, {1, 100}, {0, 0}};
  for (size_t g = 0; g < order.size(); ++g) {
    L.get(int64_t(g), x.data(), y.data());
    const auto& d = fx.data[order[g].first];
    for (int64_t t = 0; t < T; ++t) {
      ASSERT_EQ(uint32_t(x[t]), d[order[g].second + t]) << g;
      ASSERT_EQ(uint32_t(y[t]), d[order[g].second + t + 1]) << g;
    }
  }
}

TEST(DataLoader, Errors) {
  LoaderFixture fx("data_loader_errors", {100, 50});
  expect_error([&] { dmat::TokenLoader L(fx.paths, 100, 1, true); },
               {fx.dir + "/ (2 shards)", "seq_len+1 = 101", "no full window", "longest has 100"});
  dmat::write_shard(fx.dir + "/big.bin", {1, 2, 3}, 50000);
  expect_error([&] { dmat::TokenLoader L({fx.paths[0], fx.dir + "/big.bin"}, 4, 1, true); },
               {"mixed vocab", "257", "50000", "big.bin"});
  expect_error([&] { dmat::TokenLoader L(fx.paths, 0, 1, true); }, {"seq_len"});
}

// ---- tokenizer ------------------------------------------------------------------------------------

TEST(DataTokenizer, ByteRoundTripIncludingInvalidUtf8) {
  const auto tok = dmat::load_tokenizer("byte");
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 257u);
  EXPECT_EQ(tok->eot_id(), 256u);
  EXPECT_EQ(tok->hash(), "byte-v1");
  dmat::Rng r(42);
  std::string s(10000, '\0');
  for (auto& c : s) c = char(r.below(256));
  s += "\xff\xfe\xc3(\x80";  // invalid UTF-8 sequences
  std::vector<uint32_t> ids;
  tok->encode(s, ids);
  ASSERT_EQ(ids.size(), s.size());
  for (uint32_t id : ids) ASSERT_LT(id, 256u);
  EXPECT_EQ(tok->decode(ids), s);
  ids.push_back(256);  // eot decodes to nothing
  EXPECT_EQ(tok->decode(ids), s);
  EXPECT_THROW(tok->decode({257}), Error);
  tok->encode("ab", ids);  // appends
  EXPECT_EQ(ids.size(), s.size() + 3);
}

TEST(DataTokenizer, UnsupportedSpec) {
  expect_error([] { dmat::load_tokenizer("gpt2.json"); },
               {"tokenizer \"gpt2.json\": not \"byte\" and not an existing file", "tokenizer.json"});
}

// ---- prepare / inspect ------------------------------------------------------------------------------

namespace {

nlohmann::json manifest_of(const std::string& out) { return nlohmann::json::parse(file_bytes(out + "/manifest.json")); }

// All tokens of a split, in shard order.
std::vector<int32_t> split_tokens(const std::string& out, const std::string& split) {
  std::vector<int32_t> all;
  if (!fs::exists(out + "/" + split)) return all;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(out + "/" + split)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    const auto v = read_all(f);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

// Documents (as strings) decoded from a split's token stream, split at eot.
std::vector<std::string> split_documents(const std::string& out, const std::string& split) {
  std::vector<std::string> docs(1);
  for (int32_t t : split_tokens(out, split)) {
    if (t == 256) docs.emplace_back();
    else docs.back().push_back(char(t));
  }
  EXPECT_TRUE(docs.back().empty());  // the stream ends with eot
  docs.pop_back();
  return docs;
}

// A small corpus: text files with documents separated by two blank lines, a .jsonl, noise.
std::string make_corpus(const std::string& tag, int n_docs = 60) {
  const auto dir = dmat::test::temp_dir(tag);
  std::string a, b;
  for (int i = 0; i < n_docs; ++i) {
    std::string doc = fmt::format("Document {} begins here.\nIt has a second line.\n\nAnd a second paragraph {}.\n", i,
                                  i * 7);
    (i % 2 ? a : b) += doc + "\n\n";
  }
  write_bytes(dir + "/in/a.txt", a);
  write_bytes(dir + "/in/sub/b.md", b);
  write_bytes(dir + "/in/docs.jsonl", "{\"text\": \"json doc one\"}\n\n{\"text\": \"json doc two\", \"id\": 3}\n");
  write_bytes(dir + "/in/image.png", std::string("\x89PNG\0\0", 6));
  return dir;
}

}  // namespace

TEST(DataPrepare, DeterministicManifestAndShards) {
  const auto dir = make_corpus("data_prepare_det");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.val_fraction = 0.2;
  o.shard_tokens = 1000;
  o.out_dir = dir + "/out1";
  const auto r1 = dmat::prepare_data(o);
  o.out_dir = dir + "/out2";
  const auto r2 = dmat::prepare_data(o);
  EXPECT_EQ(r1.documents, 62);
  EXPECT_EQ(r1.duplicates, 0);
  EXPECT_EQ(file_bytes(dir + "/out1/manifest.json"), file_bytes(dir + "/out2/manifest.json"));
  const auto m = manifest_of(dir + "/out1");
  EXPECT_EQ(m["tokenizer"]["name"], "byte");
  EXPECT_EQ(m["tokenizer"]["hash"], "byte-v1");
  EXPECT_EQ(m["documents"], 62);
  EXPECT_EQ(m["files_skipped_type"], 1);  // the .png
  EXPECT_GT(r1.val_tokens, 0);
  EXPECT_GT(r1.train_tokens, r1.val_tokens);
  EXPECT_EQ(m["train"]["tokens"], r1.train_tokens);
  EXPECT_EQ(m["val"]["tokens"], r1.val_tokens);
  EXPECT_GT(m["train"]["shards"].size(), 1u);  // shard_tokens splits the stream
  int64_t sum = 0;
  for (const auto& sh : m["train"]["shards"]) {
    const std::string f = sh["file"];
    EXPECT_EQ(file_bytes(dir + "/out1/" + f), file_bytes(dir + "/out2/" + f));
    const auto info = dmat::read_shard_info(dir + "/out1/" + f);
    EXPECT_EQ(int64_t(info.n_tokens), sh["tokens"].get<int64_t>());
    EXPECT_LE(info.n_tokens, 1000u);
    EXPECT_EQ(info.vocab_size, 257u);
    EXPECT_EQ(info.token_bytes, 2u);
    EXPECT_EQ(sh["fnv1a64"].get<std::string>().size(), 16u);
    sum += int64_t(info.n_tokens);
  }
  EXPECT_EQ(sum, r1.train_tokens);
  // The documents are exactly the inputs' documents, each once, with internal paragraphs kept.
  auto docs = split_documents(dir + "/out1", "train");
  const auto vdocs = split_documents(dir + "/out1", "val");
  docs.insert(docs.end(), vdocs.begin(), vdocs.end());
  std::set<std::string> got(docs.begin(), docs.end());
  EXPECT_EQ(got.size(), docs.size());
  EXPECT_EQ(got.size(), 62u);
  EXPECT_TRUE(got.count("Document 5 begins here.\nIt has a second line.\n\nAnd a second paragraph 35.\n"));
  EXPECT_TRUE(got.count("json doc two"));
  // Inspect: a shard and the directory.
  const std::string first = m["train"]["shards"][0]["file"];
  const auto shard_desc = dmat::inspect_data(dir + "/out1/" + first, 50);
  EXPECT_NE(shard_desc.find("vocab size      257"), std::string::npos) << shard_desc;
  EXPECT_NE(shard_desc.find("Document"), std::string::npos) << shard_desc;
  const auto dir_desc = dmat::inspect_data(dir + "/out1");
  EXPECT_NE(dir_desc.find("documents       62 (0 duplicates"), std::string::npos) << dir_desc;
  EXPECT_NE(dir_desc.find("[ok]"), std::string::npos) << dir_desc;
  EXPECT_EQ(dir_desc.find("MISMATCH"), std::string::npos) << dir_desc;
}

TEST(DataPrepare, DuplicatesCountedAndSplitStable) {
  const auto dir = make_corpus("data_prepare_dup", 200);
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.val_fraction = 0.1;
  o.out_dir = dir + "/out1";
  const auto r1 = dmat::prepare_data(o);
  // The same corpus plus a copy of one file and a jsonl repeating a document: only duplicates grow,
  // and every document lands in the same split as before (the split depends on its bytes alone).
  fs::copy_file(dir + "/in/a.txt", dir + "/in/zz_copy.txt");
  write_bytes(dir + "/in/more.jsonl", "{\"text\": \"json doc one\"}\n{\"text\": \"a brand new document\"}\n");
  o.out_dir = dir + "/out2";
  const auto r2 = dmat::prepare_data(o);
  EXPECT_EQ(r1.duplicates, 0);
  EXPECT_EQ(r2.duplicates, 100 + 1);
  EXPECT_EQ(r2.documents, r1.documents + 1);
  EXPECT_EQ(manifest_of(dir + "/out2")["duplicates"], 101);
  const auto t1 = split_documents(dir + "/out1", "train"), v1 = split_documents(dir + "/out1", "val");
  const auto t2 = split_documents(dir + "/out2", "train"), v2 = split_documents(dir + "/out2", "val");
  std::set<std::string> st2(t2.begin(), t2.end()), sv2(v2.begin(), v2.end());
  for (const auto& d : t1) EXPECT_TRUE(st2.count(d)) << d;
  for (const auto& d : v1) EXPECT_TRUE(sv2.count(d)) << d;
  EXPECT_GT(v1.size(), 5u);  // ~10% of 202
  EXPECT_LT(v1.size(), 45u);
}

TEST(DataPrepare, NormalisesNewlinesAndSplitsDocuments) {
  const auto dir = dmat::test::temp_dir("data_prepare_crlf");
  // CRLF, lone CR; one blank line keeps a paragraph inside a document, two split documents.
  write_bytes(dir + "/in/a.txt", "one\r\ntwo\r\n\r\nthree\r\n\r\n\r\nfour\rfive\r\r\r\r  \n\nsix");
  write_bytes(dir + "/in/b.jsonl", "{\"text\": \"crlf\\r\\ninside\\rjson\"}\r\n");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.val_fraction = 0;
  o.out_dir = dir + "/out";
  const auto r = dmat::prepare_data(o);
  EXPECT_EQ(r.documents, 4);
  EXPECT_EQ(r.val_tokens, 0);
  const auto docs = split_documents(dir + "/out", "train");
  EXPECT_EQ(docs, (std::vector<std::string>{"one\ntwo\n\nthree\n", "four\nfive\n", "six\n", "crlf\ninside\njson"}));
  for (const auto& d : docs) EXPECT_EQ(d.find('\r'), std::string::npos);

  // A CRLF split across the reader's 1 MiB chunks is still one line end: one blank line between
  // the two paragraphs, so one document (an extra blank line would make two).
  const auto dir2 = dmat::test::temp_dir("data_prepare_crlf_chunk");
  const std::string big(1048575, 'a');
  write_bytes(dir2 + "/in/a.txt", big + "\r\n\r\nsecond\r\n");
  o.inputs = {dir2 + "/in"};
  o.out_dir = dir2 + "/out";
  EXPECT_EQ(dmat::prepare_data(o).documents, 1);
  EXPECT_EQ(split_documents(dir2 + "/out", "train"), std::vector<std::string>{big + "\n\nsecond\n"});
}

TEST(DataPrepare, EmptyInputBinaryAndBadInputs) {
  const auto dir = dmat::test::temp_dir("data_prepare_empty");
  write_bytes(dir + "/in/blank.txt", "\n\n   \n");
  write_bytes(dir + "/in/bin.txt", std::string("abc\0def", 7));
  fs::create_directories(dir + "/in/empty_sub");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.out_dir = dir + "/out";
  expect_error([&] { dmat::prepare_data(o); }, {"no documents", dir + "/in", "1 skipped as binary"});
  EXPECT_FALSE(fs::exists(dir + "/out/manifest.json"));
  o.inputs = {dir + "/nothing_here"};
  expect_error([&] { dmat::prepare_data(o); }, {dir + "/nothing_here", "no such file"});
  write_bytes(dir + "/bad.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n");
  o.inputs = {dir + "/bad.jsonl"};
  expect_error([&] { dmat::prepare_data(o); }, {"bad.jsonl:2", "\"text\""});
  // A failed prepare leaves no shards behind.
  for (const char* split : {"train", "val"})
    if (fs::exists(dir + "/out/" + split)) EXPECT_TRUE(fs::is_empty(dir + "/out/" + split));
  o.tokenizer = "bpe";
  expect_error([&] { dmat::prepare_data(o); }, {"tokenizer \"bpe\""});
}

TEST(DataPrepare, RefusesExistingShardsWithoutOverwrite) {
  const auto dir = make_corpus("data_prepare_overwrite");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.out_dir = dir + "/out";
  o.val_fraction = 0.2;
  o.shard_tokens = 500;
  dmat::prepare_data(o);
  const auto before = manifest_of(dir + "/out");
  const size_t n_before = before["train"]["shards"].size();
  ASSERT_GT(n_before, 2u);
  expect_error([&] { dmat::prepare_data(o); }, {dir + "/out", "--overwrite"});
  // With overwrite, old shards go: fewer, larger shards leave none of the old names behind.
  o.overwrite = true;
  o.shard_tokens = 100000;
  dmat::prepare_data(o);
  const auto after = manifest_of(dir + "/out");
  EXPECT_EQ(after["train"]["shards"].size(), 1u);
  EXPECT_EQ(dmat::list_shards(dir + "/out/train").size(), 1u);
  EXPECT_EQ(after["train"]["tokens"], before["train"]["tokens"]);
  // No staging folders left.
  for (const auto& e : fs::directory_iterator(dir + "/out"))
    EXPECT_TRUE(e.path().filename() == "train" || e.path().filename() == "val" ||
                e.path().filename() == "manifest.json")
        << e.path();
}

TEST(DataPrepare, LoaderReadsPreparedShards) {
  const auto dir = make_corpus("data_prepare_loader");
  dmat::PrepareOptions o;
  o.inputs = {dir + "/in"};
  o.out_dir = dir + "/out";
  o.val_fraction = 0.2;
  const auto r = dmat::prepare_data(o);
  dmat::TokenLoader train(dmat::list_shards(dir + "/out/train"), 32, 1, true);
  EXPECT_EQ(int64_t(train.total_tokens()), r.train_tokens);
  EXPECT_EQ(train.num_windows(), (r.train_tokens - 1) / 32);
  EXPECT_EQ(train.vocab_size(), 257u);
}

// The bundled corpus prepares into the figures data/README.md states.
TEST(DataCorpus, BundledEnglishMatchesReadme) {
  const auto dir = dmat::test::temp_dir("data_corpus");
  dmat::PrepareOptions o;
  o.inputs = {dmat::test::source_dir() + "/data/english"};
  o.out_dir = dir + "/out";
  o.val_fraction = 0.03;
  const auto r = dmat::prepare_data(o);
  EXPECT_EQ(r.documents, 1689);
  EXPECT_EQ(r.duplicates, 2);
  EXPECT_EQ(r.val_tokens, 106991);
  EXPECT_EQ(r.train_tokens, 2645973);
  const auto m = manifest_of(dir + "/out");
  EXPECT_EQ(m["val"]["documents"], 54);
  EXPECT_EQ(m["files_read"], 2);
}
