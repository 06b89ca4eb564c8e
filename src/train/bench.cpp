#include "train/bench.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "kernels/cuda/device_info.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "train/info.h"
#include "train/trainer.h"

#ifdef DMAT_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/context.h"
#include "kernels/cuda/profile.h"
#endif

namespace dmat {
namespace {

using Clock = std::chrono::steady_clock;

void device_sync(Device d) {
#ifdef DMAT_WITH_CUDA
  if (d == Device::CUDA) cuda::synchronize();
#endif
}

// Bytes in use on the device (total − free): the whole process's footprint, context included.
int64_t device_used_bytes(Device d) {
#ifdef DMAT_WITH_CUDA
  if (d == Device::CUDA) {
    size_t free_b = 0, total_b = 0;
    DMAT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return int64_t(total_b - free_b);
  }
#endif
  return 0;
}

double gib(int64_t b) { return double(b) / double(1ull << 30); }

}  // namespace

void bench_train(const Config& cfg, const TrainBenchOptions& opt, std::ostream& out) {
  const Device device = pick_device(cfg.run);
  set_cpu_threads(cfg.run.threads);
  const auto& tc = cfg.train;
  const int64_t B = tc.batch_size, T = tc.seq_len, V = cfg.model.vocab_size, N = B * T;
#ifdef DMAT_WITH_CUDA
  if (device == Device::CUDA) cuda::stream();  // create the context before the baseline
#endif
  device_sync(device);
  const int64_t base = device_used_bytes(device);

  std::unique_ptr<Model> model = make_model(cfg, device);
  model->init_weights(tc.seed);
  AdamW adam(*model, tc);
  const ModelCounts counts = count_model(cfg.model, T);

  // Synthetic tokens: a few different micro-batches, uniform over the vocabulary.
  const int64_t nb = 4;
  std::vector<std::vector<int32_t>> xs(nb, std::vector<int32_t>(N)), ys(nb, std::vector<int32_t>(N));
  Rng r(tc.seed);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < N; ++i) {
      xs[b][i] = int32_t(r.below(uint64_t(V)));
      ys[b][i] = int32_t(r.below(uint64_t(V)));
    }
  const double grad_scale = 1.0 / double(N * tc.grad_accum);
  int64_t k = 0;
  double t_fwd = 0, t_bwd = 0, t_opt = 0, last_loss = 0;
  // One optimizer step; with `split`, synchronise between phases to time them (slightly slower).
  auto step = [&](bool split) {
    model->zero_grad();
    double loss = 0;
    for (int64_t m = 0; m < tc.grad_accum; ++m, ++k) {
      auto t0 = Clock::now();
      loss += model->forward(xs[k % nb].data(), ys[k % nb].data(), B, T, grad_scale);
      if (split) device_sync(device);
      auto t1 = Clock::now();
      model->backward();
      if (split) device_sync(device);
      auto t2 = Clock::now();
      t_fwd += std::chrono::duration<double>(t1 - t0).count();
      t_bwd += std::chrono::duration<double>(t2 - t1).count();
    }
    auto t2 = Clock::now();
    adam.clip();
    adam.step(learning_rate(tc, 1 + adam.steps_done()));
    if (split) device_sync(device);
    t_opt += std::chrono::duration<double>(Clock::now() - t2).count();
    last_loss = loss / double(N * tc.grad_accum);
  };

