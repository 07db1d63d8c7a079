#pragma once
// Adapters that tests make on the fly, in peft's format (adapter_config.json + adapter_model.safetensors):
// a fixture adapter's copy with its config or tensors edited, or an adapter written from scratch with
// random factors. The folder is removed with the object. (test_lora.cpp keeps its own AdapterCopy, the
// same idea for the CPU tests.)
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/lora.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::test {

// peft's tensor names for a module ("model.layers.0.self_attn.q_proj"): what save_pretrained writes.
inline std::string lora_a_name(const std::string& module) { return "base_model.model." + module + ".lora_A.weight"; }
inline std::string lora_b_name(const std::string& module) { return "base_model.model." + module + ".lora_B.weight"; }
// The module a base weight's checkpoint name belongs to: "...q_proj.weight" -> "...q_proj".
inline std::string module_of(const std::string& weight_name) {
  return weight_name.substr(0, weight_name.size() - std::string(".weight").size());
}

// A factor of `rows` x `cols` with N(0, sigma) values from `rng`, as an F32 tensor named `name`.
inline TensorToWrite random_factor(const std::string& name, int64_t rows, int64_t cols, double sigma,
                                   std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, float(sigma));
  std::vector<float> v(size_t(rows * cols));
  for (auto& x : v) x = d(rng);
  return make_f32_tensor(name, {rows, cols}, v.data());
}

class AdapterDir {
 public:
  // An empty folder, for an adapter written from scratch (set_config + write_tensors).
  AdapterDir() : dir_(tmp_.path() / "adapter") { std::filesystem::create_directories(dir_); }
  // A copy of the fixture adapter tests/fixtures/lora/NAME, without its expected outputs.
  explicit AdapterDir(const std::string& fixture_adapter) : dir_(tmp_.path() / "adapter") {
    std::filesystem::copy(fixture("lora/" + fixture_adapter), dir_, std::filesystem::copy_options::recursive);
    std::filesystem::remove(dir_ / "expected.safetensors");
  }
  AdapterDir(const AdapterDir&) = delete;
  AdapterDir& operator=(const AdapterDir&) = delete;

  std::string str() const { return dir_.string(); }
  nlohmann::ordered_json config() const {
    std::ifstream in(dir_ / kAdapterConfigFile);
    return nlohmann::ordered_json::parse(in);
  }
  void set_config(const nlohmann::ordered_json& j) const { std::ofstream(dir_ / kAdapterConfigFile) << j.dump(2); }
  template <typename F>
  void edit_config(F f) const {
    auto j = config();
    f(j);
    set_config(j);
  }
  void write_tensors(const std::vector<TensorToWrite>& ts) const {
    write_safetensors((dir_ / kAdapterWeightsFile).string(), ts);
  }
  // Rewrites adapter_model.safetensors through `f`, which may change, add or drop tensors.
  template <typename F>
  void edit_tensors(F f) const {
    std::vector<TensorToWrite> ts;
    {
      SafetensorsFile file((dir_ / kAdapterWeightsFile).string());
      for (const auto& [name, info] : file.tensors()) {
        const auto bytes = file.bytes(info);
        ts.push_back({name, info.dtype, info.shape, {bytes.begin(), bytes.end()}});
      }
    }
    f(ts);
    write_tensors(ts);
  }

 private:
  TempDir tmp_{"moelab-lora-adapter"};
  std::filesystem::path dir_;
};

}  // namespace moelab::test
