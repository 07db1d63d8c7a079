#include "optimized/cpu/thread_pool.hpp"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moelab::cpu {
namespace {

constexpr int kIndexBits = 40;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
// How long an idle worker spins before it sleeps: long enough to catch the next matrix of a decode step
// (microseconds apart), short enough that an idle or descheduled pool does not burn a core.
constexpr auto kSpin = std::chrono::microseconds(200);

thread_local bool t_inside_pool = false;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

}  // namespace

OneOpenMpThread::OneOpenMpThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
OneOpenMpThread::~OneOpenMpThread() { omp_set_num_threads(saved_); }

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < std::max(1, threads); ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  wake_.fetch_add(1);
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

bool ThreadPool::run_chunks() {
  bool ran = false;
  uint64_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    // seq_cst loads (with parallel_for's seq_cst stores): a worker that sees the next job's n_ also sees the
    // closed state stored before it, so its compare-exchange below cannot succeed on a stale index.
    const auto* body = body_.load();
    const int64_t n = n_.load(), grain = grain_.load();
    const int64_t begin = int64_t(s & kIndexMask);
    if (body == nullptr || begin >= n) return ran;
    const int64_t end = std::min(n, begin + grain);
    // Claim [begin, end) only if the job (generation and index) is still the one read above.
    if (!state_.compare_exchange_weak(s, (s & ~kIndexMask) | uint64_t(end), std::memory_order_acq_rel)) continue;
    ran = true;
    if (!failed_.load(std::memory_order_relaxed)) {
      try {
        (*body)(begin, end);
      } catch (...) {
        if (!failed_.exchange(true)) failure_ = std::current_exception();
      }
    }
    done_.fetch_add(end - begin, std::memory_order_acq_rel);
    s = state_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop() {
  t_inside_pool = true;
  uint32_t seen = wake_.load();
  while (!stop_.load(std::memory_order_acquire)) {
    // Spin a while for the next job, then sleep until one is posted.
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (wake_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
      for (int i = 0; i < 64; ++i) cpu_relax();
    if (wake_.load(std::memory_order_acquire) == seen) {
      sleepers_.fetch_add(1);
      wake_.wait(seen);
      sleepers_.fetch_sub(1);
    }
    seen = wake_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_acquire)) break;
    run_chunks();
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || t_inside_pool || n <= grain) {
    for (int64_t b = 0; b < n; b += grain) body(b, std::min(n, b + grain));  // the same chunks, inline
    return;
  }
  failed_.store(false);
  failure_ = nullptr;
  // Close the previous job's index first. Without this, a worker holding the previous job's final state
  // (index = its n) that read this job's larger n_ claimed chunk [old n, ...) with a compare-exchange that
  // still matched, and ran it beside this job's own claim of it: a chunk ran twice (seen once in 673 tests,
  // ThreadPool.ManyShortJobsInARowNeverMix on a fresh machine). No index is below kIndexMask's.
  const uint64_t generation = (state_.load() >> kIndexBits) + 1;
  state_.store(((generation - 1) << kIndexBits) | kIndexMask);
  done_.store(0);
  n_.store(n);
  grain_.store(grain);
  body_.store(&body);
  state_.store(generation << kIndexBits);  // publishes the fields above (seq_cst)
  wake_.fetch_add(1, std::memory_order_release);
  if (sleepers_.load() > 0) wake_.notify_all();
  t_inside_pool = true;
  run_chunks();
  t_inside_pool = false;
  // Everything is claimed; wait only for chunks other threads are in the middle of.
  while (done_.load(std::memory_order_acquire) < n) cpu_relax();
  body_.store(nullptr, std::memory_order_release);
  if (failed_.load()) std::rethrow_exception(std::exchange(failure_, nullptr));
}

int physical_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return std::max(1u, std::thread::hardware_concurrency());
  std::set<std::pair<std::string, std::string>> cores;
  int cpus = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    ++cpus;
    const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    std::string package, core;
    std::ifstream(dir + "physical_package_id") >> package;
    std::ifstream(dir + "core_id") >> core;
    if (package.empty() || core.empty()) return std::max(1, cpus);  // no topology: count logical CPUs
    cores.emplace(package, core);
  }
  return std::max<int>(1, int(cores.size()));
}

}  // namespace moelab::cpu
