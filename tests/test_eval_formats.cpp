// How a JSONL record's format is recognised (evals/docs.cpp, from_record, reached through read_docs):
// for the generic task types (multiple_choice, generate, rolling, humaneval's code form) each public
// form it detects by its fields is read by that form's converter, the normalized forms are read as
// they are, and a record of no known form is one clear error that names the fields it has. A named task
// (arc_easy, piqa, ...) reads only its own public form.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "evals/docs.hpp"

namespace moelab::evals {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class EvalFormats : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp = fs::temp_directory_path() / ("moelab-evalformats-" + std::to_string(::getpid()) + "-" +
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  void TearDown() override { fs::remove_all(tmp); }

  // read_docs on one record written as a one-line JSONL file.
  Doc read_one(const std::string& task, TaskType type, const json& record) {
    const auto p = (tmp / "data.jsonl").string();
    std::ofstream(p) << record.dump() << "\n";
    const auto docs = read_docs(task, type, p);
    EXPECT_EQ(docs.size(), 1u);
    return docs.empty() ? Doc{} : docs[0];
  }
  // The moelab::Error message read_docs gives for one record ("" and a failure if none).
  std::string error_of(const std::string& task, TaskType type, const std::string& line) {
    const auto p = (tmp / "bad.jsonl").string();
    std::ofstream(p) << line << "\n";
    try {
      read_docs(task, type, p);
    } catch (const Error& e) {
      return e.what();
    }
    ADD_FAILURE() << "no error for " << line;
    return "";
  }
  std::string file() const { return (tmp / "bad.jsonl").string(); }

  fs::path tmp;
};

constexpr auto MC = TaskType::MultipleChoice;

// One record of each public multiple-choice form, read through the generic task: the converter of
// that form made the document (same normalized result), and its answer is where the form puts it.
TEST_F(EvalFormats, MultipleChoiceDetectsEachPublicForm) {
  const json hellaswag = {{"activity_label", "Cooking"}, {"ctx_a", "A man boils water."}, {"ctx_b", "then he"},
                          {"endings", {"adds pasta.", "leaves.", "sings.", "sits."}}, {"label", "2"}};
  const json arc = json::parse(R"({"question":"Why?","choices":{"text":["a","b","c"],"label":["A","B","C"]},"answerKey":"C"})");
  const json winogrande = json::parse(R"({"sentence":"A fed B because _ was hungry.","option1":"A","option2":"B","answer":"1"})");
  const json piqa = json::parse(R"({"goal":"Open a jar","sol1":"twist","sol2":"cut","label":1})");
  const json mmlu = json::parse(R"({"question":"2+2?","subject":"math","choices":["1","2","3","4"],"answer":3})");
  struct Case {
    const char* form;
    json record;
    Doc want;
    int gold;
  };
  const std::vector<Case> cases{{"hellaswag", hellaswag, from_hellaswag_json(hellaswag), 2},
                                {"arc", arc, from_arc(arc), 2},
                                {"winogrande", winogrande, from_winogrande(winogrande), 0},
                                {"piqa", piqa, from_piqa(piqa), 1},
                                {"mmlu", mmlu, from_mmlu(mmlu), 3}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.form);
    const Doc d = read_one("multiple_choice", MC, c.record);
    EXPECT_EQ(to_normalized(d, MC), to_normalized(c.want, MC));
    EXPECT_EQ(d.gold, c.gold);
    EXPECT_EQ(d.source, c.record);  // the record as read, for --log-samples
  }
  // Independent of the converters: what each form's document holds.
  EXPECT_EQ(read_one("multiple_choice", MC, hellaswag).choices.size(), 4u);
  EXPECT_EQ(read_one("multiple_choice", MC, arc).query, "Question: Why?\nAnswer:");
  const Doc w = read_one("multiple_choice", MC, winogrande);
  EXPECT_TRUE(w.partial());  // WinoGrande is scored on the shared continuation
  EXPECT_EQ(w.contexts, (std::vector<std::string>{"A fed B because A", "A fed B because B"}));
  EXPECT_EQ(w.continuation, "was hungry.");
  EXPECT_EQ(read_one("multiple_choice", MC, piqa).choices, (std::vector<std::string>{"twist", "cut"}));
  EXPECT_EQ(read_one("multiple_choice", MC, mmlu).subject, "math");
}

