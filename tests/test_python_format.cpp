// evals/python_format and the lm-eval record helpers against Python itself: repr(float), str(), and
// json.dumps as tests/fixtures/evals/python_format.json records them (scripts/make_python_format_fixture.py).
// These are what make our doc_hash, our samples files and our results files equal the harness's.
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/sha256.hpp"
#include "evals/lm_eval_samples.hpp"
#include "evals/python_format.hpp"
#include "evals/results_json.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::evals {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

json fixture_doc() { return json::parse(test::read_file_bytes(test::fixture("evals/python_format.json"))); }

double from_bits(const std::string& hex) {
  uint64_t u = std::stoull(hex, nullptr, 16);
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

TEST(PythonFormat, FloatReprEqualsPythonsForEveryValue) {
  const json fx = fixture_doc();
  ASSERT_GT(fx["floats"].size(), 600u);
  for (const auto& f : fx["floats"]) {
    const std::string want = f["repr"];
    EXPECT_EQ(python_float_repr(from_bits(f["bits"])), want) << f["bits"];
  }
}

TEST(PythonFormat, JsonDumpsEqualsPythonsWithAndWithoutIndent) {
  const json fx = fixture_doc();
  for (const auto& d : fx["dumps"]) {
    const auto v = ordered_json::parse(d["json"].get<std::string>());  // keys in the text's order
    EXPECT_EQ(python_json_dumps(v, 2), d["indent2"].get<std::string>()) << d["json"];
    EXPECT_EQ(python_json_dumps(v), d["compact"].get<std::string>()) << d["json"];
  }
}

TEST(PythonFormat, StrOfScalarsAndSanitizedModelNames) {
  const json fx = fixture_doc();
  for (const auto& s : fx["scalars"])
    EXPECT_EQ(python_str(ordered_json::parse(s["json"].get<std::string>())), s["str"].get<std::string>()) << s["json"];
  EXPECT_THROW(python_str(ordered_json::array()), std::exception);
  for (const auto& m : fx["model_names"])
    EXPECT_EQ(sanitize_model_name(m["model"]), m["sanitized"].get<std::string>()) << m["model"];
}

// A record in memory and as saved: the hashes are over the doc's json.dumps(indent=2), the first request's
// first argument and str(target); the saved form is save_results_samples's.
TEST(LmEvalSamples, HashesAndSavedForm) {
  SampleFields f;
  f.doc_id = 3;
  f.doc = ordered_json::parse(R"({"query": "Q", "choices": ["a", "b"], "gold": 1})");
  f.target = 1;
  f.arguments = ordered_json::parse(R"([["Q", " a"], ["Q", " b"]])");
  f.resps = ordered_json::parse(R"([[[-1.5, false]], [[-0.25, true]]])");
  f.filtered_resps = ordered_json::parse(R"([[-1.5, false], [-0.25, true]])");
  f.metrics = {{"acc", 1.0}, {"acc_norm", 1.0}};
  const auto r = sample_record(f);
  EXPECT_EQ(r["doc_hash"], sha256_hex("{\n  \"query\": \"Q\",\n  \"choices\": [\n    \"a\",\n    \"b\"\n  ],\n  \"gold\": 1\n}"));
  EXPECT_EQ(r["prompt_hash"], sha256_hex("Q"));
  EXPECT_EQ(r["target_hash"], sha256_hex("1"));
  EXPECT_EQ(r["metrics"], ordered_json::parse(R"(["acc", "acc_norm"])"));
  EXPECT_EQ(task_hash({r, r}), sha256_hex(std::string(r["doc_hash"]) + std::string(r["prompt_hash"]) +
                                          std::string(r["target_hash"]) + std::string(r["doc_hash"]) +
                                          std::string(r["prompt_hash"]) + std::string(r["target_hash"])));
  EXPECT_EQ(saved_sample_line(r),
            R"({"doc_id": 3, "doc": {"query": "Q", "choices": ["a", "b"], "gold": 1}, "target": "1", )"
            R"("arguments": {"gen_args_0": {"arg_0": "Q", "arg_1": " a"}, "gen_args_1": {"arg_0": "Q", "arg_1": " b"}}, )"
            R"("resps": [[["-1.5", "False"]], [["-0.25", "True"]]], "filtered_resps": [["-1.5", "False"], ["-0.25", "True"]], )"
            R"("filter": "none", "metrics": ["acc", "acc_norm"], )"
            R"("doc_hash": ")" + std::string(r["doc_hash"]) + R"(", "prompt_hash": "4ae81572f06e1b88fd5ced7a1a000945432e83e1551e6f721ee9c00b8cc33260", )"
            R"("target_hash": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b", "acc": 1.0, "acc_norm": 1.0})" "\n");
}

}  // namespace
}  // namespace moelab::evals
