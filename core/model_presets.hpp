#pragma once
// Configurations of published models by name, for runs without a checkpoint: the cuda-nf4 engine's
// synthetic mode (`--synthetic mixtral-8x7b`: random NF4 weights at the real shapes) and shape-only
// tools. Each preset is the model's own config.json text, parsed by ModelConfig::from_json_text, so a
// preset and a real checkpoint's config go through the same checks.
#include <string>
#include <vector>

#include "core/config.hpp"

namespace moelab {

std::vector<std::string> model_preset_names();
// Throws moelab::Error naming the known presets when `name` is not one of them.
ModelConfig model_preset(const std::string& name);

}  // namespace moelab
