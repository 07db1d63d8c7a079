#include "core/config.hpp"

#include <fmt/format.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/regular_file.hpp"
#include "core/json_bounded.hpp"

namespace moelab {

using nlohmann::json;

namespace {

struct Reader {
  const json& j;
  const std::string& source;

  Error error(const std::string& what) const { return Error(fmt::format("{}: {}", source, what)); }

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

  // A positive integer of at most `max`: every dimension has a bound, so nothing sized from the config
  // (tensor lists, caches, parameter counts) can be absurd before the checkpoint's tensors are compared.
  int positive_int(const char* key, int64_t max) const {
    if (!has(key)) throw error(fmt::format("missing '{}'", key));
    if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0 ||
        (j[key].is_number_unsigned() && j[key].get<uint64_t>() > uint64_t(INT64_MAX)))
      throw error(fmt::format("'{}' must be a positive integer, got {}", key, j[key].dump()));
    if (j[key].get<int64_t>() > max)
      throw error(fmt::format("'{}' is {}, more than the {} moelab accepts", key, j[key].dump(), max));
    return j[key].get<int>();
  }
  int int_or(const char* key, int fallback, int64_t max) const { return has(key) ? positive_int(key, max) : fallback; }
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
  return from_json_text(read_regular_file(path, "config", 64u << 20), path);
}

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = parse_json_bounded(text, source);
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

