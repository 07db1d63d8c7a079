#include "cli/engines.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <thread>

#include "cli/bundled.hpp"
#include "cli/options.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/model_presets.hpp"
#include "core/progress.hpp"
#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"
#ifdef MOELAB_HAVE_CUDA
#include "optimized/cuda/engine.hpp"
#endif

namespace moelab::cli {

int max_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return 4 * int(hw > 0 ? std::min(hw, 4096u) : 1u);
}

CLI::Validator threads_validator() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const int limit = max_threads();
        long long n = 0;
        if (!CLI::detail::lexical_cast(text, n) || n < 0 || n > limit)
          return fmt::format("must be 0 (all cores) or 1 to {} (4x the {} hardware threads), got {}", limit,
                             limit / 4, text);
        return {};
      },
      "0..4xCORES");
}

namespace {
const std::vector<std::string> kEngines{"ref", "cpu-nf4", "cuda-nf4"};
const std::vector<std::string> kPrecisions{"f32", "f64"};
const std::vector<std::string> kKernelSets{"auto", "avx512-vnni", "avx512", "avx2-vnni", "avx2", "scalar"};
const std::vector<std::string> kLmHeads{"auto", "fp32", "bf16", "q8"};
const std::vector<std::string> kActivations{"auto", "int8", "bf16", "fp32"};
}  // namespace

void add_engine_options(CLI::App& cmd, EngineOptions& opts, bool choose_engine) {
  if (choose_engine)
    cmd.add_option("--engine", opts.engine, "Engine: ref (Eigen FP32 reference), cpu-nf4 (NF4 weights, SIMD, threads) or cuda-nf4 (NF4 on an NVIDIA GPU)")
        ->check(CLI::IsMember(kEngines))
        ->capture_default_str();
  cmd.add_option("--precision", opts.precision, "Reference precision: f32, or f64 (a float64 oracle)")
      ->check(CLI::IsMember(kPrecisions))
      ->capture_default_str();
  cmd.add_flag("--stream", opts.stream, "Stream layer weights from the mmap'd checkpoint instead of keeping a copy");
  cmd.add_option("-c,--context", opts.context, "Context length to allocate the KV cache for (0: min(4096, model max))")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd.add_option("-t,--threads", opts.threads, "cpu-nf4: threads (0: all cores)")
      ->check(threads_validator())
      ->capture_default_str();
  cmd.add_option("--kernels", opts.isa, "cpu-nf4: kernel set (auto: the widest this CPU has)")
      ->check(CLI::IsMember(kKernelSets))
      ->capture_default_str();
  cmd.add_option("--lm-head", opts.lm_head,
                 "cpu-nf4: lm_head format: fp32 (exact), bf16 (half the bytes; exact for a BF16 checkpoint), q8 (int8 "
                 "per row, a quarter of the bytes), auto (q8 with int8 activations, fp32 with --activations fp32)")
      ->check(CLI::IsMember(kLmHeads))
      ->capture_default_str();
  cmd.add_option("--activations", opts.activations,
                 "Type of the weight products' inputs: auto (int8 on cpu-nf4, bf16 on cuda-nf4), int8 (cpu-nf4: "
                 "integer dot products), bf16 (cuda-nf4: tensor cores) or fp32 (the exact check mode); accumulation "
                 "is FP32 (int32 within a block) either way")
      ->check(CLI::IsMember(kActivations))
      ->capture_default_str();
  cmd.add_option("--gpu-expert-cache", opts.gpu_expert_cache,
                 "cuda-nf4: keep N experts per layer on the GPU and the rest in pinned host memory, copied on demand "
                 "(0: all on the GPU)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd.add_flag("--gpu-expert-prefetch", opts.gpu_expert_prefetch,
               "cuda-nf4 with --gpu-expert-cache: copy the next layer's likely experts (its router applied to the "
               "current hidden state) while this layer computes");
  cmd.add_option("--adapter", opts.adapter,
                 "A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied unmerged: "
                 "y = W x + scale * B (A x), the LoRA product in FP32 (ref, cpu-nf4, cuda-nf4; docs/lora.md)");
  add_progress_option(cmd);
}

