// The run directory of `dmatrain train` (README "What happens when things go wrong"): one process
// at a time, which checkpoint --resume continues and why, what a changed config does to a resumed
// run, and the shards the run started with. Everything here only reads the directory or refuses;
// the trainer writes to it once the start is accepted, so a refused start changes nothing.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "io/checkpoint_dir.h"
#include "train/checkpoint.h"

namespace dmat {

// An exclusive lock on RUN_DIR/train.lock (flock), held while the object lives. The kernel drops it
// however the process ends (kill -9 included), so a lock file left behind never blocks a later run.
class RunDirLock {
 public:
  // An Error naming the directory when another process holds the lock.
  explicit RunDirLock(const std::string& run_dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  // Writes this process's id into the lock file, for the message of a process refused later; called
  // once the start is accepted (a refused start leaves the file as it was).
  void announce();

 private:
  int fd_ = -1;
  std::string path_;
};

// Removes a run directory that holds nothing but its lock file (one this process created for a start
// that then failed).
void discard_new_run_dir(const std::string& run_dir);

// The checkpoint --resume continues: the newest complete one. Newer folders without the COMPLETE
// marker (the process ended while writing them) are skipped with a warning naming them; the choice
// and the reason are logged.
std::optional<CheckpointRef> resume_checkpoint(const std::string& run_dir);

// The error for a checkpoint that cannot be read (`why`): names it and offers the previous complete
// checkpoint, with the command that sets the broken one aside.
[[noreturn]] void fail_unusable_checkpoint(const std::string& run_dir, const CheckpointRef& bad,
                                           const std::string& why);

// --resume with a config that differs from the checkpoint's (`saved`, as the checkpoint holds it;
// `st` its state): every difference is logged. A changed model is refused. Changes of the data order
// or the batch (train.seed, train.seq_len, and the global batch batch_size × grad_accum × ranks) are
// refused unless allow_train_changes; other data is found by verify_shards (data.train may name the
// same shards another way). A changed train.steps is explained: the schedule's learning rate at the
// next step, before and after.
void check_resume_config(const nlohmann::json& saved, const Config& now, const TrainState& st, int64_t world,
                         bool allow_train_changes, const std::string& ckpt);

// The shards a run trains and validates on: RUN_DIR/data.json holds each one's path, size and
// FNV-1a-64 checksum (as the data manifest records them), written when the run starts.
nlohmann::json describe_shards(const Config& cfg);
void record_shards(const std::string& run_dir, const nlohmann::json& shards);
// On resume: the shards now must be those recorded (same count, same sizes and checksums in order;
// their paths may differ); otherwise an error naming the first shard that differs. A run directory
// without data.json (an earlier version wrote none) passes, with a warning.
void verify_shards(const std::string& run_dir, const nlohmann::json& now);

}  // namespace dmat
