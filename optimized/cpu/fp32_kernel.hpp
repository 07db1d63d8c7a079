// The FP32 NF4 kernels (the check mode's GEMV and the prefill path's dequantize), one loop for every
// vector width (fp32_vectors.hpp supplies the width and the code lookup). Included by one translation
// unit per instruction set, which defines MOELAB_FP32_TARGET (its target attribute) first; everything
// here has internal linkage, so the copies never meet at link time.
//
// The GEMV's arithmetic is one order for every variant (rows blocked or not, one token or four, the
// blocksize known at compile time or not), so every variant of a kernel set gives a row and token the
// same bits. Per row, token and vector lane: for each block segment of the row (a block, or the part
// of one where a row starts or ends inside it), the chunks' even-element products form one chain and
// the odd-element products another (the first a multiply, the rest fused multiply-adds, in chunk
// order); the segment's sum is even + odd, added into the row's total as fma(sum, absmax, total); the
// lanes' totals are summed at the end (V::reduce). Each product goes through at most
// blocksize / (2 x width) + blocks in the row + log2(width) + 2 roundings, far inside the
// (cols + blocks + 2) u sum |w x| the tests hold every kernel to.
#ifndef MOELAB_FP32_TARGET
#error "define MOELAB_FP32_TARGET before including fp32_kernel.hpp"
#endif
#include <algorithm>

#include "optimized/cpu/fp32_vectors.hpp"
#include "optimized/cpu/kernels.hpp"

namespace {

// xs[c + j] = x[c + 2j], xs[c + W + j] = x[c + 2j + 1] for each chunk of 2W elements starting at c:
// the high nibbles (even elements) and low nibbles (odd elements) meet their x without shuffles.
template <class V>
void fp32_prepare_x(const moelab::cpu::Nf4Matrix& w, const float* x, float* xs) {
  if (!w.simd_friendly()) return moelab::cpu::scalar::prepare_x(w, x, xs);
  constexpr int W = V::kWidth;
  for (int64_t c = 0; c < w.cols; c += 2 * W)
    for (int j = 0; j < W; ++j) {
      xs[c + j] = x[c + 2 * j];
      xs[c + W + j] = x[c + 2 * j + 1];
    }
}

// Rows [r, r + R) for tokens [0, T): y[t * y_stride + i] = W[r + i, :] . x_t, x_t at xs + t * xs_stride
// in prepare_x's layout. Each row's chunk of codes is decoded once for all T tokens (decoding, not DRAM,
// bounds a two-core GEMV); the rows of a block share the segment of x they read, from registers where
// the compiler keeps it (kBlock > 0, unrolled) or else from L1, which matters once x outgrows L1 (w2:
// 14336 columns = 56 KiB of x).
// kBlock: the blocksize when known at compile time (then w.blocksize == kBlock and cols % kBlock == 0),
// else 0. R > 1 needs every row to start on a block boundary (cols % blocksize == 0), so that the rows'
// segments coincide; R = 1 takes any alignment (a row may start inside a block).
// The row, token and chunk loops are unrolled so the accumulators live in registers (GCC left them
// rolled, with the accumulators on the stack, and a batch kernel ran at two thirds of the one-token speed).
template <class V, int R, int T, int kBlock>
MOELAB_FP32_TARGET void fp32_rows(const moelab::cpu::Nf4Matrix& w, const float* xs, int64_t xs_stride, int64_t r,
                                  float* y, int64_t y_stride, const typename V::Table& table) {
  using F = typename V::F;
  constexpr int W = V::kWidth;
  constexpr int64_t kChunk = 2 * W;
  const int64_t bs = kBlock > 0 ? kBlock : w.blocksize;
  const uint8_t* bytes[R];
  const float* absmax[R];  // the absmax of each row's first (partial) block
  F total[R][T];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    const int64_t begin = (r + i) * w.cols;
    bytes[i] = w.packed + begin / 2;
    absmax[i] = w.absmax.data() + begin / bs;
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) total[i][t] = V::zero();
  }
  // The first segment ends at row r's first block boundary (every row's, when R > 1).
  int64_t c = 0, seg_end = std::min(w.cols, bs - (r * w.cols) % bs);
  for (int64_t block = 0; c < w.cols; ++block, c = seg_end, seg_end = std::min(w.cols, seg_end + bs)) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const F a = V::set1(absmax[i][block]);
      if constexpr (kBlock > 0) {
        // The whole block decoded first, then each token's two chains over it, folded into its total
        // at once: 2 x kChunks decoded vectors and two chains live, not two chains per token (AVX-512's
        // four rows x four tokens of totals leave no room for more).
        constexpr int kChunks = kBlock / kChunk;
        F we[kChunks], wo[kChunks];
#pragma GCC unroll 8
        for (int k = 0; k < kChunks; ++k) V::codes_to_floats(bytes[i] + (c + k * kChunk) / 2, table, we[k], wo[k]);
        // One token: the rows share each x load in registers. More: each row reloads its tokens' x
        // from L1 (the compiler would otherwise keep every token's x for all rows, and with four tokens
        // those registers are the ones the totals need); the empty asm hides that the rows read the
        // same x.
        const float* xr = xs;
        if constexpr (T > 1) asm volatile("" : "+r"(xr));
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const float* x = xr + t * xs_stride + c;
          F even = V::mul(we[0], V::loadu(x));
          F odd = V::mul(wo[0], V::loadu(x + W));
#pragma GCC unroll 8
          for (int k = 1; k < kChunks; ++k) {
            even = V::fmadd(we[k], V::loadu(x + k * kChunk), even);
            odd = V::fmadd(wo[k], V::loadu(x + k * kChunk + W), odd);
          }
          total[i][t] = V::fmadd(V::add(even, odd), a, total[i][t]);
        }
      } else {
        // Any segment length (>= one chunk: simd_friendly): each chunk decoded once, every token's two
        // chains advanced by it.
        const int64_t chunks = (seg_end - c) / kChunk;
        F even[T], odd[T], we, wo;
        V::codes_to_floats(bytes[i] + c / 2, table, we, wo);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const float* x = xs + t * xs_stride + c;
          even[t] = V::mul(we, V::loadu(x));
          odd[t] = V::mul(wo, V::loadu(x + W));
        }
        for (int64_t k = 1; k < chunks; ++k) {
          const int64_t ck = c + k * kChunk;
          V::codes_to_floats(bytes[i] + ck / 2, table, we, wo);
#pragma GCC unroll 4
          for (int t = 0; t < T; ++t) {
            const float* x = xs + t * xs_stride + ck;
            even[t] = V::fmadd(we, V::loadu(x), even[t]);
            odd[t] = V::fmadd(wo, V::loadu(x + W), odd[t]);
          }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) total[i][t] = V::fmadd(V::add(even[t], odd[t]), a, total[i][t]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) y[t * y_stride + i] = V::reduce(total[i][t]);
}

