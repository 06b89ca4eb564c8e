// The CUDA backend end to end (ctest label gpu; skipped without a GPU): the bf16 model tracks the
// CPU fp32 model step by step, training is bitwise repeatable, and resume is bit-exact on the GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "kernels/cuda/device_info.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "test_util.h"

namespace dmat {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible"

// head_dim 64 (a flash-attention kernel size), GQA, two layers; Doge options switchable.
ModelConfig small_model() {
  ModelConfig c;
  c.vocab_size = 97;
  c.d_model = 128;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 64;
  c.ffn_dim = 320;
  return c;
}

// A learnable synthetic stream: x_{t+1} = (3·x_t + 1) mod V, with 10% of tokens replaced by random
// ones. The rule is a fixed bigram map, so even 20 small steps take the loss well below ln V
// (CPU fp32: 4.63 → 0.34 at lr 3e-3), while the random tokens keep attention and every op busy.
// (At lr 1e-2 the descent has a sharp transition whose timing differs between bf16 and fp32 by a
// step: max |Δ| 0.31 on the H200, a chaotic difference, not a kernel error; hence 3e-3.)
void batch(std::vector<int32_t>& x, std::vector<int32_t>& y, int64_t B, int64_t T, int64_t V, uint64_t seed) {
  Rng r(seed);
  x.resize(B * T);
  y.resize(B * T);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> s(T + 1);
    int64_t next = int64_t(r.below(uint64_t(V)));
    for (int64_t t = 0; t <= T; ++t) {
      s[t] = r.uniform() < 0.1 ? int32_t(r.below(uint64_t(V))) : int32_t(next);
      next = (3 * s[t] + 1) % V;
    }
    for (int64_t t = 0; t < T; ++t) {
      x[b * T + t] = s[t];
      y[b * T + t] = s[t + 1];
    }
  }
}

std::vector<double> train_losses(const ModelConfig& mc, Device dev, int steps, int64_t B, int64_t T) {
  TrainConfig tc;
  tc.lr = 3e-3;
  tc.steps = steps;
  tc.schedule = "constant";
  tc.weight_decay = 0.1;
  Model m(mc, dev == Device::CUDA ? DType::BF16 : DType::F32, dev);
  m.init_weights(11);
  AdamW opt(m, tc);
  std::vector<double> losses;
  std::vector<int32_t> x, y;
  for (int s = 0; s < steps; ++s) {
    m.zero_grad();
    double loss = 0;
    for (int micro = 0; micro < 2; ++micro) {  // two micro-steps: fp32 gradient accumulation on the GPU
      batch(x, y, B, T, mc.vocab_size, 1000 + 2 * s + micro);
      loss += m.forward(x.data(), y.data(), B, T, 1.0 / double(2 * B * T));
      m.backward();
    }
    opt.clip();
    opt.step(learning_rate(tc, s + 1));
    losses.push_back(loss / double(2 * B * T));
  }
  return losses;
}

// Tolerance: the GPU keeps weights and activations in bf16 (8-bit mantissa, relative rounding
// 2^-9 ≈ 0.2% per stored value) with fp32 accumulation; the CPU run is fp32 throughout. After 20
// AdamW steps the two trajectories differ by the accumulated effect of those roundings on the
// updates. Measured on an H200: max |Δloss| 0.002 (plain) and 0.009 (QK-norm +
// residual scales) nats over 20 steps;
// we allow kTrackNats = 0.02 nats absolute (about twice the largest measured) and require the GPU run
// to learn as much as the CPU run (within 5%).
// A wrong kernel (a dropped term, a transposed operand, a missing scale) moves the loss by far more.
constexpr double kTrackNats = 0.02;

