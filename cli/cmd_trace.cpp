// moelab trace: run texts through an engine and append their routing (experts, gates, optionally router
// logits) to an HDF5 trace (analysis/trace.hpp has the layout and the crash-safety story).
// moelab profile: stage latency of prefill and decode (analysis/timing.hpp).
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "analysis/timing.hpp"
#include "analysis/trace.hpp"
#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "cli/throughput_table.hpp"
#include "cli/trace_run.hpp"
#include "core/checkpoint.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/progress.hpp"
#include "core/safetensors_writer.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {
namespace {

// TRACE.h5 -> TRACE.timings.json
std::string timings_path_for(const std::string& trace_path) {
  return std::filesystem::path(trace_path).replace_extension(".timings.json").string();
}

nlohmann::json timings_document(const std::string& engine, const std::string& model,
                                const std::vector<const analysis::TimingReport*>& phases) {
  nlohmann::json j{{"format", "moelab-timings-v1"}, {"engine", engine}, {"model", model}, {"phases", nlohmann::json::object()}};
  for (const auto* p : phases) j["phases"][p->phase] = p->to_json();
  return j;
}

struct TraceArgs {
  std::string model, out, repair;
  std::vector<std::string> inputs, domains;
  bool router_logits = false, prefetch_guess = false, timings = false, append = false;
  int64_t max_tokens = 0;
  int window = 0;
  EngineOptions eo;
};

void run_repair(const std::string& path) {
  const int64_t dropped = analysis::repair_trace(path);
  const auto tr = analysis::read_trace(path);
  fmt::print("{}: {} tokens in {} sequences kept, {} rows dropped (uncommitted or unreadable); plain HDF5 readers "
             "open it\n", path, tr.num_tokens(), tr.num_sequences(), dropped);
}

void run_trace(TraceArgs& a) {
  if (!a.repair.empty()) {
    if (!a.inputs.empty() || !a.out.empty()) throw Error("trace: --repair works alone (no --input, --output)");
    return run_repair(a.repair);
  }
  if (a.inputs.empty()) throw Error("trace: give at least one --input");
  if (a.out.empty()) throw Error("trace: give --output TRACE.h5");
  analysis::check_trace_output(a.out, a.append);  // before hours of work, not after the model loads
  // Every input is read and checked before the model loads, so a bad line fails in seconds, not hours.
  const auto texts = analysis::read_trace_inputs(a.inputs, a.domains);
  if (a.model.empty()) a.model = default_model_dir();
  const auto ck = Checkpoint::open(a.model, /*show_progress=*/true);
  const auto& cfg = ck->config();
  if (a.router_logits && !cfg.is_moe())
    throw Error(fmt::format("{}: --router-logits needs an MoE model; {} has no router", a.model, cfg.arch_name()));
  if (a.prefetch_guess && !cfg.is_moe())
    throw Error(fmt::format("{}: --record-prefetch-guess needs an MoE model; {} has no router", a.model, cfg.arch_name()));
  const Tokenizer tok(ck->tokenizer_path());
  analysis::TimingProbe timing("trace");
  const TraceRunOptions options{.window = a.window, .max_tokens = a.max_tokens, .router_logits = a.router_logits,
                                .prefetch_guess = a.prefetch_guess, .append = a.append, .inputs = a.inputs,
                                .adapter = a.eo.adapter, .timing = a.timings ? &timing : nullptr};
  // Appending: the trace's model, tokenizer and engine are checked before the engine loads (its name as
  // make_engine will give it; the writer checks again with the engine's own).
  if (a.append) {
    // The adapter is read and checked first: the header hashes its weights file, which must be a sound
    // adapter (and a regular file) before anything reads it.
    if (!a.eo.adapter.empty()) LoraAdapter::load(a.eo.adapter, cfg);
    const auto name = a.eo.engine == "ref" && a.eo.precision == "f64" ? std::string("ref-f64") : a.eo.engine;
    analysis::check_appendable(a.out, trace_header(*ck, name, a.window, options, texts));
  }
  auto engine = make_engine(*ck, a.eo);
  const auto r = trace_texts(*engine, *ck, tok, texts, a.out, options);
  fmt::print("{}\n", describe(r, engine->name()));
  report_engine_counters(*engine);
  if (r.empty_texts) fmt::print("skipped {} empty texts\n", r.empty_texts);
  if (r.appended)
    fmt::print("appended to {}: it now holds {} tokens in {} sequences\n", a.out, r.tokens_before + r.tokens,
               r.sequences_before + r.sequences);
  else
    fmt::print("wrote {}\n", a.out);
  if (a.timings) {
    fmt::print("\n{}", timing.report().table());
    const auto path = timings_path_for(a.out);
    write_file_atomic(path, timings_document(engine->name(), a.model, {&timing.report()}).dump(2) + "\n");
    fmt::print("wrote {}\n", path);
  }
}

struct ProfileArgs {
  std::string model, text, json_out, synthetic, format = "text";
  int tokens = 0, decode = 16, repeat = 3, warmup = 1;
  uint64_t seed = 0;
  bool totals_only = false;
  EngineOptions eo;
};

// A prompt of n token ids without meaning but spread over the vocabulary (a fixed stride walk past the
// special tokens), so that routing is not one expert's.
std::vector<int32_t> synthetic_prompt(int n, const ModelConfig& cfg) {
  std::vector<int32_t> ids{int32_t(cfg.bos_token_id)};
  const int32_t first = 3, span = std::max(1, cfg.vocab_size - first);
  for (int i = 1; i < n; ++i) ids.push_back(first + int32_t((int64_t(i) * 7919) % span));
  return ids;
}

int32_t argmax_last_row(const MatrixRF& logits) {
  Eigen::Index best = 0;
  logits.row(logits.rows() - 1).maxCoeff(&best);
  return int32_t(best);
}

void run_profile(ProfileArgs& a) {
  if (!a.synthetic.empty() && !a.text.empty())
    throw Error("profile: --prompt needs a checkpoint's tokenizer; a synthetic model has none (use --n-prompt)");
  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<Engine> engine;
  if (!a.synthetic.empty()) {
    engine = make_synthetic_engine(a.synthetic, a.eo, a.seed);
    a.model = "synthetic:" + a.synthetic;
  } else {
    if (a.model.empty()) a.model = default_model_dir();
    ck = Checkpoint::open(a.model, /*show_progress=*/true);
    engine = make_engine(*ck, a.eo);
  }
  const int context = engine->max_context();
  std::vector<int32_t> prompt;
  if (!a.text.empty()) {
    prompt = Tokenizer(ck->tokenizer_path()).encode(a.text, /*add_bos=*/true);
  } else {
    const int n = a.tokens > 0 ? a.tokens : std::min(128, context - a.decode);
    if (n < 1) throw Error(fmt::format("profile: --n-gen {} leaves no room for a prompt in a context of {}", a.decode, context));
    prompt = synthetic_prompt(n, engine->config());
  }
  if (int(prompt.size()) + a.decode > context)
    throw Error(fmt::format("profile: {} prompt tokens + {} decode steps (--n-gen) exceed the engine's context of {} tokens "
                            "(see --context)", prompt.size(), a.decode, context));

  analysis::TimingProbe prefill("prefill"), decode("decode");
  Progress progress("profile", int64_t(a.warmup + a.repeat));
  ThroughputRow pp{.test = fmt::format("pp{}", prompt.size()), .n_prompt = int64_t(prompt.size())};
  ThroughputRow tg{.test = fmt::format("tg{}", a.decode), .n_gen = a.decode};
  for (int run = 0; run < a.warmup + a.repeat; ++run) {
    const bool measured = run >= a.warmup;  // warm-up runs fill caches and are not counted
    engine->reset();
    auto t0 = SteadyClock::now();
    // --totals-only: no probe, so engines that copy per-layer observations to the host run at full speed.
    // As a generation's prefill: the lm_head only for the row that is sampled (llama-bench does the same).
    MatrixRF logits = engine->forward_tail(prompt, int(prompt.size()) - 1, measured && !a.totals_only ? &prefill : nullptr);
    const double prefill_seconds = seconds_since(t0);
    if (measured) prefill.add_call(int64_t(prompt.size()), prefill_seconds);
    if (measured) pp.tokens_per_second.push_back(double(prompt.size()) / std::max(prefill_seconds, 1e-12));
    double decode_seconds = 0;
    for (int step = 0; step < a.decode; ++step) {
      const int32_t next = argmax_last_row(logits);
      t0 = SteadyClock::now();
      logits = engine->forward(std::span<const int32_t>(&next, 1), measured && !a.totals_only ? &decode : nullptr);
      const double s = seconds_since(t0);
      decode_seconds += s;
      if (measured) decode.add_call(1, s);
    }
    if (measured && a.decode > 0) tg.tokens_per_second.push_back(double(a.decode) / std::max(decode_seconds, 1e-12));
    progress.advance();
  }
  progress.finish();
  std::vector<ThroughputRow> rows{pp};
  if (a.decode > 0) rows.push_back(tg);
  const ThroughputContext tctx{std::filesystem::path(a.model).filename().string(), engine->name(), a.eo.threads};
  if (a.format == "md" || a.format == "csv") {  // the table alone, to paste or to parse
    fmt::print("{}", a.format == "md" ? throughput_markdown(tctx, rows) : throughput_csv(tctx, rows));
  } else {
    fmt::print("engine {}, model {}, prompt {} tokens, {} decode steps, {} measured runs after {} warm-up\n\n",
               engine->name(), a.model, prompt.size(), a.decode, a.repeat, a.warmup);
    fmt::print("{}\n", throughput_text(tctx, rows));
    // Without a probe there is no breakdown: print each phase's first line (calls, tokens, wall, tokens/s).
    const auto shown = [&](const analysis::TimingReport& r) {
      const std::string t = r.table();
      return a.totals_only ? t.substr(0, t.find('\n') + 1) : t;
    };
    fmt::print("{}\n", shown(prefill.report()));
    if (a.decode > 0) fmt::print("{}", shown(decode.report()));
  }
  report_engine_counters(*engine);
  if (!a.json_out.empty()) {
    std::vector<const analysis::TimingReport*> phases{&prefill.report()};
    if (a.decode > 0) phases.push_back(&decode.report());
    nlohmann::json doc = timings_document(engine->name(), a.model, phases);
    doc["throughput"] = throughput_json(rows);
    if (const auto c = expert_cache_counters(*engine))
      doc["expert_cache"] = {{"slots_per_layer", a.eo.gpu_expert_cache}, {"prefetch", a.eo.gpu_expert_prefetch},
                             {"hit_rate", c->hit_rate}, {"hits", c->hits}, {"prefetch_hits", c->prefetch_hits},
                             {"misses", c->misses}, {"prefetches", c->prefetches}, {"bytes_copied", c->bytes_copied}};
    write_file_atomic(a.json_out, doc.dump(2) + "\n");
    if (a.format == "text") fmt::print("wrote {}\n", a.json_out);
  }
}

void register_trace_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("trace", "Record expert routing of texts into an HDF5 trace (a new file, or --append to an existing one)");
  static TraceArgs a;
  add_model_option(*cmd, a.model);
  cmd->add_option("--input", a.inputs, "Text file (one text) or .jsonl file ({\"text\": ..., \"domain\": ...} per line); repeatable");
  cmd->add_option("--domain", a.domains, "Domain of each --input, in the same order (default: the file's stem; a "
                                         "JSONL record's own \"domain\" wins)");
  add_output_option(*cmd, a.out, "Trace file to create (it must not exist unless --append is given)");
  add_deprecated_alias(*cmd, "--out", "--output", [](const std::string& v) { a.out = v; });
  cmd->add_flag("--append", a.append, "Add to the trace in --output (same model, tokenizer, engine, --router-logits "
                                      "and --record-prefetch-guess as it records); without it an existing file is an error");
  cmd->add_flag("--router-logits", a.router_logits, "Also record every router logit (float16, [N, L, E])");
  cmd->add_flag("--record-prefetch-guess", a.prefetch_guess,
                "Also record the next-layer gate's guess: per token and layer l >= 1, the top-k of layer l's router "
                "applied to layer l-1's output (/prefetch_guess [N, L, k]; docs/traces.md); replayed by `moelab "
                "cachesim --policy next-layer-gate`");
  cmd->add_option("--max-tokens", a.max_tokens, "Stop after this many tokens in total (0: all)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--window", a.window, "Tokens per sequence; longer texts are cut (default: min(512, context))")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--timings", a.timings, "Print the stage latency breakdown and write TRACE.timings.json");
  cmd->add_option("--repair", a.repair,
                  "Only repair TRACE.h5 left open by a writer that died, so plain HDF5 readers open it again");
  add_engine_options(*cmd, a.eo);
  cmd->callback([] { run_trace(a); });
}

