// Data parallelism on the CPU backend through `mpirun -np 2` (ctest label mpi): equivalence with
// one rank, ZeRO-1 against plain DDP, checkpoints that resume on another number of ranks, and
// faults that end every rank in bounded time.
//
// Tolerance of the equivalence tests. Two ranks with micro-batch b and one rank with 2b compute the
// same sums in a different order: a weight gradient is one GEMM reduction over 2b·T rows on one
// rank but two reductions over b·T rows plus one MPI addition on two; the loss and the gradient
// norm likewise. Each update therefore differs by fp32 rounding (~1e-7 relative), and AdamW, which
// divides by √v, can amplify this for elements whose gradient is near zero. After 10 updates at
// lr 3e-3 we require every weight within 2e-5 absolute (weights are O(0.02..1); the largest
// measured difference is printed: 3.3e-6), every AdamW moment within 2e-6 (measured 1.1e-8), and
// every logged loss, validation loss and gradient norm within 1e-5 relative. ZeRO-1
// reduces each gradient element with the same two-operand sum as the all-reduce, so it must match
// plain DDP to the last bit except through the gradient norm (summed per shard, then over ranks):
// 1e-6 absolute (measured: 0, bit for bit).
#include <gtest/gtest.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "io/checkpoint_dir.h"
#include "safetensors_diff.h"
#include "test_util.h"

