// End-to-end training through the CLI on the bundled corpus: learning, bit-exact resume, and the
// errors a user gets for bad configs, bad data and unsafe run directories.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "data/loader.h"
#include "data/shard.h"
#include "test_util.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using test::run;

std::string bin() { return test::dmatrain_bin(); }
// Two threads per training process: ctest runs suites in parallel, and OpenMP barriers degrade badly
// when several all-core processes share the machine.
// run.device=cpu: this is the cpu label, also on a machine with a GPU.
std::string tiny() { return test::source_dir() + "/configs/tiny.json --set run.threads=2 --set run.device=cpu"; }

std::string prepare(const std::string& dir) { return test::prepare_bundled_data(dir); }
using test::file_bytes;
std::vector<nlohmann::json> read_metrics(const std::string& path) { return test::read_jsonl(path); }

// Entropy (nats) of the validation tokens' unigram distribution: the loss of the best model that
// ignores context.
double unigram_entropy(const std::string& val_dir) {
  std::map<int32_t, double> counts;
  double n = 0;
  for (const auto& path : list_shards(val_dir)) {
    ShardReader r(path);
    std::vector<int32_t> tok(r.info().n_tokens);
    r.read(0, tok.size(), tok.data());
    for (int32_t t : tok) counts[t] += 1, n += 1;
  }
  double h = 0;
  for (auto& [t, c] : counts) h -= c / n * std::log(c / n);
  return h;
}

TEST(Train, TinyConfigLearnsWellBelowUnigramEntropy) {
  const std::string dir = test::temp_dir("train_learns");
  const std::string data = prepare(dir);
  const double h1 = unigram_entropy(dir + "/data/val");
  auto r = run(bin() + " train " + tiny() + data + " --out " + dir + "/run --set train.steps=200" +
               " --set train.eval_interval=200 --set train.checkpoint_interval=0");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto rows = read_metrics(dir + "/run/metrics.jsonl");
  double val = -1;
  for (auto& row : rows)
    if (row.contains("val_loss")) val = row["val_loss"].get<double>();
  ASSERT_GT(val, 0) << "no validation row";
  std::cout << "unigram entropy " << h1 << " nats, validation loss after 200 steps " << val << "\n";
  EXPECT_LT(val, h1 - 0.5) << "validation loss should be well below the unigram entropy";
  EXPECT_NE(r.out.find("validation perplexity"), std::string::npos) << r.out;
  // the run directory holds what the README promises
  for (const char* f : {"config.json", "train.log", "metrics.jsonl"}) EXPECT_TRUE(fs::exists(dir + "/run/" + f)) << f;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step_00000200/COMPLETE"));
  // log lines carry step/total, loss, lr, grad norm, tokens/s, elapsed, eta
  const std::string log = file_bytes(dir + "/run/train.log");
  for (const char* k : {"step 200/200", "loss", "lr", "grad norm", "tok/s", "elapsed", "eta", "val ppl"})
    EXPECT_NE(log.find(k), std::string::npos) << k;
  // eval on the run reproduces the final validation loss: the same checkpoint, the same windows (the
  // first train.eval_batches = 8 batches), so the same number to the printed digits; and it prints
  // training's evaluation of that checkpoint beside its own, with the token counts
  auto e = run(bin() + " eval " + dir + "/run --batches 8");
  ASSERT_EQ(e.rc, 0) << e.out;
  const auto at = e.out.find("validation loss ");
  ASSERT_NE(at, std::string::npos) << e.out;
  double printed = 0, ppl = 0, trained = 0;
  long long tokens = 0, trained_tokens = 0;
  ASSERT_EQ(std::sscanf(e.out.c_str() + at, "validation loss %lf, validation perplexity %lf (%lld tokens)", &printed,
                        &ppl, &tokens),
            3)
      << e.out;
  EXPECT_NEAR(printed, val, 0.5e-4 + 1e-9) << e.out;
  EXPECT_NEAR(ppl, std::exp(val), 0.5e-3 * std::exp(val)) << e.out;
  EXPECT_EQ(tokens, 8 * 16 * 128) << e.out;  // eval_batches × batch_size × seq_len
  const auto tr = e.out.find("training's evaluation at step 200: ");
  ASSERT_NE(tr, std::string::npos) << e.out;
  ASSERT_EQ(std::sscanf(e.out.c_str() + tr, "training's evaluation at step 200: validation loss %lf (%lld tokens)",
                        &trained, &trained_tokens),
            2)
      << e.out;
  EXPECT_EQ(trained, printed);
  EXPECT_EQ(trained_tokens, tokens);
}

