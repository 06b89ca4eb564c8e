// `dmatrain data prepare` and `dmatrain data inspect`: raw text to token shards, and back.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

struct PrepareOptions {
  std::string tokenizer = "byte";
  std::string out_dir;
  double val_fraction = 0.01;       // of documents, chosen by a hash of the document's bytes
  int64_t shard_tokens = 100000000; // tokens per shard file (the last one holds the rest)
  bool overwrite = false;           // without it, an out_dir that already holds shards is refused
  std::vector<std::string> inputs;  // files (.txt/.md/... text, .jsonl with a "text" field) or dirs
};

struct PrepareResult {
  int64_t documents = 0, duplicates = 0, train_tokens = 0, val_tokens = 0;
};

// Writes OUT/train/*.bin, OUT/val/*.bin and OUT/manifest.json. Deterministic for the same inputs.
PrepareResult prepare_data(const PrepareOptions& opt);

// Human-readable description of a shard file or a prepared directory (header, counts, a decoded
// sample when the tokenizer is known).
std::string inspect_data(const std::string& path, int64_t sample_tokens = 200);

}  // namespace dmat
