#pragma once
// NF4 kernels with runtime dispatch. Each instruction set has the same two entry points; the scalar
// one is always built and is the one every SIMD variant is tested against.
#include <cstdint>
#include <string>

#include "optimized/cpu/nf4_matrix.hpp"

namespace moelab::cpu {

// Avx2Vnni and Avx512Vnni differ from Avx2 / Avx512 only in the int8 dot product (vpdpbusd instead of
// vpmaddubsw + vpmaddwd); their FP32 kernels are the plain ones.
enum class Isa { Scalar, Avx2, Avx2Vnni, Avx512, Avx512Vnni };
inline constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Avx2, Isa::Avx2Vnni, Isa::Avx512, Isa::Avx512Vnni};

Isa best_isa();                 // the widest this CPU supports (and this build compiled)
bool isa_supported(Isa isa);
std::string isa_name(Isa isa);
std::string isa_features(Isa isa);       // the CPU flags it needs, e.g. "avx512f avx512bw avx512vnni"
Isa parse_isa(const std::string& name);  // "scalar", "avx2", "avx2-vnni", "avx512", "avx512-vnni", "auto"

// y[r - r0] = sum_c W[r, c] * x[c] for rows r in [r0, r1). Reads each packed byte once.
void gemv_rows(Isa isa, const Nf4Matrix& w, const float* x, float* y, int64_t r0, int64_t r1);
// The same in two steps, so one activation layout serves every row chunk and thread:
// prepare_x writes `cols` floats in the layout the kernel of `isa` reads (SIMD kernels split each
// chunk into the elements of high and low nibbles), gemv_prepared consumes it.
void prepare_x(Isa isa, const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(Isa isa, const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
// gemv_prepared for n tokens at once: y[t * y_stride + r - r0] from xs + t * xs_stride. The SIMD
// kernels (one loop for both widths, fp32_kernel.hpp) decode each weight block once for up to four
// tokens (decoding, not DRAM, bounds a two-core GEMV) and work in blocks of up to four rows (as many as
// keep rows x tokens totals in registers); a token's result is gemv_prepared's bit for bit (their
// arithmetic order does not depend on row blocking or token count). The scalar set runs gemv_prepared
// per token.
void gemv_prepared_batch(Isa isa, const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y,
                         int64_t y_stride, int64_t r0, int64_t r1);
// out[(r - r0) * cols + c] = W[r, c] in FP32 (code value times its block's absmax).
void dequantize_rows(Isa isa, const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);

// ---- The int8 path (--activations int8): integer dot products, as llama.cpp's Q4_0 x Q8_0 ----
// Activations are quantized per group of kQ8Group consecutive elements: d = max|x| / 127,
// q = round-to-nearest-even(x / d) in [-127, 127] (an all-zero group has d = 0). NF4 codes become int8
// through kNf4Int8 (a byte shuffle in the SIMD kernels), so each group's products sum exactly in
// integers, and a row is
//   y[r] = sum over (weight block b, activation group g) of absmax[b] * d[g] / 127 * sum_i kNf4Int8[code_i] * q_i,
// the FP32 sum of those per-segment terms. The scale `d` the kernels read already holds the 1/127.
inline constexpr int kQ8Group = 32;
// Sizes of one token's prepared activations for `w`, the same on every kernel set: q8_values bytes (the cols
// int8 values, then one int16 per 8 of them, minus their sum, from which the unsigned-weight VNNI kernels
// start: write_q8_lane_sums) and q8_scales FP32 scales (one per 32-element group).
int64_t q8_values(const Nf4Matrix& w);
int64_t q8_scales(const Nf4Matrix& w);
// The plain rule above, in natural order: q[cols], d[ceil(cols / 32)] (d includes the 1/127).
void quantize_q8(const float* x, int64_t cols, int8_t* q, float* d);
// Quantizes x and lays it out for `isa`'s kernel (the SIMD kernels read each chunk of 2 x vector-width
// elements as its even then its odd elements; the scales stay in natural order, one per group).
void prepare_q8(Isa isa, const Nf4Matrix& w, const float* x, int8_t* q, float* d);
// y[t * y_stride + r - r0] for tokens t < n (any n) from prepared activations q + t * q_stride,
// d + t * d_stride. Kernels decode each block of codes once for up to four tokens.
void gemv_q8(Isa isa, const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n,
             float* y, int64_t y_stride, int64_t r0, int64_t r1);
// Whether `isa` runs its own int8 kernel on `w` (else it falls back to the scalar one, still correct):
// cols a multiple of 2 x the vector width in bytes, blocksize >= 64.
bool q8_simd_kernel(Isa isa, const Nf4Matrix& w);
// The SIMD kernels' activation layout for vectors of `vector_bytes` (32: AVX2, 64: AVX-512), from the
// natural order quantize_q8 writes: q_out gets the cols values reordered (the scales need no reordering).
void lay_out_q8(int vector_bytes, const int8_t* q, int64_t cols, int8_t* q_out);
// out (2 bytes per 8 values, unaligned, little-endian int16): minus the sum of each run of 8 natural-order
// q values, which is what one int32 lane of the SIMD kernels covers (lay_out_q8).
void write_q8_lane_sums(const int8_t* q, int64_t cols, int8_t* out);

// Per-ISA implementations (kernels_<isa>.cpp), called through the dispatchers above.
namespace scalar {
void gemv_q8(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n, float* y,
             int64_t y_stride, int64_t r0, int64_t r1);
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace scalar
namespace avx2 {
void gemv_q8(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n, float* y,
             int64_t y_stride, int64_t r0, int64_t r1);
void gemv_q8_vnni(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n,
                  float* y, int64_t y_stride, int64_t r0, int64_t r1);
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
                         int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace avx2
namespace avx512 {
void gemv_q8(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n, float* y,
             int64_t y_stride, int64_t r0, int64_t r1);
void gemv_q8_vnni(const Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n,
                  float* y, int64_t y_stride, int64_t r0, int64_t r1);
void prepare_x(const Nf4Matrix& w, const float* x, float* xs);
void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0, int64_t r1);
void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
                         int64_t r0, int64_t r1);
void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out);
}  // namespace avx512

}  // namespace moelab::cpu