void apply_engine_override(EngineOptions& opts, const std::string& key_value) {
  const auto eq = key_value.find('=');
  const std::string key = key_value.substr(0, eq), value = eq == std::string::npos ? "" : key_value.substr(eq + 1);
  const auto bad = [&](const std::string& why) {
    return Error(fmt::format("engine option '{}': {}", key_value, why));
  };
  if (eq == std::string::npos) throw bad("expected KEY=VALUE, e.g. activations=fp32");
  const auto member = [&](const std::vector<std::string>& allowed, std::string& field) {
    if (std::find(allowed.begin(), allowed.end(), value) == allowed.end())
      throw bad(fmt::format("{} is one of {}", key, fmt::join(allowed, ", ")));
    field = value;
  };
  const auto count = [&](int& field, int limit) {
    int v = 0;
    if (!CLI::detail::lexical_cast(value, v) || v < 0 || v > limit) throw bad(fmt::format("{} is a count from 0 to {}", key, limit));
    field = v;
  };
  const auto flag = [&](bool& field) {
    if (value != "true" && value != "false") throw bad(fmt::format("{} is true or false", key));
    field = value == "true";
  };
  if (key == "activations") member(kActivations, opts.activations);
  else if (key == "kernels") member(kKernelSets, opts.isa);
  else if (key == "lm-head") member(kLmHeads, opts.lm_head);
  else if (key == "precision") member(kPrecisions, opts.precision);
  else if (key == "threads") count(opts.threads, max_threads());
  else if (key == "context") count(opts.context, 1 << 30);
  else if (key == "gpu-expert-cache") count(opts.gpu_expert_cache, 1 << 20);
  else if (key == "stream") flag(opts.stream);
  else if (key == "gpu-expert-prefetch") flag(opts.gpu_expert_prefetch);
  else if (key == "adapter") opts.adapter = value;  // a folder (checked when loaded), or empty: none
  else
    throw bad("unknown key (activations, kernels, lm-head, precision, threads, context, stream, gpu-expert-cache, "
              "gpu-expert-prefetch, adapter)");
}

namespace {

std::string cpu_activations(const std::string& name) {
  if (name == "bf16") throw Error("--activations bf16 is cuda-nf4's; cpu-nf4 takes int8 or fp32");
  return name == "auto" ? "int8" : name;
}

void check_cuda_only_options(const EngineOptions& opts) {
  if (opts.engine == "cuda-nf4") return;
  if (opts.gpu_expert_cache != 0 || opts.gpu_expert_prefetch)
    throw Error(fmt::format("--gpu-expert-cache / --gpu-expert-prefetch apply to --engine cuda-nf4, not {}", opts.engine));
}

#ifdef MOELAB_HAVE_CUDA
cuda::ActType cuda_activations(const std::string& name) {
  if (name == "int8") throw Error("--activations int8 is cpu-nf4's; cuda-nf4 takes bf16 or fp32");
  return name == "fp32" ? cuda::ActType::f32 : cuda::ActType::bf16;
}

cuda::EngineOptions cuda_options(const EngineOptions& opts, std::shared_ptr<const LoraAdapter> adapter = nullptr) {
  if (opts.stream) throw Error("--stream applies to the ref engine only");
  if (opts.gpu_expert_prefetch && opts.gpu_expert_cache == 0)
    throw Error("--gpu-expert-prefetch needs --gpu-expert-cache N (with every expert on the GPU there is nothing to fetch)");
  return cuda::EngineOptions{.max_context = opts.context,
                             .device = 0,
                             .show_progress = true,
                             .activations = cuda_activations(opts.activations),
                             .gpu_expert_cache = opts.gpu_expert_cache,
                             .prefetch_experts = opts.gpu_expert_prefetch,
                             .adapter = std::move(adapter)};
}

void print_cuda_loaded(const cuda::CudaNf4Engine& engine) {
  fmt::print(stderr, "[cuda-nf4] loaded in {:.2f}s: {:.1f} MiB on the device{}\n", engine.load_seconds(),
             double(engine.device_bytes()) / double(1 << 20),
             engine.pinned_host_bytes() > 0
                 ? fmt::format(", {:.1f} MiB of experts in pinned host memory",
                               double(engine.pinned_host_bytes()) / double(1 << 20))
                 : std::string());
}
#endif

// The adapter named by --adapter, read and checked against the model before any weight is loaded.
// cuda-nf4 prints its summary once the engine exists, so a machine without a GPU gets one error line.
std::shared_ptr<const LoraAdapter> load_adapter(const Checkpoint& ck, const EngineOptions& opts) {
  if (opts.adapter.empty()) return nullptr;
  auto adapter = LoraAdapter::load(opts.adapter, ck.config());
  if (opts.engine != "cuda-nf4") fmt::print(stderr, "[{}] adapter {}\n", opts.engine, adapter->summary());
  return adapter;
}

}  // namespace

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts) {
  check_cuda_only_options(opts);
  if (opts.threads < 0 || opts.threads > max_threads())
    throw Error(fmt::format("--threads must be 0 (all cores) or 1 to {}, got {}", max_threads(), opts.threads));
  const auto adapter = load_adapter(ck, opts);
  if (opts.engine == "ref") {
    ref::ModelOptions mo{opts.context, opts.stream, true, adapter};
    if (opts.precision == "f64") return std::make_unique<ref::Model<double>>(ck, mo);
    return std::make_unique<ref::Model<float>>(ck, mo);
  }
  if (opts.engine == "cpu-nf4") {
    if (opts.stream) throw Error("--stream applies to the ref engine only");
    auto engine = std::make_unique<cpu::Nf4Engine>(
        ck, cpu::EngineOptions{.max_context = opts.context, .threads = opts.threads, .isa = opts.isa,
                               .activations = cpu_activations(opts.activations),
                               .lm_head = opts.lm_head,
                               .show_progress = true,
                               .adapter = adapter});
    fmt::print(stderr, "[cpu-nf4] loaded in {:.2f}s: {:.1f} MiB of weights, {} kernels, {} activations, {} lm_head, {} threads\n",
               engine->load_seconds(), double(engine->weight_bytes()) / double(1 << 20), cpu::isa_name(engine->isa()),
               cpu::activations_name(engine->activations()), engine->lm_head_format(), engine->threads());
    return engine;
  }
  if (opts.engine == "cuda-nf4") {
#ifdef MOELAB_HAVE_CUDA
    auto engine = std::make_unique<cuda::CudaNf4Engine>(ck, cuda_options(opts, adapter));
    if (adapter) fmt::print(stderr, "[cuda-nf4] adapter {}\n", adapter->summary());
    print_cuda_loaded(*engine);
    return engine;
#else
    throw Error("cuda-nf4: this moelab was built without CUDA (no nvcc at configure time; see MOELAB_CUDA)");
#endif
  }
  throw Error(fmt::format("unknown engine '{}'", opts.engine));
}

