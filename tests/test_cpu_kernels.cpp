// Every NF4 CPU kernel set against the scalar kernels and a float64 computation, on fresh random
// inputs, including shapes that are not multiples of the vector width or the block size.
//
// GEMV bound: FP32 summation of m products has |error| <= gamma_m * sum|w_i x_i| with
// gamma_m ~ m * 2^-24 (Higham, recursive summation); the kernels sum at most `cols` terms plus one per
// block, so |y - y64| <= (cols + blocks + 2) * 2^-24 * sum|w x| must hold for every row, for any
// correct kernel. A wrong code, nibble order or absmax is off by O(sum|w x|) and fails it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <ostream>
#include <random>
#include <set>
#include <sstream>
#include <tuple>

#include "isa_test_util.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/linear.hpp"

namespace moelab::test {
namespace {

using cpu::Isa;
using cpu::Nf4Matrix;

Nf4Matrix random_matrix(int64_t rows, int64_t cols, int blocksize, std::mt19937& rng) {
  Nf4Matrix w;
  w.rows = rows;
  w.cols = cols;
  w.blocksize = blocksize;
  const int64_t n = rows * cols;
  std::vector<uint8_t> codes(static_cast<size_t>((n + 1) / 2));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : codes) b = uint8_t(byte(rng));
  w.own(std::move(codes));
  std::uniform_real_distribution<float> scale(0.01f, 2.0f);
  w.absmax.resize(size_t((n + blocksize - 1) / blocksize));
  for (auto& a : w.absmax) a = scale(rng);
  return w;
}

double weight64(const Nf4Matrix& w, int64_t i) {
  const int code = (i & 1) ? w.packed[size_t(i >> 1)] & 15 : w.packed[size_t(i >> 1)] >> 4;
  return double(cpu::kNf4Codes[code]) * double(w.absmax[size_t(i / w.blocksize)]);
}

struct Shape {
  int64_t rows, cols;
  int blocksize;
};

void PrintTo(const Shape& s, std::ostream* os) { *os << s.rows << "x" << s.cols << " block " << s.blocksize; }

// Every test runs once per kernel set and shape. A kernel set this CPU lacks is SKIPPED with the flags it
// lacks (tests/isa_test_util.hpp), so a run on an AVX2 machine lists the AVX-512 cases it did not run.
class CpuKernels : public ::testing::TestWithParam<std::tuple<Isa, Shape>> {
 protected:
  void SetUp() override { MOELAB_SKIP_UNLESS_RUNS_HERE(std::get<0>(GetParam())); }
};

TEST_P(CpuKernels, GemvMatchesFloat64AndScalar) {
  const auto [isa, shape] = GetParam();
  const auto [rows, cols, bs] = shape;
  std::mt19937 rng(uint32_t(rows * 131 + cols * 7 + bs));
  const auto w = random_matrix(rows, cols, bs, rng);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(cols));
  for (auto& v : x) v = normal(rng);
  std::vector<float> y_scalar(static_cast<size_t>(rows));
  cpu::gemv_rows(Isa::Scalar, w, x.data(), y_scalar.data(), 0, rows);
  {
    std::vector<float> y(size_t(rows), std::nanf(""));  // poisoned: every row must be written
    cpu::gemv_rows(isa, w, x.data(), y.data(), 0, rows);
    const double blocks = double(cols) / bs + 2;
    for (int64_t r = 0; r < rows; ++r) {
      double exact = 0, magnitude = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double p = weight64(w, r * cols + c) * x[size_t(c)];
        exact += p;
        magnitude += std::abs(p);
      }
      const double bound = (double(cols) + blocks) * std::ldexp(1.0, -24) * magnitude;
      ASSERT_LE(std::abs(y[size_t(r)] - exact), bound) << "row " << r;
      ASSERT_LE(std::abs(y[size_t(r)] - y_scalar[size_t(r)]), 2 * bound) << "row " << r;
    }
  }
}

