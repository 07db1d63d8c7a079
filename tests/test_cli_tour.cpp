// The command line as one language (issue 14): every subcommand's --help is read, and the shared names
// must be the same everywhere (model, prompt, output, JSON summary, engine options, progress), defaults
// shown, no old spelling left in any help. Mistakes exit 2 with one line and the nearest option; old
// spellings still work for one release with a warning; diff takes the engine options; eval runs several
// tasks into one results file and takes lm_eval's spellings.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class CliTour : public ::testing::Test {
 protected:
  ProgramRun moelab(std::vector<std::string> args, double seconds = 300) {
    args.insert(args.begin(), MOELAB_BIN);
    return run_program(args, tmp, seconds);
  }
  std::string path(const std::string& name) const { return (tmp / name).string(); }
  TempDir scratch{"moelab-cli-tour"};
  const fs::path& tmp = scratch.path();
};

const std::string kModel = "mixtral-4e-gqa-f32";

// The subcommand names `moelab --help` lists (CLI11's "Subcommands:" section, up to the blank line).
std::vector<std::string> listed_subcommands(const std::string& help) {
  std::vector<std::string> names;
  std::istringstream in(help.substr(std::min(help.find("Subcommands:"), help.size())));
  std::string line;
  std::getline(in, line);
  while (std::getline(in, line) && line.rfind("  ", 0) == 0) {
    std::istringstream words(line);
    std::string name;
    words >> name;
    names.push_back(name);
  }
  return names;
}

// The help line of the option whose names include `name` ("" when there is none).
std::string option_line(const std::string& help, const std::string& name) {
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("  -", 0) != 0) continue;
    std::istringstream names(line.substr(2, line.find(' ', 2) - 2));  // "-m,--model"
    for (std::string n; std::getline(names, n, ',');)
      if (n == name) return line;
  }
  return "";
}

