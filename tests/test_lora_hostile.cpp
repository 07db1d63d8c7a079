// Hostile peft adapters (the hostile-input review of 2026-12-02, findings 1, 2, 3, 5, 7, 10, 13, 16, 17):
// what a crafted adapter_config.json, adapter_model.safetensors or merge option gets. Each ends in one
// error line naming the file, or runs as before; none crashes, hangs or writes Inf weights. Inputs that crashed or hung the old reader run in a child process (the real binary, with
// a time limit), so that a regression fails the test instead of killing or stalling the test program;
// the loader's own checks run in this process, each load on a thread with a time limit.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cfloat>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "core/sha256.hpp"
#include "fixture_util.hpp"
#include "lora_test_util.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

constexpr const char* kModel = "mixtral-4e-gqa-f32";
constexpr const char* kAdapter = "mixtral-4e-gqa-f32-r4";  // r 4, lora_alpha 8, all eight kinds of module
constexpr const char* kQ0 = "model.layers.0.self_attn.q_proj";

std::string lora_dir_of(const std::string& name) { return fixture("lora/" + name); }

// What LoraAdapter::load did with an adapter, and how long it took.
struct LoadOutcome {
  bool finished = false;  // false: still running after the time limit (a hang)
  bool loaded = false;
  std::string error;      // the moelab::Error's message, or another exception's type and message
};

// LoraAdapter::load on a thread, waited for at most `limit_s`: a regression to a backtracking matcher fails
// the test instead of hanging it (the thread is left behind, detached, and ends with the program).
LoadOutcome load_within(const std::string& dir, const ModelConfig& cfg, double limit_s = 5) {
  auto result = std::make_shared<std::promise<LoadOutcome>>();
  auto done = result->get_future();
  std::thread([result, dir, cfg] {
    LoadOutcome o;
    o.finished = true;
    try {
      LoraAdapter::load(dir, cfg);
      o.loaded = true;
    } catch (const Error& e) {
      o.error = e.what();
    } catch (const std::exception& e) {
      o.error = std::string("not a moelab::Error: ") + e.what();
    }
    result->set_value(o);
  }).detach();
  if (done.wait_for(std::chrono::duration<double>(limit_s)) != std::future_status::ready) return {};
  LoadOutcome o = done.get();
  return o;
}

class LoraHostile : public ::testing::Test {
 protected:
  void SetUp() override { ck = Checkpoint::open(model_dir(kModel)); }
  const ModelConfig& cfg() const { return ck->config(); }

  // Loads `a`, expecting a refusal whose message holds every needle, on one line. Only a hang is checked (5 s,
  // against the milliseconds a load takes): a unit test asserts no speed (CI runs beside other tests), and the
  // matchers it guards against ran for minutes or for ever.
  void expect_refusal(const AdapterDir& a, const std::vector<std::string>& needles) const {
    const LoadOutcome o = load_within(a.str(), cfg());
    ASSERT_TRUE(o.finished) << "still loading after 5 s (a backtracking or unbounded step)";
    ASSERT_FALSE(o.loaded) << "loaded; expected a refusal";
    EXPECT_EQ(o.error.find("not a moelab::Error"), std::string::npos) << o.error;
    EXPECT_EQ(o.error.find('\n'), std::string::npos) << o.error;
    EXPECT_LT(o.error.size(), 600u) << "a message that long carries the hostile value: " << o.error.substr(0, 600);
    for (const auto& n : needles) EXPECT_NE(o.error.find(n), std::string::npos) << "missing '" << n << "' in: " << o.error;
  }
  void expect_loads(const AdapterDir& a) const {
    const LoadOutcome o = load_within(a.str(), cfg());
    ASSERT_TRUE(o.finished) << "still loading after 5 s (a backtracking or unbounded step)";
    EXPECT_TRUE(o.loaded) << o.error;
  }

  std::unique_ptr<Checkpoint> ck;
};

// `moelab forward` with `adapter` on the fixture model, as a child with a time limit: one error line naming
// what `needles` say, exit 1, no crash, no hang, no output.
void expect_cli_refusal(const std::string& adapter, const std::vector<std::string>& needles) {
  TempDir out("moelab-lora-hostile-run");
  const ProgramRun r = run_program({MOELAB_BIN, "forward", "--model", model_dir(kModel), "--adapter", adapter, "--token-ids",
                                    "1,329,439", "--progress", "none", "-o", out.file("f.safetensors")},
                                   out.path(), 30);
  EXPECT_FALSE(r.timed_out) << "timed out (hung)";
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "; stderr: " << r.err.substr(0, 500);
  EXPECT_EQ(r.exit_code, 1) << r.err.substr(0, 500);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err.substr(0, 500);
  EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err.substr(0, 500);
  EXPECT_LT(r.err.size(), 800u) << r.err.substr(0, 800);
  for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err.substr(0, 500);
  EXPECT_FALSE(fs::exists(out.file("f.safetensors")));
}

