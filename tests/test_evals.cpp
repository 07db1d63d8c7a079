// Eval scoring: each harness rule on its own, then parity with lm-evaluation-harness 0.4.9.2 on the
// fixture model (tests/fixtures/evals/parity/*.json, written by scripts/eval_parity.py).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/checkpoint.hpp"
#include "core/tokenizer.hpp"
#include "evals/docs.hpp"
#include "evals/encode.hpp"
#include "evals/extract.hpp"
#include "evals/loglikelihood.hpp"
#include "evals/metrics.hpp"
#include "evals/pyrandom.hpp"
#include "evals/rolling.hpp"
#include "evals/runner.hpp"
#include "evals/tasks.hpp"
#include "reference/model.hpp"
#include "tests/fixture_util.hpp"

using namespace moelab;
using namespace moelab::evals;
using nlohmann::json;

namespace {
json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  return json::parse(f);
}
}  // namespace

// ---- rules, one at a time ----

TEST(EvalPyRandom, MatchesCpythonSample) {
  // random.Random(1234).sample(range(6), 2) three times; sample(range(100), 7) (set method).
  PyRandom r(1234);
  EXPECT_EQ(r.sample(6, 2), (std::vector<size_t>{3, 0}));
  EXPECT_EQ(r.sample(6, 2), (std::vector<size_t>{0, 5}));
  EXPECT_EQ(r.sample(6, 2), (std::vector<size_t>{4, 0}));
  PyRandom r2(1234);
  EXPECT_EQ(r2.sample(100, 7), (std::vector<size_t>{99, 56, 14, 0, 11, 74, 4}));
  PyRandom r3((uint64_t(1) << 40) + 5);  // a seed of two 32-bit words
  EXPECT_EQ(r3.getrandbits(32), 2166296868u);
}

TEST(EvalMetrics, AccNormDividesByCharactersAccBytesByBytes) {
  // "é" is 1 character, 2 bytes. lls/len: chars -> [-1, -0.9], bytes -> [-1, -1.8/2... ]
  const std::vector<std::string> choices = {"ab", "\xC3\xA9"};
  const ChoiceScores s = score_choices({-2.0, -1.8}, {false, true}, choices, 0);
  EXPECT_EQ(s.pred, 1u);        // -1.8 > -2.0
  EXPECT_EQ(s.pred_norm, 0u);   // -2/2 = -1 > -1.8/1
  EXPECT_EQ(s.pred_bytes, 1u);  // -1.8/2 = -0.9 > -1
  EXPECT_EQ(s.acc, 0.0);
  EXPECT_EQ(s.acc_norm, 1.0);
  EXPECT_EQ(s.acc_bytes, 0.0);
  EXPECT_EQ(s.exact_match, 0.0);
  EXPECT_EQ(score_choices({-1.0, -1.0}, {false, false}, {"a", "b"}, 0).pred, 0u);  // ties: first
}

TEST(EvalMetrics, StderrIsSampleStdOverSqrtN) {
  const std::vector<double> x = {1, 0, 1, 1};
  EXPECT_DOUBLE_EQ(mean(x), 0.75);
  EXPECT_DOUBLE_EQ(mean_stderr(x), std::sqrt((3 * 0.0625 + 0.5625) / 3.0) / 2.0);
}

TEST(EvalMetrics, PerplexitiesAreCorpusLevel) {
  const Weighted w = {{-10.0, 4.0}, {-6.0, 4.0}};
  EXPECT_DOUBLE_EQ(weighted_perplexity(w), std::exp(2.0));
  EXPECT_DOUBLE_EQ(bits_per_byte(w), 2.0 / std::log(2.0));
  EXPECT_EQ(count_words("a  b\nc"), 3u);
  EXPECT_EQ(count_words(" a b "), 4u);  // re.split keeps the empty ends
  EXPECT_EQ(count_bytes("\xC3\xA9"), 2u);
}

