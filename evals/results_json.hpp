#pragma once
// Results in lm-evaluation-harness 0.4.9.2's layout, field for field where it has one (evaluator.evaluate,
// simple_evaluate and EvaluationTracker.save_results_aggregated), keys in its order: results, group_subtasks,
// configs, versions, n-shot, higher_is_better, n-samples, config, git_hash, date, the environment and
// tokenizer fields, task_hashes, the tracker's fields (model_name, start_time, end_time,
// total_evaluation_time_seconds, ...). Ours beside them: "reported" (added by the CLI). docs/evals.md lists
// which values are ours (git_hash: moelab's tree; pretty_env_info: moelab's build) and which the harness's.
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "evals/runner.hpp"

namespace moelab::evals {

// One task of a run.
struct TaskRun {
  const TaskResult* result = nullptr;
  const TaskSpec* spec = nullptr;
  std::string data;            // the documents' file
  int shots = 0;
  int64_t original_docs = -1;  // documents in the data before --limit (-1: as many as were run)
  int64_t effective_docs = -1; // documents run (-1: result->n)
};

struct RunInfo {
  std::string model, engine, device = "cpu";
  std::string adapter;  // the LoRA adapter folder applied (--adapter), as lm_eval's peft= model argument ("": none)
  nlohmann::ordered_json limit = nullptr;  // --limit as given: a count, a fraction, or null for all
  uint64_t seed = 1234;
  double date = 0;                       // Unix time the run started (the harness's "date")
  double start_time = 0, end_time = 0;   // monotonic seconds (the harness's time.perf_counter())
  std::string git_hash;                  // moelab's build ("" -> null)
  int max_length = 0;                    // the engine's context
  int bos_id = 1, eos_id = 2;
  std::string bos_token = "<s>", eos_token = "</s>";
};

nlohmann::ordered_json results_json(const std::vector<TaskRun>& tasks, const RunInfo& info);

// The harness's task version (its YAML's metadata.version) for our named tasks; null for the generic ones.
nlohmann::ordered_json harness_task_version(const std::string& task);

// sanitize_model_name: the model as a folder name ('"<>:/|\?*[]' runs become "__").
std::string sanitize_model_name(const std::string& model);

struct Reported {
  double score = 0;  // percent
  int shots = -1;    // -1: not stated
  std::string metric, source;
  int table = 0;
};
// The Mixtral 8x7B entry of `reported_path` for the task, preferring the table whose shots match.
std::optional<Reported> find_reported(const std::string& reported_path, const std::string& task, int shots);

}  // namespace moelab::evals
