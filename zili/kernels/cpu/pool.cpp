// See pool.h.
//
// One job at a time: the caller publishes it by bumping `generation_` to the next even number, and
// every thread (caller included) claims chunk indices from `next_` until none is left; the caller
// returns once `done_` counts them all. A worker that arrives after the last chunk finds nothing to
// claim; before the next job's fields change, the caller marks the old job retired (odd generation)
// and waits for such late arrivals (`active_`) to leave, so no thread ever reads a half-written job.
#include "pool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace zili_cpu {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kDefaultSpinMicroseconds = 200;
// The caller waiting for a preempted worker's chunk yields its core after this long.
constexpr auto kYieldAfter = std::chrono::microseconds(50);

// True on the pool's workers and on a caller while its job runs: their nested calls run inline.
thread_local bool t_in_pool = false;

int64_t spin_microseconds() {
  static const int64_t value = [] {
    const char* text = std::getenv("ZILI_CPU_SPIN_US");
    if (text == nullptr) return kDefaultSpinMicroseconds;
    char* end = nullptr;
    const long long parsed = std::strtoll(text, &end, 10);
    return end != text && *end == '\0' && parsed >= 0 ? static_cast<int64_t>(parsed) : kDefaultSpinMicroseconds;
  }();
  return value;
}

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  void stop() {
    stop_.store(true);
    { std::lock_guard<std::mutex> lock(sleep_mutex_); }
    wake_.notify_all();
    for (std::thread& thread : threads_) thread.join();
    threads_.clear();
  }

  // The caller holds the pool (one job at a time).
  void run(int64_t n, int64_t chunk, int64_t grain, ChunkFn fn, const void* context) {
    const uint64_t retired = generation_.load(std::memory_order_relaxed) + 1;
    generation_.store(retired);
    while (active_.load() != 0) _mm_pause();
    schedule(n, chunk, grain);
    fn_ = fn;
    context_ = context;
    error_ = nullptr;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_.store(retired + 1);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    execute();
    const auto yield_at = Clock::now() + kYieldAfter;
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks_; ++spins) {
      _mm_pause();
      if ((spins & 255) == 255 && Clock::now() >= yield_at) std::this_thread::yield();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Chunk ends: `chunk` items each while there is plenty left, then smaller ones (down to `grain`)
  // so that the threads run out of work together, not one a whole chunk after the other.
  void schedule(int64_t n, int64_t chunk, int64_t grain) {
    ends_.clear();
    const int64_t share = int64_t{workers() + 1} * 2;
    for (int64_t begin = 0; begin < n;) {
      int64_t size = chunk;
      if (grain < chunk) {
        const int64_t tail = ((n - begin) / share + grain - 1) / grain * grain;
        size = std::min(chunk, std::max(grain, tail));
      }
      begin = std::min(n, begin + size);
      ends_.push_back(begin);
    }
    chunks_ = static_cast<int64_t>(ends_.size());
  }

  void execute() {
    for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < chunks_;
         i = next_.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t begin = i == 0 ? 0 : ends_[i - 1];
      try {
        fn_(context_, begin, ends_[i]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work() {
    t_in_pool = true;
    uint64_t seen = 0;
    while (true) {
      const uint64_t generation = wait_for_job(seen);
      if (generation == 0) return;
      seen = generation;
      active_.fetch_add(1);
      if (generation_.load() == generation) execute();
      active_.fetch_sub(1);
    }
  }

  // The generation of the next published job after `seen`, or 0 when the pool stops: spin first,
  // then sleep until the caller's notification.
  uint64_t wait_for_job(uint64_t seen) {
    auto ready = [seen](uint64_t generation) { return generation % 2 == 0 && generation != seen; };
    const auto sleep_at = Clock::now() + std::chrono::microseconds(spin_microseconds());
    for (int spins = 0;; ++spins) {
      const uint64_t generation = generation_.load(std::memory_order_acquire);
      if (ready(generation)) return generation;
      if (stop_.load(std::memory_order_relaxed)) return 0;
      _mm_pause();
      if ((spins & 255) == 255 && Clock::now() >= sleep_at) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1);
    uint64_t generation = 0;
    wake_.wait(lock, [&] {
      generation = generation_.load();
      return ready(generation) || stop_.load();
    });
    sleepers_.fetch_sub(1);
    return stop_.load() ? 0 : generation;
  }

  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};  // even: a published job (0: none yet); odd: retiring one
  std::atomic<int> active_{0};           // workers inside the current job
  std::atomic<int64_t> next_{0}, done_{0};
  int64_t chunks_ = 0;
  std::vector<int64_t> ends_;  // chunk i is [ends_[i - 1] (0 for the first), ends_[i])
  ChunkFn fn_ = nullptr;
  const void* context_ = nullptr;
  std::exception_ptr error_;
  std::mutex error_mutex_;
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// Allocated once and never destroyed: workers may outlive static destructors at exit. A fork()ed
// child has none of the parent's threads, so it drops both (leaking them) and starts afresh.
std::mutex* g_owner = new std::mutex;
Pool* g_pool = nullptr;

void forget_pool_in_child() {
  g_owner = new std::mutex;
  g_pool = nullptr;
}

}  // namespace

void run_chunks(int64_t n, int64_t chunk, int64_t grain, ChunkFn fn, const void* context) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= chunk || t_in_pool || at::in_parallel_region()) {
    fn(context, 0, n);
    return;
  }
  std::unique_lock<std::mutex> owner(*g_owner, std::try_to_lock);
  if (!owner.owns_lock()) {  // another thread's job is running
    fn(context, 0, n);
    return;
  }
  if (g_pool == nullptr || g_pool->workers() != threads - 1) {
    static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
    (void)registered;
    if (g_pool != nullptr) {
      g_pool->stop();
      delete g_pool;
    }
    g_pool = new Pool(threads - 1);
  }
  t_in_pool = true;
  struct Leave {
    ~Leave() { t_in_pool = false; }
  } leave;
  g_pool->run(n, chunk, std::max<int64_t>(grain, 1), fn, context);
}

}  // namespace zili_cpu
