// moelab inspect: config, parameter counts, memory per engine, tensor inventory problems.
#include <fmt/format.h>

#include <filesystem>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "core/checkpoint.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"

namespace moelab::cli {
namespace {

std::string human_count(int64_t n) {
  if (n >= 1'000'000'000) return fmt::format("{:.1f}B", double(n) / 1e9);
  if (n >= 1'000'000) return fmt::format("{:.2f}M", double(n) / 1e6);
  if (n >= 1'000) return fmt::format("{:.1f}K", double(n) / 1e3);
  return std::to_string(n);
}

std::string human_bytes(int64_t b) {
  const double gib = double(b) / double(1ll << 30);
  if (gib >= 1) return fmt::format("{:.1f} GiB", gib);
  return fmt::format("{:.1f} MiB", double(b) / double(1 << 20));
}

void print_config(const ModelConfig& c, int context) {
  fmt::print("architecture      {}\n", c.arch_name());
  fmt::print("layers            {}\n", c.num_layers);
  fmt::print("hidden / ffn      {} / {}\n", c.hidden_size, c.intermediate_size);
  fmt::print("heads / kv heads  {} / {} (head_dim {})\n", c.num_heads, c.num_kv_heads, c.head_dim);
  fmt::print("experts / top-k   {} / {}\n", c.num_experts, c.top_k);
  fmt::print("vocab             {}\n", c.vocab_size);
  fmt::print("rope_theta        {:g}\n", c.rope_theta);
  fmt::print("max positions     {}\n", c.max_position_embeddings);
  fmt::print("sliding window    {}\n", c.sliding_window > 0 ? std::to_string(c.sliding_window) : "none");
  fmt::print("tied lm_head      {}\n", c.tie_word_embeddings ? "yes" : "no");
  fmt::print("stored dtype      {}\n", c.torch_dtype.empty() ? "?" : c.torch_dtype);
  fmt::print("\nparameters        {} total, {} active per token (exactly {} and {})\n",
             human_count(c.total_params()), human_count(c.active_params()), c.total_params(), c.active_params());
  fmt::print("                  one expert: {}; active = embeddings + attention + router + top-{} experts\n",
             human_count(c.expert_params()), c.top_k);
  fmt::print("\nmemory per engine (weights + KV cache for {} tokens):\n", context);
  for (const auto& m : memory_estimates(c, context))
    fmt::print("  {:<29} {:>10} + {:>10}   {}\n", m.engine, human_bytes(m.weight_bytes), human_bytes(m.kv_cache_bytes),
               m.how);
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Print a checkpoint's config, parameter counts, memory needs and tensor problems");
  static std::string model;
  static std::string config_path;
  static int context = 4096;
  static bool check_values = false;
  cmd->add_option("--model", model, "Checkpoint folder (config.json + safetensors)");
  cmd->add_option("--config", config_path, "Only a config.json (no weights needed)")->check(CLI::ExistingFile);
  cmd->add_option("--context", context, "Context length for the KV cache estimate")->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--check-values", check_values,
                "Also read every float tensor in full and fail on the first NaN or infinity (reads all the data)");
  cmd->callback([] {
    if (!config_path.empty()) {
      print_config(ModelConfig::from_json_file(config_path), context);
      return;
    }
    if (model.empty()) model = default_model_dir();
    fmt::print("model             {}\n", model);
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    print_config(ck->config(), context);
    int64_t bytes = 0;
    size_t count = 0;
    for (const auto& s : ck->shards()) {
      count += s->tensors().size();
      for (const auto& [_, t] : s->tensors()) bytes += int64_t(t.nbytes());
    }
    fmt::print("\ncheckpoint        {} shard(s), {} tensors, {} of data\n", ck->shards().size(), count,
               human_bytes(bytes));
    fmt::print("tokenizer         {}\n", std::filesystem::exists(ck->tokenizer_path()) ? ck->tokenizer_path()
                                                                                      : "missing (tokenizer.model)");
    fmt::print("validation        every tensor the config implies is present with the right shape\n");
    if (check_values) {
      int64_t scanned = 0, tensors = 0, total = 0;
      for (const auto& s : ck->shards())
        for (const auto& [_, t] : s->tensors()) total += dtype_is_float_convertible(t.dtype) ? t.numel() : 0;
      Progress progress("checking values", total, stderr_is_terminal());
      for (const auto& s : ck->shards())
        for (const auto& [_, t] : s->tensors()) {
          const int64_t n = s->check_finite(t);  // throws naming the file, tensor and element
          if (n > 0 || dtype_is_float_convertible(t.dtype)) ++tensors;
          scanned += n;
          progress.advance(n);
        }
      progress.finish();
      fmt::print("values            all {} values of the {} float tensors are finite\n", scanned, tensors);
    } else {
      fmt::print("values            not scanned (engines check each weight as they convert it; --check-values "
                 "scans all now)\n");
    }
    for (const auto& w : ck->warnings()) fmt::print("warning: {}\n", w);
  });
}

}  // namespace moelab::cli
