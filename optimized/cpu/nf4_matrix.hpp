#pragma once
// An NF4 weight matrix as the CPU kernels read it: bitsandbytes' layout (codes over the flattened
// row-major [rows, cols] tensor, two per byte, first element in the high nibble, blocks of `blocksize`
// consecutive elements) with the per-block absmax already rebuilt in FP32 (double quantization is
// undone once at load: it saves memory on disk, not work in the kernel).
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
  int64_t bytes() const { return packed_bytes() + int64_t(absmax.size() * sizeof(float)); }
};

// The 16 NF4 code values (bitsandbytes get_4bit_type("nf4"), float32).
extern const float kNf4Codes[16];

}  // namespace moelab::cpu