TEST(EvalMetrics, PassAtKUnbiased) {
  EXPECT_DOUBLE_EQ(pass_at_k(10, 0, 1), 0.0);
  EXPECT_DOUBLE_EQ(pass_at_k(10, 3, 1), 0.3);
  EXPECT_NEAR(pass_at_k(10, 3, 5), 1.0 - (7.0 * 6 * 5 * 4 * 3) / (10.0 * 9 * 8 * 7 * 6), 1e-12);
  EXPECT_DOUBLE_EQ(pass_at_k(5, 1, 5), 1.0);
  EXPECT_EQ(majority_vote({"3", "4", "4", "3"}).value(), "3");  // tie: first seen
  EXPECT_EQ(majority_vote({"", "5", "5"}).value(), "5");
}

TEST(EvalExtract, Gsm8kStrictAndFlexible) {
  EXPECT_EQ(gsm8k_strict("so 3 + 4 = 7\n#### 7"), "7");
  EXPECT_EQ(gsm8k_strict("#### -1,000.5 apples"), "-1,000.5");
  EXPECT_EQ(gsm8k_strict("the answer is 7"), "[invalid]");
  EXPECT_EQ(gsm8k_flexible("3 apples and 45 pears, total $48."), "$48.");
  EXPECT_EQ(gsm8k_flexible("x = 5"), "5");
  EXPECT_EQ(gsm8k_flexible("none"), "[invalid]");
  EXPECT_EQ(gsm8k_exact_match("$1,000.", "Some steps.\n#### 1000"), 1.0);
  EXPECT_EQ(gsm8k_exact_match("48", "#### 49"), 0.0);
  EXPECT_EQ(cut_at_stops("ans 4\n\nQuestion: next", {"Question:", "\n\n"}), "ans 4");
}

TEST(EvalDocs, HellaswagPreprocessing) {
  EXPECT_EQ(hellaswag_preprocess(" Home [title] How to cook [step] Boil  water. "), "Home. How to cook Boil water.");
  const json j = {{"activity_label", "Cooking"}, {"ctx_a", "A man boils water."}, {"ctx_b", "then HE"},
                  {"endings", {"adds pasta.", "leaves [header] now."}}, {"label", "1"}};
  const Doc d = from_hellaswag_json(j);
  EXPECT_EQ(d.query, "Cooking: A man boils water. Then he");
  EXPECT_EQ(d.choices[1], "leaves now.");
  EXPECT_EQ(d.gold, 1);
  const auto docs = from_hellaswag_text("Label: ctx\n2\na\nb\nc\nd\n");
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0].gold, 2);
}

TEST(EvalDocs, PublicFormats) {
  const Doc arc = from_arc(json::parse(R"({"question":"Why?","choices":{"text":["a","b"],"label":["A","B"]},"answerKey":"B"})"));
  EXPECT_EQ(arc.query, "Question: Why?\nAnswer:");
  EXPECT_EQ(arc.gold, 1);
  const Doc mmlu = from_mmlu(json::parse(R"({"question":" Q? ","subject":"high_school_math","choices":["1","2","3","4"],"answer":2})"));
  EXPECT_EQ(mmlu.query, "Q?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:");
  EXPECT_EQ(mmlu.choices, (std::vector<std::string>{"A", "B", "C", "D"}));
  EXPECT_EQ(describe(task_spec("mmlu"), mmlu), "The following are multiple choice questions (with answers) about high school math.\n\n");
  const Doc w = from_winogrande(json::parse(R"({"sentence":"A fed B because _ was hungry.","option1":"A","option2":"B","answer":"2"})"));
  EXPECT_EQ(w.contexts, (std::vector<std::string>{"A fed B because A", "A fed B because B"}));
  EXPECT_EQ(w.continuation, "was hungry.");
  EXPECT_EQ(w.gold, 1);
  const Doc p = from_piqa(json::parse(R"({"goal":"Open a jar","sol1":"twist","sol2":"cut","label":0})"));
  EXPECT_EQ(p.query, "Question: Open a jar\nAnswer:");
  const Doc g = from_gsm8k(json::parse(R"({"question":"1+1?","answer":"2\n#### 2"})"));
  EXPECT_EQ(g.text, "Question: 1+1?\nAnswer:");
  EXPECT_EQ(wikitext_detokenize("1 @,@ 000 people ( many ) , he said"), "1,000 people (many), he said");
  const auto wiki = from_wikitext(" = A = \n text \n\n = = S = = \n\n = B = \n more \n");
  ASSERT_EQ(wiki.size(), 2u);
  EXPECT_EQ(wiki[0].page, " = A = \n text \n\n = = S = = \n\n");
  EXPECT_EQ(count_words(wiki[0].page), 11u);  // len(re.split(r"\s+", page)) in Python
}

TEST(EvalRolling, EveryTokenPredictedOnce) {
  Tokens t;
  for (int i = 10; i < 30; ++i) t.push_back(i);  // 20 tokens, windows of 8
  const auto w = rolling_windows(t, 1, 8);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].context, (Tokens{1}));
  EXPECT_EQ(w[0].predicted, Tokens(t.begin(), t.begin() + 8));
  EXPECT_EQ(w[1].context, (Tokens{17}));  // the token just before the window
  EXPECT_EQ(w[1].predicted, Tokens(t.begin() + 8, t.begin() + 16));
  EXPECT_EQ(w[2].predicted, Tokens(t.begin() + 16, t.end()));
  EXPECT_EQ(w[2].context.size(), 8u - 4u + 1u);  // make_disjoint_window keeps L - |pred| + 1
  Tokens all;
  for (const auto& x : w) all.insert(all.end(), x.predicted.begin(), x.predicted.end());
  EXPECT_EQ(all, t);
}

