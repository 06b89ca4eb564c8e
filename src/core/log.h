// Logging: spdlog to the console and, once a run directory exists, to RUN_DIR/train.log.
// The pattern carries the rank so multi-rank logs stay readable.
#pragma once
#include <string>

#include <spdlog/spdlog.h>

namespace dmat {

// Console logger (idempotent). rank < 0: single process, no rank tag.
void init_logging(int rank = -1, bool quiet_nonzero_ranks = true);
// Adds RUN_DIR/train.log (appending) to the logger.
void log_to_file(const std::string& path);

}  // namespace dmat
