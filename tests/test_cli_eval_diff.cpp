// `moelab eval` and `moelab diff` as a user runs them, on the fixture models and the fixture eval data,
// with their outputs checked against independent values: lm-evaluation-harness 0.4.9.2's own results
// on the same model and documents (tests/fixtures/evals/parity, scripts/eval_parity.py), transformers'
// forward dump (the fixtures' expected.safetensors), and the library's diff computed in-process.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "analysis/diff.hpp"
#include "core/checkpoint.hpp"
#include "core/spawn.hpp"
#include "fixture_util.hpp"
#include "optimized/cpu/engine.hpp"
#include "reference/model.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json read_json(const fs::path& p) { return json::parse(read_file_bytes(p)); }

std::vector<json> read_jsonl(const fs::path& p) {
  std::vector<json> out;
  std::istringstream in(read_file_bytes(p));
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

// The per-sample file `eval --log-samples` wrote for `task`: the one samples_<task>_<timestamp>.jsonl
// in the folder of --output `results` (lm_eval's naming). Empty, with a failure, unless exactly one.
fs::path samples_file(const fs::path& results, const std::string& task) {
  const std::string prefix = "samples_" + task + "_";
  std::vector<fs::path> found;
  for (const auto& e : fs::directory_iterator(results.parent_path())) {
    const std::string name = e.path().filename().string();
    if (name.size() > prefix.size() + 6 && name.starts_with(prefix) && name.ends_with(".jsonl")) found.push_back(e.path());
  }
  if (found.size() == 1) return found[0];
  ADD_FAILURE() << found.size() << " files " << prefix << "*.jsonl in " << results.parent_path();
  return {};
}

// The harness's own samples file for a parity task, as `lm_eval --log_samples` wrote it
// (scripts/eval_parity.py keeps it in tests/fixtures/evals/lm_eval_output/).
std::vector<json> harness_samples(const std::string& task) {
  const fs::path dir = fixture("evals/lm_eval_output/fixture-model");
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("samples_" + task + "_2")) return read_jsonl(e.path());
  }
  ADD_FAILURE() << "no samples_" << task << "_<date>.jsonl in " << dir;
  return {};
}

// Our saved record against the harness's saved record of the same document: the same fields in the same
// order, equal where the model does not enter (doc, target, arguments, filter, metric names, the three
// hashes), and responses written as the harness writes them (str() of each value: "-12.5", "False"),
// equal within `tol` for log-likelihoods.
void expect_saved_like_harness(const json& ours, const json& theirs, double tol) {
  std::vector<std::string> our_keys, their_keys;
  for (const auto& [k, v] : ours.items()) our_keys.push_back(k);
  for (const auto& [k, v] : theirs.items()) their_keys.push_back(k);
  // (json sorts keys; the order on disk is checked on the raw lines by scripts/check_lm_eval_format.py)
  for (const auto& k : their_keys) EXPECT_TRUE(ours.contains(k)) << "missing " << k;
  for (const char* k : {"doc_id", "doc", "target", "arguments", "filter", "metrics", "doc_hash", "prompt_hash", "target_hash"})
    EXPECT_EQ(ours[k], theirs[k]) << k;
  for (const char* k : {"resps", "filtered_resps"}) {
    const std::string a = ours[k].dump(), b = theirs[k].dump();
    // Same shape and strings, numbers compared after parsing: flatten both to their leaves.
    std::vector<std::string> la, lb;
    std::function<void(const json&, std::vector<std::string>&)> leaves = [&](const json& j, std::vector<std::string>& out) {
      if (j.is_array()) for (const auto& x : j) leaves(x, out);
      else out.push_back(j.get<std::string>());  // every leaf is a string on disk
    };
    leaves(ours[k], la);
    leaves(theirs[k], lb);
    ASSERT_EQ(la.size(), lb.size()) << k << ": " << a << " vs " << b;
    for (size_t i = 0; i < la.size(); ++i) {
      char* end = nullptr;
      const double x = std::strtod(lb[i].c_str(), &end);
      if (end != lb[i].c_str() && *end == 0) EXPECT_NEAR(std::stod(la[i]), x, tol) << k << "[" << i << "]";
      else EXPECT_EQ(la[i], lb[i]) << k << "[" << i << "]";
    }
  }
}

