#include "optimized/cpu/linear.hpp"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace moelab::cpu {

MatrixRF nf4_linear(Isa isa, const Nf4Matrix& w, const MatrixRF& x) {
  const int64_t n = x.rows();
  const bool parallel = n * w.rows * w.cols >= kMinParallelMacs;
  if (n <= kGemvMaxTokens) {
    // ~128 KiB of packed weights per chunk: small enough to stay in L2 while each token reads it.
    const int64_t chunk = std::max<int64_t>(8, (256 * 1024) / std::max<int64_t>(1, w.cols));
    const int64_t chunks = (w.rows + chunk - 1) / chunk;
    MatrixRF xs(n, w.cols);  // activations in the kernel's layout, prepared once for all threads
    for (int64_t t = 0; t < n; ++t) prepare_x(isa, w, x.row(t).data(), xs.row(t).data());
    MatrixRF yt(n, w.rows);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * chunk, r1 = std::min(w.rows, r0 + chunk);
      gemv_prepared_batch(isa, w, xs.data(), xs.cols(), int(n), yt.data() + r0, yt.cols(), r0, r1);
    }
    return yt;
  }
  // ~256 KiB of dequantized FP32 rows per tile.
  const int64_t tile = std::max<int64_t>(4, (64 * 1024) / std::max<int64_t>(1, w.cols));
  const int64_t tiles = (w.rows + tile - 1) / tile;
  MatrixRF y(n, w.rows);
  const auto tiles_from = [&](MatrixRF& wt, int64_t i) {
    const int64_t r0 = i * tile, rows = std::min(tile, w.rows - r0);
    dequantize_rows(isa, w, r0, r0 + rows, wt.data());
    y.middleCols(r0, rows).noalias() = x * wt.topRows(rows).transpose();
  };
  if (!parallel) {
    // No OpenMP region at all here: inside even a one-thread region (`parallel if (false)`) Eigen's GEMM
    // does not see that it is nested and opens a nested team per call, which beside another busy process
    // made a small model's eval 100x slower.
    MatrixRF wt(tile, w.cols);
    for (int64_t i = 0; i < tiles; ++i) tiles_from(wt, i);
    return y;
  }
#pragma omp parallel
  {
    MatrixRF wt(tile, w.cols);  // Eigen's GEMM sees the enclosing team and stays on this thread
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiles; ++i) tiles_from(wt, i);
  }
  return y;
}

MatrixRF fp32_linear(const MatrixRF& x, const MatrixRF& w) {
  const int64_t n = x.rows();
  MatrixRF y(n, w.rows());
  if (n > kGemvMaxTokens || n * w.rows() * w.cols() < kMinParallelMacs) {
    y.noalias() = x * w.transpose();  // a GEMM Eigen threads itself, or too small to split
    return y;
  }
  constexpr Eigen::Index kChunk = 1024;
#pragma omp parallel for schedule(static)
  for (Eigen::Index r0 = 0; r0 < w.rows(); r0 += kChunk) {
    const Eigen::Index rows = std::min(kChunk, w.rows() - r0);
    y.middleCols(r0, rows).noalias() = x * w.middleRows(r0, rows).transpose();  // inside the team: one thread
  }
  return y;
}

}  // namespace moelab::cpu
