#include "train/trainer.h"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>

#include <spdlog/spdlog.h>

#include "core/log.h"
#include "io/checkpoint_dir.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "train/checkpoint.h"
#include "train/info.h"
#include "kernels/cuda/device_info.h"

namespace dmat {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_signal{0};
extern "C" void on_signal(int sig) { g_signal.store(sig); }

// SIGINT/SIGTERM set g_signal while training runs; the defaults come back however train() exits.
struct SignalGuard {
  SignalGuard() {
    g_signal.store(0);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
  }
  ~SignalGuard() {
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
  }
};

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = std::llround(s);
  return fmt::format("{}:{:02d}:{:02d}", t / 3600, (t / 60) % 60, t % 60);
}

std::string si(double x) {
  if (x >= 1e9) return fmt::format("{:.2f}G", x / 1e9);
  if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
  if (x >= 1e3) return fmt::format("{:.1f}K", x / 1e3);
  return fmt::format("{:.0f}", x);
}

}  // namespace

Device pick_device(const std::string& d) {
  if (d == "cpu") return Device::CPU;
  const int n = cuda::device_count();
  if (d == "cuda" && n == 0)
    fail("config: run.device is \"cuda\", but {} (use \"cpu\" or \"auto\")",
         cuda::cuda_built() ? "no CUDA device is visible" : "this build has no CUDA backend (configure with -DDMAT_CUDA=ON)");
  return n > 0 ? Device::CUDA : Device::CPU;
}

std::unique_ptr<Model> make_model(const Config& cfg, Device device) {
  auto m = std::make_unique<Model>(cfg.model, device == Device::CUDA ? DType::BF16 : DType::F32, device,
                                   cfg.train.recompute);
  m->set_deterministic(cfg.run.deterministic);
  return m;
}

namespace {

// Model changes that make a checkpoint unusable: any difference in the `model` section.
void check_resumable(const nlohmann::json& saved, const nlohmann::json& now, const std::string& ckpt) {
  const auto& a = saved.at("model");
  const auto& b = now.at("model");
  if (a != b) {
    std::string diff;
    for (auto& [k, v] : b.items())
      if (!a.contains(k) || a.at(k) != v)
        diff += fmt::format(" model.{}: {} -> {};", k, a.contains(k) ? a.at(k).dump() : "absent", v.dump());
    fail("--resume: the config changes the model, so checkpoint {} cannot be continued:{} start a new run "
         "(another --out) or restore the model settings",
         ckpt, diff);
  }
  for (const char* k : {"seed", "seq_len"})
    if (saved.at("train").at(k) != now.at("train").at(k))
      spdlog::warn("--resume: train.{} changed from {} to {}: the data order after step {} differs from the "
                   "original run's",
                   k, saved.at("train").at(k).dump(), now.at("train").at(k).dump(), "the checkpoint");
}

// Keeps metrics rows up to `step`; rows from after it (the part of an interrupted run that is
// about to be redone) move to metrics.superseded.jsonl, so nothing is lost.
void truncate_metrics(const std::string& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line, keep, drop;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    int64_t s = 0;
    try {
      s = nlohmann::json::parse(line).value("step", int64_t(0));
    } catch (...) {
      s = step + 1;  // unreadable rows are set aside, not deleted
    }
    (s <= step ? keep : drop) += line + "\n";
  }
  if (!drop.empty()) {
    std::ofstream(fs::path(path).replace_filename("metrics.superseded.jsonl"), std::ios::app) << drop;
    spdlog::info("moved metrics rows after step {} to metrics.superseded.jsonl", step);
  }
  write_file_atomic(path, keep);
}

}  // namespace

int set_cpu_threads(int64_t n) {
  const int t = n > 0 ? int(n) : omp_get_num_procs();
  omp_set_num_threads(t);
  return t;
}

// Full validation batches of B sequences; at least one is required.
static int64_t full_val_batches(const TokenLoader& val, int64_t B, const std::string& name) {
  const int64_t full = val.num_windows() / B;
  if (full == 0)
    fail("data: {} has {} windows of {} tokens, fewer than one batch of {} sequences: add validation data or lower "
         "train.batch_size",
         name, val.num_windows(), val.seq_len() + 1, B);
  return full;
}

