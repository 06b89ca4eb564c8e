// Saving and restoring training state: model weights (safetensors, Hugging Face names), AdamW
// moments and the trainer's counters, in the atomic checkpoint folders of io/checkpoint_dir.h.
//
// Multi-rank runs: a checkpoint is independent of the number of ranks and of ZeRO. Rank 0 writes
// model.safetensors (full fp32 weights) and optim_rank0.safetensors (the moments of every
// parameter: under ZeRO-1 gathered from all ranks' shards), state_rank0.json (the run's position:
// one global data index, so any world size continues the same sequence) and config.json; every
// rank R writes state_rankR.json (its rank, shard and the same counters). Loading reads only the
// rank-0 files, on every rank, and keeps the rank's shard of the moments. The run directory must be
// visible to all ranks (a shared filesystem on several nodes).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dist/communicator.h"
#include "model/model.h"
#include "optim/adamw.h"

namespace dmat {

struct TrainState {
  int64_t step = 0;         // training steps done (updates applied plus updates skipped)
  int64_t sequences = 0;    // global training sequences consumed (the data loader's position)
  int64_t tokens = 0;       // training tokens consumed
  double elapsed_s = 0;     // wall time spent training before this process
  int64_t world_size = 1;   // ranks of the run that wrote the checkpoint
  int64_t adam_steps = 0;   // updates AdamW applied (its bias correction counts these)
  int64_t skipped = 0;      // steps whose update was skipped (train.on_nonfinite "skip", the spike guard)
  std::vector<double> recent_losses;  // the loss-spike guard's window, oldest first
  std::string origin;       // the model folder a run was imported from (dmatrain import); "" otherwise
};

void save_model_weights(const Model& m, const std::string& path);
void load_model_weights(Model& m, const std::string& path);  // names, shapes and dtypes must match

// Writes RUN/checkpoints/step_N (atomically) and prunes to `keep`; a collective over comm (every
// rank calls it; the full master weights must be valid on rank 0). shards: the ranks' optimizer
// ranges under ZeRO-1 (null when every rank holds all moments). Returns the folder.
std::string save_checkpoint(const std::string& run_dir, const Model& m, const AdamW& opt, const TrainState& st,
                            const nlohmann::json& resolved_config, int64_t keep, dist::Communicator& comm,
                            const dist::Partition* shards = nullptr);
// Loads a checkpoint folder into m and opt (the moments of opt's range); returns its state.
TrainState load_checkpoint(const std::string& ckpt_dir, Model& m, AdamW* opt);
// The state of a checkpoint folder (its state_rank0.json), every field checked: a wrong type, a
// negative count or a step other than the folder's is an error naming the file and the key.
TrainState read_checkpoint_state(const std::string& ckpt_dir);
// The saved config of a checkpoint folder.
nlohmann::json checkpoint_config(const std::string& ckpt_dir);

}  // namespace dmat
