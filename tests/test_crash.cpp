// Crashes survived: a CPU training run killed with SIGKILL at random points (while it writes a
// checkpoint too) and resumed every time ends bit-identical to an uninterrupted run; a checkpoint
// write that fails (a file-size limit, so write() returns EFBIG as on a full disk) stops the run with
// an error naming the file and leaves the previous checkpoint intact.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/rng.h"
#include "io/checkpoint_dir.h"
#include "test_util.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using test::file_bytes;

// 1 layer, T = 64, 4 sequences a step, 40 steps, a checkpoint every 2 steps (so kills often land in
// one), the newest 2 kept.
std::string config(const std::string& dir) {
  return test::source_dir() + "/configs/tiny.json" + test::prepare_bundled_data(dir) +
         " --set run.threads=1 --set run.device=cpu --set model.n_layers=1 --set train.seq_len=64"
         " --set train.batch_size=4 --set train.steps=40 --set run.log_interval=1 --set train.eval_interval=10"
         " --set train.eval_batches=1 --set train.checkpoint_interval=2 --set run.keep_checkpoints=2";
}

// Starts `sh -c "exec CMD"` with output to log; the shell's exec makes the pid dmatrain's own.
pid_t spawn(const std::string& cmd, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const std::string line = "exec " + cmd + " > " + log + " 2>&1";
    ::execl("/bin/sh", "sh", "-c", line.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Waits for pid; its exit code, or 128 + the signal that ended it.
int wait_exit(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

bool exited(pid_t pid, int* code) {
  int st = 0;
  if (::waitpid(pid, &st, WNOHANG) != pid) return false;
  *code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return true;
}

// The temp checkpoint folders of a run, by name, inode and modification time.
using Folders = std::set<std::tuple<std::string, uint64_t, int64_t>>;
Folders temp_folders(const std::string& run_dir) {
  Folders out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir + "/checkpoints", ec)) {
    const std::string name = e.path().filename().string();
    struct stat st;
    if (name.rfind(".tmp_step_", 0) == 0 && ::stat(e.path().c_str(), &st) == 0)
      out.insert({name, uint64_t(st.st_ino), int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec});
  }
  return out;
}

// A checkpoint folder being written: a temp folder other than those a killed run left behind
// (`stale`; the next process removes one of the same step and starts it afresh).
bool writing_checkpoint(const std::string& run_dir, const Folders& stale) {
  for (const auto& f : temp_folders(run_dir))
    if (!stale.count(f)) return true;
  return false;
}

// The step of the last complete row of RUN_DIR/metrics.jsonl (-1 before any; one row per step here).
int64_t last_logged_step(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  int64_t step = -1;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded() && j.contains("step")) step = j["step"].get<int64_t>();
  }
  return step;
}

std::map<int64_t, double> losses(const std::string& run_dir, const char* key) {
  return test::metric_column(run_dir, key);
}