EvalResult evaluate(Model& m, const TokenLoader& val, int64_t B, int64_t batches) {
  const int64_t T = val.seq_len();
  const int64_t full = full_val_batches(val, B, "validation set");
  const int64_t n = batches > 0 ? std::min(batches, full) : full;
  std::vector<int32_t> x(B * T), y(B * T);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    val.get_batch(i * B, B, x.data(), y.data());
    int64_t valid = 0;
    sum += m.forward(x.data(), y.data(), B, T, 0.0, &valid);
    count += valid;
  }
  EvalResult r;
  r.tokens = count;
  r.loss = count ? sum / double(count) : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  const auto& tc = cfg.train;
  const std::string run_dir = cfg.run.dir;
  const std::string metrics_path = run_dir + "/metrics.jsonl";

  // ---- data first: a config whose data cannot be read must not leave a run directory behind
  TokenLoader train_data(list_shards(cfg.data.train), tc.seq_len, tc.seed, /*shuffle=*/true);
  TokenLoader val_data(list_shards(cfg.data.val), tc.seq_len, tc.seed, /*shuffle=*/false);
  for (const TokenLoader* l : {&train_data, &val_data})
    if (int64_t(l->vocab_size()) > cfg.model.vocab_size)
      fail("data: shards have vocab size {} but model.vocab_size is {}: the model must cover the tokenizer's ids",
           l->vocab_size(), cfg.model.vocab_size);
  full_val_batches(val_data, tc.batch_size, "validation set " + cfg.data.val);
  const Device device = pick_device(cfg.run.device);

  // ---- run directory: never overwrite a user's run unless asked to continue it
  std::optional<CheckpointRef> ckpt;
  if (fs::exists(run_dir)) {
    ckpt = latest_checkpoint(run_dir);
    const bool has_run = fs::exists(run_dir + "/config.json") || fs::exists(metrics_path) || ckpt;
    if (has_run && !opt.resume)
      fail("run directory {} already holds a run: pass --resume to continue it, or choose another --out / run.name",
           run_dir);
  }
  fs::create_directories(run_dir);
  log_to_file(run_dir + "/train.log");
  spdlog::info("dmatrain train: run directory {}", run_dir);
  spdlog::info("resolved config:\n{}", cfg.resolved.dump(2));
  if (fs::exists(run_dir + "/config.json") && !ckpt) {
    // an earlier attempt that never reached a checkpoint: keep its files beside the new ones
    fs::rename(run_dir + "/config.json", run_dir + "/config.previous.json");
  }
  write_file_atomic(run_dir + "/config.json", cfg.resolved.dump(2) + "\n");

  const int threads = set_cpu_threads(cfg.run.threads);
  if (device == Device::CUDA)
    spdlog::info("backend: cuda ({}; bf16 weights and activations, fp32 master weights and gradients)",
                 cuda::device_summary(0));
  else
    spdlog::info("backend: cpu ({} threads)", threads);

  spdlog::info("data: train {} tokens ({} windows of {}), val {} tokens ({} windows)", train_data.total_tokens(),
               train_data.num_windows(), tc.seq_len + 1, val_data.total_tokens(), val_data.num_windows());

  // ---- model and optimizer
  std::unique_ptr<Model> model_ptr = make_model(cfg, device);
  Model& model = *model_ptr;
  model.init_weights(tc.seed);
  AdamW adam(model, tc);
  const ModelCounts counts = count_model(cfg.model, tc.seq_len);
  spdlog::info("model: {} parameters ({} without embeddings), {:.3g} FLOPs/token (6N + 6LTd)", counts.total,
               counts.non_embedding, counts.flops_per_token);
  // MFU against the device's dense bf16 peak (DESIGN.md convention); null where the peak is unknown.
  const double peak = device == Device::CUDA ? cuda::peak_bf16_flops(0) : 0.0;

  TrainState st;
  if (opt.resume) {
    if (ckpt) {
      check_resumable(checkpoint_config(ckpt->path), cfg.resolved, ckpt->path);
      st = load_checkpoint(ckpt->path, model, &adam);
      spdlog::info("resumed from {} (step {}, {} tokens)", ckpt->path, st.step, st.tokens);
      truncate_metrics(metrics_path, st.step);
    } else {
      spdlog::info("--resume: no complete checkpoint in {}, starting from step 0", run_dir);
      if (fs::exists(metrics_path)) truncate_metrics(metrics_path, 0);
    }
  }
  if (st.step >= tc.steps) spdlog::info("nothing to do: the run is at step {} of {}", st.step, tc.steps);

  std::ofstream metrics(metrics_path, std::ios::app);
  auto emit = [&](const nlohmann::json& row) {
    metrics << row.dump() << "\n";
    metrics.flush();
  };

  SignalGuard signals;

  const int64_t B = tc.batch_size, T = tc.seq_len, world = 1, rank = 0;
  const int64_t seqs_per_step = B * tc.grad_accum * world;
  const double grad_scale = 1.0 / double(B * T * tc.grad_accum * world);
  std::vector<int32_t> x(B * T), y(B * T);

  TrainResult res;
  res.run_dir = run_dir;
  auto t0 = std::chrono::steady_clock::now();
  const double elapsed0 = st.elapsed_s;
  auto elapsed = [&] {
    return elapsed0 + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  int64_t window_tokens = 0;
  double window_start = elapsed(), loss_acc = 0;
  int64_t loss_n = 0;
  int64_t last_ckpt = ckpt ? st.step : -1, last_eval = -1;

  auto run_eval = [&] {
    EvalResult ev = evaluate(model, val_data, B, tc.eval_batches);
    spdlog::info("eval step {}/{} | val loss {:.4f} | val ppl {:.3f} | {} tokens", st.step, tc.steps, ev.loss, ev.ppl,
                 ev.tokens);
    emit({{"step", st.step}, {"tokens", st.tokens}, {"val_loss", ev.loss}, {"ppl", ev.ppl}, {"time", elapsed()}});
    res.val_loss = ev.loss;
    res.val_ppl = ev.ppl;
    last_eval = st.step;
  };
  auto checkpoint = [&] {
    st.elapsed_s = elapsed();
    std::string dir = save_checkpoint(run_dir, model, adam, st, cfg.resolved, cfg.run.keep_checkpoints);
    spdlog::info("checkpoint {}", dir);
    last_ckpt = st.step;
  };

  while (st.step < tc.steps) {
    model.zero_grad();
    double step_loss = 0;
    for (int64_t micro = 0; micro < tc.grad_accum; ++micro) {
      const int64_t g0 = st.sequences + (micro * world + rank) * B;
      train_data.get_batch(g0, B, x.data(), y.data());
      step_loss += model.forward(x.data(), y.data(), B, T, grad_scale);
      model.backward();
    }
    step_loss /= double(B * T * tc.grad_accum);
    if (!std::isfinite(step_loss)) fail("training diverged: loss is {} at step {}", step_loss, st.step + 1);
    const double norm = adam.clip();
    const double lr = learning_rate(tc, st.step + 1);
    adam.step(lr);
    ++st.step;
    st.sequences += seqs_per_step;
    st.tokens += seqs_per_step * T;
    window_tokens += seqs_per_step * T;
    loss_acc += step_loss;
    ++loss_n;
    res.final_loss = step_loss;

    const bool last = st.step == tc.steps;
    if (st.step % cfg.run.log_interval == 0 || last || st.step == 1) {
      const double now = elapsed(), dt = std::max(1e-9, now - window_start);
      const double tps = double(window_tokens) / dt;
      const double eta = double(tc.steps - st.step) * double(seqs_per_step * T) / std::max(tps, 1e-9);
      spdlog::info("step {}/{} | loss {:.4f} | lr {:.3e} | grad norm {:.3f} | {} tok/s{} | elapsed {} | eta {}",
                   st.step, tc.steps, step_loss, lr, norm, si(tps),
                   peak > 0 ? fmt::format(" | MFU {:.1f}%", 100.0 * tps * counts.flops_per_token / peak) : "",
                   hms(now), hms(eta));
      emit({{"step", st.step}, {"tokens", st.tokens}, {"loss", step_loss}, {"loss_avg", loss_acc / double(loss_n)},
            {"lr", lr}, {"grad_norm", norm}, {"tokens_per_s", tps},
            {"mfu", peak > 0 ? nlohmann::json(tps * counts.flops_per_token / peak) : nlohmann::json(nullptr)},
            {"time", now}});
      window_tokens = 0;
      window_start = now;
      loss_acc = 0;
      loss_n = 0;
    }
    if ((tc.eval_interval > 0 && st.step % tc.eval_interval == 0) || last) run_eval();
    if ((tc.checkpoint_interval > 0 && st.step % tc.checkpoint_interval == 0) || last) checkpoint();
    if (opt.stop_at > 0 && st.step == opt.stop_at && !last) {
      if (last_ckpt != st.step) checkpoint();
      spdlog::info("stopping at step {} as asked (--stop-at); continue with --resume", st.step);
      res.steps = st.step;
      return res;
    }
    if (g_signal.load()) {
      spdlog::warn("signal {} received: writing a checkpoint at step {} and stopping", g_signal.load(), st.step);
      if (last_ckpt != st.step) checkpoint();
      fail("interrupted by signal {} at step {} (checkpoint written; continue with --resume)", g_signal.load(),
           st.step);
    }
  }
  if (last_eval != st.step) run_eval();
  res.steps = st.step;
  spdlog::info("done: {} steps, val loss {:.4f}, val perplexity {:.3f}", st.step, res.val_loss, res.val_ppl);
  return res;
}

EvalResult evaluate_run(const std::string& run_dir, int64_t batches) {
  auto ck = latest_checkpoint(run_dir);
  if (!ck) fail("eval: no complete checkpoint in {} (expected {}/checkpoints/step_*/COMPLETE)", run_dir, run_dir);
  Config cfg = parse_config(checkpoint_config(ck->path), run_dir);
  set_cpu_threads(cfg.run.threads);
  std::unique_ptr<Model> model = make_model(cfg, pick_device(cfg.run.device));
  load_checkpoint(ck->path, *model, nullptr);
  TokenLoader val(list_shards(cfg.data.val), cfg.train.seq_len, cfg.train.seed, false);
  spdlog::info("eval: checkpoint {} (step {})", ck->path, ck->step);
  return evaluate(*model, val, cfg.train.batch_size, batches);
}

}  // namespace dmat
