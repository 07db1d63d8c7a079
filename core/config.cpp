#include "core/config.hpp"

#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"

namespace moelab {

using nlohmann::json;

namespace {

struct Reader {
  const json& j;
  const std::string& source;

  Error error(const std::string& what) const { return Error(fmt::format("{}: {}", source, what)); }

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

  int positive_int(const char* key) const {
    if (!has(key)) throw error(fmt::format("missing '{}'", key));
    if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0 || j[key].get<int64_t>() > (1 << 30))
      throw error(fmt::format("'{}' must be a positive integer, got {}", key, j[key].dump()));
    return j[key].get<int>();
  }
  int int_or(const char* key, int fallback) const { return has(key) ? positive_int(key) : fallback; }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j[key].is_number() || !(j[key].get<double>() > 0))
      throw error(fmt::format("'{}' must be a positive number, got {}", key, j[key].dump()));
    return j[key].get<double>();
  }
};

}  // namespace

std::string ModelConfig::arch_name() const {
  return arch == Architecture::Mixtral ? "MixtralForCausalLM" : "MistralForCausalLM";
}

ModelConfig ModelConfig::from_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("{}: cannot open config", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_text(ss.str(), path);
}

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON ({})", source, e.what()));
  }
  if (!j.is_object()) throw Error(fmt::format("{}: config is not a JSON object", source));
  try {
    return parse_config(j, source);
  } catch (const json::exception& e) {
    // A value of the wrong JSON type (e.g. "tie_word_embeddings": "yes").
    throw Error(fmt::format("{}: a value has the wrong type ({})", source, e.what()));
  }
}

