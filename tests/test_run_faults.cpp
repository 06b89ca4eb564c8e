// What a user gets when a run goes wrong (README "What happens when things go wrong"): state files
// that lie, non-finite losses, a run directory used by two processes, a refused resume, a changed
// config, a checkpoint that is incomplete or corrupt, shards that changed under a run. Each test runs
// the built CLI on the bundled corpus with a model small enough for a step to take milliseconds.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "config/config.h"
#include "core/error.h"
#include "data/shard.h"
#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "test_util.h"
#include "train/run_dir.h"
#include "train/trainer.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using test::file_bytes;
using test::run;

std::string bin() { return test::dmatrain_bin(); }

// 1 layer, T = 64, 2 micro-batches of 4, 10 steps, checkpoints every 5, two threads.
const char* kSmall =
    " --set run.threads=2 --set run.device=cpu --set model.n_layers=1 --set train.seq_len=64"
    " --set train.batch_size=4 --set train.grad_accum=2 --set train.steps=10 --set run.log_interval=1"
    " --set train.eval_interval=5 --set train.eval_batches=2 --set train.checkpoint_interval=5";

// The bundled corpus prepared under dir/data (once per dir): the --set flags naming it.
std::string prepared(const std::string& dir) {
  if (!fs::exists(dir + "/data/manifest.json")) return test::prepare_bundled_data(dir);
  return " --set data.train=" + dir + "/data/train --set data.val=" + dir + "/data/val";
}

// The tiny config on the corpus prepared under dir, with kSmall.
std::string config(const std::string& dir) { return test::source_dir() + "/configs/tiny.json" + prepared(dir) + kSmall; }

void expect_has(const std::string& out, const std::vector<std::string>& pieces) {
  for (const auto& p : pieces) EXPECT_NE(out.find(p), std::string::npos) << "missing \"" << p << "\" in:\n" << out;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// Every regular file under dir with its bytes: what "changes nothing" compares.
std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> m;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) m[fs::relative(e.path(), dir).string()] = file_bytes(e.path().string());
  return m;
}

// The files that differ between two snapshots (changed, new or gone), for a short failure message.
std::string changed_files(const std::map<std::string, std::string>& a, const std::map<std::string, std::string>& b) {
  std::string out;
  for (const auto& [k, v] : a)
    if (!b.count(k) || b.at(k) != v) out += " " + k + (b.count(k) ? " (changed)" : " (gone)");
  for (const auto& [k, v] : b)
    if (!a.count(k)) out += " " + k + " (new)";
  return out;
}
#define EXPECT_UNCHANGED(dir, before, what) EXPECT_EQ(changed_files(before, snapshot(dir)), "") << what

// The message of the dmat::Error f throws ("" and a test failure when it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected dmat::Error";
  return "";
}

// A config for training in this process (tests that inject faults through TrainOptions' seams).
Config in_process_config(const std::string& dir, const std::string& out, const std::vector<std::string>& extra = {}) {
  prepared(dir);
  std::vector<std::string> sets = {"data.train=" + dir + "/data/train", "data.val=" + dir + "/data/val",
                                   "run.threads=2", "run.device=cpu", "model.n_layers=1", "train.seq_len=64",
                                   "train.batch_size=4", "train.grad_accum=2", "train.steps=10", "run.log_interval=1",
                                   "train.eval_interval=5", "train.eval_batches=2", "train.checkpoint_interval=0",
                                   "run.dir=\"" + out + "\""};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_config(test::source_dir() + "/configs/tiny.json", sets);
}

// Sets element 0 of a parameter's gradient (or, weight = true, the parameter itself) to NaN.
void poison(Model& m, const std::string& name, bool weight = false) {
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i)
    if (info[i].name == name) {
      (weight ? m.params() : m.grads()).get(int(i)).as<float>()[0] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
  FAIL() << "no parameter " << name;
}

