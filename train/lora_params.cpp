#include "train/lora_model.hpp"

// The trainable factors: which weights a recipe adapts (peft's target_modules list matching), their
// initialization, and peft's on-disk form (adapter_config.json + adapter_model.safetensors).

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.hpp"
#include "core/safetensors_writer.hpp"

namespace moelab::train {

double LoraRecipe::scale() const {
  if (rank <= 0) throw Error(fmt::format("LoRA rank {} is not positive", rank));
  return use_rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank);
}

namespace {

struct Adaptable {
  std::string weight;  // checkpoint name, "<module>.weight"
  int64_t out = 0, in = 0;
};

// Every Linear moelab adapts, with its shape ([out, in], as the checkpoint stores it).
std::vector<Adaptable> adaptable_linears(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t q = int64_t(c.num_heads) * c.head_dim, kv = int64_t(c.num_kv_heads) * c.head_dim;
  std::vector<Adaptable> out;
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.self_attn.", l);
    out.push_back({p + "q_proj.weight", q, H});
    out.push_back({p + "k_proj.weight", kv, H});
    out.push_back({p + "v_proj.weight", kv, H});
    out.push_back({p + "o_proj.weight", H, q});
    if (c.is_moe()) out.push_back({c.router_name(l), c.num_experts, H});
    for (int e = 0; e < c.num_experts; ++e) {
      out.push_back({c.w1_name(l, e), I, H});
      out.push_back({c.w3_name(l, e), I, H});
      out.push_back({c.w2_name(l, e), H, I});
    }
  }
  return out;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string module_of(const std::string& weight) { return weight.substr(0, weight.size() - std::string(".weight").size()); }

// peft's list matching (check_target_module_exists): the module name itself or a dotted suffix of it.
bool matches(const std::string& target, const std::string& module) {
  return module == target || ends_with(module, "." + target);
}

template <typename S>
void sort_by_name(std::vector<LoraParam<S>>& p) {
  std::sort(p.begin(), p.end(), [](const auto& a, const auto& b) { return a.weight_name < b.weight_name; });
}

}  // namespace

template <typename S>
LoraParams<S> LoraParams<S>::init(const ModelConfig& cfg, const LoraRecipe& recipe, uint64_t seed) {
  if (recipe.rank <= 0) throw Error(fmt::format("LoRA rank {} is not positive", recipe.rank));
  if (!(recipe.dropout >= 0 && recipe.dropout < 1))
    throw Error(fmt::format("LoRA dropout {} is outside [0, 1)", recipe.dropout));
  if (recipe.target_modules.empty()) throw Error("LoRA target_modules is empty: nothing to train");
  const auto linears = adaptable_linears(cfg);
  for (const auto& t : recipe.target_modules) {
    const bool any = std::any_of(linears.begin(), linears.end(), [&](const Adaptable& a) { return matches(t, module_of(a.weight)); });
    if (!any)
      throw Error(fmt::format("LoRA target module '{}' matches no Linear moelab adapts in {} ({}: q_proj k_proj v_proj "
                              "o_proj gate w1 w2 w3; a dense model: gate_proj up_proj down_proj)",
                              t, cfg.source, cfg.arch_name()));
  }
  LoraParams out;
  std::mt19937_64 rng(seed);
  const S scale = S(recipe.scale());
  for (const auto& a : linears) {
    const std::string m = module_of(a.weight);
    if (std::none_of(recipe.target_modules.begin(), recipe.target_modules.end(), [&](const auto& t) { return matches(t, m); }))
      continue;
    LoraParam<S> p;
    p.weight_name = a.weight;
    p.scale = scale;
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / in) = 1 / sqrt(in).
    const double bound = 1.0 / std::sqrt(double(a.in));
    std::uniform_real_distribution<double> u(-bound, bound);
    p.a.resize(recipe.rank, a.in);
    for (Eigen::Index i = 0; i < p.a.size(); ++i) p.a.data()[i] = S(float(u(rng)));  // representable in F32 (saved as F32)
    p.b = Mat<S>::Zero(a.out, recipe.rank);
    p.grad_a = Mat<S>::Zero(p.a.rows(), p.a.cols());
    p.grad_b = Mat<S>::Zero(p.b.rows(), p.b.cols());
    out.params_.push_back(std::move(p));
  }
  sort_by_name(out.params_);
  return out;
}

