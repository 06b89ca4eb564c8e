// Token shards: the on-disk format every data path reads and writes (README "File formats").
//
//   offset  size  field
//   0       8     magic "DMATOKS\0"
//   8       4     format version (uint32 LE), currently 1
//   12      4     bytes per token: 2 (uint16) or 4 (uint32)
//   16      8     token count n (uint64 LE)
//   24      4     vocab size V (uint32 LE); every token must be < V
//   28      36    reserved, zero
//   64      n·b   tokens, little-endian
//
// Readers reject a wrong magic, an unknown version or token width, and a file whose size is not
// exactly 64 + n·b (truncated or trailing bytes), naming the file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

constexpr char kShardMagic[8] = {'D', 'M', 'A', 'T', 'O', 'K', 'S', '\0'};
constexpr uint32_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 64;

struct ShardInfo {
  std::string path;
  uint32_t version = kShardVersion;
  uint32_t token_bytes = 2;
  uint64_t n_tokens = 0;
  uint32_t vocab_size = 0;
};

// Writes atomically (temp file + rename). token_bytes 0 picks uint16 when vocab_size <= 65536,
// else uint32; an explicit width too small for the vocab is an error. Tokens >= vocab_size are
// an error. Refuses to overwrite an existing file unless overwrite is true.
void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size,
                 uint32_t token_bytes = 0, bool overwrite = false);

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
