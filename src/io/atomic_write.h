// Internal to dmat_io: durable, atomic file writes shared by the safetensors writer and the
// checkpoint helpers (write PATH.tmp, fsync, rename over PATH, fsync the folder), so a reader sees
// either the old file or the complete new one, never a torn one.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace dmat::io_detail {

struct Span {
  const void* data;
  size_t size;
};

// Writes the parts one after another into `path` atomically.
void write_parts_atomic(const std::string& path, const std::vector<Span>& parts);
// fsync a file or folder (folders: so a rename or new entry inside it is durable).
void fsync_path(const std::string& path);

}  // namespace dmat::io_detail
