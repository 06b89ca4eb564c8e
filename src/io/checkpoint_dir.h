// Checkpoint directories inside a run directory, written atomically:
//   RUN/checkpoints/step_00000200/        a complete checkpoint
//     model.safetensors, optim_rank0.safetensors, state_rank0.json, config.json, COMPLETE
// A checkpoint is first written to RUN/checkpoints/.tmp_step_00000200/, the COMPLETE marker is
// written last, then the folder is renamed into place. A folder without COMPLETE is ignored
// (and removed by the next cleanup only if it is a .tmp_ folder).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dmat {

struct CheckpointRef {
  int64_t step = 0;
  std::string path;
};

std::string checkpoint_dir_name(int64_t step);  // "step_00000200"
// The step a checkpoint folder's name gives ("step_00000200" -> 200); nullopt for any other name.
std::optional<int64_t> checkpoint_step_of(const std::string& folder_name);

// Creates a fresh temp folder for `step` (removing a stale one of the same step) and returns its path.
std::string begin_checkpoint(const std::string& run_dir, int64_t step);
// Writes COMPLETE into tmp_path (fsync), renames it to its final name (replacing an existing complete
// checkpoint of the same step), and returns the final path.
std::string commit_checkpoint(const std::string& run_dir, const std::string& tmp_path, int64_t step);
// Complete checkpoints of a run, ascending by step.
std::vector<CheckpointRef> list_checkpoints(const std::string& run_dir);
std::optional<CheckpointRef> latest_checkpoint(const std::string& run_dir);
// Removes all but the newest `keep` complete checkpoints (keep 0: keep all) and stale temp folders.
void prune_checkpoints(const std::string& run_dir, int64_t keep);

// Small file helpers shared by writers: write text atomically (temp + rename), read a whole file.
void write_file_atomic(const std::string& path, const std::string& contents);
std::string read_file(const std::string& path);

}  // namespace dmat
