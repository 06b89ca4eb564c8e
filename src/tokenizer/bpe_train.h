// Training a byte-level BPE tokenizer: count pre-tokenizer pieces over documents, then merge the most
// frequent adjacent pair repeatedly (ties: the pair of smaller ids first), as GPT-2's BPE does.
// Deterministic: the result depends only on the piece counts, never on thread count or input order.
// Ids: 0-255 are the bytes (id = byte value), 256... the merges in order, then the special tokens
// (the first special token is the end-of-document token).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/bpe.h"

namespace dmat {

struct BpeTrainOptions {
  uint32_t vocab_size = 32768;                          // bytes + merges + special tokens
  std::vector<std::string> special = {"<|endoftext|>"};  // special[0] ends every document
  std::string pretokenizer = "llama3";                  // "llama3" or "gpt2"
  int64_t min_frequency = 2;                            // pairs seen fewer times are never merged
};

// Piece counts, filled in parallel (one map per thread, summed at the end).
class PieceCounter {
 public:
  explicit PieceCounter(const std::string& pretokenizer, int threads);
  // Counts the pieces of every document (in parallel over documents).
  void add(const std::vector<std::string>& docs);
  // Sums the per-thread maps (call once, after the last add).
  const std::unordered_map<std::string, int64_t>& finish();
  uint64_t documents() const { return documents_; }
  uint64_t bytes() const { return bytes_; }

 private:
  BpeTokenizer splitter_;  // bytes only: used for its pre-tokenizer
  int threads_;
  std::vector<std::unordered_map<std::string, int64_t>> maps_;
  uint64_t documents_ = 0, bytes_ = 0;
};

// Learns merges from piece counts. Fewer merges than asked for (no pair left with min_frequency
// occurrences) is not an error: the vocabulary is then smaller, and a warning says so.
BpeTokenizer train_bpe(const std::unordered_map<std::string, int64_t>& counts, const BpeTrainOptions& opt,
                       const std::string& origin = "(trained)");

}  // namespace dmat
