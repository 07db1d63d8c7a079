#pragma once
// Choosing an engine by name happens here, the one place that knows them all (DESIGN.md).
#include <CLI/CLI.hpp>
#include <memory>
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
};

// Adds --engine, --precision, --stream, --context, --threads, --kernels to a subcommand.
void add_engine_options(CLI::App& cmd, EngineOptions& opts);

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts);

// --model defaults to the bundled default model.
std::string default_model_dir();

}  // namespace moelab::cli
