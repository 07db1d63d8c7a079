// moelab eval: one task on one engine, scored as lm-evaluation-harness scores it, with Mistral AI's
// reported score beside ours. Writes the harness's results JSON (--out) and per-sample JSONL
// (--log-samples, next to --out).
#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"
#include "evals/docs.hpp"
#include "evals/results_json.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"

namespace moelab::cli {

namespace {
std::string reported_path() {
#ifdef MOELAB_DEFAULT_MODEL
  // <repo>/models/default -> <repo> (lexically: models/default is a symlink, so ".." would follow it).
  const std::filesystem::path repo = std::filesystem::path(MOELAB_DEFAULT_MODEL).parent_path().parent_path();
  return (repo / "evals/reported/mixtral-8x7b.json").string();
#else
  return "evals/reported/mixtral-8x7b.json";
#endif
}
}  // namespace

void register_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "Score a task like lm-evaluation-harness, beside Mixtral's reported score");
  static std::string model, task, data, fewshot_data, out, reported, convert_to;
  static int shots = -1, limit = 0, repeats = 1;
  static uint64_t seed = 1234;
  static float temperature = 0;
  static bool log_samples = false;
  static EngineOptions eo;
  cmd->add_option("--model", model, "Checkpoint folder (default: the bundled model)");
  cmd->add_option("--task", task, "hellaswag, arc_easy, arc_challenge, mmlu, winogrande, piqa, gsm8k, wikitext, "
                                  "or multiple_choice / generate / rolling")->required();
  cmd->add_option("--data", data, "Documents: normalized JSONL or the task's public form (.bz2/.gz read too)")->required();
  cmd->add_option("--fewshot-data", fewshot_data, "Few-shot split (default: --data, excluding the doc itself)");
  cmd->add_option("--shots", shots, "Few-shot examples (default: the task's)");
  cmd->add_option("--limit", limit, "Only the first N documents");
  cmd->add_option("--seed", seed, "Few-shot sampling seed (harness default 1234)");
  cmd->add_option("--repeats", repeats, "Generation: samples per doc for maj@k (with --temperature > 0)");
  cmd->add_option("--temperature", temperature, "Generation: 0 = greedy");
  cmd->add_option("--out", out, "Results JSON (harness layout)");
  cmd->add_flag("--log-samples", log_samples, "Also write per-sample JSONL next to --out");
  cmd->add_option("--reported", reported, "Reported scores JSON (default: evals/reported/mixtral-8x7b.json)");
  cmd->add_option("--convert-to", convert_to,
                  "Only convert --data (public form) to the normalized JSONL in this file, then stop (no model)");
  add_engine_options(*cmd, eo);
  cmd->callback([] {
    if (model.empty()) model = default_model_dir();
    if (log_samples && out.empty()) throw Error("eval: --log-samples needs --out");
    const evals::TaskSpec spec = evals::task_spec(task);
    if (shots < 0) shots = spec.default_shots;
    auto docs = evals::read_docs(task, spec.type, data);
    const bool same_split = fewshot_data.empty();
    const auto fs = same_split ? docs : evals::read_docs(task, spec.type, fewshot_data);
    if (limit > 0 && size_t(limit) < docs.size()) docs.resize(size_t(limit));
    if (!convert_to.empty()) {
      std::string lines;
      for (const auto& d : docs) lines += evals::to_normalized(d, spec.type).dump() + "\n";
      write_file_atomic(convert_to, lines);
      fmt::print("wrote {} ({} documents, normalized {} form)\n", convert_to, docs.size(), task);
      return;
    }
    const auto ck = Checkpoint::open(model, stderr_is_terminal());
    const Tokenizer tok(ck->tokenizer_path());
    const auto codec = evals::TextCodec::from(tok);
    auto engine = make_engine(*ck, eo);
    std::unique_ptr<Progress> bar;
    evals::RunOptions ro;
    ro.shots = shots;
    ro.fewshot_seed = seed;
    ro.repeats = repeats;
    ro.temperature = temperature;
    ro.sampling_seed = seed;
    int64_t last = 0;
    ro.progress = [&](int64_t done, int64_t total) {
      if (!bar) bar = std::make_unique<Progress>(task, total, stderr_is_terminal());
      bar->advance(done - last);
      last = done;
    };
    const auto r = evals::run_task(*engine, codec, spec, docs, fs, same_split, ro);
    if (bar) bar->finish();
    evals::RunInfo info{model, engine->name(), data, shots, limit, seed};
    const auto rep = evals::find_reported(reported.empty() ? reported_path() : reported, spec.reported_key, shots);
    fmt::print("{:<34} {:>10} {:>10} {:>10} {:>9}  {}\n", "metric", "ours", "stderr", "reported", "diff", "note");
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
          note = fmt::format("protocols differ: reported {}-shot {} (table {})", rep->shots < 0 ? std::string("?") : std::to_string(rep->shots), rep->metric, rep->table);
        else
          note = fmt::format("table {}; their pipeline, not lm-eval", rep->table);
      }
      fmt::print("{:<34} {:>10} {:>10} {:>10} {:>9}  {}\n", k, pct ? fmt::format("{:.2f}", 100 * v) : fmt::format("{:.4f}", v),
                 std::isnan(se) ? "N/A" : (pct ? fmt::format("{:.2f}", 100 * se) : fmt::format("{:.4f}", se)), rs, diff, note);
    }
    fmt::print("{} documents, {}-shot, engine {}, {:.1f} s\n", r.n, shots, engine->name(), r.seconds);
    for (const auto& w : r.warnings) fmt::print("note: {}\n", w);
    if (!out.empty()) {
      auto j = evals::results_json(r, spec, info);
      if (rep) j["reported"] = {{"score", rep->score}, {"shots", rep->shots}, {"metric", rep->metric}, {"source", rep->source}};
      write_file_atomic(out, j.dump(2) + "\n");
      fmt::print("wrote {}\n", out);
      if (log_samples) {
        std::string lines;
        for (const auto& s : r.samples) lines += s.dump() + "\n";
        const std::string path = out + ".samples_" + task + ".jsonl";
        write_file_atomic(path, lines);
        fmt::print("wrote {}\n", path);
      }
    }
  });
}

}  // namespace moelab::cli
