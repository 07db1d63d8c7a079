#include "evals/results_json.hpp"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <map>
#include <string_view>

#include "core/error.hpp"
#include "evals/lm_eval_samples.hpp"
#include "evals/python_format.hpp"
#include "core/json_bounded.hpp"

namespace moelab::evals {

using nlohmann::json;
using nlohmann::ordered_json;

namespace {

struct HarnessTask {
  const char* name;
  const char* dataset_path;
  const char* dataset_name;  // nullptr: null
  double version;
};
// From each task's YAML in lm-eval 0.4.9.2 (lm_eval/tasks/<task>/*.yaml): dataset and metadata.version.
// mmlu: the per-subject tasks' version (the mmlu group's is 2; moelab scores the subjects as one task).
constexpr HarnessTask kHarnessTasks[] = {
    {"hellaswag", "Rowan/hellaswag", nullptr, 1.0},
    {"arc_easy", "allenai/ai2_arc", "ARC-Easy", 1.0},
    {"arc_challenge", "allenai/ai2_arc", "ARC-Challenge", 1.0},
    {"mmlu", "cais/mmlu", nullptr, 1.0},
    {"winogrande", "winogrande", "winogrande_xl", 1.0},
    {"piqa", "baber/piqa", nullptr, 1.0},
    {"gsm8k", "gsm8k", "main", 3.0},
    {"humaneval", "openai/openai_humaneval", nullptr, 1.0},
    {"wikitext", "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", 2.0},
};

const HarnessTask* harness_task(const std::string& task) {
  for (const auto& t : kHarnessTasks)
    if (task == t.name) return &t;
  return nullptr;
}

bool higher_is_better(const std::string& metric) {
  return metric.find("perplexity") == std::string::npos && metric != "bits_per_byte";
}

ordered_json task_config(const TaskRun& t) {
  const TaskSpec& spec = *t.spec;
  const HarnessTask* h = harness_task(spec.name);
  const char* types[] = {"multiple_choice", "generate_until", "loglikelihood_rolling", "generate_until"};
  ordered_json metric_list = ordered_json::array();
  for (const auto& m : spec.metrics) {
    if (spec.type == TaskType::Rolling) metric_list.push_back({{"metric", m}});  // wikitext.yaml names them only
    else metric_list.push_back({{"metric", m}, {"aggregation", "mean"}, {"higher_is_better", higher_is_better(m)}});
  }
  ordered_json cfg = {{"task", spec.name},
                      {"dataset_path", h ? ordered_json(h->dataset_path) : ordered_json("json")},
                      {"dataset_name", h && h->dataset_name ? ordered_json(h->dataset_name) : ordered_json(nullptr)},
                      // The file this run read (the harness's form for local data: data_files).
                      {"dataset_kwargs", {{"data_files", {{"test", t.data}}}}}};
  if (!spec.fewshot_split.empty()) cfg["fewshot_split"] = spec.fewshot_split;
  cfg["description"] = spec.description;
  cfg["target_delimiter"] = spec.target_delimiter;
  cfg["fewshot_delimiter"] = spec.fewshot_delimiter;
  cfg["fewshot_config"] = {{"sampler", spec.first_n_fewshot ? "first_n" : "default"}};
  cfg["num_fewshot"] = t.shots;
  cfg["metric_list"] = metric_list;
  cfg["output_type"] = types[int(spec.type)];
  // generation_kwargs as the YAMLs give them (gsm8k.yaml; humaneval.yaml, whose max_gen_toks is what ran here).
  if (spec.type == TaskType::Generate)
    cfg["generation_kwargs"] = {{"until", spec.until}, {"do_sample", false}, {"temperature", 0.0}};
  if (spec.type == TaskType::Code)
    cfg["generation_kwargs"] = {{"until", spec.until}, {"max_gen_toks", spec.max_gen_toks}, {"do_sample", false}};
  cfg["repeats"] = 1;
  cfg["should_decontaminate"] = false;
  cfg["metadata"] = {{"version", harness_task_version(spec.name)}};
  return cfg;
}

}  // namespace

ordered_json harness_task_version(const std::string& task) {
  const HarnessTask* h = harness_task(task);
  return h ? ordered_json(h->version) : ordered_json(nullptr);
}

std::string sanitize_model_name(const std::string& model) {
  // re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", model_name)
  std::string out;
  bool in_run = false;
  for (const char c : model) {
    if (std::string_view("\"<>:/|\\?*[]").find(c) != std::string_view::npos) {
      if (!in_run) out += "__";
      in_run = true;
    } else {
      out += c;
      in_run = false;
    }
  }
  return out;
}

ordered_json results_json(const std::vector<TaskRun>& tasks, const RunInfo& info) {
  // Orders as lm-eval 0.4.9.2 writes a run of standalone tasks: results, configs, versions, n-shot and
  // higher_is_better sorted by name; group_subtasks in the order asked; n-samples and task_hashes in its
  // evaluation order, which for standalone tasks is the reverse of the order asked.
  ordered_json group_subtasks = ordered_json::object();
  std::map<std::string, ordered_json> results, configs, versions, n_shot, hib_all;
  ordered_json n_samples = ordered_json::object(), task_hashes = ordered_json::object();
  for (auto it = tasks.rbegin(); it != tasks.rend(); ++it) {
    const TaskRun& t = *it;
    const TaskResult& r = *t.result;
    ordered_json res = {{"alias", r.task}};
    ordered_json hib = ordered_json::object();
    for (const auto& [k, v] : r.metrics) {
      res[k] = std::isnan(v) ? ordered_json("N/A") : ordered_json(v);
      const std::string metric = k.substr(0, k.find(','));
      if (metric.find("_stderr") == std::string::npos) hib[metric] = higher_is_better(metric);
    }
    results[r.task] = res;
    configs[r.task] = task_config(t);
    versions[r.task] = harness_task_version(r.task);
    n_shot[r.task] = t.shots;
    hib_all[r.task] = hib;
    const int64_t effective = t.effective_docs >= 0 ? t.effective_docs : r.n;
    n_samples[r.task] = {{"original", t.original_docs >= 0 ? t.original_docs : effective}, {"effective", effective}};
    task_hashes[r.task] = task_hash(r.samples);
  }
  for (const auto& t : tasks) group_subtasks[t.result->task] = ordered_json::array();  // no subtasks
  auto sorted = [](const std::map<std::string, ordered_json>& m) {
    ordered_json o = ordered_json::object();
    for (const auto& [k, v] : m) o[k] = v;
    return o;
  };
  std::string model_args = fmt::format("pretrained={},engine={}", info.model, info.engine);
  if (!info.adapter.empty()) model_args += ",peft=" + info.adapter;  // lm_eval's HFLM names the adapter so
  ordered_json doc = {
      {"results", sorted(results)},
      {"group_subtasks", group_subtasks},
      {"configs", sorted(configs)},
      {"versions", sorted(versions)},
      {"n-shot", sorted(n_shot)},
      {"higher_is_better", sorted(hib_all)},
      {"n-samples", n_samples},
      {"config", {{"model", "moelab"}, {"model_args", model_args}, {"batch_size", 1}, {"batch_sizes", ordered_json::array()},
                  {"device", info.device}, {"use_cache", nullptr}, {"limit", info.limit},
                  // mean's stderr is closed-form (the harness's too: bootstrap_iters applies to other aggregations)
                  {"bootstrap_iters", 0}, {"gen_kwargs", nullptr}, {"random_seed", 0}, {"numpy_seed", 1234},
                  {"torch_seed", 1234}, {"fewshot_seed", info.seed}}},
      {"git_hash", info.git_hash.empty() ? ordered_json(nullptr) : ordered_json(info.git_hash)},
      {"date", info.date},
      {"pretty_env_info", fmt::format("moelab {} engine, git {}", info.engine, info.git_hash.empty() ? "unknown" : info.git_hash)},
      {"transformers_version", nullptr},
      {"lm_eval_version", nullptr},
      {"upper_git_hash", nullptr},
      // The Mixtral tokenizer has no pad token; the harness's HFLM pads with unk (<unk>, id 0) then.
      {"tokenizer_pad_token", ordered_json::array({"<unk>", "0"})},
      {"tokenizer_eos_token", ordered_json::array({info.eos_token, std::to_string(info.eos_id)})},
      {"tokenizer_bos_token", ordered_json::array({info.bos_token, std::to_string(info.bos_id)})},
      {"eot_token_id", info.eos_id},
      {"max_length", info.max_length},
      {"task_hashes", task_hashes},
      {"model_source", "moelab"},
      {"model_name", info.model},
      {"model_name_sanitized", sanitize_model_name(info.model)},
      {"system_instruction", nullptr},
      {"system_instruction_sha", nullptr},
      {"fewshot_as_multiturn", false},
      {"chat_template", nullptr},
      {"chat_template_sha", nullptr},
      {"start_time", info.start_time},
      {"end_time", info.end_time},
      // str(end_time - start_time), as the harness writes it
      {"total_evaluation_time_seconds", python_float_repr(info.end_time - info.start_time)}};
  return doc;
}

std::optional<Reported> find_reported(const std::string& path, const std::string& task, int shots) {
  std::ifstream f(path);
  if (!f) return std::nullopt;
  json doc;
  try {
    doc = parse_json_bounded(f, path);
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: reported scores file is not valid JSON: {}", path, e.what()));
  }
  // Every entry is checked (not only the matching ones): a damaged file fails the same way for every task.
  auto bad = [&](size_t i, const char* field, const std::string& problem) {
    return Error(fmt::format("{}: entries[{}]: field \"{}\": {}", path, i, field, problem));
  };
  if (!doc.is_object() || !doc.contains("entries") || !doc["entries"].is_array())
    throw Error(fmt::format("{}: reported scores file must be an object with an \"entries\" array", path));
  std::optional<Reported> best;
  const json& entries = doc["entries"];
  for (size_t i = 0; i < entries.size(); ++i) {
    const json& e = entries[i];
    if (!e.is_object()) throw Error(fmt::format("{}: entries[{}] is not an object", path, i));
    for (const char* k : {"model", "task", "metric", "source"})
      if (e.contains(k) && !e[k].is_string()) throw bad(i, k, fmt::format("expected a string, got {}", e[k].dump()));
    if (!e.contains("score")) throw bad(i, "score", "missing");
    if (!e["score"].is_number() || !std::isfinite(e["score"].get<double>()))
      throw bad(i, "score", fmt::format("expected a number, got {}", e["score"].dump()));
    if (!e.contains("shots")) throw bad(i, "shots", "missing");
    const json& sh = e["shots"];
    if (!sh.is_null() && !(sh.is_number_integer() && sh.get<int64_t>() >= 0 && sh.get<int64_t>() <= 1000000))
      throw bad(i, "shots", fmt::format("expected null or an integer 0..1000000, got {}", sh.dump()));
    if (e.contains("table") && !(e["table"].is_number_integer() && e["table"].get<int64_t>() >= 0 &&
                                 e["table"].get<int64_t>() <= 1000000))
      throw bad(i, "table", fmt::format("expected an integer 0..1000000, got {}", e["table"].dump()));
  }
  for (const auto& e : entries) {
    if (e.value("model", "") != "Mixtral 8x7B" || e.value("task", "") != task) continue;
    Reported r;
    r.score = e.at("score");
    r.shots = e.at("shots").is_null() ? -1 : e.at("shots").get<int>();
    r.metric = e.value("metric", "");
    r.source = e.value("source", "");
    r.table = e.value("table", 0);
    if (!best || r.shots == shots) best = r;
    if (r.shots == shots) break;
  }
  return best;
}

}  // namespace moelab::evals
