// moelab inspect: config, parameter counts, memory per engine, tensor inventory problems.
#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "core/checkpoint.hpp"
#include "core/regular_file.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"

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

// What print_config shows, for --json.
nlohmann::json config_json(const ModelConfig& c, int context) {
  nlohmann::json memory = nlohmann::json::array();
  for (const auto& m : memory_estimates(c, context))
    memory.push_back({{"engine", m.engine}, {"weight_bytes", m.weight_bytes}, {"kv_cache_bytes", m.kv_cache_bytes},
                      {"how", m.how}});
  return {{"architecture", c.arch_name()}, {"layers", c.num_layers}, {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size}, {"num_heads", c.num_heads}, {"num_kv_heads", c.num_kv_heads},
          {"head_dim", c.head_dim}, {"num_experts", c.num_experts}, {"top_k", c.top_k}, {"vocab_size", c.vocab_size},
          {"rope_theta", c.rope_theta}, {"max_position_embeddings", c.max_position_embeddings},
          {"sliding_window", c.sliding_window}, {"tie_word_embeddings", c.tie_word_embeddings},
          {"torch_dtype", c.torch_dtype}, {"total_params", c.total_params()}, {"active_params", c.active_params()},
          {"expert_params", c.expert_params()}, {"context", context}, {"memory", memory}};
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
  static std::string json_out;
  add_model_option(*cmd, model);
  cmd->add_option("--config", config_path, "Only a config.json (no weights needed)")->check(CLI::ExistingFile);
  cmd->add_option("-c,--context", context, "Context length for the KV cache estimate")->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_json_option(*cmd, json_out);
  add_progress_option(*cmd);
  cmd->add_flag("--check-values", check_values,
                "Also read every float tensor in full and fail on the first NaN or infinity (reads all the data)");
  cmd->callback([] {
    if (!config_path.empty()) {
      const auto c = ModelConfig::from_json_file(config_path);
      print_config(c, context);
      if (!json_out.empty()) write_file_atomic(json_out, config_json(c, context).dump(2) + "\n");
      return;
    }
    if (model.empty()) model = default_model_dir();
    fmt::print("model             {}\n", model);
    const auto ck = Checkpoint::open(model, /*show_progress=*/true);
    print_config(ck->config(), context);
    nlohmann::json j = config_json(ck->config(), context);
    j["model"] = model;
    int64_t bytes = 0;
    size_t count = 0;
    for (const auto& s : ck->shards()) {
      count += s->tensors().size();
      for (const auto& [_, t] : s->tensors()) bytes += int64_t(t.nbytes());
    }
    fmt::print("\ncheckpoint        {} shard(s), {} tensors, {} of data\n", ck->shards().size(), count,
               human_bytes(bytes));
    fmt::print("tokenizer         {}\n", path_type(ck->tokenizer_path()) != std::filesystem::file_type::not_found ? ck->tokenizer_path()
                                                                                      : "missing (tokenizer.model)");
    fmt::print("validation        every tensor the config implies is present with the right shape\n");
    if (check_values) {
      int64_t scanned = 0, tensors = 0, total = 0;
      for (const auto& s : ck->shards())
        for (const auto& [_, t] : s->tensors()) total += dtype_is_float_convertible(t.dtype) ? t.numel() : 0;
      Progress progress("checking values", total);
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
    if (!json_out.empty()) {
      j["checkpoint"] = {{"shards", ck->shards().size()}, {"tensors", count}, {"bytes", bytes},
                         {"tokenizer", ck->tokenizer_path()}, {"values_checked", check_values},
                         {"warnings", ck->warnings()}};
      write_file_atomic(json_out, j.dump(2) + "\n");
    }
  });
}

}  // namespace moelab::cli
