// `dmatrain data prepare` and `dmatrain data inspect`: raw text to token shards, and back.
//
// Inputs and documents: see data/documents.h (files, directories with include/exclude globs, .jsonl,
// source files as whole documents, paragraphs split at two blank lines, binary files skipped).
// Empty documents are dropped; exact duplicates (same bytes, keyed by two independent 64-bit hashes)
// are dropped and counted.
// Split: a document goes to val iff splitmix64(FNV-1a-64(bytes)) < val_fraction·2^64, so its split
// depends on its bytes alone (stable when other documents come and go). Documents are encoded in
// parallel (batches of ~32 MB, `threads` workers) and written in input order, so the output does
// not depend on the thread count. Each document's tokens are
// followed by the tokenizer's end-of-document token; each split's stream is cut into shards of
// shard_tokens tokens: OUT/train/shard_000000.bin …, OUT/val/shard_000000.bin … (uint16 tokens
// when vocab <= 65536). Shards are staged and moved into place only when everything succeeded.
// OUT/manifest.json (written last) records the tokenizer (name, hash, vocab, end id), the inputs as
// given, the filters, per input ("sources") its files, documents and bytes, document/duplicate/byte counts, and per split its totals and each shard's token count and
// FNV-1a-64 checksum of the file bytes (hex). No timestamps: same inputs, same bytes out.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

struct PrepareOptions {
  std::string tokenizer = "byte";   // "byte" or a tokenizer.json path
  std::string out_dir;
  double val_fraction = 0.01;       // of documents, chosen by a hash of the document's bytes
  int64_t shard_tokens = 100000000; // tokens per shard file (the last one holds the rest)
  bool overwrite = false;           // without it, an out_dir that already holds shards is refused
  std::vector<std::string> inputs;  // files or directories (data/documents.h)
  std::vector<std::string> include, exclude;  // globs for files inside directories
  int threads = 0;                  // encoding threads; 0: OpenMP's default (all cores)
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
