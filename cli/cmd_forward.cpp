// moelab forward: one forward pass over given tokens, dumping logits and every layer's hidden state,
// router logits, chosen experts and gates to a safetensors file (the contract other tools read).
#include <fmt/format.h>

#include "analysis/forward_record.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "cli/token_input.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

void register_forward(CLI::App& app) {
  auto* cmd = app.add_subcommand("forward", "Run one forward pass and dump logits and per-layer tensors");
  static std::string model, dump;
  static PromptInput in;
  static EngineOptions eo;
  add_model_option(*cmd, model);
  add_prompt_options(*cmd, in, {"--text", "--tokens"});
  add_output_option(*cmd, dump, "Output safetensors file: logits and every layer's tensors");
  add_deprecated_alias(*cmd, "--dump", "--output", [](const std::string& v) { dump = v; });
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (!in.given()) throw Error("forward: give --prompt or --token-ids");
    if (dump.empty()) throw Error("forward: give --output FILE.safetensors");
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, /*show_progress=*/true);
    const auto ids = !in.token_ids.empty() ? parse_token_list(in.token_ids) : in.tokens(Tokenizer(ck->tokenizer_path()));
    auto engine = make_engine(*ck, eo);
    const auto record = analysis::ForwardRecord::run(*engine, ids);
    const auto tensors = record.to_tensors();
    write_safetensors(dump, tensors, {{"engine", engine->name()}, {"model", model}, {"format", "moelab-forward-dump-v1"}});
    fmt::print("wrote {} ({} tokens, {} layers, {} tensors)\n", dump, ids.size(), record.layers.size(), tensors.size());
  });
}

}  // namespace moelab::cli
