#pragma once
// Where each NF4 matrix lives in the cuda-nf4 engine's single device allocation (host-callable, no CUDA).
//
// One cudaMalloc for all weights avoids thousands of small allocations and lets the upload be a few
// large copies. Each matrix keeps the bitsandbytes layout: packed codes (two per byte, first element in
// the high nibble, row-major over [rows, cols]) and one FP32 absmax per block of 64 elements (double
// quantization is undone on upload: the kernels read plain FP32 absmax). Every region starts on a
// 256-byte boundary so the GEMV's 16-byte vector loads are aligned and each matrix's codes begin at
// the start of a cache line / DRAM burst.
#include <cstdint>
#include <string>
#include <vector>

namespace moelab::cuda {

inline constexpr int64_t kArenaAlign = 256;
inline constexpr int kNf4Block = 64;

struct Nf4Region {
  std::string name;
  int64_t rows = 0, cols = 0;
  int64_t codes_offset = 0, codes_bytes = 0;    // (rows * cols + 1) / 2 bytes
  int64_t absmax_offset = 0, absmax_count = 0;  // ceil(rows * cols / 64) floats
};

class WeightArena {
 public:
  // Adds a [rows, cols] NF4 matrix; returns its index. The GEMV reads a row's codes as 16-byte vectors,
  // so cols must be a positive multiple of 32 (whole bytes per row, 16-byte rows) -- every Mixtral and
  // fixture shape is; throws moelab::Error otherwise.
  int add(std::string name, int64_t rows, int64_t cols);
  // Adds a plain region (norm weights, embeddings) of `bytes`; returns its offset.
  int64_t add_raw(int64_t bytes);
  const Nf4Region& region(int i) const { return regions_[size_t(i)]; }
  const std::vector<Nf4Region>& regions() const { return regions_; }
  int64_t bytes() const { return end_; }  // the allocation size

 private:
  int64_t reserve(int64_t bytes);
  std::vector<Nf4Region> regions_;
  int64_t end_ = 0;
};

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

}  // namespace moelab::cuda
