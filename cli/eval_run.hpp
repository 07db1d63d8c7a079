#pragma once
// One eval task on one engine, scored like lm-evaluation-harness, with its table beside Mixtral's reported
// score: the work of `moelab eval`, shared with `moelab demo`.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/engine.hpp"
#include "core/tokenizer.hpp"
#include "evals/results_json.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"
#include "evals/docs.hpp"

namespace moelab::cli {

struct EvalRequest {
  std::string task, data, fewshot_data = {};  // `= {}`: designated initializers may leave it out
  std::string reported = {};  // reported-scores JSON; empty: evals/reported/mixtral-8x7b.json of this repository
  std::string adapter = {};  // the engine's LoRA adapter folder (--adapter), recorded in the results ("": none)
  int shots = -1;        // -1: the task's default
  int limit = 0;         // 0: every document
  double limit_fraction = 0;  // in (0, 1): that fraction of the documents, rounded up (lm_eval's --limit 0.1)
  uint64_t seed = 1234;
  int repeats = 1;
  float temperature = 0;
};

struct EvalOutcome {
  evals::TaskResult result;
  std::optional<evals::Reported> reported;
  // This task alone in the harness's results layout, with "reported" added when there is one.
  nlohmann::ordered_json results_json;
  std::string table;            // metric, ours, stderr, reported, diff, note; then n, shots, engine, time
  // What results_json is made from (eval_results_json puts several tasks in one document).
  evals::TaskSpec spec;
  std::string data, fewshot_note;
  int shots = 0;
  int64_t original_docs = 0;
  double started_unix = 0, started = 0, ended = 0;  // Unix time; monotonic seconds (core/clock.hpp)
};

// The request's documents, read and checked (any form the converters take) before a model is loaded, so
// that bad data fails in seconds; so does a few-shot draw that a sparse slice cannot serve.
struct EvalInputs {
  EvalRequest request;
  evals::TaskSpec spec;
  int shots = 0;
  std::vector<evals::Doc> docs, fewshot;
  int64_t original_docs = 0;  // before the limit
  // Few-shot examples: --fewshot-data, else the task's bundled slice of the harness's few-shot split
  // (gsm8k: evals/data/gsm8k-train-fewshot.jsonl), else the evaluated docs (each doc's own dropped).
  std::string fewshot_path;  // "" when drawn from the evaluated docs
  bool fewshot_eval_split = false;
  evals::FewshotOrigin fewshot_origin;
  std::string fewshot_note;  // how that differs from the harness's protocol ("" when it does not)
};
EvalInputs read_eval_inputs(const EvalRequest& request);

// Runs the task with a progress bar and scores it.
EvalOutcome run_eval(Engine& engine, const Tokenizer& tok, const std::string& model_dir, const EvalInputs& inputs);

// Several tasks of one run (same engine and model) in one results document, as lm_eval writes a
// multi-task run: run info from the engine, the tokenizer and the build; "reported" keyed by task.
nlohmann::ordered_json eval_results_json(const std::vector<const EvalOutcome*>& outcomes, const Engine& engine,
                                         const Tokenizer& tok, const std::string& model_dir, const EvalRequest& request);

// The default reported-scores file: evals/reported/mixtral-8x7b.json in this source tree.
std::string default_reported_path();

}  // namespace moelab::cli