class CliEvalDiff : public ::testing::Test {
 protected:

  using Run = test::MoelabRun;
  // The real binary, started without a shell (arguments passed as they are).
  Run moelab(std::vector<std::string> args) { return test::run_moelab(std::move(args), tmp); }
  static void expect_one_line_error(const Run& r, const std::string& needle) {
    EXPECT_EQ(r.status, 1) << r.err;
    EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << "missing '" << needle << "' in: " << r.err;
  }
  std::string path(const std::string& name) const { return (tmp / name).string(); }

  TempDir scratch{"moelab-cli-eval-diff"};
  const fs::path& tmp = scratch.path();
};

const std::string kModel = "mixtral-4e-gqa-f32";  // the model the harness oracles were run on

std::string token_list(const std::vector<int32_t>& t) {
  std::string s;
  for (int32_t x : t) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// ---- eval ----

// Tolerance of a summed log-likelihood against the harness's (transformers FP32 vs our FP32 reference,
// ~1e-6 relative on logits; a log-prob of magnitude ~10 carries ~1e-5 absolute per token, continuations
// here are a few tokens): 1e-4 absolute, as tests/test_evals.cpp's parity tests state.
constexpr double kTolChoice = 1e-4;

TEST_F(CliEvalDiff, EvalMultipleChoiceWritesTheHarnessResultsAndSamples) {
  const json oracle = read_json(fixture("evals/parity/parity_mc.json"));
  const auto out = path("results.json");
  const Run r = moelab({"eval", "--model", model_dir(kModel), "--tasks", "multiple_choice", "--data",
                        fixture("evals/tasks/mc_test.jsonl"), "--output", out, "--log-samples"});
  ASSERT_EQ(r.status, 0) << r.err;
  // The table: each metric with our score in percent, and the run's summary line.
  EXPECT_NE(r.out.find("acc_norm,none"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("6 documents, 0-shot, engine ref"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("wrote " + out + "\n"), std::string::npos) << r.out;

  const json got = read_json(out);
  ASSERT_TRUE(got["results"].contains("multiple_choice")) << got.dump(1);
  const json& res = got["results"]["multiple_choice"];
  for (const auto& [k, v] : oracle["results"].items()) {
    ASSERT_TRUE(res.contains(k)) << k;
    // Scores are ratios of small counts and their stderrs: equal to the last bit.
    EXPECT_DOUBLE_EQ(res[k].get<double>(), v.get<double>()) << k;
  }
  EXPECT_EQ(got["n-samples"]["multiple_choice"]["effective"], 6);
  EXPECT_EQ(got["n-shot"]["multiple_choice"], 0);

  const auto samples = read_jsonl(samples_file(out, "multiple_choice"));
  const auto& want = oracle["samples"];
  const auto theirs = harness_samples("parity_mc");
  ASSERT_EQ(samples.size(), want.size());
  ASSERT_EQ(samples.size(), theirs.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE("doc " + std::to_string(i));
    expect_saved_like_harness(samples[i], theirs[i], kTolChoice);
    for (const auto& [m, v] : want[i]["metrics"].items()) EXPECT_EQ(samples[i][m], v) << m;
  }
}

// Rolling log-likelihood (the wikitext task's type) over several windows; perplexities are continuous
// in the summed log-likelihoods: 1e-5 relative, sums within 1e-3 absolute (~130 tokens, see
// tests/test_evals.cpp).
TEST_F(CliEvalDiff, EvalRollingMatchesTheHarnessPerplexities) {
  const json oracle = read_json(fixture("evals/parity/parity_rolling.json"));
  const auto out = path("rolling.json");
  const Run r = moelab({"eval", "--model", model_dir(kModel), "--tasks", "rolling", "--data",
                        fixture("evals/tasks/rolling_test.jsonl"), "--output", out, "--log-samples"});
  ASSERT_EQ(r.status, 0) << r.err;
  const json got = read_json(out);
  const json& res = got["results"]["rolling"];
  for (const auto& [k, v] : oracle["results"].items()) {
    ASSERT_TRUE(res.contains(k)) << k;
    if (!v.is_number()) {
      EXPECT_EQ(res[k], v) << k;  // "N/A" stderr
      continue;
    }
    EXPECT_NEAR(res[k].get<double>(), v.get<double>(), 1e-5 * std::abs(v.get<double>())) << k;
  }
  const auto samples = read_jsonl(samples_file(out, "rolling"));
  const auto theirs = harness_samples("parity_rolling");
  ASSERT_EQ(samples.size(), oracle["samples"].size());
  ASSERT_EQ(samples.size(), theirs.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    const json& w = oracle["samples"][i];
    expect_saved_like_harness(samples[i], theirs[i], 1e-3);
    EXPECT_EQ(samples[i]["word_perplexity"][1], w["metrics"]["word_perplexity"][1]) << i;  // word count
    EXPECT_EQ(samples[i]["byte_perplexity"][1], w["metrics"]["byte_perplexity"][1]) << i;  // byte count
  }
}

// --limit takes the first documents only; the results say so; a document outside the task's form is
// one error line naming the file and line, before any model is loaded.
TEST_F(CliEvalDiff, EvalLimitAndBadRecords) {
  const json oracle = read_json(fixture("evals/parity/parity_mc.json"));
  const auto out = path("limited.json");
  const Run r = moelab({"eval", "--model", model_dir(kModel), "--tasks", "multiple_choice", "--data",
                        fixture("evals/tasks/mc_test.jsonl"), "--limit", "2", "--output", out, "--log-samples"});
  ASSERT_EQ(r.status, 0) << r.err;
  const json got = read_json(out);
  EXPECT_EQ(got["n-samples"]["multiple_choice"]["effective"], 2);
  EXPECT_EQ(got["config"]["limit"], 2);
  const auto samples = read_jsonl(samples_file(out, "multiple_choice"));
  ASSERT_EQ(samples.size(), 2u);
  // acc over the first two documents, from the harness's per-document scores.
  const double acc = (oracle["samples"][0]["metrics"]["acc"].get<double>() +
                      oracle["samples"][1]["metrics"]["acc"].get<double>()) / 2;
  EXPECT_DOUBLE_EQ(got["results"]["multiple_choice"]["acc,none"].get<double>(), acc);

  std::ofstream(path("bad.jsonl")) << R"({"query": "q", "choices": ["a", "b"], "gold": 0})" "\n"
                                   << R"({"prompt": "not a multiple-choice record"})" "\n";
  expect_one_line_error(moelab({"eval", "--model", "/nonexistent", "--tasks", "multiple_choice", "--data",
                                path("bad.jsonl")}),
                        path("bad.jsonl") + ":2: multiple_choice: record is neither the normalized form");
}

// ---- diff ----

// transformers' dump (the fixture's expected.safetensors has the forward dump's keys) against ref: the
// reference's stated agreement, 1e-5 relative L2 at every layer and on the logits, same experts.
TEST_F(CliEvalDiff, DiffTransformersDumpAgainstRefEveryLayer) {
  const auto cfg = ModelConfig::from_json_file(model_dir(kModel) + "/config.json");
  const auto json_out = path("diff.json");
  const auto dump = model_dir(kModel) + "/expected.safetensors";
  const Run r = moelab({"diff", "--model", model_dir(kModel), "--a", "dump:" + dump, "--b", "ref", "--json", json_out});
  ASSERT_EQ(r.status, 0) << r.err;
  const json d = read_json(json_out);
  EXPECT_EQ(d["format"], "moelab-diff-v1");
  EXPECT_EQ(d["a"], "dump:" + dump);
  EXPECT_EQ(d["b"], "ref");
  EXPECT_EQ(d["tokens"], 12);  // taken from the dump
  ASSERT_EQ(int(d["layers"].size()), cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; ++l) {
    const json& layer = d["layers"][size_t(l)];
    EXPECT_EQ(layer["layer"], l);
    EXPECT_LT(layer["hidden"]["rel_l2"].get<double>(), 1e-5) << l;
    EXPECT_LT(layer["router_logits"]["rel_l2"].get<double>(), 1e-5) << l;
    EXPECT_EQ(layer["router_topk_agreement"].get<double>(), 1.0) << l;
  }
  EXPECT_LT(d["logits"]["rel_l2"].get<double>(), 1e-5);
  EXPECT_EQ(d["logits"]["top1_agreement"].get<double>(), 1.0);
  // The table: a header, one line per layer, the logits line, and where the JSON went.
  EXPECT_EQ(r.out.rfind("diff: b = ref against a = dump:" + dump + ", 12 tokens\n", 0), 0u) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2 + cfg.num_layers + 1 + 1) << r.out;
  EXPECT_NE(r.out.find("wrote " + json_out), std::string::npos);
}

// Two engines: the CLI's report is the library's diff of the same two engines, and cpu-nf4's NF4
// weights show (relative L2 far above FP32 rounding). A dump against itself is zero everywhere.
TEST_F(CliEvalDiff, DiffEnginesIsTheLibrarysDiffAndADumpAgainstItselfIsZero) {
  const auto ck = Checkpoint::open(model_dir(kModel));
  const auto tokens = read_i32(SafetensorsFile(model_dir(kModel) + "/expected.safetensors"), "tokens");
  const auto json_out = path("engines.json");
  const Run r = moelab({"diff", "--model", model_dir(kModel), "--a", "ref", "--b", "cpu-nf4", "--token-ids",
                        token_list(tokens), "--json", json_out});
  ASSERT_EQ(r.status, 0) << r.err;
  const json d = read_json(json_out);
  ref::Model<float> reference(*ck);
  cpu::Nf4Engine nf4(*ck);  // the CLI's cpu-nf4 defaults: int8 activations, q8 lm_head
  const auto want = analysis::diff_records(analysis::ForwardRecord::run(reference, tokens),
                                           analysis::ForwardRecord::run(nf4, tokens), "ref", "cpu-nf4");
  ASSERT_EQ(d["layers"].size(), want.layers.size());
  // Same engines, same tokens: the same numbers up to the threads' chunking of FP32 sums (1e-4 of a
  // relative error that is itself ~1e-2).
  for (size_t l = 0; l < want.layers.size(); ++l) {
    const double got = d["layers"][l]["hidden"]["rel_l2"].get<double>();
    EXPECT_NEAR(got, want.layers[l].hidden.rel_l2, 1e-4 * want.layers[l].hidden.rel_l2) << l;
    EXPECT_GT(got, 1e-3) << "layer " << l << ": NF4 weights must show";
    EXPECT_EQ(d["layers"][l]["router_topk_agreement"].get<double>(), want.layers[l].topk_agreement) << l;
  }
  EXPECT_NEAR(d["logits"]["rel_l2"].get<double>(), want.logits.rel_l2, 1e-4 * want.logits.rel_l2);
  EXPECT_NEAR(d["logits"]["mean_kl"].get<double>(), want.mean_kl, 1e-3 * want.mean_kl);

  // forward --output, then the dump against itself: no model needed, zero everywhere.
  const auto dump = path("fwd.safetensors");
  ASSERT_EQ(moelab({"forward", "--model", model_dir(kModel), "--token-ids", token_list(tokens), "--output", dump}).status, 0);
  const auto self_json = path("self.json");
  const Run s = moelab({"diff", "--a", "dump:" + dump, "--b", "dump:" + dump, "--json", self_json});
  ASSERT_EQ(s.status, 0) << s.err;
  const json z = read_json(self_json);
  for (const auto& layer : z["layers"]) {
    EXPECT_EQ(layer["hidden"]["rel_l2"].get<double>(), 0.0);
    EXPECT_EQ(layer["router_topk_agreement"].get<double>(), 1.0);
  }
  EXPECT_EQ(z["logits"]["rel_l2"].get<double>(), 0.0);
  EXPECT_EQ(z["logits"]["mean_kl"].get<double>(), 0.0);
}

TEST_F(CliEvalDiff, DiffInputErrorsAreOneLine) {
  const auto dump = model_dir(kModel) + "/expected.safetensors";
  expect_one_line_error(moelab({"diff", "--model", model_dir(kModel), "--a", "dump:" + dump, "--b", "ref",
                                "--token-ids", "1,2,3"}),
                        "the dump's tokens differ from the tokens given");
  expect_one_line_error(moelab({"diff", "--model", model_dir(kModel), "--a", "ref", "--b", "ref-f64"}),
                        "give --prompt or --token-ids");
  expect_one_line_error(moelab({"diff", "--model", model_dir(kModel), "--a", "ref", "--b", "nonsense", "--token-ids", "1,2"}),
                        "unknown engine 'nonsense'");
}

}  // namespace
}  // namespace moelab::test
