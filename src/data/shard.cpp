// Token shard files: writing (atomic), header validation, pread-based reading, shard-set lookup.
#include "data/shard.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <vector>

#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

namespace dmat {
namespace fs = std::filesystem;

namespace {

void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (unsigned char)(v >> (8 * i));
}
void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = (unsigned char)(v >> (8 * i));
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

// Writes all of buf or throws, retrying short writes and EINTR.
void write_all(int fd, const unsigned char* buf, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, buf, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("shard {}: write failed: {}", path, std::strerror(errno));
    }
    buf += w;
    n -= size_t(w);
  }
}

// Reads exactly n bytes at offset or throws (a short read means the file changed under us).
void pread_all(int fd, unsigned char* buf, size_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    ssize_t r = ::pread(fd, buf, n, off_t(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail("shard {}: read failed at byte {}: {}", path, offset, std::strerror(errno));
    }
    if (r == 0) fail("shard {}: unexpected end of file at byte {} (was the file truncated while open?)", path, offset);
    buf += r;
    n -= size_t(r);
    offset += uint64_t(r);
  }
}

// Validates the header and the exact file size of an open shard.
ShardInfo read_info_fd(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) fail("shard {}: cannot stat: {}", path, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail("shard {}: not a regular file", path);
  const uint64_t size = uint64_t(st.st_size);
  if (size < kShardHeaderBytes)
    fail("shard {}: too short for a shard header: file has {} bytes, the header alone is {}", path, size,
         kShardHeaderBytes);
  unsigned char h[kShardHeaderBytes];
  pread_all(fd, h, kShardHeaderBytes, 0, path);
  if (std::memcmp(h, kShardMagic, sizeof kShardMagic) != 0)
    fail("shard {}: not a token shard: bad magic (expected \"DMATOKS\\0\" in the first 8 bytes)", path);
  ShardInfo info;
  info.path = path;
  info.version = get_u32(h + 8);
  info.token_bytes = get_u32(h + 12);
  info.n_tokens = get_u64(h + 16);
  info.vocab_size = get_u32(h + 24);
  if (info.version < 1 || info.version > kShardVersion)
    fail("shard {}: unsupported format version {} (this build reads versions 1 to {})", path, info.version,
         kShardVersion);
  if (info.token_bytes != 2 && info.token_bytes != 4)
    fail("shard {}: invalid token width {} bytes (expected 2 or 4)", path, info.token_bytes);
  if (info.vocab_size == 0) fail("shard {}: vocab size is 0 in the header (expected > 0)", path);
  if (info.vocab_size > kShardMaxVocab)
    fail("shard {}: vocab size {} in the header exceeds 2^31 = {} (token ids are 32-bit signed; corrupt header?)", path,
         info.vocab_size, kShardMaxVocab);
  if (info.version >= 2) {
    const uint32_t flags = get_u32(h + 28);
    if (flags & ~kShardFlagLossMask)
      fail("shard {}: unknown header flags {:#x} (this build knows bit 0, the loss mask)", path, flags);
    info.has_mask = (flags & kShardFlagLossMask) != 0;
    info.sequence_length = get_u32(h + 32);
    if (info.sequence_length > 0 && info.n_tokens > 0 && (info.n_tokens - 1) % info.sequence_length != 0)
      fail("shard {}: {} tokens are not whole sequences of {} tokens plus one (corrupt header?)", path,
           info.n_tokens, info.sequence_length);
  }
  const uint64_t per_token = info.token_bytes + (info.has_mask ? 1 : 0);
  const uint64_t max_tokens = (std::numeric_limits<uint64_t>::max() - kShardHeaderBytes) / per_token;
  if (info.n_tokens > max_tokens)
    fail("shard {}: header token count {} is impossibly large (corrupt header?)", path, info.n_tokens);
  const uint64_t expected = kShardHeaderBytes + info.n_tokens * per_token;
  const char* what = info.has_mask ? " and mask" : "";
  if (size < expected)
    fail("shard {}: truncated: header says {} tokens{} ({} bytes), file has {} bytes", path, info.n_tokens, what,
         expected, size);
  if (size > expected)
    fail("shard {}: {} trailing bytes: header says {} tokens{} ({} bytes), file has {} bytes", path, size - expected,
         info.n_tokens, what, expected, size);
  return info;
}

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

}  // namespace

