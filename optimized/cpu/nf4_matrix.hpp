#pragma once
// An NF4 weight matrix as the CPU kernels read it: bitsandbytes' layout (codes over the flattened
// row-major [rows, cols] tensor, two per byte, first element in the high nibble, blocks of `blocksize`
// consecutive elements). The per-block absmax is kept twice: rebuilt in FP32 for the exact FP32 kernels
// (the check mode), and, when the weight was double-quantized, as stored (one 8-bit code per block, an
// FP32 scale per 256 blocks, an offset) for the int8 kernels, which decode it on the fly so a decode
// step reads 4.13 bits per weight instead of 4.5.
#include <cstdint>
#include <vector>

#include "optimized/nf4/code_values.hpp"

namespace moelab::cpu {

struct Nf4Matrix {
  int64_t rows = 0, cols = 0;
  int blocksize = 64;
  // (rows * cols + 1) / 2 bytes of codes: either `owned`, or inside a memory-mapped pre-quantized
  // checkpoint (not copied; the Checkpoint must outlive the matrix).
  const uint8_t* packed = nullptr;
  std::vector<uint8_t> owned;
  std::vector<float> absmax;  // ceil(rows * cols / blocksize)
  // Double quantization as bitsandbytes stores it (empty absmax_code: not double-quantized):
  // absmax[b] = nested_code[absmax_code[b]] * nested_absmax[b / 256] + offset, two FP32 roundings.
  std::vector<uint8_t> absmax_code;
  std::vector<float> nested_absmax;
  std::vector<float> nested_code;  // 256 entries
  float offset = 0;

  Nf4Matrix() = default;
  Nf4Matrix(Nf4Matrix&&) = default;  // a moved vector keeps its buffer, so `packed` stays valid
  Nf4Matrix& operator=(Nf4Matrix&&) = default;
  Nf4Matrix(const Nf4Matrix&) = delete;
  Nf4Matrix& operator=(const Nf4Matrix&) = delete;

  void own(std::vector<uint8_t> codes) {
    owned = std::move(codes);
    packed = owned.data();
  }
  int64_t packed_bytes() const { return (rows * cols + 1) / 2; }
  // The SIMD kernels need every row to start a whole 32-element chunk inside one block.
  bool simd_friendly() const { return cols % 32 == 0 && blocksize % 32 == 0; }
  int64_t bytes() const {
    return packed_bytes() + int64_t(absmax.size() * sizeof(float) + absmax_code.size() + nested_absmax.size() * sizeof(float));
  }
  // What one pass of the int8 kernels reads: the codes and the absmax in its compact form.
  int64_t streamed_bytes() const {
    return packed_bytes() + (double_quantized() ? int64_t(absmax_code.size() + nested_absmax.size() * sizeof(float))
                                                : int64_t(absmax.size() * sizeof(float)));
  }
  bool double_quantized() const { return !absmax_code.empty(); }
  // The FP32 absmax of block b, decoded from the compact form when there is one (bit for bit
  // absmax[b]: a multiply and an add, each rounded; moelab_cpu builds with -ffp-contract=off).
  float block_absmax(int64_t b) const {
    if (!double_quantized()) return absmax[size_t(b)];
    const float scaled = nested_code[absmax_code[size_t(b)]] * nested_absmax[size_t(b >> 8)];
    return scaled + offset;
  }
};

// The 16 NF4 code values (bitsandbytes get_4bit_type("nf4"), float32): optimized/nf4's one table.
inline constexpr const float (&kNf4Codes)[16] = nf4::kCodeValues;

// The same codes as the int8 kernels use them: round(127 * code), so W ~= absmax * kNf4Int8 / 127.
// The largest rounding, 0.0037 of absmax, is part of the int8 path's stated error bound. Derived here
// from the table (no product is within 0.03 of a tie, so float rounding cannot move one); test_nf4.cpp
// checks it against the rounding done in double.
constexpr int8_t nf4_int8_code(int code) {
  const float scaled = 127.0f * nf4::kCodeValues[code];
  return int8_t(scaled < 0 ? scaled - 0.5f : scaled + 0.5f);  // round half away from zero
}
inline constexpr int8_t kNf4Int8[16] = {
    nf4_int8_code(0),  nf4_int8_code(1),  nf4_int8_code(2),  nf4_int8_code(3),
    nf4_int8_code(4),  nf4_int8_code(5),  nf4_int8_code(6),  nf4_int8_code(7),
    nf4_int8_code(8),  nf4_int8_code(9),  nf4_int8_code(10), nf4_int8_code(11),
    nf4_int8_code(12), nf4_int8_code(13), nf4_int8_code(14), nf4_int8_code(15)};
// kNf4Int8 + 128 (1 .. 255) as the VNNI kernels read it: vpdpbusd multiplies an unsigned byte by a signed one,
// so these kernels take the weight unsigned and subtract 128 x the activations' sum (q8's group sums) instead
// of flipping signs on every product.
constexpr uint8_t nf4_uint8_code(int code) { return uint8_t(nf4_int8_code(code) + 128); }
inline constexpr uint8_t kNf4Uint8[16] = {
    nf4_uint8_code(0),  nf4_uint8_code(1),  nf4_uint8_code(2),  nf4_uint8_code(3),
    nf4_uint8_code(4),  nf4_uint8_code(5),  nf4_uint8_code(6),  nf4_uint8_code(7),
    nf4_uint8_code(8),  nf4_uint8_code(9),  nf4_uint8_code(10), nf4_uint8_code(11),
    nf4_uint8_code(12), nf4_uint8_code(13), nf4_uint8_code(14), nf4_uint8_code(15)};
static_assert([] {
  for (int k = 0; k < 16; ++k)
    if (kNf4Int8[k] < -127 || int(kNf4Uint8[k]) != kNf4Int8[k] + 128) return false;
  return true;
}(), "the VNNI kernels' unsigned weights are the int8 codes + 128, each in 1 .. 255");

}  // namespace moelab::cpu
