#pragma once
// Results in lm-evaluation-harness's layout (results, groups, configs, versions, n-shot,
// higher_is_better, n-samples, config, date), and the reported scores beside ours.
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "evals/runner.hpp"

namespace moelab::evals {

struct RunInfo {
  std::string model, engine, data;
  int shots = 0, limit = 0;
  uint64_t seed = 1234;
  int64_t original_docs = -1;  // documents in the data before --limit (-1: as many as were run)
};

nlohmann::json results_json(const TaskResult& r, const TaskSpec& spec, const RunInfo& info);

struct Reported {
  double score = 0;  // percent
  int shots = -1;    // -1: not stated
  std::string metric, source;
  int table = 0;
};
// The Mixtral 8x7B entry of `reported_path` for the task, preferring the table whose shots match.
std::optional<Reported> find_reported(const std::string& reported_path, const std::string& task, int shots);

}  // namespace moelab::evals
