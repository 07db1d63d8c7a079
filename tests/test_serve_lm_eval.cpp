// lm-evaluation-harness as a client of `moelab serve`: three-way agreement on the parity tasks.
// scripts/serve_lm_eval_parity.py (heavy tier) ran lm-eval 0.4.9.2's `local-completions` model against
// `moelab serve` on the fixture model, and its `hf` model on the same checkpoint, and recorded both in
// tests/fixtures/serve/lm_eval/<task>.json. Here moelab's own evals score the same tasks (ref engine, the
// context the script states), and every per-sample log-likelihood, is_greedy, filtered response and metric
// must agree with both recordings.
//
// Tolerances are the existing parity test's (tests/test_evals.cpp), for the same reasons:
// - hf: transformers' FP32 forward against our Eigen one (~1e-6 relative on logits): 1e-4 absolute on a
//   continuation's sum (<= 20 tokens), 1e-3 on a rolling document's (up to ~130 tokens).
// - local-completions: the server scores each (context + continuation) from an empty cache in one forward,
//   while moelab's evals forward a multiple-choice item's shared context once and each continuation from
//   the cache (evals/loglikelihood.cpp): the same engine, but cache-consistent rather than bit-equal
//   (FP32 rounding, well inside the same limits). Rolling windows are single requests on both sides.
// - Metrics: equal (acc, acc_norm, exact_match are decided by the per-sample comparisons); perplexities
//   are continuous in the summed log-likelihoods: 1e-5 relative.
// The recorded local-completions numbers are also replayed against a live server (this build's): the
// harness's requests rebuilt from the recorded arguments, its parse_logprobs applied to the answers.
// Generated text: the server decodes a completion inside its prompt (as every OpenAI-compatible server
// does), so a first piece that starts a word keeps its space; lm-eval's hf model decodes the new tokens
// alone with the slow LlamaTokenizer, which drops it (moelab's evals follow hf). So the served text equals
// moelab's, or moelab's with one leading space; filtered responses and scores are equal.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint.hpp"
#include "core/tokenizer.hpp"
#include "evals/docs.hpp"
#include "evals/encode.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"
#include "fixture_util.hpp"
#include "reference/model.hpp"
#include "serve/server.hpp"

#include <httplib.h>  // after Eigen (httplib's <resolv.h> defines `_res`)

#include <thread>

namespace moelab {
namespace {

using nlohmann::json;
using namespace moelab::evals;

constexpr double kTolChoice = 1e-4, kTolRolling = 1e-3;
const char* const kSides[] = {"local-completions", "hf"};

class ServeLmEvalParity : public ::testing::Test {
 protected:
  void SetUp() override {
    ck = Checkpoint::open(test::model_dir("mixtral-4e-gqa-f32"));
    tok = std::make_unique<Tokenizer>(ck->tokenizer_path());
    codec = TextCodec::from(*tok);
  }
  TaskResult run(const std::string& parity, const std::string& spec_name, const std::string& data,
                 const std::string& fewshot = "", int shots = 0) {
    std::ifstream in(test::fixture("serve/lm_eval/" + parity + ".json"));
    oracle = json::parse(in, nullptr, false);
    if (oracle.is_discarded()) throw std::runtime_error("cannot read the fixture for " + parity);
    ref::ModelOptions mo;
    mo.max_context = oracle["moelab_context"].get<int>();
    engine = std::make_unique<ref::Model<float>>(*ck, mo);
    TaskSpec spec = task_spec(spec_name);
    const std::string dir = test::fixture("evals/tasks/");
    const auto docs = read_docs(spec_name, spec.type, dir + data);
    const auto fs = fewshot.empty() ? std::vector<Doc>{} : read_docs(spec_name, spec.type, dir + fewshot);
    // The task YAMLs' settings (tests/fixtures/evals/tasks), as tests/test_evals.cpp sets them.
    if (parity == "parity_gen") spec.until = {"Question:", "\n\n", "</s>"}, spec.max_gen_toks = 16;
    if (parity == "parity_wino") spec.metrics = {"acc"};
    if (parity == "parity_mc_fewshot") spec.metrics = {"acc", "acc_norm"};
    RunOptions o;
    o.shots = shots;
    return run_task(*engine, codec, spec, docs, fs, false, o);
  }

