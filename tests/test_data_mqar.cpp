// MQAR data (`dmatrain data mqar`, src/data/mqar.h) and the loss mask it relies on: version 2
// shards with a mask and a sequence length, the loader turning masked-out targets into −1, the
// generator's layout, determinism, disjoint train/test assignments and option errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/loader.h"
#include "data/mqar.h"
#include "data/shard.h"
#include "test_util.h"

namespace fs = std::filesystem;
using dmat::Error;

namespace {

using dmat::test::expect_error;
using dmat::test::file_bytes;
using dmat::test::write_bytes;

dmat::MqarOptions small(const std::string& dir) {
  dmat::MqarOptions o;
  o.out_dir = dir;
  o.vocab = 64;
  o.pairs = 4;
  o.seq_len = 24;
  o.train_examples = 300;
  o.test_examples = 50;
  o.seed = 3;
  return o;
}

// An example's set of (key, value) pairs from its first 2P tokens.
std::set<std::pair<int32_t, int32_t>> assignment(const int32_t* ex, int64_t P) {
  std::set<std::pair<int32_t, int32_t>> s;
  for (int64_t i = 0; i < P; ++i) s.insert({ex[2 * i], ex[2 * i + 1]});
  return s;
}

}  // namespace

TEST(DataMaskedShard, RoundTripAndValidation) {
  const auto dir = dmat::test::temp_dir("data_masked_shard");
  const std::string p = dir + "/m.bin";
  const std::vector<uint32_t> tok = {5, 6, 7, 8, 9, 10, 11};  // 2 sequences of 3 + 1
  const std::vector<uint8_t> mask = {0, 1, 0, 0, 1, 1, 0};
  dmat::write_masked_shard(p, tok, mask, 300, 3);
  EXPECT_EQ(fs::file_size(p), 64u + 2u * 7u + 7u);
  const auto info = dmat::read_shard_info(p);
  EXPECT_EQ(info.version, 2u);
  EXPECT_TRUE(info.has_mask);
  EXPECT_EQ(info.sequence_length, 3u);
  dmat::ShardReader r(p);
  std::vector<uint8_t> m(7);
  r.read_mask(0, 7, m.data());
  EXPECT_EQ(m, mask);
  std::vector<int32_t> t(7);
  r.read(0, 7, t.data());
  EXPECT_EQ(std::vector<int32_t>(tok.begin(), tok.end()), t);
  // writer refusals
  expect_error([&] { dmat::write_masked_shard(dir + "/a.bin", tok, {0, 1}, 300, 0); }, {"2 mask values for 7 tokens"});
  expect_error([&] { dmat::write_masked_shard(dir + "/b.bin", tok, {0, 2, 0, 0, 0, 0, 0}, 300, 0); },
               {"mask value 2 at position 1"});
  expect_error([&] { dmat::write_masked_shard(dir + "/c.bin", tok, mask, 300, 4); }, {"whole sequences of 4"});
  // reader refusals: a corrupt mask byte, a missing mask, unknown flags
  std::string b = file_bytes(p);
  std::string bad = b;
  bad[64 + 14 + 2] = 7;
  write_bytes(dir + "/bad.bin", bad);
  dmat::ShardReader rb(dir + "/bad.bin");
  expect_error([&] { rb.read_mask(0, 7, m.data()); }, {"bad.bin", "mask value 7 at position 2"});
  write_bytes(dir + "/short.bin", b.substr(0, b.size() - 3));
  expect_error([&] { dmat::read_shard_info(dir + "/short.bin"); }, {"truncated", "tokens and mask"});
  std::string flags = b;
  flags[28] = 6;
  write_bytes(dir + "/flags.bin", flags);
  expect_error([&] { dmat::read_shard_info(dir + "/flags.bin"); }, {"unknown header flags"});
  // an unmasked shard has no mask to read
  dmat::write_shard(dir + "/plain.bin", tok, 300);
  dmat::ShardReader rp(dir + "/plain.bin");
  EXPECT_EQ(rp.info().version, 1u);
  expect_error([&] { rp.read_mask(0, 1, m.data()); }, {"has no loss mask"});
}

