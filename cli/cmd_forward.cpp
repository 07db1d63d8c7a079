// moelab forward: one forward pass over given tokens, dumping logits and every layer's hidden state,
// router logits, chosen experts and gates to a safetensors file (the contract other tools read).
#include <fmt/format.h>

#include "analysis/forward_record.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/token_input.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

void register_forward(CLI::App& app) {
  auto* cmd = app.add_subcommand("forward", "Run one forward pass and dump logits and per-layer tensors");
  static std::string model, tokens_text, text, dump;
  static bool no_bos = false;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  auto* tok_opt = cmd->add_option("--tokens", tokens_text, "Comma-separated token ids, used as given");
  auto* text_opt = cmd->add_option("--text", text, "Text, tokenized with BOS");
  tok_opt->excludes(text_opt);
  cmd->add_flag("--no-bos", no_bos, "With --text: do not prepend BOS");
  cmd->add_option("--dump", dump, "Output safetensors file")->required();
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (tokens_text.empty() && text.empty()) throw Error("forward: give --tokens or --text");
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const auto ids = !tokens_text.empty() ? parse_token_list(tokens_text)
                                          : Tokenizer(ck->tokenizer_path()).encode(text, !no_bos);
    auto engine = make_engine(*ck, eo);
    const auto record = analysis::ForwardRecord::run(*engine, ids);
    const auto tensors = record.to_tensors();
    write_safetensors(dump, tensors, {{"engine", engine->name()}, {"model", model}, {"format", "moelab-forward-dump-v1"}});
    fmt::print("wrote {} ({} tokens, {} layers, {} tensors)\n", dump, ids.size(), record.layers.size(), tensors.size());
  });
}

}  // namespace moelab::cli
