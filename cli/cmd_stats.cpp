// moelab stats: routing statistics of a trace (load per expert, load balance, co-selection, repetition
// between consecutive tokens), as tables on the terminal and as JSON (docs/stats-json.md).
#include <fmt/format.h>

#include "analysis/stats.hpp"
#include "analysis/trace.hpp"
#include "cli/commands.hpp"
#include "core/safetensors_writer.hpp"

namespace moelab::cli {

void register_stats(CLI::App& app) {
  auto* cmd = app.add_subcommand("stats", "Routing statistics of a trace: expert load, balance, repetition");
  static std::string trace_path, json_out;
  static bool by_domain = false;
  static std::vector<int> layers;
  cmd->add_option("trace", trace_path, "Trace file written by `moelab trace`")->required();
  cmd->add_option("--json", json_out, "Also write every statistic as JSON (layout: docs/stats-json.md)");
  cmd->add_flag("--by-domain", by_domain, "Also compute everything per domain (printed and in the JSON)");
  cmd->add_option("--layers", layers, "Layers for the per-domain tables (default: first, middle, last)")
      ->delimiter(',');
  cmd->callback([] {
    const auto trace = analysis::read_trace(trace_path);
    const auto report = analysis::compute_stats(trace, by_domain, trace_path);
    fmt::print("{}", report.table(layers));
    if (!json_out.empty()) {
      auto j = report.to_json();
      j["trace"]["path"] = trace_path;
      write_file_atomic(json_out, j.dump(2) + "\n");
      fmt::print("wrote {}\n", json_out);
    }
  });
}

}  // namespace moelab::cli
