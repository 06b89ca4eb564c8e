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
#include <optional>

#include <spdlog/spdlog.h>

#include "core/log.h"
#include "dist/communicator.h"
#include "dist/data_parallel.h"
#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "optim/adamw.h"
#include "ops/ops.h"
#include "optim/schedule.h"
#include "train/checkpoint.h"
#include "train/info.h"
#include "train/run_dir.h"
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

// A stop every rank agreed on (signals are combined across ranks at step boundaries; numerical
// faults are found on all-reduced values): a collective, orderly exit, unlike a fault on one rank,
// which aborts the job.
class AgreedStop : public Error {
 public:
  using Error::Error;
};

std::string si(double x) {
  if (x >= 1e9) return fmt::format("{:.2f}G", x / 1e9);
  if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
  if (x >= 1e3) return fmt::format("{:.1f}K", x / 1e3);
  return fmt::format("{:.0f}", x);
}

}  // namespace

Device pick_device(const RunConfig& run) {
  const std::string& d = run.device;
  if (d == "cpu") return Device::CPU;
  const int n = cuda::device_count();
  if (d == "cuda" && n == 0)
    fail("config: run.device is \"cuda\", but {} (use \"cpu\" or \"auto\")",
         cuda::cuda_built() ? "no CUDA device is visible" : "this build has no CUDA backend (configure with -DDMAT_CUDA=ON)");
  if (n == 0) return Device::CPU;
  ops::set_kernel_options(run.kernels);
  return Device::CUDA;
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
                    bool by_position, bool accuracy, const EvalBatchHook& on_batch) {
  const int64_t T = val.seq_len();
  const int64_t world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  const int64_t full = full_val_batches(val, B * world, "validation set");
  const int64_t n = batches > 0 ? std::min(batches, full) : full;
  std::vector<int32_t> x(B * T), y(B * T);
  // [sum, count, correct] then, by position, T sums and T counts: one all-reduce for everything.
  constexpr size_t kPos = 3;
  std::vector<double> acc(kPos + (by_position ? 2 * size_t(T) : 0), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    // global batch i is sequences [i·B·world, (i+1)·B·world); this rank takes its B of them
    val.get_batch((i * world + rank) * B, B, x.data(), y.data());
    int64_t valid = 0, correct = 0;
    acc[0] += m.forward(x.data(), y.data(), B, T, 0.0, &valid, accuracy ? &correct : nullptr);
    acc[1] += double(valid);
    acc[2] += double(correct);
    if (on_batch) on_batch(x.data(), y.data(), B, T, m);
    if (!by_position) continue;
    const std::vector<double> l = m.position_losses();
    for (int64_t r = 0; r < B * T; ++r) {
      if (y[size_t(r)] < 0) continue;
      acc[kPos + size_t(r % T)] += l[size_t(r)];
      acc[kPos + size_t(T + r % T)] += 1.0;
    }
  }
  if (comm && world > 1) comm->all_reduce(acc.data(), int64_t(acc.size()), DType::F64, dist::ReduceOp::Sum);
  EvalResult r;
  const double sum = acc[0], count = acc[1];
  r.tokens = int64_t(count);
  r.loss = count > 0 ? sum / count : 0.0;
  r.ppl = std::exp(r.loss);
  r.has_accuracy = accuracy;
  r.correct = int64_t(acc[2]);
  r.accuracy = count > 0 ? acc[2] / count : 0.0;
  if (by_position) {
    r.position_loss.resize(size_t(T));
    r.position_tokens.resize(size_t(T));
    for (int64_t t = 0; t < T; ++t) {
      const double c = acc[kPos + size_t(T + t)];
      r.position_tokens[size_t(t)] = int64_t(c);
      r.position_loss[size_t(t)] = c > 0 ? acc[kPos + size_t(t)] / c : 0.0;
    }
  }
  return r;
}

