// Eval data as a hostile or careless user supplies it (issue 13, items 1, 3, 10): compressed files
// whose names carry shell syntax, corrupt archives, text long enough to overflow a recursive regex
// matcher, and records whose fields have the wrong type, range or presence. Also the process
// spawner that replaced every shell string.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include "analysis/trace.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/spawn.hpp"
#include "evals/docs.hpp"
#include "evals/extract.hpp"
#include "evals/pyrandom.hpp"
#include "evals/results_json.hpp"
#include "evals/tasks.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::evals {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using nlohmann::json;

void write(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out << bytes;
}

// Runs the rest of a scope in `dir` (where a shell would have created PWNED), back on every exit path.
struct InDirectory {
  fs::path before = fs::current_path();
  explicit InDirectory(const fs::path& dir) { fs::current_path(dir); }
  ~InDirectory() { fs::current_path(before); }
};

class EvalData : public ::testing::Test {
 protected:

  // The message read_docs throws for `content` written to `name` (empty when it does not throw).
  std::string error_for(const std::string& task, TaskType type, const std::string& name, const std::string& content) {
    const auto p = (tmp / name).string();
    write(p, content);
    try {
      read_docs(task, type, p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }
  std::string path(const std::string& name) const { return (tmp / name).string(); }

  using Run = test::MoelabRun;
  // The real binary, started without a shell (arguments passed as they are).
  Run moelab(std::vector<std::string> args) { return test::run_moelab(std::move(args), tmp); }
  static void expect_one_line_error(const Run& r, const std::string& exact_message) {
    EXPECT_EQ(r.status, 1) << r.err;
    EXPECT_EQ(r.err, "moelab: error: " + exact_message + "\n");
  }

  TempDir scratch{"moelab-evaldata"};
  const fs::path& tmp = scratch.path();
};

std::vector<std::string> queries(const std::vector<Doc>& docs) {
  std::vector<std::string> q;
  for (const auto& d : docs) q.push_back(d.query);
  return q;
}
const std::vector<std::string> kFixtureQueries{"You may copy the", "The license grants", "This program is free"};

// ---- Item 1: compressed data in-process, no shell. ----

TEST_F(EvalData, CompressedFilesWithShellSyntaxInTheNameReadCorrectlyAndRunNothing) {
  // The old reader ran `gzip -dc '<path>'` through popen: this name closed the quote and ran touch.
  const auto here = fs::current_path();
  for (const std::string ext : {".jsonl.gz", ".jsonl.bz2"}) {
    SCOPED_TRACE(ext);
    const InDirectory in_tmp(tmp);
    const auto name = path("x';touch PWNED;'" + ext);
    fs::copy_file(test::fixture("evals/compressed/mc" + ext), name);
    std::vector<Doc> docs;
    EXPECT_NO_THROW(docs = read_docs("multiple_choice", TaskType::MultipleChoice, name));
    EXPECT_EQ(queries(docs), kFixtureQueries);
    ASSERT_EQ(docs.size(), 3u);
    EXPECT_EQ(docs[1].choices, (std::vector<std::string>{"permission", "the work", "copies"}));
    EXPECT_EQ(docs[1].gold, 2);
  }
  EXPECT_FALSE(fs::exists(tmp / "PWNED"));
  EXPECT_FALSE(fs::exists(here / "PWNED"));
}

TEST_F(EvalData, CliConvertsACompressedFileWhoseNameHasQuotesAndSemicolons) {
  const auto name = path("y';touch PWNED;'.jsonl.bz2");
  fs::copy_file(test::fixture("evals/compressed/mc.jsonl.bz2"), name);
  const auto out = path("converted.jsonl");
  const Run r = moelab({"eval", "--tasks", "multiple_choice", "--data", name, "--convert-to", out});
  ASSERT_EQ(r.status, 0) << r.err;
  // The fixture is already in the normalized form: the conversion gives back the same records.
  std::vector<json> got, want;
  std::istringstream g(test::read_file_bytes(out)), w(test::read_file_bytes(test::fixture("evals/compressed/mc.jsonl")));
  for (std::string l; std::getline(g, l);) got.push_back(json::parse(l));
  for (std::string l; std::getline(w, l);) want.push_back(json::parse(l));
  EXPECT_EQ(got.size(), 3u);
  EXPECT_EQ(got, want);
  EXPECT_FALSE(fs::exists(tmp / "PWNED"));
  EXPECT_FALSE(fs::exists(fs::current_path() / "PWNED"));
}

TEST_F(EvalData, MultiMemberGzipAndMultiStreamBzip2AreReadWhole) {
  // `gzip -dc` and `bzip2 -dc` join concatenated members; so does the in-process reader.
  for (const std::string f : {"mc-two-members.jsonl.gz", "mc-two-streams.jsonl.bz2"}) {
    SCOPED_TRACE(f);
    EXPECT_EQ(queries(read_docs("multiple_choice", TaskType::MultipleChoice, test::fixture("evals/compressed/" + f))),
              kFixtureQueries);
  }
}

TEST_F(EvalData, CorruptTruncatedAndMislabelledArchivesAreOneClearError) {
  const std::string gz = test::read_file_bytes(test::fixture("evals/compressed/mc.jsonl.gz"));
  const std::string bz = test::read_file_bytes(test::fixture("evals/compressed/mc.jsonl.bz2"));
  ASSERT_GT(gz.size(), 40u);
  ASSERT_GT(bz.size(), 40u);
  const auto mc = TaskType::MultipleChoice;

  // A damaged deflate stream (bytes in the middle overwritten).
  std::string bad_gz = gz;
  for (size_t i = 20; i < 40; ++i) bad_gz[i] = char(0xff);
  const auto e1 = error_for("multiple_choice", mc, "bad.jsonl.gz", bad_gz);
  EXPECT_EQ(e1.rfind(path("bad.jsonl.gz") + ": corrupt gzip data (", 0), 0u) << e1;
  EXPECT_EQ(e1.find('\n'), std::string::npos) << e1;

  // Only the CRC of the trailer damaged: the data decompresses but does not check.
  std::string bad_crc = gz;
  bad_crc[gz.size() - 8] = char(bad_crc[gz.size() - 8] ^ 0x55);
  EXPECT_EQ(error_for("multiple_choice", mc, "crc.jsonl.gz", bad_crc),
            path("crc.jsonl.gz") + ": corrupt gzip data (incorrect data check, near compressed byte 156)");

  EXPECT_EQ(error_for("multiple_choice", mc, "cut.jsonl.gz", gz.substr(0, gz.size() / 2)),
            path("cut.jsonl.gz") + ": truncated gzip data (the compressed stream ends early)");
  EXPECT_EQ(error_for("multiple_choice", mc, "plain.jsonl.gz", "{\"query\": \"q\"}\n"),
            path("plain.jsonl.gz") + ": not gzip data (no gzip header; is the file name's .gz right?)");
  EXPECT_EQ(error_for("multiple_choice", mc, "trailing.jsonl.gz", gz + "garbage"),
            path("trailing.jsonl.gz") + ": corrupt gzip data (unexpected bytes after the compressed stream, at byte 160)");
  // Zero padding after the stream (as tape and block devices leave) is ignored, as gzip does.
  EXPECT_EQ(error_for("multiple_choice", mc, "padded.jsonl.gz", gz + std::string(512, '\0')), "");

  std::string bad_bz = bz;
  for (size_t i = 20; i < 40; ++i) bad_bz[i] = char(0x00);
  const auto e2 = error_for("multiple_choice", mc, "bad.jsonl.bz2", bad_bz);
  EXPECT_EQ(e2.rfind(path("bad.jsonl.bz2") + ": corrupt bzip2 data (", 0), 0u) << e2;
  EXPECT_EQ(error_for("multiple_choice", mc, "cut.jsonl.bz2", bz.substr(0, bz.size() / 2)),
            path("cut.jsonl.bz2") + ": truncated bzip2 data (the compressed stream ends early)");
  EXPECT_EQ(error_for("multiple_choice", mc, "plain.jsonl.bz2", "{}\n"),
            path("plain.jsonl.bz2") + ": not bzip2 data (no bzip2 header; is the file name's .bz2 right?)");
  EXPECT_EQ(error_for("multiple_choice", mc, "empty.jsonl.gz", ""),
            path("empty.jsonl.gz") + ": not gzip data (no gzip header; is the file name's .gz right?)");
}

TEST_F(EvalData, CliCorruptGzipIsOneLineNamingTheFile) {
  std::string gz = test::read_file_bytes(test::fixture("evals/compressed/mc.jsonl.gz"));
  gz.resize(gz.size() / 2);
  const auto name = path("half';.jsonl.gz");
  write(name, gz);
  expect_one_line_error(moelab({"eval", "--tasks", "multiple_choice", "--data", name, "--convert-to", path("o.jsonl")}),
                        name + ": truncated gzip data (the compressed stream ends early)");
}

TEST_F(EvalData, DataThatIsNotARegularFileIsRefusedWithoutBlocking) {
  EXPECT_THROW(
      {
        try {
          read_docs("multiple_choice", TaskType::MultipleChoice, tmp.string());
        } catch (const Error& e) {
          EXPECT_EQ(std::string(e.what()), tmp.string() + ": not a regular file (a directory)");
          throw;
        }
      },
      Error);
  const auto fifo = path("fifo.jsonl");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // A FIFO with no writer would block open() for reading forever without O_NONBLOCK.
  try {
    read_docs("multiple_choice", TaskType::MultipleChoice, fifo);
    ADD_FAILURE() << "a FIFO was read";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), fifo + ": not a regular file (a FIFO)");
  }
  try {
    read_docs("multiple_choice", TaskType::MultipleChoice, path("absent.jsonl"));
    ADD_FAILURE() << "a missing file was read";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), path("absent.jsonl") + ": cannot open: No such file or directory");
  }
}

