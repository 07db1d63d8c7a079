#pragma once
// Runs one task over its documents on an engine: builds the harness's requests, scores them, keeps a
// per-sample record (as the harness's --log_samples) and aggregates the metrics with their stderr.
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/engine.hpp"
#include "evals/docs.hpp"
#include "evals/encode.hpp"
#include "evals/tasks.hpp"

namespace moelab::evals {

struct RunOptions {
  int shots = 0;
  uint64_t fewshot_seed = 1234;   // the harness's default fewshot_random_seed
  int repeats = 1;                // generation: k samples per doc (maj@k) when temperature > 0
  float temperature = 0.0f;
  uint64_t sampling_seed = 0;
  double code_timeout_seconds = 10.0;  // HumanEval: per program run
  std::function<void(int64_t done, int64_t total)> progress;
};

struct TaskResult {
  std::string task;
  // "acc,none" -> value, "acc_stderr,none" -> stderr (NaN when not defined).
  std::map<std::string, double> metrics;
  // lm-eval's per-sample records (evals/lm_eval_samples.hpp), in its order: per filter, per doc.
  std::vector<nlohmann::ordered_json> samples;
  int64_t n = 0;
  double seconds = 0;
  int64_t tokens_forwarded = 0;        // multiple choice: cost of the log-likelihood requests
  std::vector<std::string> warnings;  // departures from the harness's behaviour, printed by the CLI
};

TaskResult run_task(Engine& engine, const TextCodec& codec, const TaskSpec& spec, const std::vector<Doc>& docs,
                    const std::vector<Doc>& fewshot_docs, bool fewshot_is_eval_split, const RunOptions& opts);

}  // namespace moelab::evals
