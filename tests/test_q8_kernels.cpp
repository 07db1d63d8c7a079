// The int8 path (--activations int8) on every instruction set: activation quantization against its
// definition, every kernel against the integer model evaluated in float64 and against the scalar
// kernel, and the whole approximation against the exact product on the dequantized weights, each with
// a bound derived below. An instruction set this CPU lacks is reported SKIPPED with the reason.
//
// The integer model: y[r] = sum over segments s (a weight block b intersected with an activation group g)
// of absmax[b] * d[g] * isum_s, isum_s = sum_i kNf4Int8[code_i] * q_i exact in int32 (|isum| <=
// 32 * 127 * 127 < 2^24, so exact in FP32 too). A kernel rounds absmax * d, each term's product and
// every addition in FP32: |y - y64| <= (cols + 4) * 2^-24 * sum_i |absmax d kNf4Int8[code_i] q_i|
// (Higham 3.5, with at most cols terms however a kernel splits the sums). A wrong code, nibble,
// lane-to-group mapping or scale is off by O(that magnitude) and fails it.
//
// The approximation: with w = absmax c (c the NF4 code), w^ = absmax kNf4Int8 / 127 and
// x^ = q d 127, |w x - w^ x^| <= |w - w^| |x| + |w^| |x - x^| per element, where |w - w^| <= 0.0037
// absmax (the worst rounding in kNf4Int8) and |x - x^| <= max|x_g| / 254 (half a quantization step).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "isa_test_util.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/q8_matrix.hpp"
#include "optimized/cpu/quantize.hpp"