// A config whose text is `json_text` (written as is: nesting 200,000 deep is more than ojson can build).
void write_config_text(const AdapterDir& a, const std::string& json_text) {
  std::ofstream(fs::path(a.str()) / kAdapterConfigFile) << json_text;
}

std::string nested_arrays(int depth) { return std::string(size_t(depth), '[') + std::string(size_t(depth), ']'); }

// ------------------------------------------------------------------ finding 1: deeply nested JSON

TEST(LoraHostileCli, DeeplyNestedConfigIsRefusedWithoutCrashing) {
  // 200,000 levels overflowed the stack when a message serialized the value (exit 139); wherever the deep
  // value sits (an unknown field, peft_type, r, modules_to_save), it is now refused while parsing.
  const std::string deep = nested_arrays(200000);
  const std::string base = R"("peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"])";
  for (const std::string& text :
       {"{" + base + R"(,"zzz":)" + deep + "}", R"({"peft_type":)" + deep + R"(,"r":4,"lora_alpha":8})",
        R"({"peft_type":"LORA","r":)" + deep + R"(,"lora_alpha":8})", "{" + base + R"(,"modules_to_save":)" + deep + "}"}) {
    AdapterDir a(kAdapter);
    write_config_text(a, text);
    expect_cli_refusal(a.str(), {kAdapterConfigFile, "nested more than 64 levels"});
  }
}

TEST_F(LoraHostile, NestingPastTheLimitIsRefusedEvenWhereTheValueIsIgnored) {
  // lora_dropout has no effect on a loaded adapter and is never read: 63 levels load, 64 are refused (the
  // old reader accepted any depth there, and crashed on a deep value anywhere it wrote a message).
  for (const int depth : {63, 64}) {
    SCOPED_TRACE(depth);
    AdapterDir a(kAdapter);
    auto j = a.config();
    j["lora_dropout"] = "DEEP";
    std::string text = j.dump();
    text.replace(text.find("\"DEEP\""), 6, nested_arrays(depth));
    write_config_text(a, text);
    if (depth == 63) expect_loads(a);
    else expect_refusal(a, {kAdapterConfigFile, "nested more than 64 levels"});
  }
}

// ------------------------------------------------------- findings 2, 3, 17: regular expressions

TEST(LoraHostileCli, PatternNestedTensOfThousandsDeepIsRefusedWithoutCrashing) {
  // std::regex compiled this by recursion and overflowed the stack (exit 139).
  const std::string nested = std::string(25000, '(') + ".*q_proj|.*v_proj" + std::string(25000, ')');
  for (const char* field : {"target_modules", "exclude_modules"}) {
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) { j[field] = nested; });
    expect_cli_refusal(a.str(), {kAdapterConfigFile, std::string("'") + field + "'", "at most 4096"});
  }
  {
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) { j["rank_pattern"] = {{nested, 2}}; });
    expect_cli_refusal(a.str(), {kAdapterConfigFile, "'rank_pattern'", "at most 4096"});
  }
}

TEST_F(LoraHostile, CatastrophicBacktrackingPatternsFinishAtOnce) {
  // Each of these took from 21 s to forever with std::regex's backtracking; RE2 matches in linear time.
  // As target_modules (a full match over every module name): they select nothing, which is the refusal.
  for (const std::string pattern : {"(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*X", "(a|a|.)*(a|a|.)*(a|a|.)*(a|a|.)*Z",
                                    "((((.*)*)*)*)*[^a-z]X"}) {
    SCOPED_TRACE(pattern);
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) { j["target_modules"] = pattern; });
    expect_refusal(a, {kAdapterConfigFile, "'target_modules' selects no module"});
  }
  {  // as layers_pattern (a search for the layer index): no module's index is found, so none is selected
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) {
      j["layers_to_transform"] = {0};
      j["layers_pattern"] = "(.*)*(.*)*(.*)*(.*)*(.*)*X";
    });
    expect_refusal(a, {kAdapterConfigFile, "'target_modules' selects no module"});
  }
  {  // as exclude_modules, a rank_pattern key and an alpha_pattern key: they match no module, so it loads
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) {
      j["exclude_modules"] = "(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*X";
      j["rank_pattern"] = {{"(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*X", 2}, {"w2", 2}};
      j["alpha_pattern"] = {{"(a|a|.)*(a|a|.)*(a|a|.)*(a|a|.)*Z", 5}, {"gate", 3}};
    });
    expect_loads(a);
  }
}

