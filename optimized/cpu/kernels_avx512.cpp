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
  // vpermps reads only the low 4 bits of each index, so the low nibble needs no mask.
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  odd = _mm512_permutexvar_ps(b, table);
}

}  // namespace

void prepare_x(const Nf4Matrix& w, const float* x, float* xs) {
  if (!w.simd_friendly()) return scalar::prepare_x(w, x, xs);
  split_even_odd(x, w.cols, xs);
}

namespace {

// One row, any block alignment: a row may start inside a block when cols % blocksize != 0, so walk
// its block segments (without dividing in the loop).
__attribute__((target("avx512f"))) float gemv_one_row(const Nf4Matrix& w, const float* xs, int64_t r, __m512 table) {
  const int64_t begin = r * w.cols;
  const uint8_t* bytes = w.packed + begin / 2;
  __m512 total = _mm512_setzero_ps();
  int64_t block = begin / w.blocksize;
  int64_t seg_end = std::min<int64_t>(w.cols, (block + 1) * w.blocksize - begin);
  for (int64_t c = 0; c < w.cols; ++block, seg_end = std::min<int64_t>(w.cols, seg_end + w.blocksize)) {
    __m512 seg_even = _mm512_setzero_ps(), seg_odd = _mm512_setzero_ps();  // two FMA chains in flight
    for (; c < seg_end; c += 32) {
      __m512 even, odd;
      codes_to_floats(bytes + c / 2, table, even, odd);
      seg_even = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs + c), seg_even);
      seg_odd = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs + c + 16), seg_odd);
    }
    total = _mm512_fmadd_ps(_mm512_add_ps(seg_even, seg_odd), _mm512_set1_ps(w.absmax[size_t(block)]), total);
  }
  return _mm512_reduce_add_ps(total);
}

// blocksize 64 and rows starting on block boundaries (the common case): one 32-byte load per block,
// fully unrolled, two independent FMA chains.
__attribute__((target("avx512f"))) float gemv_row_b64(const Nf4Matrix& w, const float* xs, int64_t r, __m512 table) {
  const uint8_t* bytes = w.packed + r * w.cols / 2;
  const float* absmax = w.absmax.data() + r * w.cols / 64;
  __m512 total0 = _mm512_setzero_ps(), total1 = _mm512_setzero_ps();
  for (int64_t c = 0, block = 0; c < w.cols; c += 128, block += 2) {
    // Two blocks per iteration so the two totals do not wait on each other.
    const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2)));
    const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2 + 16)));
    const __m512i b2 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2 + 32)));
    const __m512i b3 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2 + 48)));
    __m512 s0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), _mm512_loadu_ps(xs + c));
    __m512 s1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b2, 4), table), _mm512_loadu_ps(xs + c + 64));
    s0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, table), _mm512_loadu_ps(xs + c + 16), s0);
    s1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b2, table), _mm512_loadu_ps(xs + c + 80), s1);
    s0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), _mm512_loadu_ps(xs + c + 32), s0);
    s1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b3, 4), table), _mm512_loadu_ps(xs + c + 96), s1);
    s0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, table), _mm512_loadu_ps(xs + c + 48), s0);
    s1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b3, table), _mm512_loadu_ps(xs + c + 112), s1);
    total0 = _mm512_fmadd_ps(s0, _mm512_set1_ps(absmax[block]), total0);
    total1 = _mm512_fmadd_ps(s1, _mm512_set1_ps(absmax[block + 1]), total1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(total0, total1));
}