// Several tokens at once (decode of a small batch, an expert's few tokens): every token's result is
// within FP32 rounding of the float64 value, and bit for bit the one-token kernel's wherever both use
// the same row blocking (the AVX-512 batch kernel always blocks four rows; the one-token kernel does
// only once x outgrows L1, so below that the order of the additions differs).
TEST_P(CpuKernels, BatchGemvMatchesFloat64AndOneTokenGemv) {
  const auto [isa, shape] = GetParam();
  const auto [rows, cols, bs] = shape;
  std::mt19937 rng(uint32_t(rows * 17 + cols * 3 + bs));
  const auto w = random_matrix(rows, cols, bs, rng);
  std::normal_distribution<float> normal;
  const double blocks = double(cols) / bs + 2;
  for (int n = 1; n <= 4; ++n) {
    SCOPED_TRACE("n=" + std::to_string(n));
    std::vector<std::vector<float>> x(size_t(n), std::vector<float>(static_cast<size_t>(cols)));
    std::vector<float> xs(size_t(n * cols));
    for (int t = 0; t < n; ++t) {
      for (auto& v : x[size_t(t)]) v = normal(rng);
      cpu::prepare_x(isa, w, x[size_t(t)].data(), xs.data() + t * cols);
    }
    // Rows [1, rows - 1): a range that starts and ends off any row-block boundary.
    const int64_t r0 = rows > 2 ? 1 : 0, r1 = rows > 2 ? rows - 1 : rows, m = r1 - r0;
    std::vector<float> batch(size_t(n * m), std::nanf(""));
    cpu::gemv_prepared_batch(isa, w, xs.data(), cols, n, batch.data(), m, r0, r1);
    const bool same_blocking = isa != Isa::Avx512 || n == 1 || cols * int64_t(sizeof(float)) > 32 * 1024;
    for (int t = 0; t < n; ++t) {
      std::vector<float> one(static_cast<size_t>(m), std::nanf(""));
      cpu::gemv_prepared(isa, w, xs.data() + t * cols, one.data(), r0, r1);
      for (int64_t r = 0; r < m; ++r) {
        const float got = batch[size_t(t * m + r)];
        double exact = 0, magnitude = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const double p = weight64(w, (r0 + r) * cols + c) * x[size_t(t)][size_t(c)];
          exact += p;
          magnitude += std::abs(p);
        }
        ASSERT_LE(std::abs(got - exact), (double(cols) + blocks) * std::ldexp(1.0, -24) * magnitude)
            << "token " << t << " row " << r0 + r;
        if (same_blocking) {
          ASSERT_EQ(std::memcmp(&got, &one[size_t(r)], sizeof(float)), 0)
              << "token " << t << " row " << r0 + r << ": " << got << " vs " << one[size_t(r)];
        }
      }
    }
  }
}

TEST_P(CpuKernels, DequantizeIsExactlyCodeTimesAbsmax) {
  const auto [isa, shape] = GetParam();
  const auto [rows, cols, bs] = shape;
  std::mt19937 rng(uint32_t(rows + cols + bs));
  const auto w = random_matrix(rows, cols, bs, rng);
  {
    // A sub-range of rows too, as the prefill tiles use it.
    const int64_t r0 = rows > 2 ? 1 : 0;
    std::vector<float> out(size_t((rows - r0) * cols), std::nanf(""));
    cpu::dequantize_rows(isa, w, r0, rows, out.data());
    for (int64_t i = 0; i < (rows - r0) * cols; ++i)
      ASSERT_EQ(out[size_t(i)], float(weight64(w, r0 * cols + i))) << "element " << i;  // one FP32 multiply: exact
  }
}

TEST_P(CpuKernels, LinearBothPathsMatchFloat64) {
  const auto [isa, shape] = GetParam();
  const auto [rows, cols, bs] = shape;
  std::mt19937 rng(uint32_t(3 * rows + cols + bs));
  const auto w = random_matrix(rows, cols, bs, rng);
  for (int n : {1, 3, cpu::kGemvMaxTokens + 1, 17}) {  // GEMV path and tiled GEMM path
    MatrixRF x = MatrixRF::Random(n, cols);
    const MatrixRF y = cpu::nf4_linear(isa, w, x);
    ASSERT_EQ(y.rows(), n);
    for (int t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        double exact = 0, magnitude = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const double p = weight64(w, r * cols + c) * x(t, c);
          exact += p;
          magnitude += std::abs(p);
        }
        ASSERT_LE(std::abs(y(t, r) - exact), (double(cols) + double(cols) / bs + 2) * std::ldexp(1.0, -24) * magnitude)
            << "n " << n << " token " << t << " row " << r;
      }
  }
}

