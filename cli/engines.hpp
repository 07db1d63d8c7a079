#pragma once
// Choosing an engine by name happens here, the one place that knows them all (DESIGN.md).
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"

namespace moelab::cli {

struct EngineOptions {
  std::string engine = "ref";
  std::string precision = "f32";  // ref only: f32 or f64
  bool stream = false;
  int context = 0;
  int threads = 0;           // cpu-nf4: 0 = all
  std::string isa = "auto";  // cpu-nf4 kernel set
  // Inputs of the weight products: auto (cpu-nf4 int8, cuda-nf4 bf16), int8 (cpu-nf4), bf16 (cuda-nf4) or
  // fp32 (the exact check mode of both).
  std::string activations = "auto";
  std::string lm_head = "auto";  // cpu-nf4: fp32, q8, or auto (q8 with int8 activations, fp32 in the check mode)
  int gpu_expert_cache = 0;          // cuda-nf4: experts per layer on the GPU (0: all)
  bool gpu_expert_prefetch = false;  // cuda-nf4 with the cache: prefetch the next layer's likely experts
  std::string adapter = {};          // a peft LoRA adapter folder applied unmerged (ref, cpu-nf4, cuda-nf4); empty: none
};

// Adds the engine option group (--engine, --precision, --stream, --context, --threads/-t, --kernels,
// --lm-head, --activations, --gpu-expert-cache, --gpu-expert-prefetch, --adapter) and --progress to a subcommand.
// Without `choose_engine` (diff, whose --a and --b name the engines) --engine is left out.
void add_engine_options(CLI::App& cmd, EngineOptions& opts, bool choose_engine = true);
// One engine option set from "KEY=VALUE" (diff's --a-opt / --b-opt: one side differs from the shared
// options), KEY being an engine option's long name without dashes (activations, kernels, lm-head,
// threads, context, precision, stream, gpu-expert-cache, gpu-expert-prefetch, adapter: a folder, or empty for
// none). Throws moelab::Error
// naming the pair when the key or the value is not one the option accepts.
void apply_engine_override(EngineOptions& opts, const std::string& key_value);
// --threads accepts 0 (all cores) or 1..max_threads() (4x the hardware threads): more would only
// oversubscribe, and OpenMP crashes creating 100,000 threads.
int max_threads();
CLI::Validator threads_validator();

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts);
// A model of a named preset's shape with random weights (`--synthetic mixtral-8x7b`): cuda-nf4 only,
// since the weights are drawn on the GPU.
std::unique_ptr<Engine> make_synthetic_engine(const std::string& preset, const EngineOptions& opts, uint64_t seed);

// What an engine counted that a user should see after a run: the cuda-nf4 expert cache's hits and
// bytes copied (absent for engines, or configurations, without a cache).
struct ExpertCacheCounters {
  double hit_rate = 0;
  int64_t hits = 0, prefetch_hits = 0, misses = 0, prefetches = 0, bytes_copied = 0;
};
std::optional<ExpertCacheCounters> expert_cache_counters(const Engine& engine);
// Prints them as one line on stderr, when there are any.
void report_engine_counters(const Engine& engine);

// --model defaults to the bundled default model.
std::string default_model_dir();

}  // namespace moelab::cli
