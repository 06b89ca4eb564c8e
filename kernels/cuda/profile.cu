#include "kernels/cuda/profile.h"

#include <algorithm>
#include <map>

#include "kernels/cuda/context.h"

namespace dmat::cuda {
namespace {

struct Record {
  std::string name;
  cudaEvent_t start = nullptr, stop = nullptr;
  double flops = 0;
};

struct Profiler {
  std::vector<Record> records, open, details, open_details;
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

int level() { return int(kernel_options().profile); }

std::vector<ProfileRow> summed(Profiler& p, const std::vector<Record>& recs, bool detail) {
  std::map<std::string, ProfileRow> sum;
  for (const Record& r : recs) {
    float ms = 0;
    DMAT_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.stop));
    ProfileRow& s = sum[r.name];
    s.name = r.name;
    s.ms += ms;
    s.calls += 1;
    s.flops += r.flops;
    s.detail = detail;
    p.pool.push_back(r.start);
    p.pool.push_back(r.stop);
  }
  std::vector<ProfileRow> out;
  for (auto& [name, row] : sum) out.push_back(row);
  std::sort(out.begin(), out.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.ms > b.ms; });
  return out;
}

}  // namespace

bool profiling() { return level() >= 1; }
bool profiling_gemms() { return level() == 2; }

namespace {
// Opens a record on `open` (its start event on the stream); closes the innermost one, false if none.
void open_record(std::vector<Record>& open, std::string name, double flops) {
  Profiler& p = prof();
  open.push_back(Record{std::move(name), p.event(), p.event(), flops});
  DMAT_CUDA_CHECK(cudaEventRecord(open.back().start, stream()));
}
bool close_record(std::vector<Record>& open, Record& r) {
  if (open.empty()) return false;
  r = open.back();
  open.pop_back();
  DMAT_CUDA_CHECK(cudaEventRecord(r.stop, stream()));
  return true;
}
}  // namespace

void profile_begin(const char* name) { open_record(prof().open, name, 0); }

void profile_end() {
  Profiler& p = prof();
  Record r;
  if (!close_record(p.open, r)) return;
  if (p.open.empty()) p.records.push_back(r);  // nested ops count in their outermost op only
  else p.pool.push_back(r.start), p.pool.push_back(r.stop);
}

void profile_detail_begin(std::string name, double flops) { open_record(prof().open_details, std::move(name), flops); }

void profile_detail_end() {
  Profiler& p = prof();
  Record r;
  if (close_record(p.open_details, r)) p.details.push_back(r);
}

std::vector<ProfileRow> profile_report() {
  Profiler& p = prof();
  DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));
  std::vector<ProfileRow> out = summed(p, p.records, false);
  std::vector<ProfileRow> det = summed(p, p.details, true);
  out.insert(out.end(), det.begin(), det.end());
  p.records.clear();
  p.details.clear();
  return out;
}

}  // namespace dmat::cuda