// A checkpoint's state says where the run is; a state file that lies (a negative step, a step given as
// text) is refused naming the file and the key, and the refused resume changes nothing.
TEST(RunFaults, CheckpointStateIsValidatedNamingFileAndKey) {
  const std::string dir = test::temp_dir("faults_state");
  const std::string cfg = config(dir);
  auto a = run(bin() + " train " + cfg + " --out " + dir + "/a --stop-at 5");
  ASSERT_EQ(a.rc, 0) << a.out;
  const std::string state = dir + "/a/checkpoints/step_00000005/state_rank0.json";
  const nlohmann::json good = nlohmann::json::parse(file_bytes(state));
  const std::string metrics = file_bytes(dir + "/a/metrics.jsonl");
  struct Case {
    nlohmann::json value;
    std::string expect;
  };
  for (const auto& c : std::vector<Case>{{-5, "step must be an integer >= 0 (got -5)"},
                                         {"abc", "step must be an integer >= 0 (got \"abc\")"},
                                         {3, "step must be 5, the step of its folder (got 3)"}}) {
    nlohmann::json bad = good;
    bad["step"] = c.value;
    write_text(state, bad.dump());
    auto r = run(bin() + " train " + cfg + " --out " + dir + "/a --resume");
    EXPECT_NE(r.rc, 0) << r.out;
    expect_has(r.out, {"state_rank0.json", c.expect});
    EXPECT_EQ(file_bytes(dir + "/a/metrics.jsonl"), metrics) << "a refused resume touched metrics.jsonl";
  }
  nlohmann::json bad = good;
  bad["elapsed_s"] = "soon";
  write_text(state, bad.dump());
  expect_has(run(bin() + " train " + cfg + " --out " + dir + "/a --resume").out,
             {"state_rank0.json", "elapsed_s must be a number >= 0 (got \"soon\")"});
  // Found by fuzz_checkpoint (tests/fuzz/corpus/checkpoint/world_huge): a world_size of INT64_MAX
  // overflowed the global batch comparison of --resume (signed overflow: undefined behaviour).
  bad = good;
  bad["world_size"] = std::numeric_limits<int64_t>::max();
  write_text(state, bad.dump());
  expect_has(run(bin() + " train " + cfg + " --out " + dir + "/a --resume").out,
             {"state_rank0.json", "world_size must be an integer in [1, 2^20] (got 9223372036854775807)"});
}

// `eval` of weights that give a NaN loss fails (exit 1) naming the checkpoint, not "validation loss nan".
TEST(RunFaults, EvalRefusesANonFiniteLoss) {
  const std::string dir = test::temp_dir("faults_eval_nan");
  auto a = run(bin() + " train " + config(dir) + " --out " + dir + "/a --set train.steps=5");
  ASSERT_EQ(a.rc, 0) << a.out;
  const std::string weights = dir + "/a/checkpoints/step_00000005/model.safetensors";
  {
    SafetensorsFile f(weights);
    std::vector<NamedTensor> all;
    for (const auto& n : f.names()) all.push_back({n, f.get(n)});
    Tensor w = f.get("model.norm.weight");
    w.as<float>()[0] = std::numeric_limits<float>::quiet_NaN();  // f's own buffer: rewritten below
    write_safetensors(weights, all, {{"format", "dmatrain"}});
  }
  auto e = run(bin() + " eval " + dir + "/a");
  EXPECT_EQ(e.rc, 1) << e.out;
  expect_has(e.out, {"validation loss of checkpoint", "step_00000005 is nan", "non-finite"});
}

