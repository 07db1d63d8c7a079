// The sentencepiece tokenizer against ids recorded by Python sentencepiece (scripts/make_fixtures.py):
// the real Mixtral-8x7B tokenizer (tokenizer.model.v1 from mistral-common) and the fixture models' own.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/tokenizer.hpp"
#include "fixture_util.hpp"

namespace moelab::test {
namespace {

struct Case {
  std::string label, text, decoded;
  std::vector<int32_t> ids;
};

std::vector<Case> load_cases(const std::string& file) {
  std::ifstream in(fixture("tokenizers/" + file));
  const auto j = nlohmann::json::parse(in);
  std::vector<Case> cases;
  for (const auto& c : j)
    cases.push_back({c["label"], c["text"], c["decoded"], c["ids"].get<std::vector<int32_t>>()});
  return cases;
}

class TokenizerIds : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(TokenizerIds, SameIdsAsPythonSentencepiece) {
  const Tokenizer tok(fixture("tokenizers/" + GetParam().first));
  const auto cases = load_cases(GetParam().second);
  ASSERT_GE(cases.size(), 10u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.label);
    EXPECT_EQ(tok.encode(c.text, /*add_bos=*/false), c.ids);
    auto with_bos = tok.encode(c.text);
    ASSERT_FALSE(with_bos.empty());
    EXPECT_EQ(with_bos.front(), tok.bos_id());
    EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), c.ids);
    EXPECT_EQ(tok.decode(c.ids), c.decoded);
  }
}

TEST_P(TokenizerIds, StreamingDecodeEqualsWholeDecode) {
  const Tokenizer tok(fixture("tokenizers/" + GetParam().first));
  for (const auto& c : load_cases(GetParam().second)) {
    SCOPED_TRACE(c.label);
    StreamDecoder stream(tok);
    std::string text;
    for (int32_t id : c.ids) {
      const std::string piece = stream.push(id);
      // Nothing emitted may be a broken UTF-8 sequence: byte-fallback pieces are held back until whole.
      EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
      text += piece;
    }
    text += stream.flush();
    EXPECT_EQ(text, c.decoded);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, TokenizerIds,
                         ::testing::Values(std::pair{"mixtral-8x7b-v0.1.model", "mixtral-ids.json"},
                                           std::pair{"fixture-bpe512.model", "fixture-bpe512-ids.json"}),
                         [](const auto& info) { return info.index == 0 ? "Mixtral" : "FixtureBpe512"; });

TEST(Tokenizer, MixtralSpecialIds) {
  const Tokenizer tok(fixture("tokenizers/mixtral-8x7b-v0.1.model"));
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece(3), "<0x00>");  // byte fallback pieces start at id 3
  EXPECT_EQ(tok.piece(28705), "\xE2\x96\x81");  // "▁" alone
}

// Found by tests/fuzz/fuzz_tokenizer.cpp (corpus repro-piece-id-out-of-range): piece(-1) aborted the
// process inside protobuf, piece(32000) read past the piece table.
TEST(Tokenizer, PieceOutsideTheVocabularyIsAnError) {
  const Tokenizer tok(fixture("tokenizers/mixtral-8x7b-v0.1.model"));
  for (int32_t id : {-1, -2147483647 - 1, 32000, 2147483647}) {
    try {
      (void)tok.piece(id);
      ADD_FAILURE() << "piece(" << id << ") did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("outside the vocabulary of 32000"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(tok.piece(31999).empty(), false);
}

TEST(Tokenizer, StreamingAfterAPromptKeepsTheLeadingSpace) {
  const Tokenizer tok(fixture("tokenizers/mixtral-8x7b-v0.1.model"));
  const auto prompt = tok.encode("The quick brown");
  const auto full = tok.encode("The quick brown fox jumps");
  StreamDecoder stream(tok, prompt);
  std::string out;
  for (size_t i = prompt.size(); i < full.size(); ++i) out += stream.push(full[i]);
  out += stream.flush();
  EXPECT_EQ(out, " fox jumps");
}

TEST(Tokenizer, BadFilesAndIdsAreErrors) {
  EXPECT_THROW(Tokenizer("/nonexistent/tokenizer.model"), Error);
  EXPECT_THROW(Tokenizer(fixture("configs/mixtral-8x7b-v0.1.json")), Error);
  const Tokenizer tok(fixture("tokenizers/fixture-bpe512.model"));
  EXPECT_THROW(tok.decode({1, 999999}), Error);
}

}  // namespace
}  // namespace moelab::test
