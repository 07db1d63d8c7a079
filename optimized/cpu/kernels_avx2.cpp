// AVX2 NF4 FP32 kernels: fp32_kernel.hpp's loops at 8 floats (16 elements per chunk, 8 bytes of codes;
// the 16-entry code table is two registers, a lookup two permutes and a blend).
#define MOELAB_FP32_TARGET __attribute__((target("avx2,fma")))
#include "optimized/cpu/fp32_kernel.hpp"

namespace moelab::cpu::avx2 {

using V = fp32simd::Avx2;
// Row x token totals one row block keeps in registers (16 ymm registers: four totals beside the decoded block, two chains, x and the code table).
constexpr int kTotals = 4;

void prepare_x(const Nf4Matrix& w, const float* x, float* xs) { fp32_prepare_x<V>(w, x, xs); }

void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1) {
  fp32_gemv<V, kTotals>(w, xs, w.cols, 1, y, r1 - r0, r0, r1);
}

void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
                         int64_t r0, int64_t r1) {
  fp32_gemv<V, kTotals>(w, xs, xs_stride, n, y, y_stride, r0, r1);
}

void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) { fp32_dequantize<V>(w, r0, r1, out); }

}  // namespace moelab::cpu::avx2
