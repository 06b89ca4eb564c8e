#include "train/checkpoint.h"

#include <filesystem>

#include "io/checkpoint_dir.h"
#include "io/safetensors.h"

namespace dmat {

namespace fs = std::filesystem;
constexpr int kStateFormat = 1;

static std::vector<NamedTensor> named(const Model& m, const Arena& a, const std::string& prefix) {
  std::vector<NamedTensor> out;
  const auto& info = m.param_info();
  for (size_t i = 0; i < info.size(); ++i) out.push_back({prefix + info[i].name, a.get(int(i))});
  return out;
}

// Device arenas are staged through a host copy; files always hold full precision (fp32 on CUDA:
// the master weights), so a checkpoint resumes on either backend.
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

// Reads into `a`, through a host copy when `a` lives on the device.
static void load_arena(const SafetensorsFile& f, const Model& m, const Arena& a, const std::string& prefix) {
  if (a.device() == Device::CPU) return load_named(f, m, a, prefix);
  Arena h = a.like(Device::CPU);
  load_named(f, m, h, prefix);
  a.copy_from(h);
}

void load_model_weights(Model& m, const std::string& path) {
  SafetensorsFile f(path);
  if (m.device() == Device::CPU) return load_named(f, m, m.params(), "");
  Arena h = m.master().like(Device::CPU);
  load_named(f, m, h, "");
  m.set_weights(h);
}

std::string save_checkpoint(const std::string& run_dir, const Model& m, const AdamW& opt, const TrainState& st,
                            const nlohmann::json& resolved_config, int64_t keep) {
  const std::string tmp = begin_checkpoint(run_dir, st.step);
  save_model_weights(m, tmp + "/model.safetensors");
  const bool dev = opt.m().device() != Device::CPU;
  Arena hm = dev ? opt.m().like(Device::CPU) : Arena(), hv = dev ? opt.v().like(Device::CPU) : Arena();
  if (dev) {
    hm.copy_from(opt.m());
    hv.copy_from(opt.v());
  }
  auto moments = named(m, dev ? hm : opt.m(), "m.");
  for (auto& t : named(m, dev ? hv : opt.v(), "v.")) moments.push_back(t);
  write_safetensors(tmp + "/optim_rank0.safetensors", moments);
  nlohmann::json s = {{"format", kStateFormat},   {"step", st.step},
                      {"sequences", st.sequences}, {"tokens", st.tokens},
                      {"elapsed_s", st.elapsed_s}, {"world_size", st.world_size},
                      {"adam_steps", opt.steps_done()}};
  write_file_atomic(tmp + "/state_rank0.json", s.dump(2) + "\n");
  write_file_atomic(tmp + "/config.json", resolved_config.dump(2) + "\n");
  const std::string final_dir = commit_checkpoint(run_dir, tmp, st.step);
  prune_checkpoints(run_dir, keep);
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

TrainState load_checkpoint(const std::string& ckpt_dir, Model& m, AdamW* opt) {
  load_model_weights(m, ckpt_dir + "/model.safetensors");
  nlohmann::json s;
  try {
    s = nlohmann::json::parse(read_file(ckpt_dir + "/state_rank0.json"));
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint {}: state_rank0.json does not parse: {}", ckpt_dir, e.what());
  }
  if (s.value("format", 0) != kStateFormat)
    fail("checkpoint {}: state format {} (this build reads {})", ckpt_dir, s.value("format", 0), kStateFormat);
  TrainState st;
  st.step = s.at("step").get<int64_t>();
  st.sequences = s.at("sequences").get<int64_t>();
  st.tokens = s.at("tokens").get<int64_t>();
  st.elapsed_s = s.at("elapsed_s").get<double>();
  st.world_size = s.value("world_size", int64_t(1));
  if (opt) {
    SafetensorsFile f(ckpt_dir + "/optim_rank0.safetensors");
    load_arena(f, m, opt->m(), "m.");
    load_arena(f, m, opt->v(), "v.");
    opt->set_steps_done(s.at("adam_steps").get<int64_t>());
  }
  return st;
}

}  // namespace dmat
