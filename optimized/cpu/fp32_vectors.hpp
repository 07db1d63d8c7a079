#pragma once
// The vector operations the FP32 NF4 kernels (fp32_kernel.hpp) are written in, one struct per
// instruction set: the kernels are one loop for every width, these supply the width and the code-table
// lookup. Each function carries its own target attribute, so including this header costs nothing on a
// CPU that lacks the instructions.
//
// A chunk is 2 x kWidth elements, kWidth bytes of codes: byte j holds element 2j in its high nibble and
// 2j + 1 in its low one, so codes_to_floats gives the chunk's even elements and its odd elements, and
// prepare_x lays x out the same way (each chunk's even elements, then its odd ones).
#include <immintrin.h>

#include <cstdint>

#include "optimized/cpu/nf4_matrix.hpp"

namespace moelab::cpu::fp32simd {

#define MOELAB_AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline
#define MOELAB_AVX512 __attribute__((target("avx512f"), always_inline)) static inline

// 8 floats. The 16-entry code table is two 8-float registers, so a lookup is two permutes and a blend
// on bit 3 of the code.
struct Avx2 {
  using F = __m256;
  static constexpr int kWidth = 8;
  struct Table {
    __m256 low, high;  // codes 0..7 and 8..15
  };
  MOELAB_AVX2 Table table() { return {_mm256_loadu_ps(kNf4Codes), _mm256_loadu_ps(kNf4Codes + 8)}; }
  // vpermps reads bits 0-2 of each index and the blend bit 3 (moved to the sign bit), so neither
  // nibble needs a mask: the high bits of a byte's low nibble index are shifted out.
  MOELAB_AVX2 F lookup(__m256i idx, const Table& t) {
    const __m256 a = _mm256_permutevar8x32_ps(t.low, idx);
    const __m256 b = _mm256_permutevar8x32_ps(t.high, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  // 8 bytes of codes: 16 elements.
  MOELAB_AVX2 void codes_to_floats(const uint8_t* bytes, const Table& t, F& even, F& odd) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    even = lookup(_mm256_srli_epi32(b, 4), t);
    odd = lookup(b, t);
  }
  MOELAB_AVX2 F zero() { return _mm256_setzero_ps(); }
  MOELAB_AVX2 F set1(float v) { return _mm256_set1_ps(v); }
  MOELAB_AVX2 F loadu(const float* p) { return _mm256_loadu_ps(p); }
  MOELAB_AVX2 void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  MOELAB_AVX2 F add(F a, F b) { return _mm256_add_ps(a, b); }
  MOELAB_AVX2 F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  MOELAB_AVX2 F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // The natural order back from even and odd elements: lo = elements 0..7, hi = 8..15. unpacklo/hi
  // interleave within 128-bit lanes: (e0 o0 e1 o1 | e4 o4 e5 o5) and (e2 o2 e3 o3 | e6 o6 e7 o7).
  MOELAB_AVX2 void interleave(F even, F odd, F& lo, F& hi) {
    const __m256 l = _mm256_unpacklo_ps(even, odd), h = _mm256_unpackhi_ps(even, odd);
    lo = _mm256_permute2f128_ps(l, h, 0x20);
    hi = _mm256_permute2f128_ps(l, h, 0x31);
  }
  MOELAB_AVX2 float reduce(F v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};

// 16 floats. The code table fits one register, so a lookup is a single permute.
struct Avx512 {
  using F = __m512;
  static constexpr int kWidth = 16;
  using Table = __m512;
  MOELAB_AVX512 Table table() { return _mm512_loadu_ps(kNf4Codes); }
  // 16 bytes of codes: 32 elements. vpermps reads only the low 4 bits of each index, so the low nibble
  // needs no mask.
  MOELAB_AVX512 void codes_to_floats(const uint8_t* bytes, const Table& t, F& even, F& odd) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
    odd = _mm512_permutexvar_ps(b, t);
  }
  MOELAB_AVX512 F zero() { return _mm512_setzero_ps(); }
  MOELAB_AVX512 F set1(float v) { return _mm512_set1_ps(v); }
  MOELAB_AVX512 F loadu(const float* p) { return _mm512_loadu_ps(p); }
  MOELAB_AVX512 void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  MOELAB_AVX512 F add(F a, F b) { return _mm512_add_ps(a, b); }
  MOELAB_AVX512 F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  MOELAB_AVX512 F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // lo = elements 0..15, hi = 16..31: output lane 2j takes even[j], lane 2j + 1 odd[j].
  MOELAB_AVX512 void interleave(F even, F odd, F& lo, F& hi) {
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = _mm512_permutex2var_ps(even, lo_idx, odd);
    hi = _mm512_permutex2var_ps(even, hi_idx, odd);
  }
  MOELAB_AVX512 float reduce(F v) { return _mm512_reduce_add_ps(v); }
};

#undef MOELAB_AVX2
#undef MOELAB_AVX512

}  // namespace moelab::cpu::fp32simd