void register_profile_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("profile", "Prefill and decode throughput, with the stage latency (attention, router, "
                                             "experts, lm head) where the engine reports it");
  static ProfileArgs a;
  auto* model = add_model_option(*cmd, a.model);
  auto* synthetic = cmd->add_option("--synthetic", a.synthetic,
                                    "Instead of a checkpoint: random NF4 weights at a published shape (mixtral-8x7b), "
                                    "drawn on the GPU (cuda-nf4 only): full-size speed without the checkpoint");
  synthetic->excludes(model);
  cmd->add_option("--seed", a.seed, "With --synthetic: seed of the weights")->capture_default_str();
  cmd->add_flag("--totals-only", a.totals_only, "Time whole forward calls only, with no per-layer probe (cuda-nf4 "
                                                "copies each layer's observations to the host when probed)");
  auto* text = cmd->add_option("-p,--prompt", a.text, "Prompt text (tokenized with BOS) instead of synthetic tokens");
  // llama-bench's -p / -n are token counts; here -p is the prompt text, as on every other subcommand.
  cmd->add_option("--n-prompt", a.tokens, "Prompt of this many synthetic tokens (0: min(128, context - n-gen))")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber)
      ->excludes(text);
  cmd->add_option("--n-gen", a.decode, "Decode steps after each prefill")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("-r,--repetitions", a.repeat, "Measured runs (prefill + decode)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", a.warmup, "Unmeasured runs first")->capture_default_str()->check(CLI::NonNegativeNumber);
  add_json_option(*cmd, a.json_out);
  cmd->add_option("--format", a.format, "How to print: text (throughput and the stage breakdown), md or csv "
                                        "(llama-bench's throughput table: mean ± sample sd of tokens/s over the runs)")
      ->check(CLI::IsMember({"text", "md", "csv"}))
      ->capture_default_str();
  const auto count_alias = [cmd](const char* old_name, const char* new_name, int& field) {
    add_deprecated_alias(*cmd, old_name, new_name, [old_name, &field](const std::string& v) {
      if (!CLI::detail::lexical_cast(v, field) || field < 0)
        throw CLI::ValidationError(old_name, "'" + v + "' is not a count");
    });
  };
  count_alias("--tokens", "--n-prompt", a.tokens);
  count_alias("--decode", "--n-gen", a.decode);
  count_alias("--repeat", "--repetitions", a.repeat);
  add_deprecated_alias(*cmd, "--text", "--prompt", [](const std::string& v) { a.text = v; });
  add_engine_options(*cmd, a.eo);
  cmd->callback([] { run_profile(a); });
}

}  // namespace

void register_trace(CLI::App& app) {
  register_trace_command(app);
  register_profile_command(app);
}

}  // namespace moelab::cli
