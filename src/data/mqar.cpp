// MQAR examples, their disjoint train/test splits, and the files (definitions in mqar.h).
#include "data/mqar.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <filesystem>
#include <fstream>
#include <unordered_set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"

namespace dmat {
namespace fs = std::filesystem;

namespace {

constexpr int64_t kMaxAttempts = 1000;  // redraws of one train example before giving up

// The query-slot weights' reciprocals 1/w_s = (s+1)^(1−a), computed once per option set.
struct SlotTable {
  std::vector<double> inv_weight;
  explicit SlotTable(const MqarOptions& o) {
    const int64_t slots = (o.seq_len - 2 * o.pairs) / 2;
    inv_weight.resize(size_t(slots));
    for (int64_t s = 0; s < slots; ++s) inv_weight[size_t(s)] = std::pow(double(s + 1), 1.0 - o.gap_power);
  }
};

// n distinct ids from [lo, lo + range) in random order (Floyd's subset, then a Fisher–Yates shuffle).
std::vector<uint32_t> distinct_ids(Rng& r, int64_t lo, int64_t range, int64_t n) {
  std::unordered_set<int64_t> chosen;
  chosen.reserve(size_t(2 * n));
  std::vector<uint32_t> out;
  out.reserve(size_t(n));
  for (int64_t j = range - n; j < range; ++j) {
    const int64_t t = int64_t(r.below(uint64_t(j + 1)));
    const int64_t pick = chosen.count(t) ? j : t;
    chosen.insert(pick);
    out.push_back(uint32_t(lo + pick));
  }
  for (int64_t i = n - 1; i > 0; --i) std::swap(out[size_t(i)], out[size_t(r.below(uint64_t(i + 1)))]);
  return out;
}

MqarExample make_example(const MqarOptions& o, const SlotTable& slots, int split, int64_t index, int64_t attempt) {
  Rng r(hash64(hash64(o.seed, 0x4D514152ull + uint64_t(split)), uint64_t(index), uint64_t(attempt)));
  const int64_t V = o.vocab, P = o.pairs, T = o.seq_len, half = V / 2;
  const std::vector<uint32_t> keys = distinct_ids(r, 1, half - 1, P);
  const std::vector<uint32_t> values = distinct_ids(r, half, V - half, P);
  MqarExample ex;
  ex.tokens.resize(size_t(T));
  ex.mask.assign(size_t(T), 0);
  for (int64_t i = 0; i < P; ++i) {
    ex.tokens[size_t(2 * i)] = keys[size_t(i)];
    ex.tokens[size_t(2 * i + 1)] = values[size_t(i)];
  }
  // Query slots: P of S without replacement, weights w_s, by exponential keys −log(u)/w_s (the P
  // smallest, in increasing order, are a sequential weighted draw: Efraimidis–Spirakis).
  const int64_t S = int64_t(slots.inv_weight.size());
  auto race = std::vector<std::pair<double, int64_t>>(size_t(S));
  for (int64_t s = 0; s < S; ++s) {
    const double u = 1.0 - r.uniform();  // (0, 1]
    race[size_t(s)] = {-std::log(u) * slots.inv_weight[size_t(s)], s};
  }
  std::partial_sort(race.begin(), race.begin() + P, race.end());
  for (int64_t t = 2 * P; t < T; ++t) ex.tokens[size_t(t)] = uint32_t(r.below(uint64_t(V)));
  for (int64_t i = 0; i < P; ++i) {
    const int64_t at = 2 * P + 2 * race[size_t(i)].second;
    ex.tokens[size_t(at)] = keys[size_t(i)];
    ex.tokens[size_t(at + 1)] = values[size_t(i)];
    ex.mask[size_t(at + 1)] = 1;
  }
  auto pairs = std::vector<std::pair<uint32_t, uint32_t>>(size_t(P));
  for (int64_t i = 0; i < P; ++i) pairs[size_t(i)] = {keys[size_t(i)], values[size_t(i)]};
  std::sort(pairs.begin(), pairs.end());
  uint64_t h = hash64(uint64_t(V), uint64_t(P));
  for (const auto& [k, v] : pairs) h = hash64(h, uint64_t(k) << 32 | v);
  ex.assignment = h;
  return ex;
}

struct SplitFiles {
  std::string name;
  int64_t examples = 0, tokens = 0;
  nlohmann::ordered_json shards = nlohmann::ordered_json::array();
};

}  // namespace

void check_mqar_options(const MqarOptions& o) {
  if (o.out_dir.empty()) fail("data mqar: --out DIR is required");
  if (o.vocab < 4 || o.vocab > (int64_t(1) << 32))
    fail("data mqar: --vocab must be in [4, 2^32] (got {})", o.vocab);
  if (o.pairs < 1) fail("data mqar: --pairs must be >= 1 (got {})", o.pairs);
  if (o.pairs > o.vocab / 2 - 1)
    fail("data mqar: --pairs {} needs that many distinct keys in [1, V/2) = [1, {}): at most {} for --vocab {}; raise "
         "--vocab to at least {}",
         o.pairs, o.vocab / 2, o.vocab / 2 - 1, o.vocab, 2 * o.pairs + 2);
  if (o.seq_len < 4 * o.pairs)
    fail("data mqar: --seq-len {} is too short for {} pairs: the context takes 2P = {} tokens and the P queries "
         "with their answers need at least 2P more (--seq-len >= 4P = {})",
         o.seq_len, o.pairs, 2 * o.pairs, 4 * o.pairs);
  if (o.seq_len > (int64_t(1) << 30)) fail("data mqar: --seq-len must be <= 2^30 (got {})", o.seq_len);
  if (o.train_examples < 1) fail("data mqar: --train-examples must be >= 1 (got {})", o.train_examples);
  if (o.test_examples < 1) fail("data mqar: --test-examples must be >= 1 (got {})", o.test_examples);
  if (!(o.gap_power > 0 && o.gap_power <= 1))
    fail("data mqar: --gap-power must be in (0, 1] (got {}; 0.01 is Zoology's, 1 uniform)", o.gap_power);
  if (o.shard_tokens < o.seq_len + 1)
    fail("data mqar: --shard-tokens {} must hold one example (>= --seq-len + 1 = {})", o.shard_tokens, o.seq_len + 1);
}

MqarExample mqar_example(const MqarOptions& o, int split, int64_t index, int64_t attempt) {
  check_mqar_options(o);
  return make_example(o, SlotTable(o), split, index, attempt);
}

MqarResult write_mqar(const MqarOptions& o) {
  check_mqar_options(o);
  const fs::path out(o.out_dir);
  std::error_code ec;
  std::vector<std::string> old;
  for (const char* split : {"train", "test"})
    if (fs::is_directory(out / split, ec))
      for (const auto& e : fs::directory_iterator(out / split, ec))
        if (e.path().extension() == ".bin") old.push_back(e.path().string());
  if (!old.empty() && !o.overwrite)
    fail("data mqar: {} already holds {} shard files (e.g. {}); refusing to overwrite them without --overwrite",
         o.out_dir, old.size(), old[0]);
  fs::create_directories(out, ec);
  if (ec) fail("data mqar: cannot create output directory {}: {}", o.out_dir, ec.message());
  const fs::path staging = out / fmt::format(".mqar-staging-{}", ::getpid());
  fs::remove_all(staging, ec);

  const SlotTable slots(o);
  const int64_t T = o.seq_len, per_shard = std::max<int64_t>(1, (o.shard_tokens - 1) / T);
  std::unordered_set<uint64_t> test_assignments;
  MqarResult res;
  SplitFiles splits[2] = {{"train"}, {"test"}};
  try {
    // the test set first: train examples are redrawn against its assignments
    for (int split : {1, 0}) {
      SplitFiles& sf = splits[split];
      const int64_t n = split == 0 ? o.train_examples : o.test_examples;
      fs::create_directories(staging / sf.name);
      for (int64_t first = 0, shard = 0; first < n; first += per_shard, ++shard) {
        const int64_t count = std::min(per_shard, n - first);
        std::vector<uint32_t> tokens(size_t(count * T + 1), 0);  // + the trailing token, 0, masked out
        std::vector<uint8_t> mask(tokens.size(), 0);
        int64_t redrawn = 0;
        bool exhausted = false;
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : redrawn) reduction(|| : exhausted)
        for (int64_t e = 0; e < count; ++e) {
          MqarExample ex = make_example(o, slots, split, first + e, 0);
          for (int64_t a = 1; split == 0 && test_assignments.count(ex.assignment); ++a) {
            if (a == kMaxAttempts) {
              exhausted = true;
              break;
            }
            ex = make_example(o, slots, split, first + e, a);
            ++redrawn;
          }
          std::copy(ex.tokens.begin(), ex.tokens.end(), tokens.begin() + e * T);
          std::copy(ex.mask.begin(), ex.mask.end(), mask.begin() + e * T);
          if (split == 1) {
#pragma omp critical(dmat_mqar_test_set)
            test_assignments.insert(ex.assignment);
          }
        }
        if (exhausted)
          fail("data mqar: a train example drew a test example's key-value assignment {} times in a row: with "
               "--vocab {} and --pairs {} there are too few assignments for {} test examples; raise --vocab or "
               "--pairs, or lower --test-examples",
               kMaxAttempts, o.vocab, o.pairs, o.test_examples);
        res.redrawn += redrawn;
        const std::string file = fmt::format("{}/shard_{:06d}.bin", sf.name, shard);
        write_masked_shard((staging / file).string(), tokens, mask, uint32_t(o.vocab), uint32_t(T));
        sf.shards.push_back({{"file", file}, {"examples", count}, {"tokens", int64_t(tokens.size())}});
        sf.examples += count;
        sf.tokens += int64_t(tokens.size());
      }
    }
    res.train_tokens = splits[0].tokens;
    res.test_tokens = splits[1].tokens;

    nlohmann::ordered_json m;
    m["format"] = "dmatrain-data";
    m["version"] = 1;
    m["generator"] = "mqar";
    m["definition"] = "multi-query associative recall (Zoology, Arora et al. 2023); layout in src/data/mqar.h and "
                      "README 'Recall evaluations'";
    m["options"] = {{"vocab", o.vocab},           {"pairs", o.pairs},
                    {"seq_len", o.seq_len},       {"train_examples", o.train_examples},
                    {"test_examples", o.test_examples}, {"seed", o.seed},
                    {"gap_power", o.gap_power}};
    m["tokenizer"] = {{"name", "none: token ids"}, {"vocab_size", o.vocab}};
    m["loss_mask"] = "1 at the answer after each query (P per example), 0 elsewhere";
    m["disjoint"] = "no test example's key-value assignment (its set of pairs) occurs in train: a train example that "
                    "drew one is redrawn";
    m["train_redrawn"] = res.redrawn;
    for (const SplitFiles& sf : splits)
      m[sf.name] = {{"examples", sf.examples}, {"tokens", sf.tokens}, {"answers", sf.examples * o.pairs},
                    {"shards", sf.shards}};

    // commit: old shards out, new ones in, the manifest last
    for (const auto& p : old) fs::remove(p);
    fs::remove(out / "manifest.json", ec);
    for (const SplitFiles& sf : splits) {
      fs::create_directories(out / sf.name);
      for (const auto& sh : sf.shards) {
        const std::string file = sh.at("file").get<std::string>();
        fs::rename(staging / file, out / file);
      }
    }
    const std::string mpath = (out / "manifest.json").string(), mtmp = mpath + ".tmp";
    {
      std::ofstream f(mtmp);
      f << m.dump(2) << "\n";
      if (!f) fail("data mqar: cannot write {}", mtmp);
    }
    fs::rename(mtmp, mpath);
    fs::remove_all(staging, ec);
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  return res;
}

}  // namespace dmat
