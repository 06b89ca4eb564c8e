// Helpers shared by the test suites: temp folders, running the CLI, random inputs.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"

namespace dmat::test {

// A fresh empty folder under the build tree's test scratch area (removed and recreated).
std::string temp_dir(const std::string& tag);
std::string source_dir();   // the repository root
std::string dmatrain_bin(); // path of the built CLI

struct CmdResult {
  int rc = 0;
  std::string out;  // stdout and stderr together
};
// Runs a shell command, capturing stdout+stderr.
CmdResult run(const std::string& cmd);
// "mpirun -np N" with the flags needed here (root allowed, oversubscribe).
std::string mpirun(int np);

// Prepares the bundled English corpus (byte tokenizer, val fraction 0.03) under dir/data with the
// built CLI (the test fails if that fails); returns the --set flags pointing a config at it.
std::string prepare_bundled_data(const std::string& dir);
// The rows of a JSON-lines file (metrics.jsonl), blank lines skipped.
std::vector<nlohmann::json> read_jsonl(const std::string& path);
// One metric of a training run by step: key's value in every row of run_dir/metrics.jsonl that has it.
std::map<int64_t, double> metric_column(const std::string& run_dir, const char* key);
// A whole file's bytes ("" if it cannot be read).
std::string file_bytes(const std::string& path);
// Writes bytes as the whole file, creating its folder.
void write_bytes(const std::string& path, const std::string& bytes);

// Training through the CLI, stopped at step 7 and resumed, gives the same losses and final weights
// and AdamW moments as the uninterrupted 14-step run (2 micro-batches, evaluation at 7 and 14), bit
// for bit. config: a path under the repository; sets: further --set options (the device, the model).
void expect_resume_bit_exact(const std::string& tag, const std::string& config, const std::string& sets);

// Expects f() to throw dmat::Error whose message contains every one of parts.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected dmat::Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  }
}

// Fills with values uniform in [lo, hi) from a fresh seed per call site (seed mixed with a counter).
template <class T>
void random_fill(std::vector<T>& v, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Rng r(seed);
  for (auto& x : v) x = T(lo + (hi - lo) * r.uniform());
}

}  // namespace dmat::test
