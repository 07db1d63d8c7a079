// The trainer's products with the frozen weights (train/products.hpp): x·wᵀ and dy·w, in float on
// OpenBLAS and in double on Eigen, against a float64 computation with the rounding bound of a dot product.
// ctest also runs this file once per OpenBLAS kernel set (tests/blas_kernels_env.cpp).
//
// Bound: a float dot product of K terms, in any order and with or without fused multiply-adds, is within
// γ_K · Σ|x_k w_k| of the exact value, γ_K = K u / (1 - K u), u = 2^-24 (Higham, Accuracy and Stability of
// Numerical Algorithms, 3.1); the float64 reference is exact to far below that (its own error is
// γ_K with u = 2^-53). A block written at the wrong columns, a wrong leading dimension or a transposed
// operand gives errors of the order of the values themselves, thousands of times over the bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/error.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/quantize.hpp"
#include "train/products.hpp"

namespace moelab::train {
namespace {

template <typename S>
Mat<S> random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> e(-6, 6);  // magnitudes over a few binades, so absolute and relative differ
  Mat<S> m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = S(std::ldexp(u(gen), e(gen)));
  return m;
}

// Exact-enough products of the same values, and Σ|a||b| for the bound.
struct Reference {
  Mat<double> value, magnitude;
};

template <typename S>
Reference reference_x_wt(const Mat<S>& x, const Mat<S>& w) {
  const Mat<double> xd = x.template cast<double>(), wd = w.template cast<double>();
  return {xd * wd.transpose(), xd.cwiseAbs() * wd.cwiseAbs().transpose()};
}

template <typename S>
Reference reference_dy_w(const Mat<S>& dy, const Mat<S>& w) {
  const Mat<double> dyd = dy.template cast<double>(), wd = w.template cast<double>();
  return {dyd * wd, dyd.cwiseAbs() * wd.cwiseAbs()};
}

template <typename S>
void expect_within_bound(const Mat<S>& got, const Reference& ref, int64_t k, const char* what) {
  ASSERT_EQ(got.rows(), ref.value.rows()) << what;
  ASSERT_EQ(got.cols(), ref.value.cols()) << what;
  const double u = std::is_same_v<S, float> ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const double gamma = double(k) * u / (1 - double(k) * u);
  // The float64 reference's own error (γ_K at 2^-53) is added for S = double, where it is of the same order.
  const double allowed_factor = std::is_same_v<S, float> ? gamma : 2 * gamma;
  int64_t bad = 0;
  double worst = 0;
  for (int64_t i = 0; i < got.rows(); ++i)
    for (int64_t j = 0; j < got.cols(); ++j) {
      const double err = std::abs(double(got(i, j)) - ref.value(i, j));
      const double bound = allowed_factor * ref.magnitude(i, j);
      worst = std::max(worst, bound > 0 ? err / bound : (err > 0 ? INFINITY : 0));
      if (!(err <= bound)) ++bad;
    }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements outside γ_K Σ|a||b| (worst at "
                    << worst << " of the bound)";
}

struct Shape {
  int64_t n, in, out;
};

// One call (below kMinParallelMacs) and column blocks with a partial last block, for both products.
const Shape kShapes[] = {{1, 7, 5}, {3, 64, 130}, {0, 16, 8}, {16, 512, 1000}, {37, 300, 700}, {5, 1, 2000}};

template <typename S>
void check_products(const Products& mm) {
  uint64_t seed = 1;
  for (const auto& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "n " << s.n << ", in " << s.in << ", out " << s.out << ", " << mm.threads()
                                      << " threads");
    const Mat<S> x = random_matrix<S>(s.n, s.in, seed++), w = random_matrix<S>(s.out, s.in, seed++);
    const Mat<S> dy = random_matrix<S>(s.n, s.out, seed++);
    expect_within_bound(mm.x_wt(x, w), reference_x_wt(x, w), s.in, "x·wᵀ");
    expect_within_bound(mm.dy_w(dy, w), reference_dy_w(dy, w), s.out, "dy·w");
  }
}

TEST(TrainProducts, FloatWithinTheDotProductBound) {
  std::printf("[ INFO     ] OpenBLAS kernel set %s\n", Products::blas_kernels().c_str());
  for (int threads : {1, 2, 3}) check_products<float>(Products(threads));
}

TEST(TrainProducts, DoubleWithinTheDotProductBound) {
  for (int threads : {1, 3}) check_products<double>(Products(threads));
}

// The column blocks depend on the shapes alone: one thread and three give the same bits.
TEST(TrainProducts, SameBitsOnAnyThreadCount) {
  const Products one(1), three(3);
  const Mat<float> x = random_matrix<float>(24, 700, 11), w = random_matrix<float>(1100, 700, 12);
  const Mat<float> dy = random_matrix<float>(24, 1100, 13);
  ASSERT_GE(24 * 700 * 1100, Products::kMinParallelMacs);  // the blocked path
  EXPECT_TRUE(one.x_wt(x, w) == three.x_wt(x, w));
  EXPECT_TRUE(one.dy_w(dy, w) == three.dy_w(dy, w));
}

// NF4 weights, dequantized a tile at a time inside the products: the same bound against float64 on the
// dequantized values (bitsandbytes' float(code x absmax), from the scalar kernel), with several tiles and a
// partial last one (tiles of max(8, 2^18 / in) rows), a width the SIMD kernels cannot take (1000 % 32 != 0:
// the scalar fallback), one and three threads giving the same bits.
TEST(TrainProducts, Nf4WeightsWithinTheDotProductBoundOfTheirValues) {
  struct Nf4Shape {
    int64_t n, in, out;
  };
  uint64_t seed = 100;
  for (const auto& s : {Nf4Shape{5, 4096, 600}, Nf4Shape{3, 1000, 2100}, Nf4Shape{1, 64, 40}, Nf4Shape{17, 512, 9000}}) {
    SCOPED_TRACE(::testing::Message() << "NF4 n " << s.n << ", in " << s.in << ", out " << s.out);
    const Mat<float> dense = random_matrix<float>(s.out, s.in, seed++);
    const auto m = cpu::quantize_matrix(std::vector<float>(dense.data(), dense.data() + dense.size()), s.out, s.in, 64,
                                        /*double_quant=*/true);
    Mat<float> values(s.out, s.in);
    cpu::dequantize_rows(cpu::Isa::Scalar, m, 0, s.out, values.data());
    const Mat<float> x = random_matrix<float>(s.n, s.in, seed++), dy = random_matrix<float>(s.n, s.out, seed++);
    const Products one(1), three(3);
    const FrozenMatrix<float> w(m);
    const Mat<float> y1 = one.x_wt(x, w), dx1 = one.dy_w(dy, w);
    expect_within_bound(y1, reference_x_wt(x, values), s.in, "x·wᵀ, NF4");
    expect_within_bound(dx1, reference_dy_w(dy, values), s.out, "dy·w, NF4");
    EXPECT_TRUE(y1 == three.x_wt(x, w));
    EXPECT_TRUE(dx1 == three.dy_w(dy, w));
  }
}

// The small products (LoRA factors, attention per head): every transpose combination, alpha and an
// accumulating beta, against float64. alpha = 0.5 and beta = 1 scale exactly, so the bound is that of a dot
// product of k + 1 terms (the k products and C's old value): γ_{k+1} (|alpha| Σ|a||b| + |C|).
template <typename S>
void check_gemm() {
  uint64_t seed = 200;
  struct GemmShape {
    int64_t m, n, k;
  };
  for (const auto& s : {GemmShape{5, 7, 3}, GemmShape{64, 8, 128}, GemmShape{8, 128, 64}, GemmShape{1, 1, 1},
                        GemmShape{3, 4, 0}, GemmShape{0, 4, 5}, GemmShape{130, 33, 257}})
    for (const Op op_a : {Op::N, Op::T})
      for (const Op op_b : {Op::N, Op::T}) {
        SCOPED_TRACE(::testing::Message() << "m " << s.m << ", n " << s.n << ", k " << s.k << ", op_a "
                                          << (op_a == Op::T ? "T" : "N") << ", op_b " << (op_b == Op::T ? "T" : "N"));
        const Mat<S> a = op_a == Op::T ? random_matrix<S>(s.k, s.m, seed++) : random_matrix<S>(s.m, s.k, seed++);
        const Mat<S> b = op_b == Op::T ? random_matrix<S>(s.n, s.k, seed++) : random_matrix<S>(s.k, s.n, seed++);
        const Mat<S> c0 = random_matrix<S>(s.m, s.n, seed++);
        const Mat<double> ad = a.template cast<double>(), bd = b.template cast<double>();
        const Mat<double> opa = op_a == Op::T ? Mat<double>(ad.transpose()) : ad;
        const Mat<double> opb = op_b == Op::T ? Mat<double>(bd.transpose()) : bd;
        const Mat<double> mag = opa.cwiseAbs() * opb.cwiseAbs();

        const Mat<S> plain = product(a, op_a, b, op_b);
        expect_within_bound(plain, Reference{opa * opb, mag}, s.k, "op(a)·op(b)");

        Mat<S> acc = c0;
        gemm(a, op_a, b, op_b, S(0.5), S(1), acc);
        expect_within_bound(acc, Reference{0.5 * (opa * opb) + c0.template cast<double>(),
                                           0.5 * mag + c0.template cast<double>().cwiseAbs()},
                            s.k + 1, "c + 0.5 op(a)·op(b)");
      }
}

TEST(TrainProducts, SmallFloatProductsWithinTheDotProductBound) { check_gemm<float>(); }
TEST(TrainProducts, SmallDoubleProductsWithinTheDotProductBound) { check_gemm<double>(); }

TEST(TrainProducts, SmallProductShapeErrors) {
  const Mat<float> a = random_matrix<float>(2, 3, 1), b = random_matrix<float>(4, 5, 2);
  EXPECT_THROW(product(a, Op::N, b, Op::N), Error);  // inner 3 against 4
  Mat<float> c = random_matrix<float>(3, 3, 3);
  EXPECT_THROW(gemm(a, Op::N, b, Op::T, 1.0f, 1.0f, c), Error);  // inner 3 against 5
  const Mat<float> bt = random_matrix<float>(5, 3, 4);
  EXPECT_THROW(gemm(a, Op::N, bt, Op::T, 1.0f, 1.0f, c), Error);  // [2, 5] into [3, 3]
}

TEST(TrainProducts, MismatchedInnerDimensionIsAnError) {
  const Products mm(1);
  const Mat<float> x = random_matrix<float>(2, 3, 1), w = random_matrix<float>(4, 5, 2);
  EXPECT_THROW(mm.x_wt(x, w), Error);
  EXPECT_THROW(mm.dy_w(x, w), Error);
}

}  // namespace
}  // namespace moelab::train
