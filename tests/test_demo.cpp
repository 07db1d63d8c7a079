// `moelab demo` end to end on a fixture model: every output named in index.json exists and agrees with
// what it indexes (the trace's tokens, the statistics' per-domain loads, the cache simulation of the trace,
// one result per task and engine), and the diff's figure is the one the two engines give when run here
// directly; the fine-tune step's held-out losses and routing changes are recomputed from the models and the
// traces themselves.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <sstream>

#include "analysis/load_figure.hpp"
#include "analysis/trace.hpp"
#include "core/checkpoint.hpp"
#include "core/lora.hpp"
#include "core/tokenizer.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

// -log softmax(row)[next] summed over a sequence's tokens 1..n-1, in float64 from the model's logits.
template <typename M>
double sequence_nll(const M& logits, std::span<const int32_t> tokens) {
  double nll = 0;
  for (size_t i = 0; i + 1 < tokens.size(); ++i) {
    const Eigen::VectorXd row = logits.row(Eigen::Index(i)).transpose().template cast<double>();
    const double max = row.maxCoeff();
    nll += max + std::log((row.array() - max).exp().sum()) - row(tokens[i + 1]);
  }
  return nll;
}

// Step 7: a fine-tune on the arithmetic lines, then every held-out sequence through the model with the adapter.
void check_finetune_step(const nlohmann::json& index, const analysis::TraceData& before, const nlohmann::json& stats,
                         const std::string& stdout_text) {
  const auto& ft = index["finetune"];
  ASSERT_TRUE(ft.is_object()) << index.dump(2);
  EXPECT_EQ(ft["domain"], "arithmetic");
  EXPECT_EQ(ft["steps"], 8);
  const std::string adapter_dir = ft["adapter"];
  const auto summary = nlohmann::json::parse(read_file_bytes(fs::path(adapter_dir) / "train_summary.json"));
  EXPECT_EQ(summary["steps"], 8);
  const auto after = analysis::read_trace(ft["trace_after"].get<std::string>());
  ASSERT_EQ(after.tokens, before.tokens);
  ASSERT_EQ(after.sequence_offsets, before.sequence_offsets);
  const auto effect = nlohmann::json::parse(read_file_bytes(ft["effect"].get<std::string>()));
  EXPECT_EQ(effect["format"], "moelab-finetune-effect-v1");
  EXPECT_EQ(effect["trained_domain"], "arithmetic");
  ASSERT_EQ(effect["domains"].size(), 3u);  // arithmetic, legal, all

  // The held-out loss per domain, recomputed: each traced sequence through the reference model without and
  // with the adapter. Against the FP32 model the demo ran, only the order of the float64 sums differs (1e-9
  // relative); against the float64 model, FP32 rounding of a two-layer forward moves a loss by ~1e-6 nats, so
  // 1e-4 absolute.
  const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
  const auto adapter = LoraAdapter::load(adapter_dir, ck->config());
  ref::Model<float> base32(*ck), adapted32(*ck, ref::ModelOptions{.adapter = adapter});
  ref::Model<double> base64(*ck), adapted64(*ck, ref::ModelOptions{.adapter = adapter});
  struct Sums { double b32 = 0, a32 = 0, b64 = 0, a64 = 0; int64_t n = 0, tokens = 0, changed = 0; };
  std::map<std::string, Sums> sums;
  const int L = before.num_layers, k = before.top_k;
  for (int64_t s = 0; s < before.num_sequences(); ++s) {
    const int64_t first = before.sequence_offsets[size_t(s)], last = before.sequence_offsets[size_t(s) + 1];
    const std::span<const int32_t> ids(before.tokens.data() + first, size_t(last - first));
    for (const std::string name : {before.domain_names[size_t(before.sequence_domain[size_t(s)])], std::string("all")}) {
      auto& d = sums[name];
      for (auto* m : {&base32, &adapted32}) m->reset();
      for (auto* m : {&base64, &adapted64}) m->reset();
      d.b32 += sequence_nll(base32.forward(ids), ids);
      d.a32 += sequence_nll(adapted32.forward(ids), ids);
      d.b64 += sequence_nll(base64.forward(ids), ids);
      d.a64 += sequence_nll(adapted64.forward(ids), ids);
      d.n += int64_t(ids.size()) - 1;
      d.tokens += int64_t(ids.size());
      for (int64_t t = first; t < last; ++t)
        for (int l = 0; l < L; ++l) {
          std::multiset<int> b, a;
          for (int j = 0; j < k; ++j) b.insert(before.expert(t, l, j)), a.insert(after.expert(t, l, j));
          d.changed += b != a;
        }
    }
  }
  for (const auto& d : effect["domains"]) {
    const std::string name = d["domain"];
    ASSERT_TRUE(sums.count(name)) << name;
    const auto& w = sums[name];
    EXPECT_EQ(d["tokens"], w.tokens) << name;
    EXPECT_EQ(d["predicted_tokens"], w.n) << name;
    const double lb = d["loss_before"], la = d["loss_after"];
    EXPECT_NEAR(lb, w.b32 / double(w.n), 1e-9 * lb) << name;
    EXPECT_NEAR(la, w.a32 / double(w.n), 1e-9 * la) << name;
    EXPECT_NEAR(lb, w.b64 / double(w.n), 1e-4) << name;
    EXPECT_NEAR(la, w.a64 / double(w.n), 1e-4) << name;
    EXPECT_NEAR(d["routing_changed"].get<double>(), double(w.changed) / double(w.tokens * L), 1e-12) << name;
    EXPECT_EQ(index["finetune"]["heldout_loss_before_after"][name][0].get<double>(), lb);
    // The base's load per layer is the statistics file's (the same trace, counted by other code).
    if (name != "all") {
      const nlohmann::json* sd = nullptr;
      for (const auto& x : stats["domains"]) if (x["name"] == name) sd = &x;
      ASSERT_NE(sd, nullptr) << name;
      for (int l = 0; l < L; ++l)
        for (size_t e = 0; e < d["load_before"][size_t(l)].size(); ++e)
          EXPECT_NEAR(d["load_before"][size_t(l)][e].get<double>(), (*sd)["layers"][size_t(l)]["load_share"][e].get<double>(), 1e-12);
    }
  }
  // Trained on these very lines, the adapted model predicts them better than the base did.
  for (const auto& d : effect["domains"])
    if (d["domain"] == "arithmetic") EXPECT_LT(d["loss_after"].get<double>(), d["loss_before"].get<double>());
  EXPECT_NE(stdout_text.find("arithmetic *"), std::string::npos) << stdout_text;
  EXPECT_TRUE(fs::exists(ft["figure_after"].get<std::string>()));
}

