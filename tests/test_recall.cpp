// Recall evaluations end to end through the CLI on tiny MQAR data (`data mqar`): the training loss
// is the mean over the answers only (the loss mask), whatever the split into micro-batches, and
// `eval` reports the answer accuracy (exact match per query) that an independent count over the
// logits gives. `generate` streams the tokens that greedy decoding with the model's caches picks,
// from token ids (MQAR) and from text (the byte tokenizer of the bundled corpus).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "data/loader.h"
#include "data/shard.h"
#include "io/checkpoint_dir.h"
#include "model/model.h"
#include "test_util.h"
#include "train/checkpoint.h"

namespace dmat {
namespace {

using test::run;
std::string bin() { return test::dmatrain_bin(); }

// Tiny MQAR data (vocab 32, 3 pairs, 16 tokens; 64 train and 16 test examples) and a config
// training a 1-layer model on it (init_std 0.5: per-position losses differ visibly at step 1).
std::string setup(const std::string& dir) {
  auto r = run(bin() + " data mqar --out " + dir + "/data --vocab 32 --pairs 3 --seq-len 16 --train-examples 64 " +
               "--test-examples 16 --seed 5");
  EXPECT_EQ(r.rc, 0) << r.out;
  const nlohmann::json cfg = {
      {"model",
       {{"vocab_size", 32}, {"d_model", 16}, {"n_layers", 1}, {"n_heads", 2}, {"head_dim", 8}, {"init_std", 0.5},
        {"attention", {{"type", "mha"}}}}},
      {"train",
       {{"steps", 1}, {"seed", 9}, {"batch_size", 4}, {"seq_len", 16}, {"lr", 1e-3}, {"eval_interval", 0}}},
      {"data", {{"train", dir + "/data/train"}, {"val", dir + "/data/test"}}},
      {"run", {{"name", "recall"}, {"device", "cpu"}, {"threads", 2}, {"log_interval", 1}}}};
  std::ofstream(dir + "/mqar.json") << cfg.dump(2);
  return dir + "/mqar.json";
}

TEST(Recall, TrainingLossIsTheMeanOverTheAnswers) {
  const std::string dir = test::temp_dir("recall_loss");
  const std::string cfg_path = setup(dir);
  auto r = run(bin() + " train " + cfg_path + " --out " + dir + "/run");
  ASSERT_EQ(r.rc, 0) << r.out;
  const double logged = test::metric_column(dir + "/run", "loss").at(1);
  // the same micro-batch of 4, split into 2 micro-batches of 2: the same update-wide mean
  r = run(bin() + " train " + cfg_path + " --out " + dir + "/run2 --set train.batch_size=2 --set train.grad_accum=2");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NEAR(test::metric_column(dir + "/run2", "loss").at(1), logged, 1e-6 * logged);

  // independently: the initial model's loss on the first training batch, over the answers only
  const Config cfg = load_config(cfg_path);
  Model m(cfg.model, DType::F32, Device::CPU);
  m.init_weights(cfg.train.seed);
  TokenLoader L(list_shards(cfg.data.train), 16, cfg.train.seed, true);
  ASSERT_TRUE(L.has_mask());
  std::vector<int32_t> x(4 * 16), y(4 * 16), all(4 * 16);
  L.get_batch(0, 4, x.data(), y.data());
  int64_t answers = 0;
  const double masked = m.forward(x.data(), y.data(), 4, 16, 0.0, &answers);
  EXPECT_EQ(answers, 4 * 3);
  EXPECT_NEAR(logged, masked / double(answers), 1e-5 * logged);
  // ... which is not the mean over every next token of those sequences
  for (int64_t b = 0; b < 4; ++b)
    for (int64_t t = 0; t < 16; ++t) all[size_t(b * 16 + t)] = t + 1 < 16 ? x[size_t(b * 16 + t + 1)] : -1;
  int64_t n_all = 0;
  const double every = m.forward(x.data(), all.data(), 4, 16, 0.0, &n_all);
  EXPECT_GT(std::abs(every / double(n_all) - logged), 0.01);
}

TEST(Recall, EvalReportsTheAnswerAccuracy) {
  const std::string dir = test::temp_dir("recall_eval");
  const std::string cfg_path = setup(dir);
  auto r = run(bin() + " train " + cfg_path + " --out " + dir + "/run --set train.steps=20 --set train.lr=1e-2");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("val accuracy"), std::string::npos) << r.out;
  EXPECT_TRUE(test::read_jsonl(dir + "/run/metrics.jsonl").back().contains("val_accuracy"));
  r = run(bin() + " eval " + dir + "/run --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out.substr(r.out.find("\n{") + 1));  // stdout's line after stderr's log
  EXPECT_EQ(j["step"].get<int64_t>(), 20);
  EXPECT_EQ(j["tokens"].get<int64_t>(), 16 * 3);  // every answer of the test set, nothing else
  const int64_t correct = j["correct"].get<int64_t>();
  EXPECT_DOUBLE_EQ(j["accuracy"].get<double>(), double(correct) / 48.0);

  // independently: the checkpoint's argmax at every answer of the test set
  const Config cfg = load_config(cfg_path);
  Model m(cfg.model, DType::F32, Device::CPU);
  load_model_weights(m, latest_checkpoint(dir + "/run")->path + "/model.safetensors");
  TokenLoader val(list_shards(cfg.data.val), 16, 0, false);
  int64_t hits = 0, answers = 0;
  double loss = 0;
  std::vector<int32_t> x(4 * 16), y(4 * 16);
  for (int64_t g = 0; g < 16; g += 4) {
    val.get_batch(g, 4, x.data(), y.data());
    loss += m.forward(x.data(), y.data(), 4, 16, 0.0);
    const Tensor lg = m.logits();
    for (int64_t row = 0; row < 4 * 16; ++row) {
      if (y[size_t(row)] < 0) continue;
      ++answers;
      const float* p = lg.as<float>() + row * 32;
      hits += std::max_element(p, p + 32) - p == y[size_t(row)];
    }
  }
  EXPECT_EQ(answers, 48);
  EXPECT_EQ(correct, hits);
  EXPECT_NEAR(j["loss"].get<double>(), loss / 48.0, 1e-9);
  r = run(bin() + " eval " + dir + "/run");
  EXPECT_NE(r.out.find("accuracy"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("of 48 targets"), std::string::npos) << r.out;
}

// The ids a generate run printed on stdout (the line of numbers after stderr's log lines).
std::vector<int32_t> printed_ids(const std::string& out) {
  std::vector<int32_t> ids;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != ' ') continue;
    std::istringstream w(line);
    int32_t id;
    while (w >> id) ids.push_back(id);
  }
  return ids;
}

TEST(Recall, GenerateStreamsWhatGreedyDecodingPicks) {
  const std::string dir = test::temp_dir("recall_generate");
  const std::string cfg_path = setup(dir);
  auto r = run(bin() + " train " + cfg_path + " --out " + dir + "/run --set train.steps=3");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::string gen = bin() + " generate " + dir + "/run --prompt-ids '1 17 2 20 1' --max-new-tokens 6";
  r = run(gen);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("6 new tokens"), std::string::npos) << r.out;
  const std::vector<int32_t> ids = printed_ids(r.out);
  ASSERT_EQ(ids.size(), 6u) << r.out;
  // the Model API: the checkpoint, its caches, argmax after each step
  const Config cfg = load_config(cfg_path);
  Model m(cfg.model, DType::F32, Device::CPU);
  load_model_weights(m, latest_checkpoint(dir + "/run")->path + "/model.safetensors");
  auto st = m.start_decode(11);
  const std::vector<int32_t> prompt = {1, 17, 2, 20, 1};
  std::vector<double> logits = m.decode(*st, prompt.data(), 5);
  for (int k = 0; k < 6; ++k) {
    const int32_t next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(ids[size_t(k)], next) << k;
    if (k < 5) logits = m.decode(*st, &next, 1);
  }
  // sampling: the same seed, the same tokens
  r = run(gen + " --temperature 1 --top-k 8 --seed 3");
  auto again = run(gen + " --temperature 1 --top-k 8 --seed 3");
  EXPECT_EQ(printed_ids(r.out), printed_ids(again.out));
  // refusals naming the way out
  r = run(bin() + " generate " + dir + "/run --prompt 'abc'");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("--prompt-ids"), std::string::npos) << r.out;
  r = run(gen + " --step 999");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("no complete checkpoint of step 999 (steps: 3)"), std::string::npos) << r.out;
  r = run(bin() + " generate " + dir + "/run --prompt-ids '1 40'");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("outside the model's vocabulary"), std::string::npos) << r.out;
}

TEST(Recall, GenerateTextWithTheRunsTokenizer) {
  const std::string dir = test::temp_dir("recall_generate_text");
  const std::string data = test::prepare_bundled_data(dir);
  auto r = run(bin() + " train " + test::source_dir() + "/configs/tiny.json --set run.threads=2 --set run.device=cpu" +
               data + " --out " + dir + "/run --set train.steps=3 --set train.eval_interval=0 --set train.eval_batches=1");
  ASSERT_EQ(r.rc, 0) << r.out;
  // the byte tokenizer from the data manifest; 40 new bytes at most (less after an end of document)
  r = run(bin() + " generate " + dir + "/run --prompt 'The cat ' --max-new-tokens 40 --temperature 0.8 --seed 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("generate: 8 prompt tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos) << r.out;
  r = run(bin() + " generate " + dir + "/run --prompt 'x' --tokenizer no-such.json");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("no-such.json"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dmat
