// `dmatrain generate RUN_DIR`: text (or token ids) from a trained model, one token at a time with
// every layer's decoding cache (Model::start_decode / decode), streamed as it comes. Always on the
// CPU backend: a run trained on CUDA is loaded from its fp32 checkpoint into a CPU model.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/rng.h"
#include "io/checkpoint_dir.h"
#include "tokenizer/tokenizer.h"

namespace dmat {

// A run opened for decoding (generate, needle): its checkpoint (the newest complete one, or that of
// `step` when >= 0), the config saved with it, and its tokenizer: `tokenizer` when given ("byte" or
// a tokenizer.json), else the one the training data's manifest records (path relative to the current
// directory, checked against the recorded hash). tok is null for data of token ids (generated data
// such as MQAR, or no manifest), with the reason in why_no_tokenizer. Errors name `cmd`.
struct DecodingRun {
  Config cfg;
  CheckpointRef ck;
  std::unique_ptr<Tokenizer> tok;
  std::string why_no_tokenizer;
};
DecodingRun open_run_for_decoding(const std::string& run_dir, int64_t step, const std::string& tokenizer,
                                  const char* cmd);

struct GenerateOptions {
  std::string prompt;               // text, encoded with the run's tokenizer
  std::vector<int32_t> prompt_ids;  // or token ids (use_ids)
  bool use_ids = false;
  int64_t max_new_tokens = 64;
  double temperature = 0;  // 0: greedy (argmax, the lowest id among equal maxima)
  int64_t top_k = 0;       // > 0: sample among the k most likely tokens only
  double top_p = 1;        // < 1: sample among the smallest set of most likely tokens whose probability reaches p
  uint64_t seed = 0;       // sampling
  int64_t step = -1;       // the checkpoint of this step (-1: the newest)
  std::string tokenizer;   // "byte" or a tokenizer.json; "": the one recorded in the run's data manifest
  bool stop_at_eot = true; // stop after the tokenizer's end-of-document token
  int64_t threads = 0;     // CPU threads (0: run.threads)
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens
  int64_t prompt_tokens = 0, step = 0;
  double prefill_s = 0, decode_s = 0;
  std::string cache;  // what a layer caches per position
};

// on_token(id, text): each new token as it is chosen (text: its decoded bytes, "" with token ids).
GenerateResult generate_run(const std::string& run_dir, const GenerateOptions& o,
                            const std::function<void(int32_t, const std::string&)>& on_token);

// The next token from logits: greedy at temperature 0, else a draw from softmax(logits / temperature)
// restricted by top_k and top_p (candidates ordered by logit, the lower id first on ties).
int32_t sample_token(const std::vector<double>& logits, double temperature, int64_t top_k, double top_p, Rng& rng);

}  // namespace dmat
