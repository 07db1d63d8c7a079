#pragma once
// Rows of a matrix in chunks, each chunk one work item of the pool; small products stay on the calling
// thread.
#include <algorithm>
#include <cstdint>

#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

// Rows per work item when a matrix is read once per call (decode: up to kGemvMaxTokens tokens), so
// memory is the limit: ~256 KiB stretches of the stored rows (row_bytes each), which each thread reads
// in order and the hardware prefetcher follows, but at least four items per thread so that a thread the
// OS deschedules holds back little, and never fewer than min_rows. On a 2-core Zen 5, w1 (14336 x 4096
// NF4) on two threads moved 27.5 GB/s in 64 KiB items and 33.7 GB/s in 256 KiB ones
// (benchmarks/README.md, "cpu-nf4 against llama.cpp on an AVX-512 machine").
inline int64_t streaming_row_chunk(int64_t rows, int64_t row_bytes, const ThreadPool* pool, int64_t min_rows) {
  const int64_t threads = pool ? pool->threads() : 1;
  const int64_t stretch = (256 * 1024) / std::max<int64_t>(1, row_bytes);
  const int64_t balanced = (rows + 4 * threads - 1) / (4 * threads);
  return std::max(min_rows, std::min(stretch, balanced));
}

// A dense [rows, cols] matrix (the lm_head's formats) of row_bytes per row: for many tokens, chunks of
// 64 Ki elements (64 KiB of q8 rows, 128 KiB of bf16 ones), each reused from cache by every token of the
// call; streaming_row_chunk for a few.
template <class Body>  // body(r0, r1)
void for_row_chunks(int64_t rows, int64_t cols, int64_t row_bytes, int64_t tokens, ThreadPool* pool, const Body& body) {
  const int64_t cached = std::max<int64_t>(8, (64 * 1024) / std::max<int64_t>(1, cols));
  const int64_t chunk = tokens > kGemvMaxTokens ? cached : streaming_row_chunk(rows, row_bytes, pool, cached);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * chunk, std::min(rows, (c + 1) * chunk));
  };
  if (pool && tokens * rows * cols >= kMinParallelMacs) pool->parallel_for(chunks, 1, run);
  else run(0, chunks);
}

}  // namespace moelab::cpu