// blocksize 64 with x too large for L1 (w2: 14336 columns = 56 KiB): R rows share every x load.
template <int R>
__attribute__((target("avx512f"))) void gemv_rows_b64(const Nf4Matrix& w, const float* xs, int64_t r, float* y,
                                                       __m512 table) {
  const uint8_t* bytes[R];
  const float* absmax[R];
  __m512 total[R];
  for (int i = 0; i < R; ++i) {
    bytes[i] = w.packed + (r + i) * w.cols / 2;
    absmax[i] = w.absmax.data() + (r + i) * w.cols / 64;
    total[i] = _mm512_setzero_ps();
  }
  for (int64_t c = 0, block = 0; c < w.cols; c += 64, ++block) {
    const __m512 x0 = _mm512_loadu_ps(xs + c), x1 = _mm512_loadu_ps(xs + c + 16);
    const __m512 x2 = _mm512_loadu_ps(xs + c + 32), x3 = _mm512_loadu_ps(xs + c + 48);
    for (int i = 0; i < R; ++i) {
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[i] + c / 2)));
      const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[i] + c / 2 + 16)));
      __m512 sa = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), x0);
      __m512 sb = _mm512_mul_ps(_mm512_permutexvar_ps(b0, table), x1);
      sa = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), x2, sa);
      sb = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, table), x3, sb);
      total[i] = _mm512_fmadd_ps(_mm512_add_ps(sa, sb), _mm512_set1_ps(absmax[i][block]), total[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(total[i]);
}

// Four rows at once when every row starts on a block boundary: each x load then serves four rows,
// which matters once x outgrows L1 (w2's 14336 columns are 56 KiB of x).
constexpr int kRowBlock = 4;
__attribute__((target("avx512f"))) void gemv_four_rows(const Nf4Matrix& w, const float* xs, int64_t r, float* y,
                                                        __m512 table) {
  const uint8_t* bytes[kRowBlock];
  const float* absmax[kRowBlock];
  __m512 total[kRowBlock];
  for (int i = 0; i < kRowBlock; ++i) {
    bytes[i] = w.packed + (r + i) * w.cols / 2;
    absmax[i] = w.absmax.data() + (r + i) * w.cols / w.blocksize;
    total[i] = _mm512_setzero_ps();
  }
  for (int64_t c = 0, block = 0; c < w.cols; ++block) {
    __m512 seg[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) seg[i] = _mm512_setzero_ps();
    for (const int64_t seg_end = c + w.blocksize; c < seg_end; c += 32) {
      const __m512 x_even = _mm512_loadu_ps(xs + c), x_odd = _mm512_loadu_ps(xs + c + 16);
      for (int i = 0; i < kRowBlock; ++i) {
        __m512 even, odd;
        codes_to_floats(bytes[i] + c / 2, table, even, odd);
        seg[i] = _mm512_fmadd_ps(even, x_even, seg[i]);
        seg[i] = _mm512_fmadd_ps(odd, x_odd, seg[i]);
      }
    }
    for (int i = 0; i < kRowBlock; ++i)
      total[i] = _mm512_fmadd_ps(seg[i], _mm512_set1_ps(absmax[i][block]), total[i]);
  }
  for (int i = 0; i < kRowBlock; ++i) y[i] = _mm512_reduce_add_ps(total[i]);
}


// The accumulators must live in registers: the token and row loops are unrolled (GCC left them rolled,
// with the accumulators on the stack, and the kernel ran at two thirds of the one-token speed).
// gemv_rows_b64<4> for T tokens (the batch kernel uses it for every shape): each row's block is decoded once.
template <int T>
__attribute__((target("avx512f"))) void gemv_rows4_b64_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride,
                                                              int64_t r, float* y, int64_t y_stride, __m512 table) {
  constexpr int R = 4;
  const uint8_t* bytes[R];
  const float* absmax[R];
  __m512 total[R][T];
  #pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    bytes[i] = w.packed + (r + i) * w.cols / 2;
    absmax[i] = w.absmax.data() + (r + i) * w.cols / 64;
    #pragma GCC unroll 4
    for (int t = 0; t < T; ++t) total[i][t] = _mm512_setzero_ps();
  }
  for (int64_t c = 0, block = 0; c < w.cols; c += 64, ++block) {
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[i] + c / 2)));
      const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[i] + c / 2 + 16)));
      const __m512 w0e = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), w0o = _mm512_permutexvar_ps(b0, table);
      const __m512 w1e = _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), w1o = _mm512_permutexvar_ps(b1, table);
      const __m512 a = _mm512_set1_ps(absmax[i][block]);
      #pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const float* x = xs + t * xs_stride + c;
        __m512 sa = _mm512_mul_ps(w0e, _mm512_loadu_ps(x));
        __m512 sb = _mm512_mul_ps(w0o, _mm512_loadu_ps(x + 16));
        sa = _mm512_fmadd_ps(w1e, _mm512_loadu_ps(x + 32), sa);
        sb = _mm512_fmadd_ps(w1o, _mm512_loadu_ps(x + 48), sb);
        total[i][t] = _mm512_fmadd_ps(_mm512_add_ps(sa, sb), a, total[i][t]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 4
    for (int t = 0; t < T; ++t) y[t * y_stride + i] = _mm512_reduce_add_ps(total[i][t]);
}

