// moelab: one CLI, many subcommands. Bad arguments and bad files end in one clear line on stderr and
// a non-zero exit.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/error.hpp"

namespace {

constexpr const char* kOverview = R"(
Three uses, one example each (every subcommand runs on the bundled model when --model is not given):
  evaluate   moelab eval --tasks hellaswag --data hellaswag.jsonl --engine cpu-nf4 -o results.json
  benchmark  moelab profile --engine cpu-nf4 --n-prompt 512 --n-gen 64 --json profile.json
  trace      moelab trace --input texts.jsonl -o routing.h5   (then: moelab stats routing.h5)
`moelab demo` runs all three on the bundled model; `moelab SUBCOMMAND --help` lists a subcommand's options.)";

// The parsed subcommand the error belongs to (the deepest one chosen), or the app itself.
const CLI::App* failing_command(const CLI::App& app) {
  const auto subs = app.get_subcommands();
  return subs.empty() ? &app : subs.back();
}

// One line for a command-line mistake, with the nearest option name when an unknown one was given.
std::string parse_error_line(const CLI::App& app, const CLI::ParseError& e) {
  const CLI::App* cmd = failing_command(app);
  const std::string where = cmd == &app ? "moelab" : "moelab " + cmd->get_name();
  std::string line = fmt::format("{}: {}", where, e.what());
  if (dynamic_cast<const CLI::ExtrasError*>(&e)) {
    const std::string msg = e.what();
    std::string word;
    for (size_t i = msg.find(':') == std::string::npos ? 0 : msg.find(':') + 1; i <= msg.size(); ++i) {
      if (i == msg.size() || msg[i] == ' ' || msg[i] == ',') {
        if (word.rfind("-", 0) == 0)
          if (const auto near = moelab::cli::nearest_option(*cmd, word); !near.empty()) {
            line += fmt::format(" (did you mean {}?)", near);
            break;
          }
        word.clear();
      } else {
        word += msg[i];
      }
    }
  }
  return line + fmt::format("; see {} --help", where);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelab: a research and benchmarking toolkit for Mixtral-family sparse MoE models"};
  app.set_version_flag("--version", std::string("moelab ") + MOELAB_VERSION);
  app.require_subcommand(1);
  // Every option's default in --help (subcommands copy these defaults when they are created).
  app.option_defaults()->always_capture_default();
  moelab::cli::register_inspect(app);
  moelab::cli::register_generate(app);
  moelab::cli::register_forward(app);
  moelab::cli::register_demo(app);
  moelab::cli::register_diff(app);
  moelab::cli::register_quantize(app);
  moelab::cli::register_merge(app);
  moelab::cli::register_finetune(app);
  moelab::cli::register_eval(app);
  moelab::cli::register_serve(app);
  moelab::cli::register_trace(app);
  moelab::cli::register_stats(app);
  moelab::cli::register_cachesim(app);
  moelab::cli::register_devices(app);
  app.footer(kOverview);  // after the subcommands, which would otherwise inherit it
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fflush(stdout);
    fmt::print(stderr, "moelab: error: {}\n", parse_error_line(app, e));
    return 2;  // a command-line mistake, as getopt-style tools exit
  } catch (const moelab::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "moelab: error: {}\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fflush(stdout);
    const auto subs = app.get_subcommands();
    const std::string advice = subs.empty() ? "" : moelab::cli::out_of_memory_advice(*subs.front());
    fmt::print(stderr, "moelab: error: out of memory{}\n", advice.empty() ? "" : " (" + advice + ")");
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "moelab: internal error: {}\n", e.what());
    return 2;
  }
  return 0;
}