namespace moelab::test {
namespace {

using cpu::Isa;
using cpu::Nf4Matrix;

struct Shape {
  int64_t rows, cols;
  int blocksize;
  bool double_quant;
};

Nf4Matrix random_quantized(const Shape& s, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> values(static_cast<size_t>(s.rows * s.cols));
  for (auto& v : values) v = normal(rng);
  return cpu::quantize_matrix(values, s.rows, s.cols, s.blocksize, s.double_quant);
}

int code_at(const Nf4Matrix& w, int64_t i) {
  return (i & 1) ? w.packed[size_t(i >> 1)] & 15 : w.packed[size_t(i >> 1)] >> 4;
}

std::vector<float> gaussian(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = normal(rng);
  return x;
}

TEST(Q8Quantize, FollowsTheRuleForEveryGroup) {
  std::mt19937 rng(5);
  for (int64_t cols : {1, 31, 32, 33, 64, 100, 4096}) {
    auto x = gaussian(cols, rng, 3.0f);
    if (cols > 40) std::fill(x.begin() + 32, x.begin() + 64 > x.end() ? x.end() : x.begin() + 64, 0.0f);  // an all-zero group
    std::vector<int8_t> q(static_cast<size_t>(cols));
    std::vector<float> d(static_cast<size_t>((cols + 31) / 32));
    cpu::quantize_q8(x.data(), cols, q.data(), d.data());
    for (int64_t g0 = 0; g0 < cols; g0 += 32) {
      double amax = 0;
      for (int64_t i = g0; i < std::min(cols, g0 + 32); ++i) amax = std::max(amax, std::abs(double(x[size_t(i)])));
      ASSERT_NEAR(double(d[size_t(g0 / 32)]), amax / (127.0 * 127.0), amax / (127.0 * 127.0) * 1e-6) << "group " << g0 / 32;
      for (int64_t i = g0; i < std::min(cols, g0 + 32); ++i) {
        ASSERT_LE(std::abs(int(q[size_t(i)])), 127);
        // q is x / (amax / 127) rounded: within half a step (plus FP32 rounding of x * 127 / amax).
        ASSERT_LE(std::abs(double(q[size_t(i)]) * amax / 127.0 - double(x[size_t(i)])), amax / 254.0 * (1 + 1e-5))
            << "element " << i;
      }
    }
  }
  // Non-finite activations must not give finite-looking results.
  std::vector<float> bad(64, 1.0f);
  bad[3] = std::nanf("");
  std::vector<int8_t> q(64);
  std::vector<float> d(2);
  cpu::quantize_q8(bad.data(), 64, q.data(), d.data());
  EXPECT_TRUE(std::isnan(d[0]));
  EXPECT_FALSE(std::isnan(d[1]));
}

TEST(Q8Quantize, CompactAbsmaxDecodesToTheFp32AbsmaxBitForBit) {
  std::mt19937 rng(9);
  const auto w = random_quantized({300, 512, 64, true}, rng);
  ASSERT_TRUE(w.double_quantized());
  for (int64_t b = 0; b < int64_t(w.absmax.size()); ++b) {
    const float compact = w.block_absmax(b);
    ASSERT_EQ(std::memcmp(&w.absmax[size_t(b)], &compact, sizeof(float)), 0) << "block " << b;
  }
  EXPECT_LT(w.streamed_bytes(), w.packed_bytes() + int64_t(w.absmax.size() * sizeof(float)));
}

class Q8Kernels : public ::testing::TestWithParam<std::tuple<Isa, Shape>> {};

TEST_P(Q8Kernels, MatchFloat64IntegerModelScalarKernelAndExactProduct) {
  const auto [isa, s] = GetParam();
  if (!cpu::isa_supported(isa))
    GTEST_SKIP() << cpu::isa_name(isa) << " not run: this CPU lacks " << cpu::isa_features(isa);
  std::mt19937 rng(uint32_t(s.rows * 131 + s.cols * 7 + s.blocksize + s.double_quant));
  const auto w = random_quantized(s, rng);
  if (isa != Isa::Scalar && !cpu::q8_simd_kernel(isa, w))
    std::cout << "[ NOTE ] " << cpu::isa_name(isa) << " falls back to the scalar int8 kernel for this shape\n";
  const int64_t nq = cpu::q8_values(w), nd = cpu::q8_scales(isa, w);
  for (int n : {1, 2, 3, 4, 5, 9}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    std::vector<std::vector<float>> x;
    std::vector<int8_t> q(static_cast<size_t>(n * nq)), q_nat(size_t(n * nq));
    std::vector<float> d(static_cast<size_t>(n * nd)), d_nat(size_t(n * ((s.cols + 31) / 32)));
    for (int t = 0; t < n; ++t) {
      x.push_back(gaussian(s.cols, rng, t % 2 ? 0.3f : 2.0f));
      cpu::prepare_q8(isa, w, x.back().data(), q.data() + t * nq, d.data() + t * nd);
      cpu::quantize_q8(x.back().data(), s.cols, q_nat.data() + t * nq, d_nat.data() + t * ((s.cols + 31) / 32));
    }
    // Rows [1, rows - 1) when there are enough: a range off any row-block boundary.
    const int64_t r0 = s.rows > 2 ? 1 : 0, r1 = s.rows > 2 ? s.rows - 1 : s.rows, m = r1 - r0;
    std::vector<float> y(size_t(n * m), std::nanf("")), y_scalar(size_t(n * m), std::nanf(""));
    cpu::gemv_q8(isa, w, q.data(), nq, d.data(), nd, n, y.data(), m, r0, r1);
    cpu::gemv_q8(Isa::Scalar, w, q_nat.data(), nq, d_nat.data(), (s.cols + 31) / 32, n, y_scalar.data(), m, r0, r1);
    for (int t = 0; t < n; ++t) {
      const int8_t* qt = q_nat.data() + t * nq;
      const float* dt = d_nat.data() + t * ((s.cols + 31) / 32);
      for (int64_t r = r0; r < r1; ++r) {
        double model = 0, magnitude = 0, exact = 0, approx_bound = 0;
        for (int64_t c = 0; c < s.cols; ++c) {
          const int64_t e = r * s.cols + c;
          const double a = w.absmax[size_t(e / s.blocksize)];
          const int code = code_at(w, e);
          const double dg = dt[c / 32], term = a * dg * cpu::kNf4Int8[code] * qt[c];
          model += term;
          magnitude += std::abs(term);
          const double wv = a * cpu::kNf4Codes[code], w_hat = a * cpu::kNf4Int8[code] / 127.0;
          const double xv = x[size_t(t)][size_t(c)], x_hat = qt[c] * dg * 127.0;
          exact += wv * xv;
          approx_bound += std::abs(wv - w_hat) * std::abs(xv) + std::abs(w_hat) * std::abs(xv - x_hat);
          // The a-priori parts of that bound, as stated in the header comment.
          ASSERT_LE(std::abs(wv - w_hat), 0.0037 * a);
          ASSERT_LE(std::abs(xv - x_hat), dg * 127.0 * 127.0 / 254.0 * (1 + 1e-5));
        }
        const double fp32 = (double(s.cols) + 4) * std::ldexp(1.0, -24) * magnitude;
        const float got = y[size_t(t * m + r - r0)];
        ASSERT_LE(std::abs(got - model), fp32) << "token " << t << " row " << r;
        ASSERT_LE(std::abs(got - y_scalar[size_t(t * m + r - r0)]), 2 * fp32) << "token " << t << " row " << r;
        ASSERT_LE(std::abs(got - exact), approx_bound + fp32 + 1e-6 * std::abs(exact)) << "token " << t << " row " << r;
      }
    }
  }
}

// Shapes: SIMD-friendly ones (cols a multiple of 128 and 64), ones only AVX2 takes (cols % 128 == 64),
// every blocksize bitsandbytes allows (32 runs the scalar kernel everywhere), rows that start inside a
// block (cols not a multiple of the blocksize), odd columns, and w2's 14336-wide rows.
INSTANTIATE_TEST_SUITE_P(
    AllIsas, Q8Kernels,
    ::testing::Combine(::testing::ValuesIn(cpu::kAllIsas),
                       ::testing::Values(Shape{1, 64, 64, true}, Shape{9, 128, 64, true}, Shape{6, 192, 64, true},
                                         Shape{5, 4096 + 64, 64, true}, Shape{3, 256, 128, false},
                                         Shape{4, 384, 32, true}, Shape{3, 640, 128, true}, Shape{2, 512, 256, true},
                                         Shape{3, 1024, 512, true}, Shape{2, 2048, 1024, false},
                                         Shape{3, 6144, 2048, true}, Shape{3, 6144, 4096, true},
                                         Shape{4, 40, 64, true}, Shape{3, 7, 64, true}, Shape{5, 96, 64, false},
                                         Shape{3, 14336, 64, true})),
    [](const auto& info) {
      const auto& s = std::get<1>(info.param);
      std::string isa = cpu::isa_name(std::get<0>(info.param));
      for (auto& ch : isa)
        if (ch == '-') ch = '_';
      return isa + "_" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + "_b" + std::to_string(s.blocksize) +
             (s.double_quant ? "_dq" : "");
    });

}  // namespace
}  // namespace moelab::test

