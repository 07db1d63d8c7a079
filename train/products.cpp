#include "train/products.hpp"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "core/error.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/nf4_matrix.hpp"
#include "optimized/cpu/thread_pool.hpp"
#include "train/blas_kernels.hpp"

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

// C [m, n] (row-major, leading dimension ldc) = A [m, k] · op(B) + beta C, op(B) = Bᵀ when b_transposed
// (B [n, k]) else B ([k, n]).
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool b_transposed,
          float* c, int64_t ldc, float beta = 0.0f) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, b_transposed ? CblasTrans : CblasNoTrans, blasint(m), blasint(n), blasint(k),
              1.0f, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc));
}

// Rows of an NF4 weight per dequantized tile: ~1 MiB of FP32, at least 8 rows. The tile is a product's own
// (per block, or per call), written and read while in cache, where a whole dequantized layer (Mixtral's:
// 5.8 GB) went through memory twice. Measured on the Mixtral shape (2 layers, AVX2, 2 threads): 19.3
// tokens/s at 1 MiB, 18.7 at 4 MiB, 16.1 at 256 KiB.
int64_t nf4_tile_rows(const cpu::Nf4Matrix& m) {
  return std::max<int64_t>(8, (int64_t(1) << 18) / std::max<int64_t>(1, m.cols));
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

Products::Products(int threads)
    : pool_(std::make_unique<cpu::ThreadPool>(threads > 0 ? threads : cpu::physical_cores())), isa_(cpu::best_isa()) {
  // Before any BLAS call: a kernel set forced with OPENBLAS_CORETYPE that this CPU cannot run would end the
  // process on an illegal instruction at the first sgemm; this throws a moelab::Error saying so instead.
  require_runnable_blas_kernels();
  single_threaded_blas();
}

Products::~Products() = default;

int Products::threads() const { return pool_->threads(); }

void Products::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) const {
  pool_->parallel_for(n, grain, [&](int64_t begin, int64_t end) {
    const cpu::OneOpenMpThread one;  // Eigen's products stay on this pool thread
    body(begin, end);
  });
}

template <typename S>
int64_t FrozenMatrix<S>::rows() const {
  return dense ? dense->rows() : nf4->rows;
}

template <typename S>
int64_t FrozenMatrix<S>::cols() const {
  return dense ? dense->cols() : nf4->cols;
}

template struct FrozenMatrix<float>;
template struct FrozenMatrix<double>;

namespace {

// This thread's tile buffer, grown to `floats` (kept for the thread's life: no allocation, page faults or
// clearing per tile).
float* tile_buffer(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t size = 0;
  if (size < floats) {
    buffer.reset(new float[floats]);
    size = floats;
  }
  return buffer.get();
}

// x·Wᵀ with W in NF4: per tile of W's rows (= output columns), dequantize into the block's own buffer, then
// one sgemm; the tiles are the work items.
Mat<float> nf4_x_wt(const Products& p, cpu::Isa isa, const Mat<float>& x, const cpu::Nf4Matrix& m) {
  const int64_t n = x.rows(), out = m.rows, in = m.cols, tile = nf4_tile_rows(m);
  Mat<float> y(n, out);
  if (n == 0 || out == 0) return y;
  if (in == 0) return Mat<float>::Zero(n, out);
  const int64_t tiles = (out + tile - 1) / tile;
  const auto run = [&](int64_t t0, int64_t t1) {
    // This thread's buffer: nothing below calls back into Products, so no nested product can reuse it.
    float* w = tile_buffer(size_t(std::min(tile, out) * in));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, r1 = std::min(out, r0 + tile);
      cpu::dequantize_rows(isa, m, r0, r1, w);
      gemm(n, r1 - r0, in, x.data(), in, w, in, true, y.data() + r0, out);
    }
  };
  if (n * out * in >= Products::kMinParallelMacs) p.parallel_for(tiles, 1, run);
  else run(0, tiles);
  return y;
}

// dy·W with W in NF4: dx = Σ over tiles of W's rows of dy[:, tile] · W[tile, :], the tiles in order (each
// dequantized once, its rows split over the pool), each tile's product split over blocks of dx's columns.
Mat<float> nf4_dy_w(const Products& p, cpu::Isa isa, const Mat<float>& dy, const cpu::Nf4Matrix& m) {
  // Each tile is two pool sections (dequantize, multiply). 4 MiB tiles (a quarter of the sections) were no
  // faster beside a busy process (Mixtral shape, 2 threads: 20.2 s against 20.3) and 3% slower idle.
  const int64_t n = dy.rows(), out = m.rows, in = m.cols, tile = nf4_tile_rows(m);
  Mat<float> dx = Mat<float>::Zero(n, in);
  if (n == 0 || out == 0 || in == 0) return dx;
  const bool parallel = n * out * in >= Products::kMinParallelMacs;
  const std::unique_ptr<float[]> tile_values(new float[size_t(std::min(tile, out) * in)]);  // no need to clear
  float* const w = tile_values.get();
  const int64_t rows_per_item = std::max<int64_t>(1, (int64_t(1) << 15) / in);
  const int64_t col_blocks = (in + Products::kColumnBlock - 1) / Products::kColumnBlock;
  for (int64_t r0 = 0; r0 < out; r0 += tile) {
    const int64_t r1 = std::min(out, r0 + tile), items = (r1 - r0 + rows_per_item - 1) / rows_per_item;
    const auto dequantize = [&](int64_t i0, int64_t i1) {
      const int64_t a = r0 + i0 * rows_per_item, b = std::min(r1, r0 + i1 * rows_per_item);
      cpu::dequantize_rows(isa, m, a, b, w + (a - r0) * in);
    };
    const auto multiply = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * Products::kColumnBlock, c1 = std::min(in, c0 + Products::kColumnBlock);
        gemm(n, c1 - c0, r1 - r0, dy.data() + r0, out, w + c0, in, false, dx.data() + c0, in, 1.0f);
      }
    };
    if (parallel) {
      p.parallel_for(items, 1, dequantize);
      p.parallel_for(col_blocks, 1, multiply);
    } else {
      dequantize(0, items);
      multiply(0, col_blocks);
    }
  }
  return dx;
}

}  // namespace