TEST(GpuTrain, TwentyStepsTrackTheCpuFp32Run) {
  SKIP_WITHOUT_GPU();
  for (bool doge : {false, true}) {
    ModelConfig mc = small_model();
    mc.qk_norm = doge;
    mc.residual_scale = doge;
    const auto cpu = train_losses(mc, Device::CPU, 20, 4, 96);
    const auto gpu = train_losses(mc, Device::CUDA, 20, 4, 96);
    double worst = 0;
    for (size_t i = 0; i < cpu.size(); ++i) {
      worst = std::max(worst, std::abs(cpu[i] - gpu[i]));
      EXPECT_NEAR(gpu[i], cpu[i], kTrackNats) << "step " << i + 1 << (doge ? " (qk_norm, residual_scale)" : "");
    }
    const double learned_cpu = cpu.front() - cpu.back(), learned_gpu = gpu.front() - gpu.back();
    EXPECT_GT(learned_cpu, 0.3) << "the synthetic task should be learnable in 20 steps";
    EXPECT_NEAR(learned_gpu, learned_cpu, 0.05 * learned_cpu);
    std::cout << (doge ? "doge" : "plain") << ": loss " << cpu.front() << " -> cpu " << cpu.back() << " / gpu "
              << gpu.back() << ", max |Δ| " << worst << "\n";
  }
}

TEST(GpuTrain, SlidingWindowTracksTheCpuRun) {
  SKIP_WITHOUT_GPU();
  ModelConfig mc = small_model();
  mc.attention.type = "swa";
  mc.attention.swa.window = 24;
  const auto cpu = train_losses(mc, Device::CPU, 10, 4, 96);
  const auto gpu = train_losses(mc, Device::CUDA, 10, 4, 96);
  double worst = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    worst = std::max(worst, std::abs(cpu[i] - gpu[i]));
    EXPECT_NEAR(gpu[i], cpu[i], kTrackNats) << "step " << i + 1;  // the plain model's argument: a window changes no rounding
  }
  std::cout << "swa: max |Δ| " << worst << "\n";
}

// Dynamic Mask Attention (w = 24 of T = 96 keys; 10 steps, both bias forms): A starts at 0, so the
// first steps run with every bias tied (the lists overflow and the kernels visit every causal key),
// then A moves and the selection becomes real. The GPU computes the bias from bf16 values, so a key
// whose bias sits at a query's threshold may be kept on one device and dropped on the other; such
// flips move a loss by far less than the tolerance (same as the plain model's, 0.05 nats).
TEST(GpuTrain, DynamicMaskTracksTheCpuRun) {
  SKIP_WITHOUT_GPU();
  for (const char* form : {"exp", "linear"}) {
    ModelConfig mc = small_model();
    mc.attention.type = "dma";
    mc.attention.dma.window = 24;
    mc.attention.dma.bias_form = form;
    const auto cpu = train_losses(mc, Device::CPU, 10, 4, 96);
    const auto gpu = train_losses(mc, Device::CUDA, 10, 4, 96);
    double worst = 0;
    for (size_t i = 0; i < cpu.size(); ++i) {
      worst = std::max(worst, std::abs(cpu[i] - gpu[i]));
      EXPECT_NEAR(gpu[i], cpu[i], 0.05) << form << " step " << i + 1;
    }
    std::cout << "dma " << form << ": loss " << cpu.front() << " -> cpu " << cpu.back() << " / gpu " << gpu.back()
              << ", max |Δ| " << worst << "\n";
    const auto again = train_losses(mc, Device::CUDA, 3, 4, 96);
    for (size_t i = 0; i < again.size(); ++i) EXPECT_EQ(again[i], gpu[i]) << form << " repeat, step " << i + 1;
  }
}

TEST(GpuTrain, TrainingIsBitwiseRepeatable) {
  SKIP_WITHOUT_GPU();
  ModelConfig mc = small_model();
  const auto a = train_losses(mc, Device::CUDA, 5, 4, 96);
  const auto b = train_losses(mc, Device::CUDA, 5, 4, 96);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i + 1;
}

