// A watchdog thread for collectives: each watched operation has a deadline; one that has not
// finished by then calls on_timeout (which aborts the job: a stuck or vanished peer must become an
// error, never a hang). Host collectives are watched for the duration of a scope; device
// collectives (NCCL, asynchronous on a stream) carry a probe that says when the work is done.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <thread>

namespace dmat::dist {

class Watchdog {
 public:
  // timeout_s > 0. on_timeout runs on the watchdog thread with a description of the late operation.
  Watchdog(double timeout_s, std::function<void(const std::string&)> on_timeout);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Watches a host operation while the returned guard lives.
  class Guard {
   public:
    Guard(Watchdog* w, uint64_t id) : w_(w), id_(id) {}
    Guard(Guard&& o) noexcept : w_(o.w_), id_(o.id_) { o.w_ = nullptr; }
    ~Guard() {
      if (w_) w_->finish(id_);
    }

   private:
    Watchdog* w_;
    uint64_t id_;
  };
  Guard watch(std::string what);
  // Watches asynchronous work until done() returns true (polled from the watchdog thread);
  // release() runs once afterwards (e.g. destroys the CUDA event the probe queries).
  void watch_async(std::string what, std::function<bool()> done, std::function<void()> release);

  double timeout_s() const { return timeout_s_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    uint64_t id;
    std::string what;
    Clock::time_point deadline;
    std::function<bool()> done;
    std::function<void()> release;
  };
  void finish(uint64_t id);
  void loop();

  double timeout_s_;
  std::function<void(const std::string&)> on_timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::list<Entry> entries_;
  uint64_t next_id_ = 1;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dmat::dist
