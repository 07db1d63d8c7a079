#pragma once
// The vector operations the int8 NF4 kernel (q8_kernel.hpp) is written in, one struct per instruction
// set: the kernel is one loop for every width, these supply the width. Each function carries its own
// target attribute, so including this header costs nothing on a CPU that lacks the instructions.
#include <immintrin.h>

#include <cstdint>

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
  // vpmaddubsw's int16 pairs would saturate on 255 x 127: the kernels without VNNI keep signed weights.
  static constexpr bool kUnsignedWeights = false;
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
  // The scale of each int32 lane for a chunk: activation scale times weight absmax, both one per 32-element
  // group in natural order from the chunk's first group on (d from quantize_q8, 4 bytes per 32 activations
  // so the scales of a 14336-wide row stay out of the way of the rows' codes in L1; a from the row's decoded
  // absmax). Lanes 0-3 take d[0] a[0], lanes 4-7 d[1] a[1]: two products, then spread to the halves.
  MOELAB_AVX2 F scales(const float* d, const float* a) {
    const __m128 two = _mm_mul_ps(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d))),
                                  _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a))));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  MOELAB_AVX2 F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // Blocks of 64 at a time (kAbsmaxBlocks of them from block b, inside one nested group of 256): their
  // absmax for each of their 32-element groups, a[2k] = a[2k + 1] = absmax of block b + k, from their
  // nested_code values (nested_lookup). The same two roundings as Nf4Matrix::block_absmax (a multiply, then
  // an add; no fused multiply-add).
  static constexpr int kAbsmaxBlocks = 8;
  MOELAB_AVX2 void group_absmax_64(const Nf4Matrix& w, int64_t b, const float* nested, float* a) {
    __m256 v;
    if (w.double_quantized()) {
      v = _mm256_mul_ps(_mm256_loadu_ps(nested), _mm256_set1_ps(w.nested_absmax[size_t(b >> 8)]));
      v = _mm256_add_ps(v, _mm256_set1_ps(w.offset));
    } else {
      v = _mm256_loadu_ps(w.absmax.data() + b);
    }
    _mm256_storeu_ps(a, _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
    _mm256_storeu_ps(a + 8, _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
  }
  MOELAB_AVX2 float reduce(F v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};

// AVX-VNNI: vpdpbusd adds the four u8 x s8 products into int32 without an int16 step, so the weights go in
// unsigned (kNf4Uint8) and each lane's sum starts from -128 x its activations' sum.
struct Avx2Vnni : Avx2 {
  static constexpr bool kUnsignedWeights = true;
  MOELAB_AVX2_VNNI I table() { return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Uint8))); }
  MOELAB_AVX2_VNNI I dot(I acc, I u, I s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
  // A chunk's int32 lanes start from -128 x the sum of each lane's own 8 activations (s: one int16 per 8
  // natural-order activations, little-endian, write_q8_lane_sums), so every lane ends at exactly the signed kernels'
  // value: the FP32 conversion, scaling and accumulation that follow are the same as theirs, bit for bit.
  MOELAB_AVX2_VNNI I lane_sums(const int8_t* s) {
    return _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))), 7);
  }
};

// 64-byte vectors: 128 codes per load, int32 lanes 4g..4g+3 from the chunk's 32-element group g.
struct Avx512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kBytes = 64;
  static constexpr bool kUnsignedWeights = false;  // as Avx2
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
  // As Avx2::scales: lanes 4g .. 4g + 3 take d[g] a[g].
  MOELAB_AVX512 F scales(const float* d, const float* a) {
    const __m128 four = _mm_mul_ps(_mm_loadu_ps(d), _mm_loadu_ps(a));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_castps128_ps512(four));
  }
  MOELAB_AVX512 F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // As Avx2::group_absmax_64, 16 blocks at a time.
  static constexpr int kAbsmaxBlocks = 16;
  MOELAB_AVX512 void group_absmax_64(const Nf4Matrix& w, int64_t b, const float* nested, float* a) {
    __m512 v;
    if (w.double_quantized()) {
      v = _mm512_mul_ps(_mm512_loadu_ps(nested), _mm512_set1_ps(w.nested_absmax[size_t(b >> 8)]));
      v = _mm512_add_ps(v, _mm512_set1_ps(w.offset));
    } else {
      v = _mm512_loadu_ps(w.absmax.data() + b);
    }
    _mm512_storeu_ps(a, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), v));
    _mm512_storeu_ps(a + 16, _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), v));
  }
  MOELAB_AVX512 float reduce(F v) { return _mm512_reduce_add_ps(v); }
};

// As Avx2Vnni, 16 lanes.
struct Avx512Vnni : Avx512 {
  static constexpr bool kUnsignedWeights = true;
  MOELAB_AVX512_VNNI I table() { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Uint8))); }
  MOELAB_AVX512_VNNI I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  MOELAB_AVX512_VNNI I lane_sums(const int8_t* s) {
    return _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))), 7);
  }
};

#undef MOELAB_AVX2
#undef MOELAB_AVX2_VNNI
#undef MOELAB_AVX512
#undef MOELAB_AVX512_VNNI

}  // namespace moelab::cpu::q8simd