// The adapter's tensors for exactly `modules` (named_modules() names), the rest dropped: what peft saves
// when target_modules selects just those.
void keep_tensors_of(const AdapterDir& a, const std::set<std::string>& modules) {
  a.edit_tensors([&](std::vector<TensorToWrite>& ts) {
    std::erase_if(ts, [&](const TensorToWrite& t) {
      const std::string prefix = "base_model.model.";
      const size_t lora = t.name.find(".lora_");
      return t.name.rfind(prefix, 0) != 0 || lora == std::string::npos ||
             !modules.count(t.name.substr(prefix.size(), lora - prefix.size()));
    });
  });
}

// The checkpoint weight names of an adapter's adapted modules.
std::set<std::string> adapted(const LoraAdapter& adapter) {
  std::set<std::string> names;
  for (const auto& [name, factors] : adapter.modules()) names.insert(name);
  return names;
}

std::set<std::string> weights_of(const std::set<std::string>& modules) {
  std::set<std::string> names;
  for (const auto& m : modules) names.insert(m + ".weight");
  return names;
}

TEST_F(LoraHostile, LookaroundsAndBackreferencesSelectWhatPythonsReSelects) {
  // peft matches with Python's re, which reads lookarounds and backreferences; RE2 has neither, so these go
  // to PCRE2. Each expected set is what Python 3's re.fullmatch selected from this model's
  // named_modules() (2 layers, 4 experts), checked by hand.
  ASSERT_EQ(cfg().num_layers, 2);
  ASSERT_EQ(cfg().num_experts, 4);
  const std::string L0 = "model.layers.0.", L1 = "model.layers.1.";
  struct Case {
    std::string target_modules;
    std::set<std::string> selected;
  };
  for (const Case& c : {
           // the peft idiom: attention projections, nothing inside the MoE block
           Case{R"(^(?!.*block_sparse_moe).*\.(q_proj|k_proj|v_proj|o_proj))",
                {L0 + "self_attn.q_proj", L0 + "self_attn.k_proj", L0 + "self_attn.v_proj", L0 + "self_attn.o_proj",
                 L1 + "self_attn.q_proj", L1 + "self_attn.k_proj", L1 + "self_attn.v_proj", L1 + "self_attn.o_proj"}},
           Case{R"((?!.*layers\.1\.).*\.(q_proj|w2))",
                {L0 + "self_attn.q_proj", L0 + "block_sparse_moe.experts.0.w2", L0 + "block_sparse_moe.experts.1.w2",
                 L0 + "block_sparse_moe.experts.2.w2", L0 + "block_sparse_moe.experts.3.w2"}},
           Case{R"(.*(?<!layers\.0)\.self_attn\.(q_proj|v_proj))", {L1 + "self_attn.q_proj", L1 + "self_attn.v_proj"}},
           // a backreference: expert e of layer e
           Case{R"(model\.layers\.(\d)\.block_sparse_moe\.experts\.\1\.w(1|3))",
                {L0 + "block_sparse_moe.experts.0.w1", L0 + "block_sparse_moe.experts.0.w3",
                 L1 + "block_sparse_moe.experts.1.w1", L1 + "block_sparse_moe.experts.1.w3"}},
           // a two-digit backreference (to the empty group 12), which RE2 would read as the octal escape \n
           Case{R"(.*\.(g)(a)(t)(e)()()()()()()()()\12)", {L0 + "block_sparse_moe.gate", L1 + "block_sparse_moe.gate"}},
       }) {
    SCOPED_TRACE(c.target_modules);
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) {
      j["target_modules"] = c.target_modules;
      j.erase("rank_pattern");  // the kept tensors all have rank 4 but w2's, which the file's rank_pattern gives 2
    });
    keep_tensors_of(a, c.selected);
    if (c.target_modules.find("w2") != std::string::npos) a.edit_config([](ojson& j) { j["rank_pattern"] = {{"w2", 2}}; });
    const LoadOutcome o = load_within(a.str(), cfg());
    ASSERT_TRUE(o.finished);
    ASSERT_TRUE(o.loaded) << o.error;
    EXPECT_EQ(adapted(*LoraAdapter::load(a.str(), cfg())), weights_of(c.selected));
  }
  {  // exclude_modules with a backreference (expert e's w<e>), alpha_pattern with a lookbehind
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) {
      j["exclude_modules"] = R"(.*experts\.(\d)\.w\1)";
      j["alpha_pattern"] = {{R"((?<=self_attn\.)q_proj)", 5}, {"gate", 3}};
    });
    const std::set<std::string> excluded = {L0 + "block_sparse_moe.experts.1.w1", L0 + "block_sparse_moe.experts.2.w2",
                                            L0 + "block_sparse_moe.experts.3.w3", L1 + "block_sparse_moe.experts.1.w1",
                                            L1 + "block_sparse_moe.experts.2.w2", L1 + "block_sparse_moe.experts.3.w3"};
    a.edit_tensors([&](std::vector<TensorToWrite>& ts) {
      std::erase_if(ts, [&](const TensorToWrite& t) {
        for (const auto& m : excluded)
          if (t.name.find("." + m + ".lora_") != std::string::npos) return true;
        return false;
      });
    });
    const LoadOutcome o = load_within(a.str(), cfg());
    ASSERT_TRUE(o.finished);
    ASSERT_TRUE(o.loaded) << o.error;
    const auto adapter = LoraAdapter::load(a.str(), cfg());
    EXPECT_EQ(adapter->modules().size(), size_t(cfg().num_layers * (4 + 1 + 3 * cfg().num_experts)) - excluded.size());
    for (const auto& m : excluded) EXPECT_EQ(adapter->find(m + ".weight"), nullptr) << m;
    EXPECT_EQ(adapter->find(L1 + "self_attn.q_proj.weight")->alpha, 5);
    EXPECT_EQ(adapter->find(L1 + "self_attn.k_proj.weight")->alpha, 8);
    EXPECT_EQ(adapter->find(L1 + "block_sparse_moe.gate.weight")->alpha, 3);
  }
}

