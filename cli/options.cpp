#include "cli/options.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cli/token_input.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

CLI::Option* add_model_option(CLI::App& cmd, std::string& model, bool required) {
  auto* o = cmd.add_option("-m,--model", model,
                           required ? "Checkpoint folder (config.json + safetensors)"
                                    : "Checkpoint folder (config.json + safetensors) [default: the bundled model]");
  if (required) o->required();
  return o;
}

std::vector<int32_t> PromptInput::tokens(const Tokenizer& tok) const {
  return !token_ids.empty() ? parse_token_list(token_ids) : tok.encode(prompt, !no_bos);
}

void add_prompt_options(CLI::App& cmd, PromptInput& in, const std::vector<std::string>& deprecated) {
  auto* p = cmd.add_option("-p,--prompt", in.prompt, "Prompt text (tokenized with BOS unless --no-bos)");
  auto* t = cmd.add_option("--token-ids", in.token_ids, "Prompt as comma-separated token ids, used as given");
  p->excludes(t);
  cmd.add_flag("--no-bos", in.no_bos, "With --prompt: do not prepend BOS");
  for (const auto& old : deprecated) {
    if (old == "--text") add_deprecated_alias(cmd, "--text", "--prompt", [&in](const std::string& v) { in.prompt = v; });
    if (old == "--tokens")
      add_deprecated_alias(cmd, "--tokens", "--token-ids", [&in](const std::string& v) { in.token_ids = v; });
  }
}

CLI::Option* add_output_option(CLI::App& cmd, std::string& out, const std::string& what) {
  return cmd.add_option("-o,--output", out, what);
}

CLI::Option* add_json_option(CLI::App& cmd, std::string& json_out) {
  return cmd.add_option("--json", json_out, "Also write what is printed as JSON to this file");
}

void warn_deprecated(const std::string& old_name, const std::string& new_name) {
  std::fflush(stdout);
  fmt::print(stderr, "moelab: warning: {} is deprecated; use {} ({} will be removed in the next release)\n", old_name,
             new_name, old_name);
}

CLI::Option* add_deprecated_alias(CLI::App& cmd, const std::string& old_name, const std::string& new_name,
                                  std::function<void(const std::string&)> set) {
  auto* o = cmd.add_option_function<std::string>(
      old_name,
      [old_name, new_name, set](const std::string& v) {
        warn_deprecated(old_name, new_name);
        set(v);
      },
      "deprecated: " + new_name);
  o->group("");  // hidden from --help
  return o;
}

CLI::Option* add_deprecated_flag(CLI::App& cmd, const std::string& old_name, const std::string& new_name,
                                 std::function<void()> set) {
  auto* o = cmd.add_flag_callback(
      old_name,
      [old_name, new_name, set] {
        warn_deprecated(old_name, new_name);
        set();
      },
      "deprecated: " + new_name);
  o->group("");
  return o;
}

void add_progress_option(CLI::App& cmd) {
  cmd.add_option_function<std::string>(
         "--progress", [](const std::string& v) { set_progress_mode(parse_progress_mode(v)); },
         "Progress of long work on stderr: auto (a bar on a terminal, a plain line every 10 s when redirected), "
         "bar, lines or none")
      ->check(CLI::IsMember({"auto", "bar", "lines", "none"}))
      ->default_str("auto");
}

void add_shard_size_option(CLI::App& cmd, double& mib) {
  cmd.add_option("--shard-size-mb", mib, "Largest output shard, MiB")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](const std::string& v) -> std::string {
            double x = 0;
            try {
              x = std::stod(v);
            } catch (const std::exception&) {
              return "not a number";
            }
            if (!(x >= kMinShardMb && x <= kMaxShardMb))  // NaN fails both comparisons
              return fmt::format("must be a size in MiB from {} to {}, got {}", kMinShardMb, int64_t(kMaxShardMb), v);
            return "";
          },
          "MiB", "shard size"));
}

int64_t shard_size_bytes(double mib) {
  if (!(mib >= kMinShardMb && mib <= kMaxShardMb))
    throw Error(fmt::format("--shard-size-mb must be a size in MiB from {} to {}, got {}", kMinShardMb,
                            int64_t(kMaxShardMb), mib));
  return int64_t(mib * double(1 << 20));
}

std::string out_of_memory_advice(const CLI::App& sub) {
  static const std::pair<const char*, const char*> kAdvice[] = {
      {"--stream", "--stream"},
      {"--context", "a smaller --context"},
      {"--batch-size", "a smaller --batch-size"},
      {"--max-seq-len", "a smaller --max-seq-len"},
      {"--gradient-checkpointing", "--gradient-checkpointing"},
  };
  std::vector<std::string> found;
  for (const auto& [option, advice] : kAdvice) {
    const CLI::Option* o = sub.get_option_no_throw(option);
    if (o == nullptr) continue;
    // A switch already given is no advice: finetune with --gradient-checkpointing said "try ... or
    // --gradient-checkpointing".
    if (std::string(advice) == option && o->count() > 0) continue;
    found.push_back(advice);
  }
  if (found.empty()) return "";
  std::string text = "try " + found[0];
  for (size_t i = 1; i < found.size(); ++i) text += (i + 1 == found.size() ? ", or " : ", ") + found[i];
  return text;
}

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string nearest_option(const CLI::App& sub, const std::string& given) {
  const std::string name = given.substr(0, given.find('='));
  std::string best;
  size_t best_d = 3;
  for (const CLI::Option* o : sub.get_options()) {
    if (o->get_group().empty()) continue;  // deprecated spellings are not suggested
    for (const auto& l : o->get_lnames()) {
      const std::string cand = "--" + l;
      const size_t d = edit_distance(name, cand);
      if (d < best_d && 2 * d < cand.size() - 2) best = cand, best_d = d;
    }
  }
  return best;
}

}  // namespace moelab::cli
