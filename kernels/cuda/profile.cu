#include "kernels/cuda/profile.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>

#include "kernels/cuda/context.h"

namespace dmat::cuda {
namespace {

struct Record {
  const char* name;
  cudaEvent_t start, stop;
};

struct Profiler {
  std::vector<Record> records, open;
  std::vector<cudaEvent_t> pool;
  cudaEvent_t event() {
    if (!pool.empty()) {
      cudaEvent_t e = pool.back();
      pool.pop_back();
      return e;
    }
    cudaEvent_t e;
    DMAT_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
};

Profiler& prof() {
  static Profiler* p = new Profiler();
  return *p;
}

}  // namespace

bool profiling() {
  static const bool on = [] {
    const char* e = std::getenv("DMAT_PROFILE");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  return on;
}

void profile_begin(const char* name) {
  Profiler& p = prof();
  Record r{name, p.event(), p.event()};
  DMAT_CUDA_CHECK(cudaEventRecord(r.start, stream()));
  p.open.push_back(r);
}

void profile_end() {
  Profiler& p = prof();
  if (p.open.empty()) return;
  Record r = p.open.back();
  p.open.pop_back();
  DMAT_CUDA_CHECK(cudaEventRecord(r.stop, stream()));
  if (p.open.empty()) p.records.push_back(r);  // nested ops count in their outermost op only
  else p.pool.push_back(r.start), p.pool.push_back(r.stop);
}

std::vector<std::pair<std::string, std::pair<double, long>>> profile_report() {
  Profiler& p = prof();
  DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));
  std::map<std::string, std::pair<double, long>> sum;
  for (const Record& r : p.records) {
    float ms = 0;
    DMAT_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.stop));
    auto& s = sum[r.name];
    s.first += ms;
    s.second += 1;
    p.pool.push_back(r.start);
    p.pool.push_back(r.stop);
  }
  p.records.clear();
  std::vector<std::pair<std::string, std::pair<double, long>>> out(sum.begin(), sum.end());
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  return out;
}

}  // namespace dmat::cuda
