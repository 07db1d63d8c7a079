// The int8 NF4 GEMV, one loop for every vector width (q8_vectors.hpp supplies the width). Included by
// one translation unit per instruction set, which defines MOELAB_Q8_TARGET (its target attribute)
// first; everything here has internal linkage, so the copies never meet at link time.
//
// Per chunk of 2 x kBytes codes and row: one load, two nibble masks, two table shuffles (code -> int8),
// two absolute values, decoded once for up to four tokens; per token: two sign flips, two dot products
// into int32 lanes, the activation scales spread to lanes (a broadcast load and a permute, group_scales),
// one conversion and one FMA with (activation scale x block absmax).
#ifndef MOELAB_Q8_TARGET
#error "define MOELAB_Q8_TARGET before including q8_kernel.hpp"
#endif
#include <algorithm>
#include <bit>

#include "optimized/cpu/q8_vectors.hpp"

namespace {

template <class V, int T>
MOELAB_Q8_TARGET void q8_rows(const moelab::cpu::Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d,
                              int64_t d_stride, float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  constexpr int64_t kChunk = 2 * V::kBytes;
  const int shift = std::countr_zero(unsigned(w.blocksize));
  const typename V::I table = V::table();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * w.cols;
    const uint8_t* codes = w.packed + base / 2;
    typename V::F acc[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[t] = V::zerof();
    for (int64_t c = 0; c < w.cols; c += kChunk) {
      const typename V::I raw = V::load(codes + c / 2);
      const typename V::I wh = V::lookup(table, V::high_nibbles(raw)), wl = V::lookup(table, V::low_nibbles(raw));
      const typename V::I ah = V::abs8(wh), al = V::abs8(wl);
      const typename V::F a = V::block_scales(w, base + c, shift);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const int8_t* x = q + t * q_stride + c;
        typename V::I s = V::dot(V::zero(), ah, V::sign8(V::load(x), wh));
        s = V::dot(s, al, V::sign8(V::load(x + V::kBytes), wl));
        acc[t] = V::fma(V::cvt(s), V::mul(V::group_scales(d + t * d_stride, c), a), acc[t]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) y[t * y_stride + (r - r0)] = V::reduce(acc[t]);
  }
}

// Tokens four at a time over the same rows: each block of codes is decoded once per four tokens.
template <class V>
void q8_gemv(const moelab::cpu::Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d, int64_t d_stride, int n,
             float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  int t = 0;
  for (; t + 4 <= n; t += 4)
    q8_rows<V, 4>(w, q + t * q_stride, q_stride, d + t * d_stride, d_stride, y + t * y_stride, y_stride, r0, r1);
  const int rest = n - t;
  const int8_t* qt = q + t * q_stride;
  const float* dt = d + t * d_stride;
  float* yt = y + t * y_stride;
  if (rest == 3) q8_rows<V, 3>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1);
  if (rest == 2) q8_rows<V, 2>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1);
  if (rest == 1) q8_rows<V, 1>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1);
}

}  // namespace