// ---- The spawner. ----

TEST_F(EvalData, RunProcessPassesArgumentsVerbatimAndReportsStatus) {
  const auto out = path("out.txt");
  const std::string nasty = "a'b\"c;touch PWNED;$(touch PWNED2) `x` *";
  {
    const InDirectory in_tmp(tmp);
    EXPECT_EQ(run_process({"printf", "%s|%s", nasty, "second arg"}, {.stdout_path = out}), 0);
  }
  EXPECT_EQ(test::read_file_bytes(out), nasty + "|second arg");
  EXPECT_FALSE(fs::exists(tmp / "PWNED"));
  EXPECT_FALSE(fs::exists(tmp / "PWNED2"));

  EXPECT_EQ(run_process({"sh", "-c", "exit 3"}), 3);
  EXPECT_EQ(run_process({"sh", "-c", "kill -TERM $$"}), 128 + 15);
  EXPECT_EQ(run_process({"sh", "-c", "echo to-stderr >&2; echo to-stdout"}, {.stdout_path = "/dev/null", .stderr_path = out}), 0);
  EXPECT_EQ(test::read_file_bytes(out), "to-stderr\n");
  try {
    run_process({"/nonexistent/moelab-no-such-program", "x"});
    ADD_FAILURE() << "no error for a missing program";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "cannot run /nonexistent/moelab-no-such-program: No such file or directory");
  }
  EXPECT_THROW(run_process({}), Error);
  EXPECT_EQ(describe_command({"python3", "/a b/plot.py", "it's"}), "python3 '/a b/plot.py' 'it'\\''s'");
}

TEST_F(EvalData, DemoPlotsIntoAnOutputFolderWhoseNameHasShellSyntax) {
  // The demo's plotting step used to run std::system("'<python>' '<script>' '<trace>' '<plot dir>'").
  const fs::path repo = fs::path(MOELAB_BUNDLED_MODEL).parent_path().parent_path();
  const std::string py = (repo / ".venv/bin/python").string();
  int have = 1;
  try {
    have = run_process({py, "-c", "import h5py, matplotlib"}, {.stdout_path = "/dev/null", .stderr_path = "/dev/null"});
  } catch (const Error&) {
  }
  if (have != 0) GTEST_SKIP() << "no light Python tier at " << py << " (scripts/setup.sh): the demo would skip its plots";
  {
    std::ofstream corpus(tmp / "heldout.jsonl");
    corpus << json{{"text", "int main(void) { return 0; }"}, {"domain", "c"}}.dump() << "\n"
           << json{{"text", "The licensee may copy and distribute verbatim copies."}, {"domain", "legal"}}.dump() << "\n";
  }
  const std::string out = "r';touch PWNED;'";
  Run r{};
  {
    const InDirectory in_tmp(tmp);  // a shell would have run touch here
    r = moelab({"demo", "--model", test::model_dir("mixtral-4e-gqa-f32"), "--corpus", (tmp / "heldout.jsonl").string(), "--output",
                out, "--max-new-tokens", "4", "--hellaswag-items", "3", "--threads", "1"});
  }
  ASSERT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_FALSE(fs::exists(tmp / "PWNED"));
  const auto index = json::parse(test::read_file_bytes(tmp / out / "index.json"));
  std::set<std::string> plots;
  for (const auto& p : index["plots"]) plots.insert(fs::path(p.get<std::string>()).filename().string());
  EXPECT_EQ(plots, (std::set<std::string>{"coselection_layer0.png", "expert_load_by_domain.png", "load_heatmap.png",
                                          "repetition.png"}));
  for (const auto& f : plots) EXPECT_GT(fs::file_size(tmp / out / "plots" / f), 1000u) << f;
}

