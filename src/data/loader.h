// Deterministic, resumable sampling of training sequences from a shard set.
//
// The token stream of every shard is cut into windows of seq_len+1 tokens with stride seq_len
// (window c covers tokens [c·T, c·T+T+1) of its shard; windows never cross shards). Global sequence
// index g (0, 1, 2, … over the whole run, across ranks and micro-steps) maps to epoch e = g / W and
// window perm_e(g mod W), where W is the number of windows and perm_e is a seeded bijection on
// [0, W) (a cycle-walking Feistel network): every window is seen once per epoch, in an order that
// depends only on (seed, epoch). A sample is therefore a pure function of (seed, g): the loader's
// whole position is one integer, saved in checkpoints, and ranks take disjoint indices.
//
// Loss masks (shards with a mask, data/shard.h): the target of position t is −1 (ignored by the
// loss, by every backend) wherever the mask of window token t+1 is 0, so the loss and its gradient
// count only the masked-in targets. A shard set is all masked or all unmasked. Shards that declare a
// sequence length S (whole sequences, e.g. MQAR examples) are read only at seq_len = S, so a window
// is exactly one sequence.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/shard.h"

namespace dmat {

class TokenLoader {
 public:
  // shuffle=false: window order is sequential (the validation set). Errors if a shard set mixes
  // vocab sizes or holds no full window.
  TokenLoader(const std::vector<std::string>& shard_paths, int64_t seq_len, uint64_t seed, bool shuffle);
  ~TokenLoader();

  int64_t seq_len() const { return seq_len_; }
  int64_t num_windows() const { return n_windows_; }  // W, sequences per epoch
  uint32_t vocab_size() const { return vocab_size_; }
  uint64_t total_tokens() const { return total_tokens_; }
  bool has_mask() const { return has_mask_; }  // targets outside the mask are −1

  // inputs[t] = window[t], targets[t] = window[t+1] (−1 where masked out), t < seq_len, for global
  // sequence index g.
  void get(int64_t g, int32_t* inputs, int32_t* targets) const;
  // n consecutive sequences g0 … g0+n−1 into [n, seq_len] buffers (parallel, deterministic).
  void get_batch(int64_t g0, int64_t n, int32_t* inputs, int32_t* targets) const;

 private:
  int64_t window_index(int64_t g) const;
  std::vector<ShardReader> shards_;
  std::vector<int64_t> first_window_;  // prefix sums of windows per shard
  int64_t seq_len_ = 0, n_windows_ = 0;
  uint64_t seed_ = 0, total_tokens_ = 0;
  uint32_t vocab_size_ = 0;
  bool shuffle_ = true, has_mask_ = false;
};

// A seeded bijection on [0, n) (cycle-walking Feistel network), exposed for tests.
int64_t permute_index(int64_t i, int64_t n, uint64_t key);

}  // namespace dmat