namespace dmat {
namespace {

namespace fs = std::filesystem;
using test::metric_column;
using test::run;

std::string bin() { return test::dmatrain_bin(); }

// Prepares the bundled corpus (byte tokenizer) under dir/data; returns a tiny, fast training
// setup on it: 1 layer, T=64, 10 updates of 2 micro-batches, one thread per rank.
std::string setup(const std::string& dir) {
  return test::source_dir() + "/configs/tiny.json --set run.threads=1 --set run.device=cpu" +
         test::prepare_bundled_data(dir) +
         " --set model.n_layers=1 --set train.seq_len=64 --set train.grad_accum=2 --set train.steps=10" +
         " --set run.log_interval=1 --set train.eval_interval=5 --set train.eval_batches=2" +
         " --set train.checkpoint_interval=0 --set run.collective_timeout_s=60";
}

// `dmatrain train` on np ranks (np 0: without mpirun at all).
test::CmdResult train(int np, const std::string& args, const std::string& env = "") {
  const std::string launch = np == 0 ? "" : test::mpirun(np) + " " + env + " ";
  return run(launch + bin() + " train " + args);
}

// dmat_test_train (tests/train_driver.cpp) on np ranks: `dmatrain train` with the trainer's test
// seams, `seams` being its --fault / --host-buckets flags.
test::CmdResult train_with_seams(int np, const std::string& args, const std::string& seams) {
  return run(test::mpirun(np) + " " + DMAT_TEST_TRAIN + " " + seams + " " + args);
}

using test::max_abs_diff;

std::string final_ckpt(const std::string& run_dir) { return run_dir + "/checkpoints/step_00000010"; }

void expect_same_run(const std::string& a, const std::string& b, double weight_tol, const char* what) {
  const double dw = max_abs_diff(final_ckpt(a) + "/model.safetensors", final_ckpt(b) + "/model.safetensors");
  const double dm = max_abs_diff(final_ckpt(a) + "/optim_rank0.safetensors", final_ckpt(b) + "/optim_rank0.safetensors");
  std::cout << what << ": max |Δweight| " << dw << ", max |Δmoment| " << dm << "\n";
  EXPECT_LT(dw, weight_tol) << what;
  // AdamW's update is nearly invariant to the gradient's scale, so the weights alone would not see
  // gradients summed twice or not averaged; the moments would (measured ~1e-8 for 2 vs 1 rank).
  EXPECT_LT(dm, weight_tol / 10) << what;
  auto la = metric_column(a, "loss"), lb = metric_column(b, "loss");
  ASSERT_EQ(la.size(), 10u) << a;
  ASSERT_EQ(lb.size(), 10u) << b << " (rank 0 alone writes metrics rows)";
  for (auto& [s, l] : la) EXPECT_NEAR(lb[s], l, 1e-5 * std::abs(l)) << what << ", loss at step " << s;
  auto va = metric_column(a, "val_loss"), vb = metric_column(b, "val_loss");
  ASSERT_EQ(va.size(), 2u);
  for (auto& [s, l] : va) EXPECT_NEAR(vb[s], l, 1e-5 * std::abs(l)) << what << ", val loss at step " << s;
}

TEST(MpiTrain, TwoRanksWithBatchBMatchOneRankWith2B) {
  const std::string dir = test::temp_dir("mpi_ddp");
  const std::string cfg = setup(dir);
  auto one = train(0, cfg + " --set train.batch_size=8 --out " + dir + "/one");
  ASSERT_EQ(one.rc, 0) << one.out;
  auto two = train(2, cfg + " --set train.batch_size=4 --out " + dir + "/two");
  ASSERT_EQ(two.rc, 0) << two.out;
  EXPECT_NE(two.out.find("data parallel: 2 ranks (mpi)"), std::string::npos) << two.out;
  // rank 0 alone logs at info level and writes the shared files; every rank writes its state
  EXPECT_EQ(two.out.find("[rank 1] step"), std::string::npos) << two.out;
  EXPECT_TRUE(fs::exists(final_ckpt(dir + "/two") + "/state_rank0.json"));
  EXPECT_TRUE(fs::exists(final_ckpt(dir + "/two") + "/state_rank1.json"));
  EXPECT_FALSE(fs::exists(final_ckpt(dir + "/one") + "/state_rank1.json"));
  expect_same_run(dir + "/one", dir + "/two", 2e-5, "2 ranks × b vs 1 rank × 2b");
  // the grad norm is a global quantity: the same on both
  auto na = metric_column(dir + "/one", "grad_norm"), nb = metric_column(dir + "/two", "grad_norm");
  for (auto& [s, n] : na) EXPECT_NEAR(nb[s], n, 1e-5 * n) << "grad norm at step " << s;
}

// run.threads = 0 shares the node's cores among its ranks: two ranks that each took every core would
// run twice as many OpenMP threads as cores (their idle threads spinning after every parallel region).
TEST(MpiTrain, DefaultThreadsShareTheNodesCores) {
  const std::string dir = test::temp_dir("mpi_threads");
  auto two = train(2, setup(dir) + " --set run.threads=0 --set train.steps=1 --out " + dir + "/two");
  ASSERT_EQ(two.rc, 0) << two.out;
  const int want = std::max(1, omp_get_num_procs() / 2);
  EXPECT_NE(two.out.find("backend: cpu (" + std::to_string(want) + " threads per rank)"), std::string::npos)
      << "expected " << want << " threads per rank:\n" << two.out;
}

// The GPU path reduces gradients in buckets from Model's grad-ready hook during backward; run on the
// host communicator (TrainOptions::host_bucket_bytes: 16 KiB buckets, so several per block) every element is
// still summed once, with the same two operands: bit for bit the plain all-reduce.
TEST(MpiTrain, GradientBucketsFromTheBackwardHookEqualOneAllReduce) {
  const std::string dir = test::temp_dir("mpi_buckets");
  const std::string cfg = setup(dir) + " --set train.batch_size=4 --set model.n_layers=2";
  auto plain = train(2, cfg + " --out " + dir + "/plain");
  ASSERT_EQ(plain.rc, 0) << plain.out;
  auto buckets = train_with_seams(2, cfg + " --out " + dir + "/buckets", "--host-buckets 16384");
  ASSERT_EQ(buckets.rc, 0) << buckets.out;
  expect_same_run(dir + "/plain", dir + "/buckets", 1e-30, "bucketed vs one all-reduce");
}

TEST(MpiTrain, ZeroOneMatchesPlainDataParallel) {
  const std::string dir = test::temp_dir("mpi_zero");
  const std::string cfg = setup(dir) + " --set train.batch_size=4";
  auto ddp = train(2, cfg + " --out " + dir + "/ddp");
  ASSERT_EQ(ddp.rc, 0) << ddp.out;
  auto zero = train(2, cfg + " --set train.zero=1 --out " + dir + "/zero");
  ASSERT_EQ(zero.rc, 0) << zero.out;
  EXPECT_NE(zero.out.find("ZeRO-1"), std::string::npos) << zero.out;
  expect_same_run(dir + "/ddp", dir + "/zero", 1e-6, "ZeRO-1 vs DDP");
  // each rank's state names its optimizer shard: two halves that tile the arena
  auto s0 = nlohmann::json::parse(std::ifstream(final_ckpt(dir + "/zero") + "/state_rank0.json"));
  auto s1 = nlohmann::json::parse(std::ifstream(final_ckpt(dir + "/zero") + "/state_rank1.json"));
  EXPECT_EQ(s0["zero_shard"][0], 0);
  EXPECT_EQ(s0["zero_shard"][1], s1["zero_shard"][0]);
  EXPECT_GT(s1["zero_shard"][1].get<int64_t>(), s1["zero_shard"][0].get<int64_t>());
}

// A checkpoint holds full weights and full moments, so it continues on any number of ranks, with or
// without ZeRO; the data position is one global index, so the continued run sees the same data.
TEST(MpiTrain, CheckpointsResumeOnAnotherNumberOfRanks) {
  const std::string dir = test::temp_dir("mpi_resume");
  const std::string cfg = setup(dir);
  const std::string b1 = " --set train.batch_size=8", b2 = " --set train.batch_size=4";
  auto ref = train(0, cfg + b1 + " --out " + dir + "/ref");
  ASSERT_EQ(ref.rc, 0) << ref.out;

  // 2 ranks (ZeRO-1) → 1 rank
  auto a1 = train(2, cfg + b2 + " --set train.zero=1 --out " + dir + "/a --stop-at 5");
  ASSERT_EQ(a1.rc, 0) << a1.out;
  ASSERT_TRUE(fs::exists(dir + "/a/checkpoints/step_00000005/state_rank1.json"));
  auto a2 = train(0, cfg + b1 + " --out " + dir + "/a --resume");
  ASSERT_EQ(a2.rc, 0) << a2.out;
  EXPECT_NE(a2.out.find("written by 2 rank(s), continued on 1"), std::string::npos) << a2.out;
  expect_same_run(dir + "/ref", dir + "/a", 2e-5, "2 ranks (ZeRO-1) to step 5, then 1 rank");

  // 1 rank → 2 ranks (plain DDP)
  auto b1r = train(0, cfg + b1 + " --out " + dir + "/b --stop-at 5");
  ASSERT_EQ(b1r.rc, 0) << b1r.out;
  auto b2r = train(2, cfg + b2 + " --out " + dir + "/b --resume");
  ASSERT_EQ(b2r.rc, 0) << b2r.out;
  EXPECT_NE(b2r.out.find("written by 1 rank(s), continued on 2"), std::string::npos) << b2r.out;
  expect_same_run(dir + "/ref", dir + "/b", 2e-5, "1 rank to step 5, then 2 ranks");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(MpiTrain, ARankThatThrowsEndsEveryRankInBoundedTime) {
  const std::string dir = test::temp_dir("mpi_throw");
  const std::string cfg = setup(dir) + " --set train.batch_size=4 --set train.steps=1000";
  const auto t0 = std::chrono::steady_clock::now();
  auto r = train_with_seams(2, cfg + " --out " + dir + "/run", "--fault 1:3:throw");
  const double dt = seconds_since(t0);
  std::cout << "mpirun exited " << r.rc << " after " << dt << " s\n";
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_LT(dt, 30.0);
  EXPECT_NE(r.out.find("[rank 1 of 2] test fault injected on rank 1 at step 3"), std::string::npos) << r.out;
}

TEST(MpiTrain, AStuckCollectiveBecomesAnError) {
  const std::string dir = test::temp_dir("mpi_timeout");
  const std::string cfg = setup(dir) + " --set train.batch_size=4 --set train.steps=1000";
  const auto t0 = std::chrono::steady_clock::now();
  // rank 1 stops answering before step 3; rank 0 waits in the step's all-reduce
  auto r = train_with_seams(2, cfg + " --set run.collective_timeout_s=2 --out " + dir + "/run", "--fault 1:3:hang");
  const double dt = seconds_since(t0);
  std::cout << "mpirun exited " << r.rc << " after " << dt << " s\n";
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_LT(dt, 30.0);
  EXPECT_NE(r.out.find("[rank 0 of 2] collective"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("run.collective_timeout_s = 2 s"), std::string::npos) << r.out;
}

// SIGTERM reaching one rank stops every rank at the same step, after a checkpoint they all write.
TEST(MpiTrain, ASignalOnOneRankCheckpointsAndStopsEveryRank) {
  const std::string dir = test::temp_dir("mpi_signal");
  const std::string cfg = setup(dir) + " --set train.batch_size=4 --set train.steps=1000";
  const auto t0 = std::chrono::steady_clock::now();
  auto r = train_with_seams(2, cfg + " --out " + dir + "/run", "--fault 1:4:signal");
  EXPECT_LT(seconds_since(t0), 30.0);
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("interrupted by signal 15 at step 4"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("MPI_ABORT"), std::string::npos) << "an agreed stop is not an abort:\n" << r.out;
  const std::string ck = dir + "/run/checkpoints/step_00000004";
  EXPECT_TRUE(fs::exists(ck + "/COMPLETE"));
  EXPECT_TRUE(fs::exists(ck + "/state_rank0.json"));
  EXPECT_TRUE(fs::exists(ck + "/state_rank1.json"));
}

// SIGKILL on one rank (no handler runs, nothing is flushed): every rank ends within the collective
// timeout, the newest complete checkpoint is the one before the kill, and --resume on 2 ranks ends
// bit-identical to an uninterrupted 2-rank run (same ranks, same reduction order).
TEST(MpiTrain, ARankKilledBySigkillEndsEveryRankAndResumesBitIdentical) {
  const std::string dir = test::temp_dir("mpi_sigkill");
  const std::string cfg = setup(dir) + " --set train.batch_size=4 --set train.checkpoint_interval=2" +
                          " --set run.collective_timeout_s=5";
  auto a = train(2, cfg + " --out " + dir + "/a");
  ASSERT_EQ(a.rc, 0) << a.out;

  const auto t0 = std::chrono::steady_clock::now();
  auto k = train_with_seams(2, cfg + " --out " + dir + "/b", "--fault 1:7:kill");
  const double dt = seconds_since(t0);
  std::cout << "mpirun exited " << k.rc << " after " << dt << " s\n";
  EXPECT_NE(k.rc, 0) << k.out;
  EXPECT_LT(dt, 30.0) << "the surviving rank did not end within the collective timeout (5 s) plus start-up";
  const auto ck = latest_checkpoint(dir + "/b");
  ASSERT_TRUE(ck) << k.out;
  EXPECT_EQ(ck->step, 6) << "the newest complete checkpoint is not the last one before the kill";

  auto r = train(2, cfg + " --out " + dir + "/b --resume");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(metric_column(dir + "/a", "loss"), metric_column(dir + "/b", "loss"));
  EXPECT_EQ(metric_column(dir + "/a", "val_loss"), metric_column(dir + "/b", "val_loss"));
  for (const char* f : {"model.safetensors", "optim_rank0.safetensors"})
    EXPECT_TRUE(test::file_bytes(final_ckpt(dir + "/a") + "/" + f) == test::file_bytes(final_ckpt(dir + "/b") + "/" + f))
        << f << " differs from the uninterrupted run's";
}

}  // namespace
}  // namespace dmat
