// dmatrain command line: train, eval, generate, needle, info, export, import, data prepare / inspect / mqar, tokenizer,
// bench, devices.
// Exit code 0 on success; 1 with a one-line cause on stderr when something fails; 2 for bad usage.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "config/config.h"
#include "core/error.h"
#include "core/log.h"
#include "data/mqar.h"
#include "data/prepare.h"
#include "interop/hf_convert.h"
#include "io/checkpoint_dir.h"
#include "dist/communicator.h"
#include "kernels/cuda/device_info.h"
#include "bench/attention_bench.h"
#include "bench/ops_bench.h"
#include "train/bench.h"
#include "train/generate.h"
#include "train/info.h"
#include "train/needle.h"
#include "train/trainer.h"

namespace dmat::cli {
int cmd_tokenizer(const std::vector<std::string>& args);  // cmd_tokenizer.cpp
}

namespace {

using dmat::fail;

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kMainHelp = R"(dmatrain: pretrain decoder-only language models from JSON configs.

usage: dmatrain COMMAND [ARGS...]      (dmatrain COMMAND --help for each)

commands:
  train CONFIG [--set key=value ...] [--out DIR] [--resume] [--stop-at STEP]
                           train a model; writes logs, metrics and checkpoints to the run directory
  eval RUN_DIR [--batches N] [--positions FILE.csv] [--logits FILE.safetensors] [--accuracy] [--json]
                           validation loss and perplexity of the run's newest checkpoint (and the
                           answer accuracy on masked data such as MQAR)
  generate RUN_DIR --prompt TEXT | --prompt-ids IDS [--max-new-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--step N]
                           text from a trained model, streamed as it comes (CPU, with a KV cache)
  needle RUN_DIR [--lengths N,...] [--depths P,...] [--trials N] [--distractors K] [--out FILE.csv|.jsonl]
                           pass-key retrieval: a key hidden at each depth of each context length of
                           validation text, scored by greedy exact match and likelihood rank (CPU)
  info CONFIG [--set key=value ...] [--json]
                           parameter counts, FLOPs per token, memory estimate
  export RUN_DIR --format hf --out DIR [--step N] [--dtype fp32|bf16] [--tokenizer T.json|byte]
                           a checkpoint as a Hugging Face model folder (transformers loads it as is)
  import DIR --out RUN_DIR [--set key=value ...]
                           a Hugging Face Llama or Doge model folder as a run that train --resume continues
  data prepare --out DIR [--tokenizer byte|T.json] [--val-fraction F] [--shard-tokens N] [--overwrite] INPUTS...
                           turn text files / directories / JSONL into token shards
  data inspect PATH        describe a shard file or a prepared data directory
  data mqar --out DIR [--vocab V --pairs P --seq-len T --train-examples N --test-examples M --seed S]
                           multi-query associative recall data (train/test disjoint, loss on answers)
  tokenizer train|encode|decode|info|bench ...
                           byte-level BPE tokenizers (Hugging Face tokenizer.json)
  bench CONFIG [--steps N] [--warmup N] [--set key=value ...]
                           training-step speed on synthetic tokens: tokens/s, MFU, time split, memory
  bench attention [--seq N] [--heads H] [--kv-heads H] [--dim D] [--batch B] [--window W] [--dma W] [--nsa]
                           our flash-attention kernels, forward and forward+backward (CUDA);
                           --dma W: Dynamic Mask Attention keeping W keys per query (random
                           biases; times include the thresholds and the key lists);
                           --dma-bias normal|increasing|decreasing|tied picks the key biases;
                           --nsa: Native Sparse Attention's core (the paper's blocks, window
                           --window W or 512), per-part times and its workspace
  bench ops                GEMM, copy bandwidth and the elementwise kernels at model shapes (CUDA)
  devices                  list the CUDA devices this build can see
)";

const char* kBenchHelp = R"(usage: dmatrain bench CONFIG [--steps N] [--warmup N] [--set key=value ...]
       dmatrain bench attention [--seq N] [--heads H] [--kv-heads H] [--dim D] [--batch B] [--window W] [--dma W]
                                [--dma-bias normal|increasing|decreasing|tied] [--nsa] [--nondeterministic] [--iters N]
       dmatrain bench ops

bench CONFIG runs N optimizer steps (default 10, after 3 warm-up steps) of the config's model on
synthetic tokens (no data needed) on run.device, and prints tokens/s, MFU (6·N + 6·L·T·d FLOPs per
token against the device's dense bf16 peak; DMAT_PEAK_TFLOPS overrides the peak), the forward /
backward / optimizer split (measured on separately synchronised steps) and peak memory beside
`dmatrain info`'s prediction, then one JSON line. Speed figures belong in benchmarks, not tests:
compare against the anchors run in the same call (scripts/bench_train.sh does both).
)";

const char* kTrainHelp = R"(usage: dmatrain train CONFIG [--set key=value ...] [--out DIR] [--resume [--allow-train-changes]] [--stop-at STEP]

