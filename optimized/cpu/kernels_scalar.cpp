// Scalar NF4 kernels: the plain definition, any shape, any block alignment.
#include <algorithm>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu {

namespace scalar {
using nf4::code_at;

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
