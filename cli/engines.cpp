#include "cli/engines.hpp"

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/progress.hpp"
#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"
#ifdef MOELAB_HAVE_CUDA
#include "optimized/cuda/engine.hpp"
#endif

namespace moelab::cli {

void add_engine_options(CLI::App& cmd, EngineOptions& opts) {
  cmd.add_option("--engine", opts.engine, "Engine: ref (Eigen FP32 reference), cpu-nf4 (NF4 weights, SIMD, threads) or cuda-nf4 (NF4 on an NVIDIA GPU)")
      ->check(CLI::IsMember({"ref", "cpu-nf4", "cuda-nf4"}))
      ->capture_default_str();
  cmd.add_option("--precision", opts.precision, "Reference precision: f32, or f64 (a float64 oracle)")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  cmd.add_flag("--stream", opts.stream, "Stream layer weights from the mmap'd checkpoint instead of keeping a copy");
  cmd.add_option("--context", opts.context, "Context length to allocate the KV cache for (default: min(4096, model max))")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--threads", opts.threads, "cpu-nf4: threads (default: all cores)")->check(CLI::NonNegativeNumber);
  cmd.add_option("--kernels", opts.isa, "cpu-nf4: kernel set (auto, avx512, avx2, scalar)")
      ->check(CLI::IsMember({"auto", "avx512", "avx2", "scalar"}))
      ->capture_default_str();
}

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts) {
  if (opts.engine == "ref") {
    ref::ModelOptions mo{opts.context, opts.stream, stderr_is_terminal()};
    if (opts.precision == "f64") return std::make_unique<ref::Model<double>>(ck, mo);
    return std::make_unique<ref::Model<float>>(ck, mo);
  }
  if (opts.engine == "cpu-nf4") {
    if (opts.stream) throw Error("--stream applies to the ref engine only");
    auto engine = std::make_unique<cpu::Nf4Engine>(
        ck, cpu::EngineOptions{.max_context = opts.context, .threads = opts.threads, .isa = opts.isa,
                               .show_progress = stderr_is_terminal()});
    fmt::print(stderr, "[cpu-nf4] loaded in {:.2f}s: {:.1f} MiB of weights, {} kernels\n", engine->load_seconds(),
               double(engine->weight_bytes()) / double(1 << 20), cpu::isa_name(engine->isa()));
    return engine;
  }
  if (opts.engine == "cuda-nf4") {
    if (opts.stream) throw Error("--stream applies to the ref engine only");
#ifdef MOELAB_HAVE_CUDA
    auto engine = std::make_unique<cuda::CudaNf4Engine>(
        ck, cuda::EngineOptions{.max_context = opts.context, .device = 0, .show_progress = stderr_is_terminal()});
    fmt::print(stderr, "[cuda-nf4] {:.1f} MiB on the device\n", double(engine->device_bytes()) / double(1 << 20));
    return engine;
#else
    throw Error("cuda-nf4: this moelab was built without CUDA (no nvcc at configure time; see MOELAB_CUDA)");
#endif
  }
  throw Error(fmt::format("unknown engine '{}'", opts.engine));
}

std::string default_model_dir() { return MOELAB_DEFAULT_MODEL; }

}  // namespace moelab::cli