std::unique_ptr<Engine> make_synthetic_engine(const std::string& preset, const EngineOptions& opts, uint64_t seed) {
  const ModelConfig config = model_preset(preset);  // an unknown name is an error naming the known ones
  if (!opts.adapter.empty()) throw Error("--adapter needs a checkpoint's weights; --synthetic draws random ones");
  if (opts.engine != "cuda-nf4")
    throw Error(fmt::format("--synthetic draws random weights on the GPU: it needs --engine cuda-nf4, not {}", opts.engine));
#ifdef MOELAB_HAVE_CUDA
  auto engine = cuda::CudaNf4Engine::synthetic(config, cuda_options(opts), seed);
  print_cuda_loaded(*engine);
  return engine;
#else
  (void)seed;
  throw Error("cuda-nf4: this moelab was built without CUDA (no nvcc at configure time; see MOELAB_CUDA)");
#endif
}

std::optional<ExpertCacheCounters> expert_cache_counters(const Engine& engine) {
#ifdef MOELAB_HAVE_CUDA
  if (const auto* c = dynamic_cast<const cuda::CudaNf4Engine*>(&engine))
    if (const auto st = c->expert_cache_stats())
      return ExpertCacheCounters{st->hit_rate(), st->hits, st->prefetch_hits, st->misses, st->prefetches, st->bytes_copied};
#else
  (void)engine;
#endif
  return std::nullopt;
}

void report_engine_counters(const Engine& engine) {
  if (const auto c = expert_cache_counters(engine))
    fmt::print(stderr,
               "[{}] expert cache: hit rate {:.1f}% ({} hits, {} prefetch hits, {} misses, {} prefetches), "
               "{:.2f} GiB copied\n",
               engine.name(), 100.0 * c->hit_rate, c->hits, c->prefetch_hits, c->misses, c->prefetches,
               double(c->bytes_copied) / double(1ull << 30));
}

std::string default_model_dir() { return bundled_path("models/default"); }

}  // namespace moelab::cli
