#pragma once
// A peft LoRA adapter (adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes
// them), read and checked against a model's config before any engine uses it. See docs/lora.md.
//
// Each adapted Linear computes y = W x + scale * B (A x), A [r, in], B [out, r], scale = lora_alpha / r
// (lora_alpha / sqrt(r) with use_rslora), r and lora_alpha per module through rank_pattern / alpha_pattern.
// Adaptable modules: the attention projections (q/k/v/o_proj), the router (block_sparse_moe.gate) and
// every expert's w1/w2/w3 (mlp.gate_proj/up_proj/down_proj for MistralForCausalLM). Anything an adapter
// asks for that moelab does not apply (DoRA and the other LoRA variants, biases, modules_to_save,
// another peft_type, fan_in_fan_out, targets outside that set, ...) is a moelab::Error naming the file
// and the field, never a silent ignore.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "core/engine.hpp"

namespace moelab {

// One adapted Linear: y = W x + scale * B (A x), the factors in FP32 as read.
struct LoraFactors {
  int rank = 0;
  double alpha = 0;
  double scale = 0;  // alpha / r, or alpha / sqrt(r) with use_rslora
  MatrixRF a;        // [r, in]   lora_A.weight
  MatrixRF b;        // [out, r]  lora_B.weight
};

class LoraAdapter {
 public:
  // Reads DIR/adapter_config.json and DIR/adapter_model.safetensors and checks every field and tensor
  // against `cfg`. Throws moelab::Error naming the file and the field (or tensor) on the first problem.
  static std::shared_ptr<const LoraAdapter> load(const std::string& dir, const ModelConfig& cfg);

  const std::string& dir() const { return dir_; }
  // The factors for a base weight, by its checkpoint name ("model.layers.0.self_attn.q_proj.weight"),
  // or null when the adapter leaves that weight alone.
  const LoraFactors* find(const std::string& weight_name) const;
  // Every adapted weight (checkpoint name -> factors).
  const std::map<std::string, LoraFactors>& modules() const { return modules_; }
  bool use_rslora() const { return use_rslora_; }
  int64_t parameter_count() const;
  int64_t bytes() const { return parameter_count() * int64_t(sizeof(float)); }
  // One line for a log: "DIR: LoRA r=8 alpha=16 (scale 2) on 40 modules (q_proj, ..., w3), 1.2M parameters".
  std::string summary() const;

 private:
  std::string dir_;
  bool use_rslora_ = false;
  std::map<std::string, LoraFactors> modules_;
};

// The largest LoRA rank moelab reads (adapter_config.json's r and rank_pattern) and trains (finetune
// --lora-r): one bound, so that finetune never writes an adapter that moelab then refuses to read.
inline constexpr int kMaxLoraRank = 1 << 16;

// The name of the file/field an error is about, for tests and messages.
inline constexpr const char* kAdapterConfigFile = "adapter_config.json";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

}  // namespace moelab