const char* kSmall =
    " --set model.n_layers=1 --set train.seq_len=64 --set train.batch_size=4 --set train.grad_accum=2"
    " --set train.steps=30 --set run.log_interval=1 --set train.eval_interval=10 --set train.eval_batches=2"
    " --set train.checkpoint_interval=10 --set run.keep_checkpoints=2";

TEST(Train, ResumeReproducesTheUninterruptedRunBitForBit) {
  const std::string dir = test::temp_dir("train_resume");
  const std::string data = prepare(dir);
  auto a = run(bin() + " train " + tiny() + data + kSmall + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  auto b1 = run(bin() + " train " + tiny() + data + kSmall + " --out " + dir + "/b --stop-at 17");
  ASSERT_EQ(b1.rc, 0) << b1.out;
  EXPECT_TRUE(fs::exists(dir + "/b/checkpoints/step_00000017/COMPLETE"));
  auto b2 = run(bin() + " train " + tiny() + data + kSmall + " --out " + dir + "/b --resume");
  ASSERT_EQ(b2.rc, 0) << b2.out;
  EXPECT_NE(b2.out.find("resumed from"), std::string::npos) << b2.out;

  auto ra = read_metrics(dir + "/a/metrics.jsonl"), rb = read_metrics(dir + "/b/metrics.jsonl");
  std::map<int64_t, std::string> la, lb, va, vb;
  for (auto& r : ra) (r.contains("loss") ? la : va)[r["step"]] = r.contains("loss") ? r["loss"].dump() : r["val_loss"].dump();
  for (auto& r : rb) (r.contains("loss") ? lb : vb)[r["step"]] = r.contains("loss") ? r["loss"].dump() : r["val_loss"].dump();
  ASSERT_EQ(la.size(), 30u);
  EXPECT_EQ(la, lb) << "training losses differ after resume";
  EXPECT_EQ(va, vb) << "validation losses differ after resume";
  EXPECT_EQ(file_bytes(dir + "/a/checkpoints/step_00000030/model.safetensors"),
            file_bytes(dir + "/b/checkpoints/step_00000030/model.safetensors"));
  EXPECT_EQ(file_bytes(dir + "/a/checkpoints/step_00000030/optim_rank0.safetensors"),
            file_bytes(dir + "/b/checkpoints/step_00000030/optim_rank0.safetensors"));
  // keep_checkpoints = 2
  EXPECT_FALSE(fs::exists(dir + "/a/checkpoints/step_00000010"));
  EXPECT_TRUE(fs::exists(dir + "/a/checkpoints/step_00000020"));
}

// `eval --positions`: one row per position, the token-weighted mean of the rows is the validation
// loss eval prints, an existing file is refused. Trained with DMA and its local window (CPU), so the
// extension's whole path (config, layer, resume, eval) runs end to end.
TEST(Train, EvalPositionsAverageToTheValidationLoss) {
  const std::string dir = test::temp_dir("train_positions");
  const std::string data = prepare(dir);
  const std::string cfg = std::string(kSmall) + " --set train.steps=10" +
                          " --set 'model.attention={\"type\":\"dma\",\"window\":8,\"local_window\":8}'";
  auto a = run(bin() + " train " + tiny() + data + cfg + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  auto e = run(bin() + " eval " + dir + "/a --batches 3 --positions " + dir + "/pos.csv");
  ASSERT_EQ(e.rc, 0) << e.out;
  double printed = 0;
  long long tokens = 0;
  const auto at = e.out.find("validation loss ");
  ASSERT_NE(at, std::string::npos) << e.out;
  ASSERT_EQ(std::sscanf(e.out.c_str() + at, "validation loss %lf, validation perplexity %*f (%lld tokens)", &printed,
                        &tokens),
            2)
      << e.out;
  std::ifstream f(dir + "/pos.csv");
  std::string line;
  std::getline(f, line);
  EXPECT_EQ(line, "position,loss,tokens");
  double sum = 0, n = 0;
  int64_t rows = 0;
  while (std::getline(f, line)) {
    long long pos = 0, cnt = 0;
    double loss = 0;
    ASSERT_EQ(std::sscanf(line.c_str(), "%lld,%lf,%lld", &pos, &loss, &cnt), 3) << line;
    EXPECT_EQ(pos, rows++);
    EXPECT_EQ(cnt, 3 * 4);  // 3 batches of 4 sequences, every target valid
    sum += loss * double(cnt), n += double(cnt);
  }
  EXPECT_EQ(rows, 64);
  EXPECT_EQ(int64_t(n), tokens);
  EXPECT_NEAR(sum / n, printed, 1e-4);
  auto again = run(bin() + " eval " + dir + "/a --positions " + dir + "/pos.csv");
  EXPECT_NE(again.rc, 0);
  EXPECT_NE(again.out.find("already exists"), std::string::npos) << again.out;
}

TEST(Train, RefusesToOverwriteARunOrResumeAChangedModel) {
  const std::string dir = test::temp_dir("train_refuse");
  const std::string data = prepare(dir);
  const std::string small = std::string(kSmall) + " --set train.steps=10";
  auto a = run(bin() + " train " + tiny() + data + small + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;
  const std::string before = file_bytes(dir + "/a/metrics.jsonl");
  auto again = run(bin() + " train " + tiny() + data + small + " --out " + dir + "/a");
  EXPECT_NE(again.rc, 0);
  EXPECT_NE(again.out.find("already holds a run"), std::string::npos) << again.out;
  EXPECT_EQ(before, file_bytes(dir + "/a/metrics.jsonl")) << "metrics were touched";
  auto changed = run(bin() + " train " + tiny() + data + small + " --set model.d_model=64 --set model.head_dim=16" +
                     " --out " + dir + "/a --resume");
  EXPECT_NE(changed.rc, 0);
  EXPECT_NE(changed.out.find("model.d_model: 128 -> 64"), std::string::npos) << changed.out;
}

TEST(Train, BadInputsFailNamingWhatIsWrong) {
  const std::string dir = test::temp_dir("train_bad");
  const std::string data = prepare(dir);
  struct Case {
    std::string args, expect;
  };
  std::vector<Case> cases = {
      {" --set model.atention.type=mha", "model.atention"},
      {" --set train.steps='\"100\"'", "train.steps"},
      {" --set train.batch_size=-3", "train.batch_size"},
      {" --set model.attention.type=swa", "model.attention.window"},
      {" --set model.n_kv_heads=3", "model.n_kv_heads"},
      {" --set model.vocab_size=100", "vocab"},
      {" --set data.train=" + dir + "/nothing_here", dir + "/nothing_here"},
  };
  for (const auto& c : cases) {
    auto r = run(bin() + " train " + tiny() + data + c.args + " --out " + dir + "/run_bad");
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
    fs::remove_all(dir + "/run_bad");
  }
  auto missing = run(bin() + " train " + dir + "/no_such_config.json");
  EXPECT_NE(missing.rc, 0);
  EXPECT_NE(missing.out.find("no_such_config.json"), std::string::npos) << missing.out;
  auto usage = run(bin() + " train");
  EXPECT_EQ(usage.rc, 2) << usage.out;
  auto unknown = run(bin() + " frobnicate");
  EXPECT_EQ(unknown.rc, 2) << unknown.out;

  // a truncated shard and a shard with a wrong magic
  fs::create_directories(dir + "/broken");
  const std::string good = list_shards(dir + "/data/val").front();
  std::string bytes = file_bytes(good);
  std::ofstream(dir + "/broken/trunc.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 7);
  auto t = run(bin() + " train " + tiny() + data + " --set data.val=" + dir + "/broken/trunc.bin --out " + dir + "/r1");
  EXPECT_NE(t.rc, 0);
  EXPECT_NE(t.out.find("trunc.bin"), std::string::npos) << t.out;
  EXPECT_FALSE(fs::exists(dir + "/r1")) << "a run that could not start left a run directory behind";
  bytes[0] = 'X';
  std::ofstream(dir + "/broken/magic.bin", std::ios::binary) << bytes;
  auto m = run(bin() + " train " + tiny() + data + " --set data.val=" + dir + "/broken/magic.bin --out " + dir + "/r2");
  EXPECT_NE(m.rc, 0);
  EXPECT_NE(m.out.find("magic.bin"), std::string::npos) << m.out;
  EXPECT_NE(m.out.find("magic"), std::string::npos) << m.out;
}

TEST(Train, HelpForEveryCommand) {
  for (const char* c : {"", "train ", "eval ", "info ", "data ", "generate "}) {
    auto r = run(bin() + " " + c + "--help");
    EXPECT_EQ(r.rc, 0) << c;
    EXPECT_NE(r.out.find("usage"), std::string::npos) << c;
  }
}

}  // namespace
}  // namespace dmat
