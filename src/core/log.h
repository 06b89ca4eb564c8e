// Logging: spdlog to the console and, once a run directory is accepted, to RUN_DIR/train.log.
// The pattern carries the rank so multi-rank logs stay readable.
#pragma once
#include <string>

#include <spdlog/spdlog.h>

namespace dmat {

// Console logger (idempotent). rank < 0: single process, no rank tag.
void init_logging(int rank = -1, bool quiet_nonzero_ranks = true);

// The log of one training run, which starts before its run directory is accepted (a refused start
// must leave the directory as it was). RunLog holds the lines logged from its creation on in memory;
// attach(path) writes them to RUN_DIR/train.log (appending) and sends every later line there too;
// error(msg) writes an error that ends the run to train.log alone (main prints it on the console).
// The destructor goes back to the console alone. Each change swaps the default logger under
// spdlog's registry lock, so the periodic flusher never sees a sink list being edited.
class RunLog {
 public:
  RunLog();
  ~RunLog();
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;
  void attach(const std::string& path);
  bool attached() const { return attached_; }
  void error(const std::string& msg);

 private:
  bool attached_ = false;
};

}  // namespace dmat
