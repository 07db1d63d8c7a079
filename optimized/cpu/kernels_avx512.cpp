// AVX-512 NF4 FP32 kernels: fp32_kernel.hpp's loops at 16 floats (32 elements per chunk, 16 bytes of
// codes; the 16-entry code table fits one register, a lookup is one permute).
#define MOELAB_FP32_TARGET __attribute__((target("avx512f")))
#include "optimized/cpu/fp32_kernel.hpp"

namespace moelab::cpu::avx512 {

using V = fp32simd::Avx512;
// Row x token totals one row block keeps in registers (32 zmm registers: four rows x four tokens of totals beside the decoded block, two chains and x).
constexpr int kTotals = 16;

void prepare_x(const Nf4Matrix& w, const float* x, float* xs) { fp32_prepare_x<V>(w, x, xs); }

void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1) {
  fp32_gemv<V, kTotals>(w, xs, w.cols, 1, y, r1 - r0, r0, r1);
}

void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
                         int64_t r0, int64_t r1) {
  fp32_gemv<V, kTotals>(w, xs, xs_stride, n, y, y_stride, r0, r1);
}

void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) { fp32_dequantize<V>(w, r0, r1, out); }

}  // namespace moelab::cpu::avx512