TEST_F(CliTour, EveryHelpSpeaksTheSameNames) {
  const auto top = moelab({"--help"});
  ASSERT_EQ(top.exit_code, 0) << top.err;
  // The overview: the three uses, one example each.
  for (const char* use : {"evaluate   moelab eval --tasks", "benchmark  moelab profile", "trace      moelab trace"})
    EXPECT_NE(top.out.find(use), std::string::npos) << use << "\n" << top.out;
  const auto subs = listed_subcommands(top.out);
  const std::set<std::string> expected{"inspect", "generate", "forward", "demo",     "diff",  "quantize",
                                       "merge",   "eval",     "trace",   "profile",  "stats", "devices",
                                       "cachesim", "serve",   "finetune"};
  EXPECT_EQ(std::set<std::string>(subs.begin(), subs.end()), expected);

  const std::set<std::string> runs_engine{"generate", "forward", "diff", "eval", "trace", "profile", "serve"};
  const std::set<std::string> reads_no_model{"stats", "devices", "cachesim"};  // traces or the machine
  const std::set<std::string> main_output{"forward", "trace", "quantize", "merge", "eval", "demo", "finetune"};
  const std::set<std::string> json_summary{"generate", "inspect", "profile", "devices", "diff", "stats"};
  const std::set<std::string> takes_prompt{"generate", "forward", "diff", "profile", "demo"};
  for (const auto& sub : subs) {
    SCOPED_TRACE(sub);
    const auto r = moelab({sub, "--help"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::string& h = r.out;
    // No old spelling is shown anywhere (they still parse, hidden, with a warning).
    for (const char* old : {"--text", "--tokens", "--dump", "--out", "--task", "--shots", "--decode", "--repeat"})
      EXPECT_EQ(option_line(h, old), "") << old << " is still in " << sub << "'s help";
    if (!reads_no_model.count(sub)) EXPECT_NE(option_line(h, "-m"), "") << "-m,--model";
    if (!reads_no_model.count(sub))
      EXPECT_EQ(option_line(h, "-m"), option_line(h, "--model")) << "-m and --model are one option";
    if (runs_engine.count(sub)) {
      // The shared engine group: the same line, word for word, on every engine-running subcommand.
      static std::map<std::string, std::string> first;
      for (const char* opt : {"--threads", "--kernels", "--activations", "--lm-head", "--context", "--progress",
                              "--gpu-expert-cache", "--precision"}) {
        const std::string line = option_line(h, opt);
        EXPECT_NE(line, "") << opt;
        if (!first.count(opt)) first[opt] = line;
        EXPECT_EQ(line, first[opt]) << opt << " differs from its first definition";
      }
      // Defaults shown (CLI11 writes them as "=value" after the type).
      EXPECT_NE(option_line(h, "-t").find("=0"), std::string::npos) << "default shown: " << option_line(h, "-t");
      EXPECT_NE(option_line(h, "--activations").find("}=auto"), std::string::npos);
      if (sub != "diff") EXPECT_NE(option_line(h, "--engine").find("}=ref"), std::string::npos);
    }
    if (main_output.count(sub)) EXPECT_NE(option_line(h, "-o"), "") << "-o,--output";
    if (main_output.count(sub)) EXPECT_EQ(option_line(h, "-o"), option_line(h, "--output"));
    if (json_summary.count(sub)) EXPECT_NE(option_line(h, "--json"), "") << "--json";
    if (takes_prompt.count(sub)) EXPECT_EQ(option_line(h, "-p"), option_line(h, "--prompt")) << "-p,--prompt";
    if (takes_prompt.count(sub)) EXPECT_NE(option_line(h, "-p"), "");
  }
}

TEST_F(CliTour, AMistypedOptionExitsTwoWithTheNearestName) {
  const auto r = moelab({"generate", "--model", model_dir(kModel), "--promt", "hello"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("moelab: error: moelab generate: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find("(did you mean --prompt?)"), std::string::npos) << r.err;
  // Nothing near: no suggestion, still one line and exit 2.
  const auto far = moelab({"trace", "--zzzzzzzz"});
  EXPECT_EQ(far.exit_code, 2);
  EXPECT_EQ(far.err.find("did you mean"), std::string::npos) << far.err;
  EXPECT_EQ(std::count(far.err.begin(), far.err.end(), '\n'), 1) << far.err;
  // A value out of range is a mistake too.
  const auto neg = moelab({"profile", "--n-gen", "-3"});
  EXPECT_EQ(neg.exit_code, 2) << neg.err;
  EXPECT_NE(neg.err.find("--n-gen"), std::string::npos) << neg.err;
}

TEST_F(CliTour, OldSpellingsStillWorkWithAWarning) {
  // forward --tokens/--dump as before, and the same file as --token-ids/-o.
  const auto old_run = moelab({"forward", "--model", model_dir(kModel), "--tokens", "1,41,293", "--dump", path("old.safetensors")});
  ASSERT_EQ(old_run.exit_code, 0) << old_run.err;
  EXPECT_NE(old_run.err.find("moelab: warning: --tokens is deprecated; use --token-ids"), std::string::npos) << old_run.err;
  EXPECT_NE(old_run.err.find("moelab: warning: --dump is deprecated; use --output"), std::string::npos) << old_run.err;
  const auto new_run = moelab({"forward", "-m", model_dir(kModel), "--token-ids", "1,41,293", "-o", path("new.safetensors")});
  ASSERT_EQ(new_run.exit_code, 0) << new_run.err;
  EXPECT_EQ(new_run.err.find("warning"), std::string::npos) << new_run.err;
  EXPECT_EQ(read_file_bytes(path("old.safetensors")), read_file_bytes(path("new.safetensors")));
}

TEST_F(CliTour, DiffTakesTheEngineOptionsForBothSidesAndPerSide) {
  // The README's recipe shape: the reference against cpu-nf4 in its exact check mode.
  const auto r = moelab({"diff", "-m", model_dir(kModel), "--a", "ref", "--b", "cpu-nf4", "--activations", "fp32",
                         "--token-ids", "1,41,293,90", "--json", path("d.json")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("fp32 activations"), std::string::npos) << r.err;  // cpu-nf4's load line
  // One side changed: b runs the scalar kernels, a keeps the shared options.
  const auto per_side = moelab({"diff", "-m", model_dir(kModel), "--a", "cpu-nf4", "--b", "cpu-nf4", "--activations",
                                "fp32", "--b-opt", "kernels=scalar", "--token-ids", "1,41,293,90"});
  ASSERT_EQ(per_side.exit_code, 0) << per_side.err;
  EXPECT_NE(per_side.err.find("scalar kernels"), std::string::npos) << per_side.err;
  const auto bad = moelab({"diff", "-m", model_dir(kModel), "--b", "cpu-nf4", "--b-opt", "kernels=mmx", "--token-ids", "1,2"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_EQ(std::count(bad.err.begin(), bad.err.end(), '\n'), 1) << bad.err;
  EXPECT_NE(bad.err.find("engine option 'kernels=mmx': kernels is one of auto"), std::string::npos) << bad.err;
}

TEST_F(CliTour, EvalRunsSeveralTasksIntoOneResultsFileWithLmEvalSpellings) {
  const std::string mc = fixture("evals/tasks/mc_test.jsonl"), rolling = fixture("evals/tasks/rolling_test.jsonl");
  const auto one = [&](const std::string& task, const std::string& data, const std::string& out) {
    const auto r = moelab({"eval", "-m", model_dir(kModel), "--tasks", task, "--data", data, "-o", path(out)});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(read_file_bytes(path(out)));
  };
  const json mc_alone = one("multiple_choice", mc, "mc.json"), rolling_alone = one("rolling", rolling, "rolling.json");
  // lm_eval's spellings: --output_path, --num_fewshot, --log_samples.
  const auto both = moelab({"eval", "-m", model_dir(kModel), "--tasks", "multiple_choice,rolling", "--data", mc, "--data",
                            rolling, "--num_fewshot", "0", "--output_path", path("both.json"), "--log_samples"});
  ASSERT_EQ(both.exit_code, 0) << both.err;
  const json j = json::parse(read_file_bytes(path("both.json")));
  for (const auto& [task, alone] : {std::pair{"multiple_choice", mc_alone}, std::pair{"rolling", rolling_alone}}) {
    SCOPED_TRACE(task);
    ASSERT_TRUE(j["results"].contains(task));
    for (const auto& [metric, value] : alone["results"][task].items())
      if (value.is_number()) {
        EXPECT_DOUBLE_EQ(j["results"][task][metric].get<double>(), value.get<double>()) << metric;
      }
    EXPECT_EQ(j["n-samples"][task], alone["n-samples"][task]);
    EXPECT_TRUE(j["configs"].contains(task));
    EXPECT_TRUE(j["versions"].contains(task));
    int files = 0;
    for (const auto& e : fs::directory_iterator(tmp))
      if (e.path().filename().string().rfind(std::string("samples_") + task + "_", 0) == 0 && e.path().extension() == ".jsonl")
        ++files;
    EXPECT_EQ(files, 1) << "samples_" << task << "_<timestamp>.jsonl";
  }
  // --limit as a fraction: ceil(n * f) documents, the original count kept.
  const auto frac = moelab({"eval", "-m", model_dir(kModel), "--tasks", "multiple_choice", "--data", mc, "--limit", "0.5",
                            "-o", path("half.json")});
  ASSERT_EQ(frac.exit_code, 0) << frac.err;
  const json h = json::parse(read_file_bytes(path("half.json")));
  const int64_t n = mc_alone["n-samples"]["multiple_choice"]["effective"].get<int64_t>();
  EXPECT_EQ(h["n-samples"]["multiple_choice"]["original"].get<int64_t>(), n);
  EXPECT_EQ(h["n-samples"]["multiple_choice"]["effective"].get<int64_t>(), (n + 1) / 2);
  EXPECT_DOUBLE_EQ(h["config"]["limit"].get<double>(), 0.5);
  // Two tasks, one data file: one clear line before any model loads.
  const auto short_data = moelab({"eval", "-m", "/nonexistent", "--tasks", "multiple_choice,rolling", "--data", mc});
  EXPECT_EQ(short_data.exit_code, 1);
  EXPECT_NE(short_data.err.find("2 tasks need 2 --data files"), std::string::npos) << short_data.err;
}

// profile as llama-bench reports: pp/tg rows, mean ± sample sd over the runs; the CSV's avg_ts and
// stddev_ts are recomputed here from its own samples_ts, and the JSON holds the same samples.
TEST_F(CliTour, ProfilePrintsLlamaBenchTablesWithMeanAndSd) {
  const std::vector<std::string> base{"profile", "-m", model_dir(kModel), "--engine", "cpu-nf4", "--n-prompt", "12",
                                      "--n-gen", "5", "-r", "4", "--warmup", "0"};
  auto csv_args = base;
  csv_args.insert(csv_args.end(), {"--format", "csv", "--json", path("p.json")});
  const auto csv = moelab(csv_args);
  ASSERT_EQ(csv.exit_code, 0) << csv.err;
  std::istringstream lines(csv.out);
  std::string header, line;
  std::getline(lines, header);
  EXPECT_EQ(header, "model,engine,threads,test,n_prompt,n_gen,avg_ts,stddev_ts,samples_ts");
  const json doc = json::parse(read_file_bytes(path("p.json")));
  int rows = 0;
  while (std::getline(lines, line)) {
    SCOPED_TRACE(line);
    const std::regex re(R"re(^mixtral-4e-gqa-f32,cpu-nf4,0,(pp12|tg5),(\d+),(\d+),([0-9.]+),([0-9.]+),"\[([^\]]*)\]"$)re");
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, re));
    const bool prompt = m[1] == "pp12";
    EXPECT_EQ(std::stoi(m[2]), prompt ? 12 : 0);
    EXPECT_EQ(std::stoi(m[3]), prompt ? 0 : 5);
    std::vector<double> v;
    std::istringstream samples(m[6].str());
    for (std::string x; std::getline(samples, x, ',');) v.push_back(std::stod(x));
    ASSERT_EQ(v.size(), 4u) << "one sample per measured run";
    double mean = 0, ss = 0;
    for (const double x : v) mean += x / 4;
    for (const double x : v) ss += (x - mean) * (x - mean);
    // Samples are printed to 6 significant digits: the recomputed figures agree to that.
    EXPECT_NEAR(std::stod(m[4]), mean, 1e-5 * mean);
    EXPECT_NEAR(std::stod(m[5]), std::sqrt(ss / 3), 1e-5 * mean);
    const json& t = doc["throughput"][prompt ? 0 : 1];
    EXPECT_EQ(t["test"], m[1].str());
    EXPECT_NEAR(t["avg_ts"].get<double>(), mean, 1e-5 * mean);
    ++rows;
  }
  EXPECT_EQ(rows, 2);
  auto md_args = base;
  md_args.insert(md_args.end(), {"--format", "md"});
  const auto md = moelab(md_args);
  ASSERT_EQ(md.exit_code, 0) << md.err;
  EXPECT_EQ(md.out.rfind("| model | engine | threads | test | t/s |\n| --- | --- | ---: | ---: | ---: |\n", 0), 0u) << md.out;
  EXPECT_TRUE(std::regex_search(md.out, std::regex(R"(\| mixtral-4e-gqa-f32 \| cpu-nf4 \| all \| tg5 \| [0-9.]+ ± [0-9.]+ \|)")))
      << md.out;
}

TEST_F(CliTour, RedirectedLongWorkPrintsProgressLines) {
  // stderr is a file here, as under nohup: plain lines at the interval (shortened for the test), with the
  // count, rate and ETA; --progress none silences them.
  const std::string mc = fixture("evals/tasks/mc_test.jsonl");
  ::setenv("MOELAB_PROGRESS_INTERVAL", "0", 1);
  const auto r = moelab({"eval", "-m", model_dir(kModel), "--tasks", "multiple_choice", "--data", mc});
  const auto quiet = moelab({"eval", "-m", model_dir(kModel), "--tasks", "multiple_choice", "--data", mc, "--progress", "none"});
  ::unsetenv("MOELAB_PROGRESS_INTERVAL");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::regex line(R"(multiple_choice \(ref\): \d+/\d+ \(\d+%\) [0-9.]+s, [0-9.]+/s, eta \d+s)");
  EXPECT_TRUE(std::regex_search(r.err, line)) << r.err;
  EXPECT_EQ(r.err.find('\r'), std::string::npos) << "no terminal bar in a log";
  ASSERT_EQ(quiet.exit_code, 0) << quiet.err;
  EXPECT_FALSE(std::regex_search(quiet.err, line)) << quiet.err;
}

}  // namespace
}  // namespace moelab::test