// Each backtracking pattern is tried on every module, so their number is bounded too: 4096 alpha_pattern keys,
// each just under the step limit, took 50 s on this 34-module model (and would take ~20 minutes on
// Mixtral-8x7B). 16 load; the 17th is refused.
TEST_F(LoraHostile, AtMostSixteenPatternsWithLookaroundsAreRead) {
  for (const int keys : {16, 17}) {
    SCOPED_TRACE(keys);
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) {
      ojson alpha = ojson::object();
      for (int k = 0; k < keys; ++k) alpha[fmt::format("(?!x{})q_proj", k)] = 16;
      j["alpha_pattern"] = alpha;
    });
    if (keys == 16) expect_loads(a);
    else expect_refusal(a, {"adapter_config.json", "alpha_pattern", "at most 16"});
  }
}

TEST_F(LoraHostile, CatastrophicBacktrackingPatternsWithLookaroundsEndAtTheMatchLimit) {
  // PCRE2 backtracks: a full match of this over "model.layers.0.self_attn.q_proj" took Python's re minutes
  // and more. The match limit ends it at once, with an error naming the field and the pattern.
  const std::string hang = "^(?!q)(.*)*(.*)*(.*)*(.*)*(.*)*_";
  for (const char* field : {"target_modules", "exclude_modules", "alpha_pattern", "layers_pattern"}) {
    SCOPED_TRACE(field);
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) {
      if (std::string(field) == "alpha_pattern") {
        j[field] = {{hang, 5}};
      } else if (std::string(field) == "layers_pattern") {  // a search for the layer index
        j["layers_to_transform"] = {0};
        j[field] = hang;
      } else {
        j[field] = hang;
      }
    });
    expect_refusal(a, {kAdapterConfigFile, std::string("field '") + field + "'", "^(?!q)(.*)*", "backtracks past moelab's limit"});
  }
  // A pattern PCRE2 can tell cannot match (no 'Z' in any name) is not tried at all: nothing is selected.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["target_modules"] = "(?=x)?(a|a|.)*(a|a|.)*(a|a|.)*(a|a|.)*Z"; });
  expect_refusal(a, {kAdapterConfigFile, "'target_modules' selects no module"});
}

TEST_F(LoraHostile, SyntaxPythonReadsDifferentlyIsRefused) {
  // Python reads '{,1}' as '{0,1}'; RE2 (and PCRE2 before 10.43) as the text "{,1}", so 'w{,1}2' would give
  // no module the alpha Python gives every w2. '[[:digit:]]' is a class of digits to RE2, of '[', ':', 'd',
  // ... to Python. Both are refused, naming the field and the pattern.
  struct Case {
    const char* field;
    std::string pattern;
    const char* advice;
  };
  for (const Case& c : {Case{"alpha_pattern", "w{,1}2", "write {0,n}"}, Case{"target_modules", R"(.*\.w{,1})", "write {0,n}"},
                        Case{"exclude_modules", R"(.*experts\.[[:digit:]]\.w1)", "POSIX class"},
                        Case{"rank_pattern", R"((?<=\.)w[^[:alpha:]])", "POSIX class"}}) {
    SCOPED_TRACE(c.pattern);
    AdapterDir a(kAdapter);
    a.edit_config([&](ojson& j) {
      if (std::string(c.field).ends_with("_pattern")) j[c.field] = {{c.pattern, 2}};
      else j[c.field] = c.pattern;
    });
    expect_refusal(a, {kAdapterConfigFile, std::string("'") + c.field + "'", c.pattern, c.advice});
  }
  // Inside a class or after a backslash, '{,' is a character: 'w[{,]' and 'w\{,' are read as Python reads them.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["alpha_pattern"] = {{"w[{,]2", 5}, {R"(w\{,2)", 5}, {"gate", 3}}; });
  expect_loads(a);
}

