#include "train/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>

#include "io/checkpoint_dir.h"
#include "io/safetensors.h"
#include "ops/ops.h"

namespace dmat {

namespace fs = std::filesystem;
constexpr int kStateFormat = 1;
// Ranks a state file may name: far above any job, and small enough that the global batch
// batch_size × grad_accum × ranks (each factor <= 2^20) stays an int64 (check_resume_config).
constexpr int64_t kMaxWorldSize = int64_t(1) << 20;

static std::vector<NamedTensor> named(const Model& m, const Arena& a, const std::string& prefix) {
  std::vector<NamedTensor> out;
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) out.push_back({prefix + info[i].name, a.get(int(i))});
  return out;
}

// Device arenas are staged through a host copy; files always hold full precision (fp32 on CUDA:
// the master weights), so a checkpoint resumes on either backend.
void save_model_weights(const Model& m, const std::string& path) {
  if (m.device() == Device::CPU && !m.master().defined()) {
    write_safetensors(path, named(m, m.params(), ""), {{"format", "dmatrain"}});
    return;
  }
  Arena h = m.host_weights();
  write_safetensors(path, named(m, h, ""), {{"format", "dmatrain"}});
}

static void load_named(const SafetensorsFile& f, const Model& m, const Arena& a, const std::string& prefix) {
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) f.copy_to(prefix + info[i].name, a.get(int(i)));
}

void load_model_weights(Model& m, const std::string& path) {
  SafetensorsFile f(path);
  if (m.device() == Device::CPU) return load_named(f, m, m.params(), "");
  Arena h = m.master().like(Device::CPU);
  load_named(f, m, h, "");
  m.set_weights(h);
}

// The moments of every parameter on rank 0's host, laid out like the gradients: rank 0's own
// when it holds all of them, else gathered from every rank's shard.
static void gather_moment(const Tensor& shard, const Arena& full, dist::Communicator& comm,
                          const dist::Partition* shards) {
  if (!shards) {
    if (comm.rank() == 0) ops::copy(full.flat(), shard);
    return;
  }
  const Tensor f = full.defined() ? full.flat() : Tensor{};
  std::vector<char> staged;
  const void* src = shard.data;
  if (shard.device != Device::CPU) {
    staged.resize(shard.bytes());
    ops::copy(Tensor{staged.data(), shard.shape, shard.dtype, Device::CPU}, shard);
    src = staged.data();
  }
  comm.gather(src, f.data, *shards, shard.dtype, 0);
}

std::string save_checkpoint(const std::string& run_dir, const Model& m, const AdamW& opt, const TrainState& st,
                            const nlohmann::json& resolved_config, int64_t keep, dist::Communicator& comm,
                            const dist::Partition* shards) {
  const bool root = comm.rank() == 0;
  nlohmann::json s = {{"format", kStateFormat},   {"step", st.step},
                      {"sequences", st.sequences}, {"tokens", st.tokens},
                      {"elapsed_s", st.elapsed_s}, {"world_size", st.world_size},
                      {"adam_steps", opt.steps_done()}, {"skipped_steps", st.skipped},
                      {"recent_losses", st.recent_losses}};
  if (!st.origin.empty()) s["origin"] = st.origin;
  std::string tmp;
  {
    // moments first (a collective under ZeRO), then rank 0 writes the shared files
    const Arena hm = root ? m.grads().like(Device::CPU) : Arena(), hv = root ? m.grads().like(Device::CPU) : Arena();
    gather_moment(opt.m(), hm, comm, shards);
    gather_moment(opt.v(), hv, comm, shards);
    if (root) {
      tmp = begin_checkpoint(run_dir, st.step);
      save_model_weights(m, tmp + "/model.safetensors");
      auto moments = named(m, hm, "m.");
      for (auto& t : named(m, hv, "v.")) moments.push_back(t);
      write_safetensors(tmp + "/optim_rank0.safetensors", moments);
      write_file_atomic(tmp + "/config.json", resolved_config.dump(2) + "\n");
    }
  }
  comm.broadcast(tmp, 0);
  s["rank"] = comm.rank();
  s["zero_shard"] = {opt.lo(), opt.hi()};
  write_file_atomic(fmt::format("{}/state_rank{}.json", tmp, comm.rank()), s.dump(2) + "\n");
  comm.barrier();  // every rank's files are in place
  std::string final_dir;
  if (root) {
    final_dir = commit_checkpoint(run_dir, tmp, st.step);
    prune_checkpoints(run_dir, keep);
  }
  comm.broadcast(final_dir, 0);  // also: nobody runs ahead of a checkpoint that is not complete yet
  return final_dir;
}