TEST_F(EvalFormats, NormalizedFormsAreReadAsTheyAre) {
  const Doc q = read_one("multiple_choice", MC, {{"query", "Q"}, {"choices", {"x", "y"}}, {"gold", 1}, {"subject", "s"}});
  EXPECT_EQ(q.query, "Q");
  EXPECT_EQ(q.choices, (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(q.gold, 1);
  EXPECT_EQ(q.subject, "s");
  EXPECT_FALSE(q.partial());
  const Doc p = read_one("multiple_choice", MC, {{"contexts", {"a _", "b _"}}, {"continuation", "c"}, {"gold", 0}});
  EXPECT_TRUE(p.partial());
  EXPECT_EQ(p.continuation, "c");
  // A named task reads the normalized form too (what `eval --convert-to` writes).
  EXPECT_EQ(read_one("arc_easy", MC, {{"query", "Q"}, {"choices", {"x"}}, {"gold", 0}}).query, "Q");

  const Doc g = read_one("generate", TaskType::Generate, {{"text", "1+1?"}, {"target", "2"}});
  EXPECT_EQ(g.text, "1+1?");
  EXPECT_EQ(g.target, "2");
  // Rolling: text is scored; page (what words and bytes are counted on) defaults to it.
  const Doc r = read_one("rolling", TaskType::Rolling, {{"text", "some text"}});
  EXPECT_EQ(r.text, "some text");
  EXPECT_EQ(r.page, "some text");
  EXPECT_EQ(read_one("rolling", TaskType::Rolling, {{"text", "t"}, {"page", "p"}}).page, "p");
  const Doc code = read_one("humaneval", TaskType::Code,
                            {{"task_id", "T/0"}, {"prompt", "def f():\n"}, {"test", "assert f()"}, {"entry_point", "f"}});
  EXPECT_EQ(code.task_id, "T/0");
  EXPECT_EQ(code.entry_point, "f");
}

TEST_F(EvalFormats, GenerateAndRollingDetectTheirPublicForms) {
  const json gsm = json::parse(R"({"question":"1+1?","answer":"one and one\n#### 2"})");
  const Doc g = read_one("generate", TaskType::Generate, gsm);
  EXPECT_EQ(to_normalized(g, TaskType::Generate), to_normalized(from_gsm8k(gsm), TaskType::Generate));
  EXPECT_EQ(g.text, "Question: 1+1?\nAnswer:");
  EXPECT_EQ(g.target, "one and one\n#### 2");
  // WikiText's {page}: the page is detokenized for scoring and kept for counting.
  const Doc w = read_one("rolling", TaskType::Rolling, {{"page", " = A = \n 1 @,@ 000 people ( many ) \n"}});
  EXPECT_EQ(w.page, " = A = \n 1 @,@ 000 people ( many ) \n");
  EXPECT_EQ(w.text, wikitext_detokenize(w.page));
  EXPECT_NE(w.text, w.page);
}

// A record of no known form: one error naming the file and line, the forms expected and the fields
// the record has.
TEST_F(EvalFormats, UnknownRecordIsAClearError) {
  EXPECT_EQ(error_of("multiple_choice", MC, R"({"prompt":"p","options":["a"]})"),
            file() + ":1: multiple_choice: record is neither the normalized form (query, choices, gold; or contexts, "
                     "continuation, gold) nor a known public form (its fields: options, prompt)");
  EXPECT_EQ(error_of("generate", TaskType::Generate, R"({"question":"q"})"),
            file() + ":1: generate: record is neither the normalized form (text, target) nor GSM8K's (question, "
                     "answer) (its fields: question)");
  EXPECT_EQ(error_of("rolling", TaskType::Rolling, R"({"article":"a"})"),
            file() + ":1: rolling: record is neither the normalized form (text, optional page) nor WikiText's (page) "
                     "(its fields: article)");
  EXPECT_EQ(error_of("multiple_choice", MC, "{}"),
            file() + ":1: multiple_choice: record is neither the normalized form (query, choices, gold; or contexts, "
                     "continuation, gold) nor a known public form (its fields: none)");
  // Not an object at all.
  const std::string arr = error_of("multiple_choice", MC, "[1, 2]");
  EXPECT_EQ(arr.rfind(file() + ":1: a record must be a JSON object, got array", 0), 0u) << arr;
  // The code form has no alternative: its missing field is named.
  const std::string code = error_of("humaneval", TaskType::Code, R"({"task_id":"T/0","test":"t","entry_point":"f"})");
  EXPECT_NE(code.find("\"prompt\""), std::string::npos) << code;
  // A normalized record with a field missing is not taken for a public form: the field is named.
  const std::string partial = error_of("multiple_choice", MC, R"({"query":"q","gold":0})");
  EXPECT_NE(partial.find("\"choices\""), std::string::npos) << partial;
}

// A named task reads only its own public form: another form's record names the field it lacks (the
// generic task would have detected it).
TEST_F(EvalFormats, NamedTaskReadsOnlyItsOwnForm) {
  const json arc = json::parse(R"({"question":"Why?","choices":{"text":["a","b"],"label":["A","B"]},"answerKey":"B"})");
  EXPECT_EQ(read_one("arc_challenge", MC, arc).gold, 1);
  const std::string e = error_of("piqa", MC, arc.dump());
  EXPECT_EQ(e.rfind(file() + ":1: ", 0), 0u) << e;
  EXPECT_NE(e.find("\"goal\""), std::string::npos) << e;
  EXPECT_EQ(read_one("multiple_choice", MC, arc).gold, 1);
}

}  // namespace
}  // namespace moelab::evals
