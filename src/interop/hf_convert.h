// `dmatrain export --format hf` and `dmatrain import`: a run's checkpoint as a Hugging Face model
// folder that transformers loads without custom code, and such a folder (Llama or Doge) as a run
// directory that `train --resume` continues (README "Hugging Face interop").
//
// Export writes config.json (interop/hf_config.h), model.safetensors (our tensors, their names
// unchanged, in fp32 or rounded to bf16), generation_config.json, tokenizer.json (the run's
// tokenizer in its canonical tokenizer.json form; the byte tokenizer as a byte-level BPE without
// merges) and tokenizer_config.json. Import writes RUN/config.json, RUN/tokenizer.json and a step-0
// checkpoint in the usual format (train/checkpoint.h) whose AdamW moments are zero: the optimizer
// starts fresh. Export → import → export gives the same bytes. Both refuse an output folder that
// exists and is not empty, and build the output beside it, renaming it into place at the end.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmat {

struct HfExportOptions {
  std::string run_dir, out_dir;
  int64_t step = -1;           // the checkpoint of this step; -1: the newest complete one
  std::string dtype = "fp32";  // "fp32" or "bf16" (round to nearest even)
  // "" : the run's tokenizer (RUN/tokenizer.json, else the one named in the training data's
  // manifest, checked against its hash); "byte" or the path of a tokenizer.json otherwise.
  std::string tokenizer;
};

struct HfExportResult {
  std::string architecture, checkpoint, tokenizer;
  int64_t tensors = 0;
};

HfExportResult export_hf(const HfExportOptions& o);

struct HfImportOptions {
  std::string hf_dir, run_dir;
  // `--set key=value` overrides of the derived config (train.*, data.*, run.*; model.* must keep
  // the checkpoint's shapes). data defaults to RUN/data/{train,val}, train.seq_len to
  // max_position_embeddings.
  std::vector<std::string> sets;
};

struct HfImportResult {
  std::string architecture, checkpoint;
  int64_t parameters = 0;
};

HfImportResult import_hf(const HfImportOptions& o);

}  // namespace dmat
