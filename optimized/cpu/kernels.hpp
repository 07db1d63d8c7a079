#pragma once
// NF4 kernels with runtime dispatch. Each instruction set has the same two entry points; the scalar
// one is always built and is the one every SIMD variant is tested against.
#include <cstdint>
#include <string>

#include "optimized/cpu/nf4_matrix.hpp"

namespace moelab::cpu {

enum class Isa { Scalar, Avx2, Avx512 };

Isa best_isa();                 // the widest this CPU supports (and this build compiled)
bool isa_supported(Isa isa);
std::string isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // "scalar", "avx2", "avx512", "auto"

// y[r - r0] = sum_c W[r, c] * x[c] for rows r in [r0, r1). Reads each packed byte once.
void gemv_rows(Isa isa, const Nf4Matrix& w, const float* x, float* y, int64_t r0, int64_t r1);
// The same in two steps, so one activation layout serves every row chunk and thread:
// prepare_x writes `cols` floats in the layout the kernel of `isa` reads (SIMD kernels split each
// chunk into the elements of high and low nibbles), gemv_prepared consumes it.
void prepare_x(Isa isa, const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(Isa isa, const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
// gemv_prepared for n tokens at once (n <= 4): y[t * y_stride + r - r0] from xs + t * xs_stride. The
// AVX-512 kernel decodes each weight block once for all n tokens (decoding, not DRAM, bounds a
// two-core GEMV) and always works in four-row blocks; a token's result is gemv_prepared's to FP32
// rounding, bit for bit where gemv_prepared blocks rows too (x beyond L1, e.g. w2). Other kernel sets
// run gemv_prepared per token.
void gemv_prepared_batch(Isa isa, const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y,
                         int64_t y_stride, int64_t r0, int64_t r1);
// out[(r - r0) * cols + c] = W[r, c] in FP32 (code value times its block's absmax).
void dequantize_rows(Isa isa, const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);

// Per-ISA implementations (kernels_<isa>.cpp), called through the dispatchers above.
namespace scalar {
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace scalar
namespace avx2 {
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace avx2
namespace avx512 {
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
                         int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace avx512

}  // namespace moelab::cpu
