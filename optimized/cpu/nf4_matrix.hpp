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
  std::vector<uint8_t> packed;  // (rows * cols + 1) / 2 bytes
  std::vector<float> absmax;    // ceil(rows * cols / blocksize)

  // The SIMD kernels need every row to start a whole 32-element chunk inside one block.
  bool simd_friendly() const { return cols % 32 == 0 && blocksize % 32 == 0; }
  int64_t bytes() const { return int64_t(packed.size() + absmax.size() * sizeof(float)); }
};

// The 16 NF4 code values (bitsandbytes get_4bit_type("nf4"), float32).
extern const float kNf4Codes[16];

}  // namespace moelab::cpu