// Four-row blocks for every shape: each x load then serves four rows, which matters more with several
// tokens' x in flight (measured: w1/w3 at 2 tokens 0.93 -> 0.80 of two one-token calls' time). The last
// rows (fewer than four) run the one-token kernel per token.
template <int T>
__attribute__((target("avx512f"))) void gemv_b64_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride,
                                                        float* y, int64_t y_stride, int64_t r0, int64_t r1, __m512 table) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows4_b64_batch<T>(w, xs, xs_stride, r, y + (r - r0), y_stride, table);
  for (; r < r1; ++r)
    for (int t = 0; t < T; ++t) y[t * y_stride + (r - r0)] = gemv_row_b64(w, xs + t * xs_stride, r, table);
}

}  // namespace

__attribute__((target("avx512f"))) void gemv_prepared_batch(const Nf4Matrix& w, const float* xs, int64_t xs_stride,
                                                             int n, float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  if (!w.simd_friendly() || w.blocksize != 64 || w.cols % 128 != 0 || n > 4) {
    for (int t = 0; t < n; ++t) gemv_prepared(w, xs + t * xs_stride, y + t * y_stride, r0, r1);
    return;
  }
  if (n == 1) return gemv_prepared(w, xs, y, r0, r1);
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  switch (n) {
    case 2: return gemv_b64_batch<2>(w, xs, xs_stride, y, y_stride, r0, r1, table);
    case 3: return gemv_b64_batch<3>(w, xs, xs_stride, y, y_stride, r0, r1, table);
    case 4: return gemv_b64_batch<4>(w, xs, xs_stride, y, y_stride, r0, r1, table);
    default: return;
  }
}

namespace {
}  // namespace


__attribute__((target("avx512f"))) void gemv_prepared(const Nf4Matrix& w, const float* xs, float* y, int64_t r0,
                                                       int64_t r1) {
  if (!w.simd_friendly()) return scalar::gemv_prepared(w, xs, y, r0, r1);
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  if (w.blocksize == 64 && w.cols % 128 == 0) {
    int64_t r = r0;
    if (w.cols * int64_t(sizeof(float)) > 32 * 1024)  // x outgrows L1: share its loads across rows
      for (; r + 4 <= r1; r += 4) gemv_rows_b64<4>(w, xs, r, y + (r - r0), table);
    for (; r < r1; ++r) y[r - r0] = gemv_row_b64(w, xs, r, table);
    return;
  }
  int64_t r = r0;
  // Row blocking pays only once x no longer fits L1 (~8K columns); below that it costs more than it saves.
  if (w.cols % w.blocksize == 0 && w.cols * int64_t(sizeof(float)) > 32 * 1024)
    for (; r + kRowBlock <= r1; r += kRowBlock) gemv_four_rows(w, xs, r, y + (r - r0), table);
  for (; r < r1; ++r) y[r - r0] = gemv_one_row(w, xs, r, table);
}

__attribute__((target("avx512f"))) void dequantize_rows(const Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  if (!w.simd_friendly()) return scalar::dequantize_rows(w, r0, r1, out);
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  // Interleave indices: output lane 2j takes even[j], lane 2j+1 takes odd[j].
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = r0 * w.cols; i < r1 * w.cols; i += 32) {
    __m512 even, odd;
    codes_to_floats(w.packed + i / 2, table, even, odd);
    const __m512 scale = _mm512_set1_ps(w.absmax[size_t(i / w.blocksize)]);
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(even, lo_idx, odd), scale));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(even, hi_idx, odd), scale));
    out += 32;
  }
}

}  // namespace moelab::cpu::avx512
