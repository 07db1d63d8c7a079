#pragma once
// The normalized task documents (one JSONL form per task type, see docs/evals.md) and the readers
// that turn public formats into them, applying the harness's preprocessing.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moelab::evals {

enum class TaskType { MultipleChoice, Generate, Rolling, Code };

struct Doc {
  // MultipleChoice: `query` + target_delimiter + choices[i]; partial scoring (WinoGrande):
  // `contexts[i]` + target_delimiter + `continuation`.
  std::string query;
  std::vector<std::string> choices;
  std::vector<std::string> contexts;
  std::string continuation;
  int gold = -1;
  // Generate: prompt text and the reference answer (GSM8K: the full answer ending "#### N").
  std::string text, target;
  // Rolling: `text` is scored; `page` (the original) is what words and bytes are counted on.
  std::string page;
  // Code (HumanEval).
  std::string task_id, prompt, test, entry_point;
  std::string subject;  // MMLU
  // The record as read, keys in the file's order (lm-eval's doc_hash is over json.dumps of the doc as its
  // dataset holds it, so the order is part of the hash); a .txt form's record as built from its lines.
  nlohmann::ordered_json source;
  // A place a sparse slice of a split leaves empty (see read_fewshot_docs): the slice's file and the
  // split's name; every other field is empty. Drawing it as a few-shot example is an error.
  std::string absent_from, absent_split;

  bool partial() const { return !contexts.empty(); }
  bool absent() const { return !absent_from.empty(); }
};

// Reads `path` for task `task` (hellaswag, arc_easy, arc_challenge, mmlu, winogrande, piqa, gsm8k,
// humaneval, wikitext, or a generic type name: multiple_choice, generate, rolling). Accepts the
// normalized JSONL and the public forms (see docs/evals.md); `.bz2` / `.gz` are decompressed in-process
// (libbz2, zlib). Every field of every record is checked (presence, type, range); a bad one throws
// moelab::Error "PATH:LINE: field \"NAME\": problem".
std::vector<Doc> read_docs(const std::string& task, TaskType type, const std::string& path);

// A few-shot split: what read_docs reads, or a sparse slice of a split (the docs that known draws need,
// each at its index in the full split), JSONL whose first line is a header
//   {"split": "train", "total": 7473, ...}
// and whose other lines are records of the task (any form read_docs takes) with an "index" field, 0 <=
// index < total, strictly increasing. The result has `total` docs: the records at their indices and
// absent() placeholders elsewhere. `split` (when given) receives the header's split name ("" for a plain
// file). read_docs refuses a sparse slice (it can only be few-shot data).
std::vector<Doc> read_fewshot_docs(const std::string& task, TaskType type, const std::string& path,
                                   std::string* split = nullptr);

// Converters from one public record (exposed for tests).
Doc from_hellaswag_json(const nlohmann::json& j);
// 6 lines per item; `source` names the file in errors.
std::vector<Doc> from_hellaswag_text(const std::string& text, const std::string& source = "hellaswag text");
Doc from_arc(const nlohmann::json& j);
Doc from_mmlu(const nlohmann::json& j);
Doc from_winogrande(const nlohmann::json& j);
Doc from_piqa(const nlohmann::json& j);
Doc from_gsm8k(const nlohmann::json& j);
// Word-level file, split into articles; `source` names the file in errors.
std::vector<Doc> from_wikitext(const std::string& text, const std::string& source = "wikitext text");
// The harness's preprocessing, in linear time (hand-written equivalents of its regexes).
std::string hellaswag_preprocess(std::string text);
std::string wikitext_detokenize(std::string text);
bool wikitext_is_article_heading(const std::string& line);  // " = Title = ", not " = = Section = = "
nlohmann::json to_normalized(const Doc& d, TaskType type);

}  // namespace moelab::evals
