#include "io/atomic_write.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <unistd.h>

#include "core/error.h"

namespace dmat::io_detail {

namespace {

std::string errno_str() { return std::strerror(errno); }

std::string parent_dir(const std::string& path) {
  std::filesystem::path p = std::filesystem::path(path).parent_path();
  return p.empty() ? "." : p.string();
}

}  // namespace

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open {} to sync it: {}", path, errno_str());
  // Some file systems refuse fsync on folders (EINVAL); the data itself was synced already.
  if (::fsync(fd) != 0 && errno != EINVAL) {
    std::string e = errno_str();
    ::close(fd);
    fail("cannot sync {}: {}", path, e);
  }
  ::close(fd);
}

void write_parts_atomic(const std::string& path, const std::vector<Span>& parts) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create {}: {}", tmp, errno_str());
  auto abort_with = [&](const std::string& what) {
    std::string e = errno_str();
    ::close(fd);
    ::unlink(tmp.c_str());
    fail("cannot write {}: {} failed: {}", tmp, what, e);
  };
  for (const Span& s : parts) {
    const char* p = static_cast<const char*>(s.data);
    size_t left = s.size;
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        abort_with("write");
      }
      p += n;
      left -= size_t(n);
    }
  }
  if (::fsync(fd) != 0) abort_with("fsync");
  if (::close(fd) != 0) {
    std::string e = errno_str();
    ::unlink(tmp.c_str());
    fail("cannot write {}: close failed: {}", tmp, e);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string e = errno_str();
    ::unlink(tmp.c_str());
    fail("cannot rename {} to {}: {}", tmp, path, e);
  }
  fsync_path(parent_dir(path));
}

}  // namespace dmat::io_detail
