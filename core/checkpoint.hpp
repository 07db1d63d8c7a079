#pragma once
// A Hugging Face checkpoint folder: config.json, model.safetensors or model.safetensors.index.json
// with its shards, and (optionally) tokenizer.model. Opening it validates every shard header and every
// tensor the config implies (present, right shape, float dtype) before any compute; weights are
// converted to FP32 on demand from the mmap, so a layer can be streamed.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "core/safetensors.hpp"

namespace moelab {

class Checkpoint {
 public:
  // Throws moelab::Error naming the file (and tensor) on the first problem found.
  static std::unique_ptr<Checkpoint> open(const std::string& dir, bool show_progress = false);

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  std::string tokenizer_path() const;  // dir/tokenizer.model (may not exist)

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }

  std::vector<float> read_f32(const std::string& name) const;
  // Rows [first, first + count) of a 2-D tensor, FP32, row-major.
  void read_rows_f32(const std::string& name, int64_t first, int64_t count, float* dst) const;

  // Problems that are not fatal (tensors the config does not use), for `moelab inspect`.
  const std::vector<std::string>& warnings() const { return warnings_; }

 private:
  Checkpoint() = default;
  void validate_against_config();

  std::string dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const SafetensorsFile*> where_;
  std::vector<std::string> warnings_;
};

}  // namespace moelab
