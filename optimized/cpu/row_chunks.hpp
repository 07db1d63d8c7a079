#pragma once
// Rows of a dense [rows, cols] matrix (the lm_head's formats) in chunks of ~64 KiB, each chunk one
// work item of the pool; small products stay on the calling thread.
#include <algorithm>
#include <cstdint>

#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

template <class Body>  // body(r0, r1)
void for_row_chunks(int64_t rows, int64_t cols, int64_t macs, ThreadPool* pool, const Body& body) {
  const int64_t chunk = std::max<int64_t>(8, (64 * 1024) / std::max<int64_t>(1, cols));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * chunk, std::min(rows, (c + 1) * chunk));
  };
  if (pool && macs >= kMinParallelMacs) pool->parallel_for(chunks, 1, run);
  else run(0, chunks);
}

}  // namespace moelab::cpu
