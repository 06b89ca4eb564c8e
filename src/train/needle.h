// `dmatrain needle RUN_DIR`: pass-key retrieval ("needle in a haystack") over a trained model. A
// sentence holding a random key (the needle) is inserted at a depth of 0–100% into filler taken from
// real validation text, the context ends with a question, and the model is scored on the answer two
// ways: greedy decoding reproducing the answer's tokens exactly, and the answer's log-likelihood
// ranked against K distractor keys. Every trial runs on the CPU backend with the layers' decoding
// caches: the context is fed once, each answer token then costs O(context), and the candidates are
// scored by rewinding the cache to the end of the context. Definitions: README "Needle retrieval".
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace dmat {

struct NeedleOptions {
  std::vector<int64_t> lengths = {1024, 2048, 4096, 8192, 16384};  // context tokens, the question included
  std::vector<double> depths = {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100};  // percent of the filler before the needle
  int64_t trials = 4;       // per (length, depth)
  int64_t distractors = 9;  // K other keys the answer's likelihood is ranked against
  int64_t key_digits = 5;   // keys are integers of this many digits (no leading zero)
  uint64_t seed = 0;
  std::string filler;       // shard set of the filler text; "": the run's data.val
  // The texts, {key} replaced by the key (needle and answer must hold it; the question must not).
  std::string needle = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n";
  std::string question = "\nWhat is the pass key? The pass key is";
  std::string answer = " {key}";
  int64_t step = -1;        // the checkpoint of this step (-1: the newest)
  std::string tokenizer;    // "byte" or a tokenizer.json; "": the run's (generate.h)
  int64_t threads = 0;      // CPU threads (0: run.threads)
};

// Throws dmat::Error naming the option (--lengths, --depths, ...) when one is out of range. The
// checks that need the tokenizer (room for filler at each length) are make_needle_trial's.
void check_needle_options(const NeedleOptions& o);

// What every trial of a run shares: the filler stream and the options.
struct NeedleSetup {
  NeedleOptions opt;
  const Tokenizer* tok = nullptr;
  std::vector<int32_t> filler;  // the filler shards' tokens in order, end-of-document tokens dropped
};
// The filler tokens of a shard set (every shard, in list_shards order), end-of-document tokens
// (eot_id) dropped so that the haystack reads as one text; an error names the shards when a token
// is outside [0, vocab).
std::vector<int32_t> load_needle_filler(const std::string& spec, uint32_t eot_id, int64_t vocab);

// One trial: context `length` tokens = filler[s, s + p) + needle + filler[s + p, s + F) + question,
// F = length − |needle| − |question|, p = round(depth/100 · F). The key, the distractors and the
// filler's start s depend on (seed, trial) only, so the cells of one trial differ only in what their
// length and depth change.
struct NeedleTrial {
  int64_t length = 0, trial = 0;
  double depth = 0;
  std::vector<int32_t> context;         // `length` tokens
  int64_t needle_pos = 0;               // index of the needle's first token (= p)
  int64_t needle_tokens = 0, filler_tokens = 0, filler_start = 0;  // |needle|, F, s
  std::vector<std::string> keys;        // [0] the key, then the K distractors (distinct)
  std::vector<std::vector<int32_t>> answers;  // the answer text encoded for each key, [0] the right one
};
NeedleTrial make_needle_trial(const NeedleSetup& s, int64_t length, double depth, int64_t trial);

struct NeedleScore {
  std::vector<int32_t> greedy;   // |answers[0]| tokens by greedy decoding (the lowest id on ties)
  bool exact = false;            // greedy == answers[0]
  int64_t prefix_correct = 0;    // leading greedy tokens equal to the answer's
  std::vector<double> logprob;   // per candidate: Σ_k log p(answer_k | context, answer_<k), natural log
  int64_t rank = 0;              // 1 + #{distractors whose logprob >= the answer's} (ties count against)
  double prefill_s = 0, answer_s = 0;
};
// Scores a trial on `state` (a decoding state of m with room for the context and the longest
// answer; rewound to 0 first, so one state serves every trial).
NeedleScore score_needle_trial(const Model& m, Model::DecodeState& state, const NeedleTrial& t);

struct NeedleRow {
  NeedleTrial trial;
  NeedleScore score;
  std::string greedy_text;    // the greedy tokens decoded, on one line (\n, \t, \\, \xNN escaped)
  bool beyond_train = false;  // length > train.seq_len
};
struct NeedleReport {
  std::string variant, checkpoint, cache;
  int64_t step = 0, train_seq_len = 0;
  std::vector<NeedleRow> rows;  // by length, then trial, then depth
};
// The whole grid over the run's checkpoint; on_row after each trial (progress, streaming output).
NeedleReport run_needle(const std::string& run_dir, const NeedleOptions& o,
                        const std::function<void(const NeedleRow&)>& on_row);

// The rows as CSV (header first) or as JSON lines; columns in the README.
std::string needle_csv(const NeedleReport& r, const std::string& run_dir);
std::string needle_jsonl(const NeedleReport& r, const std::string& run_dir);

}  // namespace dmat
