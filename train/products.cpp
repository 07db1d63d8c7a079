#include "train/products.hpp"

#include <cblas.h>
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>

#include "core/error.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::train {

namespace {

// OpenBLAS's pthread build (the one safe for calls from several threads at once; CMakeLists.txt) would
// split each call over threads of its own, beside the pool's: every call runs on its caller alone.
void single_threaded_blas() {
  static const bool once = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

// C [m, n] (row-major, leading dimension ldc) = A [m, k] · op(B), op(B) = Bᵀ when b_transposed (B [n, k])
// else B ([k, n]).
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool b_transposed,
          float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, b_transposed ? CblasTrans : CblasNoTrans, blasint(m), blasint(n), blasint(k),
              1.0f, a, blasint(lda), b, blasint(ldb), 0.0f, c, blasint(ldc));
}

// Runs block(c0, c1) over the output columns [0, cols): in blocks of kColumnBlock on the pool when the
// product is large, else once.
template <class Block>
void over_column_blocks(const Products& p, int64_t rows, int64_t cols, int64_t depth, const Block& block) {
  if (rows * cols * depth < Products::kMinParallelMacs) return block(0, cols);
  const int64_t blocks = (cols + Products::kColumnBlock - 1) / Products::kColumnBlock;
  p.parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      block(b * Products::kColumnBlock, std::min(cols, (b + 1) * Products::kColumnBlock));
  });
}

void check_inner(const char* what, int64_t a, int64_t b) {
  if (a != b) throw Error(fmt::format("trainer product {}: inner dimensions {} and {} differ", what, a, b));
}

}  // namespace

OneEigenThread::OneEigenThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
OneEigenThread::~OneEigenThread() { omp_set_num_threads(saved_); }

Products::Products(int threads) : pool_(std::make_unique<cpu::ThreadPool>(threads > 0 ? threads : cpu::physical_cores())) {
  single_threaded_blas();
}

Products::~Products() = default;

int Products::threads() const { return pool_->threads(); }

void Products::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) const {
  pool_->parallel_for(n, grain, [&](int64_t begin, int64_t end) {
    const OneEigenThread one;
    body(begin, end);
  });
}

template <>
Mat<float> Products::x_wt(const Mat<float>& x, const Mat<float>& w) const {
  check_inner("x·wᵀ", x.cols(), w.cols());
  const int64_t n = x.rows(), out = w.rows(), in = x.cols();
  Mat<float> y(n, out);
  if (n == 0 || out == 0) return y;
  if (in == 0) return Mat<float>::Zero(n, out);
  over_column_blocks(*this, n, out, in, [&](int64_t c0, int64_t c1) {
    gemm(n, c1 - c0, in, x.data(), in, w.data() + c0 * in, in, true, y.data() + c0, out);
  });
  return y;
}

template <>
Mat<float> Products::dy_w(const Mat<float>& dy, const Mat<float>& w) const {
  check_inner("dy·w", dy.cols(), w.rows());
  const int64_t n = dy.rows(), out = w.rows(), in = w.cols();
  Mat<float> dx(n, in);
  if (n == 0 || in == 0) return dx;
  if (out == 0) return Mat<float>::Zero(n, in);
  over_column_blocks(*this, n, in, out, [&](int64_t c0, int64_t c1) {
    gemm(n, c1 - c0, out, dy.data(), out, w.data() + c0, in, false, dx.data() + c0, in);
  });
  return dx;
}

template <>
Mat<double> Products::x_wt(const Mat<double>& x, const Mat<double>& w) const {
  check_inner("x·wᵀ", x.cols(), w.cols());
  Mat<double> y(x.rows(), w.rows());
  over_column_blocks(*this, x.rows(), w.rows(), x.cols(), [&](int64_t c0, int64_t c1) {
    y.middleCols(c0, c1 - c0).noalias() = x * w.middleRows(c0, c1 - c0).transpose();
  });
  return y;
}

template <>
Mat<double> Products::dy_w(const Mat<double>& dy, const Mat<double>& w) const {
  check_inner("dy·w", dy.cols(), w.rows());
  Mat<double> dx(dy.rows(), w.cols());
  over_column_blocks(*this, dy.rows(), w.cols(), w.rows(), [&](int64_t c0, int64_t c1) {
    dx.middleCols(c0, c1 - c0).noalias() = dy * w.middleCols(c0, c1 - c0);
  });
  return dx;
}

std::string Products::blas_kernels() { return openblas_get_corename(); }

}  // namespace moelab::train
