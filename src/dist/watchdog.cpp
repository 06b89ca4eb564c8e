#include "dist/watchdog.h"

#include <algorithm>

#include <fmt/format.h>

namespace dmat::dist {

Watchdog::Watchdog(double timeout_s, std::function<void(const std::string&)> on_timeout)
    : timeout_s_(timeout_s), on_timeout_(std::move(on_timeout)), thread_([this] { loop(); }) {}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& e : entries_)
    if (e.release) e.release();
}

Watchdog::Guard Watchdog::watch(std::string what) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  std::lock_guard<std::mutex> lk(mu_);
  const uint64_t id = next_id_++;
  entries_.push_back({id, std::move(what), deadline, nullptr, nullptr});
  return Guard(this, id);
}

void Watchdog::watch_async(std::string what, std::function<bool()> done, std::function<void()> release) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  std::lock_guard<std::mutex> lk(mu_);
  entries_.push_back({next_id_++, std::move(what), deadline, std::move(done), std::move(release)});
}

void Watchdog::finish(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  entries_.remove_if([id](const Entry& e) { return e.id == id; });
}

void Watchdog::loop() {
  // Polls often enough that a timeout fires within ~1/10 of its length (at most 0.5 s late).
  const auto period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::clamp(timeout_s_ / 10.0, 0.01, 0.5)));
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    cv_.wait_for(lk, period);
    if (stop_) break;
    const auto now = Clock::now();
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->done && it->done()) {
        if (it->release) it->release();
        it = entries_.erase(it);
        continue;
      }
      if (now > it->deadline) {
        const std::string msg = fmt::format("collective {} did not finish within run.collective_timeout_s = {} s "
                                            "(a peer rank is stuck, slow or gone)",
                                            it->what, timeout_s_);
        if (it->release) it->release();
        entries_.erase(it);
        lk.unlock();
        on_timeout_(msg);  // aborts the job; does not return in practice
        lk.lock();
        break;
      }
      ++it;
    }
  }
}

}  // namespace dmat::dist