ModelConfig ModelConfig::parse_config(const nlohmann::json& j, const std::string& source) {
  Reader r{j, source};
  ModelConfig c;
  c.source = source;

  std::string arch;
  if (r.has("architectures") && j["architectures"].is_array() && !j["architectures"].empty())
    arch = j["architectures"][0].get<std::string>();
  else if (r.has("model_type"))
    arch = j["model_type"] == "mixtral" ? "MixtralForCausalLM"
           : j["model_type"] == "mistral" ? "MistralForCausalLM" : j["model_type"].get<std::string>();
  if (arch == "MixtralForCausalLM") c.arch = Architecture::Mixtral;
  else if (arch == "MistralForCausalLM") c.arch = Architecture::Mistral;
  else throw r.error(fmt::format("unsupported architecture '{}' (moelab reads MixtralForCausalLM and "
                                 "MistralForCausalLM)", arch.empty() ? "<none>" : arch));

  if (r.has("hidden_act") && j["hidden_act"] != "silu")
    throw r.error(fmt::format("unsupported hidden_act {} (only silu)", j["hidden_act"].dump()));
  if (r.has("rope_scaling"))
    throw r.error(fmt::format("unsupported rope_scaling {} (only plain RoPE)", j["rope_scaling"].dump()));
  if (r.has("quantization_config")) {
    const auto& q = j["quantization_config"];
    if (!q.is_object() || q.value("quant_method", "") != "bitsandbytes" || !q.value("load_in_4bit", false))
      throw r.error(fmt::format("unsupported quantization_config {} (moelab reads bitsandbytes 4-bit NF4)", q.dump()));
    if (q.value("bnb_4bit_quant_type", "fp4") != "nf4")
      throw r.error(fmt::format("unsupported bnb_4bit_quant_type '{}' (only nf4)", q.value("bnb_4bit_quant_type", "fp4")));
    c.quantization.nf4 = true;
    c.quantization.double_quant = q.value("bnb_4bit_use_double_quant", false);
    c.quantization.compute_dtype = q.contains("bnb_4bit_compute_dtype") && q["bnb_4bit_compute_dtype"].is_string()
                                       ? q["bnb_4bit_compute_dtype"].get<std::string>()
                                       : "float32";
  }

  c.vocab_size = r.positive_int("vocab_size");
  c.hidden_size = r.positive_int("hidden_size");
  c.intermediate_size = r.positive_int("intermediate_size");
  c.num_layers = r.positive_int("num_hidden_layers");
  c.num_heads = r.positive_int("num_attention_heads");
  c.num_kv_heads = r.int_or("num_key_value_heads", c.num_heads);
  c.head_dim = r.int_or("head_dim", c.hidden_size / c.num_heads);
  if (!r.has("head_dim") && c.hidden_size % c.num_heads != 0)
    throw r.error(fmt::format("hidden_size {} is not divisible by num_attention_heads {}", c.hidden_size,
                              c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0)
    throw r.error(fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                              c.num_heads, c.num_kv_heads));
  if (c.head_dim % 2 != 0) throw r.error(fmt::format("head_dim {} must be even for RoPE", c.head_dim));
  if (c.is_moe()) {
    c.num_experts = r.positive_int("num_local_experts");
    c.top_k = r.positive_int("num_experts_per_tok");
    if (c.top_k > c.num_experts)
      throw r.error(fmt::format("num_experts_per_tok {} exceeds num_local_experts {}", c.top_k, c.num_experts));
    if (c.num_experts > 255) throw r.error("more than 255 experts are not supported");
  }
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  double theta = r.number("rope_theta", 0);
  if (theta == 0 && r.has("rope_parameters") && j["rope_parameters"].is_object() &&
      j["rope_parameters"].contains("rope_theta"))
    theta = j["rope_parameters"]["rope_theta"].get<double>();
  c.rope_theta = theta > 0 ? theta : 10000.0;
  c.max_position_embeddings = r.positive_int("max_position_embeddings");
  c.sliding_window = r.has("sliding_window") ? r.positive_int("sliding_window") : 0;
  if (r.has("tie_word_embeddings")) c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  if (r.has("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"];
  if (r.has("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_token_id = j["eos_token_id"];
  if (r.has("torch_dtype")) c.torch_dtype = j["torch_dtype"].get<std::string>();
  else if (r.has("dtype") && j["dtype"].is_string()) c.torch_dtype = j["dtype"].get<std::string>();
  return c;
}

std::string ModelConfig::w1_name(int l, int e) const {
  return is_moe() ? fmt::format("model.layers.{}.block_sparse_moe.experts.{}.w1.weight", l, e)
                  : fmt::format("model.layers.{}.mlp.gate_proj.weight", l);
}
std::string ModelConfig::w3_name(int l, int e) const {
  return is_moe() ? fmt::format("model.layers.{}.block_sparse_moe.experts.{}.w3.weight", l, e)
                  : fmt::format("model.layers.{}.mlp.up_proj.weight", l);
}
std::string ModelConfig::w2_name(int l, int e) const {
  return is_moe() ? fmt::format("model.layers.{}.block_sparse_moe.experts.{}.w2.weight", l, e)
                  : fmt::format("model.layers.{}.mlp.down_proj.weight", l);
}
std::string ModelConfig::router_name(int l) const {
  return is_moe() ? fmt::format("model.layers.{}.block_sparse_moe.gate.weight", l) : std::string();
}
std::string ModelConfig::lm_head_name() const {
  return tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
}

std::vector<TensorSpec> ModelConfig::expected_tensors() const {
  const int64_t H = hidden_size, I = intermediate_size, V = vocab_size;
  const int64_t q = int64_t(num_heads) * head_dim, kv = int64_t(num_kv_heads) * head_dim;
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", {V, H}});
  for (int l = 0; l < num_layers; ++l) {
    const auto p = fmt::format("model.layers.{}.", l);
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "self_attn.q_proj.weight", {q, H}});
    t.push_back({p + "self_attn.k_proj.weight", {kv, H}});
    t.push_back({p + "self_attn.v_proj.weight", {kv, H}});
    t.push_back({p + "self_attn.o_proj.weight", {H, q}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    if (is_moe()) t.push_back({router_name(l), {num_experts, H}});
    for (int e = 0; e < num_experts; ++e) {
      t.push_back({w1_name(l, e), {I, H}});
      t.push_back({w3_name(l, e), {I, H}});
      t.push_back({w2_name(l, e), {H, I}});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  if (!tie_word_embeddings) t.push_back({"lm_head.weight", {V, H}});
  if (quantization.nf4) {
    const auto names = nf4_weight_names();
    const std::set<std::string> quantized(names.begin(), names.end());
    for (auto& spec : t) spec.nf4 = quantized.count(spec.name) != 0;
  }
  return t;
}

std::vector<std::string> ModelConfig::nf4_weight_names() const {
  std::vector<std::string> names;
  for (int l = 0; l < num_layers; ++l) {
    const auto p = fmt::format("model.layers.{}.self_attn.", l);
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) names.push_back(p + proj + ".weight");
    if (is_moe()) names.push_back(router_name(l));
    for (int e = 0; e < num_experts; ++e) {
      names.push_back(w1_name(l, e));
      names.push_back(w3_name(l, e));
      names.push_back(w2_name(l, e));
    }
  }
  return names;
}

int64_t ModelConfig::expert_params() const { return 3 * int64_t(hidden_size) * intermediate_size; }

namespace {
// Everything a token touches except its experts: attention, norms, router, per layer.
int64_t non_expert_layer_params(const ModelConfig& c) {
  const int64_t H = c.hidden_size;
  const int64_t q = int64_t(c.num_heads) * c.head_dim, kv = int64_t(c.num_kv_heads) * c.head_dim;
  return 2 * H * q + 2 * H * kv + 2 * H + (c.is_moe() ? int64_t(c.num_experts) * H : 0);
}
int64_t embedding_params(const ModelConfig& c) {
  return int64_t(c.vocab_size) * c.hidden_size * (c.tie_word_embeddings ? 1 : 2) + c.hidden_size;
}
}  // namespace

int64_t ModelConfig::total_params() const {
  return embedding_params(*this) + int64_t(num_layers) * (non_expert_layer_params(*this) +
                                                          int64_t(num_experts) * expert_params());
}

int64_t ModelConfig::active_params() const {
  return embedding_params(*this) + int64_t(num_layers) * (non_expert_layer_params(*this) +
                                                          int64_t(top_k) * expert_params());
}

int64_t ModelConfig::kv_cache_bytes_per_token(int bytes_per_value) const {
  return int64_t(num_layers) * 2 * num_kv_heads * head_dim * bytes_per_value;
}

std::vector<MemoryEstimate> memory_estimates(const ModelConfig& c, int context) {
  const int64_t P = c.total_params();
  const int64_t embed = int64_t(c.vocab_size) * c.hidden_size * (c.tie_word_embeddings ? 1 : 2);
  const int64_t norms = int64_t(c.hidden_size) * (2 * c.num_layers + 1);
  const int64_t quantized = P - embed - norms;  // every linear layer but embedding / lm_head
  // NF4 with double quantization, blocks of 64: 4 bits per weight, one 8-bit absmax per 64 weights,
  // one FP32 absmax per 256 blocks (see optimized/nf4 and bitsandbytes' serialized form).
  const int64_t nf4 = quantized / 2 + quantized / 64 + quantized / (64 * 256) * 4;
  // cuda-nf4 undoes the double quantization at upload: 4 bits + one FP32 absmax per 64 weights.
  const int64_t cuda_nf4 = quantized / 2 + quantized / 64 * 4;
  const int64_t experts_all = int64_t(c.num_layers) * c.num_experts * c.expert_params();
  const int64_t experts_cuda_nf4 = experts_all / 2 + experts_all / 64 * 4;
  const int64_t per_layer_f32 =
      (non_expert_layer_params(c) + int64_t(c.num_experts) * c.expert_params()) * 4;
  const int64_t lm_head_f32 = int64_t(c.vocab_size) * c.hidden_size * 4;
  return {
      {"ref", "FP32 copy of every weight", P * 4, int64_t(context) * c.kv_cache_bytes_per_token(4)},
      {"ref --stream", "one layer + lm_head in FP32 at a time; weights stay mmap'd", per_layer_f32 + lm_head_f32,
       int64_t(context) * c.kv_cache_bytes_per_token(4)},
      {"cpu-nf4", "NF4 linears (codes mmap'd when pre-quantized), FP32 embedding/lm_head and norms",
       nf4 + embed * 4 + norms * 4,
       int64_t(context) * c.kv_cache_bytes_per_token(4)},
      {"cuda-nf4", "GPU memory: NF4 linears with FP32 absmax, FP32 embedding/lm_head/norms and KV cache",
       cuda_nf4 + embed * 4 + norms * 4, int64_t(context) * c.kv_cache_bytes_per_token(4)},
      {"cuda-nf4 --gpu-expert-cache 2", "GPU memory with 2 experts per layer on the GPU (the rest in pinned host memory)",
       cuda_nf4 - experts_cuda_nf4 + experts_cuda_nf4 * std::min(2, c.num_experts) / c.num_experts + embed * 4 + norms * 4,
       int64_t(context) * c.kv_cache_bytes_per_token(4)},
  };
}

}  // namespace moelab
