// `dmatrain data mqar`: multi-query associative recall (MQAR, Zoology: Arora et al. 2023,
// "Zoology: Measuring and Improving Recall in Efficient Language Models"), written from the task's
// definition. An example of seq_len T tokens over a vocabulary of V ids:
//
//   positions 0 … 2P−1        k_1 v_1 k_2 v_2 … k_P v_P   P distinct keys from [1, V/2), P distinct
//                                                         values from [V/2, V), paired at random
//   positions 2P … T−1        (T − 2P)/2 two-token slots (one more filler token when T − 2P is odd);
//                             P of them, drawn without replacement with weight ∝ (s+1)^(a−1) for slot
//                             s (a = gap_power; Zoology's power_a = 0.01 favours early slots, a = 1
//                             is uniform), hold a query k_i followed by its answer v_i, every key
//                             queried once, in random order; every other position holds a filler
//                             token uniform over [0, V) (Zoology's random_non_queries)
//   loss mask                 1 at the P answer positions, 0 elsewhere
//
// So the model predicts v_i at the query's position from k_i and the context. (Zoology feeds a
// filler token after the query and puts the label there; in a token stream the answer itself follows
// the query, which only lets later queries see one more copy of a pair.)
//
// Files: OUT/train/shard_NNNNNN.bin and OUT/test/shard_NNNNNN.bin (version 2 shards with the loss
// mask and sequence length T: each holds whole examples plus one trailing 0 token, so the loader's
// windows are exactly the examples at train.seq_len = T), and OUT/manifest.json with the options
// and counts. Deterministic: example i of a split is a pure function of (seed, split, i, attempt),
// whatever the thread count.
//
// Disjoint splits: an example's key–value assignment is the set of its P (key, value) pairs. The
// test set is drawn first; a train example whose assignment (a 64-bit hash of its sorted pairs)
// equals a test example's is redrawn (the next attempt), so no test assignment occurs in training,
// in any order of pairs, with any queries or fillers. Redraws are counted in the manifest.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

struct MqarOptions {
  std::string out_dir;
  int64_t vocab = 8192;           // V: keys [1, V/2), values [V/2, V)
  int64_t pairs = 32;             // P key–value pairs per example
  int64_t seq_len = 256;          // T tokens per example (>= 4P)
  int64_t train_examples = 100000;
  int64_t test_examples = 3000;
  uint64_t seed = 1234;
  double gap_power = 0.01;        // a in (0, 1]: query slot weights (s+1)^(a−1)
  int64_t shard_tokens = int64_t(1) << 27;  // at most this many tokens per shard (whole examples)
  bool overwrite = false;
};

struct MqarExample {
  std::vector<uint32_t> tokens;  // T
  std::vector<uint8_t> mask;     // T, 1 at answers
  uint64_t assignment = 0;       // hash of the sorted (key, value) pairs
};

// Split 0 = train, 1 = test; attempt counts redraws. Options must be valid (check_mqar_options).
MqarExample mqar_example(const MqarOptions& o, int split, int64_t index, int64_t attempt);
// Throws dmat::Error naming the option and the rule it breaks.
void check_mqar_options(const MqarOptions& o);

struct MqarResult {
  int64_t train_tokens = 0, test_tokens = 0, redrawn = 0;
};
// Writes the shards and manifest (staged, moved into place when complete); refuses an out_dir that
// already holds shards unless overwrite.
MqarResult write_mqar(const MqarOptions& o);

}  // namespace dmat
