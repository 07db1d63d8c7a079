#pragma once
// A BF16 matrix (--lm-head bf16): the checkpoint's own BF16 values kept as they are (FP32 sources are
// rounded to nearest even, as torch does), half the FP32 head's bytes, multiplied with FP32 activations
// (no activation rounding: the only error beyond FP32 accumulation is the weights' BF16 rounding, none
// at all for a BF16 checkpoint).
#include <cstdint>
#include <vector>

#include "core/engine.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

struct Bf16Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<uint16_t> values;  // row-major [rows, cols], BF16 bit patterns
  int64_t bytes() const { return int64_t(values.size() * sizeof(uint16_t)); }
};

Bf16Matrix round_rows_bf16(const MatrixRF& w);

// Y = X · Wᵀ for X [n, cols], rows split over the pool; the AVX2 kernel on AVX2 and AVX-512 machines.
MatrixRF bf16_linear(Isa isa, const Bf16Matrix& w, const MatrixRF& x, ThreadPool* pool);

// The kernels, for tests: y[t * y_stride + r - r0] = sum_c x[t * x_stride + c] * W[r, c].
void bf16_matrix_rows(Isa isa, const Bf16Matrix& w, const float* x, int64_t x_stride, int n, float* y, int64_t y_stride,
                      int64_t r0, int64_t r1);

}  // namespace moelab::cpu
