// moelab eval: tasks on one engine, scored as lm-evaluation-harness scores them, with Mistral AI's
// reported scores beside ours. Writes the harness's results JSON (--output, one file for every task) and
// per-sample JSONL (--log-samples: samples_<task>_<timestamp>.jsonl beside --output, lm_eval's names).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "cli/eval_run.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"
#include "evals/docs.hpp"
#include "evals/lm_eval_samples.hpp"
#include "evals/python_format.hpp"
#include "evals/results_json.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"

namespace moelab::cli {

namespace {

// lm_eval's --limit: a count, or below 1 a fraction of the documents.
void parse_limit(const std::string& text, EvalRequest& q) {
  double v = 0;
  if (!CLI::detail::lexical_cast(text, v) || !std::isfinite(v) || v < 0)
    throw Error(fmt::format("eval: --limit must be a count of documents (0: all) or a fraction below 1, got '{}'", text));
  if (v > 0 && v < 1) {
    q.limit_fraction = v;
  } else {
    if (v != std::floor(v) || v > 1e9)
      throw Error(fmt::format("eval: --limit {} is neither a whole count nor a fraction below 1", text));
    q.limit = int(v);
  }
}

// The harness's date_id in output names: datetime.now().isoformat() with ':' made '-'
// (2024-05-01T12-34-56.123456; isoformat leaves out the fraction when it is zero).
std::string output_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  localtime_r(&t, &tm);
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  return fmt::format("{:04}-{:02}-{:02}T{:02}-{:02}-{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                     tm.tm_min, tm.tm_sec) +
         (us ? fmt::format(".{:06}", us) : std::string());
}

// Where results and samples go. A path ending in ".json" is the results file itself, samples beside it
// (lm_eval would write <stem>_<date>.json there; ours keeps the name given). Anything else is a folder, laid
// out as lm_eval lays out --output_path DIR: DIR/<model_name_sanitized>/results_<date>.json and
// samples_<task>_<date>.jsonl beside it.
struct OutputPaths {
  std::filesystem::path results, samples_dir;
};
OutputPaths output_paths(const std::string& out, const std::string& model, const std::string& stamp) {
  namespace fs = std::filesystem;
  const fs::path p(out);
  if (p.extension() == ".json") return {p, p.parent_path()};
  std::error_code ec;
  if (fs::exists(p, ec) && !fs::is_directory(p, ec))
    throw Error(fmt::format("{}: --output is an existing file but not .json: give a results file ending in .json "
                            "or a folder", out));
  const fs::path dir = p / evals::sanitize_model_name(model);
  return {dir / ("results_" + stamp + ".json"), dir};
}

}  // namespace

void register_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Score tasks like lm-evaluation-harness, beside Mixtral's reported scores");
  static std::string model, out, reported, convert_to, limit_text = "0";
  static std::vector<std::string> tasks, data, fewshot_data;
  static int shots = -1, repeats = 1;
  static uint64_t seed = 1234;
  static float temperature = 0;
  static bool log_samples = false;
  static EngineOptions eo;
  add_model_option(*cmd, model);
  cmd->add_option("--tasks", tasks, "Tasks, comma-separated: " + fmt::format("{}", fmt::join(evals::task_names(), ", ")))->delimiter(',');
  add_deprecated_alias(*cmd, "--task", "--tasks", [](const std::string& v) { tasks.push_back(v); });
  cmd->add_option("--data", data, "Documents of each task, in --tasks order (repeat --data): normalized JSONL or the "
                                  "task's public form (.bz2/.gz read too)");
  cmd->add_option("--fewshot-data", fewshot_data, "Few-shot split of each task, in --tasks order: a file of the task's "
                  "records, or a sparse slice (docs at their indices). Default: gsm8k the bundled slice of its train "
                  "split (the 5-shot draws of the first 100 test docs, seed 1234); other tasks --data, excluding the "
                  "doc itself");
  cmd->add_option("--num-fewshot,--num_fewshot", shots, "Few-shot examples (-1: each task's default)")
      ->capture_default_str();
  add_deprecated_alias(*cmd, "--shots", "--num-fewshot", [](const std::string& v) {
    if (!CLI::detail::lexical_cast(v, shots)) throw CLI::ValidationError("--shots", "'" + v + "' is not a count");
  });
  cmd->add_option("--limit", limit_text, "Only the first N documents of each task, or (below 1) that fraction of "
                                         "them, rounded up (0: all)")
      ->capture_default_str();
  cmd->add_option("--seed", seed, "Few-shot sampling seed (the harness's default)")->capture_default_str();
  cmd->add_option("--repeats", repeats, "Generation: samples per doc for maj@k (with --temperature > 0)")
      ->capture_default_str();
  cmd->add_option("--temperature", temperature, "Generation: 0 = greedy")->capture_default_str();
  cmd->add_option("-o,--output,--output_path", out, "Results (lm-evaluation-harness layout, one document for all tasks): "
                                                   "FILE.json, or a folder: FOLDER/<model>/results_<date>.json as lm_eval");
  add_deprecated_alias(*cmd, "--out", "--output", [](const std::string& v) { out = v; });
  cmd->add_flag("--log-samples,--log_samples", log_samples,
                "Also write per-sample JSONL, samples_<task>_<date>.jsonl beside the results (lm_eval's names and records)");
  cmd->add_option("--reported", reported, "Reported scores JSON (default: evals/reported/mixtral-8x7b.json)");
  cmd->add_option("--convert-to", convert_to,
                  "Only convert --data (public form, one task) to the normalized JSONL in this file, then stop (no model)");
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    // Counts are checked here (one "moelab: error:" line) rather than by CLI11 validators.
    EvalRequest base;
    base.adapter = eo.adapter;
    parse_limit(limit_text, base);
    if (shots < -1) throw Error(fmt::format("eval: --num-fewshot must be 0 or more, or -1 for each task's default (got {})", shots));
    if (repeats < 1) throw Error(fmt::format("eval: --repeats must be 1 or more (got {})", repeats));
    if (!std::isfinite(temperature) || temperature < 0)
      throw Error(fmt::format("eval: --temperature must be a finite number >= 0 (got {})", temperature));
    if (tasks.empty()) throw Error("eval: give --tasks (e.g. --tasks hellaswag)");
    if (data.size() != tasks.size())
      throw Error(fmt::format("eval: {} tasks need {} --data files, in the same order (got {})", tasks.size(),
                              tasks.size(), data.size()));
    if (!fewshot_data.empty() && fewshot_data.size() != tasks.size())
      throw Error(fmt::format("eval: give one --fewshot-data per task ({}) or none (got {})", tasks.size(),
                              fewshot_data.size()));
    if (model.empty()) model = default_model_dir();
    if (log_samples && out.empty()) throw Error("eval: --log-samples needs --output");
    if (!convert_to.empty()) {
      if (tasks.size() != 1) throw Error("eval: --convert-to converts one task's --data");
      const evals::TaskSpec spec = evals::task_spec(tasks[0]);
      auto docs = evals::read_docs(tasks[0], spec.type, data[0]);
      if (base.limit_fraction > 0) docs.resize(size_t(std::ceil(double(docs.size()) * base.limit_fraction)));
      else if (base.limit > 0 && size_t(base.limit) < docs.size()) docs.resize(size_t(base.limit));
      std::string lines;
      for (const auto& d : docs) lines += evals::to_normalized(d, spec.type).dump() + "\n";
      write_file_atomic(convert_to, lines);
      fmt::print("wrote {} ({} documents, normalized {} form)\n", convert_to, docs.size(), tasks[0]);
      return;
    }
    // Every task's documents are read and checked before the model loads: bad data fails in seconds.
    std::vector<EvalInputs> inputs;
    for (size_t i = 0; i < tasks.size(); ++i) {
      EvalRequest q = base;
      q.task = tasks[i];
      q.data = data[i];
      q.fewshot_data = fewshot_data.empty() ? "" : fewshot_data[i];
      q.reported = reported;
      q.shots = shots;
      q.seed = seed;
      q.repeats = repeats;
      q.temperature = temperature;
      inputs.push_back(read_eval_inputs(q));
    }
    const auto ck = Checkpoint::open(model, /*show_progress=*/true);
    const Tokenizer tok(ck->tokenizer_path());
    auto engine = make_engine(*ck, eo);
    std::vector<EvalOutcome> outcomes;
    outcomes.reserve(inputs.size());
    for (const auto& in : inputs) {
      outcomes.push_back(run_eval(*engine, tok, model, in));
      if (inputs.size() > 1) fmt::print("{}:\n", in.request.task);
      fmt::print("{}", outcomes.back().table);
      if (inputs.size() > 1) fmt::print("\n");
    }
    report_engine_counters(*engine);
    if (!out.empty()) {
      std::vector<const EvalOutcome*> all;
      for (const auto& o : outcomes) all.push_back(&o);
      const auto results = eval_results_json(all, *engine, tok, model, inputs[0].request);
      const std::string stamp = output_timestamp();
      const auto paths = output_paths(out, model, stamp);
      if (!paths.samples_dir.empty()) std::filesystem::create_directories(paths.samples_dir);
      write_file_atomic(paths.results.string(), evals::python_json_dumps(results, 2) + "\n");
      fmt::print("wrote {}\n", paths.results.string());
      if (log_samples) {
        for (const auto& o : outcomes) {
          std::string lines;
          for (const auto& s : o.result.samples) lines += evals::saved_sample_line(s);
          const auto path = paths.samples_dir / ("samples_" + o.result.task + "_" + stamp + ".jsonl");
          write_file_atomic(path.string(), lines);
          fmt::print("wrote {}\n", path.string());
        }
      }
    }
  });
}

}  // namespace moelab::cli
