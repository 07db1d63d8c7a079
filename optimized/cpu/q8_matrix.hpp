#pragma once
// An int8 matrix with one FP32 scale per row (--lm-head q8): W[r, c] ~= scale[r] * values[r, c],
// scale = max|W[r, :]| / 127, values rounded to nearest even. A quarter of the FP32 lm_head's bytes,
// read once per decoded token.
#include <cstdint>
#include <vector>

#include "core/engine.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

struct Q8Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<int8_t> values;  // row-major [rows, cols]
  std::vector<float> scale;    // [rows]
  int64_t bytes() const { return int64_t(values.size() + scale.size() * sizeof(float)); }
};

Q8Matrix quantize_rows_q8(const MatrixRF& w);

// Y = X · Wᵀ for X [n, cols]: X quantized per 32 as the int8 path does (quantize_q8), integer dot
// products, rows split over the pool. `isa` picks the AVX2 kernel on AVX2 and AVX-512 machines
// (AVX-512 runs the 32-byte kernel: the lm_head is a small share of a step), scalar elsewhere.
MatrixRF q8_linear(Isa isa, const Q8Matrix& w, const MatrixRF& x, ThreadPool* pool);

// The kernels, for tests: y[t * y_stride + r - r0] from natural-order q8 activations (quantize_q8).
void q8_matrix_rows(Isa isa, const Q8Matrix& w, const int8_t* q, const float* d, int64_t xq_stride, int64_t d_stride,
                    int n, float* y, int64_t y_stride, int64_t r0, int64_t r1);

}  // namespace moelab::cpu