  void expect_metrics(const TaskResult& got, double rel_tol) {
    for (const char* side : kSides) {
      SCOPED_TRACE(side);
      for (const auto& [k, v] : oracle[side]["results"].items()) {
        if (!v.is_number()) continue;  // "N/A" stderr
        ASSERT_TRUE(got.metrics.count(k)) << k;
        if (rel_tol == 0) {
          EXPECT_DOUBLE_EQ(got.metrics.at(k), v.get<double>()) << k;
        } else {
          EXPECT_NEAR(got.metrics.at(k), v.get<double>(), rel_tol * std::abs(v.get<double>())) << k;
        }
      }
    }
  }

  void expect_choice_samples(const TaskResult& got) {
    for (const char* side : kSides) {
      const auto& want = oracle[side]["samples"];
      ASSERT_EQ(want.size(), got.samples.size()) << side;
      for (size_t i = 0; i < want.size(); ++i) {
        SCOPED_TRACE(std::string(side) + " doc " + std::to_string(i));
        const auto& w = want[i];
        const auto& g = got.samples[i];
        ASSERT_EQ(w["arguments"].size(), g["arguments"].size());
        for (size_t k = 0; k < w["arguments"].size(); ++k) {
          EXPECT_EQ(w["arguments"][k], json(g["arguments"][k]));
          EXPECT_NEAR(g["filtered_resps"][k][0].get<double>(), w["filtered_resps"][k][0].get<double>(), kTolChoice);
          EXPECT_EQ(g["filtered_resps"][k][1].get<bool>(), w["filtered_resps"][k][1].get<bool>());
        }
        for (const auto& [m, v] : w["metrics"].items()) EXPECT_EQ(g[m].get<double>(), v.get<double>()) << m;
        EXPECT_EQ(g["doc_hash"].get<std::string>(), w["doc_hash"].get<std::string>());
      }
    }
  }

  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<Tokenizer> tok;
  TextCodec codec;
  std::unique_ptr<ref::Model<float>> engine;
  json oracle;
};

TEST_F(ServeLmEvalParity, MultipleChoiceZeroShot) {
  const auto r = run("parity_mc", "multiple_choice", "mc_test.jsonl");
  expect_choice_samples(r);
  expect_metrics(r, 0);
}

TEST_F(ServeLmEvalParity, MultipleChoiceTwoShot) {
  const auto r = run("parity_mc_fewshot", "multiple_choice", "mc_test.jsonl", "mc_train.jsonl", 2);
  expect_choice_samples(r);
  expect_metrics(r, 0);
}

TEST_F(ServeLmEvalParity, WinograndePartialScoring) {
  const auto r = run("parity_wino", "winogrande", "wino_test.jsonl");
  expect_choice_samples(r);
  expect_metrics(r, 0);
}

TEST_F(ServeLmEvalParity, RollingPerplexity) {
  const auto r = run("parity_rolling", "rolling", "rolling_test.jsonl");
  for (const char* side : kSides) {
    const auto& want = oracle[side]["samples"];
    ASSERT_EQ(want.size(), r.samples.size()) << side;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(r.samples[i]["filtered_resps"][0].get<double>(), want[i]["filtered_resps"][0].get<double>(),
                  kTolRolling)
          << side << " doc " << i;
      EXPECT_EQ(r.samples[i]["word_perplexity"][1], want[i]["metrics"]["word_perplexity"][1]) << side;
    }
  }
  EXPECT_GE(r.samples[1]["windows"].get<int>(), 2);  // the long document spans several windows
  expect_metrics(r, 1e-5);
}

TEST_F(ServeLmEvalParity, GreedyGeneration) {
  const auto r = run("parity_gen", "generate", "gen_test.jsonl");
  for (const char* side : kSides) {
    const auto& want = oracle[side]["samples"];
    ASSERT_EQ(want.size(), r.samples.size()) << side;
    for (size_t i = 0; i < want.size(); ++i) {
      SCOPED_TRACE(std::string(side) + " sample " + std::to_string(i));
      const auto& w = want[i];
      const auto& g = r.samples[i];
      EXPECT_EQ(g["doc_id"].get<int>(), w["doc_id"].get<int>());
      EXPECT_EQ(g["filter"].get<std::string>(), w["filter"].get<std::string>());
      const std::string ours = g["resps"][0][0].get<std::string>(), theirs = w["resps"][0][0].get<std::string>();
      if (std::string(side) == "hf") {
        EXPECT_EQ(theirs, ours);
      } else {
        EXPECT_TRUE(theirs == ours || theirs == " " + ours) << json(theirs) << " vs " << json(ours);
      }
      EXPECT_EQ(json(g["filtered_resps"]), w["filtered_resps"]);
      EXPECT_EQ(g["exact_match"].get<double>(), w["metrics"]["exact_match"].get<double>());
    }
  }
  expect_metrics(r, 0);
}

// lm-eval's local-completions, replayed: for each recorded (context, continuation), the token ids the
// harness sent (its _encode_pair, which moelab's encode_pair reproduces; (ctx + cont)[-(max_length - 1):]),
// the payload it sends (echo, max_tokens 1, logprobs 1, temperature 0) to an in-process server on this build,
// and its parse_logprobs (sum of token_logprobs[ctxlen:-1]; is_greedy when each equals the best of its
// top_logprobs). The answers equal the recorded ones: exactly on the machine that recorded them; within
// kTolChoice elsewhere (another CPU's kernels round differently).
TEST_F(ServeLmEvalParity, LiveServerAnswersTheHarnessAsRecorded) {
  auto server_engine = std::make_unique<ref::Model<float>>(*ck);
  serve::ServerOptions o;
  o.port = 0;
  o.log_requests = false;
  serve::Server server(*server_engine, *tok, o);
  const int port = server.bind();
  std::thread runner([&] { server.run(); });
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(60, 0);
  const int max_length = 64 - 1;  // local-completions' max_length=64, minus the generated token
  int requests = 0;
  for (const std::string task : {"parity_mc", "parity_mc_fewshot", "parity_wino"}) {
    std::ifstream in(test::fixture("serve/lm_eval/" + task + ".json"));
    const json rec = json::parse(in);
    for (const auto& sample : rec["local-completions"]["samples"]) {
      for (size_t k = 0; k < sample["arguments"].size(); ++k) {
        const auto [ctx, cont] = encode_pair(codec, sample["arguments"][k][0].get<std::string>(),
                                             sample["arguments"][k][1].get<std::string>());
        Tokens all = ctx;
        all.insert(all.end(), cont.begin(), cont.end());
        const int over = std::max(0, int(all.size()) - max_length);
        const Tokens inp(all.begin() + over, all.end());
        const size_t ctxlen = ctx.size() - size_t(over);
        const json payload{{"model", "mixtral-4e-gqa-f32"}, {"prompt", json::array({inp})}, {"temperature", 0},
                           {"max_tokens", 1},          {"logprobs", 1},                  {"seed", 1234},
                           {"echo", true}};
        auto r = client.Post("/v1/completions", payload.dump(), "application/json");
        ASSERT_TRUE(r);
        ASSERT_EQ(r->status, 200) << r->body;
        const json lp = json::parse(r->body)["choices"][0]["logprobs"];
        double sum = 0;
        bool greedy = true;
        for (size_t i = ctxlen; i + 1 < lp["token_logprobs"].size(); ++i) {
          const double v = lp["token_logprobs"][i].get<double>();
          sum += v;
          double best = -INFINITY;
          for (const auto& [key, t] : lp["top_logprobs"][i].items()) best = std::max(best, t.get<double>());
          greedy = greedy && v == best;
        }
        EXPECT_NEAR(sum, sample["filtered_resps"][k][0].get<double>(), kTolChoice) << task << " " << sample["arguments"][k];
        EXPECT_EQ(greedy, sample["filtered_resps"][k][1].get<bool>()) << task << " " << sample["arguments"][k];
        requests++;
      }
    }
  }
  EXPECT_GT(requests, 30);
  server.stop();
  runner.join();
}

}  // namespace
}  // namespace moelab