TEST(Demo, WritesAReportFolderWhoseIndexMatchesItsFiles) {
  const fs::path tmp = fs::temp_directory_path() / ("moelab-demo-test-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  // Two domains of different text, so the per-domain statistics have something to separate.
  {
    std::ofstream corpus(tmp / "heldout.jsonl");
    for (int i = 0; i < 6; ++i) {
      corpus << nlohmann::json{{"text", "What is " + std::to_string(17 * i) + " + 25?\nAnswer: " + std::to_string(17 * i + 25)},
                               {"domain", "arithmetic"}}.dump() << "\n";
      corpus << nlohmann::json{{"text", "The licensee may copy and distribute verbatim copies of the program's source code."},
                               {"domain", "legal"}}.dump() << "\n";
    }
    // Step 7's training data: the held-out arithmetic lines themselves (so their loss must fall) and other
    // domains the domain filter must leave out.
    std::ofstream train(tmp / "train.jsonl");
    for (int i = 0; i < 6; ++i) {
      train << nlohmann::json{{"text", "What is " + std::to_string(17 * i) + " + 25?\nAnswer: " + std::to_string(17 * i + 25)},
                              {"domain", "arithmetic"}}.dump() << "\n";
      train << nlohmann::json{{"text", "Permission is hereby granted, free of charge."}, {"domain", "legal"}}.dump() << "\n";
    }
  }
  const auto out = tmp / "report";
  const std::string cmd = std::string(MOELAB_BIN) + " demo --model " + model_dir("mixtral-4e-gqa-f32") +
                          " --corpus " + (tmp / "heldout.jsonl").string() + " --output " + out.string() +
                          " --max-new-tokens 4 --hellaswag-items 3 --no-plots --threads 1 --finetune-data " + (tmp / "train.jsonl").string() +
                          " --finetune-domain arithmetic --finetune-steps 8 >" +
                          (tmp / "stdout.txt").string() + " 2>&1";
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file_bytes(tmp / "stdout.txt");

  const auto index = nlohmann::json::parse(read_file_bytes(out / "index.json"));
  EXPECT_EQ(index["format"], "moelab-demo-v1");
  for (const std::string e : {"ref", "cpu-nf4"}) {
    EXPECT_EQ(index["generations"][e]["tokens"].size(), 4u) << e;
    EXPECT_GT(index["generations"][e]["decode_tokens_per_second"].get<double>(), 0) << e;
  }
  // The diff's headline figure is the relative L2 between the two engines' logits on the prompt and the
  // reference's continuation, recomputed here from the engines themselves (cpu-nf4 with the demo's
  // defaults and one thread, both deterministic), and it is the figure in the diff file. Only the
  // order of the float64 sums may differ: 1e-9 relative.
  {
    const auto ck = Checkpoint::open(model_dir("mixtral-4e-gqa-f32"));
    const Tokenizer tok(ck->tokenizer_path());
    auto ids = tok.encode(index["prompt"].get<std::string>());
    for (const auto& t : index["generations"]["ref"]["tokens"]) ids.push_back(t.get<int32_t>());
    ref::Model<float> ref_engine(*ck);
    cpu::Nf4Engine nf4_engine(*ck, cpu::EngineOptions{.threads = 1});
    const double want = rel_l2(nf4_engine.forward(ids), ref_engine.forward(ids));
    const double got = index["diff"]["logits_rel_l2"].get<double>();
    EXPECT_NEAR(got, want, 1e-9 * want);
    const auto diff_file = nlohmann::json::parse(read_file_bytes(index["diff"]["path"].get<std::string>()));
    EXPECT_EQ(diff_file["tokens"].get<size_t>(), ids.size());
    EXPECT_EQ(diff_file["logits"]["rel_l2"].get<double>(), got);
  }

  // The trace holds what the index says, labelled by the corpus's two domains.
  const auto trace = analysis::read_trace(index["trace"]["path"].get<std::string>());
  EXPECT_EQ(trace.num_tokens(), index["trace"]["tokens"].get<int64_t>());
  EXPECT_EQ(trace.num_sequences(), 12);

  // The index's domain spread is recomputed here from the statistics file's load shares.
  const auto stats = nlohmann::json::parse(read_file_bytes(index["stats"]["path"].get<std::string>()));
  ASSERT_EQ(stats["domains"].size(), 2u);
  const auto& spread = index["stats"]["domain_spread_per_layer"];
  ASSERT_EQ(spread.size(), stats["overall"]["layers"].size());
  for (size_t l = 0; l < spread.size(); ++l) {
    double sum = 0;
    for (const auto& d : stats["domains"]) {
      double tv = 0;
      for (size_t e = 0; e < d["layers"][l]["load_share"].size(); ++e)
        tv += std::abs(d["layers"][l]["load_share"][e].get<double>() -
                       stats["overall"]["layers"][l]["load_share"][e].get<double>());
      sum += tv / 2;
    }
    EXPECT_NEAR(spread[l].get<double>(), sum / 2, 1e-12) << "layer " << l;
  }

  // The SVG figure draws every (layer, domain, expert) share of the statistics file, bar height to scale.
  const std::string svg = read_file_bytes(index["stats"]["figure"].get<std::string>());
  const std::regex bar(R"re(<rect class="bar" data-domain="([^"]+)" data-expert="(\d+)" data-share="([0-9.]+)" x="[0-9.]+" y="[0-9.]+" width="[0-9.]+" height="([0-9.]+)")re");
  std::map<std::string, size_t> domain_index;
  for (size_t d = 0; d < stats["domains"].size(); ++d) domain_index[stats["domains"][d]["name"]] = d;
  size_t bars = 0, layer = 0, in_layer = 0;
  const size_t per_layer = stats["domains"].size() * stats["domains"][0]["layers"][0]["load_share"].size();
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), bar); it != std::sregex_iterator(); ++it, ++bars) {
    const auto& m = *it;
    const double share = std::stod(m[3].str()), height = std::stod(m[4].str());
    const double want = stats["domains"][domain_index.at(m[1].str())]["layers"][layer]["load_share"][std::stoul(m[2].str())];
    EXPECT_NEAR(share, want, 1e-6) << m[0].str();
    EXPECT_NEAR(height, want * analysis::kLoadFigureBarScale, 1e-2) << m[0].str();
    if (++in_layer == per_layer) ++layer, in_layer = 0;
  }
  EXPECT_EQ(bars, per_layer * stats["overall"]["layers"].size());
  // The title fits (the figure is at least as wide as the title at 0.62 em per character) and each layer's
  // panel has a y axis: ticks labelled with the share they stand at, one 0% tick per layer.
  std::smatch sm;
  ASSERT_TRUE(std::regex_search(svg, sm, std::regex(R"re(<svg [^>]*width="([0-9.]+)")re")));
  const double svg_width = std::stod(sm[1].str());
  ASSERT_TRUE(std::regex_search(svg, sm, std::regex(R"re(<text x="10" y="16" font-size="13">([^<]+)</text>)re")));
  EXPECT_GE(svg_width, 0.62 * 13 * double(sm[1].str().size())) << sm[1].str();
  const std::regex tick(R"re(<text class="tick-label" data-share="([0-9.]+)" x="[0-9.]+" y="([0-9.]+)" text-anchor="end">(\d+)%</text>)re");
  size_t zero_ticks = 0, ticks = 0;
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), tick); it != std::sregex_iterator(); ++it, ++ticks) {
    const double share = std::stod((*it)[1].str());
    EXPECT_EQ(std::stoi((*it)[3].str()), int(std::lround(100 * share))) << (*it)[0].str();
    if (share == 0) ++zero_ticks;
  }
  EXPECT_EQ(zero_ticks, stats["overall"]["layers"].size());
  EXPECT_GE(ticks, 2 * stats["overall"]["layers"].size());

  // One result per task and engine, in the harness's layout, with the metrics the index shows. The
  // scores themselves are lm-evaluation-harness's (EvalParity checks the scoring against it); a random
  // fixture on 3 items has no other expected accuracy, so none is asserted here. What can be checked
  // is a closed form: byte_perplexity = 2^bits_per_byte (both are the summed log-likelihood over bytes).
  ASSERT_EQ(index["evals"].size(), 4u);
  std::set<std::pair<std::string, std::string>> runs;
  for (const auto& e : index["evals"]) {
    const auto results = nlohmann::json::parse(read_file_bytes(e["results"].get<std::string>()));
    const std::string task = e["task"];
    runs.insert({task, e["engine"].get<std::string>()});
    ASSERT_TRUE(results["results"].contains(task)) << results.dump();
    const auto& metrics = results["results"][task];
    for (const auto& [name, value] : e["metrics"].items()) {
      if (!value.is_number() || std::isnan(value.get<double>())) continue;  // stderr "N/A"
      ASSERT_TRUE(metrics.contains(name)) << name;
      EXPECT_EQ(metrics[name].get<double>(), value.get<double>()) << task << " " << name;
    }
    if (task == "hellaswag") {
      EXPECT_EQ(e["documents"], 3);
    } else {
      const double bpb = metrics["bits_per_byte,none"], byte_ppl = metrics["byte_perplexity,none"];
      EXPECT_NEAR(byte_ppl, std::exp2(bpb), 1e-12 * byte_ppl);
    }
  }
  EXPECT_EQ(runs, (std::set<std::pair<std::string, std::string>>{
                      {"hellaswag", "ref"}, {"hellaswag", "cpu-nf4"}, {"wikitext", "ref"}, {"wikitext", "cpu-nf4"}}));
  EXPECT_TRUE(index["plots"].empty());  // --no-plots

  // The cache simulation of the demo's own trace: every policy for C = 1..E, none above Belady's optimum,
  // the figure with a point per policy and size, the time model's predictions with their assumptions.
  const auto cache = nlohmann::json::parse(read_file_bytes(index["cachesim"]["path"].get<std::string>()));
  EXPECT_EQ(cache["format"], "moelab-cachesim-v1");
  EXPECT_EQ(cache["trace"]["tokens"], index["trace"]["tokens"]);
  const int experts = cache["trace"]["num_experts"];
  const auto& rates = index["cachesim"]["hit_rate"];
  ASSERT_EQ(rates.size(), 8u);  // with next-layer-gate: the demo records prefetch guesses
  ASSERT_EQ(rates["belady"].size(), size_t(experts));
  for (const auto& [policy, r] : rates.items()) {
    ASSERT_EQ(r.size(), size_t(experts)) << policy;
    for (int c = 0; c < experts; ++c)
      EXPECT_LE(r[size_t(c)].get<double>(), rates["belady"][size_t(c)].get<double>()) << policy << " C=" << c + 1;
  }
  const std::string cache_svg = read_file_bytes(index["cachesim"]["figure"].get<std::string>());
  size_t points = 0;
  for (size_t at = cache_svg.find("class=\"point\""); at != std::string::npos; at = cache_svg.find("class=\"point\"", at + 1))
    ++points;
  EXPECT_EQ(points, 8u * size_t(experts));
  EXPECT_EQ(cache["time_model"]["predictions"].size(), 8u * size_t(experts));
  EXPECT_FALSE(cache["time_model"]["assumptions"].empty());

  check_finetune_step(index, trace, stats, read_file_bytes(tmp / "stdout.txt"));
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace moelab::test