Trains the model CONFIG describes (README: "Config reference").
  --set a.b=value   override a config key (value parsed as JSON, else taken as a string); repeatable
  --out DIR         run directory (default: run.dir, i.e. runs/<run.name>)
  --resume          continue from the newest complete checkpoint in the run directory (it says which,
                    and why); refuses a checkpoint whose model differs from CONFIG, and a config that
                    changes the data order or the batch (train.seed, train.seq_len, the global
                    batch) or shards that changed since the start; prints every other change.
                    Without --resume, a run directory that already holds a run is refused.
  --allow-train-changes
                    with --resume: continue even with a changed data order or batch
  --stop-at STEP    write a checkpoint after STEP and exit 0 (for time-sliced jobs; --resume continues);
                    STEP must be after the checkpoint --resume continues from
One process at a time: a run directory in use by another dmatrain (RUN_DIR/train.lock) is refused.
A refused start changes nothing in the run directory.
Writes RUN_DIR/config.json (resolved), train.log (errors too), metrics.jsonl, data.json (the shards'
checksums: a resumed run refuses shards that changed) and checkpoints/step_*/.
)";

const char* kEvalHelp = R"(usage: dmatrain eval RUN_DIR [--batches N] [--positions FILE.csv] [--logits FILE.safetensors]
                             [--accuracy] [--json]

Loads the newest complete checkpoint of RUN_DIR and prints its validation loss and perplexity on
the validation shards named in its config (paths relative to the current directory). On shards
with a loss mask (data mqar) the loss is over the masked-in targets (the answers) and the answer
accuracy is printed too: the fraction of answers whose argmax prediction (lowest id among equal
maxima) is the right token, i.e. exact match per query.
  --batches N          number of validation micro-batches (default: all full batches; training
                       evaluates train.eval_batches of them: eval prints training's result for the
                       same checkpoint beside its own, each with its token count)
  --positions FILE     also write the mean loss at each position of the sequence as CSV
                       (columns position,loss,tokens; position t predicts token t+1 from tokens
                       0 … t); an existing FILE is refused
  --logits FILE        also write the evaluated sequences and their logits as safetensors (inputs and
                       targets I32 [N, T], logits F32 [N, T, vocab]); the model then runs on the CPU
                       backend in fp32 whatever run.device (a reference to compare other
                       implementations with); an existing FILE is refused
  --accuracy           the argmax accuracy on data without a mask too (next-token accuracy)
  --json               print one JSON object instead: run, step, loss, ppl, tokens, and with an
                       accuracy, accuracy and correct
)";

const char* kExportHelp = R"(usage: dmatrain export RUN_DIR --format hf --out DIR [--step N] [--dtype fp32|bf16] [--tokenizer T.json|byte]

Writes a checkpoint of RUN_DIR (the newest complete one, or that of --step N) as a Hugging Face model
folder that transformers' AutoModelForCausalLM and AutoTokenizer load without custom code:
config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json.
Attention type mha exports as LlamaForCausalLM, swa as MistralForCausalLM, dma as DogeForCausalLM
(needs model.qk_norm and model.residual_scale), mla as DeepseekV3ForCausalLM with dense MLPs; nsa and
anything a peer cannot express are refused, naming the config key (README "Hugging Face interop").
  --dtype bf16     round the fp32 weights to bf16 (nearest even); default fp32
  --tokenizer T    the run's tokenizer when it cannot be found (RUN_DIR/tokenizer.json, else the one
                   named in the training data's manifest.json)
An existing DIR that is not empty is refused.
)";

const char* kImportHelp = R"(usage: dmatrain import DIR --out RUN_DIR [--set key=value ...]

Turns a Hugging Face model folder (config.json of a LlamaForCausalLM or DogeForCausalLM,
model.safetensors in fp32 or bf16, tokenizer.json) into a run directory holding a step-0 checkpoint,
which `dmatrain train RUN_DIR/config.json --resume` continues (the optimizer state starts fresh).
The model section comes from config.json (fields dmatrain does not map are refused by name);
train.seq_len defaults to max_position_embeddings and data.train / data.val to RUN_DIR/data/{train,val}
(prepare them with dmatrain data prepare --tokenizer RUN_DIR/tokenizer.json --out RUN_DIR/data ...).
  --set a.b=value  override a config key (train.*, data.*, run.*); repeatable
An existing RUN_DIR that is not empty is refused.
)";

const char* kGenerateHelp = R"(usage: dmatrain generate RUN_DIR (--prompt TEXT | --prompt-ids "ID ID ...") [--max-new-tokens N]
                         [--temperature T] [--top-k K] [--top-p P] [--seed S] [--step N]
                         [--tokenizer byte|T.json] [--no-stop] [--threads N]