TEST_F(LoraHostile, PatternsNeitherEngineReadsAreRefusedWithRe2sReason) {
  // What RE2 refuses for another reason than a lookaround or a backreference is still refused with its reason.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["target_modules"] = R"(.*\.(q_proj|k_proj)"; });
  expect_refusal(a, {kAdapterConfigFile, "'target_modules'", "RE2: missing )"});
  // A lookaround PCRE2 cannot compile either: its reason, from PCRE2.
  AdapterDir b(kAdapter);
  b.edit_config([](ojson& j) { j["target_modules"] = R"((?<=a+)q_proj)"; });
  expect_refusal(b, {kAdapterConfigFile, "'target_modules'", "PCRE2: "});
}

TEST_F(LoraHostile, LongPatternsAreRefusedWithAShortMessage) {
  // 200,000 alternatives: 1.5 MB, echoed whole in the old message. Now refused by length, the pattern cut.
  std::string alternatives;
  for (int i = 0; i < 200000; ++i) alternatives += (i ? "|x" : "x") + std::to_string(i);
  AdapterDir a(kAdapter);
  a.edit_config([&](ojson& j) { j["target_modules"] = alternatives; });
  expect_refusal(a, {kAdapterConfigFile, "'target_modules'", "regular expression of " + std::to_string(alternatives.size()) +
                                                                " bytes", "x0|x1|x2", "...", "at most 4096"});
  // A long field name (an unknown field) is cut the same way.
  AdapterDir b(kAdapter);
  b.edit_config([&](ojson& j) { j[std::string(100000, 'k')] = 1; });
  expect_refusal(b, {kAdapterConfigFile, "kkkk...", "not a LoraConfig field"});
}

TEST_F(LoraHostile, PatternsAsPeftWritesThemStillSelect) {
  // RE2 reads what peft's configs hold: a dotted alternation as target_modules selects the same modules
  // as the list, nested groups under the length limit compile, and a rank_pattern key still full-matches.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) {
    j["target_modules"] = std::string(100, '(') + R"(.*\.(q_proj|k_proj|v_proj|o_proj|gate|w1|w2|w3))" + std::string(100, ')');
  });
  const LoadOutcome o = load_within(a.str(), cfg());
  ASSERT_TRUE(o.finished);
  ASSERT_TRUE(o.loaded) << o.error;
  const auto adapter = LoraAdapter::load(a.str(), cfg());
  EXPECT_EQ(adapter->modules().size(), size_t(cfg().num_layers * (4 + 1 + 3 * cfg().num_experts)));
  EXPECT_EQ(adapter->find(cfg().w2_name(1, 3))->rank, 2);  // rank_pattern {"w2": 2}
  EXPECT_EQ(adapter->find(cfg().w1_name(1, 3))->rank, 4);
}

// An object of `n` fields "x0": 2, "x1": 2, ... as JSON text (ojson inserts by linear search: building a
// large one through ojson would itself take long).
std::string many_fields(int n) {
  std::string text = "{";
  for (int i = 0; i < n; ++i) text += (i ? ",\"x" : "\"x") + std::to_string(i) + "\":2";
  return text + "}";
}

TEST_F(LoraHostile, MorePatternsThanTheModelHasModulesAreRefused) {
  // Each rank_pattern key is compiled and tried on every module; 200,000 of them took 45 s.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["rank_pattern"] = "MANY"; });
  std::string text = a.config().dump();
  text.replace(text.find("\"MANY\""), 6, many_fields(5000));
  write_config_text(a, text);
  expect_refusal(a, {kAdapterConfigFile, "'rank_pattern' has 5000 patterns", "at most 4096"});
}