TEST(DataMaskedShard, LoaderMasksTargetsAndKeepsSequencesWhole) {
  const auto dir = dmat::test::temp_dir("data_masked_loader");
  const std::vector<uint32_t> tok = {5, 6, 7, 8, 9, 10, 11};
  const std::vector<uint8_t> mask = {0, 1, 0, 0, 1, 1, 0};
  dmat::write_masked_shard(dir + "/m.bin", tok, mask, 300, 3);
  dmat::TokenLoader L({dir + "/m.bin"}, 3, 1, false);
  EXPECT_TRUE(L.has_mask());
  ASSERT_EQ(L.num_windows(), 2);
  std::vector<int32_t> x(3), y(3);
  L.get(0, x.data(), y.data());
  EXPECT_EQ(x, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(y, (std::vector<int32_t>{6, -1, -1}));  // targets 6 (mask 1), 7 (0), 8 (0)
  L.get(1, x.data(), y.data());
  EXPECT_EQ(x, (std::vector<int32_t>{8, 9, 10}));
  EXPECT_EQ(y, (std::vector<int32_t>{9, 10, -1}));
  expect_error([&] { dmat::TokenLoader bad({dir + "/m.bin"}, 4, 1, false); },
               {"whole sequences of 3", "train.seq_len must be 3 (got 4)"});
  dmat::write_shard(dir + "/plain.bin", {1, 2, 3, 4, 5, 6, 7}, 300);
  expect_error([&] { dmat::TokenLoader mixed({dir + "/m.bin", dir + "/plain.bin"}, 3, 1, false); },
               {"loss mask", "plain.bin"});
}

TEST(DataMqar, ExamplesFollowTheDefinition) {
  const auto dir = dmat::test::temp_dir("data_mqar_layout");
  dmat::MqarOptions o = small(dir);
  const int64_t V = o.vocab, P = o.pairs, T = o.seq_len;
  for (int split : {0, 1})
    for (int64_t i = 0; i < 40; ++i) {
      const dmat::MqarExample ex = dmat::mqar_example(o, split, i, 0);
      ASSERT_EQ(int64_t(ex.tokens.size()), T);
      std::map<uint32_t, uint32_t> kv;
      std::set<uint32_t> values;
      for (int64_t p = 0; p < P; ++p) {
        const uint32_t k = ex.tokens[size_t(2 * p)], v = ex.tokens[size_t(2 * p + 1)];
        EXPECT_GE(k, 1u);
        EXPECT_LT(k, uint32_t(V / 2));
        EXPECT_GE(v, uint32_t(V / 2));
        EXPECT_LT(v, uint32_t(V));
        EXPECT_TRUE(kv.emplace(k, v).second) << "repeated key";
        EXPECT_TRUE(values.insert(v).second) << "repeated value";
        EXPECT_EQ(ex.mask[size_t(2 * p)] + ex.mask[size_t(2 * p + 1)], 0);  // no loss on the context
      }
      // every answer follows a query of its key; every key queried once, after the context
      std::set<uint32_t> queried;
      for (int64_t t = 2 * P; t < T; ++t) {
        if (!ex.mask[size_t(t)]) continue;
        ASSERT_TRUE((t - 2 * P) % 2 == 1) << "answers sit at the second token of a slot";
        const uint32_t k = ex.tokens[size_t(t - 1)];
        ASSERT_TRUE(kv.count(k)) << "answer after a non-key";
        EXPECT_EQ(ex.tokens[size_t(t)], kv[k]);
        EXPECT_TRUE(queried.insert(k).second);
      }
      EXPECT_EQ(int64_t(queried.size()), P);
    }
  // the power law favours early slots: with a = 0.01 over 8 slots most queries sit in the first half
  int64_t early = 0, all = 0;
  for (int64_t i = 0; i < 200; ++i) {
    const auto ex = dmat::mqar_example(o, 0, i, 0);
    for (int64_t t = 2 * P; t < T; ++t)
      if (ex.mask[size_t(t)]) ++all, early += (t - 2 * P) / 2 < 4;
  }
  EXPECT_GT(double(early) / double(all), 0.55);
}

TEST(DataMqar, DeterministicAndDisjoint) {
  const auto dir = dmat::test::temp_dir("data_mqar_files");
  // a small key-value space, so that train examples do draw test assignments and are redrawn:
  // keys [1, 5), values [5, 10): 12 · 20 = 240 assignments of 2 pairs, 120 test examples
  dmat::MqarOptions o = small(dir + "/a");
  o.vocab = 10;
  o.pairs = 2;
  o.seq_len = 8;
  o.train_examples = 500;
  o.test_examples = 120;
  o.shard_tokens = 8 * 100 + 1;  // 100 examples per shard: several shards
  const auto r = dmat::write_mqar(o);
  EXPECT_GT(r.redrawn, 0);
  dmat::MqarOptions o2 = o;
  o2.out_dir = dir + "/b";
  dmat::write_mqar(o2);
  for (const char* f : {"manifest.json", "train/shard_000000.bin", "train/shard_000004.bin", "test/shard_000001.bin"})
    EXPECT_EQ(file_bytes(dir + "/a/" + f), file_bytes(dir + "/b/" + f)) << f;
  o2.out_dir = dir + "/c";
  o2.seed = 4;
  dmat::write_mqar(o2);
  EXPECT_NE(file_bytes(dir + "/a/train/shard_000000.bin"), file_bytes(dir + "/c/train/shard_000000.bin"));

  // read back through the loader: no train example's assignment is a test example's
  auto examples = [&](const std::string& split) {
    dmat::TokenLoader L(dmat::list_shards(dir + "/a/" + split), o.seq_len, 1, false);
    std::vector<std::vector<int32_t>> ex;
    std::vector<int32_t> x(8), y(8);
    for (int64_t g = 0; g < L.num_windows(); ++g) {
      L.get(g, x.data(), y.data());
      ex.push_back(x);
      EXPECT_EQ(std::count_if(y.begin(), y.end(), [](int32_t t) { return t >= 0; }), o.pairs);
    }
    return ex;
  };
  const auto train = examples("train"), test = examples("test");
  ASSERT_EQ(int64_t(train.size()), o.train_examples);
  ASSERT_EQ(int64_t(test.size()), o.test_examples);
  std::set<std::set<std::pair<int32_t, int32_t>>> test_sets;
  for (const auto& e : test) test_sets.insert(assignment(e.data(), o.pairs));
  for (const auto& e : train) EXPECT_FALSE(test_sets.count(assignment(e.data(), o.pairs)));
  const auto m = nlohmann::json::parse(file_bytes(dir + "/a/manifest.json"));
  EXPECT_EQ(m["generator"], "mqar");
  EXPECT_EQ(m["train_redrawn"].get<int64_t>(), r.redrawn);
  EXPECT_EQ(m["test"]["answers"].get<int64_t>(), o.test_examples * o.pairs);
  // an existing output is kept unless overwrite
  expect_error([&] { dmat::write_mqar(o); }, {"refusing to overwrite", "--overwrite"});
}

TEST(DataMqar, OptionErrorsNameTheRule) {
  const auto dir = dmat::test::temp_dir("data_mqar_errors");
  dmat::MqarOptions o = small(dir);
  auto with = [&](auto f) {
    dmat::MqarOptions x = o;
    f(x);
    return x;
  };
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.pairs = 40; })); }, {"--pairs 40", "at most 31"});
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.seq_len = 15; })); }, {"--seq-len 15", ">= 4P = 16"});
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.gap_power = 0; })); }, {"--gap-power"});
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.test_examples = 0; })); }, {"--test-examples"});
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.vocab = 3; })); }, {"--vocab"});
  expect_error([&] { dmat::write_mqar(with([](auto& x) { x.out_dir = ""; })); }, {"--out"});
  // too few assignments for disjoint sets: 1 key, 2 values, 2 assignments, both in the test set
  expect_error(
      [&] {
        dmat::write_mqar(with([](auto& x) {
          x.vocab = 4, x.pairs = 1, x.seq_len = 4, x.test_examples = 100;
        }));
      },
      {"too few assignments"});
}
