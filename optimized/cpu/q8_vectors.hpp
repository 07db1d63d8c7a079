#pragma once
// The vector operations the int8 NF4 kernel (q8_kernel.hpp) is written in, one struct per instruction
// set: the kernel is one loop for every width, these supply the width. Each function carries its own
// target attribute, so including this header costs nothing on a CPU that lacks the instructions.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "optimized/cpu/nf4_matrix.hpp"

namespace moelab::cpu::q8simd {

#define MOELAB_AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline
#define MOELAB_AVX2_VNNI __attribute__((target("avx2,fma,avxvnni"), always_inline)) static inline
#define MOELAB_AVX512 __attribute__((target("avx512f,avx512bw"), always_inline)) static inline
#define MOELAB_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline

// 32-byte vectors: 64 codes per load, int32 lanes 0-3 from the chunk's first 32 elements, 4-7 the next.
struct Avx2 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kBytes = 32;
  MOELAB_AVX2 I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  MOELAB_AVX2 I table() { return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Int8))); }
  MOELAB_AVX2 I low_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0f)); }
  MOELAB_AVX2 I high_nibbles(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)); }
  MOELAB_AVX2 I lookup(I table, I idx) { return _mm256_shuffle_epi8(table, idx); }
  MOELAB_AVX2 I abs8(I v) { return _mm256_abs_epi8(v); }
  // x with the sign of w (0 where w is 0), so |w| * sign(w) x = w x with an unsigned left operand.
  MOELAB_AVX2 I sign8(I x, I w) { return _mm256_sign_epi8(x, w); }
  MOELAB_AVX2 I zero() { return _mm256_setzero_si256(); }
  // acc + sums of 4 adjacent u8 x s8 products. Each vpmaddubsw pair is at most 2 * 127 * 127 < 2^15,
  // so its int16 never saturates; vpmaddwd widens before anything else is added.
  MOELAB_AVX2 I dot(I acc, I u, I s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  MOELAB_AVX2 F zerof() { return _mm256_setzero_ps(); }
  MOELAB_AVX2 F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  MOELAB_AVX2 F loadf(const float* p) { return _mm256_loadu_ps(p); }
  // The activation scale of each int32 lane for the chunk at column c: d holds one scale per 32-element
  // group (quantize_q8's natural order, 4 bytes per 32 activations, so the scales of a 14336-wide row stay
  // out of the way of the rows' codes in L1); lanes 0-3 take group c / 32, lanes 4-7 the next.
  MOELAB_AVX2 F group_scales(const float* d, int64_t c) {
    double two;  // d[g], d[g + 1] as one 8-byte broadcast (a plain load), then spread to the halves
    std::memcpy(&two, d + c / 32, sizeof two);
    return _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_set1_pd(two)), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  MOELAB_AVX2 F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  MOELAB_AVX2 F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // The absmax of each int32 lane's block for the chunk at flat element index e (blocksize >= 64, so
  // a 64-element chunk lies in one block).
  MOELAB_AVX2 F block_scales(const Nf4Matrix& w, int64_t e, int shift) { return _mm256_set1_ps(w.block_absmax(e >> shift)); }
  MOELAB_AVX2 float reduce(F v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};

// AVX-VNNI: vpdpbusd adds the four u8 x s8 products into int32 without an int16 step.
struct Avx2Vnni : Avx2 {
  MOELAB_AVX2_VNNI I dot(I acc, I u, I s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
};

// 64-byte vectors: 128 codes per load, int32 lanes 4g..4g+3 from the chunk's 32-element group g.
struct Avx512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kBytes = 64;
  MOELAB_AVX512 I load(const void* p) { return _mm512_loadu_si512(p); }
  MOELAB_AVX512 I table() { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Int8))); }
  MOELAB_AVX512 I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0f)); }
  MOELAB_AVX512 I high_nibbles(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f)); }
  MOELAB_AVX512 I lookup(I table, I idx) { return _mm512_shuffle_epi8(table, idx); }
  MOELAB_AVX512 I abs8(I v) { return _mm512_abs_epi8(v); }
  // AVX-512 has no vpsignb: negate x where w < 0. Where w is 0, |w| is 0 and the product vanishes anyway.
  MOELAB_AVX512 I sign8(I x, I w) { return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x); }
  MOELAB_AVX512 I zero() { return _mm512_setzero_si512(); }
  MOELAB_AVX512 I dot(I acc, I u, I s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  }
  MOELAB_AVX512 F zerof() { return _mm512_setzero_ps(); }
  MOELAB_AVX512 F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  MOELAB_AVX512 F loadf(const float* p) { return _mm512_loadu_ps(p); }
  // As Avx2::group_scales: lanes 4g .. 4g + 3 take group c / 32 + g.
  MOELAB_AVX512 F group_scales(const float* d, int64_t c) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_broadcast_f32x4(_mm_loadu_ps(d + c / 32)));
  }
  MOELAB_AVX512 F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  MOELAB_AVX512 F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // A 128-element chunk spans two blocks of 64 (lanes 0-7 and 8-15), or lies in one larger block.
  MOELAB_AVX512 F block_scales(const Nf4Matrix& w, int64_t e, int shift) {
    const int64_t b = e >> shift;
    if (shift > 6) return _mm512_set1_ps(w.block_absmax(b));
    return _mm512_mask_blend_ps(__mmask16(0xff00), _mm512_set1_ps(w.block_absmax(b)), _mm512_set1_ps(w.block_absmax(b + 1)));
  }
  MOELAB_AVX512 float reduce(F v) { return _mm512_reduce_add_ps(v); }
};

struct Avx512Vnni : Avx512 {
  MOELAB_AVX512_VNNI I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
};

#undef MOELAB_AVX2
#undef MOELAB_AVX2_VNNI
#undef MOELAB_AVX512
#undef MOELAB_AVX512_VNNI

}  // namespace moelab::cpu::q8simd
