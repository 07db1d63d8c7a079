// `moelab demo` end to end on a fixture model: every output named in index.json exists and agrees with
// what it indexes (the trace's tokens, the statistics' per-domain loads, the cache simulation of the trace,
// one result per task and engine), and the diff's figure is the one the two engines give when run here
// directly.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "analysis/load_figure.hpp"
#include "analysis/trace.hpp"
#include "core/checkpoint.hpp"
#include "core/tokenizer.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

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
  }
  const auto out = tmp / "report";
  const std::string cmd = std::string(MOELAB_BIN) + " demo --model " + model_dir("mixtral-4e-gqa-f32") +
                          " --corpus " + (tmp / "heldout.jsonl").string() + " --output " + out.string() +
                          " --max-new-tokens 4 --hellaswag-items 3 --no-plots --threads 1 >" +
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
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace moelab::test
