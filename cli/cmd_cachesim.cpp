// moelab cachesim: routing traces replayed through per-layer expert caches (analysis/cachesim.hpp), with
// Belady's optimum as the bound and a decode-time model (analysis/cachesim_time.hpp); docs/cachesim.md.
#include <fmt/format.h>

#include "analysis/cachesim.hpp"
#include "analysis/cachesim_figure.hpp"
#include "analysis/cachesim_time.hpp"
#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "core/error.hpp"
#include "core/model_presets.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"

namespace moelab::cli {
namespace {

struct CacheSimArgs {
  std::vector<std::string> traces;
  std::string cache_sizes = "1-E", policies = "all", calibrate = "10%", out, json_out, svg_out;
  int batch = 1, lfu_aging = 64, context = 4096;
  int64_t belady_window = 16384;
  std::string link = "pcie4-x16", time_model = "mixtral-8x7b";
  double gpu_bandwidth = 900;
  bool overlap = true;
};

std::string policies_help() {
  std::string s = "Policies, comma-separated, or all (next-layer-gate only for traces with prefetch guesses):";
  for (auto p : analysis::cachesim::all_policies())
    s += fmt::format("\n  {}: {}", analysis::cachesim::policy_name(p), analysis::cachesim::policy_description(p));
  return s;
}

std::string link_help() {
  std::string s = "Host->GPU link of the time model: a preset or a bandwidth in GB/s (1e9 bytes/s). Effective figures:";
  for (const auto& p : analysis::link_presets()) s += fmt::format("\n  {}: {} GB/s ({})", p.name, p.gb_per_s, p.source);
  return s;
}

analysis::TimeModelParams time_params(const CacheSimArgs& a, const analysis::CacheSimReport& sim) {
  analysis::TimeModelParams p;
  if (a.time_model == "trace") {
    if (!sim.model_config.is_object())
      throw Error(fmt::format("{}: --time-model trace: the trace records no model config", sim.traces.front()));
    p.model = ModelConfig::from_json_text(sim.model_config.dump(), sim.traces.front() + " (model_config)");
    p.model_name = "the trace's model";
  } else {
    p.model = model_preset(a.time_model);
    p.model_name = a.time_model;
  }
  p.gpu_gb_per_s = a.gpu_bandwidth;
  p.link = analysis::parse_link(a.link);
  p.overlap = a.overlap;
  p.context = a.context;
  return p;
}

void run(const CacheSimArgs& a) {
  analysis::CacheSimOptions o;
  if (a.cache_sizes != "1-E") o.cache_sizes = analysis::parse_cache_sizes(a.cache_sizes);
  if (a.policies != "all") o.policies = analysis::parse_policies(a.policies);  // all: what the traces allow
  o.batch = a.batch;
  o.calibrate = analysis::parse_calibration(a.calibrate);
  o.lfu_aging_steps = a.lfu_aging;
  o.belady_window = a.belady_window;
  o.progress = true;
  const analysis::LinkPreset link = analysis::parse_link(a.link);  // option mistakes before the long pass
  (void)link;
  const auto sim = analysis::simulate_cache(a.traces, o);
  const auto time = analysis::predict_decode(sim, time_params(a, sim));
  fmt::print("{}", sim.table());
  fmt::print("\n{}", sim.layer_table(sim.options.cache_sizes[sim.options.cache_sizes.size() / 2]));
  fmt::print("{}", time.table());
  auto j = sim.to_json();
  j["time_model"] = time.to_json();
  if (!a.out.empty()) {
    write_file_atomic(a.out, j.dump(2) + "\n");
    fmt::print("wrote {}\n", a.out);
  }
  if (!a.json_out.empty()) {
    nlohmann::json summary = j;  // what was printed: the overall figures, without the per-layer arrays
    for (auto& r : summary["results"]) r.erase("layers");
    write_file_atomic(a.json_out, summary.dump(2) + "\n");
    fmt::print("wrote {}\n", a.json_out);
  }
  if (!a.svg_out.empty()) {
    write_file_atomic(a.svg_out, analysis::cache_hit_rate_svg(sim));
    fmt::print("wrote {}\n", a.svg_out);
  }
}

}  // namespace

void register_cachesim(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "cachesim",
      "Expert-cache simulation from routing traces: hit rates of cache policies per layer and cache size, Belady's "
      "optimum as the bound, bytes moved per token, and a decode-time model (docs/cachesim.md)");
  static CacheSimArgs a;
  cmd->add_option("trace", a.traces, "Trace files written by `moelab trace` (replayed one after another)")->required();
  cmd->add_option("--cache-sizes", a.cache_sizes, "Experts per layer on the GPU: a range and/or list (1-8, 2,4,8); 1-E: every size")
      ->capture_default_str();
  cmd->add_option("--policy", a.policies, policies_help())->capture_default_str();
  cmd->add_option("--batch", a.batch, "Sequences decoded together: each step needs, per layer, the union of their experts")
      ->capture_default_str()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--calibrate", a.calibrate,
                  "Calibration part: the first N tokens, a fraction (0.1) or a percentage (10%) of the trace. static "
                  "keeps the experts it chose most; every policy warms up on it and is scored on the rest")
      ->capture_default_str();
  cmd->add_option("--lfu-aging", a.lfu_aging, "lfu-aged: halve every count every this many steps")
      ->capture_default_str()->check(CLI::Range(1, 1 << 30));
  cmd->add_option("--belady-window", a.belady_window,
                  "belady: steps of look-ahead (memory: about window x layers x min(E, batch x top-k) x 8 bytes); ties "
                  "beyond it are counted in the output")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 26));
  cmd->add_option("--gpu-bandwidth", a.gpu_bandwidth,
                  "Time model: GPU memory bandwidth in GB/s (default: about 90% of an RTX 4090's 1008 GB/s, an "
                  "assumption; pass your GPU's measured figure)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--link", a.link, link_help())->capture_default_str();
  cmd->add_flag("!--no-overlap", a.overlap,
                "Time model: copies do not overlap compute (default: they do; a demand copy hides behind the layer's "
                "other experts, a prefetch behind the previous layer)");
  cmd->add_option("--time-model", a.time_model,
                  "Time model: the shapes predicted for, a preset (mixtral-8x7b) or trace (the trace's own model)")
      ->capture_default_str();
  cmd->add_option("--context", a.context, "Time model: tokens of KV cache in the GPU memory figure")
      ->capture_default_str()->check(CLI::Range(1, 1 << 24));
  add_output_option(*cmd, a.out, "Write the whole report as JSON (per layer; layout: docs/cachesim.md)");
  add_json_option(*cmd, a.json_out);
  cmd->add_option("--svg", a.svg_out, "Draw hit rate against cache size per policy, with Belady's bound, as SVG");
  add_progress_option(*cmd);
  cmd->footer(
      "\nTime model (docs/cachesim.md): decode is taken as memory-bound; per step and layer, attention and router bytes "
      "and the used experts' NF4 bytes are read at --gpu-bandwidth, each miss copies one expert over --link, copies "
      "overlap compute unless --no-overlap, and the lm_head is read once a step; the shapes are --time-model's as "
      "cuda-nf4 holds them. Every assumption is printed with the results and written in the JSON.");
  cmd->callback([] { run(a); });
}

}  // namespace moelab::cli
