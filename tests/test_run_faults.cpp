// What a user gets when a run goes wrong (README "What happens when things go wrong"): state files
// that lie, non-finite losses, a run directory used by two processes, a refused resume, a changed
// config, a checkpoint that is incomplete or corrupt, shards that changed under a run. Each test runs
// the built CLI on the bundled corpus with a model small enough for a step to take milliseconds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "test_util.h"

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

// The tiny config on freshly prepared data under dir, with kSmall.
std::string config(const std::string& dir) {
  return test::source_dir() + "/configs/tiny.json" + test::prepare_bundled_data(dir) + kSmall;
}

void expect_has(const std::string& out, const std::vector<std::string>& pieces) {
  for (const auto& p : pieces) EXPECT_NE(out.find(p), std::string::npos) << "missing \"" << p << "\" in:\n" << out;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

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

}  // namespace
}  // namespace dmat
