#pragma once
// Writes a checkpoint's tensors as safetensors shards of bounded size, streaming: each tensor's bytes
// go to a spill file beside the shards as soon as they are added, and a shard is assembled from the
// spill (header first, tensors in the writer's layout order) when it fills. Memory stays at one tensor
// whatever the checkpoint's size; the extra I/O is one more write and read of the output, a quarter of
// the input for NF4.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/safetensors_writer.hpp"

namespace moelab {

class SafetensorsShardWriter {
 public:
  // Shards of at most `shard_bytes` of tensor data (a tensor larger than that gets a shard of its own).
  SafetensorsShardWriter(std::filesystem::path dir, int64_t shard_bytes, std::map<std::string, std::string> metadata);
  ~SafetensorsShardWriter();
  SafetensorsShardWriter(const SafetensorsShardWriter&) = delete;
  SafetensorsShardWriter& operator=(const SafetensorsShardWriter&) = delete;

  void add(const TensorToWrite& t);
  // Names the shards (model.safetensors when one suffices, else model-0000i-of-0000n.safetensors and
  // model.safetensors.index.json) and removes the spill file.
  void finish();
  int64_t total_bytes() const { return total_; }

 private:
  struct Spilled {
    TensorLayout layout;
    uint64_t offset;  // in the spill file
  };
  void flush();

  std::filesystem::path dir_, spill_path_;
  int64_t limit_, bytes_ = 0, total_ = 0;
  std::map<std::string, std::string> metadata_;
  int spill_fd_ = -1;
  std::vector<Spilled> pending_;
  std::vector<std::pair<std::filesystem::path, std::vector<std::string>>> parts_;
};

}  // namespace moelab
