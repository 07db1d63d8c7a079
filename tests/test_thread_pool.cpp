// The cpu-nf4 thread pool: every index runs exactly once whatever the chunking, jobs follow each other
// without mixing, a body's exception reaches the caller, a nested call runs inline, and a pool keeps
// working after its workers have gone to sleep.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "optimized/cpu/thread_pool.hpp"

namespace moelab::test {
namespace {

TEST(ThreadPool, EveryIndexRunsExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    cpu::ThreadPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    for (int64_t n : {1, 2, 7, 64, 1000, 4097})
      for (int64_t grain : {1, 3, 64, 5000}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
          ASSERT_LT(b, e);
          ASSERT_LE(e - b, grain);
          for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "threads " << threads << " n " << n << " index " << i;
      }
  }
}

TEST(ThreadPool, ManyShortJobsInARowNeverMix) {
  cpu::ThreadPool pool(3);
  std::vector<int64_t> sums(2000);
  for (size_t job = 0; job < sums.size(); ++job) {
    std::atomic<int64_t> sum{0};
    const int64_t n = 1 + int64_t(job % 97);
    pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum += i + int64_t(job);
    });
    ASSERT_EQ(sum.load(), n * (n - 1) / 2 + n * int64_t(job)) << "job " << job;
  }
}

TEST(ThreadPool, WorkersThatSleptWakeForTheNextJob) {
  cpu::ThreadPool pool(2);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the spin: workers are asleep
  std::atomic<int> ran_elsewhere{0};
  const auto caller = std::this_thread::get_id();
  for (int rep = 0; rep < 50 && ran_elsewhere == 0; ++rep)
    pool.parallel_for(64, 1, [&](int64_t, int64_t) {
      if (std::this_thread::get_id() != caller) ran_elsewhere++;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    });
  EXPECT_GT(ran_elsewhere.load(), 0) << "no chunk ever ran on a worker";
}

TEST(ThreadPool, ExceptionsReachTheCallerAndThePoolStaysUsable) {
  cpu::ThreadPool pool(2);
  EXPECT_THROW(pool.parallel_for(100, 1,
                                 [](int64_t b, int64_t) {
                                   if (b == 37) throw std::runtime_error("chunk 37");
                                 }),
               std::runtime_error);
  std::atomic<int64_t> n{0};
  pool.parallel_for(100, 1, [&](int64_t b, int64_t e) { n += e - b; });
  EXPECT_EQ(n.load(), 100);
}

TEST(ThreadPool, NestedCallsRunInline) {
  cpu::ThreadPool pool(2);
  std::atomic<int64_t> n{0};
  pool.parallel_for(8, 1, [&](int64_t, int64_t) {
    const auto me = std::this_thread::get_id();
    pool.parallel_for(10, 1, [&](int64_t b, int64_t e) {
      EXPECT_EQ(std::this_thread::get_id(), me);
      n += e - b;
    });
  });
  EXPECT_EQ(n.load(), 80);
}

TEST(ThreadPool, PhysicalCoresIsPositiveAndAtMostTheLogicalCpus) {
  const int cores = cpu::physical_cores();
  EXPECT_GE(cores, 1);
  EXPECT_LE(unsigned(cores), std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace
}  // namespace moelab::test
