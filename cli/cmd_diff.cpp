// moelab diff: two engines (or forward dumps) over the same tokens, layer by layer.
#include <fmt/format.h>

#include "analysis/diff.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
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
  static std::string model, a = "ref", b, tokens_text, text, json_out;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  cmd->add_option("--a", a, "Reference side: ref, ref-f64 or dump:FILE")->capture_default_str();
  cmd->add_option("--b", b, "Side under test: ref, ref-f64 or dump:FILE")->required();
  auto* tok_opt = cmd->add_option("--tokens", tokens_text, "Comma-separated token ids");
  cmd->add_option("--text", text, "Text, tokenized with BOS")->excludes(tok_opt);
  cmd->add_option("--json", json_out, "Also write the report as JSON");
  cmd->add_flag("--stream", eo.stream, "Stream weights (engine sides)");
  cmd->add_option("--context", eo.context, "Context length for engine sides");
  cmd->callback([] {
    const bool need_model = !is_dump(a) || !is_dump(b);
    std::unique_ptr<Checkpoint> ck;
    if (need_model) ck = Checkpoint::open(model.empty() ? default_model_dir() : model, stderr_is_terminal());
    std::vector<int32_t> tokens;
    if (!tokens_text.empty()) tokens = parse_token_list(tokens_text);
    else if (!text.empty()) tokens = Tokenizer(ck ? ck->tokenizer_path() : default_model_dir() + "/tokenizer.model").encode(text);
    else if (is_dump(a)) tokens = analysis::ForwardRecord::from_dump(a.substr(5)).tokens;
    else if (is_dump(b)) tokens = analysis::ForwardRecord::from_dump(b.substr(5)).tokens;
    else throw Error("diff: give --tokens or --text (or a dump side to take its tokens from)");
    const auto ra = run_side(a, ck.get(), tokens, eo);
    const auto rb = run_side(b, ck.get(), tokens, eo);
    const auto report = analysis::diff_records(ra, rb, a, b);
    fmt::print("{}", report.table());
    if (!json_out.empty()) {
      write_file_atomic(json_out, report.to_json().dump(2) + "\n");
      fmt::print("wrote {}\n", json_out);
    }
  });
}

}  // namespace moelab::cli
