// AVX2 NF4 kernels. 8 bytes hold 16 codes; the 16-entry code table is two 8-float registers, so a
// lookup is two permutes and a blend on bit 3. x is re-laid out once per call into even/odd halves
// per 16-element chunk, as in the AVX-512 kernel.
#include <immintrin.h>

#include <vector>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu::avx2 {
namespace {

void split_even_odd(const float* x, int64_t n, float* xs) {
  for (int64_t c = 0; c < n; c += 16)
    for (int j = 0; j < 8; ++j) {
      xs[c + j] = x[c + 2 * j];
      xs[c + 8 + j] = x[c + 2 * j + 1];
    }
}

struct Table {
  __m256 low, high;  // codes 0..7 and 8..15
};

__attribute__((target("avx2,fma"))) inline __m256 lookup(__m256i idx, const Table& t) {
  const __m256 a = _mm256_permutevar8x32_ps(t.low, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t.high, idx);
  // blendv picks by the sign bit: move bit 3 of the index there.
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

__attribute__((target("avx2,fma"))) inline void codes_to_floats(const uint8_t* bytes, const Table& t, __m256& even,
                                                                  __m256& odd) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  even = lookup(_mm256_srli_epi32(b, 4), t);
  odd = lookup(_mm256_and_si256(b, _mm256_set1_epi32(0x0f)), t);
}

__attribute__((target("avx2,fma"))) inline float reduce(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

}  // namespace

void prepare_x(const Nf4Matrix& w, const float* x, float* xs) {
  if (!w.simd_friendly()) return scalar::prepare_x(w, x, xs);
  split_even_odd(x, w.cols, xs);
}

__attribute__((target("avx2,fma"))) void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0,
                                                    int64_t r1) {
  if (!w.simd_friendly()) return scalar::gemv_prepared(w, xs, y, r0, r1);
  const Table t{_mm256_loadu_ps(kNf4Codes), _mm256_loadu_ps(kNf4Codes + 8)};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = r * w.cols;
    const uint8_t* bytes = w.packed + begin / 2;
    __m256 total = _mm256_setzero_ps();
    int64_t block = begin / w.blocksize;
    int64_t seg_end = std::min<int64_t>(w.cols, (block + 1) * w.blocksize - begin);
    for (int64_t c = 0; c < w.cols; ++block, seg_end = std::min<int64_t>(w.cols, seg_end + w.blocksize)) {
      __m256 seg_even = _mm256_setzero_ps(), seg_odd = _mm256_setzero_ps();
      for (; c < seg_end; c += 16) {
        __m256 even, odd;
        codes_to_floats(bytes + c / 2, t, even, odd);
        seg_even = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs + c), seg_even);
        seg_odd = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs + c + 8), seg_odd);
      }
      total = _mm256_fmadd_ps(_mm256_add_ps(seg_even, seg_odd), _mm256_set1_ps(w.absmax[size_t(block)]), total);
    }
    y[r - r0] = reduce(total);
  }
}

__attribute__((target("avx2,fma"))) void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  if (!w.simd_friendly()) return scalar::dequantize_rows(w, r0, r1, out);
  const Table t{_mm256_loadu_ps(kNf4Codes), _mm256_loadu_ps(kNf4Codes + 8)};
  for (int64_t i = r0 * w.cols; i < r1 * w.cols; i += 16) {
    __m256 even, odd;
    codes_to_floats(w.packed + i / 2, t, even, odd);
    const __m256 scale = _mm256_set1_ps(w.absmax[size_t(i / w.blocksize)]);
    // unpacklo/hi interleave within 128-bit lanes: (e0 o0 e1 o1 | e4 o4 e5 o5) and (e2 o2 e3 o3 | e6 o6 e7 o7).
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), scale));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), scale));
    out += 16;
  }
}

}  // namespace moelab::cpu::avx2