Loads the newest complete checkpoint of RUN_DIR (or that of --step N) and continues the prompt one
token at a time, printing each token as it comes. Decoding runs on the CPU backend with a cache
per layer (mha, swa: keys and values; dma: keys, values and key biases, each new query's kept keys
by the training rule; mla: the latent and the rotated shared key, attention in the absorbed form;
nsa: each branch's keys and values and the compressed blocks as they complete);
a run trained on CUDA is loaded from its fp32 checkpoint into a CPU model. The prompt is encoded
with the tokenizer recorded in the run's data manifest (path relative to the current directory;
--tokenizer overrides); data of token ids (data mqar) takes --prompt-ids and prints ids.
  --max-new-tokens N   tokens to generate (default 64); generation also stops after the
                       tokenizer's end-of-document token unless --no-stop
  --temperature T      0 (default): greedy, the most likely token (the lower id on ties);
                       T > 0: sample from softmax(logits / T)
  --top-k K            sample among the K most likely tokens only (0, default: all)
  --top-p P            sample among the smallest set of most likely tokens whose probability
                       reaches P (1, default: all); applied after --top-k
  --seed S             sampling seed (default 0); the same seed gives the same text
  --step N             the checkpoint of step N instead of the newest
Prints the continuation on stdout and, on stderr, the token counts and tokens/s.
)";

const char* kNeedleHelp = R"(usage: dmatrain needle RUN_DIR [--lengths N,N,...] [--depths P,P,...] [--trials N] [--distractors K]
                       [--key-digits N] [--seed S] [--filler SHARDS] [--needle TEXT] [--question TEXT]
                       [--answer TEXT] [--out FILE.csv|FILE.jsonl] [--step N] [--tokenizer byte|T.json]
                       [--threads N]

Pass-key retrieval over the checkpoint of RUN_DIR (the newest, or that of --step N). For each context
length, trial and depth: a key of --key-digits digits is put into the needle text, which is inserted
after depth% of the filler (tokens of the run's validation shards, end-of-document tokens dropped,
from a start drawn per trial), the question ends the context, and the model is scored on the answer
text with the key: greedy decoding must produce its tokens exactly (exact), and its log-likelihood
is ranked against the same answer with each of K distractor keys (rank 1: the right key is the most
likely; ties count against it). The context is exactly LENGTH tokens, the question included. Runs on
the CPU backend with the layers' decoding caches: the context is fed once and each answer token costs
O(LENGTH). Deterministic: the same options give the same rows. Lengths beyond the run's
train.seq_len are allowed with a warning (RoPE extrapolates poorly; those rows have beyond_train = 1);
no model here can take more than 2^24 positions.
  --lengths N,...      context lengths in tokens (default 1024,2048,4096,8192,16384; 1K = 1024)
  --depths P,...       needle depths in percent of the filler before it (default 0,10,...,100)
  --trials N           trials per (length, depth) (default 4); a trial's key, distractors and filler
                       start depend on (seed, trial) only, so cells differ only in length and depth
  --distractors K      distractor keys for the likelihood rank (default 9)
  --key-digits N       digits of a key (default 5; no leading zero)
  --seed S             (default 0)
  --filler SHARDS      shard set of the filler text (default: the run's data.val)
  --needle TEXT        default "
The pass key is {key}. Remember it. {key} is the pass key.
"
  --question TEXT      default "
What is the pass key? The pass key is"
  --answer TEXT        default " {key}" (the tokens scored; must contain {key})
  --out FILE           one row per (length, depth, trial): .csv or .jsonl (README "Needle retrieval");
                       an existing FILE is refused
Prints a table of exact matches and rank-1 counts by depth and length.
)";

const char* kInfoHelp = R"(usage: dmatrain info CONFIG [--set key=value ...] [--json]

Prints parameter counts by group (with and without embeddings), FLOPs per token (the MFU
convention 6·N + 6·L·T·d, and the matmul FLOPs actually executed) and a memory estimate.
  --json   the same as one JSON object, with the resolved config (every default filled in)
)";

const char* kDataHelp = R"(usage: dmatrain data prepare --out DIR [--tokenizer byte|T.json] [--val-fraction F] [--shard-tokens N]
                             [--include GLOB ...] [--exclude GLOB ...] [--threads N] [--overwrite] INPUTS...
       dmatrain data inspect PATH
       dmatrain data mqar --out DIR [--vocab V] [--pairs P] [--seq-len T] [--train-examples N]
                          [--test-examples M] [--seed S] [--gap-power A] [--shard-tokens N] [--overwrite]