nlohmann::json checkpoint_config(const std::string& ckpt_dir) {
  const std::string p = ckpt_dir + "/config.json";
  try {
    return nlohmann::json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint {}: config.json does not parse: {}", ckpt_dir, e.what());
  }
}

namespace {

// One field of a state file: present, of the right type, inside [lo, hi].
const nlohmann::json& state_field(const nlohmann::json& s, const char* key, const std::string& file) {
  if (!s.contains(key)) fail("checkpoint state {}: {} is missing", file, key);
  return s[key];
}

int64_t state_int(const nlohmann::json& s, const char* key, const std::string& file, int64_t lo, int64_t hi,
                  const char* what) {
  const nlohmann::json& v = state_field(s, key, file);
  const bool fits = v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX));
  if (!fits || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
    fail("checkpoint state {}: {} must be {} (got {})", file, key, what, v.dump());
  return v.get<int64_t>();
}

}  // namespace

TrainState read_checkpoint_state(const std::string& ckpt_dir) {
  const std::string file = ckpt_dir + "/state_rank0.json";
  nlohmann::json s;
  try {
    s = nlohmann::json::parse(read_file(file));
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint state {} does not parse: {}", file, e.what());
  }
  if (!s.is_object()) fail("checkpoint state {}: expected a JSON object (got {})", file, s.dump().substr(0, 80));
  const int64_t max = INT64_MAX;
  state_int(s, "format", file, kStateFormat, kStateFormat, fmt::format("{} (the format this build reads)", kStateFormat).c_str());
  TrainState st;
  st.step = state_int(s, "step", file, 0, max, "an integer >= 0");
  if (auto named = checkpoint_step_of(fs::path(ckpt_dir).filename().string()); named && *named != st.step)
    fail("checkpoint state {}: step must be {}, the step of its folder (got {})", file, *named, st.step);
  st.sequences = state_int(s, "sequences", file, 0, max, "an integer >= 0");
  st.tokens = state_int(s, "tokens", file, 0, max, "an integer >= 0");
  const nlohmann::json& e = state_field(s, "elapsed_s", file);
  if (!e.is_number() || !std::isfinite(e.get<double>()) || e.get<double>() < 0)
    fail("checkpoint state {}: elapsed_s must be a number >= 0 (got {})", file, e.dump());
  st.elapsed_s = e.get<double>();
  st.world_size = s.contains("world_size")
                      ? state_int(s, "world_size", file, 1, kMaxWorldSize, "an integer in [1, 2^20]")
                      : 1;
  st.adam_steps = state_int(s, "adam_steps", file, 0, st.step, "an integer in [0, step]");
  // written since the non-finite and loss-spike handling; absent in older checkpoints
  if (s.contains("skipped_steps"))
    st.skipped = state_int(s, "skipped_steps", file, 0, st.step, "an integer in [0, step]");
  if (s.contains("recent_losses")) {
    const nlohmann::json& r = s["recent_losses"];
    const bool ok = r.is_array() && std::all_of(r.begin(), r.end(), [](const nlohmann::json& x) {
      return x.is_number() && std::isfinite(x.get<double>());
    });
    if (!ok) fail("checkpoint state {}: recent_losses must be an array of finite numbers (got {})", file,
                  r.dump().substr(0, 80));
    st.recent_losses = r.get<std::vector<double>>();
  }
  if (s.contains("origin")) {  // written by dmatrain import
    if (!s["origin"].is_string())
      fail("checkpoint state {}: origin must be a string (got {})", file, s["origin"].dump().substr(0, 80));
    st.origin = s["origin"].get<std::string>();
  }
  return st;
}

TrainState load_checkpoint(const std::string& ckpt_dir, Model& m, AdamW* opt) {
  const TrainState st = read_checkpoint_state(ckpt_dir);
  load_model_weights(m, ckpt_dir + "/model.safetensors");
  if (opt) {
    // the full moments on the host, then this optimizer's range of them
    SafetensorsFile f(ckpt_dir + "/optim_rank0.safetensors");
    const Arena h = m.grads().like(Device::CPU);
    const int64_t n = opt->hi() - opt->lo();
    load_named(f, m, h, "m.");
    ops::copy(opt->m(), h.flat().rows(opt->lo(), n));
    load_named(f, m, h, "v.");
    ops::copy(opt->v(), h.flat().rows(opt->lo(), n));
    opt->set_steps_done(st.adam_steps);
  }
  return st;
}

}  // namespace dmat
