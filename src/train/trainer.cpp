#include "train/trainer.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "core/log.h"
#include "dist/communicator.h"
#include "dist/data_parallel.h"
#include "io/checkpoint_dir.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "train/checkpoint.h"
#include "train/info.h"
#include "kernels/cuda/device_info.h"
#include "model/attention.h"
#ifdef DMAT_WITH_CUDA
#include "kernels/cuda/flash_attention.h"
#endif

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

// An interruption every rank agreed on (signals are combined across ranks at step boundaries):
// a collective, orderly exit, unlike a fault on one rank, which aborts the job.
class Interrupted : public Error {
 public:
  using Error::Error;
};

// Test-only fault injection: DMAT_TEST_FAULT="RANK:STEP:KIND" makes rank RANK, before update STEP,
// throw (KIND "throw"), stop answering collectives (KIND "hang") or raise SIGTERM (KIND "signal").
void inject_test_fault(int rank, int64_t step) {
  static const char* spec = std::getenv("DMAT_TEST_FAULT");
  if (!spec) return;
  int r = -1;
  long long s = -1;
  char kind[16] = {};
  if (std::sscanf(spec, "%d:%lld:%15s", &r, &s, kind) != 3 || r != rank || s != step) return;
  const std::string k = kind;
  if (k == "throw") fail("test fault injected on rank {} at step {} (DMAT_TEST_FAULT)", rank, step);
  if (k == "hang") std::this_thread::sleep_for(std::chrono::hours(1));
  if (k == "signal") std::raise(SIGTERM);
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

void check_device_support(const Config& cfg, Device device) {
  if (device != Device::CUDA) return;
  const auto& m = cfg.model;
  // the attention variant knows its head dims and kernel family (kernels/cuda/head_dims.h)
  const std::unique_ptr<Attention> attn = make_attention(m);
  if (const std::string why = attn->cuda_unsupported(); !why.empty()) fail("config: {}", why);
#ifdef DMAT_WITH_CUDA
  const AttentionDims d = attn->dims();
  cuda::AttnShape s;
  s.B = cfg.train.batch_size;
  s.T = cfg.train.seq_len;
  s.H = m.n_heads;
  s.Hkv = m.n_kv_heads;
  s.Dqk = d.d_qk;
  s.Dv = d.d_v;
  if (!cuda::flash_attention_supported(s))
    fail("config: the CUDA attention kernels take T < 2^31 − 256 and at most 65535 heads and sequences per "
         "micro-batch (got train.seq_len {}, model.n_heads {}, train.batch_size {}); run on the CPU with "
         "run.device=\"cpu\"",
         s.T, s.H, s.B);
#endif
}

std::unique_ptr<Model> make_model(const Config& cfg, Device device) {
  check_device_support(cfg, device);
  auto m = std::make_unique<Model>(cfg.model, device == Device::CUDA ? DType::BF16 : DType::F32, device,
                                   cfg.train.recompute);
  m->set_deterministic(cfg.run.deterministic);
  return m;
}

namespace {

// Model changes that make a checkpoint unusable: any difference in the `model` section. The saved
// config is resolved again first, so options added to the model since it was written compare at
// their defaults (a config that no longer parses is compared as written).
void check_resumable(const nlohmann::json& saved_raw, const nlohmann::json& now, const std::string& ckpt) {
  nlohmann::json saved = saved_raw;
  try {
    saved = parse_saved_config(saved_raw).resolved;
  } catch (const Error&) {
  }
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

// n > 0: n threads. 0: the node's cores shared by the ranks on it (ranks_per_node of them): ranks
// that each took every core would run twice as many OpenMP threads as cores, and the idle ones
// spinning after each parallel region (the data loader's, once per micro-batch) take the cores the
// ranks' main threads need to keep their GPUs fed.
int set_cpu_threads(int64_t n, int ranks_per_node) {
  const int t = n > 0 ? int(n) : std::max(1, omp_get_num_procs() / std::max(1, ranks_per_node));
  omp_set_num_threads(t);
  return t;
}

// Full validation batches of `seqs` sequences (batch_size × ranks); at least one is required.
static int64_t full_val_batches(const TokenLoader& val, int64_t seqs, const std::string& name) {
  const int64_t full = val.num_windows() / seqs;
  if (full == 0)
    fail("data: {} has {} windows of {} tokens, fewer than one batch of {} sequences (train.batch_size × ranks): "
         "add validation data or lower train.batch_size",
         name, val.num_windows(), val.seq_len() + 1, seqs);
  return full;
}

EvalResult evaluate(Model& m, const TokenLoader& val, int64_t B, int64_t batches, dist::Communicator* comm,
                    bool by_position) {
  const int64_t T = val.seq_len();
  const int64_t world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  const int64_t full = full_val_batches(val, B * world, "validation set");
  const int64_t n = batches > 0 ? std::min(batches, full) : full;
  std::vector<int32_t> x(B * T), y(B * T);
  // [sum, count] then, by position, T sums and T counts: one all-reduce for everything.
  std::vector<double> acc(2 + (by_position ? 2 * size_t(T) : 0), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    // global batch i is sequences [i·B·world, (i+1)·B·world); this rank takes its B of them
    val.get_batch((i * world + rank) * B, B, x.data(), y.data());
    int64_t valid = 0;
    acc[0] += m.forward(x.data(), y.data(), B, T, 0.0, &valid);
    acc[1] += double(valid);
    if (!by_position) continue;
    const std::vector<double> l = m.position_losses();
    for (int64_t r = 0; r < B * T; ++r) {
      if (y[size_t(r)] < 0) continue;
      acc[2 + size_t(r % T)] += l[size_t(r)];
      acc[2 + size_t(T + r % T)] += 1.0;
    }
  }
  if (comm && world > 1) comm->all_reduce(acc.data(), int64_t(acc.size()), DType::F64, dist::ReduceOp::Sum);
  EvalResult r;
  const double sum = acc[0], count = acc[1];
  r.tokens = int64_t(count);
  r.loss = count > 0 ? sum / count : 0.0;
  r.ppl = std::exp(r.loss);
  if (by_position) {
    r.position_loss.resize(size_t(T));
    r.position_tokens.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) {
      const double c = acc[2 + size_t(T + t)];
      r.position_tokens[size_t(t)] = int64_t(c);
      r.position_loss[size_t(t)] = c > 0 ? acc[2 + size_t(t)] / c : 0.0;
    }
  }
  return r;
}

namespace {

TrainResult train_ranks(const Config& cfg, const TrainOptions& opt, dist::Communicator& comm) {
  const auto& tc = cfg.train;
  const int64_t world = comm.size(), rank = comm.rank();
  const bool root = rank == 0;
  const std::string run_dir = cfg.run.dir;
  const std::string metrics_path = run_dir + "/metrics.jsonl";

  // ---- data first: a config whose data cannot be read must not leave a run directory behind
  TokenLoader train_data(list_shards(cfg.data.train), tc.seq_len, tc.seed, /*shuffle=*/true);
  TokenLoader val_data(list_shards(cfg.data.val), tc.seq_len, tc.seed, /*shuffle=*/false);
  for (const TokenLoader* l : {&train_data, &val_data})
    if (int64_t(l->vocab_size()) > cfg.model.vocab_size)
      fail("data: shards have vocab size {} but model.vocab_size is {}: the model must cover the tokenizer's ids",
           l->vocab_size(), cfg.model.vocab_size);
  full_val_batches(val_data, tc.batch_size * world, "validation set " + cfg.data.val);
  const Device device = pick_device(cfg.run.device);
  check_device_support(cfg, device);  // before the run directory exists

  // ---- run directory: never overwrite a user's run unless asked to continue it. Rank 0 decides
  // and writes; the others wait, then see the same directory (it must be on a shared filesystem).
  std::optional<CheckpointRef> ckpt;
  RunLog run_log;
  if (root) {
    if (fs::exists(run_dir)) {
      ckpt = latest_checkpoint(run_dir);
      const bool has_run = fs::exists(run_dir + "/config.json") || fs::exists(metrics_path) || ckpt;
      if (has_run && !opt.resume)
        fail("run directory {} already holds a run: pass --resume to continue it, or choose another --out / run.name",
             run_dir);
    }
    fs::create_directories(run_dir);
    run_log.attach(run_dir + "/train.log");
    spdlog::info("dmatrain train: run directory {}", run_dir);
    spdlog::info("resolved config:\n{}", cfg.resolved.dump(2));
    if (fs::exists(run_dir + "/config.json") && !ckpt) {
      // an earlier attempt that never reached a checkpoint: keep its files beside the new ones
      fs::rename(run_dir + "/config.json", run_dir + "/config.previous.json");
    }
    write_file_atomic(run_dir + "/config.json", cfg.resolved.dump(2) + "\n");
  }
  comm.barrier();
  std::string ckpt_path = ckpt ? ckpt->path : "";
  comm.broadcast(ckpt_path, 0);  // the same checkpoint everywhere, whatever each rank's view
  if (!root && !ckpt_path.empty()) {
    if (!fs::exists(ckpt_path + "/COMPLETE"))
      fail("rank {} cannot see checkpoint {} that rank 0 resumes from: the run directory must be on a filesystem "
           "shared by all ranks",
           rank, ckpt_path);
    ckpt = CheckpointRef{0, ckpt_path};
  }

  // ---- ranks: one GPU per rank (chosen by the node-local rank), NCCL for device buffers
  std::unique_ptr<dist::Communicator> nccl;
  int gpu = 0;
  if (device == Device::CUDA && world > 1) {
    gpu = dist::select_local_device(comm);
    nccl = dist::make_nccl(comm);
    nccl->set_timeout(cfg.run.collective_timeout_s);
  }
  const int threads = set_cpu_threads(cfg.run.threads, comm.local_size());
  if (device == Device::CUDA)
    spdlog::info("backend: cuda ({}; bf16 weights and activations, fp32 master weights and gradients; {} host "
                 "threads{})",
                 cuda::device_summary(gpu), threads, world > 1 ? " per rank" : "");
  else
    spdlog::info("backend: cpu ({} threads{})", threads, world > 1 ? " per rank" : "");
  if (world > 1)
    spdlog::info("data parallel: {} ranks ({}{}), {} per node; global batch {} sequences; ZeRO-{}; collective "
                 "timeout {} s",
                 world, comm.backend(), nccl ? " + nccl" : "", comm.local_size(),
                 tc.batch_size * tc.grad_accum * world, tc.zero, cfg.run.collective_timeout_s);

  spdlog::info("data: train {} tokens ({} windows of {}), val {} tokens ({} windows)", train_data.total_tokens(),
               train_data.num_windows(), tc.seq_len + 1, val_data.total_tokens(), val_data.num_windows());

  // ---- model and optimizer
  std::unique_ptr<Model> model_ptr = make_model(cfg, device);
  Model& model = *model_ptr;
  model.init_weights(tc.seed);
  // DMAT_TEST_HOST_BUCKETS=BYTES (tests): the GPU path's gradient buckets, on the host communicator.
  const char* host_buckets = std::getenv("DMAT_TEST_HOST_BUCKETS");
  dist::DataParallel dp(model, comm, nccl.get(), int(tc.zero), host_buckets ? std::atoll(host_buckets) : 32 << 20,
                        host_buckets != nullptr);
  AdamW adam(model, tc, dp.shard_lo(), dp.shard_hi(), &comm);
  const ModelCounts counts = count_model(cfg.model, tc.seq_len);
  spdlog::info("model: {} parameters ({} without embeddings), {:.3g} FLOPs/token ({})", counts.total,
               counts.non_embedding, counts.flops_per_token, counts.flops_convention);
  // MFU against the device's dense bf16 peak (DESIGN.md convention); null where the peak is unknown.
  // Every rank's device counts.
  const double peak = device == Device::CUDA ? cuda::peak_bf16_flops(gpu) * double(world) : 0.0;

  TrainState st;
  if (opt.resume) {
    if (ckpt) {
      check_resumable(checkpoint_config(ckpt->path), cfg.resolved, ckpt->path);
      st = load_checkpoint(ckpt->path, model, &adam);
      spdlog::info("resumed from {} (step {}, {} tokens{})", ckpt->path, st.step, st.tokens,
                   st.world_size != world ? fmt::format("; written by {} rank(s), continued on {}", st.world_size, world)
                                          : "");
      if (root) truncate_metrics(metrics_path, st.step);
    } else {
      spdlog::info("--resume: no complete checkpoint in {}, starting from step 0", run_dir);
      if (root && fs::exists(metrics_path)) truncate_metrics(metrics_path, 0);
    }
  }
  st.world_size = world;
  if (st.step >= tc.steps) spdlog::info("nothing to do: the run is at step {} of {}", st.step, tc.steps);

  std::ofstream metrics;
  if (root) metrics.open(metrics_path, std::ios::app);
  auto emit = [&](const nlohmann::json& row) {
    if (!root) return;
    metrics << row.dump() << "\n";
    metrics.flush();
  };

  SignalGuard signals;

  const int64_t B = tc.batch_size, T = tc.seq_len;
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
    EvalResult ev = evaluate(model, val_data, B, tc.eval_batches, &comm);
    spdlog::info("eval step {}/{} | val loss {:.4f} | val ppl {:.3f} | {} tokens", st.step, tc.steps, ev.loss, ev.ppl,
                 ev.tokens);
    emit({{"step", st.step}, {"tokens", st.tokens}, {"val_loss", ev.loss}, {"ppl", ev.ppl}, {"time", elapsed()}});
    res.val_loss = ev.loss;
    res.val_ppl = ev.ppl;
    last_eval = st.step;
  };
  auto checkpoint = [&] {
    st.elapsed_s = elapsed();
    dp.gather_master();
    std::string dir = save_checkpoint(run_dir, model, adam, st, cfg.resolved, cfg.run.keep_checkpoints, comm,
                                      dp.zero() == 1 && world > 1 ? &dp.partition() : nullptr);
    spdlog::info("checkpoint {}", dir);
    last_ckpt = st.step;
  };

  while (st.step < tc.steps) {
    inject_test_fault(int(rank), st.step + 1);
    model.zero_grad();
    double step_loss = 0;
    for (int64_t micro = 0; micro < tc.grad_accum; ++micro) {
      // global micro-batch `micro` is sequences [(micro·world)·B, (micro·world + world)·B) after the
      // ones consumed: disjoint across ranks, and the same set for any split of B·world
      const int64_t g0 = st.sequences + (micro * world + rank) * B;
      train_data.get_batch(g0, B, x.data(), y.data());
      step_loss += model.forward(x.data(), y.data(), B, T, grad_scale);
      if (micro + 1 == tc.grad_accum) dp.begin_last_backward();
      model.backward();
    }
    dp.reduce_grads();
    step_loss = comm.all_reduce(step_loss, dist::ReduceOp::Sum) / double(B * T * tc.grad_accum * world);
    if (!std::isfinite(step_loss)) fail("training diverged: loss is {} at step {}", step_loss, st.step + 1);
    const double norm = adam.clip();
    const double lr = learning_rate(tc, st.step + 1);
    adam.step(lr);
    dp.gather_weights();
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
    // A signal on any rank stops every rank at this same step boundary.
    const int sig = int(comm.all_reduce(double(g_signal.load()), dist::ReduceOp::Max));
    if (sig) {
      spdlog::warn("signal {} received{}: writing a checkpoint at step {} and stopping", sig,
                   world > 1 ? " (by at least one rank)" : "", st.step);
      if (last_ckpt != st.step) checkpoint();
      throw Interrupted(fmt::format("interrupted by signal {} at step {} (checkpoint written; continue with --resume)",
                                    sig, st.step));
    }
  }
  if (last_eval != st.step) run_eval();
  res.steps = st.step;
  spdlog::info("done: {} steps, val loss {:.4f}, val perplexity {:.3f}", st.step, res.val_loss, res.val_ppl);
  return res;
}

}  // namespace

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  dist::Communicator& comm = dist::world();
  if (comm.size() == 1) return train_ranks(cfg, opt, comm);
  // Rank-tagged logs; info only from rank 0 (the others log warnings and errors).
  init_logging(comm.rank());
  comm.set_timeout(cfg.run.collective_timeout_s);
  try {
    return train_ranks(cfg, opt, comm);
  } catch (const Interrupted&) {
    throw;  // every rank took this decision at the same step: an orderly exit
  } catch (const std::exception& e) {
    // A fault on this rank: the others may be waiting in a collective, so end them all now.
    spdlog::error("{}", e.what());
    comm.abort(e.what());
    throw;  // (abort does not return)
  }
}

EvalResult evaluate_run(const std::string& run_dir, int64_t batches, bool by_position) {
  auto ck = latest_checkpoint(run_dir);
  if (!ck) fail("eval: no complete checkpoint in {} (expected {}/checkpoints/step_*/COMPLETE)", run_dir, run_dir);
  Config cfg = parse_saved_config(checkpoint_config(ck->path), run_dir);
  set_cpu_threads(cfg.run.threads, 1);
  std::unique_ptr<Model> model = make_model(cfg, pick_device(cfg.run.device));
  load_checkpoint(ck->path, *model, nullptr);
  TokenLoader val(list_shards(cfg.data.val), cfg.train.seq_len, cfg.train.seed, false);
  spdlog::info("eval: checkpoint {} (step {})", ck->path, ck->step);
  EvalResult r = evaluate(*model, val, cfg.train.batch_size, batches, nullptr, by_position);
  if (!std::isfinite(r.loss))
    fail("eval: the validation loss of checkpoint {} is {} ({} tokens): its weights hold or produce non-finite values",
         ck->path, r.loss, r.tokens);
  return r;
}

}  // namespace dmat