prepare: reads text files, directories (recursively) and JSONL files with a "text" field, drops
exact duplicate documents, splits train/validation by a hash of each document, and writes
DIR/train/*.bin, DIR/val/*.bin and DIR/manifest.json. Refuses a DIR that already holds shards
unless --overwrite. --include/--exclude: globs selecting files inside directories (README "Data and
tokenizers").
--threads: encoding threads (default: all cores).
inspect: header, counts and a decoded sample of a shard file, or the manifest of a directory.
mqar: multi-query associative recall (Zoology, Arora et al. 2023). Each example of T tokens holds
P key-value pairs (keys from [1, V/2), values from [V/2, V)), then every key queried once at a
random slot (weight (slot+1)^(A-1)) followed by its value; filler tokens elsewhere. The loss mask
keeps only the answers. Writes DIR/train/*.bin, DIR/test/*.bin (shards with the mask, read only at
train.seq_len = T) and DIR/manifest.json. No test example's set of key-value pairs occurs in train
(train examples that drew one are redrawn). Deterministic in the options.
  defaults: --vocab 8192 --pairs 32 --seq-len 256 --train-examples 100000 --test-examples 3000
            --seed 1234 --gap-power 0.01 (Zoology's; 1: uniform) --shard-tokens 134217728
  constraints: P <= V/2 - 1, T >= 4P
)";

bool wants_help(const std::vector<std::string>& a) {
  for (const auto& s : a)
    if (s == "--help" || s == "-h") return true;
  return false;
}

std::string need_value(const std::vector<std::string>& a, size_t& i) {
  if (i + 1 >= a.size()) throw Usage(a[i] + " needs a value");
  return a[++i];
}

int64_t parse_int(const std::string& flag, const std::string& v) {
  try {
    size_t n = 0;
    long long x = std::stoll(v, &n);
    if (n != v.size()) throw 0;
    return x;
  } catch (...) {
    throw Usage(flag + " expects an integer (got \"" + v + "\")");
  }
}

double parse_double(const std::string& flag, const std::string& v) {
  try {
    size_t n = 0;
    double x = std::stod(v, &n);
    if (n != v.size()) throw 0;
    return x;
  } catch (...) {
    throw Usage(flag + " expects a number (got \"" + v + "\")");
  }
}

// The value after the flag a[i], parsed by parse(flag, value); i then points at the value. The flag
// is copied first: in parse(a[i], need_value(a, i)) the arguments' order of evaluation is
// unspecified, and an error could name the value instead of the flag.
template <class P>
auto parsed_value(const std::vector<std::string>& a, size_t& i, P&& parse) {
  const std::string flag = a[i];
  return parse(flag, need_value(a, i));
}

// CONFIG plus repeated --set; other flags are handed to `extra`.
template <class F>
std::string parse_config_args(const std::vector<std::string>& a, std::vector<std::string>& sets, F&& extra) {
  std::string config;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--set") {
      sets.push_back(need_value(a, i));
    } else if (a[i].rfind("--set=", 0) == 0) {
      sets.push_back(a[i].substr(6));
    } else if (extra(a, i)) {
    } else if (a[i].rfind("--", 0) == 0) {
      throw Usage("unknown option " + a[i]);
    } else if (config.empty()) {
      config = a[i];
    } else {
      throw Usage("unexpected argument " + a[i]);
    }
  }
  if (config.empty()) throw Usage("missing CONFIG");
  return config;
}

int cmd_train(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kTrainHelp, stdout), 0;
  std::vector<std::string> sets;
  std::string out;
  dmat::TrainOptions opt;
  const std::string path = parse_config_args(a, sets, [&](const std::vector<std::string>& v, size_t& i) {
    if (v[i] == "--out") return out = need_value(v, i), true;
    if (v[i] == "--resume") return opt.resume = true, true;
    if (v[i] == "--stop-at") {
      opt.stop_at = parsed_value(v, i, parse_int);
      if (opt.stop_at < 1) throw Usage("--stop-at must be a step >= 1 (got " + std::to_string(opt.stop_at) + ")");
      return true;
    }
    if (v[i] == "--allow-train-changes") return opt.allow_train_changes = true, true;
    return false;
  });
  if (!out.empty()) {
    try {
      sets.push_back("run.dir=" + nlohmann::json(out).dump());
    } catch (const nlohmann::json::type_error&) {
      throw Usage("--out DIR must be UTF-8 text (the run directory is saved in RUN_DIR/config.json)");
    }
  }
  dmat::Config cfg = dmat::load_config(path, sets);
  auto r = dmat::train(cfg, opt);
  if (dmat::dist::world().rank() != 0) return 0;  // rank 0 reports for the job
  if (r.steps < cfg.train.steps) {
    std::printf("stopped at step %lld of %lld (run %s); continue with --resume\n", (long long)r.steps,
                (long long)cfg.train.steps, r.run_dir.c_str());
    return 0;
  }
  std::printf("validation loss %.4f, validation perplexity %.3f (step %lld, run %s)\n", r.val_loss, r.val_ppl,
              (long long)r.steps, r.run_dir.c_str());
  return 0;
}

int cmd_eval(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kEvalHelp, stdout), 0;
  std::string run, positions, logits;
  int64_t batches = 0;
  bool accuracy = false, json = false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--batches") batches = parsed_value(a, i, parse_int);
    else if (a[i] == "--positions") positions = need_value(a, i);
    else if (a[i] == "--logits") logits = need_value(a, i);
    else if (a[i] == "--accuracy") accuracy = true;
    else if (a[i] == "--json") json = true;
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else if (run.empty()) run = a[i];
    else throw Usage("unexpected argument " + a[i]);
  }
  if (run.empty()) throw Usage("missing RUN_DIR");
  if (!std::filesystem::is_directory(run)) fail("eval: run directory {} does not exist", run);
  if (!positions.empty() && std::filesystem::exists(positions))
    fail("eval: {} already exists; remove it or name another file for --positions", positions);
  if (!logits.empty() && std::filesystem::exists(logits))
    fail("eval: {} already exists; remove it or name another file for --logits", logits);
  auto r = dmat::evaluate_run(run, batches, !positions.empty(), logits, accuracy);
  if (!positions.empty()) {
    std::string csv = "position,loss,tokens\n";
    for (size_t t = 0; t < r.position_loss.size(); ++t)
      csv += fmt::format("{},{:.6f},{}\n", t, r.position_loss[t], r.position_tokens[t]);
    dmat::write_file_atomic(positions, csv);
  }
  if (json) {
    nlohmann::ordered_json j = {{"run", run}, {"step", r.step}, {"loss", r.loss}, {"ppl", r.ppl}, {"tokens", r.tokens}};
    if (r.has_accuracy) j["accuracy"] = r.accuracy, j["correct"] = r.correct;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("validation loss %.4f, validation perplexity %.3f (%lld tokens)\n", r.loss, r.ppl, (long long)r.tokens);
  if (r.has_accuracy)
    std::printf("accuracy %.4f (%lld of %lld targets predicted exactly)\n", r.accuracy, (long long)r.correct,
                (long long)r.tokens);
  // Training's own evaluation of this checkpoint may cover fewer windows (train.eval_batches): both
  // numbers, each with its token count, so a difference is never a puzzle.
  std::ifstream metrics(run + "/metrics.jsonl");
  std::string line;
  nlohmann::json same;
  while (std::getline(metrics, line)) {
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;
    }
    if (row.is_object() && row.contains("val_loss") && row.value("step", int64_t(-1)) == r.step) same = row;
  }
  if (same.is_object() && same["val_loss"].is_number())
    std::printf("training's evaluation at step %lld: validation loss %.4f (%s)\n", (long long)r.step,
                same["val_loss"].get<double>(),
                same.contains("val_tokens") ? fmt::format("{} tokens", same["val_tokens"].dump()).c_str()
                                            : "train.eval_batches batches");
  return 0;
}

int cmd_generate(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kGenerateHelp, stdout), 0;
  std::string run;
  dmat::GenerateOptions o;
  bool have_prompt = false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--prompt") o.prompt = need_value(a, i), have_prompt = true;
    else if (a[i] == "--prompt-ids") {
      std::istringstream in(need_value(a, i));
      std::string w;
      while (in >> w) o.prompt_ids.push_back(int32_t(parse_int("--prompt-ids", w)));
      o.use_ids = have_prompt = true;
    } else if (a[i] == "--max-new-tokens") o.max_new_tokens = parsed_value(a, i, parse_int);
    else if (a[i] == "--temperature") o.temperature = parsed_value(a, i, parse_double);
    else if (a[i] == "--top-k") o.top_k = parsed_value(a, i, parse_int);
    else if (a[i] == "--top-p") o.top_p = parsed_value(a, i, parse_double);
    else if (a[i] == "--seed") o.seed = uint64_t(parsed_value(a, i, parse_int));
    else if (a[i] == "--step") o.step = parsed_value(a, i, parse_int);
    else if (a[i] == "--tokenizer") o.tokenizer = need_value(a, i);
    else if (a[i] == "--threads") o.threads = parsed_value(a, i, parse_int);
    else if (a[i] == "--no-stop") o.stop_at_eot = false;
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else if (run.empty()) run = a[i];
    else throw Usage("unexpected argument " + a[i]);
  }
  if (run.empty()) throw Usage("missing RUN_DIR");
  if (!have_prompt) throw Usage("missing --prompt TEXT or --prompt-ids IDS");
  if (!o.prompt.empty() && o.use_ids) throw Usage("--prompt and --prompt-ids are alternatives; give one");
  if (!std::filesystem::is_directory(run)) fail("generate: run directory {} does not exist", run);
  auto r = dmat::generate_run(run, o, [&](int32_t id, const std::string& text) {
    if (o.use_ids) std::printf(" %d", id);
    else std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  });
  std::printf("\n");
  const double tps = r.decode_s > 0 ? double(r.tokens.size()) / r.decode_s : 0.0;
  std::fprintf(stderr, "generate: %lld prompt tokens in %.3f s, %lld new tokens in %.3f s (%.1f tokens/s), step %lld\n",
               (long long)r.prompt_tokens, r.prefill_s, (long long)r.tokens.size(), r.decode_s, tps,
               (long long)r.step);
  return 0;
}

// "1024,2K,4k" → {1024, 2048, 4096} (K = 1024).
std::vector<int64_t> parse_lengths(const std::string& flag, const std::string& v) {
  std::vector<int64_t> out;
  std::istringstream in(v);
  std::string w;
  while (std::getline(in, w, ',')) {
    int64_t scale = 1;
    if (!w.empty() && (w.back() == 'K' || w.back() == 'k')) scale = 1024, w.pop_back();
    out.push_back(parse_int(flag, w) * scale);
  }
  if (out.empty()) throw Usage(flag + " expects comma-separated lengths (got \"" + v + "\")");
  return out;
}

std::vector<double> parse_doubles(const std::string& flag, const std::string& v) {
  std::vector<double> out;
  std::istringstream in(v);
  std::string w;
  while (std::getline(in, w, ',')) out.push_back(parse_double(flag, w));
  if (out.empty()) throw Usage(flag + " expects comma-separated numbers (got \"" + v + "\")");
  return out;
}

int cmd_needle(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kNeedleHelp, stdout), 0;
  std::string run, out;
  dmat::NeedleOptions o;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--lengths") o.lengths = parsed_value(a, i, parse_lengths);
    else if (a[i] == "--depths") o.depths = parsed_value(a, i, parse_doubles);
    else if (a[i] == "--trials") o.trials = parsed_value(a, i, parse_int);
    else if (a[i] == "--distractors") o.distractors = parsed_value(a, i, parse_int);
    else if (a[i] == "--key-digits") o.key_digits = parsed_value(a, i, parse_int);
    else if (a[i] == "--seed") {
      const int64_t seed = parsed_value(a, i, parse_int);
      if (seed < 0) throw Usage("--seed must be >= 0");
      o.seed = uint64_t(seed);
    } else if (a[i] == "--filler") o.filler = need_value(a, i);
    else if (a[i] == "--needle") o.needle = need_value(a, i);
    else if (a[i] == "--question") o.question = need_value(a, i);
    else if (a[i] == "--answer") o.answer = need_value(a, i);
    else if (a[i] == "--out") out = need_value(a, i);
    else if (a[i] == "--step") o.step = parsed_value(a, i, parse_int);
    else if (a[i] == "--tokenizer") o.tokenizer = need_value(a, i);
    else if (a[i] == "--threads") o.threads = parsed_value(a, i, parse_int);
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else if (run.empty()) run = a[i];
    else throw Usage("unexpected argument " + a[i]);
  }
  if (run.empty()) throw Usage("missing RUN_DIR");
  const bool csv = out.size() > 4 && out.compare(out.size() - 4, 4, ".csv") == 0;
  const bool jsonl = out.size() > 6 && out.compare(out.size() - 6, 6, ".jsonl") == 0;
  if (!out.empty() && !csv && !jsonl) throw Usage("--out must name a .csv or a .jsonl file (got \"" + out + "\")");
  dmat::check_needle_options(o);  // before anything is loaded
  if (!std::filesystem::is_directory(run)) fail("needle: run directory {} does not exist", run);
  if (!out.empty() && std::filesystem::exists(out))
    fail("needle: {} already exists; remove it or name another file for --out", out);
  const dmat::NeedleReport r = dmat::run_needle(run, o, nullptr);
  if (!out.empty()) dmat::write_file_atomic(out, csv ? dmat::needle_csv(r, run) : dmat::needle_jsonl(r, run));
  // the tables: per (depth, length), the trials with an exact greedy answer and with rank 1
  for (int table = 0; table < 2; ++table) {
    std::printf("%s (of %lld trials), %s step %lld:\n", table == 0 ? "greedy exact match" : "likelihood rank 1",
                (long long)o.trials, r.variant.c_str(), (long long)r.step);
    std::printf("%9s", "depth");
    for (int64_t n : o.lengths) std::printf(" %7lld", (long long)n);
    std::printf("\n");
    for (double d : o.depths) {
      std::printf("%8g%%", d);
      for (int64_t n : o.lengths) {
        int64_t hits = 0;
        for (const dmat::NeedleRow& w : r.rows)
          if (w.trial.length == n && w.trial.depth == d) hits += table == 0 ? w.score.exact : w.score.rank == 1;
        std::printf(" %7lld", (long long)hits);
      }
      std::printf("\n");
    }
  }
  if (!out.empty()) std::printf("rows: %s\n", out.c_str());
  return 0;
}

int cmd_info(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kInfoHelp, stdout), 0;
  std::vector<std::string> sets;
  bool json = false;
  const std::string path = parse_config_args(a, sets, [&](const std::vector<std::string>& v, size_t& i) {
    if (v[i] == "--json") return json = true, true;
    return false;
  });
  dmat::Config cfg = dmat::load_config(path, sets);
  if (json) std::printf("%s\n", dmat::describe_json(cfg).dump(2).c_str());
  else std::fputs(dmat::describe(cfg).c_str(), stdout);
  return 0;
}

int cmd_export(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kExportHelp, stdout), 0;
  dmat::HfExportOptions o;
  std::string format;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--format") format = need_value(a, i);
    else if (a[i] == "--out") o.out_dir = need_value(a, i);
    else if (a[i] == "--step") o.step = parsed_value(a, i, parse_int);
    else if (a[i] == "--dtype") o.dtype = need_value(a, i);
    else if (a[i] == "--tokenizer") o.tokenizer = need_value(a, i);
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else if (o.run_dir.empty()) o.run_dir = a[i];
    else throw Usage("unexpected argument " + a[i]);
  }
  if (o.run_dir.empty()) throw Usage("missing RUN_DIR");
  if (format.empty()) throw Usage("export needs --format hf (the only format so far)");
  if (format != "hf") throw Usage("--format must be hf (got \"" + format + "\")");
  if (o.out_dir.empty()) throw Usage("export needs --out DIR");
  if (o.step < -1) throw Usage("--step must be >= 0");
  if (o.dtype != "fp32" && o.dtype != "bf16") throw Usage("--dtype must be fp32 or bf16 (got \"" + o.dtype + "\")");
  const auto r = dmat::export_hf(o);
  std::printf("exported %s as %s to %s (%lld tensors, %s, tokenizer %s)\n", r.checkpoint.c_str(),
              r.architecture.c_str(), o.out_dir.c_str(), (long long)r.tensors, o.dtype.c_str(), r.tokenizer.c_str());
  return 0;
}

int cmd_import(const std::vector<std::string>& a) {
  if (wants_help(a)) return std::fputs(kImportHelp, stdout), 0;
  dmat::HfImportOptions o;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--out") o.run_dir = need_value(a, i);
    else if (a[i] == "--set") o.sets.push_back(need_value(a, i));
    else if (a[i].rfind("--set=", 0) == 0) o.sets.push_back(a[i].substr(6));
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else if (o.hf_dir.empty()) o.hf_dir = a[i];
    else throw Usage("unexpected argument " + a[i]);
  }
  if (o.hf_dir.empty()) throw Usage("missing DIR (a Hugging Face model folder)");
  if (o.run_dir.empty()) throw Usage("import needs --out RUN_DIR");
  const auto r = dmat::import_hf(o);
  std::printf("imported %s (%s, %lld parameters) as %s; the optimizer state starts fresh (zero AdamW moments). "
              "Continue with: dmatrain train %s/config.json --resume\n",
              o.hf_dir.c_str(), r.architecture.c_str(), (long long)r.parameters, r.checkpoint.c_str(),
              o.run_dir.c_str());
  return 0;
}

int cmd_data(const std::vector<std::string>& a) {
  if (a.empty() || wants_help(a)) return std::fputs(kDataHelp, stdout), a.empty() ? 2 : 0;
  const std::string sub = a[0];
  if (sub == "inspect") {
    if (a.size() != 2) throw Usage("data inspect takes one PATH");
    std::fputs(dmat::inspect_data(a[1]).c_str(), stdout);
    return 0;
  }
  if (sub == "mqar") {
    dmat::MqarOptions o;
    for (size_t i = 1; i < a.size(); ++i) {
      if (a[i] == "--out") o.out_dir = need_value(a, i);
      else if (a[i] == "--vocab") o.vocab = parsed_value(a, i, parse_int);
      else if (a[i] == "--pairs") o.pairs = parsed_value(a, i, parse_int);
      else if (a[i] == "--seq-len") o.seq_len = parsed_value(a, i, parse_int);
      else if (a[i] == "--train-examples") o.train_examples = parsed_value(a, i, parse_int);
      else if (a[i] == "--test-examples") o.test_examples = parsed_value(a, i, parse_int);
      else if (a[i] == "--seed") {
        const int64_t seed = parsed_value(a, i, parse_int);
        if (seed < 0) throw Usage("--seed must be >= 0");
        o.seed = uint64_t(seed);
      } else if (a[i] == "--gap-power") o.gap_power = parsed_value(a, i, parse_double);
      else if (a[i] == "--shard-tokens") o.shard_tokens = parsed_value(a, i, parse_int);
      else if (a[i] == "--overwrite") o.overwrite = true;
      else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
      else throw Usage("unexpected argument " + a[i] + " (data mqar takes options only)");
    }
    if (o.out_dir.empty()) throw Usage("data mqar needs --out DIR");
    auto r = dmat::write_mqar(o);
    std::printf("wrote %s: %lld train examples (%lld tokens, %lld redrawn to keep the test set disjoint), %lld test "
                "examples (%lld tokens), %lld pairs of %lld-token sequences, vocab %lld\n",
                o.out_dir.c_str(), (long long)o.train_examples, (long long)r.train_tokens, (long long)r.redrawn,
                (long long)o.test_examples, (long long)r.test_tokens, (long long)o.pairs, (long long)o.seq_len,
                (long long)o.vocab);
    return 0;
  }
  if (sub != "prepare") throw Usage("unknown data command \"" + sub + "\" (prepare, inspect, mqar)");
  dmat::PrepareOptions o;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--out") o.out_dir = need_value(a, i);
    else if (a[i] == "--tokenizer") o.tokenizer = need_value(a, i);
    else if (a[i] == "--val-fraction") o.val_fraction = parsed_value(a, i, parse_double);
    else if (a[i] == "--shard-tokens") o.shard_tokens = parsed_value(a, i, parse_int);
    else if (a[i] == "--overwrite") o.overwrite = true;
    else if (a[i] == "--include") o.include.push_back(need_value(a, i));
    else if (a[i] == "--exclude") o.exclude.push_back(need_value(a, i));
    else if (a[i] == "--threads") o.threads = int(parsed_value(a, i, parse_int));
    else if (a[i].rfind("--", 0) == 0) throw Usage("unknown option " + a[i]);
    else o.inputs.push_back(a[i]);
  }
  if (o.out_dir.empty()) throw Usage("data prepare needs --out DIR");
  if (o.inputs.empty()) throw Usage("data prepare needs at least one input file or directory");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1)) throw Usage("--val-fraction must be in [0, 1)");
  if (o.shard_tokens < 1) throw Usage("--shard-tokens must be >= 1");
  auto r = dmat::prepare_data(o);
  std::printf("prepared %s: %lld documents (%lld duplicates dropped), %lld train tokens, %lld validation tokens\n",
              o.out_dir.c_str(), (long long)r.documents, (long long)r.duplicates, (long long)r.train_tokens,
              (long long)r.val_tokens);
  return 0;
}

int cmd_bench_kernels(const std::vector<std::string>& a) {
  if (a[0] == "ops") {
    if (a.size() != 1) throw Usage("bench ops takes no options");
    dmat::bench_ops(std::cout);
    return 0;
  }
  dmat::AttnBenchOptions o;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--seq") o.T = parsed_value(a, i, parse_int);
    else if (a[i] == "--heads") o.H = o.Hkv = parsed_value(a, i, parse_int);
    else if (a[i] == "--kv-heads") o.Hkv = parsed_value(a, i, parse_int);
    else if (a[i] == "--dim") o.D = parsed_value(a, i, parse_int);
    else if (a[i] == "--batch") o.B = parsed_value(a, i, parse_int);
    else if (a[i] == "--window") o.window = parsed_value(a, i, parse_int);
    else if (a[i] == "--dma") o.dma = parsed_value(a, i, parse_int);
    else if (a[i] == "--dma-bias") o.dma_bias = need_value(a, i);
    else if (a[i] == "--iters") o.iters = int(parsed_value(a, i, parse_int));
    else if (a[i] == "--nondeterministic") o.deterministic = false;
    else if (a[i] == "--nsa") o.nsa = true;
    else throw Usage("unknown option " + a[i]);
  }
  if (o.T < 1 || o.H < 1 || o.Hkv < 1 || o.H % o.Hkv != 0 || o.B < 1 || o.window < 0 || o.iters < 1 || o.dma < 0)
    throw Usage("bench attention: sizes must be >= 1, --kv-heads must divide --heads, --window and --dma >= 0");
  if (o.dma > 0 && o.window > 0) throw Usage("bench attention: --dma W and --window W are different variants; pick one");
  if (o.dma > 0 && o.nsa) throw Usage("bench attention: --dma W and --nsa are different variants; pick one");
  if (o.dma_bias != "normal" && o.dma_bias != "increasing" && o.dma_bias != "decreasing" && o.dma_bias != "tied")
    throw Usage("bench attention: --dma-bias must be normal, increasing, decreasing or tied (got '" + o.dma_bias + "')");
  dmat::bench_attention(o, std::cout);
  return 0;
}

int cmd_bench(const std::vector<std::string>& a) {
  if (a.empty() || wants_help(a)) return std::fputs(kBenchHelp, stdout), a.empty() ? 2 : 0;
  if (a[0] == "attention" || a[0] == "ops") return cmd_bench_kernels(a);
  dmat::TrainBenchOptions o;
  std::vector<std::string> sets;
  const std::string path = parse_config_args(a, sets, [&](const std::vector<std::string>& v, size_t& i) {
    if (v[i] == "--steps") return o.steps = parsed_value(v, i, parse_int), true;
    if (v[i] == "--warmup") return o.warmup = parsed_value(v, i, parse_int), true;
    return false;
  });
  if (o.steps < 1 || o.warmup < 0) throw Usage("--steps must be >= 1 and --warmup >= 0");
  dmat::Config cfg = dmat::load_config(path, sets);
  dmat::bench_train(cfg, o, std::cout);
  return 0;
}

int cmd_devices() {
  const int n = dmat::cuda::device_count();
  if (n == 0) std::puts("no CUDA devices visible");
  for (int i = 0; i < n; ++i) std::printf("cuda:%d %s\n", i, dmat::cuda::device_summary(i).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  dmat::init_logging();
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kMainHelp, stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string cmd = args[0];
  args.erase(args.begin());
  try {
    if (cmd == "train") return cmd_train(args);
    if (cmd == "eval") return cmd_eval(args);
    if (cmd == "info") return cmd_info(args);
    if (cmd == "export") return cmd_export(args);
    if (cmd == "import") return cmd_import(args);
    if (cmd == "generate") return cmd_generate(args);
    if (cmd == "needle") return cmd_needle(args);
    if (cmd == "data") return cmd_data(args);
    if (cmd == "tokenizer") return dmat::cli::cmd_tokenizer(args);
    if (cmd == "bench") return cmd_bench(args);
    if (cmd == "devices") return cmd_devices();
    throw Usage("unknown command \"" + cmd + "\"");
  } catch (const Usage& e) {
    std::fprintf(stderr, "dmatrain %s: %s (see dmatrain %s--help)\n", cmd.c_str(), e.what(),
                 cmd == "train" || cmd == "eval" || cmd == "info" || cmd == "data" || cmd == "bench" ||
                         cmd == "export" || cmd == "import" || cmd == "generate" || cmd == "needle"
                     ? (cmd + " ").c_str()
                                                                                               : "");
    return 2;
  } catch (const std::exception& e) {
    spdlog::shutdown();
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