// ---- Item 3: the regexes, replaced by linear-time code with the same output. ----

// The regex implementations the hand-written code replaced (std::regex, ECMAScript), kept here as the
// oracle on inputs short enough for its recursive matcher.
std::string old_strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace((unsigned char)s[a])) ++a;
  while (b > a && std::isspace((unsigned char)s[b - 1])) --b;
  return s.substr(a, b - a);
}
void old_replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
}
std::string old_hellaswag_preprocess(std::string text) {
  text = old_strip(text);
  old_replace_all(text, " [title]", ". ");
  // "\[.*?\]" with Python's '.', which matches '\r' (ECMAScript's does not): "[^\n]".
  text = std::regex_replace(text, std::regex(R"(\[[^\n]*?\])"), "");
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ' ' && i + 1 < text.size() && text[i + 1] == ' ') out += ' ', ++i;
    else out += text[i];
  }
  return out;
}
std::string old_wikitext_detokenize(std::string s) {
  old_replace_all(s, "s '", "s'");
  s = std::regex_replace(s, std::regex(R"(/' [0-9]/)"), "/'[0-9]/");
  old_replace_all(s, " @-@ ", "-");
  old_replace_all(s, " @,@ ", ",");
  old_replace_all(s, " @.@ ", ".");
  for (const char* p : {" : ", " ; ", " . ", " ! ", " ? ", " , "}) old_replace_all(s, p, std::string(1, p[1]) + " ");
  s = std::regex_replace(s, std::regex(R"(\(\s*([^\)]*?)\s*\))"), "($1)");
  s = std::regex_replace(s, std::regex(R"(\[\s*([^\]]*?)\s*\])"), "[$1]");
  s = std::regex_replace(s, std::regex(R"(\{\s*([^}]*?)\s*\})"), "{$1}");
  s = std::regex_replace(s, std::regex(R"("\s*([^"]*?)\s*")"), "\"$1\"");
  s = std::regex_replace(s, std::regex(R"('\s*([^']*?)\s*')"), "'$1'");
  old_replace_all(s, "= = = =", "====");
  old_replace_all(s, "= = =", "===");
  old_replace_all(s, "= =", "==");
  old_replace_all(s, " \xC2\xB0 ", "\xC2\xB0");
  old_replace_all(s, " \n", "\n");
  old_replace_all(s, "\n ", "\n");
  old_replace_all(s, " N ", " 1 ");
  old_replace_all(s, " 's", "'s");
  return s;
}
bool old_is_heading(const std::string& l) { return std::regex_match(l, std::regex(R"(^ = [^=].* = $)")); }
std::string old_strict(const std::string& r) {
  std::smatch m;
  if (!std::regex_search(r, m, std::regex(R"(#### (\-?[0-9\.\,]+))"))) return "[invalid]";
  return old_strip(m[1].str());
}
std::string old_flexible(const std::string& r) {
  const std::regex re(R"((-?[$0-9.,]{2,})|(-?[0-9]+))");
  std::string last;
  bool any = false;
  for (auto it = std::sregex_iterator(r.begin(), r.end(), re); it != std::sregex_iterator(); ++it) {
    last = (*it)[1].matched && (*it)[1].length() > 0 ? (*it)[1].str() : (*it)[2].str();
    any = true;
  }
  return any ? old_strip(last) : "[invalid]";
}

std::string random_text(std::mt19937& rng, const std::string& alphabet, size_t max_len) {
  std::uniform_int_distribution<size_t> len(0, max_len), pick(0, alphabet.size() - 1);
  std::string s(len(rng), ' ');
  for (auto& c : s) c = alphabet[pick(rng)];
  return s;
}

TEST(EvalTextRegexParity, HandDerivedCases) {
  // Each expected value worked out from the regex by hand (and equal to Python's re.sub here; text with
  // '\r' and Unicode white space is checked against the harness itself in tests/test_harness_unicode.cpp).
  EXPECT_EQ(hellaswag_preprocess("a [b] c"), "a c");            // "a " + " c" -> one space after the "  " pass
  EXPECT_EQ(hellaswag_preprocess("a [b [c] d] e"), "a d] e");  // lazy: '[' to the FIRST ']'; then "  " -> " "
  EXPECT_EQ(hellaswag_preprocess("x [unclosed y"), "x [unclosed y");
  EXPECT_EQ(hellaswag_preprocess("x [line\nbreak] y [z]"), "x [line\nbreak] y ");  // '.' stops at '\n'
  EXPECT_EQ(hellaswag_preprocess("[a][b]c"), "c");
  EXPECT_EQ(hellaswag_preprocess("]a[ [b]"), "]a");  // the first '[' runs to the first ']': "[ [b]" goes whole
  EXPECT_EQ(hellaswag_preprocess("Home [title] Cook [step] it"), "Home. Cook it");

  EXPECT_EQ(wikitext_detokenize("( a b )"), "(a b)");
  EXPECT_EQ(wikitext_detokenize("(  )"), "()");
  EXPECT_EQ(wikitext_detokenize("( a ( b ) c )"), "(a ( b) c )");  // first '(' pairs with the first ')'
  EXPECT_EQ(wikitext_detokenize("x ( never closed"), "x ( never closed");
  EXPECT_EQ(wikitext_detokenize("[ \t1\n ]"), "[1]");
  EXPECT_EQ(wikitext_detokenize("{ a } { b }"), "{a} {b}");
  EXPECT_EQ(wikitext_detokenize("\" a \" b \" c \" \" d"), "\"a\" b \"c\" \" d");  // quotes pair in order
  EXPECT_EQ(wikitext_detokenize("it ' s ' x"), "it's' x");  // quotes paired, then " 's" -> "'s"
  EXPECT_EQ(wikitext_detokenize("see /' 1/ and /' x/"), "see /'[0-9]/ and /' x/");
  EXPECT_EQ(wikitext_detokenize("/' 1/' 2/"), "/'[0-9]/' 2/");  // matches do not overlap
  EXPECT_EQ(wikitext_detokenize("= = = Title = = ="), "=== Title ===");

  EXPECT_TRUE(wikitext_is_article_heading(" = Valkyria Chronicles III = "));
  EXPECT_TRUE(wikitext_is_article_heading(" = x = "));
  EXPECT_FALSE(wikitext_is_article_heading(" = = Section = = "));
  EXPECT_FALSE(wikitext_is_article_heading(" = x ="));
  EXPECT_FALSE(wikitext_is_article_heading(" =  = "));
  EXPECT_FALSE(wikitext_is_article_heading(" = a\rb = "));  // '.' does not match '\r'
  EXPECT_TRUE(wikitext_is_article_heading(" = \r = "));     // but [^=] does

  EXPECT_EQ(gsm8k_strict("#### -5"), "-5");
  EXPECT_EQ(gsm8k_strict("#### - 5"), "[invalid]");
  EXPECT_EQ(gsm8k_strict("##### 12 then #### 3"), "12");  // the match starts at the second '#'
  EXPECT_EQ(gsm8k_strict("#### x #### 4"), "4");
  EXPECT_EQ(gsm8k_flexible("a -5 b"), "-5");
  EXPECT_EQ(gsm8k_flexible("7 -$"), "7");        // "-$" is no match: '$' alone is too short, not a digit
  EXPECT_EQ(gsm8k_flexible("1 --23"), "-23");     // the first '-' starts no match, the second does
  EXPECT_EQ(gsm8k_flexible("$5 and 3"), "3");
  EXPECT_EQ(gsm8k_flexible("costs $5"), "$5");
  EXPECT_EQ(gsm8k_flexible("., and"), ".,");      // two class characters suffice
}

TEST(EvalTextRegexParity, MatchesTheOldRegexesOnRandomText) {
  std::mt19937 rng(20261201);
  const std::string wiki_alphabet = "()[]{}\"' \t\n\ras/0@-.,=N:;!?";
  const std::string hs_alphabet = "[] \n\rab";
  const std::string num_alphabet = "#### -$0123456789.,x";
  for (int i = 0; i < 2000; ++i) {
    const auto w = random_text(rng, wiki_alphabet, 24);
    ASSERT_EQ(wikitext_detokenize(w), old_wikitext_detokenize(w)) << json(w).dump();
    const auto h = random_text(rng, hs_alphabet, 24);
    ASSERT_EQ(hellaswag_preprocess(h), old_hellaswag_preprocess(h)) << json(h).dump();
    const auto heading = " = " + random_text(rng, "= \rx", 8) + (i % 2 ? " = " : " =");
    ASSERT_EQ(wikitext_is_article_heading(heading), old_is_heading(heading)) << json(heading).dump();
    const auto n = random_text(rng, num_alphabet, 24);
    ASSERT_EQ(gsm8k_strict(n), old_strict(n)) << json(n).dump();
    ASSERT_EQ(gsm8k_flexible(n), old_flexible(n)) << json(n).dump();
  }
}

// Long inputs that overflowed std::regex's stack (segfault) now finish, quickly and with the right text.

TEST(EvalTextLong, FiftyKilobyteParenthesisedSpan) {
  std::string words;
  while (words.size() < 50000) words += "word ";
  const auto t = std::chrono::steady_clock::now();
  EXPECT_EQ(wikitext_detokenize("before (  " + words + " ) after"), "before (" + words.substr(0, words.size() - 1) + ") after");
  EXPECT_EQ(hellaswag_preprocess("keep [" + words + "] this"), "keep this");
  EXPECT_EQ(gsm8k_flexible(std::string(50000, '7') + " and -" + std::string(50000, '1')), "-" + std::string(50000, '1'));
  EXPECT_EQ(gsm8k_strict("#### " + std::string(50000, '9')), std::string(50000, '9'));
  EXPECT_LT(seconds_since(t), 2.0);
}

TEST(EvalTextLong, UnmatchedOpenersInAHundredKilobytes) {
  std::string body;
  while (body.size() < 100000) body += "text and more ";
  const std::string text = "start ( " + body + "end";  // one '(' that never closes: left as it is
  const auto t = std::chrono::steady_clock::now();
  EXPECT_EQ(wikitext_detokenize(text), text);
  EXPECT_EQ(hellaswag_preprocess("x [ " + body + "y"), "x [ " + body + "y");
  // Worst cases for a quadratic rescan: a megabyte of openers with no closer.
  const std::string parens(1 << 20, '('), brackets(1 << 20, '['), quotes = std::string(1 << 20, 'a') + "\"";
  EXPECT_EQ(wikitext_detokenize(parens), parens);
  EXPECT_EQ(hellaswag_preprocess(brackets), brackets);
  EXPECT_EQ(wikitext_detokenize(quotes), quotes);
  EXPECT_EQ(gsm8k_strict(std::string(1 << 20, '#')), "[invalid]");
  EXPECT_LT(seconds_since(t), 2.0);
}

TEST_F(EvalData, LongArticleWithAnUnmatchedParenthesisIsReadWhole) {
  std::string units, detokenized_units;
  while (units.size() < 100000) units += " the quick brown fox , jumps", detokenized_units += " the quick brown fox, jumps";
  const std::string article = " = Long = \n\n (" + units + " \n";
  write(path("wiki.txt"), "\n" + article + "\n = Next = \n short ( one ) \n");
  const auto t = std::chrono::steady_clock::now();
  const auto docs = read_docs("wikitext", TaskType::Rolling, path("wiki.txt"));
  EXPECT_LT(seconds_since(t), 2.0);
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].page, article + "\n");
  // The '(' never closes, so it stays with its space; " , " -> ", ", " \n" -> "\n", "\n " -> "\n".
  EXPECT_EQ(docs[0].text, " = Long =\n\n(" + detokenized_units + "\n\n");
  EXPECT_EQ(docs[1].page, " = Next = \n short ( one ) \n");
  EXPECT_EQ(docs[1].text, " = Next =\nshort (one)\n");
}

