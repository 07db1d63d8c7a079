#include "core/model_presets.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>

#include "core/error.hpp"

namespace moelab {
namespace {

// mistralai/Mixtral-8x7B-v0.1 config.json (the fields our parser reads; tests/fixtures/configs holds the
// whole file and a test checks the two agree).
constexpr const char* kMixtral8x7B = R"({
  "architectures": ["MixtralForCausalLM"],
  "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
  "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
  "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000
})";

const std::map<std::string, const char*>& presets() {
  static const std::map<std::string, const char*> table = {{"mixtral-8x7b", kMixtral8x7B}};
  return table;
}

}  // namespace

std::vector<std::string> model_preset_names() {
  std::vector<std::string> names;
  for (const auto& [name, text] : presets()) names.push_back(name);
  return names;
}

ModelConfig model_preset(const std::string& name) {
  const auto it = presets().find(name);
  if (it == presets().end())
    throw Error(fmt::format("unknown model preset '{}' (known: {})", name, fmt::join(model_preset_names(), ", ")));
  return ModelConfig::from_json_text(it->second, "preset " + name);
}

}  // namespace moelab