TEST(EvalEncode, TrailingSpaceMovesToContinuation) {
  TextCodec c;  // toy codec: one token per byte, BOS = 1
  c.encode = [](std::string_view s) { Tokens t{1}; for (char ch : s) t.push_back(int32_t((unsigned char)ch)); return t; };
  c.encode_plain = [](std::string_view s) { Tokens t; for (char ch : s) t.push_back(int32_t((unsigned char)ch)); return t; };
  auto [ctx, cont] = encode_pair(c, "ab ", "c");
  EXPECT_EQ(ctx, (Tokens{1, 'a', 'b'}));
  EXPECT_EQ(cont, (Tokens{' ', 'c'}));
  auto [ctx2, cont2] = encode_pair(c, "", "xy");
  EXPECT_EQ(ctx2, (Tokens{1}));
  EXPECT_EQ(cont2, (Tokens{'x', 'y'}));
}

TEST(EvalLoglikelihood, SharedContextPathEqualsOneRequestAtATime) {
  const auto ck = Checkpoint::open(test::model_dir("mixtral-4e-gqa-f32"));
  const Tokenizer tok(ck->tokenizer_path());
  const auto codec = TextCodec::from(tok);
  std::vector<TokenRequest> reqs;
  for (const char* c : {" software", " license", " the work", " x"}) {
    auto [a, b] = encode_pair(codec, "You may copy", c);
    reqs.push_back({a, b});
  }
  ref::Model<float> plain(*ck);
  ScoreStats s1, s2;
  std::vector<LoglikelihoodResult> r1;  // one request at a time: each context run on its own
  for (const auto& r : reqs) r1.push_back(score_requests(plain, {r}, &s1)[0]);
  const auto r2 = score_requests(plain, reqs, &s2);  // one group: context once, then truncate()
  EXPECT_LT(s2.tokens_forwarded, s1.tokens_forwarded);  // context forwarded once
  EXPECT_EQ(s2.groups, 1);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_NEAR(r1[i].logprob, r2[i].logprob, 1e-5);
    EXPECT_EQ(r1[i].is_greedy, r2[i].is_greedy);
  }
  // Direct check of one request: the sum of per-token log-probs from a single forward.
  plain.reset();
  Tokens all = reqs[0].context;
  all.insert(all.end(), reqs[0].continuation.begin(), reqs[0].continuation.end() - 1);
  const MatrixRF logits = plain.forward(all);
  double want = 0;
  for (size_t k = 0; k < reqs[0].continuation.size(); ++k) {
    const auto row = logits.row(Eigen::Index(reqs[0].context.size() - 1 + k));
    want += token_logprob(std::span<const float>(row.data(), size_t(row.size())), reqs[0].continuation[k]);
  }
  EXPECT_NEAR(r1[0].logprob, want, 1e-9);
}

