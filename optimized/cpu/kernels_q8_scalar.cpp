// The int8 path's plain definition: activation quantization and the scalar NF4 x int8 GEMV, any shape,
// any block alignment. Every SIMD int8 kernel is tested against this one and against float64.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

void quantize_q8(const float* x, int64_t cols, int8_t* q, float* d) {
  for (int64_t g0 = 0, g = 0; g0 < cols; g0 += kQ8Group, ++g) {
    const int64_t g1 = std::min(cols, g0 + kQ8Group);
    float amax = 0;
    bool finite = true;
    for (int64_t i = g0; i < g1; ++i) {
      amax = std::max(amax, std::abs(x[i]));
      finite = finite && std::isfinite(x[i]);
    }
    if (!finite) {
      // NaN or inf activations: the result must not look valid. A NaN scale makes every output of
      // this group's rows NaN, as the FP32 path would.
      d[g] = std::nanf("");
      std::fill(q + g0, q + g1, int8_t(0));
      continue;
    }
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int64_t i = g0; i < g1; ++i)
      q[i] = int8_t(std::clamp(std::nearbyint(x[i] * inv), -127.0f, 127.0f));  // ties to even
    d[g] = amax / (127.0f * 127.0f);  // x ~ q * amax / 127, and the weight table carries another 127
  }
}

int64_t q8_values(const Nf4Matrix& w) { return w.cols + 2 * ((w.cols + 7) / 8); }
int64_t q8_scales(const Nf4Matrix& w) { return (w.cols + kQ8Group - 1) / kQ8Group; }

namespace scalar {
using nf4::code_at;

void gemv_q8(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n, float* y,
             int64_t y_stride, int64_t r0, int64_t r1) {
  for (int t = 0; t < n; ++t) {
    const int8_t* qt = q + t * q_stride;
    const float* dt = d + t * d_stride;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t begin = r * w.cols;
      float acc = 0;
      // Segments end at the next activation group or weight block boundary, whichever comes first.
      for (int64_t c = 0; c < w.cols;) {
        const int64_t block = (begin + c) / w.blocksize;
        const int64_t end = std::min({w.cols, (c / kQ8Group + 1) * kQ8Group, (block + 1) * w.blocksize - begin});
        int32_t isum = 0;
        for (int64_t i = c; i < end; ++i) isum += int32_t(kNf4Int8[code_at(w.packed, begin + i)]) * int32_t(qt[i]);
        acc += float(isum) * (w.block_absmax(block) * dt[c / kQ8Group]);
        c = end;
      }
      y[t * y_stride + r - r0] = acc;
    }
  }
}

}  // namespace scalar
}  // namespace moelab::cpu

namespace moelab::cpu {

void lay_out_q8(int vector_bytes, const int8_t* q, int64_t cols, int8_t* q_out) {
  const int64_t chunk = 2 * vector_bytes;
  for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
    // Even elements meet the high nibbles, odd ones the low nibbles, without shuffles in the kernel.
    // (int32 lane L of the kernel's sums then covers elements c0 + 8L .. c0 + 8L + 7, all in group
    // (c0 + 8L) / 32: the kernels spread the natural-order scales and group sums to lanes themselves.)
    for (int64_t j = 0; j < vector_bytes; ++j) {
      q_out[c0 + j] = q[c0 + 2 * j];
      q_out[c0 + vector_bytes + j] = q[c0 + 2 * j + 1];
    }
  }
}

void write_q8_lane_sums(const int8_t* q, int64_t cols, int8_t* out) {
  for (int64_t i0 = 0; i0 < cols; i0 += 8) {
    int16_t sum = 0;  // |sum| <= 8 x 127
    for (int64_t i = i0; i < std::min(cols, i0 + 8); ++i) sum = int16_t(sum + q[i]);
    const int16_t v = int16_t(-sum);
    std::memcpy(out + 2 * (i0 / 8), &v, sizeof v);  // x86: little-endian, as the kernels' widening load reads it
  }
}

}  // namespace moelab::cpu