TEST(GpuTrain, RecomputationIsBitIdenticalOnTheGpu) {
  SKIP_WITHOUT_GPU();
  ModelConfig mc = small_model();
  mc.qk_norm = true;
  Model a(mc, DType::BF16, Device::CUDA), r(mc, DType::BF16, Device::CUDA, true);
  a.init_weights(3);
  r.init_weights(3);
  std::vector<int32_t> x, y;
  batch(x, y, 2, 80, mc.vocab_size, 9);
  EXPECT_EQ(a.forward(x.data(), y.data(), 2, 80, 1e-2), r.forward(x.data(), y.data(), 2, 80, 1e-2));
  a.backward();
  r.backward();
  Arena ga = a.grads().like(Device::CPU), gr = r.grads().like(Device::CPU);
  ga.copy_from(a.grads());
  gr.copy_from(r.grads());
  EXPECT_EQ(0, std::memcmp(ga.flat().data, gr.flat().data, ga.bytes()));
}

// The LM head runs in row chunks on the GPU; a vocabulary large enough for several chunks must give
// the same loss as the CPU (within bf16 tolerance), and backward must take every chunk's logits
// gradient into the head's weight gradient and back into the network. Gradients: the CPU sums in
// fp32 from fp32 values, the GPU in fp32 from bf16 weights and activations (2^-9 relative rounding
// each), so every gradient tensor agrees to relative L2 ≤ 2e-2; a chunk left out of backward drops a
// third of the head's gradient sum (relative L2 ≈ 0.33).
TEST(GpuTrain, ChunkedHeadMatchesCpuLoss) {
  SKIP_WITHOUT_GPU();
  ModelConfig mc = small_model();
  mc.vocab_size = 70000;  // 2^27 / 70000 = 1917 rows per chunk: 3 chunks for 4·1200 rows
  Model c(mc), g(mc, DType::BF16, Device::CUDA);
  c.init_weights(4);
  g.init_weights(4);
  std::vector<int32_t> x, y;
  batch(x, y, 4, 1200, mc.vocab_size, 5);
  y[7] = -1;  // ignored target
  int64_t nc = 0, ng = 0;
  const double lc = c.forward(x.data(), y.data(), 4, 1200, 1.0, &nc);
  const double lg = g.forward(x.data(), y.data(), 4, 1200, 1.0, &ng);
  EXPECT_EQ(nc, ng);
  EXPECT_NEAR(lg / double(ng), lc / double(nc), 0.01);  // ln(70000) ≈ 11.2; bf16 logits: ~0.1% relative
  c.backward();
  g.backward();
  Arena gg = g.grads().like(Device::CPU);
  gg.copy_from(g.grads());
  const auto& specs = c.grads().specs();
  for (size_t i = 0; i < specs.size(); ++i) {
    const Tensor a = c.grads().get(int(i)), b = gg.get(int(i));
    double d2 = 0, r2 = 0;
    for (int64_t k = 0; k < a.numel(); ++k) {
      const double r = a.as<float>()[k], d = double(b.as<float>()[k]) - r;
      d2 += d * d;
      r2 += r * r;
    }
    ASSERT_GT(r2, 0) << specs[i].name << ": the CPU gradient is zero";
    EXPECT_LT(std::sqrt(d2 / r2), 2e-2) << specs[i].name << ": GPU gradient vs CPU, relative L2";
  }
}

TEST(GpuTrain, ResumeIsBitExactOnTheGpu) {
  SKIP_WITHOUT_GPU();
  test::expect_resume_bit_exact("gpu_resume", "configs/tiny.json",
                                " --set run.device=cuda --set model.head_dim=64 --set model.n_heads=2 "
                                "--set model.n_kv_heads=1");
}

// Multi-head Latent Attention (DeepSeek-V2/V3) on the GPU: the core on the flash kernels' (192, 128)
// path (nope 128 + rope 64 q/k dims, 128 value dims), a latent of rank 32 of d 128.
ModelConfig mla_model(int64_t q_rank) {
  ModelConfig c = small_model();
  c.n_kv_heads = c.n_heads;
  c.attention.type = "mla";
  c.attention.mla = {.kv_rank = 32, .q_rank = q_rank, .rope_dim = 64, .nope_dim = 128, .v_dim = 128};
  return c;
}

