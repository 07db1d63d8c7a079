#pragma once
// An NF4 weight matrix as the CPU kernels read it: bitsandbytes' layout (codes over the flattened
// row-major [rows, cols] tensor, two per byte, first element in the high nibble, blocks of `blocksize`
// consecutive elements). The per-block absmax is kept twice: rebuilt in FP32 for the exact FP32 kernels
// (the check mode), and, when the weight was double-quantized, as stored (one 8-bit code per block, an
// FP32 scale per 256 blocks, an offset) for the int8 kernels, which decode it on the fly so a decode
// step reads 4.13 bits per weight instead of 4.5.
#include <cstdint>
#include <vector>

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

// The 16 NF4 code values (bitsandbytes get_4bit_type("nf4"), float32).
extern const float kNf4Codes[16];
// The same codes as the int8 kernels use them: round(127 * code), so W ~= absmax * kNf4Int8 / 127.
// The largest rounding, 0.0037 of absmax, is part of the int8 path's stated error bound.
extern const int8_t kNf4Int8[16];

}  // namespace moelab::cpu
