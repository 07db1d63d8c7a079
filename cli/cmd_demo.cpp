// moelab demo: the main job on the bundled default model, in one run and one report folder:
//   1. generate a continuation with the reference engine and with cpu-nf4 (tokens/s each);
//   2. the layer-by-layer diff between the two engines;
//   3. a routing trace (HDF5) of the held-out multi-domain corpus;
//   4. routing statistics by domain: expert load, load balance, stickiness against random routing;
//   5. the expert-cache simulation of that trace: hit rate per policy for C = 1..E experts per layer on the
//      GPU, Belady's bound, and the time model's Mixtral-8x7B decode speed (drawn as SVG too);
//   6. a small eval on both engines (HellaSwag and WikiText-2 slices), beside Mixtral's reported scores;
//   7. a short QLoRA fine-tune on one domain of the model's training corpus, then the held-out loss and the
//      expert load per domain, base against adapted, side by side (does fine-tuning move the routing?);
//   8. plots of the routing, when Python with h5py and matplotlib (the light tier) is present (the
//      figures of steps 4, 5 and 7 are drawn as SVG without it).
// Everything lands in one folder with index.json naming every output.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "analysis/cachesim.hpp"
#include "analysis/cachesim_figure.hpp"
#include "analysis/cachesim_time.hpp"
#include "analysis/diff.hpp"
#include "analysis/finetune_effect.hpp"
#include "analysis/load_figure.hpp"
#include "analysis/stats.hpp"
#include "analysis/trace.hpp"
#include "cli/bundled.hpp"
#include "cli/commands.hpp"
#include "cli/options.hpp"
#include "cli/engines.hpp"
#include "cli/eval_run.hpp"
#include "cli/trace_run.hpp"
#include "core/checkpoint.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/generate.hpp"
#include "core/model_presets.hpp"
#include "core/progress.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors_writer.hpp"
#include "core/spawn.hpp"
#include "core/tokenizer.hpp"
#include "core/json_bounded.hpp"
#include "train/data.hpp"
#include "train/blas_kernels.hpp"
#include "train/finetune.hpp"