TEST(EvalLoglikelihood, TruncatesFromTheLeftLikeTheHarness) {
  const auto ck = Checkpoint::open(test::model_dir("mixtral-4e-gqa-f32"));
  ref::Model<float> m(*ck);
  const int L = m.max_context();
  Tokens ctx(size_t(L + 10), 300), cont = {301, 302};
  ScoreStats st;
  const auto r = score_requests(m, {{ctx, cont}}, &st);
  EXPECT_EQ(st.tokens_forwarded, L);  // (ctx+cont)[-(L+1):][:-1]
  EXPECT_TRUE(std::isfinite(r[0].logprob));
  EXPECT_FALSE(r[0].truncated);
  // A continuation longer than the context (the harness asserts): its last L tokens are scored, flagged.
  const auto r2 = score_requests(m, {{Tokens{1}, Tokens(size_t(L + 5), 300)}}, &st);
  EXPECT_TRUE(r2[0].truncated);
  EXPECT_EQ(r2[0].token_logprobs.size(), size_t(L));
  EXPECT_EQ(st.truncated, 1);
}

// ---- parity with lm-evaluation-harness ----

class EvalParity : public ::testing::Test {
 protected:
  void SetUp() override {
    ck = Checkpoint::open(test::model_dir("mixtral-4e-gqa-f32"));
    tok = std::make_unique<Tokenizer>(ck->tokenizer_path());
    codec = TextCodec::from(*tok);
    engine = std::make_unique<ref::Model<float>>(*ck);
  }
  TaskResult run(const std::string& parity, const std::string& spec_name, const std::string& data,
                 const std::string& fewshot = "", int shots = 0) {
    oracle = read_json(test::fixture("evals/parity/" + parity + ".json"));
    TaskSpec spec = task_spec(spec_name);
    const std::string dir = test::fixture("evals/tasks/");
    const auto docs = read_docs(spec_name, spec.type, dir + data);
    const auto fs = fewshot.empty() ? std::vector<Doc>{} : read_docs(spec_name, spec.type, dir + fewshot);
    if (parity == "parity_gen") spec.until = {"Question:", "\n\n", "</s>"}, spec.max_gen_toks = 16;
    if (parity == "parity_wino" || parity == "parity_mc_fewshot") spec.metrics = {"acc"};
    if (parity == "parity_mc_fewshot") spec.metrics = {"acc", "acc_norm"};
    RunOptions o;
    o.shots = shots;
    return run_task(*engine, codec, spec, docs, fs, false, o);
  }
  std::unique_ptr<Checkpoint> ck;
  std::unique_ptr<Tokenizer> tok;
  TextCodec codec;
  std::unique_ptr<ref::Model<float>> engine;
  json oracle;
};

// Tolerance: both sides are FP32 forwards of the same weights (transformers eager vs our Eigen
// engine, agreeing to ~1e-6 relative on logits, tests/test_reference.cpp). A log-prob is
// logit - logsumexp with magnitudes ~10, so each token carries ~1e-5 absolute noise at worst;
// continuations here are <= 20 tokens: 1e-4 absolute on the sum. Rolling sums cover up to ~130
// tokens: 1e-3 absolute (still ~1e-5 relative).
constexpr double kTolChoice = 1e-4, kTolRolling = 1e-3;

void expect_metrics_equal(const json& want, const TaskResult& got, double rel_tol) {
  for (const auto& [k, v] : want.items()) {
    if (!v.is_number()) continue;  // "N/A" stderr
    ASSERT_TRUE(got.metrics.count(k)) << k;
    const double g = got.metrics.at(k), w = v.get<double>();
    if (rel_tol == 0) EXPECT_DOUBLE_EQ(g, w) << k;
    else EXPECT_NEAR(g, w, rel_tol * std::abs(w)) << k;
  }
}

// lm-eval's own doc_hash, prompt_hash and target_hash for the record (scripts/eval_parity.py keeps them):
// the same document (keys in the same order), the same prompt and the same target, byte for byte.
void expect_same_hashes(const json& want, const nlohmann::ordered_json& got) {
  for (const char* h : {"doc_hash", "prompt_hash", "target_hash"})
    EXPECT_EQ(got[h].get<std::string>(), want[h].get<std::string>()) << h;
}

