// moelab generate: sample a continuation of a prompt, printing tokens as they come.
#include <fmt/format.h>

#include <cstdio>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/token_input.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/generate.hpp"
#include "core/progress.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

void register_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt");
  static std::string model, prompt, tokens_text;
  static bool print_ids = false;
  static int max_new_tokens = 64;
  static SamplingParams sp;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  auto* prompt_opt = cmd->add_option("--prompt", prompt, "Prompt text (tokenized with BOS)");
  auto* tok_opt = cmd->add_option("--tokens", tokens_text, "Prompt as comma-separated token ids, used as given");
  prompt_opt->excludes(tok_opt);
  cmd->add_flag("--print-ids", print_ids, "Also print the generated token ids on stderr (\"generated ids: 1,2,3\")");
  cmd->add_option("--max-new-tokens", max_new_tokens, "Tokens to generate at most")->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", sp.temperature, "0 = greedy")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", sp.top_k, "Keep the k most likely tokens (0 = all)")->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", sp.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str()
      ->check(CLI::Range(0.0f, 1.0f));
  cmd->add_option("--seed", sp.seed, "Random seed")->capture_default_str();
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (prompt.empty() && tokens_text.empty()) throw Error("generate: give --prompt or --tokens");
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const Tokenizer tok(ck->tokenizer_path());
    auto engine = make_engine(*ck, eo);
    Sampler sampler(sp);
    const auto ids = tokens_text.empty() ? tok.encode(prompt, /*add_bos=*/true) : parse_token_list(tokens_text);
    StreamDecoder stream(tok, ids);
    fmt::print("{}", tokens_text.empty() ? prompt : tok.decode(ids));
    std::fflush(stdout);
    const auto r = generate(*engine, ids, max_new_tokens, sampler, tok.eos_id(), [&](int32_t id) {
      fmt::print("{}", stream.push(id));
      std::fflush(stdout);
    });
    fmt::print("{}\n", stream.flush());
    fmt::print(stderr, "[{}] prompt {} tokens in {:.3f}s ({:.1f} tok/s); generated {} tokens, decode {:.1f} tok/s{}\n",
               engine->name(), ids.size(), r.prefill_seconds, double(ids.size()) / std::max(r.prefill_seconds, 1e-9),
               r.tokens.size(), r.decode_tokens_per_second(), r.stopped_at_eos ? " (stopped at EOS)" : "");
    if (r.stopped_at_context)
      fmt::print(stderr, "note: stopped after {} of the {} tokens asked for: the prompt ({} tokens) and the output "
                         "filled the context of {} tokens (see --context)\n",
                 r.tokens.size(), max_new_tokens, ids.size(), r.context);
    if (print_ids) {
      std::string list;
      for (const int32_t id : r.tokens) list += (list.empty() ? "" : ",") + std::to_string(id);
      fmt::print(stderr, "generated ids: {}\n", list);
    }
    report_engine_counters(*engine);
  });
}

}  // namespace moelab::cli
