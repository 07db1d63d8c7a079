#include "cli/engines.hpp"

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/progress.hpp"
#include "reference/model.hpp"

namespace moelab::cli {

void add_engine_options(CLI::App& cmd, EngineOptions& opts) {
  cmd.add_option("--engine", opts.engine, "Engine: ref (Eigen FP32 reference)")
      ->check(CLI::IsMember({"ref"}))
      ->capture_default_str();
  cmd.add_option("--precision", opts.precision, "Reference precision: f32, or f64 (a float64 oracle)")
      ->check(CLI::IsMember({"f32", "f64"}))
      ->capture_default_str();
  cmd.add_flag("--stream", opts.stream, "Stream layer weights from the mmap'd checkpoint instead of keeping a copy");
  cmd.add_option("--context", opts.context, "Context length to allocate the KV cache for (default: min(4096, model max))")
      ->check(CLI::NonNegativeNumber);
}

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts) {
  if (opts.engine == "ref") {
    ref::ModelOptions mo{opts.context, opts.stream, stderr_is_terminal()};
    if (opts.precision == "f64") return std::make_unique<ref::Model<double>>(ck, mo);
    return std::make_unique<ref::Model<float>>(ck, mo);
  }
  throw Error(fmt::format("unknown engine '{}'", opts.engine));
}

std::string default_model_dir() { return MOELAB_DEFAULT_MODEL; }

}  // namespace moelab::cli
