// Crashes survived: a CPU training run killed with SIGKILL at random points (while it writes a
// checkpoint too) and resumed every time ends bit-identical to an uninterrupted run; a checkpoint
// write that fails (a file-size limit, so write() returns EFBIG as on a full disk) stops the run with
// an error naming the file and leaves the previous checkpoint intact.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <map>
#include <string>
#include <thread>

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

// A checkpoint folder being written (its temp folder exists).
bool writing_checkpoint(const std::string& run_dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir + "/checkpoints", ec))
    if (e.path().filename().string().rfind(".tmp_step_", 0) == 0) return true;
  return false;
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
    const pid_t pid = spawn(cmd, dir + "/b.log");
    // even rounds: a random moment; odd rounds: as soon as a checkpoint is being written
    const auto t0 = std::chrono::steady_clock::now();
    const double wait_s = 0.05 + 0.6 * rng.uniform();
    int code = 0;
    bool done = false;
    while (!(done = exited(pid, &code))) {
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round % 2 == 0 ? t >= wait_s : writing_checkpoint(b) || t > 5.0) break;
      std::this_thread::sleep_for(std::chrono::microseconds(round % 2 == 0 ? 2000 : 200));
    }
    if (done) {  // it reached the end first
      ASSERT_EQ(code, 0) << file_bytes(dir + "/b.log");
      break;
    }
    ::kill(pid, SIGKILL);
    ASSERT_EQ(wait_exit(pid), 128 + SIGKILL);
    ++killed;
    if (writing_checkpoint(b)) ++killed_writing;
    // what --resume will use: a complete checkpoint, never older than the last one seen
    const auto ck = latest_checkpoint(b);
    const int64_t step = ck ? ck->step : -1;
    EXPECT_GE(step, last_step) << "round " << round;
    if (ck) EXPECT_TRUE(fs::exists(ck->path + "/COMPLETE"));
    last_step = step;
  }
  std::cout << "killed " << killed << " times (" << killed_writing << " while a checkpoint was being written); newest "
            << "complete checkpoint then: step " << last_step << "\n";
  EXPECT_GE(killed, 4) << "the run ended before the test could kill it often: it is too short for this machine";
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
