// nf4_linear_many (q/k/v and an expert's w1/w3 in one parallel section, activations quantized once)
// must give exactly what nf4_linear gives on each matrix: the same kernels on the same int8 activations
// and the same token tiles and row chunks, only scheduled together.
#include <gtest/gtest.h>

#include <random>

#include "isa_test_util.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/quantize.hpp"
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

INSTANTIATE_TEST_SUITE_P(AllIsas, Nf4LinearMany, ::testing::ValuesIn(cpu::kAllIsas),
                         [](const auto& info) { return isa_test_name(info.param); });

}  // namespace
}  // namespace moelab::test
