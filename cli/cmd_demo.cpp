// moelab demo: the main job on the bundled default model, in one run: generate a continuation with the
// reference engine and with cpu-nf4, diff the two layer by layer, show which experts each layer routed
// the text to, and write the outputs (JSON report, diff JSON) into one folder.
#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "analysis/diff.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "core/checkpoint.hpp"
#include "core/generate.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {
namespace {

// Counts, per layer, how often each expert was chosen (any rank) over all tokens seen.
class RoutingCounter : public Probe {
 public:
  explicit RoutingCounter(const ModelConfig& c) : counts(size_t(c.num_layers), std::vector<int64_t>(size_t(c.num_experts))) {}
  std::vector<std::vector<int64_t>> counts;
  void on_layer(const LayerObservation& o) override {
    for (Eigen::Index t = 0; t < o.experts->rows(); ++t)
      for (Eigen::Index j = 0; j < o.experts->cols(); ++j) ++counts[size_t(o.layer)][size_t((*o.experts)(t, j))];
  }
};

}  // namespace

void register_demo(CLI::App& app) {
  auto* cmd = app.add_subcommand("demo", "Run the main job on the bundled default model and write a report");
  static std::string model, out = "moelab-demo";
  static std::string prompt = "The mixture of experts";
  static int max_new_tokens = 32;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  cmd->add_option("--out", out, "Output folder")->capture_default_str();
  cmd->add_option("--prompt", prompt, "Prompt")->capture_default_str();
  cmd->add_option("--max-new-tokens", max_new_tokens, "Tokens to generate")->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([] {
    if (model.empty()) model = default_model_dir();
    std::filesystem::create_directories(out);
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const auto& c = ck->config();
    fmt::print("== model {}\n   {} layers, {} experts (top-{}), {} parameters, {} active per token\n", model,
               c.num_layers, c.num_experts, c.top_k, c.total_params(), c.active_params());

    const Tokenizer tok(ck->tokenizer_path());
    const auto ids = tok.encode(prompt);
    auto engine = make_engine(*ck, EngineOptions{});
    auto nf4 = make_engine(*ck, EngineOptions{.engine = "cpu-nf4"});
    GenerationResult r;
    nlohmann::json generations = nlohmann::json::object();
    for (Engine* e : {engine.get(), nf4.get()}) {
      Sampler greedy(SamplingParams{});
      StreamDecoder stream(tok, ids);
      fmt::print("\n== generate (engine {}, greedy)\n{}", e->name(), prompt);
      const auto g = generate(*e, ids, max_new_tokens, greedy, tok.eos_id(), [&](int32_t id) {
        fmt::print("{}", stream.push(id));
        std::fflush(stdout);
      });
      fmt::print("{}\n   {} tokens, decode {:.1f} tokens/s\n", stream.flush(), g.tokens.size(),
                 g.decode_tokens_per_second());
      generations[e->name()] = {{"tokens", g.tokens},
                                {"text", tok.decode(g.tokens)},
                                {"decode_tokens_per_second", g.decode_tokens_per_second()}};
      if (e == engine.get()) r = g;
    }

    // Route the whole text again in one prefill and count expert choices per layer.
    std::vector<int32_t> all = ids;
    all.insert(all.end(), r.tokens.begin(), r.tokens.end());
    engine->reset();
    RoutingCounter routing(c);
    engine->forward(all, &routing);
    fmt::print("\n== expert load over {} tokens (share of the {} choices per layer)\n   layer", all.size(),
               all.size() * size_t(c.top_k));
    for (int e = 0; e < c.num_experts; ++e) fmt::print(" {:>6}", fmt::format("e{}", e));
    fmt::print("\n");
    nlohmann::json load = nlohmann::json::array();
    for (int l = 0; l < c.num_layers; ++l) {
      fmt::print("   {:>5}", l);
      std::vector<double> share;
      for (auto n : routing.counts[size_t(l)]) {
        share.push_back(double(n) / double(all.size() * size_t(c.top_k)));
        fmt::print(" {:>5.1f}%", 100 * share.back());
      }
      fmt::print("\n");
      load.push_back(share);
    }

    // The NF4 engine against the reference, layer by layer, on the reference's text.
    const auto diff = analysis::diff_records(analysis::ForwardRecord::run(*engine, all),
                                             analysis::ForwardRecord::run(*nf4, all), "ref", "cpu-nf4");
    fmt::print("\n== {}", diff.table());
    const auto diff_path = (std::filesystem::path(out) / "diff-ref-vs-cpu-nf4.json").string();
    write_file_atomic(diff_path, diff.to_json().dump(2) + "\n");

    nlohmann::json report = {
        {"model", model},
        {"engine", engine->name()},
        {"prompt", prompt},
        {"prompt_tokens", ids},
        {"generations", generations},
        {"expert_load_share", load},
        {"diff", diff_path},
    };
    const auto report_path = (std::filesystem::path(out) / "report.json").string();
    write_file_atomic(report_path, report.dump(2) + "\n");
    fmt::print("\n== wrote {}\n", report_path);
  });
}

}  // namespace moelab::cli
