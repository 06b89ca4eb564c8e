#include "test_util.h"

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>

#include <gtest/gtest.h>

namespace dmat::test {

std::string temp_dir(const std::string& tag) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(DMAT_BUILD_DIR) / "test_scratch" / tag;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string source_dir() { return DMAT_SOURCE_DIR; }
std::string dmatrain_bin() { return DMAT_BINARY; }

CmdResult run(const std::string& cmd) {
  CmdResult r;
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (!f) {
    r.rc = -1;
    return r;
  }
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) r.out.append(buf.data(), n);
  int st = pclose(f);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

std::string mpirun(int np) {
  return "mpirun --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(np);
}

std::string prepare_bundled_data(const std::string& dir) {
  auto r = run(dmatrain_bin() + " data prepare --tokenizer byte --val-fraction 0.03 --out " + dir + "/data " +
               source_dir() + "/data/english");
  EXPECT_EQ(r.rc, 0) << r.out;
  return " --set data.train=" + dir + "/data/train --set data.val=" + dir + "/data/val";
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

std::map<int64_t, double> metric_column(const std::string& run_dir, const char* key) {
  std::map<int64_t, double> m;
  for (auto& r : read_jsonl(run_dir + "/metrics.jsonl"))
    if (r.contains(key)) m[r["step"].get<int64_t>()] = r[key].get<double>();
  return m;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  if (std::filesystem::path(path).has_parent_path()) std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

void expect_resume_bit_exact(const std::string& tag, const std::string& config, const std::string& sets) {
  namespace fs = std::filesystem;
  const std::string dir = temp_dir(tag), bin = dmatrain_bin();
  const std::string cfg = source_dir() + "/" + config + sets + " --set train.steps=14" +
                          " --set train.grad_accum=2 --set train.eval_interval=7 --set train.eval_batches=2" +
                          prepare_bundled_data(dir);
  auto r = run(bin + " train " + cfg + " --out " + dir + "/a");
  ASSERT_EQ(r.rc, 0) << r.out;
  r = run(bin + " train " + cfg + " --out " + dir + "/b --stop-at 7");
  ASSERT_EQ(r.rc, 0) << r.out;
  r = run(bin + " train " + cfg + " --out " + dir + "/b --resume");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto losses = [](const std::string& p) {
    std::vector<double> v;
    for (const auto& j : read_jsonl(p)) {
      if (j.contains("loss")) v.push_back(j["loss"].get<double>());
      if (j.contains("val_loss")) v.push_back(j["val_loss"].get<double>());
    }
    return v;
  };
  EXPECT_EQ(losses(dir + "/a/metrics.jsonl"), losses(dir + "/b/metrics.jsonl"));
  const std::string fa = dir + "/a/checkpoints/step_00000014/model.safetensors";
  const std::string fb = dir + "/b/checkpoints/step_00000014/model.safetensors";
  ASSERT_TRUE(fs::exists(fa) && fs::exists(fb)) << fa;
  EXPECT_TRUE(file_bytes(fa) == file_bytes(fb)) << "final weights differ";
  EXPECT_TRUE(file_bytes(dir + "/a/checkpoints/step_00000014/optim_rank0.safetensors") ==
              file_bytes(dir + "/b/checkpoints/step_00000014/optim_rank0.safetensors"))
      << "final AdamW moments differ";
}

}  // namespace dmat::test
