#include "train/run_dir.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "data/shard.h"
#include "optim/schedule.h"

namespace dmat {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kLockFile = "train.lock";
constexpr const char* kDataRecord = "data.json";

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

std::string show(const json& v) { return v.is_null() ? "absent" : v.dump(); }

}  // namespace

// ---- the lock ---------------------------------------------------------------------------------
RunDirLock::RunDirLock(const std::string& run_dir) {
  const std::string path = (fs::path(run_dir) / kLockFile).string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("cannot open {} to lock the run directory: {}", path, std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char pid[32] = {};
    const ssize_t n = ::pread(fd_, pid, sizeof pid - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      fail("run directory {} is in use by another dmatrain process{} (it holds {}): wait for that run to end, or "
           "choose another --out / run.name",
           run_dir, n > 0 ? fmt::format(" (pid {})", std::string(pid, size_t(n))) : "", path);
    fail("cannot lock {}: {}", path, std::strerror(err));
  }
  path_ = path;
}

void RunDirLock::announce() {
  const std::string me = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) != ssize_t(me.size()))
    spdlog::warn("cannot write the process id into {}: {}", path_, std::strerror(errno));
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the lock
}

void discard_new_run_dir(const std::string& run_dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir, ec))
    if (e.path().filename() != kLockFile) return;
  fs::remove(fs::path(run_dir) / kLockFile, ec);
  fs::remove(run_dir, ec);
}

// ---- which checkpoint ----------------------------------------------------------------------------
std::optional<CheckpointRef> resume_checkpoint(const std::string& run_dir) {
  const auto complete = list_checkpoints(run_dir);
  const int64_t newest = complete.empty() ? -1 : complete.back().step;
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  std::vector<std::string> skipped;
  if (fs::is_directory(root, ec))
    for (const auto& e : fs::directory_iterator(root, ec)) {
      std::string name = e.path().filename().string();
      const bool tmp = name.rfind(".tmp_", 0) == 0;
      const auto step = checkpoint_step_of(tmp ? name.substr(5) : name);
      if (step && *step > newest && e.is_directory(ec) && !fs::exists(e.path() / "COMPLETE", ec))
        skipped.push_back(e.path().string());
    }
  std::sort(skipped.begin(), skipped.end());
  for (const auto& s : skipped)
    spdlog::warn("--resume: skipping {}: incomplete (no COMPLETE marker: the process ended while writing it)", s);
  if (complete.empty()) {
    spdlog::info("--resume: no complete checkpoint in {}: starting from step 0", root.string());
    return std::nullopt;
  }
  spdlog::info("--resume: continuing from {} (step {}), the newest complete checkpoint", complete.back().path,
               complete.back().step);
  return complete.back();
}

void fail_unusable_checkpoint(const std::string& run_dir, const CheckpointRef& bad, const std::string& why) {
  std::optional<CheckpointRef> previous;
  for (const auto& c : list_checkpoints(run_dir))
    if (c.step < bad.step) previous = c;
  const fs::path aside = fs::path(bad.path).parent_path() / ("broken_" + fs::path(bad.path).filename().string());
  if (previous)
    fail("--resume: checkpoint {} cannot be used: {}. The previous complete checkpoint is {} (step {}): to continue "
         "from it, set the broken one aside (mv {} {}) and run --resume again",
         bad.path, why, previous->path, previous->step, bad.path, aside.string());
  fail("--resume: checkpoint {} cannot be used: {}. There is no earlier complete checkpoint in {} (run.keep_checkpoints "
       "keeps the newest ones): restore its files or start a new run",
       bad.path, why, fs::path(bad.path).parent_path().string());
}