namespace {

// Version 1 without a mask and a sequence length, else version 2 (shard.h).
void write_shard_file(const std::string& path, const std::vector<uint32_t>& tokens, const std::vector<uint8_t>* mask,
                      uint32_t sequence_length, uint32_t vocab_size, uint32_t token_bytes, bool overwrite) {
  if (vocab_size == 0 || vocab_size > kShardMaxVocab)
    fail("shard {}: vocab size must be in 1 … 2^31 (got {})", path, vocab_size);
  if (token_bytes == 0) token_bytes = vocab_size <= 65536u ? 2 : 4;
  if (token_bytes != 2 && token_bytes != 4)
    fail("shard {}: token width must be 2 or 4 bytes (got {})", path, token_bytes);
  if (token_bytes == 2 && vocab_size > 65536u)
    fail("shard {}: vocab size {} does not fit 2-byte tokens (max 65536); use 4-byte tokens", path, vocab_size);
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] >= vocab_size)
      fail("shard {}: token {} at position {} is >= vocab size {}", path, tokens[i], i, vocab_size);
  if (mask) {
    if (mask->size() != tokens.size())
      fail("shard {}: {} mask values for {} tokens (one per token expected)", path, mask->size(), tokens.size());
    for (size_t i = 0; i < mask->size(); ++i)
      if ((*mask)[i] > 1) fail("shard {}: mask value {} at position {} (expected 0 or 1)", path, (*mask)[i], i);
  }
  if (sequence_length > 0 && !tokens.empty() && (tokens.size() - 1) % sequence_length != 0)
    fail("shard {}: {} tokens are not whole sequences of {} tokens plus one trailing token", path, tokens.size(),
         sequence_length);
  const bool v2 = mask != nullptr || sequence_length > 0;
  std::error_code ec;
  if (fs::exists(path, ec) && !overwrite)
    fail("shard {}: already exists (refusing to overwrite; remove it or ask for overwrite)", path);

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("shard {}: cannot create {}: {}", path, tmp, std::strerror(errno));
  try {
    unsigned char h[kShardHeaderBytes] = {};
    std::memcpy(h, kShardMagic, sizeof kShardMagic);
    put_u32(h + 8, v2 ? 2u : 1u);
    put_u32(h + 12, token_bytes);
    put_u64(h + 16, tokens.size());
    put_u32(h + 24, vocab_size);
    if (v2) {
      put_u32(h + 28, mask ? kShardFlagLossMask : 0u);
      put_u32(h + 32, sequence_length);
    }
    write_all(fd, h, sizeof h, tmp);
    // Tokens go out little-endian in chunks, whatever the host byte order.
    constexpr size_t kChunk = 1 << 16;
    std::vector<unsigned char> buf(kChunk * token_bytes);
    for (size_t i0 = 0; i0 < tokens.size(); i0 += kChunk) {
      const size_t n = std::min(kChunk, tokens.size() - i0);
      unsigned char* p = buf.data();
      for (size_t i = 0; i < n; ++i, p += token_bytes) {
        const uint32_t t = tokens[i0 + i];
        p[0] = (unsigned char)t;
        p[1] = (unsigned char)(t >> 8);
        if (token_bytes == 4) {
          p[2] = (unsigned char)(t >> 16);
          p[3] = (unsigned char)(t >> 24);
        }
      }
      write_all(fd, buf.data(), n * token_bytes, tmp);
    }
    if (mask && !mask->empty()) write_all(fd, mask->data(), mask->size(), tmp);
    if (::fsync(fd) != 0) fail("shard {}: fsync failed: {}", tmp, std::strerror(errno));
    if (::close(fd) != 0) {
      fd = -1;
      fail("shard {}: close failed: {}", tmp, std::strerror(errno));
    }
    fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      fail("shard {}: cannot rename {} into place: {}", path, tmp, std::strerror(errno));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
}

}  // namespace

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size,
                 uint32_t token_bytes, bool overwrite) {
  write_shard_file(path, tokens, nullptr, 0, vocab_size, token_bytes, overwrite);
}

void write_masked_shard(const std::string& path, const std::vector<uint32_t>& tokens, const std::vector<uint8_t>& mask,
                        uint32_t vocab_size, uint32_t sequence_length, bool overwrite) {
  write_shard_file(path, tokens, &mask, sequence_length, vocab_size, 0, overwrite);
}

