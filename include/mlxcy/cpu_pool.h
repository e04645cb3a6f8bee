// A persistent thread pool for mlxcy's CPU kernels (cpu_quant.h).
//
// MLX's CPU backend runs every op on one stream thread.  Our kernels split
// their output rows over this pool: the calling (stream) thread takes tasks
// too, so a pool of n threads starts n - 1 workers once and reuses them for
// every op (no thread creation per op).  A decode step runs ~150 products of
// tens of microseconds each, so workers spin briefly on the job counter before
// they sleep on a condition variable.
//
// Size: mlxcy.cpu_kernels.set_num_threads(n), else MLXCY_NUM_THREADS, else
// OMP_NUM_THREADS, else the cores this process may run on.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MLXCY_CPU_RELAX() _mm_pause()
#else
#define MLXCY_CPU_RELAX() std::this_thread::yield()
#endif

namespace mlxcy::cpu {

inline int env_threads(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  return (end && *end == 0 && n > 0 && n <= 1024) ? int(n) : 0;
}

// The cores this process may run on (its affinity mask), at least 1.
inline int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

inline int default_threads() {
  if (int n = env_threads("MLXCY_NUM_THREADS")) return n;
  if (int n = env_threads("OMP_NUM_THREADS")) return n;
  return available_cores();
}

class Pool {
 public:
  using Fn = void (*)(void* ctx, int task);

  static Pool& instance() {
    static Pool pool(default_threads());
    return pool;
  }

  int size() const { return nthreads_; }

  // Change the thread count (joins the old workers, starts new ones).
  void resize(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    nthreads_ = n;
    start_workers();
  }

  // fn(ctx, i) for i in [0, ntasks), spread over the pool; returns when all
  // are done.  One job at a time (concurrent callers take turns).
  void run(int ntasks, Fn fn, void* ctx) {
    if (ntasks <= 0) return;
    if (nthreads_ == 1 || ntasks == 1) {
      for (int i = 0; i < ntasks; ++i) fn(ctx, i);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    // Close the old generation before the job's fields change: a worker that
    // still holds the old generation fails its compare-exchange from here on.
    state_.store((gen << 32) | kClosed, std::memory_order_seq_cst);
    fn_ = fn;
    ctx_ = ctx;
    ntasks_.store(uint32_t(ntasks), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(gen << 32, std::memory_order_seq_cst);
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      if (sleeping_ > 0) sleep_cv_.notify_all();
    }
    work(gen);
    for (int i = 0; done_.load(std::memory_order_acquire) < uint32_t(ntasks); ++i) {
      if (i < kSpin) MLXCY_CPU_RELAX();
      else std::this_thread::yield();
    }
  }

  ~Pool() { stop_workers(); }

 private:
  static constexpr uint64_t kClosed = 0xffffffffu;
  // Spin this many pauses (a few microseconds), then yield the core in a loop
  // for up to kWaitBeforeSleep before sleeping.  Pure spinning starves the host
  // thread that builds the next ops when cores are few; sleeping after the
  // pauses alone made the worker sleep between most of a decode step's ~150
  // jobs, and each wake-up (a futex call, then the scheduler) came late:
  // SmolLM2 Q4_1 decode on 2 cores rose ~10% with the yielding wait.
  static constexpr int kSpin = 256;
  static constexpr std::chrono::microseconds kWaitBeforeSleep{200};

  explicit Pool(int n) : nthreads_(n < 1 ? 1 : n) { start_workers(); }

  // Take tasks of generation `gen` until none are left.
  void work(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((s >> 32) != gen) return;
      uint64_t idx = s & kClosed;
      if (idx >= ntasks_.load(std::memory_order_relaxed)) return;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        fn_(ctx_, int(idx));
        done_.fetch_add(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void worker_loop() {
    uint64_t last = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t s = 0;
      bool ready = false;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; !ready; ++i) {
        s = state_.load(std::memory_order_acquire);
        ready = stop_.load(std::memory_order_relaxed) ||
                ((s >> 32) != last && (s & kClosed) != kClosed);
        if (ready) break;
        if (i < kSpin) {
          MLXCY_CPU_RELAX();
        } else if (std::chrono::steady_clock::now() - t0 < kWaitBeforeSleep) {
          std::this_thread::yield();   // the core goes to any other thread that wants it
        } else {
          break;
        }
      }
      if (!ready) {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        ++sleeping_;
        sleep_cv_.wait(lk, [&] {
          s = state_.load(std::memory_order_acquire);
          return stop_.load(std::memory_order_relaxed) ||
                 ((s >> 32) != last && (s & kClosed) != kClosed);
        });
        --sleeping_;
      }
      if (stop_.load(std::memory_order_relaxed)) return;
      last = s >> 32;
      work(last);
    }
  }

  void start_workers() {
    stop_.store(false);
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      stop_.store(true);
      sleep_cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int nthreads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  int sleeping_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> state_{0};   // generation << 32 | next task index
  std::atomic<uint32_t> done_{0};
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint32_t> ntasks_{0};
};

// f(begin, end) over [0, n) in chunks that are multiples of `align`, about
// `per_thread` chunks per thread (load balance when other work shares cores).
template <class F>
void parallel_rows(int n, int align, F&& f, int per_thread = 4) {
  Pool& pool = Pool::instance();
  int nt = pool.size();
  int chunks = nt == 1 ? 1 : nt * per_thread;
  int chunk = (n + chunks - 1) / chunks;
  chunk = ((chunk + align - 1) / align) * align;
  if (chunk < align) chunk = align;
  int ntasks = (n + chunk - 1) / chunk;
  struct Ctx {
    std::remove_reference_t<F>* f;
    int n, chunk;
  } ctx{&f, n, chunk};
  pool.run(ntasks, [](void* p, int i) {
    auto* c = static_cast<Ctx*>(p);
    int b = i * c->chunk;
    int e = b + c->chunk < c->n ? b + c->chunk : c->n;
    (*c->f)(b, e);
  }, &ctx);
}

}  // namespace mlxcy::cpu
