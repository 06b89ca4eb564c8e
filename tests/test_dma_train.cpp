// A DMA model trains end to end on the CPU through the CLI: the tiny config with attention "dma" and
// a window below the sequence length (selection active), on the bundled corpus.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "test_util.h"

namespace dmat {
namespace {

using test::read_jsonl;
using test::run;

TEST(DmaTrain, TinyDmaModelLearnsOnCpu) {
  const std::string dir = test::temp_dir("dma_train");
  const std::string bin = test::dmatrain_bin();
  auto p = run(bin + " data prepare --tokenizer byte --val-fraction 0.03 --out " + dir + "/data " +
               test::source_dir() + "/data/english");
  ASSERT_EQ(p.rc, 0) << p.out;
  // Two threads (ctest runs suites in parallel), device cpu (this is the cpu label). seq_len 128,
  // window 32: most queries keep 32 of their keys.
  const std::string args =
      " train " + test::source_dir() + "/configs/tiny.json --set run.threads=2 --set run.device=cpu" +
      " --set data.train=" + dir + "/data/train --set data.val=" + dir + "/data/val" +
      " --set model.attention.type=dma --set model.attention.window=32 --set train.steps=30" +
      " --set train.batch_size=4 --set run.log_interval=1 --set train.eval_interval=30 --set train.eval_batches=2" +
      " --set train.checkpoint_interval=30 --out " + dir + "/run";
  auto r = run(bin + args);
  ASSERT_EQ(r.rc, 0) << r.out;

  std::vector<double> loss;
  double val = -1;
  for (auto& row : read_jsonl(dir + "/run/metrics.jsonl")) {
    if (row.contains("loss")) loss.push_back(row["loss"].get<double>());
    if (row.contains("val_loss")) val = row["val_loss"].get<double>();
  }
  ASSERT_EQ(loss.size(), 30u);
  for (double l : loss) ASSERT_TRUE(std::isfinite(l));
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += loss[size_t(i)] / 5, last += loss[loss.size() - 1 - size_t(i)] / 5;
  std::printf("DMA tiny: mean loss of steps 1-5 %.4f, of steps 26-30 %.4f, validation %.4f\n", first, last, val);
  EXPECT_LT(last, first - 1.0) << "the loss should fall well within 30 steps (byte model starts near ln 257 = 5.55)";
  EXPECT_TRUE(std::isfinite(val) && val > 0 && val < first);

  // The checkpoint holds DMA's parameters under Hugging Face Doge's names, and A has moved off 0.
  SafetensorsFile f(dir + "/run/checkpoints/step_00000030/model.safetensors");
  ASSERT_TRUE(f.has("model.layers.0.self_attn.dt_proj.weight"));
  const Tensor& A = f.get("model.layers.1.self_attn.A");
  ASSERT_EQ(A.numel(), 2);
  EXPECT_NE(A.as<float>()[0], 0.0f);
}

}  // namespace
}  // namespace dmat
