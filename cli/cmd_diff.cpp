// moelab diff: two engines (or forward dumps) over the same tokens, layer by layer.
#include <fmt/format.h>

#include <tuple>

#include "analysis/diff.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "cli/token_input.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {
namespace {

bool is_dump(const std::string& side) { return side.rfind("dump:", 0) == 0; }

// A side is an engine name (ref, ref-f64) or dump:FILE.
analysis::ForwardRecord run_side(const std::string& side, const Checkpoint* ck, const std::vector<int32_t>& tokens,
                                 EngineOptions eo) {
  if (is_dump(side)) {
    auto r = analysis::ForwardRecord::from_dump(side.substr(5));
    if (!tokens.empty() && r.tokens != tokens)
      throw Error(fmt::format("{}: the dump's tokens differ from the tokens given", side.substr(5)));
    return r;
  }
  eo.engine = side;
  if (side == "ref-f64") {
    eo.engine = "ref";
    eo.precision = "f64";
  }
  auto engine = make_engine(*ck, eo);
  return analysis::ForwardRecord::run(*engine, tokens);
}

}  // namespace

void register_diff(CLI::App& app) {
  auto* cmd = app.add_subcommand("diff", "Compare two engines (or forward dumps) layer by layer");
  static std::string model, a = "ref", b, json_out;
  static PromptInput in;
  static std::vector<std::string> a_opts, b_opts;
  static std::string a_adapter, b_adapter;
  static EngineOptions eo;
  add_model_option(*cmd, model);
  cmd->add_option("--a", a, "Reference side: an engine (ref, ref-f64, cpu-nf4, cuda-nf4) or dump:FILE")
      ->capture_default_str();
  cmd->add_option("--b", b, "Side under test: an engine (ref, ref-f64, cpu-nf4, cuda-nf4) or dump:FILE")->required();
  add_prompt_options(*cmd, in, {"--text", "--tokens"});
  add_json_option(*cmd, json_out);
  // The engine options below apply to both engine sides; --a-opt / --b-opt change one side.
  cmd->add_option("--a-opt", a_opts, "One engine option for side a only, KEY=VALUE (e.g. activations=fp32); repeatable");
  cmd->add_option("--b-opt", b_opts, "One engine option for side b only, KEY=VALUE (e.g. kernels=scalar); repeatable");
  cmd->add_option("--a-adapter", a_adapter, "A LoRA adapter folder for side a only (as --a-opt adapter=DIR)");
  cmd->add_option("--b-adapter", b_adapter,
                  "A LoRA adapter folder for side b only (as --b-opt adapter=DIR): the model with and without its adapter");
  add_engine_options(*cmd, eo, /*choose_engine=*/false);
  cmd->callback([] {
    const bool need_model = !is_dump(a) || !is_dump(b);
    std::unique_ptr<Checkpoint> ck;
    if (need_model) ck = Checkpoint::open(model.empty() ? default_model_dir() : model, /*show_progress=*/true);
    std::vector<int32_t> tokens;
    if (!in.token_ids.empty()) tokens = parse_token_list(in.token_ids);
    else if (!in.prompt.empty()) tokens = in.tokens(Tokenizer(ck ? ck->tokenizer_path() : default_model_dir() + "/tokenizer.model"));
    else if (is_dump(a)) tokens = analysis::ForwardRecord::from_dump(a.substr(5)).tokens;
    else if (is_dump(b)) tokens = analysis::ForwardRecord::from_dump(b.substr(5)).tokens;
    else throw Error("diff: give --prompt or --token-ids (or a dump side to take its tokens from)");
    EngineOptions ea = eo, eb = eo;
    for (const auto& kv : a_opts) apply_engine_override(ea, kv);
    for (const auto& kv : b_opts) apply_engine_override(eb, kv);
    for (const auto& [side, adapter, o] : {std::tuple{&a, &a_adapter, &ea}, std::tuple{&b, &b_adapter, &eb}}) {
      if (adapter->empty()) continue;
      if (is_dump(*side)) throw Error(fmt::format("diff: {} is a dump; an adapter applies to an engine side", *side));
      o->adapter = *adapter;
    }
    const auto ra = run_side(a, ck.get(), tokens, ea);
    const auto rb = run_side(b, ck.get(), tokens, eb);
    // A side with an adapter the other lacks is labelled so ("ref+adapter").
    const auto label = [&](const std::string& side, const EngineOptions& mine, const EngineOptions& other) {
      return !mine.adapter.empty() && mine.adapter != other.adapter ? side + "+adapter" : side;
    };
    const auto report = analysis::diff_records(ra, rb, label(a, ea, eb), label(b, eb, ea));
    fmt::print("{}", report.table());
    if (!json_out.empty()) {
      write_file_atomic(json_out, report.to_json().dump(2) + "\n");
      fmt::print("wrote {}\n", json_out);
    }
  });
}

}  // namespace moelab::cli