template <typename S>
LoraParams<S> LoraParams<S>::from_adapter(const LoraAdapter& adapter) {
  LoraParams out;
  for (const auto& [name, f] : adapter.modules()) {
    LoraParam<S> p;
    p.weight_name = name;
    p.scale = S(f.scale);
    p.a = f.a.template cast<S>();
    p.b = f.b.template cast<S>();
    p.grad_a = Mat<S>::Zero(p.a.rows(), p.a.cols());
    p.grad_b = Mat<S>::Zero(p.b.rows(), p.b.cols());
    out.params_.push_back(std::move(p));
  }
  sort_by_name(out.params_);
  return out;
}

template <typename S>
void LoraParams<S>::save(const std::string& dir, const LoraRecipe& recipe, const std::string& base_model) const {
  namespace fs = std::filesystem;
  const double scale = recipe.scale();
  for (const auto& p : params_) {
    // One r and lora_alpha for every module: a rank_pattern / alpha_pattern adapter is not re-saved.
    if (p.a.rows() != recipe.rank || p.scale != S(scale))  // compared in S: a float scale is the rounded recipe scale (rsLoRA's alpha/sqrt(r))
      throw Error(fmt::format("saving a LoRA adapter to {}: module '{}' has rank {} and scale {}, the recipe r={} "
                              "lora_alpha={} (scale {}); per-module ranks are not written",
                              dir, p.weight_name, p.a.rows(), double(p.scale), recipe.rank, recipe.alpha, scale));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(fmt::format("cannot create the adapter folder {}: {}", dir, ec.message()));

  std::vector<TensorToWrite> tensors;
  for (const auto& p : params_) {
    const std::string key = "base_model.model." + module_of(p.weight_name);
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> a = p.a.template cast<float>();
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> b = p.b.template cast<float>();
    tensors.push_back(make_f32_tensor(key + ".lora_A.weight", {a.rows(), a.cols()}, a.data()));
    tensors.push_back(make_f32_tensor(key + ".lora_B.weight", {b.rows(), b.cols()}, b.data()));
  }
  write_safetensors((fs::path(dir) / kAdapterWeightsFile).string(), tensors);

  // The fields peft 0.21.2's LoraConfig.save_pretrained writes (keys sorted as it does), with our values.
  std::vector<std::string> targets(recipe.target_modules);
  std::sort(targets.begin(), targets.end());
  nlohmann::json j = {
      {"alpha_pattern", nlohmann::json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base_model},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"eva_config", nullptr},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", nlohmann::json::object()},
      {"lora_alpha", recipe.alpha},
      {"lora_bias", false},
      {"lora_dropout", recipe.dropout},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"qalora_group_size", 16},
      {"r", recipe.rank},
      {"rank_pattern", nlohmann::json::object()},
      {"revision", nullptr},
      {"target_modules", targets},
      {"target_parameters", nullptr},
      {"task_type", "CAUSAL_LM"},
      {"trainable_token_indices", nullptr},
      {"use_dora", false},
      {"use_qalora", false},
      {"use_rslora", recipe.use_rslora},
  };
  write_file_atomic((fs::path(dir) / kAdapterConfigFile).string(), j.dump(2) + "\n");
}

template <typename S>
const LoraParam<S>* LoraParams<S>::find(const std::string& weight_name) const {
  for (const auto& p : params_)
    if (p.weight_name == weight_name) return &p;
  return nullptr;
}

template <typename S>
void LoraParams<S>::zero_grad() {
  for (auto& p : params_) {
    p.grad_a.setZero(p.a.rows(), p.a.cols());
    p.grad_b.setZero(p.b.rows(), p.b.cols());
    p.has_grad = false;
  }
}

template <typename S>
int64_t LoraParams<S>::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : params_) n += int64_t(p.a.size() + p.b.size());
  return n;
}

template class LoraParams<float>;
template class LoraParams<double>;

}  // namespace moelab::train
