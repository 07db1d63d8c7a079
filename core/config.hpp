#pragma once
// ModelConfig: the facts of a Hugging Face config.json for MixtralForCausalLM (sparse MoE) or
// MistralForCausalLM (treated as the dense case: one expert, always chosen, weight 1).
#include <cstdint>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace moelab {

enum class Architecture { Mixtral, Mistral };

// The largest value of each config.json dimension moelab accepts: far above any published model
// (Mixtral-8x22B: 56 layers, hidden 6144, ffn 16384, vocab 32768), low enough that nothing sized from a
// config (tensor lists, KV caches, parameter counts in int64) can be absurd before the checkpoint's
// tensors are compared with it.
namespace limits {
inline constexpr int64_t kMaxVocab = 1 << 22;          // 4,194,304 tokens
inline constexpr int64_t kMaxHidden = 1 << 16;         // 65,536
inline constexpr int64_t kMaxIntermediate = 1 << 20;   // 1,048,576
inline constexpr int64_t kMaxLayers = 1024;
inline constexpr int64_t kMaxHeads = 1024;
inline constexpr int64_t kMaxHeadDim = 4096;
inline constexpr int64_t kMaxExperts = 255;            // expert ids are stored as uint8
inline constexpr int64_t kMaxPositions = 1 << 30;      // max_position_embeddings, sliding_window
}  // namespace limits

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // logical shape
  // Stored as a bitsandbytes NF4 weight: U8 [(numel + 1) / 2, 1] plus "<name>.absmax", ".quant_map",
  // ".quant_state.bitsandbytes__nf4" (and ".nested_*" when double-quantized) beside it.
  bool nf4 = false;
};

// `quantization_config` of a pre-quantized (bitsandbytes 4-bit NF4) checkpoint, as transformers 4.x
// writes it. Only NF4 is read; FP4 and 8-bit are refused with a clear error.
struct QuantizationConfig {
  bool nf4 = false;
  bool double_quant = false;
  std::string compute_dtype;
};

struct ModelConfig {
  Architecture arch = Architecture::Mixtral;
  std::string source;  // path it was read from, for messages
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int num_experts = 1;  // 1 for the dense (Mistral) case
  int top_k = 1;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int max_position_embeddings = 0;
  int sliding_window = 0;  // 0: plain causal attention
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  std::string torch_dtype;
  QuantizationConfig quantization;

  bool is_moe() const { return arch == Architecture::Mixtral; }
  std::string arch_name() const;

  // Reads and checks config.json; unknown architectures, missing keys, non-positive sizes,
  // heads that do not divide, top_k > experts are errors naming the file.
  static ModelConfig from_json_file(const std::string& path);
  static ModelConfig from_json_text(const std::string& text, const std::string& source);

  // Every tensor the checkpoint must contain, with its shape (HF on-disk names).
  std::vector<TensorSpec> expected_tensors() const;
  // The same, one at a time, without building the list (a layer's worth at a time): checking a
  // checkpoint against its config stops at the first problem and allocates nothing the config alone sizes.
  void for_each_expected_tensor(const std::function<void(const TensorSpec&)>& f) const;
  // The tensors of layer `l` alone, in expected_tensors() order, appended to `out`.
  void append_layer_tensors(int l, std::vector<TensorSpec>& out) const;
  // The weights an NF4 model quantizes, as transformers + bitsandbytes do for Mixtral: every attention
  // projection, the router gate and every expert matrix; embeddings, norms and lm_head keep their
  // precision. Per layer in this order: q, k, v, o, router (MoE only), then w1, w3, w2 of each expert.
  std::vector<std::string> nf4_weight_names() const;

  // Names of the three MLP matrices of one expert: {w1 (gate), w3 (up), w2 (down)}.
  std::string w1_name(int layer, int expert) const;
  std::string w3_name(int layer, int expert) const;
  std::string w2_name(int layer, int expert) const;
  std::string router_name(int layer) const;  // empty for dense models
  std::string lm_head_name() const;          // the embedding when tied

  // Parameter counts. Active = the weights one token's forward pass reads, counted as in Mistral's
  // "12.9B active" for Mixtral-8x7B: embedding, lm_head, attention, norms, router and top_k experts.
  int64_t total_params() const;
  int64_t active_params() const;
  int64_t expert_params() const;  // one expert's three matrices
  int64_t kv_cache_bytes_per_token(int bytes_per_value) const;
  // How many tensors expected_tensors() lists, computed without building the list. All counts are
  // checked 64-bit arithmetic: an overflow throws moelab::Error naming the config.
  int64_t expected_tensor_count() const;

 private:
  static ModelConfig parse_config(const nlohmann::json& j, const std::string& source);
};

// Memory an engine needs to hold the model (weights) and a KV cache of `context` tokens.
struct MemoryEstimate {
  std::string engine;
  std::string how;
  int64_t weight_bytes;
  int64_t kv_cache_bytes;
};
std::vector<MemoryEstimate> memory_estimates(const ModelConfig& c, int context);

}  // namespace moelab
