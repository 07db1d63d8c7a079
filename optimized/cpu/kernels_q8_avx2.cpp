// The int8 NF4 GEMV for Avx2 (q8_kernel.hpp's loop at this width).
#define MOELAB_Q8_TARGET __attribute__((target("avx2,fma")))
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/q8_kernel.hpp"

namespace moelab::cpu::avx2 {

void gemv_q8(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n, float* y,
         int64_t y_stride, int64_t r0, int64_t r1) {
  q8_gemv<q8simd::Avx2>(w, q, q_stride, d, d_stride, n, y, y_stride, r0, r1);
}

}  // namespace moelab::cpu::avx2
