#include "optimized/cpu/q8_matrix.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/row_chunks.hpp"
#include "optimized/cpu/q8_vectors.hpp"

namespace moelab::cpu {
namespace {

// y = 127 * scale[r] * sum_g d[g] * sum_{i in g} values[r, i] * q[i]: quantize_q8's d carries 1/127^2 and
// the values' scale is max/127, so 127 restores the product's size.
void rows_scalar(const Q8Matrix& w, const int8_t* q, const float* d, int64_t q_stride, int64_t d_stride, int n,
                 float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  for (int t = 0; t < n; ++t)
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* v = w.values.data() + r * w.cols;
      float acc = 0;
      for (int64_t g0 = 0; g0 < w.cols; g0 += kQ8Group) {
        int32_t isum = 0;
        for (int64_t i = g0; i < std::min(w.cols, g0 + kQ8Group); ++i) isum += int32_t(v[i]) * int32_t(q[t * q_stride + i]);
        acc += float(isum) * d[t * d_stride + g0 / kQ8Group];
      }
      y[t * y_stride + r - r0] = acc * (127.0f * w.scale[size_t(r)]);
    }
}

template <int T>
__attribute__((target("avx2,fma"))) void rows_avx2_t(const Q8Matrix& w, const int8_t* q, const float* d, int64_t q_stride,
                                                      int64_t d_stride, float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  using V = q8simd::Avx2;  // the NF4 int8 kernels' vector operations, on int8 weights
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* v = w.values.data() + r * w.cols;
    __m256 acc[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < w.cols; c += 32) {
      const __m256i wv = V::load(v + c), aw = V::abs8(wv);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m256i s = V::dot(V::zero(), aw, V::sign8(V::load(q + t * q_stride + c), wv));
        acc[t] = V::fma(V::cvt(s), _mm256_set1_ps(d[t * d_stride + c / 32]), acc[t]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) y[t * y_stride + r - r0] = V::reduce(acc[t]) * (127.0f * w.scale[size_t(r)]);
  }
}

void rows_avx2(const Q8Matrix& w, const int8_t* q, const float* d, int64_t q_stride, int64_t d_stride, int n, float* y,
               int64_t y_stride, int64_t r0, int64_t r1) {
  int t = 0;
  for (; t + 4 <= n; t += 4) rows_avx2_t<4>(w, q + t * q_stride, d + t * d_stride, q_stride, d_stride, y + t * y_stride, y_stride, r0, r1);
  for (; t < n; ++t) rows_avx2_t<1>(w, q + t * q_stride, d + t * d_stride, q_stride, d_stride, y + t * y_stride, y_stride, r0, r1);
}

}  // namespace

Q8Matrix quantize_rows_q8(const MatrixRF& w) {
  Q8Matrix m;
  m.rows = w.rows();
  m.cols = w.cols();
  m.values.resize(size_t(w.size()));
  m.scale.resize(size_t(w.rows()));
#pragma omp parallel for schedule(static)  // at load only: Mixtral's 32000 x 4096 head
  for (int64_t r = 0; r < m.rows; ++r) {
    const float amax = w.row(r).cwiseAbs().maxCoeff();
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    m.scale[size_t(r)] = amax / 127.0f;
    for (int64_t c = 0; c < m.cols; ++c)
      m.values[size_t(r * m.cols + c)] = int8_t(std::clamp(std::nearbyint(w(r, c) * inv), -127.0f, 127.0f));
  }
  return m;
}

void q8_matrix_rows(Isa isa, const Q8Matrix& w, const int8_t* q, const float* d, int64_t q_stride, int64_t d_stride,
                    int n, float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  if (isa != Isa::Scalar && w.cols % 32 == 0 && isa_supported(Isa::Avx2))
    return rows_avx2(w, q, d, q_stride, d_stride, n, y, y_stride, r0, r1);
  rows_scalar(w, q, d, q_stride, d_stride, n, y, y_stride, r0, r1);
}

MatrixRF q8_linear(Isa isa, const Q8Matrix& w, const MatrixRF& x, ThreadPool* pool) {
  const int64_t n = x.rows(), nd = (w.cols + kQ8Group - 1) / kQ8Group;
  std::vector<int8_t> q(size_t(n * w.cols));
  std::vector<float> d(size_t(n * nd));
  for (int64_t t = 0; t < n; ++t) quantize_q8(x.row(t).data(), w.cols, q.data() + t * w.cols, d.data() + t * nd);
  MatrixRF y(n, w.rows);
  for_row_chunks(w.rows, w.cols, w.cols, n, pool, [&](int64_t r0, int64_t r1) {
    q8_matrix_rows(isa, w, q.data(), d.data(), w.cols, nd, int(n), y.data() + r0, w.rows, r0, r1);
  });
  return y;
}

}  // namespace moelab::cpu
