// moelab: one CLI, many subcommands. Bad arguments and bad files end in one clear line on stderr and
// a non-zero exit.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/commands.hpp"
#include "core/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moelab: a research and benchmarking toolkit for Mixtral-family sparse MoE models"};
  app.set_version_flag("--version", std::string("moelab ") + MOELAB_VERSION);
  app.require_subcommand(1);
  moelab::cli::register_inspect(app);
  moelab::cli::register_generate(app);
  moelab::cli::register_forward(app);
  moelab::cli::register_demo(app);
  moelab::cli::register_diff(app);
  moelab::cli::register_quantize(app);
  moelab::cli::register_eval(app);
  moelab::cli::register_trace(app);
  moelab::cli::register_stats(app);
  moelab::cli::register_devices(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moelab::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "moelab: error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    fmt::print(stderr, "moelab: error: out of memory (try --stream, or a smaller --context)\n");
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "moelab: internal error: {}\n", e.what());
    return 2;
  }
  return 0;
}
