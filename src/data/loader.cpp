// TokenLoader: windows of seq_len+1 tokens per shard, visited once per epoch in a seeded order.
#include "data/loader.h"

#include <algorithm>
#include <exception>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "core/rng.h"

namespace dmat {

namespace {

// Names a shard set in messages: the file, or the common folder and a count.
std::string describe_set(const std::vector<std::string>& paths) {
  if (paths.size() == 1) return paths[0];
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(paths[0]).parent_path();
  const bool same_dir = std::all_of(paths.begin(), paths.end(),
                                    [&](const std::string& p) { return fs::path(p).parent_path() == dir; });
  if (same_dir) return fmt::format("{}/ ({} shards)", dir.string(), paths.size());
  return fmt::format("{} and {} more shards", paths[0], paths.size() - 1);
}

// One round function of the Feistel network: keyed hash of the right half.
inline uint64_t feistel_round(uint64_t right, uint64_t key, uint64_t round) { return hash64(key, round, right); }

}  // namespace

int64_t permute_index(int64_t i, int64_t n, uint64_t key) {
  if (n <= 0 || i < 0 || i >= n) fail("permute_index: index {} is outside [0, {})", i, n);
  if (n == 1) return 0;
  // Balanced Feistel network on 2·half bits, the smallest even width whose domain holds n (so the
  // domain is < 4n); cycle-walking re-applies it until the value lands in [0, n). A permutation of
  // the domain restricted this way is a bijection on [0, n); expected walks are < 4 steps.
  int bits = 0;
  while ((uint64_t(1) << bits) < uint64_t(n)) ++bits;
  const int half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  constexpr int kRounds = 6;
  uint64_t x = uint64_t(i);
  do {
    uint64_t l = x >> half, r = x & mask;
    for (int k = 0; k < kRounds; ++k) {
      const uint64_t next = l ^ (feistel_round(r, key, uint64_t(k)) & mask);
      l = r;
      r = next;
    }
    x = (l << half) | r;
  } while (x >= uint64_t(n));
  return int64_t(x);
}

TokenLoader::TokenLoader(const std::vector<std::string>& shard_paths, int64_t seq_len, uint64_t seed, bool shuffle)
    : seq_len_(seq_len), seed_(seed), shuffle_(shuffle) {
  if (shard_paths.empty()) fail("data loader: empty shard set (no shard files given)");
  if (seq_len < 1) fail("data loader: seq_len must be >= 1 (got {})", seq_len);
  const std::string set = describe_set(shard_paths);
  shards_.reserve(shard_paths.size());
  first_window_.reserve(shard_paths.size() + 1);
  first_window_.push_back(0);
  uint64_t longest = 0;
  int64_t unused_shards = 0;
  const uint64_t T = uint64_t(seq_len);
  for (const auto& p : shard_paths) {
    shards_.emplace_back(p);
    const ShardInfo& info = shards_.back().info();
    if (shards_.size() == 1) vocab_size_ = info.vocab_size;
    else if (info.vocab_size != vocab_size_)
      fail("shard set {}: mixed vocab sizes: {} has {}, {} has {} (all shards of a set must share one tokenizer)",
           set, shard_paths[0], vocab_size_, p, info.vocab_size);
    if (shards_.size() == 1) has_mask_ = info.has_mask;
    else if (info.has_mask != has_mask_)
      fail("shard set {}: {} has {} loss mask but {} has {} (all shards of a set must agree)", set, shard_paths[0],
           has_mask_ ? "a" : "no", p, info.has_mask ? "one" : "none");
    if (info.sequence_length > 0 && uint64_t(seq_len) != info.sequence_length)
      fail("shard set {}: {} holds whole sequences of {} tokens (e.g. generated examples), so train.seq_len must be "
           "{} (got {})",
           set, p, info.sequence_length, info.sequence_length, seq_len);
    total_tokens_ += info.n_tokens;
    longest = std::max(longest, info.n_tokens);
    // Window c covers [c·T, c·T+T+1): it fits iff c·T + T + 1 <= n, so there are floor((n-1)/T).
    const int64_t w = info.n_tokens > T ? int64_t((info.n_tokens - 1) / T) : 0;
    if (w == 0) ++unused_shards;
    first_window_.push_back(first_window_.back() + w);
  }
  n_windows_ = first_window_.back();
  if (n_windows_ == 0)
    fail("shard set {}: no full window: every shard is shorter than seq_len+1 = {} tokens (longest has {}); use a "
         "shorter train.seq_len or more data",
         set, seq_len + 1, longest);
  if (unused_shards > 0)
    spdlog::warn("shard set {}: {} of {} shards are shorter than seq_len+1 = {} tokens and are never read", set,
                 unused_shards, shards_.size(), seq_len + 1);
}

TokenLoader::~TokenLoader() = default;

int64_t TokenLoader::window_index(int64_t g) const {
  if (g < 0) fail("data loader: sequence index must be >= 0 (got {})", g);
  const int64_t epoch = g / n_windows_, i = g % n_windows_;
  if (!shuffle_) return i;
  return permute_index(i, n_windows_, hash64(seed_, uint64_t(epoch)));
}

void TokenLoader::get(int64_t g, int32_t* inputs, int32_t* targets) const {
  const int64_t w = window_index(g);
  // The shard holding window w: the last s with first_window_[s] <= w.
  const size_t s = size_t(std::upper_bound(first_window_.begin(), first_window_.end(), w) - first_window_.begin()) - 1;
  const uint64_t offset = uint64_t(w - first_window_[s]) * uint64_t(seq_len_);
  const ShardReader& r = shards_[s];
  r.read(offset, uint64_t(seq_len_), inputs);
  std::copy(inputs + 1, inputs + seq_len_, targets);
  r.read(offset + uint64_t(seq_len_), 1, targets + seq_len_ - 1);
  if (!has_mask_) return;
  // the mask of the targets: window tokens 1 … seq_len
  constexpr int64_t kChunk = 4096;
  uint8_t m[kChunk];
  for (int64_t t0 = 0; t0 < seq_len_; t0 += kChunk) {
    const int64_t n = std::min(kChunk, seq_len_ - t0);
    r.read_mask(offset + 1 + uint64_t(t0), uint64_t(n), m);
    for (int64_t t = 0; t < n; ++t)
      if (!m[t]) targets[t0 + t] = -1;
  }
}

void TokenLoader::get_batch(int64_t g0, int64_t n, int32_t* inputs, int32_t* targets) const {
  if (n < 0) fail("data loader: batch size must be >= 0 (got {})", n);
  // Each sequence is a pure function of its index, so the result does not depend on scheduling.
  // Threads only for batches of a million tokens or more: a training micro-batch (e.g. 16 × 2048)
  // is a ~0.1 ms copy, less than waking a team, whose idle threads then spin on cores the GPU
  // ranks' launch threads need.
  std::exception_ptr err;
#pragma omp parallel for schedule(static) if (n * seq_len_ >= (int64_t(1) << 20))
  for (int64_t b = 0; b < n; ++b) {
    try {
      get(g0 + b, inputs + b * seq_len_, targets + b * seq_len_);
    } catch (...) {
#pragma omp critical(dmat_loader_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace dmat