namespace {

// The first parameter tensor (in table order) with a non-finite gradient element in [lo, hi) of the
// flat arena on any rank; -1 when there is none. Run on the fault path only: it copies the gradients
// to the host. Collective (every rank takes the fault path at the same step).
int64_t first_nonfinite_grad(const Model& m, int64_t lo, int64_t hi, dist::Communicator& comm) {
  Arena h = m.grads().like(Device::CPU);
  h.copy_from(m.grads());
  const float* g = h.flat().as<float>();
  const int64_t n = int64_t(m.param_info().size());
  int64_t first = n;
  for (int64_t i = 0; i < n && first == n; ++i) {
    const int64_t off = h.offset(int(i)), a = std::max(off, lo), b = std::min(off + h.get(int(i)).numel(), hi);
    for (int64_t k = a; k < b; ++k)
      if (!std::isfinite(g[k])) {
        first = i;
        break;
      }
  }
  first = -int64_t(comm.all_reduce(-double(first), dist::ReduceOp::Max));  // the smallest over ranks
  return first < n ? first : -1;
}

// Whether every weight is finite on every rank (collective).
bool weights_finite(const Model& m, dist::Communicator& comm) {
  const Arena h = m.host_weights();
  const Tensor w = h.flat();
  const float* p = w.as<float>();
  double bad = 0;
  for (int64_t i = 0; i < w.numel(); ++i)
    if (!std::isfinite(p[i])) {
      bad = 1;
      break;
    }
  return comm.all_reduce(bad, dist::ReduceOp::Max) == 0;
}

// The loss-spike guard's z-score of `loss` against the window (the previous losses), or 0 while
// the window is not full.
double spike_zscore(const std::vector<double>& window, int64_t size, double loss) {
  if (int64_t(window.size()) < size) return 0;
  double mean = 0, var = 0;
  for (double x : window) mean += x;
  mean /= double(window.size());
  for (double x : window) var += (x - mean) * (x - mean);
  const double sd = std::sqrt(var / double(window.size()));
  return sd > 0 ? (loss - mean) / sd : 0;
}

// A run directory this process created, removed again if the start fails before anything is written
// into it (a refused start leaves no trace).
struct NewRunDir {
  std::string path;
  bool armed = false;
  ~NewRunDir() {
    if (armed) discard_new_run_dir(path);
  }
};

TrainResult train_ranks(const Config& cfg, const TrainOptions& opt, dist::Communicator& comm, RunLog& run_log) {
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
  const Device device = pick_device(cfg.run);
  check_device_support(cfg, device);  // before the run directory exists

  // ---- run directory: one process at a time, and a run is continued only when asked, from a
  // checkpoint that can be read, by a config that continues it. Rank 0 decides, reading only: nothing
  // is written into the directory before the start is accepted (the others wait, then see the same
  // directory: it must be on a filesystem every rank shares).
  NewRunDir new_dir{run_dir};
  std::optional<RunDirLock> lock;
  std::optional<CheckpointRef> ckpt;
  nlohmann::json shards;
  if (root) {
    std::error_code ec;
    const bool existed = fs::exists(run_dir, ec);
    if (existed && !opt.resume) {
      const bool has_run = fs::exists(run_dir + "/config.json") || fs::exists(metrics_path) || latest_checkpoint(run_dir);
      if (has_run)
        fail("run directory {} already holds a run: pass --resume to continue it, or choose another --out / run.name",
             run_dir);
    }
    fs::create_directories(run_dir, ec);
    if (ec) fail("cannot create the run directory {} (run.dir, or --out): {}", run_dir, ec.message());
    new_dir.armed = !existed;
    lock.emplace(run_dir);
    if (opt.resume) ckpt = resume_checkpoint(run_dir);
    if (ckpt) {
      TrainState saved_state;
      nlohmann::json saved_config;
      try {
        saved_state = read_checkpoint_state(ckpt->path);
        saved_config = checkpoint_config(ckpt->path);
      } catch (const Error& e) {
        fail_unusable_checkpoint(run_dir, *ckpt, e.what());
      }
      check_resume_config(saved_config, cfg, saved_state, world, opt.allow_train_changes, ckpt->path);
      if (opt.stop_at > 0 && opt.stop_at <= saved_state.step)
        fail("--stop-at {}: the run is already at step {} (checkpoint {}); give a later step", opt.stop_at,
             saved_state.step, ckpt->path);
    }
    shards = describe_shards(cfg);
    if (ckpt) {
      try {
        verify_shards(run_dir, shards);
      } catch (const Error& e) {
        if (!opt.allow_train_changes) throw;
        spdlog::warn("{} (continuing: --allow-train-changes)", e.what());
      }
    }
  }
  comm.barrier();
  std::string ckpt_path = ckpt ? ckpt->path : "";
  comm.broadcast(ckpt_path, 0);  // the same checkpoint everywhere, whatever each rank's view
  if (!root && !ckpt_path.empty()) {
    if (!fs::exists(ckpt_path + "/COMPLETE"))
      fail("rank {} cannot see checkpoint {} that rank 0 resumes from: the run directory must be on a filesystem "
           "shared by all ranks",
           rank, ckpt_path);
    ckpt = CheckpointRef{checkpoint_step_of(fs::path(ckpt_path).filename().string()).value_or(0), ckpt_path};
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

  // ---- model and optimizer, and the checkpoint's state: still nothing written
  std::unique_ptr<Model> model_ptr = make_model(cfg, device);
  Model& model = *model_ptr;
  model.init_weights(tc.seed);
  dist::DataParallel dp(model, comm, nccl.get(), int(tc.zero),
                        opt.host_bucket_bytes > 0 ? opt.host_bucket_bytes : 32 << 20, opt.host_bucket_bytes > 0);
  AdamW adam(model, tc, dp.shard_lo(), dp.shard_hi(), &comm);
  TrainState st;
  if (ckpt) {
    try {
      st = load_checkpoint(ckpt->path, model, &adam);
    } catch (const Error& e) {
      fail_unusable_checkpoint(run_dir, *ckpt, e.what());
    }
  }

  // ---- the start is accepted: rank 0 writes the run's files
  if (root) {
    lock->announce();
    run_log.attach(run_dir + "/train.log");
    if (fs::exists(run_dir + "/config.json") && !ckpt) {
      // an earlier attempt that never reached a checkpoint: keep its files beside the new ones
      fs::rename(run_dir + "/config.json", run_dir + "/config.previous.json");
    }
    write_file_atomic(run_dir + "/config.json", cfg.resolved.dump(2) + "\n");
    if (!ckpt || opt.allow_train_changes || !fs::exists(run_dir + "/data.json")) record_shards(run_dir, shards);
    if (opt.resume && fs::exists(metrics_path)) truncate_metrics(metrics_path, ckpt ? st.step : 0);
    new_dir.armed = false;
  }
  spdlog::info("dmatrain train: run directory {}", run_dir);
  spdlog::info("resolved config:\n{}", cfg.resolved.dump(2));
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
  const int64_t B = tc.batch_size, T = tc.seq_len;
  const int64_t seqs_per_step = B * tc.grad_accum * world;
  const int64_t windows = train_data.num_windows();
  spdlog::info("data: train {} tokens ({} windows of {}: the run's {} steps read {:.2f} epochs), val {} tokens ({} "
               "windows)",
               train_data.total_tokens(), windows, T + 1, tc.steps,
               double(tc.steps) * double(seqs_per_step) / double(windows), val_data.total_tokens(),
               val_data.num_windows());
  const ModelCounts counts = count_model(cfg.model, tc.seq_len);
  spdlog::info("model: {} parameters ({} without embeddings), {:.3g} FLOPs/token ({})", counts.total,
               counts.non_embedding, counts.flops_per_token, counts.flops_convention);
  // MFU against the device's dense bf16 peak (the convention of docs/performance.md); null where the peak is unknown.
  // Every rank's device counts.
  const double peak = device == Device::CUDA ? cuda::peak_bf16_flops(gpu) * double(world) : 0.0;
  if (ckpt)
    spdlog::info("resumed from {} (step {}, {} tokens{}{})", ckpt->path, st.step, st.tokens,
                 st.world_size != world ? fmt::format("; written by {} rank(s), continued on {}", st.world_size, world)
                                        : "",
                 st.skipped > 0 ? fmt::format("; {} updates skipped so far", st.skipped) : "");
  if (ckpt && !st.origin.empty() && adam.steps_done() == 0)
    spdlog::info("the checkpoint was imported from {} (dmatrain import): the optimizer state starts fresh (zero "
                 "AdamW moments, no step taken)",
                 st.origin);
  if (st.sequences >= windows)
    spdlog::info("data: the run is in epoch {} of the training set", st.sequences / windows + 1);
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

  std::vector<int32_t> x(B * T * tc.grad_accum), y(B * T * tc.grad_accum);
  if (train_data.has_mask()) spdlog::info("data: loss mask: the loss is the mean over the targets the mask keeps");

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
  std::string last_ckpt_dir = ckpt ? ckpt->path : "";

  auto run_eval = [&] {
    // with a loss mask (MQAR answers) the accuracy is what the run is for
    EvalResult ev = evaluate(model, val_data, B, tc.eval_batches, &comm, false, val_data.has_mask());
    spdlog::info("eval step {}/{} | val loss {:.4f} | val ppl {:.3f}{} | {} {}", st.step, tc.steps, ev.loss, ev.ppl,
                 ev.has_accuracy ? fmt::format(" | val accuracy {:.4f}", ev.accuracy) : "", ev.tokens,
                 val_data.has_mask() ? "targets in the loss mask" : "tokens");
    if (!std::isfinite(ev.loss))
      throw AgreedStop(fmt::format("the validation loss is {} at step {} ({} tokens): the weights produce non-finite "
                                   "values; the newest complete checkpoint is {}",
                                   ev.loss, st.step, ev.tokens, last_ckpt_dir.empty() ? "none" : last_ckpt_dir));
    nlohmann::json row = {{"step", st.step}, {"tokens", st.tokens}, {"val_loss", ev.loss}, {"ppl", ev.ppl},
                          {"val_tokens", ev.tokens}};
    if (ev.has_accuracy) row["val_accuracy"] = ev.accuracy;
    row["time"] = elapsed();
    emit(row);
    res.val_loss = ev.loss;
    res.val_ppl = ev.ppl;
    last_eval = st.step;
  };
  auto checkpoint = [&] {
    st.elapsed_s = elapsed();
    dp.gather_master();
    last_ckpt_dir = save_checkpoint(run_dir, model, adam, st, cfg.resolved, cfg.run.keep_checkpoints, comm,
                                    dp.zero() == 1 && world > 1 ? &dp.partition() : nullptr);
    spdlog::info("checkpoint {}", last_ckpt_dir);
    last_ckpt = st.step;
  };
  // train.on_nonfinite = "stop": the weights are still those before the faulty step, the last good
  // state; it is checkpointed (unless it is already), and every rank stops at this step.
  auto stop_on_fault = [&](const std::string& fault) {
    std::string saved;
    if (last_ckpt == st.step) {
      saved = fmt::format("is checkpoint {}", last_ckpt_dir);
    } else if (weights_finite(model, comm)) {
      checkpoint();
      saved = fmt::format("was written to checkpoint {}", last_ckpt_dir);
    } else {
      saved = fmt::format("is not finite either, so no checkpoint was written (the newest complete one: {})",
                          last_ckpt_dir.empty() ? "none" : last_ckpt_dir);
    }
    throw AgreedStop(fmt::format("training stopped: {} (train.on_nonfinite = \"stop\"). The last good state, step {}, "
                                 "{}: continue from it with --resume (a lower train.lr, say), or set "
                                 "train.on_nonfinite = \"skip\" to drop such steps' updates",
                                 fault, st.step, saved));
  };

  const auto& params = model.param_info();
  while (st.step < tc.steps) {
    const int64_t s = st.step + 1;  // the step being made
    // a new epoch of the training set: the epoch of this step's last sequence is past the last one's
    const int64_t epoch = (st.sequences + seqs_per_step - 1) / windows;
    if (st.sequences > 0 && epoch > (st.sequences - 1) / windows)
      spdlog::info("data: step {} begins epoch {} of the training set (all {} windows were read {} time(s); they "
                   "repeat in a new order)",
                   s, epoch + 1, windows, epoch);
    model.zero_grad();
    if (opt.before_forward) opt.before_forward(s, model);
    // global micro-batch `micro` is sequences [(micro·world)·B, (micro·world + world)·B) after the
    // ones consumed: disjoint across ranks, and the same set for any split of B·world
    for (int64_t micro = 0; micro < tc.grad_accum; ++micro)
      train_data.get_batch(st.sequences + (micro * world + rank) * B, B, x.data() + micro * B * T,
                           y.data() + micro * B * T);
    // The loss is the mean over the update's targets: all B·T·grad_accum·world of them, or with a loss
    // mask those it keeps, counted over every rank before the first backward (none: a zero gradient).
    double targets = double(B * T * tc.grad_accum * world);
    if (train_data.has_mask()) {
      const double local = double(std::count_if(y.begin(), y.end(), [](int32_t t) { return t >= 0; }));
      targets = std::max(1.0, comm.all_reduce(local, dist::ReduceOp::Sum));
    }
    const double grad_scale = 1.0 / targets;
    double step_loss = 0;
    for (int64_t micro = 0; micro < tc.grad_accum; ++micro) {
      step_loss += model.forward(x.data() + micro * B * T, y.data() + micro * B * T, B, T, grad_scale);
      if (micro + 1 == tc.grad_accum) dp.begin_last_backward();
      model.backward();
    }
    if (opt.after_backward) opt.after_backward(s, model);
    dp.reduce_grads();
    step_loss = comm.all_reduce(step_loss, dist::ReduceOp::Sum) / targets;
    const double norm = adam.clip();

    // ---- numerical faults, decided on all-reduced values: every rank takes the same branch
    std::string fault;
    if (!std::isfinite(step_loss) || !std::isfinite(norm)) {
      const int64_t p = first_nonfinite_grad(model, adam.lo(), adam.hi(), comm);
      fault = fmt::format("step {} has loss {} and gradient norm {}{}", s, step_loss, norm,
                          p >= 0 ? fmt::format(" (the first tensor with a non-finite gradient: {}, group {})",
                                               params[size_t(p)].name, params[size_t(p)].group)
                                 : "");
      if (tc.on_nonfinite == "stop") {
        emit({{"step", s}, {"nonfinite", fault}});
        stop_on_fault(fault);
      }
    } else if (tc.loss_spike_z > 0) {
      const double z = spike_zscore(st.recent_losses, tc.loss_spike_window, step_loss);
      if (z > tc.loss_spike_z)
        fault = fmt::format("step {} has loss {:.4f}, {:.1f} standard deviations above the mean of the previous {} "
                            "steps (train.loss_spike_z = {})",
                            s, step_loss, z, tc.loss_spike_window, tc.loss_spike_z);
      st.recent_losses.push_back(step_loss);
      if (int64_t(st.recent_losses.size()) > tc.loss_spike_window) st.recent_losses.erase(st.recent_losses.begin());
    }
    const double lr = learning_rate(tc, s);
    if (fault.empty()) {
      adam.step(lr);
      dp.gather_weights();
      loss_acc += step_loss;
      ++loss_n;
    } else {
      adam.discard_step();
      ++st.skipped;
      spdlog::warn("{}: update skipped ({} skipped so far)", fault, st.skipped);
      emit({{"step", s}, {"skipped", fault}, {"skipped_total", st.skipped}});
    }
    ++st.step;
    st.sequences += seqs_per_step;
    st.tokens += seqs_per_step * T;
    window_tokens += seqs_per_step * T;
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
      emit({{"step", st.step}, {"tokens", st.tokens}, {"loss", step_loss},
            {"loss_avg", loss_n > 0 ? nlohmann::json(loss_acc / double(loss_n)) : nlohmann::json(nullptr)},
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
      throw AgreedStop(fmt::format("interrupted by signal {} at step {} (checkpoint written; continue with --resume)",
                                   sig, st.step));
    }
  }
  if (last_eval != st.step) run_eval();
  res.steps = st.step;
  spdlog::info("done: {} steps, val loss {:.4f}, val perplexity {:.3f}{}", st.step, res.val_loss, res.val_ppl,
               st.skipped > 0 ? fmt::format(" ({} updates skipped)", st.skipped) : "");
  return res;
}

}  // namespace

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  dist::Communicator& comm = dist::world();
  if (comm.size() == 1) {
    RunLog run_log;
    try {
      return train_ranks(cfg, opt, comm, run_log);
    } catch (const std::exception& e) {
      run_log.error(e.what());  // train.log too, once the run was accepted
      throw;
    }
  }
  // Rank-tagged logs; info only from rank 0 (the others log warnings and errors).
  init_logging(comm.rank());
  comm.set_timeout(cfg.run.collective_timeout_s);
  RunLog run_log;
  try {
    return train_ranks(cfg, opt, comm, run_log);
  } catch (const AgreedStop& e) {
    run_log.error(e.what());
    throw;  // every rank took this decision at the same step: an orderly exit
  } catch (const std::exception& e) {
    // A fault on this rank: the others may be waiting in a collective, so end them all now.
    spdlog::error("{}", e.what());
    comm.abort(e.what());
    throw;  // (abort does not return)
  }
}

EvalResult evaluate_run(const std::string& run_dir, int64_t batches, bool by_position,
                        const std::string& logits_path, bool accuracy) {
  auto ck = latest_checkpoint(run_dir);
  if (!ck) fail("eval: no complete checkpoint in {} (expected {}/checkpoints/step_*/COMPLETE)", run_dir, run_dir);
  Config cfg = parse_saved_config(checkpoint_config(ck->path), run_dir);
  set_cpu_threads(cfg.run.threads, 1);
  const bool dump = !logits_path.empty();
  std::unique_ptr<Model> model = make_model(cfg, dump ? Device::CPU : pick_device(cfg.run));
  load_checkpoint(ck->path, *model, nullptr);
  TokenLoader val(list_shards(cfg.data.val), cfg.train.seq_len, cfg.train.seed, false);
  spdlog::info("eval: checkpoint {} (step {}){}", ck->path, ck->step, dump ? ", CPU backend (fp32) for --logits" : "");
  std::vector<int32_t> inputs, targets;
  std::vector<float> logits;
  EvalBatchHook keep = [&](const int32_t* x, const int32_t* y, int64_t B, int64_t T, const Model& m) {
    inputs.insert(inputs.end(), x, x + B * T);
    targets.insert(targets.end(), y, y + B * T);
    const Tensor l = m.logits();
    const float* p = static_cast<const float*>(l.data);
    logits.insert(logits.end(), p, p + l.numel());
  };
  EvalResult r = evaluate(*model, val, cfg.train.batch_size, batches, nullptr, by_position, accuracy || val.has_mask(),
                          dump ? keep : nullptr);
  r.step = ck->step;
  if (!std::isfinite(r.loss))
    fail("eval: the validation loss of checkpoint {} is {} ({} tokens): its weights hold or produce non-finite values",
         ck->path, r.loss, r.tokens);
  if (dump) {
    const int64_t T = cfg.train.seq_len, N = int64_t(inputs.size()) / T, V = cfg.model.vocab_size;
    write_safetensors(logits_path, {{"inputs", Tensor{inputs.data(), {N, T}, DType::I32, Device::CPU}},
                                    {"targets", Tensor{targets.data(), {N, T}, DType::I32, Device::CPU}},
                                    {"logits", Tensor{logits.data(), {N, T, V}, DType::F32, Device::CPU}}},
                      {{"format", "dmatrain"}, {"checkpoint", ck->path}});
  }
  return r;
}

}  // namespace dmat
