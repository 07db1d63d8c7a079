#include "optimized/cpu/bf16_matrix.hpp"

#include <immintrin.h>

#include <algorithm>

#include "core/dtype.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/row_chunks.hpp"

namespace moelab::cpu {
namespace {

void rows_scalar(const Bf16Matrix& w, const float* x, int64_t x_stride, int n, float* y, int64_t y_stride, int64_t r0,
                 int64_t r1) {
  for (int t = 0; t < n; ++t)
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* v = w.values.data() + r * w.cols;
      float acc = 0;
      for (int64_t c = 0; c < w.cols; ++c) acc += bf16_to_f32(v[c]) * x[t * x_stride + c];
      y[t * y_stride + r - r0] = acc;
    }
}

// BF16 is FP32's upper half: widen 8 codes to 32 bits and shift them up.
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) inline float reduce(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// T tokens share each loaded row; two accumulators per token hide the FMA latency.
template <int T>
__attribute__((target("avx2,fma"))) void rows_avx2_t(const Bf16Matrix& w, const float* x, int64_t x_stride, float* y,
                                                      int64_t y_stride, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* v = w.values.data() + r * w.cols;
    __m256 a0[T], a1[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= w.cols; c += 16) {
      const __m256 w0 = load8(v + c), w1 = load8(v + c + 8);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * x_stride + c), a0[t]);
        a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * x_stride + c + 8), a1[t]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      float acc = reduce(_mm256_add_ps(a0[t], a1[t]));
      for (int64_t k = c; k < w.cols; ++k) acc += bf16_to_f32(v[k]) * x[t * x_stride + k];
      y[t * y_stride + r - r0] = acc;
    }
  }
}

void rows_avx2(const Bf16Matrix& w, const float* x, int64_t x_stride, int n, float* y, int64_t y_stride, int64_t r0,
               int64_t r1) {
  int t = 0;
  for (; t + 4 <= n; t += 4) rows_avx2_t<4>(w, x + t * x_stride, x_stride, y + t * y_stride, y_stride, r0, r1);
  for (; t < n; ++t) rows_avx2_t<1>(w, x + t * x_stride, x_stride, y + t * y_stride, y_stride, r0, r1);
}

}  // namespace

Bf16Matrix round_rows_bf16(const MatrixRF& w) {
  Bf16Matrix m;
  m.rows = w.rows();
  m.cols = w.cols();
  m.values.resize(size_t(w.size()));
  for (int64_t i = 0; i < int64_t(w.size()); ++i) m.values[size_t(i)] = f32_to_bf16(w.data()[i]);
  return m;
}

void bf16_matrix_rows(Isa isa, const Bf16Matrix& w, const float* x, int64_t x_stride, int n, float* y, int64_t y_stride,
                      int64_t r0, int64_t r1) {
  if (isa != Isa::Scalar && isa_supported(Isa::Avx2)) return rows_avx2(w, x, x_stride, n, y, y_stride, r0, r1);
  rows_scalar(w, x, x_stride, n, y, y_stride, r0, r1);
}

MatrixRF bf16_linear(Isa isa, const Bf16Matrix& w, const MatrixRF& x, ThreadPool* pool) {
  const int64_t n = x.rows();
  MatrixRF y(n, w.rows);
  for_row_chunks(w.rows, w.cols, 2 * w.cols, n, pool, [&](int64_t r0, int64_t r1) {
    bf16_matrix_rows(isa, w, x.data(), w.cols, int(n), y.data() + r0, w.rows, r0, r1);
  });
  return y;
}

}  // namespace moelab::cpu