template <>
Mat<float> Products::x_wt(const Mat<float>& x, const FrozenMatrix<float>& fw) const {
  check_inner("x·wᵀ", x.cols(), fw.cols());
  if (fw.nf4) return nf4_x_wt(*this, isa_, x, *fw.nf4);
  const Mat<float>& w = *fw.dense;
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
Mat<float> Products::dy_w(const Mat<float>& dy, const FrozenMatrix<float>& fw) const {
  check_inner("dy·w", dy.cols(), fw.rows());
  if (fw.nf4) return nf4_dy_w(*this, isa_, dy, *fw.nf4);
  const Mat<float>& w = *fw.dense;
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
Mat<double> Products::x_wt(const Mat<double>& x, const FrozenMatrix<double>& fw) const {
  if (!fw.dense) throw Error("trainer product x·wᵀ: NF4 weights are read in float only");
  const Mat<double>& w = *fw.dense;
  check_inner("x·wᵀ", x.cols(), w.cols());
  Mat<double> y(x.rows(), w.rows());
  over_column_blocks(*this, x.rows(), w.rows(), x.cols(), [&](int64_t c0, int64_t c1) {
    y.middleCols(c0, c1 - c0).noalias() = x * w.middleRows(c0, c1 - c0).transpose();
  });
  return y;
}

template <>
Mat<double> Products::dy_w(const Mat<double>& dy, const FrozenMatrix<double>& fw) const {
  if (!fw.dense) throw Error("trainer product dy·w: NF4 weights are read in float only");
  const Mat<double>& w = *fw.dense;
  check_inner("dy·w", dy.cols(), w.rows());
  Mat<double> dx(dy.rows(), w.cols());
  over_column_blocks(*this, dy.rows(), w.cols(), w.rows(), [&](int64_t c0, int64_t c1) {
    dx.middleCols(c0, c1 - c0).noalias() = dy * w.middleCols(c0, c1 - c0);
  });
  return dx;
}

namespace {

// op(A) [m, k] · op(B) [k, n] into C: the shapes, checked (inner dimensions; C's when accumulating).
struct GemmShape {
  int64_t m, n, k;
  bool ta, tb;
};

template <typename S>
GemmShape gemm_shape(const Mat<S>& a, Op op_a, const Mat<S>& b, Op op_b, const Mat<S>& c, bool accumulate) {
  const bool ta = op_a == Op::T, tb = op_b == Op::T;
  const GemmShape g{ta ? a.cols() : a.rows(), tb ? b.rows() : b.cols(), ta ? a.rows() : a.cols(), ta, tb};
  const int64_t kb = tb ? b.cols() : b.rows();
  if (g.k != kb) throw Error(fmt::format("trainer product op(a)·op(b): inner dimensions {} and {} differ", g.k, kb));
  if (accumulate && (c.rows() != g.m || c.cols() != g.n))
    throw Error(fmt::format("trainer product op(a)·op(b): accumulating a [{}, {}] product into a [{}, {}] matrix", g.m,
                            g.n, c.rows(), c.cols()));
  return g;
}

}  // namespace

template <>
void gemm(const Mat<float>& a, Op op_a, const Mat<float>& b, Op op_b, float alpha, float beta, Mat<float>& c) {
  const auto [m, n, k, ta, tb] = gemm_shape(a, op_a, b, op_b, c, beta != 0.0f);
  if (beta == 0.0f) c.resize(m, n);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // OpenBLAS reads no operand then, but its leading dimensions must still be >= 1
    if (beta == 0.0f) c.setZero();
    else c *= beta;
    return;
  }
  single_threaded_blas();
  // Row-major storage: a stored matrix's leading dimension is its column count, transposed or not.
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, blasint(m), blasint(n),
              blasint(k), alpha, a.data(), blasint(a.cols()), b.data(), blasint(b.cols()), beta, c.data(), blasint(n));
}

template <>
void gemm(const Mat<double>& a, Op op_a, const Mat<double>& b, Op op_b, double alpha, double beta, Mat<double>& c) {
  const bool ta = op_a == Op::T, tb = op_b == Op::T;
  gemm_shape(a, op_a, b, op_b, c, beta != 0.0);
  const auto apply = [&](const auto& x, const auto& y) {
    if (beta == 0.0) c.noalias() = alpha * (x * y);
    else {
      c *= beta;
      c.noalias() += alpha * (x * y);
    }
  };
  if (ta && tb) apply(a.transpose(), b.transpose());
  else if (ta) apply(a.transpose(), b);
  else if (tb) apply(a, b.transpose());
  else apply(a, b);
}

std::string Products::blas_kernels() { return openblas_get_corename(); }

}  // namespace moelab::train