TEST_F(LoraHostile, ObjectsWithTooManyFieldsAreRefusedWhileParsing) {
  // The parser keeps fields in the file's order (rank_pattern is tried in it) and finds each new key by a
  // linear search: 200,000 fields, even in an ignored one, took tens of seconds before anything was checked.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["loftq_config"] = "MANY"; });
  std::string text = a.config().dump();
  text.replace(text.find("\"MANY\""), 6, many_fields(200000));
  write_config_text(a, text);
  expect_refusal(a, {kAdapterConfigFile, "an object of more than 16384 fields"});
}

// ---------------------------------------------- finding 7: scales and factors beyond float's range

TEST_F(LoraHostile, ScaleBeyondFloatIsRefused) {
  {  // lora_alpha 1e308: scale 2.5e307, an Inf in every engine (and in a BF16 merge)
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) { j["lora_alpha"] = 1e308; });
    expect_refusal(a, {kAdapterConfigFile, "'lora_alpha'", "beyond float's range"});
  }
  {  // through alpha_pattern, on the routers only
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) { j["alpha_pattern"] = {{"gate", 1e40}}; });
    expect_refusal(a, {kAdapterConfigFile, "block_sparse_moe.gate", "'alpha_pattern'", "beyond float's range"});
  }
  {  // a large scale that float holds, on small factors: loads
    AdapterDir a(kAdapter);
    a.edit_config([](ojson& j) { j["lora_alpha"] = 4e30; });
    expect_loads(a);
  }
}

TEST_F(LoraHostile, FactorsWhoseProductOverflowsFloatAreRefused) {
  // Finite factors of 3e38: B A overflows float, and merge wrote Inf weights with exit 0.
  const auto fill = [](std::vector<TensorToWrite>& ts, const std::string& name, float v) {
    for (auto& t : ts)
      if (t.name == name)
        for (size_t i = 0; i + 4 <= t.data.size(); i += 4) std::memcpy(t.data.data() + i, &v, 4);
  };
  {
    AdapterDir a(kAdapter);
    a.edit_tensors([&](std::vector<TensorToWrite>& ts) {
      fill(ts, lora_a_name(kQ0), 3e38f);
      fill(ts, lora_b_name(kQ0), 3e38f);
    });
    expect_refusal(a, {kAdapterWeightsFile, std::string("'") + kQ0 + "'", "can overflow float"});
  }
  {  // 1e10 everywhere: |scale| 2 x 1e10 x 1e10 x r 4 x in 64 = 5e22, far inside float: loads
    AdapterDir a(kAdapter);
    a.edit_tensors([&](std::vector<TensorToWrite>& ts) {
      fill(ts, lora_a_name(kQ0), 1e10f);
      fill(ts, lora_b_name(kQ0), 1e10f);
    });
    expect_loads(a);
  }
}

// A copy of the fixture model with element 0 of `tensor` set to `value` (the model's weights are F32).
struct ModelCopy {
  TempDir tmp{"moelab-lora-hostile-model"};
  fs::path dir = tmp.path() / "model";
  ModelCopy(const std::string& tensor, float value) {
    fs::create_directories(dir);
    for (const auto& e : fs::directory_iterator(model_dir(kModel)))
      if (e.path().filename() != "expected.safetensors" && e.path().filename() != "model.safetensors")
        fs::copy_file(e.path(), dir / e.path().filename());
    std::vector<TensorToWrite> ts;
    SafetensorsFile file(model_dir(kModel) + "/model.safetensors");
    for (const auto& [name, info] : file.tensors()) {
      const auto bytes = file.bytes(info);
      ts.push_back({name, info.dtype, info.shape, {bytes.begin(), bytes.end()}});
      if (name == tensor) std::memcpy(ts.back().data.data(), &value, 4);
    }
    write_safetensors((dir / "model.safetensors").string(), ts);
  }
};

// Runs merge into tmp/out; expects a refusal naming `needles` (stderr's last line, after merge's line about
// the adapter), and nothing left in tmp but the logs.
// exit_code: 1 for bad input, 2 for a command-line value refused while parsing.
void expect_merge_refused(const std::vector<std::string>& args, const std::vector<std::string>& needles, int exit_code = 1) {
  TempDir tmp("moelab-lora-hostile-merge");
  std::vector<std::string> all{MOELAB_BIN, "merge", "-o", tmp.file("out"), "--progress", "none"};
  all.insert(all.end(), args.begin(), args.end());
  const ProgramRun r = run_program(all, tmp.path(), 60);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, exit_code) << r.err;
  ASSERT_FALSE(r.err.empty());
  const std::string last = r.err.substr(r.err.rfind('\n', r.err.size() - 2) + 1);
  EXPECT_EQ(last.rfind("moelab: error: ", 0), 0u) << r.err;
  EXPECT_EQ(r.err.find("moelab: error: "), r.err.size() - last.size()) << "more than one error line: " << r.err;
  for (const auto& n : needles) EXPECT_NE(last.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_TRUE(e.path().filename() == "stdout.txt" || e.path().filename() == "stderr.txt") << "left behind: " << e.path();
}

