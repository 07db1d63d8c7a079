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
};

// Adds --engine, --precision, --stream, --context to a subcommand.
void add_engine_options(CLI::App& cmd, EngineOptions& opts);

std::unique_ptr<Engine> make_engine(const Checkpoint& ck, const EngineOptions& opts);

// --model defaults to the bundled default model.
std::string default_model_dir();

}  // namespace moelab::cli
