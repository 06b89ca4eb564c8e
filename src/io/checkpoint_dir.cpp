#include "io/checkpoint_dir.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"
#include "io/atomic_write.h"

namespace dmat {

namespace fs = std::filesystem;

namespace {

constexpr const char* kComplete = "COMPLETE";
constexpr const char* kStepPrefix = "step_";
constexpr const char* kTmpPrefix = ".tmp_step_";
constexpr const char* kOldPrefix = ".old_step_";  // a replaced checkpoint on its way out

std::string checkpoints_root(const std::string& run_dir) { return (fs::path(run_dir) / "checkpoints").string(); }

// "step_00000200" -> 200; anything else (other names, non-digits, fewer than 8 digits) -> nullopt.
std::optional<int64_t> parse_step_name(const std::string& name) {
  const std::string prefix = kStepPrefix;
  if (name.rfind(prefix, 0) != 0) return std::nullopt;
  const std::string digits = name.substr(prefix.size());
  if (digits.size() < 8 || digits.size() > 18) return std::nullopt;
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  return std::stoll(digits);
}

void remove_tree(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
  if (ec) fail("cannot remove {}: {}", p.string(), ec.message());
}

void rename_or_fail(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  if (ec) fail("cannot rename {} to {}: {}", from.string(), to.string(), ec.message());
}

}  // namespace

std::optional<int64_t> checkpoint_step_of(const std::string& folder_name) { return parse_step_name(folder_name); }

std::string checkpoint_dir_name(int64_t step) {
  if (step < 0) fail("checkpoint step must be >= 0 (got {})", step);
  return fmt::format("{}{:08d}", kStepPrefix, step);
}

std::string begin_checkpoint(const std::string& run_dir, int64_t step) {
  const fs::path tmp = fs::path(checkpoints_root(run_dir)) / (std::string(".tmp_") + checkpoint_dir_name(step));
  remove_tree(tmp);
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec) fail("cannot create checkpoint folder {}: {}", tmp.string(), ec.message());
  return tmp.string();
}

std::string commit_checkpoint(const std::string& run_dir, const std::string& tmp_path, int64_t step) {
  const fs::path root = checkpoints_root(run_dir);
  const fs::path final_dir = root / checkpoint_dir_name(step);
  std::error_code ec;
  if (!fs::is_directory(tmp_path, ec))
    fail("commit_checkpoint: {} is not a folder (expected the path returned by begin_checkpoint)", tmp_path);
  // Everything else in the folder was written (and synced) by its writers; the marker goes last.
  write_file_atomic((fs::path(tmp_path) / kComplete).string(), fmt::format("step {}\n", step));
  io_detail::fsync_path(tmp_path);
  if (fs::exists(final_dir, ec)) {
    // Never a moment with two folders of this step, and the old one is only deleted once the new
    // one is in place; a crash in between leaves a .old_ folder that prune_checkpoints removes.
    const fs::path old = root / (std::string(kOldPrefix) + checkpoint_dir_name(step).substr(5));
    remove_tree(old);
    rename_or_fail(final_dir, old);
    try {
      rename_or_fail(tmp_path, final_dir);
    } catch (const Error&) {
      fs::rename(old, final_dir, ec);  // put the old one back; the new one stays in its temp folder
      throw;
    }
    io_detail::fsync_path(root.string());
    remove_tree(old);
  } else {
    rename_or_fail(tmp_path, final_dir);
  }
  io_detail::fsync_path(root.string());
  return final_dir.string();
}

std::vector<CheckpointRef> list_checkpoints(const std::string& run_dir) {
  const fs::path root = checkpoints_root(run_dir);
  std::vector<CheckpointRef> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  fs::directory_iterator it(root, ec);
  if (ec) fail("cannot list {}: {}", root.string(), ec.message());
  for (const auto& entry : it) {
    if (!entry.is_directory(ec)) continue;
    auto step = parse_step_name(entry.path().filename().string());
    if (!step) continue;
    if (!fs::is_regular_file(entry.path() / kComplete, ec)) continue;
    out.push_back({*step, entry.path().string()});
  }
  std::sort(out.begin(), out.end(), [](const CheckpointRef& a, const CheckpointRef& b) { return a.step < b.step; });
  return out;
}

std::optional<CheckpointRef> latest_checkpoint(const std::string& run_dir) {
  auto all = list_checkpoints(run_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

void prune_checkpoints(const std::string& run_dir, int64_t keep) {
  if (keep < 0) fail("prune_checkpoints: keep must be >= 0 (0 keeps all; got {})", keep);
  const fs::path root = checkpoints_root(run_dir);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return;
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kTmpPrefix, 0) == 0 || name.rfind(kOldPrefix, 0) == 0) stale.push_back(entry.path());
  }
  for (const auto& p : stale) remove_tree(p);
  if (keep == 0) return;
  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; i + size_t(keep) < all.size(); ++i) remove_tree(all[i].path);
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  io_detail::write_parts_atomic(path, {{contents.data(), contents.size()}});
}

std::string read_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("cannot read {}: a directory, expected a file", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("cannot read {}: read error", path);
  return ss.str();
}

}  // namespace dmat
