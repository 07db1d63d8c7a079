#include "evals/results_json.hpp"

#include <fmt/format.h>

#include <cmath>
#include <ctime>
#include <fstream>

#include "core/error.hpp"

namespace moelab::evals {

using nlohmann::json;

json results_json(const TaskResult& r, const TaskSpec& spec, const RunInfo& info) {
  json res = {{"alias", r.task}};
  json hib = json::object();
  for (const auto& [k, v] : r.metrics) {
    res[k] = std::isnan(v) ? json("N/A") : json(v);
    const std::string metric = k.substr(0, k.find(','));
    if (metric.find("_stderr") == std::string::npos)
      hib[metric] = metric.find("perplexity") == std::string::npos && metric != "bits_per_byte";
  }
  json metric_list = json::array();
  for (const auto& m : spec.metrics) metric_list.push_back({{"metric", m}});
  const char* types[] = {"multiple_choice", "generate_until", "loglikelihood_rolling", "generate_until"};
  json cfg = {{"task", r.task}, {"output_type", types[int(spec.type)]}, {"dataset_path", info.data},
              {"num_fewshot", info.shots}, {"target_delimiter", spec.target_delimiter},
              {"fewshot_delimiter", spec.fewshot_delimiter}, {"metric_list", metric_list},
              {"fewshot_config", {{"sampler", spec.first_n_fewshot ? "first_n" : "default"}}}};
  if (spec.type == TaskType::Generate || spec.type == TaskType::Code)
    cfg["generation_kwargs"] = {{"until", spec.until}, {"do_sample", false}, {"max_gen_toks", spec.max_gen_toks}};
  return {{"results", {{r.task, res}}},
          {"groups", json::object()},
          {"configs", {{r.task, cfg}}},
          {"versions", {{r.task, "moelab-1"}}},
          {"n-shot", {{r.task, info.shots}}},
          {"higher_is_better", {{r.task, hib}}},
          {"n-samples", {{r.task, {{"original", info.original_docs >= 0 ? info.original_docs : int64_t(r.n)}, {"effective", r.n}}}}},
          {"config", {{"model", "moelab"}, {"model_args", fmt::format("pretrained={},engine={}", info.model, info.engine)},
                      {"batch_size", 1}, {"limit", info.limit ? json(info.limit) : json(nullptr)},
                      {"fewshot_seed", info.seed}, {"bootstrap_iters", 0}}},
          {"date", double(std::time(nullptr))},
          {"total_evaluation_time_seconds", fmt::format("{:.3f}", r.seconds)}};
}

std::optional<Reported> find_reported(const std::string& path, const std::string& task, int shots) {
  std::ifstream f(path);
  if (!f) return std::nullopt;
  json doc;
  try {
    doc = json::parse(f);
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