  c.vocab_size = r.positive_int("vocab_size", limits::kMaxVocab);
  c.hidden_size = r.positive_int("hidden_size", limits::kMaxHidden);
  c.intermediate_size = r.positive_int("intermediate_size", limits::kMaxIntermediate);
  c.num_layers = r.positive_int("num_hidden_layers", limits::kMaxLayers);
  c.num_heads = r.positive_int("num_attention_heads", limits::kMaxHeads);
  c.num_kv_heads = r.int_or("num_key_value_heads", c.num_heads, limits::kMaxHeads);
  c.head_dim = r.int_or("head_dim", c.hidden_size / c.num_heads, limits::kMaxHeadDim);
  if (c.head_dim < 1)
    throw r.error(fmt::format("hidden_size {} is smaller than num_attention_heads {}", c.hidden_size, c.num_heads));
  if (!r.has("head_dim") && c.hidden_size % c.num_heads != 0)
    throw r.error(fmt::format("hidden_size {} is not divisible by num_attention_heads {}", c.hidden_size,
                              c.num_heads));
  if (c.num_heads % c.num_kv_heads != 0)
    throw r.error(fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                              c.num_heads, c.num_kv_heads));
  if (c.head_dim % 2 != 0) throw r.error(fmt::format("head_dim {} must be even for RoPE", c.head_dim));
  if (c.is_moe()) {
    c.num_experts = r.positive_int("num_local_experts", limits::kMaxExperts);
    c.top_k = r.positive_int("num_experts_per_tok", limits::kMaxExperts);
    if (c.top_k > c.num_experts)
      throw r.error(fmt::format("num_experts_per_tok {} exceeds num_local_experts {}", c.top_k, c.num_experts));
  }
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  double theta = r.number("rope_theta", 0);
  if (theta == 0 && r.has("rope_parameters") && j["rope_parameters"].is_object() &&
      j["rope_parameters"].contains("rope_theta"))
    theta = j["rope_parameters"]["rope_theta"].get<double>();
  c.rope_theta = theta > 0 ? theta : 10000.0;
  c.max_position_embeddings = r.positive_int("max_position_embeddings", limits::kMaxPositions);
  c.sliding_window = r.has("sliding_window") ? r.positive_int("sliding_window", limits::kMaxPositions) : 0;
  if (r.has("tie_word_embeddings")) c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  if (r.has("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"];
  if (r.has("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_token_id = j["eos_token_id"];
  if (r.has("torch_dtype")) c.torch_dtype = j["torch_dtype"].get<std::string>();
  else if (r.has("dtype") && j["dtype"].is_string()) c.torch_dtype = j["dtype"].get<std::string>();
  // Every count and byte size derived below must fit in int64 (checked arithmetic throws otherwise).
  (void)memory_estimates(c, 1);
  (void)c.expected_tensor_count();
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

void ModelConfig::append_layer_tensors(int l, std::vector<TensorSpec>& t) const {
  const int64_t H = hidden_size, I = intermediate_size;
  const int64_t q = int64_t(num_heads) * head_dim, kv = int64_t(num_kv_heads) * head_dim;
  const auto p = fmt::format("model.layers.{}.", l);
  // In an NF4 checkpoint every linear of a layer is quantized (nf4_weight_names()), the norms are not.
  const bool nf4 = quantization.nf4;
  t.push_back({p + "input_layernorm.weight", {H}});
  t.push_back({p + "self_attn.q_proj.weight", {q, H}, nf4});
  t.push_back({p + "self_attn.k_proj.weight", {kv, H}, nf4});
  t.push_back({p + "self_attn.v_proj.weight", {kv, H}, nf4});
  t.push_back({p + "self_attn.o_proj.weight", {H, q}, nf4});
  t.push_back({p + "post_attention_layernorm.weight", {H}});
  if (is_moe()) t.push_back({router_name(l), {num_experts, H}, nf4});
  for (int e = 0; e < num_experts; ++e) {
    t.push_back({w1_name(l, e), {I, H}, nf4});
    t.push_back({w3_name(l, e), {I, H}, nf4});
    t.push_back({w2_name(l, e), {H, I}, nf4});
  }
}

void ModelConfig::for_each_expected_tensor(const std::function<void(const TensorSpec&)>& f) const {
  const int64_t H = hidden_size, V = vocab_size;
  f({"model.embed_tokens.weight", {V, H}});
  std::vector<TensorSpec> layer;
  for (int l = 0; l < num_layers; ++l) {
    layer.clear();
    append_layer_tensors(l, layer);
    for (const auto& spec : layer) f(spec);
  }
  f({"model.norm.weight", {H}});
  if (!tie_word_embeddings) f({"lm_head.weight", {V, H}});
}

std::vector<TensorSpec> ModelConfig::expected_tensors() const {
  std::vector<TensorSpec> t;
  t.reserve(size_t(expected_tensor_count()));
  for_each_expected_tensor([&](const TensorSpec& spec) { t.push_back(spec); });
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

namespace {
// Checked 64-bit arithmetic for counts derived from a config: an overflow is an error naming the file,
// never a wrapped (negative) count.
struct Checked {
  const ModelConfig& c;
  [[noreturn]] void overflow() const {
    throw Error(fmt::format("{}: the sizes overflow 64-bit counts (hidden_size {}, intermediate_size {}, {} layers, "
                            "{} experts, vocab {})", c.source, c.hidden_size, c.intermediate_size, c.num_layers,
                            c.num_experts, c.vocab_size));
  }
  int64_t mul(int64_t a, int64_t b) const {
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) overflow();
    return r;
  }
  int64_t add(int64_t a, int64_t b) const {
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) overflow();
    return r;
  }
  int64_t sub(int64_t a, int64_t b) const {
    int64_t r;
    if (__builtin_sub_overflow(a, b, &r)) overflow();
    return r;
  }
};

// Everything a token touches except its experts: attention, norms, router, per layer.
int64_t non_expert_layer_params(const ModelConfig& c) {
  const Checked k{c};
  const int64_t H = c.hidden_size;
  const int64_t q = k.mul(c.num_heads, c.head_dim), kv = k.mul(c.num_kv_heads, c.head_dim);
  int64_t n = k.add(k.mul(2 * H, q), k.mul(2 * H, kv));
  n = k.add(n, 2 * H);
  return c.is_moe() ? k.add(n, k.mul(c.num_experts, H)) : n;
}
int64_t embedding_params(const ModelConfig& c) {
  const Checked k{c};
  return k.add(k.mul(k.mul(c.vocab_size, c.hidden_size), c.tie_word_embeddings ? 1 : 2), c.hidden_size);
}
int64_t params_with_experts(const ModelConfig& c, int experts) {
  const Checked k{c};
  return k.add(embedding_params(c),
               k.mul(c.num_layers, k.add(non_expert_layer_params(c), k.mul(experts, c.expert_params()))));
}
}  // namespace

int64_t ModelConfig::expert_params() const {
  const Checked k{*this};
  return k.mul(3, k.mul(hidden_size, intermediate_size));
}

int64_t ModelConfig::total_params() const { return params_with_experts(*this, num_experts); }
int64_t ModelConfig::active_params() const { return params_with_experts(*this, top_k); }

int64_t ModelConfig::expected_tensor_count() const {
  const Checked k{*this};
  const int64_t per_layer = 6 + (is_moe() ? 1 : 0) + 3 * int64_t(num_experts);
  return k.add(k.mul(num_layers, per_layer), tie_word_embeddings ? 2 : 3);
}

int64_t ModelConfig::kv_cache_bytes_per_token(int bytes_per_value) const {
  const Checked k{*this};
  return k.mul(k.mul(k.mul(num_layers, 2), k.mul(num_kv_heads, head_dim)), bytes_per_value);
}

std::vector<MemoryEstimate> memory_estimates(const ModelConfig& c, int context) {
  const Checked k{c};
  const int64_t P = c.total_params();
  const int64_t embed = k.mul(k.mul(c.vocab_size, c.hidden_size), c.tie_word_embeddings ? 1 : 2);
  const int64_t norms = k.mul(c.hidden_size, k.add(k.mul(2, c.num_layers), 1));
  const int64_t quantized = k.sub(k.sub(P, embed), norms);  // every linear layer but embedding / lm_head
  // NF4 with double quantization, blocks of 64: 4 bits per weight, one 8-bit absmax per 64 weights,
  // one FP32 absmax per 256 blocks (see optimized/nf4 and bitsandbytes' serialized form).
  const int64_t nf4 = k.add(k.add(quantized / 2, quantized / 64), k.mul(quantized / (64 * 256), 4));
  // cuda-nf4 undoes the double quantization at upload: 4 bits + one FP32 absmax per 64 weights.
  const int64_t cuda_nf4 = k.add(quantized / 2, k.mul(quantized / 64, 4));
  const int64_t experts_all = k.mul(k.mul(c.num_layers, c.num_experts), c.expert_params());
  const int64_t experts_cuda_nf4 = k.add(experts_all / 2, k.mul(experts_all / 64, 4));
  const int64_t per_layer_f32 = k.mul(k.add(non_expert_layer_params(c), k.mul(c.num_experts, c.expert_params())), 4);
  const int64_t lm_head_f32 = k.mul(k.mul(c.vocab_size, c.hidden_size), 4);
  const int64_t fp32_rest = k.add(k.mul(embed, 4), k.mul(norms, 4));
  const int64_t kv = k.mul(context, c.kv_cache_bytes_per_token(4));
  // experts_cuda_nf4 * 2 / E: the 2 cached experts' share (computed as a fraction first: no overflow).
  const int64_t cached = experts_cuda_nf4 / c.num_experts * std::min(2, c.num_experts) +
                         experts_cuda_nf4 % c.num_experts * std::min(2, c.num_experts) / c.num_experts;
  return {
      {"ref", "FP32 copy of every weight", k.mul(P, 4), kv},
      {"ref --stream", "one layer + lm_head in FP32 at a time; weights stay mmap'd", k.add(per_layer_f32, lm_head_f32),
       kv},
      // What the engine holds by default (int8 activations): the codes and the compact absmax the int8
      // kernels read (the check mode, --activations fp32, adds an FP32 absmax per 64 weights and keeps the
      // lm_head in FP32), the lm_head as int8 per row (+ an FP32 scale a row), FP32 norms; the embedding is
      // gathered from the mmap'd checkpoint, not copied.
      {"cpu-nf4", "NF4 linears (codes mmap'd when pre-quantized), q8 lm_head, FP32 norms; embedding rows read "
                  "from the checkpoint (--activations fp32 needs more)",
       k.add(k.add(nf4, k.add(k.mul(c.vocab_size, c.hidden_size), k.mul(c.vocab_size, 4))), k.mul(norms, 4)), kv},
      {"cuda-nf4", "GPU memory: NF4 linears with FP32 absmax, FP32 embedding/lm_head/norms and KV cache",
       k.add(cuda_nf4, fp32_rest), kv},
      {"cuda-nf4 --gpu-expert-cache 2", "GPU memory with 2 experts per layer on the GPU (the rest in pinned host memory)",
       k.add(k.add(k.sub(cuda_nf4, experts_cuda_nf4), cached), fp32_rest), kv},
  };
}

}  // namespace moelab