// ---- Item 10: every field checked, errors naming file, line and field. ----

TEST_F(EvalData, NormalizedGoldMustBeAnIntegerInRange) {
  const auto mc = TaskType::MultipleChoice;
  const std::string ok = R"({"query": "q", "choices": ["a", "b", "c", "d"], "gold": 3})" "\n";
  auto with_gold = [&](const std::string& gold) {
    return ok + R"({"query": "q", "choices": ["a", "b", "c", "d"], "gold": )" + gold + "}\n";
  };
  const auto f = path("mc.jsonl");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("1099511627776")),
            f + ":2: field \"gold\": 1099511627776 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("7")),
            f + ":2: field \"gold\": 7 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("-3")),
            f + ":2: field \"gold\": -3 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("1.7")),
            f + ":2: field \"gold\": expected an integer, got number 1.7");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("\"1\"")),
            f + ":2: field \"gold\": expected an integer, got string \"1\"");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("-9223372036854775808")),
            f + ":2: field \"gold\": -9223372036854775808 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", with_gold("18446744073709551615")),
            f + ":2: field \"gold\": 18446744073709551615 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", "\n\n" + ok + R"({"query": "q", "choices": ["a"]})"),
            f + ":4: field \"gold\": missing");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"query": "q", "choices": [], "gold": 0})"),
            f + ":1: field \"choices\": expected at least 1 entry, got 0");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"query": "q", "choices": ["a", 2], "gold": 0})"),
            f + ":1: field \"choices\": entry 1 is number 2, not a string");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"query": 5, "choices": ["a"], "gold": 0})"),
            f + ":1: field \"query\": expected a string, got number 5");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"gold": 0, "choices": ["a"]})"),
            f + ":1: field \"query\": missing");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"contexts": ["a", "b"], "continuation": "c", "gold": 2})"),
            f + ":1: field \"gold\": 2 is out of range (expected 0..1 for 2 contexts)");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"query": "q", "choices": ["a"], "gold": 0, "subject": 1})"),
            f + ":1: field \"subject\": expected a string, got number 1");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", "[1, 2]\n"), f + ":1: a record must be a JSON object, got array [1,2]");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", "{\"query\": \n"),
            f + ":1: not valid JSON: parse error at line 1, column 11: syntax error while parsing value - unexpected end of input; "
                "expected '[', '{', or a literal");
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", R"({"other": 1})"),
            f + ":1: multiple_choice: record is neither the normalized form (query, choices, gold; or contexts, continuation, "
                "gold) nor a known public form (its fields: other)");
  // The first good record alone reads.
  EXPECT_EQ(error_for("multiple_choice", mc, "mc.jsonl", ok), "");
}