ShardInfo read_shard_info(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("shard {}: cannot open: {}", path, std::strerror(errno));
  try {
    ShardInfo info = read_info_fd(fd, path);
    ::close(fd);
    return info;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

ShardReader::ShardReader(const std::string& path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail("shard {}: cannot open: {}", path, std::strerror(errno));
  try {
    info_ = read_info_fd(fd_, path);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

ShardReader::~ShardReader() {
  if (fd_ >= 0) ::close(fd_);
}

ShardReader::ShardReader(ShardReader&& o) noexcept : info_(std::move(o.info_)), fd_(o.fd_) { o.fd_ = -1; }

void ShardReader::read(uint64_t offset, uint64_t n, int32_t* out) const {
  if (offset > info_.n_tokens || n > info_.n_tokens - offset)
    fail("shard {}: read of tokens [{}, {}) is past the end ({} tokens)", info_.path, offset, offset + n,
         info_.n_tokens);
  const uint32_t b = info_.token_bytes;
  constexpr uint64_t kChunk = 1 << 13;  // 32 KiB on the stack, fine for OpenMP threads
  unsigned char buf[kChunk * 4];
  for (uint64_t i0 = 0; i0 < n; i0 += kChunk) {
    const uint64_t m = std::min(kChunk, n - i0);
    pread_all(fd_, buf, m * b, kShardHeaderBytes + (offset + i0) * b, info_.path);
    for (uint64_t i = 0; i < m; ++i) {
      const unsigned char* p = buf + i * b;
      uint32_t t = uint32_t(p[0]) | uint32_t(p[1]) << 8;
      if (b == 4) t |= uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
      if (t >= info_.vocab_size)
        fail("shard {}: token {} at position {} is >= vocab size {} (corrupt shard?)", info_.path, t,
             offset + i0 + i, info_.vocab_size);
      out[i0 + i] = int32_t(t);
    }
  }
}

uint64_t fnv1a64(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

uint64_t file_checksum(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {} to checksum it: {}", path, std::strerror(errno));
  uint64_t h = kFnv1aOffset;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), std::streamsize(buf.size()));
    h = fnv1a64(buf.data(), size_t(f.gcount()), h);
  }
  if (f.bad()) fail("cannot read {} to checksum it", path);
  return h;
}

void ShardReader::read_mask(uint64_t offset, uint64_t n, uint8_t* out) const {
  if (!info_.has_mask) fail("shard {}: has no loss mask", info_.path);
  if (offset > info_.n_tokens || n > info_.n_tokens - offset)
    fail("shard {}: read of mask [{}, {}) is past the end ({} tokens)", info_.path, offset, offset + n,
         info_.n_tokens);
  if (n == 0) return;
  pread_all(fd_, out, n, kShardHeaderBytes + info_.n_tokens * info_.token_bytes + offset, info_.path);
  for (uint64_t i = 0; i < n; ++i)
    if (out[i] > 1)
      fail("shard {}: mask value {} at position {} (expected 0 or 1; corrupt shard?)", info_.path, out[i], offset + i);
}

std::vector<std::string> list_shards(const std::string& spec) {
  if (spec.empty()) fail("shard set: empty path (expected a directory, a glob pattern or a .bin file)");
  std::vector<std::string> out;
  std::error_code ec;
  if (fs::is_directory(spec, ec)) {
    for (const auto& e : fs::directory_iterator(spec, ec)) {
      if (e.path().extension() == ".bin" && e.is_regular_file(ec)) out.push_back(e.path().string());
    }
    if (ec) fail("shard set {}: cannot list directory: {}", spec, ec.message());
    if (out.empty()) fail("shard set {}: directory holds no *.bin shard files", spec);
  } else if (fs::is_regular_file(spec, ec)) {
    out.push_back(spec);
  } else if (has_glob_chars(spec)) {
    glob_t g{};
    const int rc = ::glob(spec.c_str(), 0, nullptr, &g);
    if (rc == 0) {
      for (size_t i = 0; i < g.gl_pathc; ++i)
        if (fs::is_regular_file(g.gl_pathv[i], ec)) out.push_back(g.gl_pathv[i]);
    }
    ::globfree(&g);
    if (rc != 0 && rc != GLOB_NOMATCH) fail("shard set {}: glob failed (error {})", spec, rc);
    if (out.empty()) fail("shard set {}: no files match this pattern", spec);
  } else {
    fail("shard set {}: no such file or directory (expected a directory of *.bin shards, a glob pattern or a "
         "shard file)",
         spec);
  }
  std::sort(out.begin(), out.end());  // byte order, independent of the locale
  return out;
}

}  // namespace dmat
