#include "evals/lm_eval_samples.hpp"

#include <fmt/format.h>

#include "core/sha256.hpp"
#include "evals/python_format.hpp"

namespace moelab::evals {

using nlohmann::ordered_json;

ordered_json harness_doc(const std::string& task, const Doc& d) {
  ordered_json doc = d.source;
  // hellaswag/utils.py process_docs: dataset.map(_process_doc) keeps the row's columns and appends these.
  if (task == "hellaswag" && doc.is_object() && doc.contains("ctx_a")) {
    doc["query"] = d.query;
    doc["choices"] = d.choices;
    doc["gold"] = d.gold;
  }
  return doc;
}

ordered_json sample_record(SampleFields f) {
  const std::string prompt = f.arguments.empty() || f.arguments[0].empty() ? std::string()
                             : f.arguments[0][0].is_string()                 ? f.arguments[0][0].get<std::string>()
                                                                             : python_str(f.arguments[0][0]);
  ordered_json names = ordered_json::array();
  for (const auto& m : f.metrics) names.push_back(m.first);
  ordered_json r = {{"doc_id", f.doc_id},
                    {"doc", f.doc},
                    {"target", f.target},
                    {"arguments", std::move(f.arguments)},
                    {"resps", std::move(f.resps)},
                    {"filtered_resps", std::move(f.filtered_resps)},
                    {"filter", f.filter},
                    {"metrics", names},
                    {"doc_hash", sha256_hex(python_json_dumps(f.doc, 2))},
                    {"prompt_hash", sha256_hex(prompt)},
                    {"target_hash", sha256_hex(python_str(f.target))}};
  for (auto& [name, value] : f.metrics) r[name] = std::move(value);
  return r;
}

namespace {

// utils.sanitize_list: lists (and tuples) stay lists, every other value becomes str(value).
ordered_json sanitize_list(const ordered_json& v) {
  if (!v.is_array()) return python_str(v);  // (no response is an object)
  ordered_json out = ordered_json::array();
  for (const auto& x : v) out.push_back(sanitize_list(x));
  return out;
}

}  // namespace

ordered_json saved_sample(const ordered_json& record) {
  ordered_json s = record;
  ordered_json args = ordered_json::object();
  for (size_t i = 0; i < record["arguments"].size(); ++i) {
    ordered_json one = ordered_json::object();
    const auto& req = record["arguments"][i];
    for (size_t j = 0; j < req.size(); ++j) one[fmt::format("arg_{}", j)] = req[j];
    args[fmt::format("gen_args_{}", i)] = std::move(one);
  }
  s["resps"] = sanitize_list(record["resps"]);
  s["filtered_resps"] = sanitize_list(record["filtered_resps"]);
  s["arguments"] = std::move(args);
  s["target"] = python_str(record["target"]);
  return s;
}

std::string saved_sample_line(const ordered_json& record) { return python_json_dumps(saved_sample(record)) + "\n"; }

std::string task_hash(const std::vector<ordered_json>& records) {
  std::string joined;
  for (const auto& r : records)
    joined += r["doc_hash"].get<std::string>() + r["prompt_hash"].get<std::string>() + r["target_hash"].get<std::string>();
  return sha256_hex(joined);
}

}  // namespace moelab::evals
