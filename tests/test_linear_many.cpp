// nf4_linear_many (q/k/v and an expert's w1/w3 in one parallel section, activations quantized once)
// must give exactly what nf4_linear gives on each matrix: the same kernels on the same int8 activations
// and the same token tiles and row chunks, only scheduled together.
#include <gtest/gtest.h>

#include <random>

#include "isa_test_util.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/quantize.hpp"
#include "optimized/cpu/row_chunks.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::test {
namespace {

cpu::Nf4Matrix random_nf4(int64_t rows, int64_t cols, int blocksize, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (auto& e : v) e = normal(rng);
  return cpu::quantize_matrix(v, rows, cols, blocksize, /*double_quant=*/true);
}

// One test per kernel set; one this CPU lacks is SKIPPED with the flags it lacks.
class Nf4LinearMany : public ::testing::TestWithParam<cpu::Isa> {};

TEST_P(Nf4LinearMany, EqualsOneMatrixAtATimeBitForBit) {
  const cpu::Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  std::mt19937 rng(9);
  // q/k/v-like: one width, different row counts; large enough to be split over the pool.
  const auto wq = random_nf4(1024, 512, 64, rng), wk = random_nf4(256, 512, 64, rng), wv = random_nf4(384, 512, 64, rng);
  const auto other_block = random_nf4(96, 512, 128, rng);
  cpu::ThreadPool pool(3);
  {
    for (const std::string mode : {"int8", "fp32"}) {
      const cpu::LinearContext ctx{isa, cpu::parse_activations(mode), &pool};
      for (const int n : {1, 5, 70}) {  // decode, a few tokens, several token tiles
        SCOPED_TRACE(cpu::isa_name(isa) + " " + mode + " n=" + std::to_string(n));
        MatrixRF x(n, 512);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
        const cpu::Nf4Matrix* qkv[] = {&wq, &wk, &wv, &other_block};  // the last has another layout: computed alone
        const auto ys = cpu::nf4_linear_many(ctx, qkv, x);
        ASSERT_EQ(ys.size(), 4u);
        for (size_t m = 0; m < 4; ++m) {
          const MatrixRF alone = cpu::nf4_linear(ctx, *qkv[m], x);
          ASSERT_EQ(ys[m].rows(), alone.rows());
          ASSERT_EQ(ys[m].cols(), alone.cols());
          EXPECT_TRUE(ys[m] == alone) << "matrix " << m << ": max difference " << (ys[m] - alone).cwiseAbs().maxCoeff();
        }
      }
    }
  }
}

// The int8 path's work items depend on the token count (read-once stretches for decode, 64 KiB ones for
// token tiles) and on the pool's size; a row's result must not: every row is one kernel call over the
// whole row whatever the item holding it. Against one call on the calling thread (no pool).
TEST_P(Nf4LinearMany, Int8ResultDoesNotDependOnThreadsOrWorkItems) {
  const cpu::Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  std::mt19937 rng(11);
  // 4608 rows of 1024 columns: 2.3 MiB of codes, above the parallel threshold (kMinParallelMacs) even
  // for one token, several read-once stretches.
  const auto w = random_nf4(4608, 1024, 64, rng);
  ASSERT_GE(int64_t(w.rows) * w.cols, cpu::kMinParallelMacs);
  for (const int n : {1, 3, 4, 5, 9}) {
    MatrixRF x(n, 1024);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    const MatrixRF alone = cpu::nf4_linear(cpu::LinearContext{isa, cpu::Activations::Int8, nullptr}, w, x);
    for (const int threads : {1, 2, 3, 5}) {
      SCOPED_TRACE(cpu::isa_name(isa) + " n=" + std::to_string(n) + " threads=" + std::to_string(threads));
      cpu::ThreadPool pool(threads);
      const MatrixRF pooled = cpu::nf4_linear(cpu::LinearContext{isa, cpu::Activations::Int8, &pool}, w, x);
      EXPECT_TRUE(pooled == alone) << "max difference " << (pooled - alone).cwiseAbs().maxCoeff();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Nf4LinearMany, ::testing::ValuesIn(cpu::kAllIsas),
                         [](const auto& info) { return isa_test_name(info.param); });

// Decode's work items: ~256 KiB stretches of stored rows, at least four per thread, never below the
// caller's minimum, never more rows than the matrix has.
TEST(StreamingRowChunk, LongStretchesButFourItemsPerThread) {
  cpu::ThreadPool two(2), sixteen(16);
  // Mixtral's w1 in NF4 (2048-byte rows): 128 rows = 256 KiB on two threads, 112 items.
  EXPECT_EQ(cpu::streaming_row_chunk(14336, 2048, &two, 32), 128);
  // k_v (1024 rows): 128 rows would leave 8 items, 4 per thread: still 128; on 16 threads 16 rows (64
  // items) but not below the minimum of 32.
  EXPECT_EQ(cpu::streaming_row_chunk(1024, 2048, &two, 32), 128);
  EXPECT_EQ(cpu::streaming_row_chunk(1024, 2048, &sixteen, 32), 32);
  // w2 (7168-byte rows): 36 rows; the q8 lm_head (4096-byte rows of 32000): 64 rows.
  EXPECT_EQ(cpu::streaming_row_chunk(4096, 7168, &two, 9), 36);
  EXPECT_EQ(cpu::streaming_row_chunk(32000, 4096, &two, 16), 64);
  // Without a pool, one thread; a matrix smaller than one stretch gives a quarter of it.
  EXPECT_EQ(cpu::streaming_row_chunk(64, 2048, nullptr, 4), 16);
  for (const int64_t rows : {1, 7, 100, 5000})
    for (const int64_t row_bytes : {1, 64, 2048, 1 << 20}) {
      const int64_t chunk = cpu::streaming_row_chunk(rows, row_bytes, &two, 1);
      EXPECT_GE(chunk, 1);
      EXPECT_LE(chunk * row_bytes, std::max<int64_t>(row_bytes, 256 * 1024));
      EXPECT_LE(chunk, std::max<int64_t>(1, (rows + 7) / 8)) << "fewer than four items per thread";
    }
}

}  // namespace
}  // namespace moelab::test
