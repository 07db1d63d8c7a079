// moelab eval: one task on one engine, scored as lm-evaluation-harness scores it, with Mistral AI's
// reported score beside ours. Writes the harness's results JSON (--out) and per-sample JSONL
// (--log-samples, next to --out).
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/eval_run.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"
#include "evals/docs.hpp"
#include "evals/results_json.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"

namespace moelab::cli {

void register_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Score a task like lm-evaluation-harness, beside Mixtral's reported score");
  static std::string model, task, data, fewshot_data, out, reported, convert_to;
  static int shots = -1, limit = 0, repeats = 1;
  static uint64_t seed = 1234;
  static float temperature = 0;
  static bool log_samples = false;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  cmd->add_option("--task", task, "hellaswag, arc_easy, arc_challenge, mmlu, winogrande, piqa, gsm8k, wikitext, "
                                  "or multiple_choice / generate / rolling")->required();
  cmd->add_option("--data", data, "Documents: normalized JSONL or the task's public form (.bz2/.gz read too)")->required();
  cmd->add_option("--fewshot-data", fewshot_data, "Few-shot split (default: --data, excluding the doc itself)");
  auto* shots_opt = cmd->add_option("--shots", shots, "Few-shot examples (default: the task's)");
  cmd->add_option("--limit", limit, "Only the first N documents (0: all)");
  cmd->add_option("--seed", seed, "Few-shot sampling seed (harness default 1234)");
  cmd->add_option("--repeats", repeats, "Generation: samples per doc for maj@k (with --temperature > 0)");
  cmd->add_option("--temperature", temperature, "Generation: 0 = greedy");
  cmd->add_option("--out", out, "Results JSON (harness layout)");
  cmd->add_flag("--log-samples", log_samples, "Also write per-sample JSONL next to --out");
  cmd->add_option("--reported", reported, "Reported scores JSON (default: evals/reported/mixtral-8x7b.json)");
  cmd->add_option("--convert-to", convert_to,
                  "Only convert --data (public form) to the normalized JSONL in this file, then stop (no model)");
  add_engine_options(*cmd, eo);
  cmd->callback([shots_opt] {
    // Counts are checked here (one "moelab: error:" line) rather than by CLI11 validators.
    if (shots_opt->count() > 0 && shots < 0) throw Error(fmt::format("eval: --shots must be 0 or more (got {})", shots));
    if (limit < 0) throw Error(fmt::format("eval: --limit must be 0 (all documents) or more (got {})", limit));
    if (repeats < 1) throw Error(fmt::format("eval: --repeats must be 1 or more (got {})", repeats));
    if (!std::isfinite(temperature) || temperature < 0)
      throw Error(fmt::format("eval: --temperature must be a finite number >= 0 (got {})", temperature));
    if (model.empty()) model = default_model_dir();
    if (log_samples && out.empty()) throw Error("eval: --log-samples needs --out");
    if (!convert_to.empty()) {
      const evals::TaskSpec spec = evals::task_spec(task);
      auto docs = evals::read_docs(task, spec.type, data);
      if (limit > 0 && size_t(limit) < docs.size()) docs.resize(size_t(limit));
      std::string lines;
      for (const auto& d : docs) lines += evals::to_normalized(d, spec.type).dump() + "\n";
      write_file_atomic(convert_to, lines);
      fmt::print("wrote {} ({} documents, normalized {} form)\n", convert_to, docs.size(), task);
      return;
    }
    // Documents are read and checked before the model loads: bad data fails in seconds.
    const auto inputs = read_eval_inputs(EvalRequest{.task = task, .data = data, .fewshot_data = fewshot_data,
                                                     .reported = reported, .shots = shots, .limit = limit,
                                                     .seed = seed, .repeats = repeats, .temperature = temperature});
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const Tokenizer tok(ck->tokenizer_path());
    auto engine = make_engine(*ck, eo);
    const auto o = run_eval(*engine, tok, model, inputs);
    fmt::print("{}", o.table);
    report_engine_counters(*engine);
    if (!out.empty()) {
      write_file_atomic(out, o.results_json.dump(2) + "\n");
      fmt::print("wrote {}\n", out);
      if (log_samples) {
        std::string lines;
        for (const auto& s : o.result.samples) lines += s.dump() + "\n";
        const std::string path = out + ".samples_" + task + ".jsonl";
        write_file_atomic(path, lines);
        fmt::print("wrote {}\n", path);
      }
    }
  });
}

}  // namespace moelab::cli
