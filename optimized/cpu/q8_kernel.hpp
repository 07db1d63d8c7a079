// The int8 NF4 GEMV, one loop for every vector width (q8_vectors.hpp supplies the width). Included by
// one translation unit per instruction set, which defines MOELAB_Q8_TARGET (its target attribute)
// first; everything here has internal linkage, so the copies never meet at link time.
//
// Per row: its absmax decoded once, one FP32 per 32-element group (table lookups, then vector arithmetic).
// Per chunk of 2 x kBytes codes: one load, two nibble masks, two table shuffles (code -> weight byte),
// shared by up to four tokens; per token: two dot products into int32 lanes, one conversion, and one FMA
// with (activation scale x absmax) spread to the lanes (two loads of a chunk's group values, a multiply, a
// permute).
// With VNNI the weight bytes are unsigned (code + 128) and each int32 lane starts from -128 x the sum of its
// own 8 activations (a widening load and a shift), so it ends at exactly the signed product's value; without
// VNNI, absolute weights and sign-flipped activations (vpmaddubsw would saturate on 255 x 127). Either way
// every lane holds the same integer, so the kernel sets of one width (avx2 and avx2-vnni, avx512 and
// avx512-vnni) give the same FP32 result. Measured on Zen 5 (benchmarks/README.md): the unsigned weights and
// the per-row absmax took the L2-resident avx512-vnni GEMV from ~17 to ~25 GB/s of codes per core in one
// window, and prefill from 1.27x to 1.43x llama.cpp's; decode, bound by DRAM there, did not change.
#ifndef MOELAB_Q8_TARGET
#error "define MOELAB_Q8_TARGET before including q8_kernel.hpp"
#endif
#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "optimized/cpu/q8_vectors.hpp"

namespace {

// nested_code[absmax_code[b + k]] for k < n, into out, as plain loads and stores, once per row: out of line
// and unvectorized, because GCC -O3 otherwise fuses the lookups into dozens of vector inserts (a quarter of
// the GEMV's time), and a gather instruction is worse still on Zen 5 (a third).
#if defined(__GNUC__) && !defined(__clang__)
#define MOELAB_SCALAR_LOOP __attribute__((noinline, optimize("no-tree-slp-vectorize", "no-tree-loop-vectorize")))
#else
#define MOELAB_SCALAR_LOOP __attribute__((noinline))  // clang has no per-function optimize attribute
#endif
MOELAB_Q8_TARGET MOELAB_SCALAR_LOOP void nested_lookup(
    const moelab::cpu::Nf4Matrix& w, int64_t b, int64_t n, float* out) {
  const uint8_t* code = w.absmax_code.data() + b;
  const float* table = w.nested_code.data();
#pragma GCC unroll 8
  for (int64_t k = 0; k < n; ++k) out[k] = table[code[k]];
}
#undef MOELAB_SCALAR_LOOP

// The absmax of each 32-element group of row r, a[g] (a block of 64 serves two groups), decoded from the
// compact form once per row (per call with more than four tokens, else per set of up to four) instead of
// once per chunk: the chunk loop then reads one FP32 per group beside the activation scales, with no
// dependent table lookups in it. Bit for bit block_absmax.
inline void row_group_absmax(const moelab::cpu::Nf4Matrix& w, int64_t r, int shift, float* a) {
  const int64_t base = r * w.cols, groups = w.cols / 32;
  int64_t decoded = -1;  // (a block can start before the row and end after it: blocks are over the flat tensor)
  float v = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = (base + 32 * g) >> shift;
    if (b != decoded) v = w.block_absmax(decoded = b);
    a[g] = v;
  }
}

// Whole vectors of blocks of 64 per row, each inside one nested group of 256 (so from a multiple of
// kAbsmaxBlocks): Mixtral's 4096- and 14336-wide rows. Anything else decodes block by block.
template <class V>
bool vector_absmax(const moelab::cpu::Nf4Matrix& w) {
  return w.blocksize == 64 && (w.cols / 64) % V::kAbsmaxBlocks == 0;
}

// Row r's absmax per 32-element group into a (cols / 32 floats); nested: cols / 64 floats of scratch.
template <class V>
MOELAB_Q8_TARGET void decode_row_absmax(const moelab::cpu::Nf4Matrix& w, int64_t r, float* nested, float* a) {
  if (!vector_absmax<V>(w)) return row_group_absmax(w, r, std::countr_zero(unsigned(w.blocksize)), a);
  const int64_t blocks = w.cols / 64, b0 = r * blocks;
  if (w.double_quantized()) nested_lookup(w, b0, blocks, nested);
  for (int64_t k = 0; k < blocks; k += V::kAbsmaxBlocks) V::group_absmax_64(w, b0 + k, nested + k, a + 2 * k);
}

// The codes are asked for this far ahead of the loads. The stream is sequential and the hardware prefetchers
// follow it, but not always far enough ahead for a kernel this fast: on a noisy Zen 5 VM (benchmarks/README.md,
// medians of interleaved rounds, two threads) one token from DRAM through a w2-shaped matrix was faster with
// it in most rounds (avx512-vnni 19.6 -> 22.3 GB/s, avx2 13.6 -> 18.6), and cpu-nf4's prefill in every round;
// 2 KiB ahead measured as 1 KiB. It changes no value.
constexpr int64_t kPrefetchBytes = 1024;