// The FP32 lm_head product split over threads equals a float64 computation; sizes straddle the
// parallel threshold and the row chunking (rows not a multiple of the chunk).
TEST(CpuFp32Linear, MatchesFloat64AboveAndBelowTheParallelThreshold) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (const auto& [n, rows, cols] : {std::tuple{1, 33000, 128}, std::tuple{3, 5000, 300}, std::tuple{4, 1500, 64},
                                      std::tuple{9, 2000, 96}}) {
    SCOPED_TRACE(std::to_string(n) + "x" + std::to_string(rows) + "x" + std::to_string(cols));
    MatrixRF x(n, cols), w(rows, cols);
    for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
    const MatrixRF y = cpu::fp32_linear(x, w);
    ASSERT_EQ(y.rows(), n);
    ASSERT_EQ(y.cols(), rows);
    const Eigen::MatrixXd exact = x.cast<double>() * w.cast<double>().transpose();
    const Eigen::MatrixXd magnitude = x.cast<double>().cwiseAbs() * w.cast<double>().cwiseAbs().transpose();
    // FP32 dot products of `cols` terms: |error| <= cols * 2^-24 * sum |products| (Higham, 3.5).
    for (Eigen::Index i = 0; i < n; ++i)
      for (Eigen::Index j = 0; j < rows; ++j)
        ASSERT_LE(std::abs(double(y(i, j)) - exact(i, j)), cols * std::ldexp(1.0, -24) * magnitude(i, j))
            << "token " << i << " row " << j;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuKernels,
                         ::testing::Combine(::testing::Values(Isa::Scalar, Isa::Avx2, Isa::Avx512),
                                            ::testing::Values(Shape{1, 64, 64}, Shape{7, 96, 64}, Shape{33, 160, 32},
                                                              Shape{5, 4096 + 32, 64}, Shape{3, 256, 128}, Shape{9, 32, 64},
                                                              Shape{4, 40, 64},  // cols not a multiple of 32: scalar fallback
                                                              Shape{3, 7, 64},   // odd cols, blocks straddle rows
                                                              Shape{2, 512, 4096}, Shape{5, 1024, 64}, Shape{3, 384, 32},
                                                              Shape{2, 1024, 256}, Shape{4, 8192 + 128, 64},
                                                              Shape{11, 8192 + 128, 64},  // w2-like: four-row blocks and a tail
                                                              Shape{11, 1024, 64})),  // batch kernel's four-row blocks, small x
                         [](const auto& info) {
                           const Shape& s = std::get<1>(info.param);
                           return isa_test_name(std::get<0>(info.param)) + "_" + std::to_string(s.rows) + "x" + std::to_string(s.cols) +
                                  "_b" + std::to_string(s.blocksize);
                         });

// The run-time ISA detection agrees with the kernel's view of this CPU (/proc/cpuinfo flags, which the kernel
// clears when the OS does not save the registers). AVX-VNNI is read from CPUID directly (clang 14's
// __builtin_cpu_supports has no "avxvnni"; the ThreadSanitizer build with clang failed to compile).
TEST(CpuIsaDetection, AgreesWithProcCpuinfo) {
  std::ifstream in("/proc/cpuinfo");
  std::set<std::string> flags;
  for (std::string line; std::getline(in, line);)
    if (line.rfind("flags", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      for (std::string w; words >> w;) flags.insert(w);
      break;
    }
  if (flags.empty()) GTEST_SKIP() << "no flags line in /proc/cpuinfo";
  const auto has = [&](const char* f) { return flags.count(f) > 0; };
  EXPECT_TRUE(cpu::isa_supported(Isa::Scalar));
  EXPECT_EQ(cpu::isa_supported(Isa::Avx2), has("avx2") && has("fma"));
  EXPECT_EQ(cpu::isa_supported(Isa::Avx2Vnni), has("avx2") && has("fma") && has("avx_vnni"));
  EXPECT_EQ(cpu::isa_supported(Isa::Avx512), has("avx512f") && has("avx512bw"));
  EXPECT_EQ(cpu::isa_supported(Isa::Avx512Vnni), has("avx512f") && has("avx512bw") && has("avx512_vnni"));
}

}  // namespace
}  // namespace moelab::test