TEST_F(EvalData, PublicFormsCheckTheirAnswerFields) {
  const auto mc = TaskType::MultipleChoice;
  const auto f = path("d.jsonl");
  const std::string mmlu = R"({"question": "Q?", "choices": ["1", "2", "3", "4"], "answer": )";
  EXPECT_EQ(error_for("mmlu", mc, "d.jsonl", mmlu + "\"\"}"),
            f + ":1: field \"answer\": expected a letter A..D or an integer 0..3, got \"\"");
  EXPECT_EQ(error_for("mmlu", mc, "d.jsonl", mmlu + "\"E\"}"),
            f + ":1: field \"answer\": expected a letter A..D or an integer 0..3, got \"E\"");
  EXPECT_EQ(error_for("mmlu", mc, "d.jsonl", mmlu + "4}"), f + ":1: field \"answer\": 4 is out of range (expected 0..3 for 4 choices)");
  EXPECT_EQ(error_for("mmlu", mc, "d.jsonl", R"({"question": "Q?", "choices": ["1", "2", "3"], "answer": 0})"),
            f + ":1: field \"choices\": expected at least 4 entries, got 3");
  EXPECT_EQ(error_for("mmlu", mc, "d.jsonl", R"({"question": "Q?", "answer": 0})"), f + ":1: field \"choices\": missing");
  write(path("ok.jsonl"), mmlu + "\"C\"}\n" + mmlu + "1}\n");
  const auto m = read_docs("mmlu", mc, path("ok.jsonl"));
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0].gold, 2);
  EXPECT_EQ(m[1].gold, 1);

  const std::string wino = R"({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": )";
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", wino + "\"3\"}"), f + ":1: field \"answer\": expected \"1\" or \"2\", got \"3\"");
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", wino + "\"\"}"), f + ":1: field \"answer\": expected \"1\" or \"2\", got \"\"");
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", wino + "0}"), f + ":1: field \"answer\": expected \"1\" or \"2\", got 0");
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", R"({"sentence": "no blank", "option1": "x", "option2": "y", "answer": "1"})"),
            f + ":1: field \"sentence\": has no '_' blank");
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", R"({"sentence": "A _ b.", "option1": "x", "answer": "1"})"),
            f + ":1: field \"option2\": missing");
  write(path("w.jsonl"), wino + "2}\n" + wino + "\"1\"}\n");
  const auto w = read_docs("winogrande", mc, path("w.jsonl"));
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].gold, 1);
  EXPECT_EQ(w[1].gold, 0);

  const std::string hs = R"({"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["1", "2", "3", "4"], "label": )";
  EXPECT_EQ(error_for("hellaswag", mc, "d.jsonl", hs + "\"x\"}"), f + ":1: field \"label\": expected an integer label, got \"x\"");
  EXPECT_EQ(error_for("hellaswag", mc, "d.jsonl", hs + "\"\"}"), f + ":1: field \"label\": expected an integer label, got \"\"");
  EXPECT_EQ(error_for("hellaswag", mc, "d.jsonl", hs + "\"4\"}"),
            f + ":1: field \"label\": \"4\" is out of range (expected 0..3 for 4 endings)");
  EXPECT_EQ(error_for("hellaswag", mc, "d.jsonl", hs + "\"99999999999999999999\"}"),
            f + ":1: field \"label\": expected an integer label, got \"99999999999999999999\"");
  EXPECT_EQ(error_for("hellaswag", mc, "d.jsonl", hs + "1.5}"), f + ":1: field \"label\": expected an integer, got number 1.5");

  const std::string arc = R"({"question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": )";
  EXPECT_EQ(error_for("arc_easy", mc, "d.jsonl", arc + "\"E\"}"), f + ":1: field \"answerKey\": \"E\" is not among the labels [\"A\",\"B\"]");
  EXPECT_EQ(error_for("arc_easy", mc, "d.jsonl", arc + "1}"), f + ":1: field \"answerKey\": expected a string, got number 1");
  EXPECT_EQ(error_for("arc_challenge", mc, "d.jsonl",
                      R"({"question": "Q", "choices": {"text": ["a"], "label": ["A", "B"]}, "answerKey": "A"})"),
            f + ":1: field \"choices\": 1 texts but 2 labels");
  EXPECT_EQ(error_for("piqa", mc, "d.jsonl", R"({"goal": "g", "sol1": "a", "sol2": "b", "label": 2})"),
            f + ":1: field \"label\": 2 is out of range (expected 0..1 for 2 solutions)");
  EXPECT_EQ(error_for("gsm8k", TaskType::Generate, "d.jsonl", R"({"question": "q", "answer": 42})"),
            f + ":1: field \"answer\": expected a string, got number 42");
  EXPECT_EQ(error_for("generate", TaskType::Generate, "d.jsonl", R"({"text": "q"})"), f + ":1: field \"target\": missing");
  EXPECT_EQ(error_for("humaneval", TaskType::Code, "d.jsonl", R"({"task_id": "t", "prompt": "p", "test": "t"})"),
            f + ":1: field \"entry_point\": missing");
  EXPECT_EQ(error_for("wikitext", TaskType::Rolling, "d.jsonl", R"({"page": ["x"]})"),
            f + ":1: field \"page\": expected a string, got array [\"x\"]");
  // A named task reads its own form: a record of another task's form names the field it lacks.
  EXPECT_EQ(error_for("winogrande", mc, "d.jsonl", R"({"goal": "g", "sol1": "a", "sol2": "b", "label": 0})"),
            f + ":1: field \"sentence\": missing");
}

