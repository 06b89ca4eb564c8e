// The training loop: data → forward → loss → backward → clip → AdamW → schedule, with periodic
// validation, log lines, metrics.jsonl rows and atomic checkpoints (README "Training").
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "config/config.h"
#include "dist/communicator.h"
#include "data/loader.h"
#include "model/model.h"

namespace dmat {

struct TrainOptions {
  bool resume = false;  // continue from the newest complete checkpoint of the run directory
  int64_t stop_at = 0;  // > 0: write a checkpoint after this step and stop (a planned interruption)
  // --resume: continue even when the config changes the data order or the batch (README "Command line")
  bool allow_train_changes = false;
  // Test seams, unset in production: called on every rank with the step being made (1-based) before
  // its first forward, and after its last backward (before the gradients are reduced). Tests inject
  // faults through them: a NaN gradient, a loss spike (weights disturbed before the forward and
  // restored after the backward).
  std::function<void(int64_t step, Model& model)> before_forward, after_backward;
  // Test seam: > 0 runs the GPU path's bucketed gradient all-reduce, in buckets of this many bytes,
  // on the host communicator (dist::DataParallel's host_buckets), so CPU tests exercise it.
  int64_t host_bucket_bytes = 0;
};

struct TrainResult {
  int64_t steps = 0;
  double final_loss = 0, val_loss = 0, val_ppl = 0;
  std::string run_dir;
};

// Under mpirun every rank calls this (data parallelism over dist::world(), README "Multi-GPU and
// multi-node"); a fault on one rank ends all of them (non-zero exit), never a hang.
TrainResult train(const Config& cfg, const TrainOptions& opt);

struct EvalResult {
  double loss = 0, ppl = 0;
  int64_t tokens = 0;  // targets in the loss (with a loss mask: the answers)
  // With accuracy: the targets whose argmax prediction is right (exact match; MQAR: per query), and
  // their fraction of `tokens`.
  bool has_accuracy = false;
  int64_t correct = 0;
  double accuracy = 0;
  int64_t step = -1;  // evaluate_run: the checkpoint's step
  // With by_position: the mean loss at each position t = 0 … T−1 of the sequences, and the number
  // of tokens it averages (position t predicts token t+1 from tokens 0 … t).
  std::vector<double> position_loss;
  std::vector<int64_t> position_tokens;
};
// Mean loss over the first `batches` global batches (0: all full ones) of a sequential loader. A
// global batch is batch_size × ranks sequences; each rank evaluates its batch_size of them and the
// sums are reduced over comm (null: one process), so any split of a global batch gives one result.
// accuracy: also count argmax hits (Model::forward's n_correct). on_batch, when given, sees every
// evaluated micro-batch after its forward (inputs and targets [B·T] on the host, the model holding
// that forward's state).
using EvalBatchHook = std::function<void(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                         const Model& m)>;
EvalResult evaluate(Model& m, const TokenLoader& val, int64_t batch_size, int64_t batches,
                    dist::Communicator* comm = nullptr, bool by_position = false, bool accuracy = false,
                    const EvalBatchHook& on_batch = nullptr);

// `dmatrain eval RUN_DIR`: the newest checkpoint's validation loss on the run's validation set, and
// the accuracy when the set has a loss mask (MQAR answers) or `accuracy` asks for it.
// logits_path: also write the logits of the evaluated sequences as safetensors (inputs I32 [N, T],
// targets I32 [N, T], logits F32 [N, T, vocab]); the model then runs on the CPU backend in fp32
// whatever run.device (a reference for other implementations, e.g. transformers).
EvalResult evaluate_run(const std::string& run_dir, int64_t batches, bool by_position = false,
                        const std::string& logits_path = "", bool accuracy = false);

// run.device: "cpu", "cuda" (an error without a visible GPU), "auto" (CUDA when a GPU is visible).
// On CUDA it also hands run.kernels to the backend (ops::set_kernel_options), before any kernel.
Device pick_device(const RunConfig& run);
// Refuses, naming the config key, a model the device has no kernels for (CUDA: attention head dims).
void check_device_support(const Config& cfg, Device device);
// The model for a run on `device` (CUDA: bf16 with fp32 master weights), with the run's
// recompute / determinism settings.
std::unique_ptr<Model> make_model(const Config& cfg, Device device);

// Sets the number of CPU threads (0: the cores of the node shared evenly by its ranks_per_node ranks)
// and returns it.
int set_cpu_threads(int64_t n, int ranks_per_node = 1);

}  // namespace dmat
