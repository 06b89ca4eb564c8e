#include "core/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

namespace dmat {

void init_logging(int rank, bool quiet_nonzero_ranks) {
  auto console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("dmatrain", console);
  std::string tag = rank >= 0 ? fmt::format("[rank {}] ", rank) : "";
  logger->set_pattern("[%Y-%m-%d %H:%M:%S] [%^%l%$] " + tag + "%v");
  if (rank > 0 && quiet_nonzero_ranks) logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

void log_to_file(const std::string& path) {
  auto sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  sink->set_pattern("[%Y-%m-%d %H:%M:%S] [%l] %v");
  spdlog::default_logger()->sinks().push_back(sink);
  spdlog::flush_every(std::chrono::seconds(2));
}

}  // namespace dmat