namespace moelab::cli {
namespace {

namespace fs = std::filesystem;

struct DemoArgs {
  std::string model, out = "moelab-demo", corpus;
  std::string prompt = "The GNU General Public License";
  int max_new_tokens = 48;
  int hellaswag_items = 200;
  int threads = 0;
  bool plots = true;
  // Step 7: the fine-tune (the README's QLoRA recipe on one domain, every linear adapted).
  bool finetune = true;
  std::string finetune_data, finetune_domain = "arithmetic";
  int64_t finetune_steps = 30;
};

// The demo's fine-tune recipe: LoRA r 8 / alpha 16 on every linear of the frozen NF4 base, AdamW at 2e-3 with
// the linear schedule, 4 sequences of at most 128 tokens per step: 30 steps take about 10 s on one core.
constexpr int64_t kFinetuneSeqLen = 128, kFinetuneBatch = 4;
constexpr double kFinetuneLearningRate = 2e-3;

// The training corpus of step 7: --finetune-data, else the model's own (MODEL/corpus/train.jsonl.gz), else the
// bundled model's.
std::string finetune_data_for(const DemoArgs& a) {
  if (!a.finetune_data.empty()) return a.finetune_data;
  const auto own = fs::path(a.model) / "corpus" / "train.jsonl.gz";
  std::error_code ec;
  if (fs::exists(own, ec)) return own.string();
  return (fs::path(default_model_dir()) / "corpus" / "train.jsonl.gz").string();
}

// The held-out corpus to trace: --corpus, else the model's own (MODEL/corpus/heldout.jsonl, as the
// bundled model ships it), else the bundled model's.
std::string corpus_for(const DemoArgs& a) {
  if (!a.corpus.empty()) return a.corpus;
  const auto own = fs::path(a.model) / "corpus" / "heldout.jsonl";
  std::error_code ec;
  if (fs::exists(own, ec)) return own.string();
  return (fs::path(default_model_dir()) / "corpus" / "heldout.jsonl").string();
}

// How far each domain's expert load is from the load over all domains: half the L1 distance (total
// variation) of the load shares, averaged over domains. 0 when every domain routes alike.
double domain_spread(const analysis::StatsReport& s, int layer) {
  if (s.domains.empty()) return 0;
  const auto& all = s.overall.layers[size_t(layer)].load_share;
  double sum = 0;
  for (const auto& d : s.domains) {
    double tv = 0;
    for (size_t e = 0; e < all.size(); ++e) tv += std::abs(d.layers[size_t(layer)].load_share[e] - all[e]);
    sum += tv / 2;
  }
  return sum / double(s.domains.size());
}

// A Python that can draw the plots: the light tier's venv, else python3 if it has h5py and matplotlib.
std::string plotting_python() {
  for (const std::string& py : {bundled_path(".venv/bin/python"), std::string("python3")}) {
    if (py != "python3" && !fs::exists(py)) continue;
    try {
      if (run_process({py, "-c", "import h5py, matplotlib"}, {.stdout_path = "/dev/null", .stderr_path = "/dev/null"}) == 0)
        return py;
    } catch (const Error&) {
      // not installed or not executable: try the next one
    }
  }
  return "";
}

void heading(int step, const std::string& what) { fmt::print("\n== [{}/8] {}\n", step, what); }

// The demo replaces what an earlier demo wrote in its folder (the trace, step 7's finetune/), so it must only
// ever run in a folder that is new, empty, or a demo's: one holding this marker (written when the folder is
// taken), or, from demos before the marker existed, an index.json of format "moelab-demo-v1".
constexpr const char* kDemoMarker = ".moelab-demo";

bool is_demo_folder(const fs::path& out) {
  std::error_code ec;
  if (fs::is_regular_file(out / kDemoMarker, ec)) return true;
  try {
    const std::string index_path = (out / "index.json").string();
    const auto index = parse_json_bounded(read_regular_file(index_path, "demo index", 1u << 26), index_path);
    return index.is_object() && index.value("format", "") == "moelab-demo-v1";
  } catch (const std::exception&) {
    return false;  // no index.json, or not a demo's
  }
}

// Creates --output (or takes an empty or earlier demo's folder) and marks it as the demo's; anything else is
// refused before the demo runs or removes anything.
void take_output_folder(const fs::path& out) {
  std::error_code ec;
  const auto type = fs::status(out, ec).type();
  if (ec && type != fs::file_type::not_found) throw Error(fmt::format("{}: --output: {}", out.string(), ec.message()));
  if (type != fs::file_type::not_found) {
    if (type != fs::file_type::directory) throw Error(fmt::format("{}: --output exists and is not a folder", out.string()));
    const bool empty = fs::is_empty(out, ec);
    if (ec) throw Error(fmt::format("{}: --output: {}", out.string(), ec.message()));
    if (!empty && !is_demo_folder(out))
      throw Error(fmt::format("{}: --output holds files no demo wrote (no {} marker); the demo replaces its own "
                              "outputs there, so give a new or empty folder",
                              out.string(), kDemoMarker));
  }
  fs::create_directories(out, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the output folder: {}", out.string(), ec.message()));
  write_file_atomic((out / kDemoMarker).string(), "written by moelab demo: the demo may replace its outputs here\n");
}

void run_demo(DemoArgs& a) {
  const auto started = std::chrono::steady_clock::now();
  if (a.model.empty()) a.model = default_model_dir();
  const std::string corpus = corpus_for(a);
  const std::string hellaswag = bundled_path("evals/data/hellaswag-val-200.txt");
  const std::string wikitext = bundled_path("evals/data/wikitext-2-test-head.txt");
  // Inputs are read before anything runs, so a missing file fails at once.
  const auto texts = analysis::read_trace_inputs({corpus}, {});
  const auto hs_inputs = read_eval_inputs({.task = "hellaswag", .data = hellaswag, .shots = 0, .limit = a.hellaswag_items});
  const auto wt_inputs = read_eval_inputs({.task = "wikitext", .data = wikitext});
  const fs::path out(a.out);
  take_output_folder(out);

  const auto ck = Checkpoint::open(a.model, /*show_progress=*/true);
  const auto& c = ck->config();
  fmt::print("== model {}\n   {} layers, {} experts (top-{}), {} parameters, {} active per token\n", a.model, c.num_layers,
             c.num_experts, c.top_k, c.total_params(), c.active_params());
  if (!c.is_moe()) throw Error(fmt::format("{}: demo needs a mixture-of-experts model (it routes tokens to experts)", a.model));
  const Tokenizer tok(ck->tokenizer_path());
  const std::string finetune_data = a.finetune ? finetune_data_for(a) : "";
  // (A model with a shorter context trains on shorter sequences.)
  train::DataOptions finetune_data_options{.max_seq_len = std::min<int64_t>(kFinetuneSeqLen, c.max_position_embeddings),
                                           .domain = a.finetune_domain};
  if (a.finetune) {
    // Checked now, like the data below: an OPENBLAS_CORETYPE this CPU cannot run fails before steps 1-6 run.
    train::require_runnable_blas_kernels();
    // Read now, so a missing file or a domain it does not have fails before anything runs (the loop reads it again).
    const auto d = train::load_dataset(finetune_data, tok, finetune_data_options);
    if (int64_t(d.sequences.size()) < kFinetuneBatch)
      throw Error(fmt::format("{}: only {} examples of domain '{}'; the demo's fine-tune needs at least {}", finetune_data,
                              d.sequences.size(), a.finetune_domain, kFinetuneBatch));
  }
  auto ref = make_engine(*ck, EngineOptions{.threads = a.threads});
  auto nf4 = make_engine(*ck, EngineOptions{.engine = "cpu-nf4", .threads = a.threads});
  const std::vector<Engine*> engines{ref.get(), nf4.get()};

  // 1. Generation.
  heading(1, "generate, greedy, with each engine");
  const auto ids = tok.encode(a.prompt);
  nlohmann::json generations = nlohmann::json::object();
  GenerationResult ref_generation;
  for (Engine* e : engines) {
    Sampler greedy(SamplingParams{});
    StreamDecoder stream(tok, ids);
    fmt::print("-- {}:\n{}", e->name(), a.prompt);
    const auto g = generate(*e, ids, a.max_new_tokens, greedy, tok.eos_id(), [&](int32_t id) {
      fmt::print("{}", stream.push(id));
      std::fflush(stdout);
    });
    fmt::print("{}\n   {} new tokens, decode {:.0f} tokens/s\n", stream.flush(), g.tokens.size(), g.decode_tokens_per_second());
    generations[e->name()] = {{"tokens", g.tokens}, {"text", tok.decode(g.tokens)},
                              {"decode_tokens_per_second", g.decode_tokens_per_second()}};
    if (e == ref.get()) ref_generation = g;
  }

  // 2. The NF4 engine against the reference, layer by layer, on the prompt and the reference's continuation.
  heading(2, "cpu-nf4 against the FP32 reference, layer by layer");
  std::vector<int32_t> all = ids;
  all.insert(all.end(), ref_generation.tokens.begin(), ref_generation.tokens.end());
  const auto diff = analysis::diff_records(analysis::ForwardRecord::run(*ref, all), analysis::ForwardRecord::run(*nf4, all),
                                           "ref", "cpu-nf4");
  fmt::print("{}", diff.table());
  write_file_atomic((out / "diff-ref-vs-cpu-nf4.json").string(), diff.to_json().dump(2) + "\n");

  // 3. Routing trace of the held-out corpus. A fresh file each run (the demo's trace is not appended to).
  heading(3, fmt::format("routing trace of the held-out corpus ({})", corpus));
  const auto trace_path = (out / "routing-trace.h5").string();
  {
    std::error_code ec;
    fs::remove(trace_path, ec);  // an earlier demo's (take_output_folder checked the folder is the demo's)
  }
  // The held-out loss per domain is gathered from the same forward passes (step 7 compares it).
  analysis::LossByDomain loss_before;
  TraceRunOptions trace_options{.window = std::min(256, ref->max_context()), .router_logits = true, .prefetch_guess = true,
                                .inputs = {corpus}};
  trace_options.on_window_logits = [&](const std::string& domain, std::span<const int32_t> window, const MatrixRF& logits) {
    analysis::add_window_loss(loss_before[domain], window, logits);
  };
  const auto traced = trace_texts(*ref, *ck, tok, texts, trace_path, trace_options);
  fmt::print("{}\nwrote {}\n", describe(traced, ref->name()), trace_path);

  // 4. Statistics by domain.
  heading(4, "routing statistics by domain");
  const auto stats = analysis::compute_stats(analysis::read_trace(trace_path), /*by_domain=*/true);
  fmt::print("{}", stats.table({c.num_layers - 1}));
  nlohmann::json spread = nlohmann::json::array();
  fmt::print("\ndomain specialization per layer (mean total-variation distance between a domain's expert load and the\n"
             "load over all domains; 0 = every domain routes alike):\n");
  for (int l = 0; l < c.num_layers; ++l) {
    spread.push_back(domain_spread(stats, l));
    fmt::print("   layer {:>2}: {:.3f}\n", l, spread.back().get<double>());
  }
  auto stats_json = stats.to_json();
  stats_json["trace"]["path"] = trace_path;
  write_file_atomic((out / "routing-stats.json").string(), stats_json.dump(2) + "\n");
  // Drawn here, without Python, so the figure exists on every machine.
  const auto load_svg = (out / "expert-load-by-domain.svg").string();
  write_file_atomic(load_svg, analysis::expert_load_by_domain_svg(stats));
  fmt::print("wrote {} (every layer) and {}\n", load_svg, (out / "routing-stats.json").string());

  // 5. The expert-cache simulation of the same trace (docs/cachesim.md).
  heading(5, "expert cache: how many experts per layer must stay on the GPU (the trace replayed through caches)");
  analysis::CacheSimOptions cache_options;  // every policy, C = 1..E, the first 10% of the tokens to calibrate
  cache_options.calibrate.fraction = 0.1;
  const auto cache = analysis::simulate_cache(std::vector<std::string>{trace_path}, cache_options);
  analysis::TimeModelParams time_params;
  time_params.model = model_preset("mixtral-8x7b");
  time_params.link = analysis::parse_link("pcie4-x16");
  const auto decode = analysis::predict_decode(cache, time_params);
  fmt::print("{} tokens after a warm-up of {}; belady is the optimum: no policy copies less, no demand policy hits "
             "more\n{}", cache.scored_tokens,
             cache.calibration_tokens, cache.hit_rate_table());
  for (const int size : {std::max(1, c.num_experts / 2), c.num_experts})
    for (const auto& p : decode.predictions)  // (in the simulation's order)
      if (p.policy == analysis::cachesim::Policy::Lru && p.cache_size == size)
        fmt::print("time model (Mixtral-8x7B shapes in NF4, {} GB/s GPU, PCIe 4.0 x16 at 25 GB/s; assumptions in the JSON): "
                 "lru with C = {}: {:.1f} tokens/s in {:.1f} GiB of GPU memory\n", time_params.gpu_gb_per_s, p.cache_size,
                 p.tokens_per_second, double(p.gpu_bytes) / double(1ull << 30));
  auto cache_json = cache.to_json();
  cache_json["time_model"] = decode.to_json();
  const auto cache_path = (out / "cachesim.json").string(), cache_svg = (out / "cache-hit-rate.svg").string();
  write_file_atomic(cache_path, cache_json.dump(2) + "\n");
  write_file_atomic(cache_svg, analysis::cache_hit_rate_svg(cache));
  fmt::print("wrote {} and {}\n", cache_path, cache_svg);
  nlohmann::json cache_index = {{"path", cache_path}, {"figure", cache_svg}, {"hit_rate", nlohmann::json::object()}};
  for (const auto& r : cache.results) {
    const auto t = r.total();
    cache_index["hit_rate"][analysis::cachesim::policy_name(r.policy)].push_back(double(t.hits) / double(t.requests));
  }

  // 6. Evals on both engines.
  heading(6, "evals on both engines: HellaSwag (0-shot) and WikiText-2 slices, beside Mixtral-8x7B's reported scores");
  nlohmann::json evals_index = nlohmann::json::array();
  {
    std::error_code ec;
    fs::create_directories(out / "evals", ec);
    if (ec) throw Error(fmt::format("{}: cannot create it: {}", (out / "evals").string(), ec.message()));
  }
  for (const auto* inputs : {&hs_inputs, &wt_inputs})
    for (Engine* e : engines) {
      const auto o = run_eval(*e, tok, a.model, *inputs);
      fmt::print("-- {} on {} ({})\n{}", inputs->request.task, e->name(), inputs->request.data, o.table);
      const auto path = out / "evals" / fmt::format("{}-{}.json", inputs->request.task, e->name());
      write_file_atomic(path.string(), o.results_json.dump(2) + "\n");
      evals_index.push_back({{"task", inputs->request.task}, {"engine", e->name()}, {"results", path.string()},
                             {"metrics", o.result.metrics}, {"documents", o.result.n}});
    }
  fmt::print("(a {} parameter model against a 46.7B one: the reported scores are there for scale, not as a target)\n",
             c.total_params());

  // 7. Fine-tuning one domain, and what it changed in every domain.
  nlohmann::json finetune_index = nullptr;
  if (!a.finetune) {
    heading(7, "fine-tune: skipped (--no-finetune)");
  } else {
    heading(7, fmt::format("fine-tune (QLoRA) on '{}' for {} steps; then the held-out loss and the expert load per "
                           "domain, base against adapted", a.finetune_domain, a.finetune_steps));
    const fs::path ft_dir = out / "finetune";
    {
      // An earlier demo's (take_output_folder checked the folder is the demo's): a fresh run each time, as
      // finetune refuses a non-empty output.
      std::error_code ec;
      fs::remove_all(ft_dir, ec);
      if (ec) throw Error(fmt::format("{}: cannot remove the earlier demo's fine-tune: {}", ft_dir.string(), ec.message()));
    }
    train::FinetuneOptions fo;
    fo.model = a.model;
    fo.data = finetune_data;
    fo.output = (ft_dir / "adapter").string();
    fo.data_options = finetune_data_options;
    fo.lora.target_modules = train::parse_target_modules("all", c);
    fo.learning_rate = kFinetuneLearningRate;
    fo.batch_size = kFinetuneBatch;
    fo.max_steps = a.finetune_steps;
    fo.save_steps = 0;
    fo.logging_steps = 10;
    fo.threads = a.threads;
    const auto trained = train::run_finetune(fo);
    fmt::print("trained {} steps on {} tokens in {:.1f} s ({:.0f} tokens/s), mean loss {:.4f}; adapter in {}\n",
               trained.steps, trained.tokens, trained.seconds, trained.seconds > 0 ? double(trained.tokens) / trained.seconds : 0.0,
               trained.train_loss, fo.output);
    std::fflush(stdout);  // before the trace's progress lines (stderr)

    // The held-out corpus again, through the reference engine with the adapter: the same windows as step 3.
    auto adapted = make_engine(*ck, EngineOptions{.threads = a.threads, .adapter = fo.output});
    analysis::LossByDomain loss_after;
    TraceRunOptions after_options = trace_options;
    after_options.adapter = fo.output;
    after_options.on_window_logits = [&](const std::string& domain, std::span<const int32_t> window, const MatrixRF& logits) {
      analysis::add_window_loss(loss_after[domain], window, logits);
    };
    const auto after_path = (ft_dir / "routing-trace-adapted.h5").string();
    const auto traced_after = trace_texts(*adapted, *ck, tok, texts, after_path, after_options);
    fmt::print("{}\n", describe(traced_after, adapted->name() + " + adapter"));
    const auto after_trace = analysis::read_trace(after_path);
    const auto effect = analysis::compare_finetune(analysis::read_trace(trace_path), after_trace, loss_before, loss_after,
                                                   a.finetune_domain);
    fmt::print("\n{}", effect.table(c.num_layers - 1));
    const auto effect_path = (ft_dir / "effect.json").string();
    auto effect_json = effect.to_json();
    effect_json["adapter"] = fo.output;
    effect_json["trace_before"] = trace_path;
    effect_json["trace_after"] = after_path;
    write_file_atomic(effect_path, effect_json.dump(2) + "\n");
    const auto after_svg = (ft_dir / "expert-load-by-domain-adapted.svg").string();
    write_file_atomic(after_svg, analysis::expert_load_by_domain_svg(analysis::compute_stats(after_trace, /*by_domain=*/true)));
    fmt::print("wrote {}, {} (beside {}) and {}\n", effect_path, after_svg, load_svg, after_path);
    nlohmann::json loss = nlohmann::json::object();
    for (const auto& d : effect.domains) loss[d.domain] = {d.before.mean(), d.after.mean()};
    finetune_index = {{"domain", a.finetune_domain},
                      {"data", finetune_data},
                      {"steps", trained.steps},
                      {"train_tokens", trained.tokens},
                      {"train_seconds", trained.seconds},
                      {"adapter", fo.output},
                      {"effect", effect_path},
                      {"trace_after", after_path},
                      {"figure_after", after_svg},
                      {"heldout_loss_before_after", loss},
                      {"routing_changed", effect.overall().routing_changed}};
  }

  // 8. Plots.
  heading(8, "plots");
  nlohmann::json plots = nlohmann::json::array();
  const std::string py = a.plots ? plotting_python() : "";
  if (py.empty()) {
    fmt::print("skipped: {}\n", a.plots ? "no Python with h5py and matplotlib (scripts/setup.sh installs the light tier)"
                                        : "--no-plots");
  } else {
    const auto plot_dir = (out / "plots").string();
    const std::vector<std::string> cmd{py, bundled_path("scripts/plot_routing.py"), trace_path, plot_dir};
    std::fflush(stdout);  // the script's own lines must come after ours
    int status = 0;
    std::string why;
    try {
      status = run_process(cmd);
      if (status != 0) why = fmt::format("exit status {}", status);
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty()) {
      fmt::print("plotting failed ({}; command: {}); the trace and statistics are complete\n", why, describe_command(cmd));
    } else {
      for (const auto& f : fs::directory_iterator(plot_dir))
        if (f.path().extension() == ".png") plots.push_back(f.path().string());
      fmt::print("wrote {} plots in {}\n", plots.size(), plot_dir);
    }
  }

  const double seconds = seconds_since(started);
  nlohmann::json index = {
      {"format", "moelab-demo-v1"},
      {"model", a.model},
      {"config", {{"layers", c.num_layers}, {"experts", c.num_experts}, {"top_k", c.top_k},
                  {"parameters", c.total_params()}, {"active_parameters", c.active_params()}}},
      {"prompt", a.prompt},
      {"prompt_tokens", ids},
      {"generations", generations},
      {"diff", {{"path", (out / "diff-ref-vs-cpu-nf4.json").string()},
                {"logits_rel_l2", diff.logits.rel_l2},
                {"logits_top1_agreement", diff.logits_top1_agreement},
                {"mean_kl", diff.mean_kl}}},
      {"trace", {{"path", trace_path}, {"corpus", corpus}, {"tokens", traced.tokens}, {"sequences", traced.sequences},
                 {"engine", ref->name()}}},
      {"stats", {{"path", (out / "routing-stats.json").string()}, {"domain_spread_per_layer", spread},
                 {"figure", load_svg}}},
      {"cachesim", cache_index},
      {"evals", evals_index},
      {"finetune", finetune_index},
      {"plots", plots},
      {"seconds", seconds},
  };
  const auto index_path = (out / "index.json").string();
  write_file_atomic(index_path, index.dump(2) + "\n");
  fmt::print("\n== done in {:.0f} s; every output is listed in {}\n", seconds, index_path);
}

}  // namespace

void register_demo(CLI::App& app) {
  auto* cmd = app.add_subcommand("demo", "Run the main job on the bundled default model and write a report folder");
  static DemoArgs a;
  add_model_option(*cmd, a.model);
  add_output_option(*cmd, a.out, "Output folder")->capture_default_str();
  add_deprecated_alias(*cmd, "--out", "--output", [](const std::string& v) { a.out = v; });
  cmd->add_option("-p,--prompt", a.prompt, "Prompt to continue")->capture_default_str();
  cmd->add_option("-n,--max-new-tokens", a.max_new_tokens, "Tokens to generate")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--corpus", a.corpus, "Held-out corpus to trace, JSONL with \"text\" and \"domain\" (default: the "
                                        "model's corpus/heldout.jsonl)");
  cmd->add_option("--hellaswag-items", a.hellaswag_items, "HellaSwag items to score (at most 200 are bundled)")
      ->capture_default_str()->check(CLI::Range(1, 200));
  cmd->add_option("-t,--threads", a.threads, "cpu-nf4 threads (0: all cores)")->check(threads_validator())->capture_default_str();
  add_progress_option(*cmd);
  cmd->add_flag("!--no-plots", a.plots, "Skip the plots");
  cmd->add_flag("!--no-finetune", a.finetune, "Skip step 7, the fine-tune");
  cmd->add_option("--finetune-domain", a.finetune_domain, "Step 7 fine-tunes on the training lines of this domain")
      ->capture_default_str();
  cmd->add_option("--finetune-data", a.finetune_data, "Step 7's training JSONL (or .jsonl.gz) with \"domain\" fields "
                                                      "(default: the model's corpus/train.jsonl.gz)");
  cmd->add_option("--finetune-steps", a.finetune_steps, "Step 7's optimizer steps")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(100000)));
  cmd->callback([] { run_demo(a); });
}

}  // namespace moelab::cli
