// moelab generate: sample a continuation of a prompt, printing tokens as they come.
#include <fmt/format.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "cli/token_input.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/generate.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

void register_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt");
  static std::string model, json_out;
  static PromptInput in;
  static bool print_ids = false;
  static int max_new_tokens = 64;
  static SamplingParams sp;
  static EngineOptions eo;
  add_model_option(*cmd, model);
  add_prompt_options(*cmd, in, {"--tokens"});
  cmd->add_flag("--print-ids", print_ids, "Also print the generated token ids on stderr (\"generated ids: 1,2,3\")");
  cmd->add_option("-n,--max-new-tokens", max_new_tokens, "Tokens to generate at most")->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", sp.temperature, "0 = greedy")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", sp.top_k, "Keep the k most likely tokens (0 = all)")->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", sp.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str()
      ->check(CLI::Range(0.0f, 1.0f));
  cmd->add_option("-s,--seed", sp.seed, "Random seed")->capture_default_str();
  add_json_option(*cmd, json_out);
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (!in.given()) throw Error("generate: give --prompt or --token-ids");
    if (model.empty()) model = default_model_dir();
    const auto ck = Checkpoint::open(model, /*show_progress=*/true);
    const Tokenizer tok(ck->tokenizer_path());
    auto engine = make_engine(*ck, eo);
    Sampler sampler(sp);
    const auto ids = in.tokens(tok);
    StreamDecoder stream(tok, ids);
    fmt::print("{}", in.token_ids.empty() ? in.prompt : tok.decode(ids));
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
    if (!json_out.empty()) {
      const nlohmann::json j{{"format", "moelab-generate-v1"},
                             {"engine", engine->name()},
                             {"model", model},
                             {"prompt_ids", ids},
                             {"generated_ids", r.tokens},
                             {"text", tok.decode(r.tokens)},
                             {"prefill_seconds", r.prefill_seconds},
                             {"decode_tokens_per_second", r.decode_tokens_per_second()},
                             {"stopped_at_eos", r.stopped_at_eos},
                             {"stopped_at_context", r.stopped_at_context},
                             {"sampling", {{"temperature", sp.temperature}, {"top_k", sp.top_k}, {"top_p", sp.top_p},
                                           {"seed", sp.seed}}}};
      write_file_atomic(json_out, j.dump(2) + "\n");
    }
  });
}

}  // namespace moelab::cli
