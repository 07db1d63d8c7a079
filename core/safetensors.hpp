#pragma once
// A memory-mapped safetensors file whose header has been fully validated on open.
//
// Format (huggingface/safetensors README): u64 little-endian header size N, N bytes of UTF-8 JSON
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the
// byte buffer; offsets are relative to the buffer. Validation follows the Rust reader: any file it
// would reject, we reject, with a one-line message naming the file and the tensor.
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace moelab {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer
  uint64_t end = 0;

  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

std::string shape_str(const std::vector<int64_t>& shape);  // "[8, 4096]"
int64_t shape_numel(const std::vector<int64_t>& shape);    // product of the dimensions (1 for [])
// Tensor names, keys and shard names come from files: control characters in them would break a
// one-line error message, so messages show them escaped (\n, \xNN).
std::string printable(std::string_view s);
// A name from a file (tensor, key) for a message: printable(), whole up to 256 bytes of the name (every
// name in a Mixtral checkpoint or peft adapter is under 100), else its first and last 120 bytes around
// "...", so a hostile megabyte-long name still gives a short line that shows both its ends.
std::string printable_name(std::string_view s);

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // same limit as the Rust reader

  // Maps and validates the file; throws moelab::Error naming `path` on any problem.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws if absent

  // Raw bytes of a tensor inside the mapping (valid while this object lives).
  std::span<const std::byte> bytes(const TensorInfo& t) const;
  std::span<const std::byte> bytes(const std::string& name) const { return bytes(info(name)); }
  // Drops a tensor's pages from this process's memory (they stay in the page cache and are mapped
  // again if read): a pass over a whole checkpoint then holds one tensor's pages, not the file's.
  void release(const TensorInfo& t) const;

  // Converts `count` elements starting at element `first` of a float tensor to FP32. With check_finite,
  // a NaN or infinity among them throws moelab::Error naming the file, the tensor and the element.
  void read_f32(const TensorInfo& t, int64_t first, int64_t count, float* dst, bool check_finite = false) const;
  std::vector<float> read_f32(const std::string& name, bool check_finite = false) const;
  // Scans a whole float tensor for NaN / infinity (throws as above); returns the values scanned (0 for
  // tensors of other dtypes, which are not scanned).
  int64_t check_finite(const TensorInfo& t) const;

 private:
  Error non_finite_error(const TensorInfo& t, int64_t element, float value) const;

  std::string path_;
  int fd_ = -1;
  const std::byte* map_ = nullptr;
  uint64_t file_size_ = 0;
  const std::byte* data_ = nullptr;  // start of the byte buffer
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moelab
