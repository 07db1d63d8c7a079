#pragma once
// Writes safetensors files (tensor dumps, crafted test files, quantized checkpoints), atomically:
// the bytes go to "<path>.tmp.<pid>" and are renamed over `path` only when complete.
#include <cstddef>
#include <cstdint>
#include <functional>
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

// A tensor's entry without its bytes, for writers that stream the data.
struct TensorLayout {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t size = 0;  // bytes
};

// As write_safetensors, with tensor i's bytes appended to `fd` by `write_data(i, fd)` (called once per
// tensor, in file order; exactly `size` bytes, or the write fails) instead of held in memory.
using TensorDataWriter = std::function<void(size_t tensor, int fd)>;
void write_safetensors_streamed(const std::string& path, const std::vector<TensorLayout>& tensors,
                                const std::map<std::string, std::string>& metadata, const TensorDataWriter& write_data);

// write(2) until all `n` bytes are written; a full disk or any other failure throws moelab::Error
// naming `path`.
void write_all(int fd, const void* data, size_t n, const std::string& path);

// Writes `contents` to `path` via a temporary file and rename (no half-written outputs).
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace moelab
