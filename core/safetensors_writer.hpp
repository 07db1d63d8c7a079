#pragma once
// Writes safetensors files (tensor dumps, crafted test files, quantized checkpoints), atomically:
// the bytes go to "<path>.tmp.<pid>" and are renamed over `path` only when complete.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.hpp"

namespace moelab {

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;  // row-major, little-endian; size must equal numel * dtype size
};

TensorToWrite make_f32_tensor(std::string name, std::vector<int64_t> shape, const float* values);
TensorToWrite make_i32_tensor(std::string name, std::vector<int64_t> shape, const int32_t* values);

// Layout as the reference writer does it: tensors ordered by descending dtype alignment, then name;
// contiguous offsets from 0; header padded with spaces to a multiple of 8.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `contents` to `path` via a temporary file and rename (no half-written outputs).
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace moelab
