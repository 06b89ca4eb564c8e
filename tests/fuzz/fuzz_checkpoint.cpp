// Fuzz target: the checkpoint-folder reader, as `dmatrain train --resume` and `eval` use it
// (src/train/run_dir.h, src/train/checkpoint.h): which checkpoint, its state_rank0.json, its
// config.json compared with the run's config, then its weights and moments loaded into the model.
// Input: NUL-separated parts: state_rank0.json; config.json; model.safetensors (the rest, NULs
// included). optim_rank0.safetensors is a valid file for the harness's model (written once).
// An odd-sized state part resumes with --allow-train-changes.
#include <memory>

#include "config/config.h"
#include "fuzz_util.h"
#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/run_dir.h"
#include "train/trainer.h"

using namespace dmat;

namespace {

// The run being resumed: a small model, so loading stays fast (tests/fuzz/corpus/checkpoint holds
// a checkpoint of this config written by `dmatrain train`).
const char* kConfig = R"({
  "model": {"vocab_size": 32, "d_model": 8, "n_layers": 1, "n_heads": 2, "tie_embeddings": true},
  "train": {"steps": 4, "batch_size": 2, "seq_len": 8, "checkpoint_interval": 2},
  "data": {"train": "unused", "val": "unused"},
  "run": {"name": "fuzz"}
})";

struct Run {
  Config cfg;
  std::unique_ptr<Model> model;
  std::unique_ptr<AdamW> adam;
  std::string dir, ckpt;
};

Run& run() {
  static Run r = [] {
    Run r;
    r.cfg = parse_config(nlohmann::json::parse(kConfig));
    r.model = make_model(r.cfg, Device::CPU);
    r.model->init_weights(r.cfg.train.seed);
    r.adam = std::make_unique<AdamW>(*r.model, r.cfg.train);
    r.dir = fuzz::scratch_dir() + "/run";
    r.ckpt = r.dir + "/checkpoints/" + checkpoint_dir_name(2);
    std::vector<NamedTensor> moments;
    for (const char* prefix : {"m.", "v."})
      for (size_t i = 0; i < r.model->param_info().size(); ++i)
        moments.push_back({prefix + r.model->param_info()[i].name, r.model->grads().get(int(i))});
    fuzz::write_bytes(r.ckpt + "/COMPLETE", "");
    write_safetensors(r.ckpt + "/optim_rank0.safetensors", moments);
    return r;
  }();
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  set_cpu_threads(1);
  run();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  return fuzz::mutate_json(data, size, max_size, seed, 3);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Run& r = run();
  const auto parts = fuzz::split_parts(data, size, 3);
  fuzz::write_bytes(r.ckpt + "/state_rank0.json", parts[0]);
  fuzz::write_bytes(r.ckpt + "/config.json", parts.size() > 1 ? parts[1] : std::string_view());
  fuzz::write_bytes(r.ckpt + "/model.safetensors", parts.size() > 2 ? parts[2] : std::string_view());
  const bool allow_train_changes = parts[0].size() % 2 == 1;
  return fuzz::rejecting([&] {
    const std::optional<CheckpointRef> ref = resume_checkpoint(r.dir);
    fuzz::fuzz_require(ref && ref->path == r.ckpt, "resume_checkpoint missed the checkpoint");
    TrainState st;
    nlohmann::json saved;
    try {
      st = read_checkpoint_state(ref->path);
      saved = checkpoint_config(ref->path);
    } catch (const Error& e) {
      fail_unusable_checkpoint(r.dir, *ref, e.what());
    }
    fuzz::fuzz_require(st.step == 2 && st.adam_steps <= st.step && st.skipped <= st.step, "state accepted as read");
    check_resume_config(saved, r.cfg, st, 1, allow_train_changes, ref->path);
    (void)parse_saved_config(saved, r.dir);  // as `eval` reads it
    load_checkpoint(ref->path, *r.model, r.adam.get());
    fuzz::fuzz_require(r.adam->steps_done() == st.adam_steps, "AdamW steps");
  });
}