// 20 steps against the CPU fp32 run, without and with query compression, with the tolerance of the
// plain model (kTrackNats; the same bf16 storage and fp32 accumulation, nothing MLA adds changes the
// argument: its new op copies and rotates, and the rotary key's gradient sums the heads in fp32).
// Then 3 more GPU steps repeat the first 3 bit for bit.
TEST(GpuTrain, MultiHeadLatentAttentionTracksTheCpuRun) {
  SKIP_WITHOUT_GPU();
  for (int64_t q_rank : {0, 48}) {
    const ModelConfig mc = mla_model(q_rank);
    const auto cpu = train_losses(mc, Device::CPU, 20, 4, 96);
    const auto gpu = train_losses(mc, Device::CUDA, 20, 4, 96);
    double worst = 0;
    for (size_t i = 0; i < cpu.size(); ++i) {
      worst = std::max(worst, std::abs(cpu[i] - gpu[i]));
      EXPECT_NEAR(gpu[i], cpu[i], kTrackNats) << "q_rank " << q_rank << " step " << i + 1;
    }
    const double learned_cpu = cpu.front() - cpu.back(), learned_gpu = gpu.front() - gpu.back();
    EXPECT_GT(learned_cpu, 0.3) << "the synthetic task should be learnable in 20 steps";
    EXPECT_NEAR(learned_gpu, learned_cpu, 0.05 * learned_cpu) << "q_rank " << q_rank;
    std::cout << "mla q_rank " << q_rank << ": loss " << cpu.front() << " -> cpu " << cpu.back() << " / gpu "
              << gpu.back() << ", max |Δ| " << worst << "\n";
    const auto again = train_losses(mc, Device::CUDA, 3, 4, 96);
    for (size_t i = 0; i < again.size(); ++i) EXPECT_EQ(again[i], gpu[i]) << "q_rank " << q_rank << " repeat " << i + 1;
  }
}

TEST(GpuTrain, MultiHeadLatentAttentionResumeIsBitExact) {
  SKIP_WITHOUT_GPU();
  test::expect_resume_bit_exact("gpu_resume_mla", "configs/tiny.json",
                                " --set run.device=cuda --set model.n_heads=2 --set model.n_kv_heads=0" +
                                                std::string(R"( --set 'model.attention={"type":"mla","kv_rank":32,)") +
                                                R"("q_rank":48,"rope_dim":64,"nope_dim":128,"v_dim":128}')");
}

// A head size without a CUDA attention kernel is refused before anything is written.
TEST(GpuTrain, UnsupportedHeadDimIsRefusedUpFront) {
  SKIP_WITHOUT_GPU();
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("gpu_bad_head");
  const std::string cfg = test::source_dir() + "/configs/tiny.json --set run.device=cuda --set model.head_dim=48" +
                          test::prepare_bundled_data(dir);
  auto r = test::run(test::dmatrain_bin() + " train " + cfg + " --out " + dir + "/run");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("model.head_dim 48 has no CUDA attention kernel"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir + "/run")) << "the run directory was created";
}

// MLA whose core has no CUDA kernel (nope 96 + rope 64 = 160 q·k dims with 128 value dims) is
// refused before anything is written, naming the keys.
TEST(GpuTrain, MlaHeadDimsWithoutAKernelAreRefusedUpFront) {
  SKIP_WITHOUT_GPU();
  namespace fs = std::filesystem;
  const std::string dir = test::temp_dir("gpu_bad_mla");
  const std::string cfg = test::source_dir() + "/configs/tiny.json --set run.device=cuda --set model.n_kv_heads=0" +
                          R"( --set 'model.attention={"type":"mla","kv_rank":32,"nope_dim":96,"v_dim":128}')" +
                          test::prepare_bundled_data(dir);
  auto r = test::run(test::dmatrain_bin() + " train " + cfg + " --out " + dir + "/run");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("model.attention.nope_dim + rope_dim = 96 + 64 (q·k dims) with model.attention.v_dim = 128 "
                       "has no CUDA attention kernel"),
            std::string::npos)
      << r.out;
  EXPECT_FALSE(fs::exists(dir + "/run")) << "the run directory was created";
}

}  // namespace
}  // namespace dmat
