#include "cli/eval_run.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>

#include "cli/build_info.hpp"
#include "cli/bundled.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/regular_file.hpp"
#include "evals/docs.hpp"
#include "evals/tasks.hpp"

namespace moelab::cli {

std::string default_reported_path() { return bundled_path("evals/reported/mixtral-8x7b.json"); }

EvalInputs read_eval_inputs(const EvalRequest& q) {
  if (q.shots < -1) throw Error(fmt::format("eval: shots must be 0 or more (got {})", q.shots));
  if (q.limit < 0) throw Error(fmt::format("eval: limit must be 0 (all documents) or more (got {})", q.limit));
  if (q.repeats < 1) throw Error(fmt::format("eval: repeats must be 1 or more (got {})", q.repeats));
  EvalInputs in{.request = q, .spec = evals::task_spec(q.task)};
  in.shots = q.shots < 0 ? in.spec.default_shots : q.shots;
  in.docs = evals::read_docs(q.task, in.spec.type, q.data);
  in.fewshot_path = !q.fewshot_data.empty() ? q.fewshot_data
                    : !in.spec.bundled_fewshot.empty() ? bundled_path(in.spec.bundled_fewshot) : "";
  in.fewshot_eval_split = in.fewshot_path.empty();
  std::string declared_split;
  in.fewshot = in.fewshot_eval_split ? in.docs
                                     : evals::read_fewshot_docs(q.task, in.spec.type, in.fewshot_path, &declared_split);
  // --reported is read after the run: a directory or FIFO there must fail now, not hours later.
  if (!q.reported.empty()) (void)read_regular_file(q.reported, "reported scores file", 64u << 20);
  in.original_docs = int64_t(in.docs.size());
  if (q.limit_fraction > 0)  // as lm_eval: ceil(len(docs) * limit)
    in.docs.resize(size_t(std::ceil(double(in.docs.size()) * q.limit_fraction)));
  else if (q.limit > 0 && size_t(q.limit) < in.docs.size())
    in.docs.resize(size_t(q.limit));
  in.fewshot_origin = evals::fewshot_origin(in.docs, in.fewshot, in.fewshot_eval_split, declared_split);
  in.fewshot_note = evals::fewshot_protocol_difference(in.spec, in.shots, in.fewshot_origin);
  // A sparse slice serves only the draws it was made for: try every draw now, before the model loads.
  const bool sparse = std::any_of(in.fewshot.begin(), in.fewshot.end(), [](const evals::Doc& d) { return d.absent(); });
  if (sparse && in.shots > 0 && in.fewshot.size() >= size_t(in.shots) &&
      (in.spec.type == evals::TaskType::MultipleChoice || in.spec.type == evals::TaskType::Generate)) {
    evals::PyRandom rnd(q.seed);
    for (size_t i = 0; i < in.docs.size(); ++i)
      (void)evals::fewshot_context(in.spec, in.docs[i], in.shots, in.fewshot, false, i, rnd);
  }
  return in;
}

EvalOutcome run_eval(Engine& engine, const Tokenizer& tok, const std::string& model_dir, const EvalInputs& in) {
  const auto& q = in.request;
  const auto& spec = in.spec;
  const int shots = in.shots;
  const bool same_split = in.fewshot_eval_split;
  const auto codec = evals::TextCodec::from(tok);

  evals::RunOptions ro;
  ro.shots = shots;
  ro.fewshot_seed = q.seed;
  ro.repeats = q.repeats;
  ro.temperature = q.temperature;
  ro.sampling_seed = q.seed;
  std::unique_ptr<Progress> bar;
  int64_t last = 0;
  ro.progress = [&](int64_t done, int64_t total) {
    if (!bar) bar = std::make_unique<Progress>(q.task + " (" + engine.name() + ")", total);
    bar->advance(done - last);
    last = done;
  };
  EvalOutcome o;
  o.started_unix = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  o.started = std::chrono::duration<double>(SteadyClock::now().time_since_epoch()).count();
  o.result = evals::run_task(engine, codec, spec, in.docs, in.fewshot, same_split, ro);
  o.ended = std::chrono::duration<double>(SteadyClock::now().time_since_epoch()).count();
  o.spec = spec;
  o.data = q.data;
  o.shots = shots;
  o.original_docs = in.original_docs;
  o.fewshot_note = in.fewshot_note;
  if (bar) bar->finish();
  o.reported = evals::find_reported(q.reported.empty() ? default_reported_path() : q.reported, spec.reported_key, shots);

  const auto& r = o.result;
  const auto& rep = o.reported;
  std::string& t = o.table;
  t += fmt::format("{:<34} {:>10} {:>10} {:>10} {:>9}  {}\n", "metric", "ours", "stderr", "reported", "diff", "note");
  for (const auto& [k, v] : r.metrics) {
    if (k.find("_stderr") != std::string::npos) continue;
    const std::string metric = k.substr(0, k.find(','));
    const std::string sk = metric + "_stderr" + k.substr(k.find(','));
    const double se = r.metrics.count(sk) ? r.metrics.at(sk) : NAN;
    const bool pct = metric.find("perplexity") == std::string::npos && metric != "bits_per_byte";
    std::string rs = "-", diff = "-", note;
    if (rep && pct && (rep->metric == metric || (metric == "exact_match" && rep->metric.rfind("maj@", 0) == 0))) {
      rs = fmt::format("{:.1f}", rep->score);
      diff = fmt::format("{:+.1f}", 100 * v - rep->score);
      if (rep->shots != shots || rep->metric != metric)
        note = fmt::format("protocols differ: reported {}-shot {} (table {}){}",
                           rep->shots < 0 ? std::string("?") : std::to_string(rep->shots), rep->metric, rep->table,
                           in.fewshot_note.empty() ? "" : "; " + in.fewshot_note);
      else if (!in.fewshot_note.empty())
        note = fmt::format("protocols differ: {} (table {})", in.fewshot_note, rep->table);
      else
        note = fmt::format("table {}; their pipeline, not lm-eval", rep->table);
    }
    t += fmt::format("{:<34} {:>10} {:>10} {:>10} {:>9}  {}\n", k,
                     pct ? fmt::format("{:.2f}", 100 * v) : fmt::format("{:.4f}", v),
                     std::isnan(se) ? "N/A" : (pct ? fmt::format("{:.2f}", 100 * se) : fmt::format("{:.4f}", se)), rs,
                     diff, note);
  }
  t += fmt::format("{} documents, {}-shot, engine {}, {:.1f} s\n", r.n, shots, engine.name(), r.seconds);
  if (!in.fewshot_note.empty())
    t += fmt::format("note: {}; few-shot data: {}\n", in.fewshot_note,
                     in.fewshot_path.empty() ? "--data (no --fewshot-data)" : in.fewshot_path);
  for (const auto& w : r.warnings) t += fmt::format("note: {}\n", w);

  o.results_json = eval_results_json({&o}, engine, tok, model_dir, q);
  return o;
}

nlohmann::ordered_json eval_results_json(const std::vector<const EvalOutcome*>& outcomes, const Engine& engine,
                                         const Tokenizer& tok, const std::string& model_dir, const EvalRequest& q) {
  std::vector<evals::TaskRun> runs;
  evals::RunInfo info;
  info.model = model_dir;
  info.engine = engine.name();
  if (!q.adapter.empty()) info.adapter = std::filesystem::absolute(q.adapter).lexically_normal().string();
  info.device = engine.name().rfind("cuda", 0) == 0 ? "cuda" : "cpu";
  info.limit = q.limit_fraction > 0 ? nlohmann::ordered_json(q.limit_fraction)
               : q.limit > 0        ? nlohmann::ordered_json(q.limit)
                                    : nlohmann::ordered_json(nullptr);
  info.seed = q.seed;
  info.git_hash = build_git_hash();
  info.max_length = engine.max_context();
  info.bos_id = tok.bos_id();
  info.eos_id = tok.eos_id();
  for (const EvalOutcome* o : outcomes) {
    runs.push_back({&o->result, &o->spec, o->data, o->shots, o->original_docs, o->result.n});
    if (runs.size() == 1) info.date = o->started_unix, info.start_time = o->started;
    info.end_time = o->ended;
  }
  auto doc = evals::results_json(runs, info);
  for (const EvalOutcome* o : outcomes) {
    if (!o->reported) continue;
    const auto& rep = *o->reported;
    auto& entry = doc["reported"][o->result.task];  // keyed by task, as the harness's own per-task fields are
    entry = {{"score", rep.score}, {"shots", rep.shots}, {"metric", rep.metric}, {"source", rep.source}};
    if (!o->fewshot_note.empty()) entry["protocol_differs"] = o->fewshot_note;
  }
  return doc;
}

}  // namespace moelab::cli