TEST_F(EvalData, HellaswagTextFormLabelsAndShape) {
  EXPECT_EQ(error_for("hellaswag", TaskType::MultipleChoice, "hs.txt", "ctx\n1\na\nb\nc\nd\nctx\nx\na\nb\nc\nd\n"),
            path("hs.txt") + ":8: field \"label\": expected an integer label, got \"x\"");
  EXPECT_EQ(error_for("hellaswag", TaskType::MultipleChoice, "hs.txt", "ctx\n4\na\nb\nc\nd\n"),
            path("hs.txt") + ":2: field \"label\": \"4\" is out of range (expected 0..3 for 4 endings)");
  EXPECT_EQ(error_for("hellaswag", TaskType::MultipleChoice, "hs.txt", "ctx\n1\na\nb\nc\nd\nctx\n2\n"),
            path("hs.txt") + ": the HellaSwag text form has 6 lines per item (context, label, 4 endings), but there are 8 "
                             "lines (the last item, from line 7, is incomplete)");
  EXPECT_EQ(error_for("hellaswag", TaskType::MultipleChoice, "hs.txt", "ctx\n1\na\nb\xff\nc\nd\n"),
            path("hs.txt") + ":4: not valid UTF-8 (byte 2 of the line)");
  write(path("ok.txt"), "Label: ctx [x]\r\n3\r\na\r\nb\r\nc\r\nd [step] e\r\n");
  const auto docs = read_docs("hellaswag", TaskType::MultipleChoice, path("ok.txt"));
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0].gold, 3);
  EXPECT_EQ(docs[0].query, "Label: ctx ");
  EXPECT_EQ(docs[0].choices[3], "d e");
}

