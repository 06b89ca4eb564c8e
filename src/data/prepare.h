// `dmatrain data prepare` and `dmatrain data inspect`: raw text to token shards, and back.
//
// Inputs: files or directories (walked recursively, files in sorted path order). Read: text files
// (.txt .md .rst .text) and .jsonl (one JSON object per line with a "text" string; blank lines
// ignored; anything else is an error naming file:line). Other files inside a directory are skipped
// (debug log); a named file of another type is an error. A file with a NUL byte in its first 8 KiB
// is skipped as binary (warning).
// Documents: CRLF and lone CR become LF. A .jsonl line is one document. A text file is split into
// documents at runs of two or more blank lines (whitespace-only lines count as blank); a single
// blank line is a paragraph break inside a document. A text document is its lines from the first
// non-blank to the last non-blank one, each ending in LF. Empty documents are dropped; exact
// duplicates (same bytes, keyed by two independent 64-bit hashes) are dropped and counted.
// Split: a document goes to val iff splitmix64(FNV-1a-64(bytes)) < val_fraction·2^64, so its split
// depends on its bytes alone (stable when other documents come and go). Each document's tokens are
// followed by the tokenizer's end-of-document token; each split's stream is cut into shards of
// shard_tokens tokens: OUT/train/shard_000000.bin …, OUT/val/shard_000000.bin … (uint16 tokens
// when vocab <= 65536). Shards are staged and moved into place only when everything succeeded.
// OUT/manifest.json (written last) records the tokenizer (name, hash), the inputs as given,
// document/duplicate/byte counts, and per split its totals and each shard's token count and
// FNV-1a-64 checksum of the file bytes (hex). No timestamps: same inputs, same bytes out.
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