// Rows [r0, r1) for T tokens: blocks of kRows rows while they last (when the rows start on block
// boundaries), then one row at a time; blocksize 64 (every Mixtral matrix) with its chunk loop unrolled.
template <class V, int T, int kRows>
MOELAB_FP32_TARGET void fp32_gemv_tokens(const moelab::cpu::Nf4Matrix& w, const float* xs, int64_t xs_stride,
                                         float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  const typename V::Table table = V::table();
  const bool aligned = w.cols % w.blocksize == 0;
  int64_t r = r0;
  if (w.blocksize == 64 && aligned) {
    if constexpr (kRows > 1)
      for (; r + kRows <= r1; r += kRows) fp32_rows<V, kRows, T, 64>(w, xs, xs_stride, r, y + (r - r0), y_stride, table);
    for (; r < r1; ++r) fp32_rows<V, 1, T, 64>(w, xs, xs_stride, r, y + (r - r0), y_stride, table);
    return;
  }
  if constexpr (kRows > 1)
    if (aligned)
      for (; r + kRows <= r1; r += kRows) fp32_rows<V, kRows, T, 0>(w, xs, xs_stride, r, y + (r - r0), y_stride, table);
  for (; r < r1; ++r) fp32_rows<V, 1, T, 0>(w, xs, xs_stride, r, y + (r - r0), y_stride, table);
}

// gemv_prepared_batch for any n: tokens four at a time, each row's codes decoded once per four tokens,
// rows in blocks of R = kTotals / T (1 to 4) so that R x T totals stay in registers (kTotals: what the
// kernel set's register file holds beside the rest). One token blocks rows only once x outgrows L1
// (below that a row block costs more than it saves). Row blocking changes no result (see the top).
template <class V, int kTotals>
void fp32_gemv(const moelab::cpu::Nf4Matrix& w, const float* xs, int64_t xs_stride, int n, float* y, int64_t y_stride,
               int64_t r0, int64_t r1) {
  if (!w.simd_friendly()) {
    for (int t = 0; t < n; ++t) moelab::cpu::scalar::gemv_prepared(w, xs + t * xs_stride, y + t * y_stride, r0, r1);
    return;
  }
  constexpr auto rows = [](int tokens) { return std::clamp(kTotals / tokens, 1, 4); };
  int t = 0;
  for (; t + 4 <= n; t += 4)
    fp32_gemv_tokens<V, 4, rows(4)>(w, xs + t * xs_stride, xs_stride, y + t * y_stride, y_stride, r0, r1);
  const float* xt = xs + t * xs_stride;
  float* yt = y + t * y_stride;
  switch (n - t) {
    case 3: return fp32_gemv_tokens<V, 3, rows(3)>(w, xt, xs_stride, yt, y_stride, r0, r1);
    case 2: return fp32_gemv_tokens<V, 2, rows(2)>(w, xt, xs_stride, yt, y_stride, r0, r1);
    case 1:
      if (w.cols * int64_t(sizeof(float)) <= 32 * 1024) return fp32_gemv_tokens<V, 1, 1>(w, xt, xs_stride, yt, y_stride, r0, r1);
      return fp32_gemv_tokens<V, 1, rows(1)>(w, xt, xs_stride, yt, y_stride, r0, r1);
    default: return;
  }
}

// out[(r - r0) * cols + c] = W[r, c]: code value times its block's absmax, one FP32 multiply.
template <class V>
MOELAB_FP32_TARGET void fp32_dequantize(const moelab::cpu::Nf4Matrix& w, int64_t r0, int64_t r1, float* out) {
  if (!w.simd_friendly()) return moelab::cpu::scalar::dequantize_rows(w, r0, r1, out);
  using F = typename V::F;
  constexpr int W = V::kWidth;
  const typename V::Table table = V::table();
  for (int64_t i = r0 * w.cols; i < r1 * w.cols; i += 2 * W) {
    F even, odd, lo, hi;
    V::codes_to_floats(w.packed + i / 2, table, even, odd);
    const F scale = V::set1(w.absmax[size_t(i / w.blocksize)]);  // a chunk lies in one block
    V::interleave(even, odd, lo, hi);
    V::storeu(out, V::mul(lo, scale));
    V::storeu(out + W, V::mul(hi, scale));
    out += 2 * W;
  }
}

}  // namespace
