#include "core/log.h"

#include <fstream>
#include <vector>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

namespace dmat {

namespace {

constexpr const char* kFilePattern = "[%Y-%m-%d %H:%M:%S] [%l] %v";
constexpr size_t kHeldLines = 1024;  // far more than a run logs before its directory is accepted

// The default logger with its first sink (the console) and `extra`, same name and level.
void set_sinks(const std::vector<spdlog::sink_ptr>& extra) {
  const auto old = spdlog::default_logger();
  std::vector<spdlog::sink_ptr> sinks = {old->sinks().front()};
  sinks.insert(sinks.end(), extra.begin(), extra.end());
  auto logger = std::make_shared<spdlog::logger>(old->name(), sinks.begin(), sinks.end());
  logger->set_level(old->level());
  spdlog::set_default_logger(logger);
}

template <class Sink>
std::shared_ptr<Sink> find_sink() {
  for (const auto& s : spdlog::default_logger()->sinks())
    if (auto p = std::dynamic_pointer_cast<Sink>(s)) return p;
  return nullptr;
}

}  // namespace

void init_logging(int rank, bool quiet_nonzero_ranks) {
  auto console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("dmatrain", console);
  std::string tag = rank >= 0 ? fmt::format("[rank {}] ", rank) : "";
  logger->set_pattern("[%Y-%m-%d %H:%M:%S] [%^%l%$] " + tag + "%v");
  if (rank > 0 && quiet_nonzero_ranks) logger->set_level(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

RunLog::RunLog() {
  auto held = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(kHeldLines);
  held->set_pattern(kFilePattern);
  set_sinks({held});
}

RunLog::~RunLog() {
  spdlog::default_logger()->flush();
  set_sinks({});
}

void RunLog::attach(const std::string& path) {
  if (auto held = find_sink<spdlog::sinks::ringbuffer_sink_mt>()) {
    std::ofstream out(path, std::ios::app);
    for (const auto& line : held->last_formatted()) out << line;
  }
  auto file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  file->set_pattern(kFilePattern);
  set_sinks({file});
  spdlog::flush_every(std::chrono::seconds(2));
  attached_ = true;
}

void RunLog::error(const std::string& msg) {
  auto file = find_sink<spdlog::sinks::basic_file_sink_mt>();
  if (!file) return;
  spdlog::details::log_msg m(spdlog::source_loc{}, spdlog::default_logger()->name(), spdlog::level::err, msg);
  file->log(m);
  file->flush();
}

}  // namespace dmat
