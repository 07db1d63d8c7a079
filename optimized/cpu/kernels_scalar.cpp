// Scalar NF4 kernels: the plain definition, any shape, any block alignment.
#include <algorithm>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

const float kNf4Codes[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

const int8_t kNf4Int8[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

namespace scalar {
namespace {
inline int code_at(const uint8_t* packed, int64_t i) {
  return (i & 1) ? packed[i >> 1] & 0x0f : packed[i >> 1] >> 4;
}
}  // namespace

void prepare_x(const Nf4Matrix& w, const float* x, float* xs) { std::copy(x, x + w.cols, xs); }

void gemv_prepared(const Nf4Matrix& w, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = r * w.cols, end = begin + w.cols;
    float acc = 0;
    // Walk the row block segment by block segment: one absmax multiply per segment.
    for (int64_t s = begin; s < end;) {
      const int64_t block = s / w.blocksize;
      const int64_t e = std::min(end, (block + 1) * w.blocksize);
      float seg = 0;
      for (int64_t i = s; i < e; ++i) seg += kNf4Codes[code_at(w.packed, i)] * x[i - begin];
      acc += w.absmax[size_t(block)] * seg;
      s = e;
    }
    y[r - r0] = acc;
  }
}

void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  for (int64_t i = r0 * w.cols; i < r1 * w.cols; ++i)
    *out++ = kNf4Codes[code_at(w.packed, i)] * w.absmax[size_t(i / w.blocksize)];
}

}  // namespace scalar
}  // namespace moelab::cpu