  for (int64_t i = 0; i < opt.warmup; ++i) step(false);
  device_sync(device);
  const int64_t peak = device_used_bytes(device) - base;

#ifdef DMAT_WITH_CUDA
  const bool prof = device == Device::CUDA && cuda::profiling();
  if (prof) cuda::profile_report();  // drop the warm-up's records
#endif
  auto t0 = Clock::now();
  for (int64_t i = 0; i < opt.steps; ++i) step(false);
  device_sync(device);
#ifdef DMAT_WITH_CUDA
  // DMAT_PROFILE: GPU time per op and step (the ops' events slow the timed steps slightly).
  std::string profile;
  if (prof) {
    double total = 0;
    const auto rows = cuda::profile_report();
    for (const auto& r : rows) total += r.detail ? 0.0 : r.ms;
    profile += fmt::format("  GPU time per step by op (DMAT_PROFILE; {:.2f} ms in ops):\n", total / double(opt.steps));
    bool header = false;
    for (const auto& r : rows) {
      if (r.detail && !header) {
        profile += "  of which GEMMs by shape (M×N×K, transposes, C type; DMAT_PROFILE=gemm):\n";
        header = true;
      }
      const double ms = r.ms / double(opt.steps);
      profile += fmt::format("    {:<22} {:8.3f} ms {:5.1f}%  ({} calls)", r.name, ms, 100.0 * r.ms / std::max(total, 1e-9),
                             r.calls / opt.steps);
      if (r.flops > 0) profile += fmt::format("  {:.0f} TFLOP/s", r.flops / (r.ms * 1e-3) / 1e12);
      profile += "\n";
    }
  }
#endif
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count() / double(opt.steps);
  t_fwd = t_bwd = t_opt = 0;
  const int64_t split_steps = std::max<int64_t>(1, opt.steps / 2);
  for (int64_t i = 0; i < split_steps; ++i) step(true);

  const double tokens = double(N * tc.grad_accum);
  const double tps = tokens / dt;
  const double peak_flops = device == Device::CUDA ? cuda::peak_bf16_flops(0) : 0.0;
  const double mfu = peak_flops > 0 ? tps * counts.flops_per_token / peak_flops : 0.0;
  const MemoryEstimate est = estimate_memory(cfg, device);
  const double ss = double(split_steps);

  out << fmt::format("bench: {} on {}\n", cfg.run.name,
                     device == Device::CUDA ? cuda::device_summary(0) : std::string("cpu"));
  out << fmt::format("  model: {} parameters, micro-batch {}×{}, grad_accum {}, {}{}\n", counts.total, B, T,
                     tc.grad_accum, cfg.model.attention.type, tc.recompute ? ", recompute" : "");
  out << fmt::format("  step {:.2f} ms, {:.0f} tokens/s", dt * 1e3, tps);
  if (peak_flops > 0)
    out << fmt::format(", MFU {:.1f}% ({} = {:.4g} FLOPs/token against {:.0f} TFLOP/s)", 100 * mfu,
                       counts.flops_convention, counts.flops_per_token, peak_flops / 1e12);
  out << "\n";
  out << fmt::format("  split (synchronised steps): forward + LM head backward {:.2f} ms, backward {:.2f} ms, "
                     "clip + AdamW {:.2f} ms\n",
                     t_fwd / ss * 1e3, t_bwd / ss * 1e3, t_opt / ss * 1e3);
  if (device == Device::CUDA)
    out << fmt::format("  memory: {:.3f} GiB used by the run (device total − free, beyond the CUDA context); "
                       "predicted {:.3f} GiB ({:+.1f}%)\n",
                       gib(peak), gib(est.total()), 100.0 * (double(est.total()) / double(std::max<int64_t>(peak, 1)) - 1));
#ifdef DMAT_WITH_CUDA
  out << profile;
#endif
  nlohmann::json j = {{"bench", "train"},
                      {"config", cfg.run.name},
                      {"device", device == Device::CUDA ? cuda::device_summary(0) : "cpu"},
                      {"params", counts.total},
                      {"batch", B},
                      {"seq", T},
                      {"grad_accum", tc.grad_accum},
                      {"attention", cfg.model.attention.type},
                      {"recompute", tc.recompute},
                      {"step_ms", dt * 1e3},
                      {"tokens_per_s", tps},
                      {"mfu", peak_flops > 0 ? nlohmann::json(mfu) : nlohmann::json(nullptr)},
                      {"fwd_ms", t_fwd / ss * 1e3},
                      {"bwd_ms", t_bwd / ss * 1e3},
                      {"opt_ms", t_opt / ss * 1e3},
                      {"mem_used_gib", gib(peak)},
                      {"mem_predicted_gib", gib(est.total())},
                      {"loss", last_loss}};
  out << j.dump() << "\n";
}

}  // namespace dmat