void expect_choice_samples(const json& oracle, const TaskResult& got) {
  const auto& want = oracle["samples"];
  ASSERT_EQ(want.size(), got.samples.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE("doc " + std::to_string(i));
    const auto& w = want[i];
    const auto& g = got.samples[i];
    ASSERT_EQ(w["arguments"].size(), g["arguments"].size());
    for (size_t k = 0; k < w["arguments"].size(); ++k) {
      EXPECT_EQ(w["arguments"][k], json(g["arguments"][k]));  // context and continuation strings, exactly
      EXPECT_NEAR(g["filtered_resps"][k][0].get<double>(), w["filtered_resps"][k][0].get<double>(), kTolChoice);
      EXPECT_EQ(g["filtered_resps"][k][1].get<bool>(), w["filtered_resps"][k][1].get<bool>());
    }
    for (const auto& [m, v] : w["metrics"].items()) EXPECT_EQ(g[m].get<double>(), v.get<double>()) << m;
    expect_same_hashes(w, g);
  }
}

TEST_F(EvalParity, MultipleChoiceZeroShot) {
  const auto r = run("parity_mc", "multiple_choice", "mc_test.jsonl");
  expect_choice_samples(oracle, r);
  expect_metrics_equal(oracle["results"], r, 0);
}

TEST_F(EvalParity, MultipleChoiceTwoShotSeededSampler) {
  const auto r = run("parity_mc_fewshot", "multiple_choice", "mc_test.jsonl", "mc_train.jsonl", 2);
  expect_choice_samples(oracle, r);
  expect_metrics_equal(oracle["results"], r, 0);
}

TEST_F(EvalParity, WinograndePartialScoring) {
  const auto r = run("parity_wino", "winogrande", "wino_test.jsonl");
  expect_choice_samples(oracle, r);
  expect_metrics_equal(oracle["results"], r, 0);
}

TEST_F(EvalParity, RollingPerplexity) {
  const auto r = run("parity_rolling", "rolling", "rolling_test.jsonl");
  const auto& want = oracle["samples"];
  ASSERT_EQ(want.size(), r.samples.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(r.samples[i]["filtered_resps"][0].get<double>(), want[i]["filtered_resps"][0].get<double>(), kTolRolling);
    expect_same_hashes(want[i], r.samples[i]);
    EXPECT_EQ(r.samples[i]["word_perplexity"][1], want[i]["metrics"]["word_perplexity"][1]);
    EXPECT_EQ(r.samples[i]["byte_perplexity"][1], want[i]["metrics"]["byte_perplexity"][1]);
  }
  EXPECT_GE(r.samples[1]["windows"].get<int>(), 2);  // the long document spans several windows
  // Perplexities are continuous functions of the summed log-likelihoods: same to ~1e-5 relative.
  expect_metrics_equal(oracle["results"], r, 1e-5);
}

TEST_F(EvalParity, GreedyGenerationAndGsm8kFilters) {
  const auto r = run("parity_gen", "generate", "gen_test.jsonl");
  const auto& want = oracle["samples"];
  ASSERT_EQ(want.size(), r.samples.size());
  // The harness logs one entry per (doc, filter) ...
  // ... in the same order too: every doc of one filter, then the next filter's.
  for (size_t i = 0; i < want.size(); ++i) {
    const auto& w = want[i];
    const auto& g = r.samples[i];
    EXPECT_EQ(g["doc_id"].get<int>(), w["doc_id"].get<int>()) << i;
    EXPECT_EQ(g["filter"].get<std::string>(), w["filter"].get<std::string>()) << i;
    expect_same_hashes(w, g);
    EXPECT_EQ(json(g["arguments"][0][0]), w["arguments"][0][0]);
    EXPECT_EQ(json(g["resps"][0][0]), w["resps"][0][0]);  // generated text, exactly
    EXPECT_EQ(json(g["filtered_resps"]), w["filtered_resps"]);
    EXPECT_EQ(g["exact_match"].get<double>(), w["metrics"]["exact_match"].get<double>());
  }
  expect_metrics_equal(oracle["results"], r, 0);
}

// The HumanEval sandbox's tests are in tests/test_sandbox.cpp.