TEST_F(EvalData, ReportedScoresFileIsCheckedEntryByEntry) {
  // The bundled file reads, and its Mixtral HellaSwag entry is found.
  const fs::path repo = fs::path(MOELAB_BUNDLED_MODEL).parent_path().parent_path();
  const auto hs = find_reported((repo / "evals/reported/mixtral-8x7b.json").string(), "hellaswag", 0);
  ASSERT_TRUE(hs.has_value());
  EXPECT_EQ(hs->shots, 0);
  EXPECT_GT(hs->score, 50);
  auto error = [&](const std::string& content) -> std::string {
    write(path("r.json"), content);
    try {
      find_reported(path("r.json"), "hellaswag", 0);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const auto f = path("r.json");
  const std::string ok = R"({"model": "Mixtral 8x7B", "task": "hellaswag", "score": 84.4, "shots": 0, "metric": "acc_norm"})";
  EXPECT_EQ(error(R"({"entries": [)" + ok + "]}"), "");
  EXPECT_EQ(error(R"({"entries": [)" + ok + R"(, {"task": "x", "score": "84", "shots": 0}]})"),
            f + ": entries[1]: field \"score\": expected a number, got \"84\"");
  EXPECT_EQ(error(R"({"entries": [{"task": "x", "shots": 0}]})"), f + ": entries[0]: field \"score\": missing");
  EXPECT_EQ(error(R"({"entries": [{"task": "x", "score": 1, "shots": -1}]})"),
            f + ": entries[0]: field \"shots\": expected null or an integer 0..1000000, got -1");
  EXPECT_EQ(error(R"({"entries": [{"task": "x", "score": 1, "shots": 1.5}]})"),
            f + ": entries[0]: field \"shots\": expected null or an integer 0..1000000, got 1.5");
  EXPECT_EQ(error(R"({"entries": [{"task": 3, "score": 1, "shots": 0}]})"),
            f + ": entries[0]: field \"task\": expected a string, got 3");
  EXPECT_EQ(error(R"({"entries": [{"task": "x", "score": 1, "shots": 0, "table": "2"}]})"),
            f + ": entries[0]: field \"table\": expected an integer 0..1000000, got \"2\"");
  EXPECT_EQ(error(R"([1])"), f + ": reported scores file must be an object with an \"entries\" array");
  EXPECT_EQ(error(R"({"entries": [1]})"), f + ": entries[0] is not an object");
  const auto e = error("{\"entries\": ");
  EXPECT_EQ(e.rfind(f + ": reported scores file is not valid JSON: ", 0), 0u) << e;
}

TEST_F(EvalData, CliRejectsNegativeCountsAndBadRecordsInOneLine) {
  const auto data = test::fixture("evals/compressed/mc.jsonl");
  expect_one_line_error(moelab({"eval", "--tasks", "multiple_choice", "--data", data, "--num-fewshot", "-3"}),
                        "eval: --num-fewshot must be 0 or more, or -1 for each task's default (got -3)");
  expect_one_line_error(moelab({"eval", "--tasks", "multiple_choice", "--data", data, "--num-fewshot", "-2"}),
                        "eval: --num-fewshot must be 0 or more, or -1 for each task's default (got -2)");
  expect_one_line_error(moelab({"eval", "--tasks", "multiple_choice", "--data", data, "--limit", "-1"}),
                        "eval: --limit must be a count of documents (0: all) or a fraction below 1, got '-1'");
  expect_one_line_error(moelab({"eval", "--tasks", "generate", "--data", data, "--repeats", "-2"}),
                        "eval: --repeats must be 1 or more (got -2)");
  expect_one_line_error(moelab({"eval", "--tasks", "generate", "--data", data, "--repeats", "0"}),
                        "eval: --repeats must be 1 or more (got 0)");
  const auto bad = path("bad.jsonl");
  write(bad, "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 1099511627776}\n");
  expect_one_line_error(moelab({"eval", "--tasks", "multiple_choice", "--data", bad, "--convert-to", path("o.jsonl")}),
                        bad + ":1: field \"gold\": 1099511627776 is out of range (expected 0..1 for 2 choices)");
  // Checked before any model loads: a missing model does not hide the data error.
  expect_one_line_error(moelab({"eval", "--model", path("no-model"), "--tasks", "multiple_choice", "--data", bad}),
                        bad + ":1: field \"gold\": 1099511627776 is out of range (expected 0..1 for 2 choices)");
  const auto hs = path("hs.jsonl");
  write(hs, "{\"activity_label\": \"A\", \"ctx_a\": \"b\", \"ctx_b\": \"c\", \"endings\": [\"1\", \"2\"], \"label\": \"one\"}\n");
  expect_one_line_error(moelab({"eval", "--tasks", "hellaswag", "--data", hs, "--convert-to", path("o.jsonl")}),
                        hs + ":1: field \"label\": expected an integer label, got \"one\"");
}


// ---- Issue 14: GSM8K's few-shot examples as lm-evaluation-harness 0.4.9.2 takes them: from the train split,
// rnd.sample(train_docs, 5) per test doc from one random.Random(1234). The repository ships the sparse slice
// of the train split those draws need for the first 100 test docs (evals/data/gsm8k-train-fewshot.jsonl);
// tests/fixtures/evals/gsm8k-fewshot-draws.json holds the indices Python drew and the hashes of the prompts
// built from the FULL train file (scripts/make_gsm8k_fewshot_slice.py wrote both). ----


using analysis::sha256_hex;

const fs::path kRepo = fs::path(MOELAB_FIXTURES).parent_path().parent_path();
const std::string kSlice = (kRepo / "evals/data/gsm8k-train-fewshot.jsonl").string();
const std::string kTest20 = (kRepo / "evals/data/gsm8k-test-20.jsonl").string();

json draws_fixture() {
  std::ifstream f(test::fixture("evals/gsm8k-fewshot-draws.json"));
  return json::parse(f);
}

std::string one_line_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(EvalGsm8kFewshot, BundledSliceGivesThePromptsOfTheFullTrainSplit) {
  const json fx = draws_fixture();
  const TaskSpec spec = task_spec("gsm8k");
  EXPECT_EQ(spec.fewshot_split, "train");
  EXPECT_EQ(spec.fewshot_split_size, 7473u);
  EXPECT_EQ(spec.bundled_fewshot, "evals/data/gsm8k-train-fewshot.jsonl");
  std::string split;
  const auto pool = read_fewshot_docs("gsm8k", spec.type, kSlice, &split);
  EXPECT_EQ(split, "train");
  ASSERT_EQ(pool.size(), fx["total"].get<size_t>());
  const auto test = read_docs("gsm8k", spec.type, kTest20);
  ASSERT_EQ(test.size(), 20u);

  // Python's indices, from our generator; and the slice holds exactly the docs those draws use.
  PyRandom draw(fx["seed"].get<uint64_t>()), ctx_rnd(fx["seed"].get<uint64_t>()), block_rnd(fx["seed"].get<uint64_t>());
  std::set<size_t> needed, held;
  for (size_t i = 0; i < pool.size(); ++i)
    if (!pool[i].absent()) held.insert(i);
  const auto& docs = fx["docs"];
  ASSERT_EQ(docs.size(), 100u);
  size_t prompts = 0;
  for (size_t k = 0; k < docs.size(); ++k) {
    SCOPED_TRACE(k);
    const auto expected = docs[k]["indices"].get<std::vector<size_t>>();
    EXPECT_EQ(draw.sample(pool.size(), 5), expected);
    needed.insert(expected.begin(), expected.end());
    // The few-shot block alone (a doc with no text), for every one of the 100 docs.
    EXPECT_EQ(sha256_hex(fewshot_context(spec, Doc{}, 5, pool, false, k, block_rnd)),
              docs[k]["fewshot_sha256"].get<std::string>());
    // The whole prompt, for the test docs the repository ships.
    if (k < test.size()) {
      EXPECT_EQ(sha256_hex(fewshot_context(spec, test[k], 5, pool, false, k, ctx_rnd)),
                docs[k]["prompt_sha256"].get<std::string>());
      ++prompts;
    }
  }
  EXPECT_EQ(prompts, 20u);
  EXPECT_EQ(held, needed);
  // The records are the train file's own: question/answer as GSM8K writes them (no "index" left in source).
  const Doc& d = pool[*held.begin()];
  EXPECT_EQ(d.text.rfind("Question: ", 0), 0u);
  EXPECT_NE(d.target.find("\n#### "), std::string::npos);
  EXPECT_FALSE(d.source.contains("index"));
}

class EvalSparseSlice : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return (tmp / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }
  using Run = test::MoelabRun;
  // The real binary, started without a shell (arguments passed as they are).
  Run moelab(std::vector<std::string> args) { return test::run_moelab(std::move(args), tmp); }
  TempDir scratch{"moelab-fewshot"};
  const fs::path& tmp = scratch.path();
};

const std::string kRecord = R"("question": "q?", "answer": "a\n#### 1")";

TEST_F(EvalSparseSlice, PlacesDocsAtTheirIndicesAndNamesAMissingDraw) {
  const auto f = write("s.jsonl", R"({"split": "train", "total": 6})" "\n"
                                  R"({"index": 1, "question": "one?", "answer": "1\n#### 1"})" "\n"
                                  R"({"index": 4, "question": "four?", "answer": "4\n#### 4"})" "\n");
  std::string split;
  const auto pool = read_fewshot_docs("gsm8k", TaskType::Generate, f, &split);
  EXPECT_EQ(split, "train");
  ASSERT_EQ(pool.size(), 6u);
  EXPECT_EQ(pool[1].text, "Question: one?\nAnswer:");
  EXPECT_EQ(pool[4].target, "4\n#### 4");
  for (int i : {0, 2, 3, 5}) EXPECT_TRUE(pool[size_t(i)].absent()) << i;
  // random.Random(1234).sample(range(6), 2) draws [3, 0] first: index 3 is missing.
  const TaskSpec spec = task_spec("gsm8k");
  PyRandom rnd(1234);
  Doc doc;
  doc.text = "Question: x\nAnswer:";
  const std::string e = one_line_error([&] { fewshot_context(spec, doc, 2, pool, false, 0, rnd); });
  EXPECT_EQ(e, f + ": the few-shot draw needs document 3 of the train split, which this sparse slice does not hold; "
                   "pass the full train file with --fewshot-data");
  // A plain file of the same records reads as before; read_docs refuses the sparse form.
  EXPECT_EQ(read_fewshot_docs("gsm8k", TaskType::Generate, kTest20).size(), 20u);
  EXPECT_EQ(one_line_error([&] { read_docs("gsm8k", TaskType::Generate, f); }),
            f + ":1: this is a sparse slice of a split (a header with \"split\" and \"total\"): only few-shot examples "
                "are drawn from one; pass it with --fewshot-data");
}

TEST_F(EvalSparseSlice, BadHeadersAndIndicesAreOneLineErrors) {
  auto error = [&](const std::string& content) {
    const auto f = write("b.jsonl", content);
    return one_line_error([&] { read_fewshot_docs("gsm8k", TaskType::Generate, f); });
  };
  const auto f = path("b.jsonl");
  EXPECT_EQ(error(R"({"split": "train", "total": 0})"),
            f + ":1: field \"total\": expected the split's size, an integer 1..2000000, got 0");
  // A header alone asking for a huge split: refused before its placeholders are allocated (1e8 took 50 GB).
  EXPECT_EQ(error(R"({"split": "train", "total": 100000000})"),
            f + ":1: field \"total\": expected the split's size, an integer 1..2000000, got 100000000");
  EXPECT_EQ(error(R"({"split": "train", "total": "7473"})"),
            f + ":1: field \"total\": expected the split's size, an integer 1..2000000, got \"7473\"");
  EXPECT_EQ(error(R"({"split": 3, "total": 5})"), f + ":1: field \"split\": expected a string, got number 3");
  EXPECT_EQ(error("{\"split\": \"train\", \"total\": 5}\n{" + kRecord + "}"), f + ":2: field \"index\": missing");
  EXPECT_EQ(error("{\"split\": \"train\", \"total\": 5}\n{\"index\": 5, " + kRecord + "}"),
            f + ":2: field \"index\": expected the record's index in the train split, an integer 0..4, got 5");
  EXPECT_EQ(error("{\"split\": \"train\", \"total\": 5}\n{\"index\": -1, " + kRecord + "}"),
            f + ":2: field \"index\": expected the record's index in the train split, an integer 0..4, got -1");
  EXPECT_EQ(error("{\"split\": \"train\", \"total\": 5}\n{\"index\": 2, " + kRecord + "}\n{\"index\": 2, " + kRecord + "}"),
            f + ":3: field \"index\": 2 is not above the previous record's 2 (indices must increase)");
  EXPECT_EQ(error("{\"split\": \"train\", \"total\": 5}\n{\"index\": 2, \"question\": 1, \"answer\": \"a\"}"),
            f + ":2: field \"question\": expected a string, got number 1");
}

FewshotOrigin origin(bool eval_split, const std::string& declared_split, size_t pool_size, size_t shared_with_eval) {
  FewshotOrigin o;
  o.eval_split = eval_split;
  o.declared_split = declared_split;
  o.pool_size = pool_size;
  o.shared_with_eval = shared_with_eval;
  return o;
}

TEST(EvalFewshotProtocol, DifferenceFromTheHarnessSplitIsNamed) {
  const TaskSpec g = task_spec("gsm8k");
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(false, "train", 7473, 0)), "");
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(false, "", 7473, 0)), "");  // the full train file
  EXPECT_EQ(fewshot_protocol_difference(g, 0, origin(true, "", 20, 0)), "");  // no examples drawn
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(true, "", 1319, 0)),
            "few-shot drawn from the evaluated split (harness: train)");
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(false, "", 1319, 100)),
            "few-shot data holds 100 evaluated docs (harness: train split)");
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(false, "test", 1319, 0)),
            "few-shot from a slice of the test split (harness: train)");
  EXPECT_EQ(fewshot_protocol_difference(g, 5, origin(false, "", 40, 0)),
            "few-shot pool of 40 docs (harness: the train split's 7473)");
  EXPECT_EQ(fewshot_protocol_difference(task_spec("hellaswag"), 10, origin(true, "", 200, 0)),
            "few-shot drawn from the evaluated split (harness: train)");
  EXPECT_EQ(fewshot_protocol_difference(task_spec("generate"), 5, origin(true, "", 20, 0)), "");
  // The test split passed as few-shot data: its docs are the evaluated ones.
  const auto test = read_docs("gsm8k", TaskType::Generate, kTest20);
  const std::vector<Doc> first2(test.begin(), test.begin() + 2);
  const auto o = fewshot_origin(first2, test, false, "");
  EXPECT_EQ(o.shared_with_eval, 2u);
  EXPECT_EQ(o.pool_size, 20u);
  EXPECT_EQ(fewshot_origin(first2, read_fewshot_docs("gsm8k", TaskType::Generate, kSlice), false, "train").shared_with_eval,
            0u);
}