namespace moelab::test {
namespace {

// --lm-head q8: int8 rows with an FP32 scale each, against the float64 value of the same integer model
// (FP32 rounding bound as above) and against the FP32 product (bound: half a step of each row's and
// each activation group's quantization, summed over the row).
class Q8MatrixRows : public ::testing::TestWithParam<Isa> {};

TEST_P(Q8MatrixRows, MatchFloat64AndTheFp32Product) {
  const Isa isa = GetParam();
  MOELAB_SKIP_UNLESS_RUNS_HERE(isa);
  std::mt19937 rng(21);
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{37, 96}, {5, 4096}, {9, 100}}) {
    MatrixRF w(rows, cols);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
    const auto q8 = cpu::quantize_rows_q8(w);
    for (int n : {1, 3, 6}) {
      MatrixRF x(n, cols);
      for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng) * 50.0f;
      std::vector<int8_t> q(static_cast<size_t>(n * cols));
      const int64_t nd = (cols + 31) / 32;
      std::vector<float> d(static_cast<size_t>(n * nd));
      for (int t = 0; t < n; ++t) cpu::quantize_q8(x.row(t).data(), cols, q.data() + t * cols, d.data() + t * nd);
      {
        std::vector<float> y(static_cast<size_t>(n * rows), std::nanf(""));
        cpu::q8_matrix_rows(isa, q8, q.data(), d.data(), cols, nd, n, y.data(), rows, 0, rows);
        for (int t = 0; t < n; ++t)
          for (int64_t r = 0; r < rows; ++r) {
            double model = 0, magnitude = 0, exact = 0, approx = 0;
            for (int64_t c = 0; c < cols; ++c) {
              const double term = 127.0 * q8.scale[size_t(r)] * double(d[size_t(t * nd + c / 32)]) *
                                  q8.values[size_t(r * cols + c)] * q[size_t(t * cols + c)];
              model += term;
              magnitude += std::abs(term);
              const double w_hat = double(q8.scale[size_t(r)]) * q8.values[size_t(r * cols + c)];
              const double x_hat = 127.0 * double(d[size_t(t * nd + c / 32)]) * q[size_t(t * cols + c)];
              exact += double(w(r, c)) * double(x(t, c));
              approx += std::abs(double(w(r, c)) - w_hat) * std::abs(double(x(t, c))) + std::abs(w_hat) * std::abs(double(x(t, c)) - x_hat);
            }
            const double fp32 = (double(cols) + 4) * std::ldexp(1.0, -24) * magnitude;
            const float got = y[size_t(t * rows + r)];
            ASSERT_LE(std::abs(got - model), fp32) << cpu::isa_name(isa) << " token " << t << " row " << r;
            ASSERT_LE(std::abs(got - exact), approx + fp32) << cpu::isa_name(isa) << " token " << t << " row " << r;
          }
      }
    }
  }
}

// The int8 lm_head has scalar and AVX2 kernels (any other kernel set runs the AVX2 one where the CPU has AVX2).
INSTANTIATE_TEST_SUITE_P(Isas, Q8MatrixRows, ::testing::Values(Isa::Scalar, Isa::Avx2),
                         [](const auto& info) { return isa_test_name(info.param); });

}  // namespace
}  // namespace moelab::test
