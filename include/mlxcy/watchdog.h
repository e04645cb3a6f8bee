// A process watchdog for distributed runs: MLX's ring backend blocks forever
// when a peer never connects (accept) or dies mid-collective (its socket
// thread gives up and the op's future is never fulfilled).  arm(seconds, msg)
// starts a deadline; disarm() cancels it; when it passes, the message goes to
// stderr and the process exits at once with `code` (no Python, no GIL: the
// blocked thread may hold it).
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <unistd.h>

namespace mlxcy {

struct Watchdog {
  std::mutex m;
  std::condition_variable cv;
  bool armed = false;
  bool started = false;
  unsigned long gen = 0;
  std::chrono::steady_clock::time_point deadline;
  std::string message;
  int code = 75;

  void loop() {
    std::unique_lock<std::mutex> lk(m);
    while (true) {
      cv.wait(lk, [this] { return armed; });
      unsigned long g = gen;
      if (cv.wait_until(lk, deadline, [this, g] { return !armed || gen != g; }))
        continue;  // disarmed or re-armed in time
      std::string msg = message + "\n";
      fputs(msg.c_str(), stderr);
      fflush(stderr);
      _exit(code);
    }
  }
};

inline Watchdog& watchdog() {
  static Watchdog* w = new Watchdog();  // never destroyed: its thread outlives exit
  return *w;
}

inline void watchdog_arm(double seconds, const std::string& message, int code) {
  Watchdog& w = watchdog();
  std::lock_guard<std::mutex> lk(w.m);
  if (!w.started) {
    std::thread([&w] { w.loop(); }).detach();
    w.started = true;
  }
  w.deadline = std::chrono::steady_clock::now() +
               std::chrono::microseconds((long long)(seconds * 1e6));
  w.message = message;
  w.code = code;
  w.armed = true;
  w.gen++;
  w.cv.notify_all();
}

inline void watchdog_disarm() {
  Watchdog& w = watchdog();
  std::lock_guard<std::mutex> lk(w.m);
  w.armed = false;
  w.gen++;
  w.cv.notify_all();
}

}  // namespace mlxcy
