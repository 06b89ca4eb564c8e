// dmat_test_train: `dmatrain train` for tests that must reach the trainer's test seams (TrainOptions)
// in a process launched by mpirun, where a test cannot pass a callback. Accepts CONFIG, --set k=v
// and --out DIR as `dmatrain train` does, plus:
//   --fault RANK:STEP:KIND  rank RANK, before step STEP's forward, throws (KIND throw), stops
//                           answering collectives (hang), raises SIGTERM (signal) or dies by
//                           SIGKILL (kill: no handler, no cleanup, as when the OOM killer strikes)
//   --host-buckets BYTES    TrainOptions::host_bucket_bytes (the GPU path's buckets on the host)
// A separate binary rather than hidden flags of dmatrain: the production CLI has no test paths.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "core/error.h"
#include "core/log.h"
#include "dist/communicator.h"
#include "train/trainer.h"

namespace {

void inject_fault(const std::string& spec, int64_t step) {
  int rank = -1;
  long long at = -1;
  char kind[16] = {};
  if (std::sscanf(spec.c_str(), "%d:%lld:%15s", &rank, &at, kind) != 3)
    dmat::fail("--fault must be RANK:STEP:throw|hang|signal|kill (got '{}')", spec);
  if (rank != dmat::dist::world().rank() || at != step) return;
  const std::string k = kind;
  if (k == "throw") dmat::fail("test fault injected on rank {} at step {}", rank, step);
  if (k == "hang") std::this_thread::sleep_for(std::chrono::hours(1));
  if (k == "signal") std::raise(SIGTERM);
  if (k == "kill") std::raise(SIGKILL);
}

}  // namespace

int main(int argc, char** argv) {
  dmat::init_logging();
  try {
    std::vector<std::string> a(argv + 1, argv + argc), sets;
    std::string config, fault;
    dmat::TrainOptions opt;
    for (size_t i = 0; i < a.size(); ++i) {
      const bool has_value = i + 1 < a.size();
      if (a[i] == "--set" && has_value) sets.push_back(a[++i]);
      else if (a[i] == "--out" && has_value) sets.push_back("run.dir=" + nlohmann::json(a[++i]).dump());
      else if (a[i] == "--fault" && has_value) fault = a[++i];
      else if (a[i] == "--host-buckets" && has_value) opt.host_bucket_bytes = std::stoll(a[++i]);
      else if (a[i].rfind("--", 0) != 0 && config.empty()) config = a[i];
      else dmat::fail("dmat_test_train: unexpected argument {}", a[i]);
    }
    if (!fault.empty()) opt.before_forward = [fault](int64_t step, dmat::Model&) { inject_fault(fault, step); };
    const dmat::Config cfg = dmat::load_config(config, sets);
    dmat::train(cfg, opt);
    return 0;
  } catch (const std::exception& e) {
    spdlog::shutdown();
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