// The CLI: `--tasks gsm8k` without --fewshot-data takes the bundled train slice (the harness's prompts, no
// "protocols differ"); the test file as few-shot data prints the difference beside the reported 58.4; a run
// past the slice's draws stops before the model loads with the one-line error.
TEST_F(EvalSparseSlice, CliDefaultsToTheBundledTrainSliceAndNamesADifferentSplit) {
  const json fx = draws_fixture();
  fs::create_directories(tmp / "a");
  Run r = moelab({"eval", "--tasks", "gsm8k", "--data", kTest20, "--limit", "2", "--output", path("a/r.json"),
                  "--log-samples"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("58.4"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("protocols differ"), std::string::npos) << r.out;
  size_t checked = 0;
  for (const auto& e : fs::directory_iterator(tmp / "a")) {
    if (e.path().filename().string().rfind("samples_gsm8k_", 0) != 0) continue;
    std::ifstream in(e.path());
    for (std::string line; std::getline(in, line);) {
      const json s = json::parse(line);
      const auto k = s["doc_id"].get<size_t>();
      // The saved record's prompt (lm_eval's gen_args_0/arg_0) and its prompt_hash: the harness's prompt.
      EXPECT_EQ(sha256_hex(s["arguments"]["gen_args_0"]["arg_0"].get<std::string>()),
                fx["docs"][k]["prompt_sha256"].get<std::string>());
      EXPECT_EQ(s["prompt_hash"].get<std::string>(), fx["docs"][k]["prompt_sha256"].get<std::string>());
      ++checked;
    }
  }
  EXPECT_EQ(checked, 4u);  // 2 docs x 2 filters

  r = moelab({"eval", "--tasks", "gsm8k", "--data", kTest20, "--fewshot-data", kTest20, "--limit", "2"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("58.4     -58.4  protocols differ: few-shot data holds 2 evaluated docs (harness: train split) "
                       "(table 3)"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("note: few-shot data holds 2 evaluated docs (harness: train split); few-shot data: " + kTest20),
            std::string::npos)
      << r.out;

  // 120 docs: the 101st draw on reaches past the slice. The expected index: the first absent one drawn.
  std::string many, test20 = test::read_file_bytes(kTest20);
  for (int i = 0; i < 6; ++i) many += test20;
  const auto big = write("gsm8k-120.jsonl", many);
  const auto pool = read_fewshot_docs("gsm8k", TaskType::Generate, kSlice);
  PyRandom rnd(1234);
  size_t missing = 0;
  bool found = false;
  for (int k = 0; k < 120 && !found; ++k)
    for (size_t i : rnd.sample(pool.size(), 5))
      if (!found && pool[i].absent()) missing = i, found = true;
  ASSERT_TRUE(found);
  r = moelab({"eval", "--model", path("no-model"), "--tasks", "gsm8k", "--data", big});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(r.err, "moelab: error: " + kSlice + ": the few-shot draw needs document " + std::to_string(missing) +
                       " of the train split, which this sparse slice does not hold; pass the full train file with "
                       "--fewshot-data\n");
  // --limit 100 stays within the slice (the README's recipe).
  r = moelab({"eval", "--model", path("no-model"), "--tasks", "gsm8k", "--data", big, "--limit", "100"});
  EXPECT_EQ(r.err.find("few-shot draw"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace moelab::evals