TEST(Crash, KilledAtRandomPointsAndResumedEndsBitIdentical) {
  const std::string dir = test::temp_dir("crash_kill");
  const std::string cfg = config(dir), bin = test::dmatrain_bin();
  auto a = test::run(bin + " train " + cfg + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;

  const std::string b = dir + "/b", cmd = bin + " train " + cfg + " --out " + b + " --resume";
  Rng rng(22);
  int killed = 0, killed_writing = 0;
  int64_t last_step = -1;
  for (int round = 0; round < 8; ++round) {
    // Kill moments follow the run's progress, not the clock, so the test means the same on a fast
    // machine, a loaded one and under the sanitizers: even rounds, a random moment (0-10 ms) after
    // the row of a random one of the next 4 steps (beyond the rows a killed run left) is written;
    // odd rounds, as soon as a checkpoint is being written. At most ~28 of the 40 steps are done
    // when the rounds end, so the run is killed 8 times.
    const Folders stale = temp_folders(b);
    const int64_t target = std::max(last_step, last_logged_step(b)) + 1 + int64_t(rng.below(4));
    const double delay_s = 0.01 * rng.uniform();
    const pid_t pid = spawn(cmd, dir + "/b.log");
    const auto t0 = std::chrono::steady_clock::now();
    double reached_s = -1;
    int code = 0;
    bool done = false;
    while (!(done = exited(pid, &code))) {
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round % 2 == 0) {
        if (reached_s < 0 && last_logged_step(b) >= target) reached_s = t;
        if (reached_s >= 0 && t >= reached_s + delay_s) break;
      } else if (writing_checkpoint(b, stale)) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (done) {  // it reached the end first
      ASSERT_EQ(code, 0) << file_bytes(dir + "/b.log");
      break;
    }
    ::kill(pid, SIGKILL);
    ASSERT_EQ(wait_exit(pid), 128 + SIGKILL);
    ++killed;
    if (writing_checkpoint(b, stale)) ++killed_writing;
    // what --resume will use: a complete checkpoint, never older than the last one seen
    const auto ck = latest_checkpoint(b);
    const int64_t step = ck ? ck->step : -1;
    EXPECT_GE(step, last_step) << "round " << round;
    if (ck) EXPECT_TRUE(fs::exists(ck->path + "/COMPLETE"));
    last_step = step;
  }
  std::cout << "killed " << killed << " times (" << killed_writing << " while a checkpoint was being written); newest "
            << "complete checkpoint then: step " << last_step << "\n";
  EXPECT_EQ(killed, 8) << "the run ended before the test killed it 8 times";
  EXPECT_GE(killed_writing, 1) << "no kill landed while a checkpoint was being written";

  // a checkpoint write that fails: files may not grow past 512 KiB, so model.safetensors (1 MB) cannot
  // be written (SIGXFSZ ignored: write() returns EFBIG); the run stops naming the file, the previous
  // checkpoint is untouched. In a run of its own, stopped at step 10 first, so that a checkpoint is
  // still to come whether or not the killed run above reached its end.
  const std::string c = dir + "/c", ccmd = bin + " train " + cfg + " --out " + c;
  auto first = test::run(ccmd + " --stop-at 10");
  ASSERT_EQ(first.rc, 0) << first.out;
  const auto before = latest_checkpoint(c);
  ASSERT_TRUE(before) << "no checkpoint after --stop-at 10";
  const std::string model_before = file_bytes(before->path + "/model.safetensors");
  auto full = test::run("bash -c \"trap '' XFSZ; ulimit -f 512; exec " + ccmd + " --resume\"");
  EXPECT_EQ(full.rc, 1) << full.out;
  EXPECT_NE(full.out.find("model.safetensors.tmp: write failed: File too large"), std::string::npos) << full.out;
  const auto after = latest_checkpoint(c);
  ASSERT_TRUE(after);
  EXPECT_EQ(after->path, before->path) << "the failed write left a checkpoint newer than the previous one";
  EXPECT_EQ(file_bytes(after->path + "/model.safetensors"), model_before);
  EXPECT_NE(file_bytes(c + "/train.log").find("write failed: File too large"), std::string::npos)
      << "the error is not in train.log";

  // resumed to the end: the same losses and the same final weights and moments, bit for bit
  auto end = test::run(cmd);
  ASSERT_EQ(end.rc, 0) << end.out;
  EXPECT_EQ(losses(dir + "/a", "loss"), losses(b, "loss"));
  EXPECT_EQ(losses(dir + "/a", "val_loss"), losses(b, "val_loss"));
  ASSERT_EQ(losses(b, "loss").size(), 40u);
  for (const char* f : {"model.safetensors", "optim_rank0.safetensors"})
    EXPECT_TRUE(file_bytes(dir + "/a/checkpoints/step_00000040/" + f) == file_bytes(b + "/checkpoints/step_00000040/" + f))
        << f << " differs from the uninterrupted run's";
}

}  // namespace
}  // namespace dmat
