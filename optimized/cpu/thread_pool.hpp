#pragma once
// The cpu-nf4 engine's thread pool: persistent workers that cannot stall a parallel loop.
//
// OpenMP's static loops give each thread a fixed share and end at a barrier, so when the OS deschedules
// one thread (another process wants the core) everyone waits for it: beside a busy process, cpu-nf4 ran
// ten times slower on two threads than on one. Here the calling thread works too, and work is claimed
// in small chunks from an atomic counter: a worker that is not running claims nothing, so it delays
// nothing but the one chunk it may be in the middle of. Idle workers spin for a bounded time, then
// sleep on a futex (std::atomic::wait), so an idle pool costs no CPU.
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace moelab::cpu {

class ThreadPool {
 public:
  // threads: the total including the caller (>= 1).
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return int(workers_.size()) + 1; }

  // Calls body(begin, end) over [0, n) in chunks of `grain` items, on the caller and the workers;
  // returns when every chunk is done. A call from inside a body, or on a one-thread pool, runs the same
  // chunks inline (no nesting). The first
  // exception a body throws is rethrown here after the loop ends.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

 private:
  void worker_loop();
  bool run_chunks();  // claims and runs chunks of the current job; false when there were none

  std::vector<std::thread> workers_;
  // The job: its generation in the top 24 bits and the next unclaimed index in the low 40, so a late
  // worker's claim (compare-and-swap on both) can never land in a newer job.
  std::atomic<uint64_t> state_{0};
  std::atomic<const std::function<void(int64_t, int64_t)>*> body_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1};
  std::atomic<int64_t> done_{0};       // items finished in the current job
  std::atomic<uint32_t> wake_{0};      // bumped per job; sleeping workers wait on it
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::exception_ptr failure_;
  std::atomic<bool> failed_{false};
};

// Eigen's GEMM opens an OpenMP team of its own unless the calling thread is inside one or its OpenMP thread
// count is 1; for the scope of one of these it is 1 on this thread, so a product run inside a pool chunk (or
// by a caller that does its threading on a pool) stays on its thread. cpu-nf4's prefill tiles and the
// trainer's passes (train/products.hpp) hold one.
class OneOpenMpThread {
 public:
  OneOpenMpThread();
  ~OneOpenMpThread();
  OneOpenMpThread(const OneOpenMpThread&) = delete;
  OneOpenMpThread& operator=(const OneOpenMpThread&) = delete;

 private:
  int saved_;
};

// The number of physical cores this process may run on (distinct core ids among the CPUs in its
// affinity mask; hyperthread siblings count once). The default thread count.
int physical_cores();

}  // namespace moelab::cpu
