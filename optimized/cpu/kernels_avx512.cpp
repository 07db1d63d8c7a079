// AVX-512 NF4 kernels. One 16-byte load holds 32 codes; the 16-entry code table fits one zmm
// register, so a code-to-float lookup is a single permute. x is re-laid out once per call so the
// high nibbles (even elements) and low nibbles (odd elements) meet their x values without shuffles.
#include <immintrin.h>

#include <vector>

#include "optimized/cpu/kernels.hpp"

namespace moelab::cpu::avx512 {
namespace {

// xs[32c + j] = x[32c + 2j], xs[32c + 16 + j] = x[32c + 2j + 1] for each 32-element chunk c.
void split_even_odd(const float* x, int64_t n, float* xs) {
  for (int64_t c = 0; c < n; c += 32)
    for (int j = 0; j < 16; ++j) {
      xs[c + j] = x[c + 2 * j];
      xs[c + 16 + j] = x[c + 2 * j + 1];
    }
}

__attribute__((target("avx512f"))) inline void codes_to_floats(const uint8_t* bytes, __m512 table, __m512& even,
                                                                 __m512& odd) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  odd = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)), table);
}

}  // namespace

__attribute__((target("avx512f"))) void gemv_rows(const Nf4Matrix& w, const float* x, float* y, int64_t r0,
                                                   int64_t r1) {
  if (!w.simd_friendly()) return scalar::gemv_rows(w, x, y, r0, r1);
  thread_local std::vector<float> xs;
  xs.resize(size_t(w.cols));
  split_even_odd(x, w.cols, xs.data());
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = r * w.cols;
    const uint8_t* bytes = w.packed.data() + begin / 2;
    __m512 total = _mm512_setzero_ps();
    // A row may start inside a block (cols % blocksize != 0): walk its block segments without
    // dividing in the loop. Even and odd accumulators keep two FMA chains in flight.
    int64_t block = begin / w.blocksize;
    int64_t seg_end = std::min<int64_t>(w.cols, (block + 1) * w.blocksize - begin);
    for (int64_t c = 0; c < w.cols; ++block, seg_end = std::min<int64_t>(w.cols, seg_end + w.blocksize)) {
      __m512 seg_even = _mm512_setzero_ps(), seg_odd = _mm512_setzero_ps();
      for (; c < seg_end; c += 32) {
        __m512 even, odd;
        codes_to_floats(bytes + c / 2, table, even, odd);
        seg_even = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs.data() + c), seg_even);
        seg_odd = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs.data() + c + 16), seg_odd);
      }
      total = _mm512_fmadd_ps(_mm512_add_ps(seg_even, seg_odd), _mm512_set1_ps(w.absmax[size_t(block)]), total);
    }
    y[r - r0] = _mm512_reduce_add_ps(total);
  }
}

__attribute__((target("avx512f"))) void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  if (!w.simd_friendly()) return scalar::dequantize_rows(w, r0, r1, out);
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  // Interleave indices: output lane 2j takes even[j], lane 2j+1 takes odd[j].
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = r0 * w.cols; i < r1 * w.cols; i += 32) {
    __m512 even, odd;
    codes_to_floats(w.packed.data() + i / 2, table, even, odd);
    const __m512 scale = _mm512_set1_ps(w.absmax[size_t(i / w.blocksize)]);
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(even, lo_idx, odd), scale));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(even, hi_idx, odd), scale));
    out += 32;
  }
}

}  // namespace moelab::cpu::avx512
