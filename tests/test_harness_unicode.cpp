// moelab's harness-equivalent text handling against lm-evaluation-harness 0.4.9.2's own code on text with
// non-ASCII letters and Unicode white space (tests/fixtures/evals/unicode/harness.json, written by
// scripts/make_unicode_fixtures.py, which runs the harness's functions from its wheel): HellaSwag's
// _process_doc (ctx_b.capitalize(), preprocess's strip() and '.' in "\[.*?\]"), WikiText's detokenizer
// (\s in its regexes) and word count (re.split(r"\s+")), WinoGrande's and MMLU's strip(), GSM8K's
// exact_match (numpy's lower()), and _encode_pair's rstrip().
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "evals/docs.hpp"
#include "evals/encode.hpp"
#include "evals/extract.hpp"
#include "evals/metrics.hpp"
#include "evals/utf8.hpp"
#include "tests/fixture_util.hpp"
#include "tests/process_util.hpp"

using namespace moelab;
using namespace moelab::evals;
using nlohmann::json;

namespace {

const json& harness() {
  static const json j = [] {
    std::ifstream f(test::fixture("evals/unicode/harness.json"));
    if (!f) throw std::runtime_error("cannot open the fixture harness.json");
    return json::parse(f);
  }();
  return j;
}

std::string shown(const json& j) { return j.dump(); }

}  // namespace

TEST(HarnessUnicode, HellaswagRecordsGiveTheHarnessQueryAndChoices) {
  // Real validation items with non-ASCII letters (ctx_b as is and upper-cased), and constructed records:
  // Greek final sigma, Turkish İ, ß, ǅ, ligatures, Deseret, Cherokee, Georgian, Unicode white space.
  size_t n = 0;
  for (const auto& c : harness()["hellaswag"]) {
    const Doc d = from_hellaswag_json(c["record"]);
    EXPECT_EQ(d.query, c["query"].get<std::string>()) << c["record"]["note"] << " " << shown(c["record"]["ctx_b"]);
    EXPECT_EQ(d.choices, c["choices"].get<std::vector<std::string>>()) << shown(c["record"]["endings"]);
    EXPECT_EQ(d.gold, c["gold"].get<int>());
    ++n;
  }
  EXPECT_EQ(n, 22u);
}

TEST(HarnessUnicode, HellaswagJsonlFileReadsToTheHarnessQueries) {
  // The same records through read_docs, as `moelab eval --tasks hellaswag --data FILE.jsonl` reads them.
  const test::TempDir dir("moelab-hs-unicode");
  const std::string file = dir.file("hellaswag.jsonl");
  {
    std::ofstream f(file);
    for (const auto& c : harness()["hellaswag"]) f << c["record"].dump() << "\n";
  }
  const auto docs = read_docs("hellaswag", TaskType::MultipleChoice, file);
  ASSERT_EQ(docs.size(), harness()["hellaswag"].size());
  for (size_t i = 0; i < docs.size(); ++i) EXPECT_EQ(docs[i].query, harness()["hellaswag"][i]["query"].get<std::string>());
}

TEST(HarnessUnicode, HellaswagPreprocessMatchesTheHarness) {
  // strip() of Unicode white space; '.' in "\[.*?\]" matches '\r' (only '\n' stops it).
  for (const auto& c : harness()["hellaswag_preprocess"])
    EXPECT_EQ(hellaswag_preprocess(c["input"]), c["output"].get<std::string>()) << shown(c["input"]);
}

TEST(HarnessUnicode, WikitextDetokenizerAndWordCountMatchTheHarness) {
  for (const auto& c : harness()["wikitext"]) {
    EXPECT_EQ(wikitext_detokenize(c["page"]), c["detokenized"].get<std::string>()) << shown(c["page"]);
    EXPECT_EQ(count_words(c["page"]), c["words"].get<size_t>()) << shown(c["page"]);
  }
}

TEST(HarnessUnicode, WinograndeAndMmluStripLikeTheHarness) {
  for (const auto& c : harness()["winogrande"]) {
    const Doc d = from_winogrande(c["record"]);
    EXPECT_EQ(d.contexts, c["contexts"].get<std::vector<std::string>>()) << shown(c["record"]);
    EXPECT_EQ(d.continuation, c["continuation"].get<std::string>()) << shown(c["record"]);
  }
  for (const auto& c : harness()["mmlu"])
    EXPECT_EQ(from_mmlu(c["record"]).query, c["query"].get<std::string>()) << shown(c["record"]);
}

TEST(HarnessUnicode, Gsm8kExactMatchLowerCasesAsNumpyDoes) {
  // numpy's lower() is Python's, cut to the array's width in code points; its strings lose trailing NULs.
  for (const auto& c : harness()["gsm8k_exact_match"])
    EXPECT_EQ(gsm8k_exact_match(c["prediction"], c["reference"]), c["exact_match"].get<double>())
        << shown(c["prediction"]) << " vs " << shown(c["reference"]);
}

TEST(HarnessUnicode, EncodePairMovesTheContextsTrailingUnicodeWhiteSpace) {
  // The harness's _encode_pair run with a tokenizer that maps each character to its code point.
  TextCodec codepoints;
  codepoints.encode = [](std::string_view s) {
    Tokens t;
    for (const char32_t c : utf8_decode(s)) t.push_back(int32_t(c));
    return t;
  };
  codepoints.encode_plain = codepoints.encode;
  for (const auto& c : harness()["encode_pair"]) {
    const auto [ctx, cont] = encode_pair(codepoints, c["context"], c["continuation"]);
    EXPECT_EQ(ctx, c["context_tokens"].get<Tokens>()) << shown(c["context"]);
    EXPECT_EQ(cont, c["continuation_tokens"].get<Tokens>()) << shown(c["context"]);
  }
}
