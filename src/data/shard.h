// Token shards: the on-disk format every data path reads and writes (README "File formats").
//
//   offset  size  field
//   0       8     magic "DMATOKS\0"
//   8       4     format version (uint32 LE): 1, or 2 for a shard with the fields below
//   12      4     bytes per token: 2 (uint16) or 4 (uint32)
//   16      8     token count n (uint64 LE)
//   24      4     vocab size V (uint32 LE), 1 … 2^31; every token must be < V
//   28      4     version 2: flags (uint32 LE); bit 0: a loss mask follows the tokens. Version 1: 0
//   32      4     version 2: sequence length S (uint32 LE), 0 for a free-running token stream; S > 0:
//                 the tokens are whole sequences of S tokens plus one trailing token, and a loader
//                 must cut them at seq_len = S. Version 1: 0
//   36      28    reserved, zero
//   64      n·b   tokens, little-endian
//   64+n·b  n     (flag bit 0) the loss mask: one byte per token, 1 where the token is a target
//                 whose prediction counts in the loss, 0 where it does not
//
// Writers emit version 1 unless a mask or a sequence length is given, so every shard without them
// reads in older builds. Readers reject a wrong magic, an unknown version, flags or token width, a
// vocab size of 0 or above 2^31 (readers hand out tokens as int32, as training uses them), a file
// whose size is not exactly 64 + n·b (+ n with a mask; truncated or trailing bytes) and mask bytes
// other than 0 and 1, naming the file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

constexpr char kShardMagic[8] = {'D', 'M', 'A', 'T', 'O', 'K', 'S', '\0'};
constexpr uint32_t kShardVersion = 2;  // the newest version read and written
constexpr uint32_t kShardFlagLossMask = 1;
constexpr size_t kShardHeaderBytes = 64;
constexpr uint64_t kShardMaxVocab = uint64_t(1) << 31;  // every token < V fits an int32

struct ShardInfo {
  std::string path;
  uint32_t version = 1;
  uint32_t token_bytes = 2;
  uint64_t n_tokens = 0;
  uint32_t vocab_size = 0;
  bool has_mask = false;         // a loss mask follows the tokens (version 2)
  uint32_t sequence_length = 0;  // S > 0: whole sequences of S tokens + 1 (version 2)
};

// Writes atomically (temp file + rename). token_bytes 0 picks uint16 when vocab_size <= 65536,
// else uint32; an explicit width too small for the vocab is an error. Tokens >= vocab_size are
// an error. Refuses to overwrite an existing file unless overwrite is true.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size,
                 uint32_t token_bytes = 0, bool overwrite = false);
// The same with a loss mask (one 0/1 per token, as many as tokens) and a sequence length (0: none):
// a version 2 shard. Mask values other than 0 and 1, or a token count that is not
// k·sequence_length + 1, are errors.
void write_masked_shard(const std::string& path, const std::vector<uint32_t>& tokens, const std::vector<uint8_t>& mask,
                        uint32_t vocab_size, uint32_t sequence_length, bool overwrite = false);

// Reads and validates the header (and the file size). Throws dmat::Error naming the file.
ShardInfo read_shard_info(const std::string& path);

// An open shard, read through pread (thread-safe, no whole-file load).
class ShardReader {
 public:
  explicit ShardReader(const std::string& path);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  ShardReader(ShardReader&&) noexcept;
  const ShardInfo& info() const { return info_; }
  // Tokens [offset, offset+n) into out; each checked < vocab (error names file and position).
  void read(uint64_t offset, uint64_t n, int32_t* out) const;
  // Mask bytes [offset, offset+n) into out (a shard with a mask only).
  void read_mask(uint64_t offset, uint64_t n, uint8_t* out) const;

 private:
  ShardInfo info_;
  int fd_ = -1;
};

// FNV-1a-64 of bytes, continuing from h: the checksum the data manifest records for each shard file.
constexpr uint64_t kFnv1aOffset = 0xcbf29ce484222325ull;
uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnv1aOffset);
// fnv1a64 of a whole file's bytes (error naming the file when it cannot be read).
uint64_t file_checksum(const std::string& path);

// Resolves a shard set spec: a directory (its *.bin files, sorted by name), a glob pattern, or a
// single file. Errors if nothing matches, naming the spec.
std::vector<std::string> list_shards(const std::string& spec);

}  // namespace dmat