// ---- a changed config ---------------------------------------------------------------------------
void check_resume_config(const json& saved_raw, const Config& now, const TrainState& st, int64_t world,
                         bool allow_train_changes, const std::string& ckpt) {
  // The saved config resolved again, so options added since it was written compare at their
  // defaults (one that no longer parses is compared as written).
  std::optional<Config> old;
  json saved = saved_raw;
  try {
    old = parse_saved_config(saved_raw);
    saved = old->resolved;
  } catch (const Error&) {
  }
  const json& cur = now.resolved;
  // (a section that is not an object, in a saved config that no longer parses, compares as empty)
  auto section = [](const json& j, const char* name) {
    return j.is_object() && j.contains(name) && j[name].is_object() ? j[name] : json::object();
  };

  if (section(saved, "model") != cur.at("model")) {
    std::string diff;
    const json a = section(saved, "model");
    for (auto& [k, v] : cur.at("model").items())
      if (!a.contains(k) || a.at(k) != v) diff += fmt::format(" model.{}: {} -> {};", k, show(a.value(k, json())), v.dump());
    fail("--resume: the config changes the model, so checkpoint {} cannot be continued:{} start a new run (another "
         "--out) or restore the model settings",
         ckpt, diff);
  }

  std::vector<std::string> changes, refused;
  for (const char* name : {"train", "data", "run"}) {
    const json a = section(saved, name);
    for (auto& [k, v] : cur.at(name).items()) {
      if (a.contains(k) && a.at(k) == v) continue;
      const std::string key = fmt::format("{}.{}", name, k);
      const std::string line = fmt::format("{}: {} -> {}", key, show(a.value(k, json())), v.dump());
      changes.push_back(line);
      // (data.train may name the same shards another way: verify_shards compares their contents)
      if (key == "train.seed" || key == "train.seq_len") refused.push_back(line + " (another data order)");
    }
  }
  if (old) {
    const TrainConfig &a = old->train, &b = now.train;
    const int64_t was = a.batch_size * a.grad_accum * st.world_size, is = b.batch_size * b.grad_accum * world;
    if (was != is)
      refused.push_back(fmt::format("the global batch train.batch_size × train.grad_accum × ranks: {} × {} × {} = {} "
                                    "sequences per step -> {} × {} × {} = {}",
                                    a.batch_size, a.grad_accum, st.world_size, was, b.batch_size, b.grad_accum, world, is));
  }
  if (!refused.empty() && !allow_train_changes)
    fail("--resume: the config changes the data order or the batch of the run that wrote checkpoint {}: {}; the "
         "continued run would not be that run. Restore these settings, or pass --allow-train-changes to continue with "
         "them anyway",
         ckpt, join(refused, "; "));
  for (const auto& c : changes)
    spdlog::warn("--resume: the config differs from checkpoint {}'s: {}", ckpt, c);
  for (const auto& r : refused) spdlog::warn("--resume: continuing with {} (--allow-train-changes)", r);

  if (old && old->train.steps != now.train.steps && now.train.steps > st.step) {
    const TrainConfig &a = old->train, &b = now.train;
    const int64_t next = st.step + 1;
    const double lr_was = learning_rate(a, std::min(next, a.steps)), lr_is = learning_rate(b, next);
    spdlog::warn("--resume: train.steps {} -> {}: the {} learning-rate schedule is recomputed over {} steps, so step {} "
                 "gets lr {:.4e} where the original schedule gave {:.4e}{}; the run now ends at step {} with lr {:.4e}",
                 a.steps, b.steps, b.schedule, b.steps, next, lr_is, lr_was,
                 next > a.steps ? fmt::format(" (at its last step {})", a.steps) : "", b.steps,
                 learning_rate(b, b.steps));
  }
}

// ---- the shards ---------------------------------------------------------------------------------
json describe_shards(const Config& cfg) {
  json out = json::object();
  for (const auto& [split, spec] : {std::pair<const char*, std::string>{"train", cfg.data.train}, {"val", cfg.data.val}}) {
    const std::vector<std::string> paths = list_shards(spec);
    std::vector<uint64_t> sums(paths.size());
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(paths.size()); ++i) {
      try {
        sums[size_t(i)] = file_checksum(paths[size_t(i)]);
      } catch (...) {
#pragma omp critical(dmat_shard_checksum)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    json list = json::array();
    for (size_t i = 0; i < paths.size(); ++i) {
      std::error_code ec;
      list.push_back({{"file", paths[i]},
                      {"bytes", uint64_t(fs::file_size(paths[i], ec))},
                      {"fnv1a64", fmt::format("{:016x}", sums[i])}});
    }
    out[split] = list;
  }
  return out;
}

void record_shards(const std::string& run_dir, const json& shards) {
  write_file_atomic((fs::path(run_dir) / kDataRecord).string(), shards.dump(1) + "\n");
}

void verify_shards(const std::string& run_dir, const json& now) {
  const std::string path = (fs::path(run_dir) / kDataRecord).string();
  if (!fs::exists(path)) {
    spdlog::warn("data: {} is missing (the run was started by an earlier version): the shards cannot be compared with "
                 "those the run started with",
                 path);
    return;
  }
  json was;
  try {
    was = json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail("data: {} does not parse ({}): it records the shards the run started with", path, e.what());
  }
  for (const char* split : {"train", "val"}) {
    const json a = was.is_object() ? was.value(split, json::array()) : json::array(), b = now.at(split);
    const char* key = std::string(split) == "train" ? "data.train" : "data.val";
    if (a.size() != b.size())
      fail("data: {} now holds {} shard file(s), the run started with {} (recorded in {}): resuming would continue on "
           "other data; restore the shards, or start a new run",
           key, b.size(), a.size(), path);
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i].value("fnv1a64", "") != b[i].value("fnv1a64", "") || a[i].value("bytes", 0) != b[i].value("bytes", 0))
        fail("data: shard {} changed since the run started (then {}: {} bytes, fnv1a64 {}; now {} bytes, fnv1a64 {}; "
             "recorded in {}): resuming would continue on other data; restore the shard, or start a new run",
             b[i].value("file", "?"), a[i].value("file", "?"), a[i].value("bytes", 0), a[i].value("fnv1a64", "?"),
             b[i].value("bytes", 0), b[i].value("fnv1a64", "?"), path);
  }
}

}  // namespace dmat
