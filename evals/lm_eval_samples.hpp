#pragma once
// Per-sample records as lm-evaluation-harness 0.4.9.2 logs them (evaluator.evaluate with log_samples, then
// EvaluationTracker.save_results_samples), so that files, hashes and task hashes equal the harness's own:
//   in memory: doc_id, doc, target, arguments (one array of arguments per request), resps (per request,
//              its list of responses), filtered_resps (per request), filter, metrics (the names), doc_hash,
//              prompt_hash, target_hash, then each metric's value
//   on disk:   the same, with arguments as {"gen_args_<i>": {"arg_<j>": ...}}, every leaf of resps and
//              filtered_resps through Python's str() (the harness's sanitize_list) and target as str(target).
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "evals/docs.hpp"

namespace moelab::evals {

// The document as the harness's task holds it after its process_docs: the record as read (keys in the
// file's order) plus, for HellaSwag's public JSON form, the fields its process_docs adds (query, choices,
// gold). For the normalized forms and the .txt forms this is our record, not the harness's dataset row, so
// doc_hash is only comparable with the harness's for the public JSONL forms (docs/evals.md).
nlohmann::ordered_json harness_doc(const std::string& task, const Doc& d);

struct SampleFields {
  int64_t doc_id = 0;
  nlohmann::ordered_json doc, target;
  nlohmann::ordered_json arguments = nlohmann::ordered_json::array();  // per request: [arg0, arg1, ...]
  nlohmann::ordered_json resps = nlohmann::ordered_json::array();      // per request: [response, ...]
  nlohmann::ordered_json filtered_resps = nlohmann::ordered_json::array();
  std::string filter = "none";
  std::vector<std::pair<std::string, nlohmann::ordered_json>> metrics;  // in the task's process_results order
};

// The in-memory record, with doc_hash = sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
// prompt_hash = sha256(first request's first argument), target_hash = sha256(str(target)).
nlohmann::ordered_json sample_record(SampleFields f);

// The record as the harness writes it to samples_<task>_<date>.jsonl (see the header comment).
nlohmann::ordered_json saved_sample(const nlohmann::ordered_json& record);

// One line of that file: json.dumps(saved, ensure_ascii=False) + "\n".
std::string saved_sample_line(const nlohmann::ordered_json& record);

// The results' task_hashes entry: sha256 of every record's doc_hash + prompt_hash + target_hash, joined.
std::string task_hash(const std::vector<nlohmann::ordered_json>& records);

}  // namespace moelab::evals
