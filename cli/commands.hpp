#pragma once
// Each subcommand registers itself on the app; its callback runs when it is chosen.
#include <CLI/CLI.hpp>

namespace moelab::cli {

void register_inspect(CLI::App& app);
void register_generate(CLI::App& app);
void register_forward(CLI::App& app);
void register_demo(CLI::App& app);
void register_devices(CLI::App& app);
void register_trace(CLI::App& app);    // trace and profile
void register_stats(CLI::App& app);
void register_cachesim(CLI::App& app);
void register_diff(CLI::App& app);
void register_quantize(CLI::App& app);
void register_merge(CLI::App& app);
void register_eval(CLI::App& app);
void register_serve(CLI::App& app);
void register_finetune(CLI::App& app);

}  // namespace moelab::cli