// Rows r0 .. r1 for T tokens. `decoded`: the rows' absmax per group, decoded once by the caller for all its
// sets of four tokens (row r at (r - r0) x cols / 32), or null to decode each row here.
template <class V, int T>
MOELAB_Q8_TARGET void q8_rows(const moelab::cpu::Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d,
                              int64_t d_stride, float* y, int64_t y_stride, int64_t r0, int64_t r1, const float* decoded) {
  constexpr int64_t kChunk = 2 * V::kBytes;
  const typename V::I table = V::table();
  const int64_t groups = w.cols / 32;
  // The absmax per group of the current row, then the nested_code value of each of its blocks; reused.
  thread_local std::vector<float> scratch;
  if (!decoded) scratch.resize(size_t(groups + groups / 2));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.packed + r * w.cols / 2;
    const float* a = decoded ? decoded + (r - r0) * groups : scratch.data();
    if (!decoded) decode_row_absmax<V>(w, r, scratch.data() + groups, scratch.data());
    typename V::F acc[T];
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) acc[t] = V::zerof();
    // Group index g (kChunk / 32 groups per chunk) drives every pointer: codes at 16 bytes per group, the
    // activations at 32, the group sums, scales and absmax at one each.
    for (int64_t g = 0; g < groups; g += kChunk / 32) {
      // The line kPrefetchBytes ahead of this pass's codes (a pass reads 64 bytes with AVX-512, 32 with AVX2).
      // Past the matrix's end the address is only an integer (no pointer past the array is formed), and a
      // prefetch never faults.
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(codes + 16 * g) + kPrefetchBytes),
                   _MM_HINT_T0);
      const typename V::I raw = V::load(codes + 16 * g);
      const typename V::I wh = V::lookup(table, V::high_nibbles(raw)), wl = V::lookup(table, V::low_nibbles(raw));
      if constexpr (V::kUnsignedWeights) {
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const int8_t* x = q + t * q_stride;
          // (The lane sums follow the token's cols values: 4 int16, 8 bytes, per group.)
          typename V::I s = V::lane_sums(x + w.cols + 8 * g);
          s = V::dot(V::dot(s, wh, V::load(x + 32 * g)), wl, V::load(x + 32 * g + V::kBytes));
          acc[t] = V::fma(V::cvt(s), V::scales(d + t * d_stride + g, a + g), acc[t]);
        }
      } else {
        const typename V::I ah = V::abs8(wh), al = V::abs8(wl);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) {
          const int8_t* x = q + t * q_stride + 32 * g;
          typename V::I s = V::dot(V::zero(), ah, V::sign8(V::load(x), wh));
          s = V::dot(s, al, V::sign8(V::load(x + V::kBytes), wl));
          acc[t] = V::fma(V::cvt(s), V::scales(d + t * d_stride + g, a + g), acc[t]);
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) y[t * y_stride + (r - r0)] = V::reduce(acc[t]);
  }
}

// Tokens four at a time over the same rows: each block of codes is decoded once per four tokens, and
// each row's absmax once per call (prefill's token tiles make several sets of four). The callers' row
// ranges are work items of 64-256 KiB of codes, so the decoded absmax (cols / 32 floats a row) stays small.
template <class V>
MOELAB_Q8_TARGET void q8_gemv(const moelab::cpu::Nf4Matrix& w, const int8_t* q, int64_t q_stride, const float* d,
                              int64_t d_stride, int n, float* y, int64_t y_stride, int64_t r0, int64_t r1) {
  // Decode (n <= 4) decodes each row just before its products instead: decoding a stretch of rows up front
  // (one pass, or 16 KiB of absmax at a time) was slower there in every interleaved round measured, as the
  // code stream from DRAM pauses while it runs.
  const float* decoded = nullptr;
  if (n > 4) {
    const int64_t groups = w.cols / 32;
    thread_local std::vector<float> rows_absmax;
    rows_absmax.resize(size_t((r1 - r0) * groups + groups / 2));
    float* nested = rows_absmax.data() + (r1 - r0) * groups;
    for (int64_t r = r0; r < r1; ++r) decode_row_absmax<V>(w, r, nested, rows_absmax.data() + (r - r0) * groups);
    decoded = rows_absmax.data();
  }
  int t = 0;
  for (; t + 4 <= n; t += 4)
    q8_rows<V, 4>(w, q + t * q_stride, q_stride, d + t * d_stride, d_stride, y + t * y_stride, y_stride, r0, r1, decoded);
  const int rest = n - t;
  const int8_t* qt = q + t * q_stride;
  const float* dt = d + t * d_stride;
  float* yt = y + t * y_stride;
  if (rest == 3) q8_rows<V, 3>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1, decoded);
  if (rest == 2) q8_rows<V, 2>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1, decoded);
  if (rest == 1) q8_rows<V, 1>(w, qt, q_stride, dt, d_stride, yt, y_stride, r0, r1, decoded);
}

}  // namespace
