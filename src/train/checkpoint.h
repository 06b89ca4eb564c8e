// Saving and restoring training state: model weights (safetensors, Hugging Face names), AdamW
// moments and the trainer's counters, in the atomic checkpoint folders of io/checkpoint_dir.h.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "optim/adamw.h"

namespace dmat {

struct TrainState {
  int64_t step = 0;         // optimizer updates done
  int64_t sequences = 0;    // global training sequences consumed (the data loader's position)
  int64_t tokens = 0;       // training tokens consumed
  double elapsed_s = 0;     // wall time spent training before this process
  int64_t world_size = 1;
};

void save_model_weights(const Model& m, const std::string& path);
void load_model_weights(Model& m, const std::string& path);  // names, shapes and dtypes must match

// Writes RUN/checkpoints/step_N (atomically) and prunes to `keep`. Returns the folder.
std::string save_checkpoint(const std::string& run_dir, const Model& m, const AdamW& opt, const TrainState& st,
                            const nlohmann::json& resolved_config, int64_t keep);
// Loads a checkpoint folder into m and opt; returns its state.
TrainState load_checkpoint(const std::string& ckpt_dir, Model& m, AdamW* opt);
// The saved config of a checkpoint folder.
nlohmann::json checkpoint_config(const std::string& ckpt_dir);

}  // namespace dmat
