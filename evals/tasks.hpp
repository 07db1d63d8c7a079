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
  // The split the harness draws few-shot examples from (its fewshot_split, else its training split;
  // MMLU: dev); "" for the generic tasks. For gsm8k also that split's size, on which the harness's draws
  // depend (0: not checked), and the slice of it this repository ships (relative to the source tree),
  // used when no --fewshot-data is given.
  std::string fewshot_split;
  size_t fewshot_split_size = 0;
  std::string bundled_fewshot;
};

// Known names: hellaswag, arc_easy, arc_challenge, mmlu, winogrande, piqa, gsm8k, humaneval, wikitext,
// and the generic multiple_choice, generate, rolling. Throws on others.
TaskSpec task_spec(const std::string& name);
std::vector<std::string> task_names();

std::string describe(const TaskSpec& t, const Doc& d);  // the description placed before the few-shot block

// Where a run's few-shot examples come from, as far as it can be told from the files.
struct FewshotOrigin {
  bool eval_split = false;     // drawn from the evaluated documents themselves (no few-shot data)
  std::string declared_split;  // a sparse slice's header "split" ("" for a plain file)
  size_t pool_size = 0;        // docs in the few-shot split (a sparse slice: its header's "total")
  size_t shared_with_eval = 0; // few-shot docs whose text equals an evaluated doc's
};
// How those examples differ from the harness's protocol for task `t` ("" when they do not, as far as can
// be told, or when no examples are drawn), e.g. "few-shot from the evaluated split (harness: train)".
std::string fewshot_protocol_difference(const TaskSpec& t, int shots, const FewshotOrigin& o);
// The origin of `fewshot` for evaluated `docs` (eval_split and declared_split as given).
FewshotOrigin fewshot_origin(const std::vector<Doc>& docs, const std::vector<Doc>& fewshot, bool eval_split,
                             const std::string& declared_split);

// The harness's fewshot_context: description + for each example (text + delimiter + target +
// fewshot_delimiter) + the doc's own text ("" for partial scoring, whose contexts carry it).
// `rnd` is the task's shared random.Random(seed), drawn from in document order; when the few-shot
// docs are the evaluated docs, n+1 are drawn and the doc itself (`self_index`) is dropped. Drawing a doc
// that a sparse slice lacks (Doc::absent) throws a one-line error naming the file and index.
std::string fewshot_context(const TaskSpec& t, const Doc& doc, int shots, const std::vector<Doc>& fewshot_docs,
                            bool same_split, size_t self_index, PyRandom& rnd);

}  // namespace moelab::evals