TEST(LoraHostileCli, MergeNeverWritesANonFiniteWeight) {
  const std::string q0_weight = std::string(kQ0) + ".weight";
  {  // W = FLT_MAX (finite) plus an adapter delta the loader's bound allows: Inf in F32
    ModelCopy model(q0_weight, FLT_MAX);
    AdapterDir a(kAdapter);
    // scale 2 x B[0][0] x A[0][0] = 0.5 FLT_MAX / (r in): within the loader's bound, past FLT_MAX once added to W.
    const float v = float(std::sqrt(0.25 * double(FLT_MAX) / (4.0 * 64.0)));
    a.edit_tensors([&](std::vector<TensorToWrite>& ts) {
      for (auto& t : ts)
        if (t.name == lora_a_name(kQ0) || t.name == lora_b_name(kQ0)) std::memcpy(t.data.data(), &v, 4);
    });
    expect_merge_refused({"--model", model.dir.string(), "--adapter", a.str()},
                         {a.str(), q0_weight, "inf", "nothing was written"});
  }
  {  // a weight the adapter leaves alone, finite in F32 but past BF16's largest: Inf once rounded to BF16
    const std::string norm = "model.layers.0.input_layernorm.weight";
    ModelCopy model(norm, FLT_MAX);
    expect_merge_refused({"--model", model.dir.string(), "--adapter", lora_dir_of(kAdapter), "--dtype", "bf16"},
                         {model.dir.string(), norm, "beyond BF16's range", "nothing was written"});
    // In F32 it is a finite weight like any other: merged, exit 0.
    TempDir tmp("moelab-lora-hostile-merge-ok");
    const ProgramRun r = run_program({MOELAB_BIN, "merge", "--model", model.dir.string(), "--adapter", lora_dir_of(kAdapter),
                                      "-o", tmp.file("out"), "--progress", "none"},
                                     tmp.path(), 60);
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
}

// ---------------------------------------------------------------- finding 16: --shard-size-mb

TEST(LoraHostileCli, MergeShardSizeMustBeASaneNumber) {
  // 1e300 and nan were cast to an integer (undefined: 127 one-tensor shards); inf got a 300-digit bound. Now
  // the shared option (cli/options.hpp) refuses them while parsing, as quantize's does.
  for (const char* size : {"1e300", "nan", "inf", "-inf", "0", "-1", "1e-9", "2e6"}) {
    SCOPED_TRACE(size);
    expect_merge_refused({"--model", model_dir(kModel), "--adapter", lora_dir_of(kAdapter), std::string("--shard-size-mb=") + size},
                         {"--shard-size-mb: must be a size in MiB from 0.001 to 1048576"}, /*exit_code=*/2);
  }
}

// ----------------------------------------------------------- finding 10: one rank bound

TEST(LoraHostileCli, FinetuneRankBoundIsTheLoadersBound) {
  // finetune allowed --lora-r up to 2^20 and wrote adapters the loader (2^16) refused.
  TempDir tmp("moelab-lora-hostile-rank");
  const auto finetune = [&](int rank) {
    return run_program({MOELAB_BIN, "finetune", "--model", model_dir(kModel), "--data", tmp.file("absent.jsonl"), "-o",
                        tmp.file("out"), "--lora-r", std::to_string(rank), "--progress", "none"},
                       tmp.path(), 60);
  };
  ProgramRun r = finetune(kMaxLoraRank + 1);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--lora-r"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(std::to_string(kMaxLoraRank)), std::string::npos) << r.err;
  // At the bound the option is taken: what stops this run is the missing data, not the rank.
  r = finetune(kMaxLoraRank);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.err.find("--lora-r"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("absent.jsonl"), std::string::npos) << r.err;
  // The loader's bound is the same number.
  AdapterDir a(kAdapter);
  a.edit_config([](ojson& j) { j["r"] = kMaxLoraRank + 1; });
  const auto ck = Checkpoint::open(model_dir(kModel));
  try {
    LoraAdapter::load(a.str(), ck->config());
    ADD_FAILURE() << "r = kMaxLoraRank + 1 loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("from 1 to " + std::to_string(kMaxLoraRank)), std::string::npos) << e.what();
  }
}

// ------------------------------------------------- finding 13 (adapter part): symlink loops

TEST_F(LoraHostile, SymlinkLoopsAreNamedNotInternalErrors) {
  // fs::is_directory / fs::exists threw filesystem_error ("internal error", exit 2) on a loop.
  TempDir tmp("moelab-lora-hostile-loop");
  fs::create_symlink(tmp.file("loop-b"), tmp.file("loop-a"));
  fs::create_symlink(tmp.file("loop-a"), tmp.file("loop-b"));
  const LoadOutcome dir = load_within(tmp.file("loop-a"), cfg());
  ASSERT_TRUE(dir.finished);
  EXPECT_FALSE(dir.loaded);
  EXPECT_EQ(dir.error.rfind(tmp.file("loop-a") + ": ", 0), 0u) << dir.error;
  EXPECT_NE(dir.error.find("symbolic links"), std::string::npos) << dir.error;

  for (const char* file : {kAdapterConfigFile, kAdapterWeightsFile}) {
    SCOPED_TRACE(file);
    AdapterDir a(kAdapter);
    const fs::path p = fs::path(a.str()) / file;
    fs::remove(p);
    fs::create_symlink(p.string() + ".2", p);
    fs::create_symlink(p, p.string() + ".2");
    expect_refusal(a, {p.string() + ": ", "symbolic links"});
  }
  expect_cli_refusal(tmp.file("loop-a"), {tmp.file("loop-a"), "symbolic links"});
}

// ----------------------------------------------- finding 5: trace --append hashes a checked adapter

TEST(LoraHostileCli, TraceAppendChecksTheAdapterBeforeHashingIt) {
  TempDir tmp("moelab-lora-hostile-trace");
  std::ofstream(tmp.file("in.jsonl")) << R"({"text": "What is 17 + 25? Answer: 42", "domain": "arithmetic"})" << "\n";
  const auto trace = [&](const std::string& adapter, bool append) {
    std::vector<std::string> args{MOELAB_BIN, "trace", "--model", model_dir(kModel), "--input", tmp.file("in.jsonl"),
                                  "--output", tmp.file("t.h5"), "--adapter", adapter, "--progress", "none"};
    if (append) args.push_back("--append");
    return run_program(args, tmp.path(), 30);
  };
  AdapterDir good(kAdapter);
  ProgramRun r = trace(good.str(), false);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string before = read_file_bytes(tmp.file("t.h5"));
  {  // the weights file a FIFO: the old hash opened it blocking and waited forever
    AdapterDir fifo(kAdapter);
    const fs::path weights = fs::path(fifo.str()) / kAdapterWeightsFile;
    fs::remove(weights);
    ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
    r = trace(fifo.str(), true);
    EXPECT_FALSE(r.timed_out) << "hung on the FIFO";
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(weights.string() + ": "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("FIFO"), std::string::npos) << r.err;
  }
  {  // a bad adapter gets its own refusal, not a comparison of hashes with the trace
    AdapterDir dora(kAdapter);
    dora.edit_config([](ojson& j) { j["use_dora"] = true; });
    r = trace(dora.str(), true);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("'use_dora'"), std::string::npos) << r.err;
  }
  EXPECT_EQ(read_file_bytes(tmp.file("t.h5")), before);  // neither refusal touched the trace
  r = trace(good.str(), true);  // the same adapter still appends
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(Sha256, FilesAreHashedInChunksAsAWhole) {
  // FIPS 180-2's long example: a million 'a', fed in uneven pieces and read back from a file of them.
  const std::string million(1000000, 'a');
  const std::string expected = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  EXPECT_EQ(sha256_hex(million), expected);
  Sha256 pieces;
  for (size_t at = 0, n = 1; at < million.size(); at += n, n = n * 7 % 997 + 1)
    pieces.update(std::string_view(million).substr(at, n));
  EXPECT_EQ(pieces.hex(), expected);
  TempDir tmp("moelab-sha256");
  std::string big;  // 2.5 MiB: more than one read
  for (int i = 0; i < 5; ++i) big += million + std::to_string(i);
  big.resize(5 << 19);
  std::ofstream(tmp.file("big"), std::ios::binary) << big;
  EXPECT_EQ(sha256_file(tmp.file("big")), sha256_hex(big));
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256, OnlyRegularFilesAreHashed) {
  // A directory is named as one. (A FIFO, which blocked the old open forever, and /dev/zero, read until
  // memory ran out, are refused by the same fstat check; the FIFO is tried through the CLI above, where a
  // regression times out instead of stalling this program.)
  TempDir tmp("moelab-sha256-dir");
  try {
    sha256_file(tmp.str(), "adapter weights");
    ADD_FAILURE() << "a directory was hashed";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), tmp.str() + ": adapter weights is a directory, not a regular file");
  }
}

}  // namespace
}  // namespace moelab::test
