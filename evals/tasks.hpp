#pragma once
// Task definitions (prompt format, few-shot rules, metrics) mirroring lm-evaluation-harness 0.4.9.2's
// task YAMLs, and few-shot context building as its ContextSampler does.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "evals/docs.hpp"
#include "evals/pyrandom.hpp"

namespace moelab::evals {

struct TaskSpec {
  std::string name;
  TaskType type = TaskType::MultipleChoice;
  std::vector<std::string> metrics;  // e.g. acc, acc_norm
  std::string description;           // MMLU: per subject (see describe())
  std::string target_delimiter = " ", fewshot_delimiter = "\n\n";
  bool first_n_fewshot = false;      // MMLU: dev split in order
  int default_shots = 0;
  std::vector<std::string> until;    // generation
  int max_gen_toks = 256;
  std::string reported_key;          // key in evals/reported/*.json
};

// Known names: hellaswag, arc_easy, arc_challenge, mmlu, winogrande, piqa, gsm8k, humaneval, wikitext,
// and the generic multiple_choice, generate, rolling. Throws on others.
TaskSpec task_spec(const std::string& name);
std::vector<std::string> task_names();

std::string describe(const TaskSpec& t, const Doc& d);  // the description placed before the few-shot block

// The harness's fewshot_context: description + for each example (text + delimiter + target +
// fewshot_delimiter) + the doc's own text ("" for partial scoring, whose contexts carry it).
// `rnd` is the task's shared random.Random(seed), drawn from in document order; when the few-shot
// docs are the evaluated docs, n+1 are drawn and the doc itself (`self_index`) is dropped.
std::string fewshot_context(const TaskSpec& t, const Doc& doc, int shots, const std::vector<Doc>& fewshot_docs,
                            bool same_split, size_t self_index, PyRandom& rnd);

}  // namespace moelab::evals