// A run directory is used by one process at a time: while another process holds RUN_DIR/train.lock
// (here: this test), `train --resume` is refused and changes nothing; once the lock is gone it works.
TEST(RunFaults, ARunDirectoryInUseIsRefused) {
  const std::string dir = test::temp_dir("faults_lock");
  const std::string cfg = config(dir);
  auto a = run(bin() + " train " + cfg + " --out " + dir + "/a --stop-at 5");
  ASSERT_EQ(a.rc, 0) << a.out;
  const auto before = snapshot(dir + "/a");
  const int fd = ::open((dir + "/a/train.lock").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  auto b = run(bin() + " train " + cfg + " --out " + dir + "/a --resume");
  EXPECT_EQ(b.rc, 1) << b.out;
  expect_has(b.out, {"run directory " + dir + "/a is in use by another dmatrain process", "train.lock"});
  EXPECT_UNCHANGED(dir + "/a", before, "a refused start changed the run directory");
  ::close(fd);
  auto c = run(bin() + " train " + cfg + " --out " + dir + "/a --resume");
  EXPECT_EQ(c.rc, 0) << c.out;
}

// --resume with a config that changes the model, the data order or the batch is refused and changes
// nothing (config.json included); other changes are printed; --allow-train-changes continues anyway;
// a longer train.steps says what it does to the schedule.
// A run directory's path is saved in RUN_DIR/config.json, which is JSON: one that is not UTF-8 is a
// usage error, not the JSON library's type_error (the cause fuzz_config found through --set text).
TEST(RunFaults, AnOutDirThatIsNotUtf8IsAUsageError) {
  const std::string dir = test::temp_dir("faults_out_utf8");
  auto r = run(bin() + " train " + test::source_dir() + "/configs/tiny.json --out \"" + dir + "/$(printf '\\377')\"");
  EXPECT_EQ(r.rc, 2) << r.out;
  expect_has(r.out, {"--out DIR must be UTF-8 text"});
  EXPECT_TRUE(fs::is_empty(dir)) << "a refused start created something";
}

// Found by fuzz_checkpoint (tests/fuzz/corpus/checkpoint/crash-section-not-object): a checkpoint's
// config.json whose train section is a number reached the user as the JSON library's type_error.
// Compared as empty, every key of it is a change: refused as another data order, or listed.
TEST(RunFaults, ASavedConfigSectionThatIsNoObjectIsComparedAsEmpty) {
  const Config now = parse_config(nlohmann::json{{"data", {{"train", "t"}, {"val", "v"}}}});
  TrainState st;
  st.step = 2;
  nlohmann::json saved = now.resolved;
  saved["train"] = 5;
  expect_has(error_of([&] { check_resume_config(saved, now, st, 1, false, "ck"); }),
             {"changes the data order", "train.seed: absent -> 1234 (another data order)"});
  EXPECT_NO_THROW(check_resume_config(saved, now, st, 1, true, "ck"));
  saved = now.resolved;
  saved["model"] = "x";
  expect_has(error_of([&] { check_resume_config(saved, now, st, 1, false, "ck"); }),
             {"the config changes the model", "model.d_model: absent -> 128"});
}

TEST(RunFaults, ResumeWithAChangedConfigPrintsRefusesOrExplains) {
  const std::string dir = test::temp_dir("faults_changed");
  const std::string cfg = config(dir);
  auto a = run(bin() + " train " + cfg + " --out " + dir + "/a --stop-at 5");
  ASSERT_EQ(a.rc, 0) << a.out;
  const auto before = snapshot(dir + "/a");
  struct Case {
    std::string sets;
    std::vector<std::string> expect;
  };
  const std::vector<Case> refused = {
      {" --set model.d_model=64 --set model.head_dim=16", {"changes the model", "model.d_model: 128 -> 64"}},
      {" --set train.seed=7", {"changes the data order or the batch", "train.seed: 1234 -> 7 (another data order)",
                               "--allow-train-changes"}},
      {" --set train.seq_len=32", {"train.seq_len: 64 -> 32"}},
      {" --set train.batch_size=2",
       {"the global batch train.batch_size × train.grad_accum × ranks: 4 × 2 × 1 = 8 sequences per step -> 2 × 2 × 1 = 4"}},
      {" --set train.grad_accum=4", {"= 8 sequences per step -> 4 × 4 × 1 = 16"}},
      {" --stop-at 5", {"--stop-at 5: the run is already at step 5"}},
      {" --stop-at 3", {"--stop-at 3: the run is already at step 5"}},
  };
  for (const auto& c : refused) {
    auto r = run(bin() + " train " + cfg + c.sets + " --out " + dir + "/a --resume");
    EXPECT_EQ(r.rc, 1) << c.sets << "\n" << r.out;
    expect_has(r.out, c.expect);
    EXPECT_UNCHANGED(dir + "/a", before, c.sets + ": a refused start changed the run directory");
  }
  auto zero = run(bin() + " train " + cfg + " --out " + dir + "/a --resume --stop-at 0");
  EXPECT_EQ(zero.rc, 2) << zero.out;
  expect_has(zero.out, {"--stop-at must be a step >= 1 (got 0)"});

  // printed, then continued: a longer run and another lr
  auto longer = run(bin() + " train " + cfg + " --set train.steps=20 --set train.lr=0.002 --out " + dir +
                    "/a --resume --stop-at 8");
  EXPECT_EQ(longer.rc, 0) << longer.out;
  expect_has(longer.out, {"--resume: continuing from " + dir + "/a/checkpoints/step_00000005 (step 5), the newest "
                          "complete checkpoint",
                          "train.lr: 0.003 -> 0.002", "train.steps: 10 -> 20",
                          "train.steps 10 -> 20: the wsd learning-rate schedule is recomputed over 20 steps, so step 6 "
                          "gets lr"});
  // allowed explicitly
  auto seed = run(bin() + " train " + cfg + " --set train.steps=20 --set train.lr=0.002 --set train.seed=7 --out " +
                  dir + "/a --resume --allow-train-changes");
  EXPECT_EQ(seed.rc, 0) << seed.out;
  expect_has(seed.out, {"continuing with train.seed: 1234 -> 7 (another data order) (--allow-train-changes)"});
  // the errors of a run that started go to train.log too; a refused start's do not
  EXPECT_EQ(file_bytes(dir + "/a/train.log").find("changes the data order"), std::string::npos);
}

// Which checkpoint --resume uses, and why: an incomplete newer one is skipped with a warning; a corrupt
// newest one is refused with the previous complete one offered, and setting it aside as told works.
TEST(RunFaults, ResumeSaysWhichCheckpointItUsesAndOffersThePreviousOne) {
  const std::string dir = test::temp_dir("faults_which");
  const std::string cfg = config(dir);
  auto a = run(bin() + " train " + cfg + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  const std::string ck = dir + "/a/checkpoints/";
  fs::copy(ck + "step_00000010", ck + ".tmp_step_00000015", fs::copy_options::recursive);
  fs::remove(ck + ".tmp_step_00000015/COMPLETE");
  auto b = run(bin() + " train " + cfg + " --set train.steps=12 --out " + dir + "/a --resume --stop-at 11");
  ASSERT_EQ(b.rc, 0) << b.out;
  expect_has(b.out, {"--resume: skipping " + ck + ".tmp_step_00000015: incomplete (no COMPLETE marker",
                     "--resume: continuing from " + ck + "step_00000010 (step 10), the newest complete checkpoint"});
  // a truncated model file in the newest checkpoint (step 11)
  const std::string w = ck + "step_00000011/model.safetensors";
  const std::string bytes = file_bytes(w);
  write_text(w, bytes.substr(0, bytes.size() / 2));
  const auto before = snapshot(dir + "/a");
  auto c = run(bin() + " train " + cfg + " --set train.steps=12 --out " + dir + "/a --resume");
  EXPECT_EQ(c.rc, 1) << c.out;
  expect_has(c.out, {"checkpoint " + ck + "step_00000011 cannot be used", "model.safetensors",
                     "The previous complete checkpoint is " + ck + "step_00000010 (step 10)",
                     "mv " + ck + "step_00000011 " + ck + "broken_step_00000011"});
  EXPECT_UNCHANGED(dir + "/a", before, "a refused start changed the run directory");
  fs::rename(ck + "step_00000011", ck + "broken_step_00000011");
  auto d = run(bin() + " train " + cfg + " --set train.steps=12 --out " + dir + "/a --resume");
  EXPECT_EQ(d.rc, 0) << d.out;
  expect_has(d.out, {"continuing from " + ck + "step_00000010 (step 10)"});
}

// A shard that changed since the run started is an error on resume naming the shard, not silently
// other data; restored, the run continues.
TEST(RunFaults, AShardThatChangedSinceTheStartIsAnError) {
  const std::string dir = test::temp_dir("faults_shard");
  const std::string cfg = config(dir);
  auto a = run(bin() + " train " + cfg + " --out " + dir + "/a --stop-at 5");
  ASSERT_EQ(a.rc, 0) << a.out;
  const std::string shard = list_shards(dir + "/data/train").front();
  const std::string good = file_bytes(shard);
  std::string changed = good;
  changed[kShardHeaderBytes + 200] = changed[kShardHeaderBytes + 200] == 'x' ? 'y' : 'x';  // one token, still < 256
  write_text(shard, changed);
  auto b = run(bin() + " train " + cfg + " --out " + dir + "/a --resume");
  EXPECT_EQ(b.rc, 1) << b.out;
  expect_has(b.out, {"data: shard " + shard + " changed since the run started", "data.json"});
  write_text(shard, good);
  auto c = run(bin() + " train " + cfg + " --out " + dir + "/a --resume");
  EXPECT_EQ(c.rc, 0) << c.out;
}

// The loader logs each new epoch of the training set (a small one here: 40 windows, 8 per step).
TEST(RunFaults, EpochWrapsAreLogged) {
  const std::string dir = test::temp_dir("faults_epochs");
  const std::string cfg = config(dir);
  std::vector<uint32_t> tokens(64 * 40 + 1);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(97 + i % 26);
  fs::create_directories(dir + "/small");
  write_shard(dir + "/small/shard_000000.bin", tokens, 257);
  auto r = run(bin() + " train " + cfg + " --set data.train=" + dir + "/small --set train.steps=12 --out " + dir + "/a");
  ASSERT_EQ(r.rc, 0) << r.out;
  expect_has(r.out, {"the run's 12 steps read 2.40 epochs",
                     "data: step 6 begins epoch 2 of the training set (all 40 windows were read 1 time(s)",
                     "data: step 11 begins epoch 3"});
  expect_has(file_bytes(dir + "/a/train.log"), {"step 6 begins epoch 2"});
}

// `data prepare` says when it skips every file of a directory for want of --include, and when
// --val-fraction 0 leaves no validation set.
TEST(RunFaults, PrepareWarnsAboutSkippedFilesAndNoValidationSet) {
  const std::string dir = test::temp_dir("faults_prepare");
  fs::create_directories(dir + "/src");
  write_text(dir + "/src/a.py", "print('a')\n");
  write_text(dir + "/src/b.py", "print('b')\n");
  auto r = run(bin() + " data prepare --out " + dir + "/out " + dir + "/src");
  EXPECT_EQ(r.rc, 1) << r.out;
  expect_has(r.out, {"input " + dir + "/src: all 2 files skipped (e.g. ", "--include '*.py'",
                     "--include GLOB reads other files"});
  auto v = run(bin() + " data prepare --val-fraction 0 --include '*.py' --out " + dir + "/out " + dir + "/src");
  EXPECT_EQ(v.rc, 0) << v.out;
  expect_has(v.out, {"--val-fraction 0: no validation shards are written"});
}

// train.on_nonfinite = "stop" (the default): a NaN gradient at step 4 stops the run at step 4, names
// the step and the tensor, writes the last good state (step 3) as a checkpoint and says so in the
// error and in train.log; the checkpoint resumes.
TEST(RunFaults, ANonFiniteGradientStopsWithTheLastGoodState) {
  const std::string dir = test::temp_dir("faults_nan_stop");
  const Config cfg = in_process_config(dir, dir + "/a");
  TrainOptions opt;
  opt.after_backward = [](int64_t step, Model& m) {
    if (step == 4) poison(m, "model.layers.0.mlp.down_proj.weight");
  };
  const std::string e = error_of([&] { train(cfg, opt); });
  expect_has(e, {"training stopped: step 4 has loss", "gradient norm nan",
                 "the first tensor with a non-finite gradient: model.layers.0.mlp.down_proj.weight, group mlp",
                 "The last good state, step 3, was written to checkpoint " + dir + "/a/checkpoints/step_00000003"});
  EXPECT_TRUE(fs::exists(dir + "/a/checkpoints/step_00000003/COMPLETE"));
  EXPECT_FALSE(fs::exists(dir + "/a/checkpoints/step_00000004"));
  expect_has(file_bytes(dir + "/a/train.log"), {"[error] training stopped: step 4"});
  auto r = run(bin() + " train " + config(dir) + " --set train.checkpoint_interval=0 --out " + dir + "/a --resume");
  EXPECT_EQ(r.rc, 0) << r.out;
  expect_has(r.out, {"continuing from " + dir + "/a/checkpoints/step_00000003 (step 3)"});

  // a NaN weight: the loss of the next step is NaN, and the weights are no good state to save
  const Config cfg2 = in_process_config(dir, dir + "/b");
  TrainOptions opt2;
  opt2.after_backward = [](int64_t step, Model& m) {
    if (step == 4) poison(m, "model.norm.weight", /*weight=*/true);
  };
  expect_has(error_of([&] { train(cfg2, opt2); }),
             {"training stopped: step 5 has loss nan", "is not finite either, so no checkpoint was written"});
}

// train.on_nonfinite = "skip": steps with a NaN gradient lose their update, are counted and logged,
// and the run goes on to the end; the count is in the checkpoint's state.
TEST(RunFaults, SkipModeDropsNonFiniteUpdatesAndCountsThem) {
  const std::string dir = test::temp_dir("faults_nan_skip");
  const Config cfg = in_process_config(dir, dir + "/a", {"train.on_nonfinite=skip"});
  TrainOptions opt;
  opt.after_backward = [](int64_t step, Model& m) {
    if (step == 3 || step == 7) poison(m, "model.embed_tokens.weight");
  };
  const TrainResult r = train(cfg, opt);
  EXPECT_EQ(r.steps, 10);
  EXPECT_TRUE(std::isfinite(r.val_loss));
  const auto state = nlohmann::json::parse(file_bytes(dir + "/a/checkpoints/step_00000010/state_rank0.json"));
  EXPECT_EQ(state["skipped_steps"], 2);
  EXPECT_EQ(state["adam_steps"], 8);
  int skipped_rows = 0;
  for (const auto& row : test::read_jsonl(dir + "/a/metrics.jsonl"))
    if (row.contains("skipped")) {
      ++skipped_rows;
      EXPECT_NE(row["skipped"].get<std::string>().find("model.embed_tokens.weight, group embedding"), std::string::npos);
    }
  EXPECT_EQ(skipped_rows, 2);
  expect_has(file_bytes(dir + "/a/train.log"), {"step 7 has loss", "update skipped (2 skipped so far)",
                                                "(2 updates skipped)"});
}

// The loss-spike guard (train.loss_spike_z): a loss far above the window's mean skips its update. The
// spike is injected by scaling the LM head before step 9's forward and restoring it after its backward.
TEST(RunFaults, LossSpikeGuardSkipsTheSpikingStep) {
  const std::string dir = test::temp_dir("faults_spike");
  const Config cfg = in_process_config(dir, dir + "/a",
                                       {"train.steps=12", "train.loss_spike_z=4", "train.loss_spike_window=5"});
  std::vector<float> saved;
  auto head = [](Model& m) {
    const auto& info = m.param_info();
    for (size_t i = 0; i < info.size(); ++i)
      if (info[i].name == "lm_head.weight") return m.params().get(int(i));
    ADD_FAILURE() << "no lm_head.weight";
    return Tensor{};
  };
  TrainOptions opt;
  opt.before_forward = [&](int64_t step, Model& m) {
    if (step != 9) return;
    const Tensor h = head(m);
    saved.assign(h.as<float>(), h.as<float>() + h.numel());
    for (int64_t i = 0; i < h.numel(); ++i) h.as<float>()[i] *= 30.f;
  };
  opt.after_backward = [&](int64_t step, Model& m) {
    if (step == 9) std::copy(saved.begin(), saved.end(), head(m).as<float>());
  };
  const TrainResult r = train(cfg, opt);
  EXPECT_EQ(r.steps, 12);
  const std::string log = file_bytes(dir + "/a/train.log");
  expect_has(log, {"step 9 has loss", "standard deviations above the mean of the previous 5 steps "
                                      "(train.loss_spike_z = 4)", "update skipped (1 skipped so far)"});
  const auto state = nlohmann::json::parse(file_bytes(dir + "/a/checkpoints/step_00000012/state_rank0.json"));
  EXPECT_EQ(state["skipped_steps"], 1);
  EXPECT_EQ(state["recent_losses"].size(), 5u);
}

}  // namespace
}  // namespace dmat
