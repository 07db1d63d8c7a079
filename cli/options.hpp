#pragma once
// The option groups every subcommand shares, defined once so one thing has one name everywhere:
// --model/-m, the prompt (--prompt/-p text or --token-ids ids), --output/-o for a command's main output
// and --json for its machine-readable summary. Engine options are in cli/engines.hpp. Old spellings
// stay accepted for one release through add_deprecated_alias, with a warning naming the new one.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moelab {
class Tokenizer;
}

namespace moelab::cli {

// "Checkpoint folder", shown with its default (the bundled model) unless `required`.
CLI::Option* add_model_option(CLI::App& cmd, std::string& model, bool required = false);

// What to run on: text (tokenized with BOS unless no_bos) or token ids used as given.
struct PromptInput {
  std::string prompt, token_ids;
  bool no_bos = false;
  bool given() const { return !prompt.empty() || !token_ids.empty(); }
  // The ids: token_ids parsed ("1,415,2936"), or the prompt tokenized.
  std::vector<int32_t> tokens(const Tokenizer& tok) const;
};
// --prompt/-p, --token-ids (excluding each other) and --no-bos. `deprecated` lists old spellings this
// subcommand accepted: "--text" (for --prompt) and/or "--tokens" (for --token-ids).
void add_prompt_options(CLI::App& cmd, PromptInput& in, const std::vector<std::string>& deprecated = {});

// --output/-o FILE: the command's main output; `what` says what is written there.
CLI::Option* add_output_option(CLI::App& cmd, std::string& out, const std::string& what);
// --json FILE: a machine-readable summary of what the command printed.
CLI::Option* add_json_option(CLI::App& cmd, std::string& json_out);

// An old option name kept working for one release: hidden from --help, and when used it prints
// "moelab: warning: OLD is deprecated; use NEW (OLD will be removed in the next release)" on stderr
// and hands its value to `set`.
CLI::Option* add_deprecated_alias(CLI::App& cmd, const std::string& old_name, const std::string& new_name,
                                  std::function<void(const std::string&)> set);
// The same for a flag.
CLI::Option* add_deprecated_flag(CLI::App& cmd, const std::string& old_name, const std::string& new_name,
                                 std::function<void()> set);
// The warning itself (also for spellings CLI11 handles as aliases of the new option).
void warn_deprecated(const std::string& old_name, const std::string& new_name);

// --progress auto|bar|lines|none, applied process-wide (core/progress.hpp).
void add_progress_option(CLI::App& cmd);

// --shard-size-mb (quantize, merge): the largest output shard in MiB, about 1 KB (tests write tiny shards) to
// 1 TiB. Checked while parsing, before anything converts it to bytes: a NaN or 1e300 converted to an integer
// is undefined behaviour (it gave 127 one-tensor shards).
constexpr double kMinShardMb = 0.001, kMaxShardMb = 1 << 20;
void add_shard_size_option(CLI::App& cmd, double& mib);
int64_t shard_size_bytes(double mib);  // mib within the range above

// The advice after "out of memory" for the subcommand that ran: only options it has (--stream and a smaller
// --context for the engines; a smaller --batch-size / --max-seq-len and --gradient-checkpointing for
// finetune, ...), "" when it has none of them; a switch the command line already gave is left out.
std::string out_of_memory_advice(const CLI::App& sub);

// For a parse error in `sub`: the option among its names nearest to the unknown `given` ("--promt" ->
// "--prompt"), or "" when none is close (edit distance at most 2, and less than half the name).
std::string nearest_option(const CLI::App& sub, const std::string& given);

}  // namespace moelab::cli
