// The moelab command as a user meets it: the forward dump reproduces transformers' outputs, inspect
// prints the real Mixtral counts, and bad files end in one clear error line with a non-zero exit.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/tokenizer.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;

struct CliRun {
  int exit_code;
  std::string out, err;
};

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp = fs::temp_directory_path() /
          ("moelab-cli-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  void TearDown() override { fs::remove_all(tmp); }

  CliRun moelab(const std::string& args) {
    const auto out = tmp / "stdout.txt", err = tmp / "stderr.txt";
    const std::string cmd = std::string(MOELAB_BIN) + " " + args + " >" + out.string() + " 2>" + err.string();
    const int status = std::system(cmd.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_file_bytes(out), read_file_bytes(err)};
  }
  // A private copy of a fixture model that the test may corrupt.
  fs::path copy_model(const std::string& name) {
    const auto dst = tmp / name;
    fs::copy(model_dir(name), dst, fs::copy_options::recursive);
    return dst;
  }
  // Expects a failure whose stderr is exactly one line mentioning every needle.
  void expect_one_line_error(const CliRun& r, const std::vector<std::string>& needles) {
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err;
    for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
  }
  fs::path tmp;
};

TEST_F(Cli, ForwardDumpReproducesTransformersOnEveryFixture) {
  for (const std::string name : {"mixtral-4e-gqa-f32", "mixtral-8e-bf16-sharded", "mixtral-top1-swa", "mistral-dense"}) {
    SCOPED_TRACE(name);
    SafetensorsFile expected(model_dir(name) + "/expected.safetensors");
    std::string ids;
    for (int32_t t : read_i32(expected, "tokens")) ids += (ids.empty() ? "" : ",") + std::to_string(t);
    const auto dump = (tmp / (name + ".safetensors")).string();
    const CliRun r = moelab("forward --model " + model_dir(name) + " --token-ids " + ids + " --output " + dump);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    SafetensorsFile got(dump);
    EXPECT_LT(rel_l2(read_matrix_f32(got, "logits"), read_matrix_f32(expected, "logits")), 1e-5);
    EXPECT_EQ(read_i32(got, "tokens"), read_i32(expected, "tokens"));
    const auto c = ModelConfig::from_json_file(model_dir(name) + "/config.json");
    for (int l = 0; l < c.num_layers; ++l) {
      const auto p = "layers." + std::to_string(l) + ".";
      EXPECT_LT(rel_l2(read_matrix_f32(got, p + "hidden"), read_matrix_f32(expected, p + "hidden")), 1e-5);
      EXPECT_EQ(got.info(p + "experts").dtype, DType::I32);
      EXPECT_EQ(got.info(p + "experts").shape, (std::vector<int64_t>{12, c.top_k}));
      if (!c.is_moe()) {
        EXPECT_FALSE(got.contains(p + "router_logits"));
        continue;
      }
      EXPECT_LT(rel_l2(read_matrix_f32(got, p + "router_logits"), read_matrix_f32(expected, p + "router_logits")), 1e-5);
      EXPECT_EQ(read_i32(got, p + "experts"), read_i32(expected, p + "experts"));
      EXPECT_LT((read_matrix_f32(got, p + "gates") - read_matrix_f32(expected, p + "gates")).cwiseAbs().maxCoeff(), 1e-5);
    }
  }
}

TEST_F(Cli, InspectPrintsMixtral8x7BParameterCounts) {
  const CliRun r = moelab("inspect --config " + fixture("configs/mixtral-8x7b-v0.1.json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("46.7B total, 12.9B active"), std::string::npos) << r.out;
}

// transformers' generate(do_sample=False, use_cache=True, max_new_tokens=8) continuation of the fixture
// prompt (tests/fixtures/README.md). The ids must be equal, not close: along that continuation the
// smallest gap between the top two logits is 0.0163, three orders above the FP32 difference between
// the reference and transformers (logits within 1e-5 relative L2), so no argmax can flip.
TEST_F(Cli, GenerateGreedyMatchesTransformers) {
  const std::string dir = model_dir("mixtral-8e-bf16-sharded");
  SafetensorsFile expected(dir + "/expected.safetensors");
  const auto prompt = read_i32(expected, "tokens");
  const auto want = read_i32(expected, "greedy_continuation");
  ASSERT_EQ(want.size(), 8u);
  const auto generated_ids = [](const CliRun& r) {
    std::vector<int32_t> ids;
    const auto at = r.err.find("generated ids: ");
    if (at == std::string::npos) return ids;
    std::istringstream in(r.err.substr(at + 15, r.err.find('\n', at) - at - 15));
    for (std::string item; std::getline(in, item, ',');) ids.push_back(int32_t(std::stol(item)));
    return ids;
  };
  std::string list;
  for (int32_t t : prompt) list += (list.empty() ? "" : ",") + std::to_string(t);
  const CliRun r = moelab("generate --model " + dir + " --token-ids " + list + " --max-new-tokens 8 --print-ids");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(generated_ids(r), want) << r.err;
  EXPECT_NE(r.err.find("generated 8 tokens"), std::string::npos) << r.err;
  // What it prints is the prompt and the continuation, decoded.
  const Tokenizer tok(dir + "/tokenizer.model");
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), want.begin(), want.end());
  EXPECT_EQ(r.out, tok.decode(all) + "\n");

  // The same through --prompt: the prompt's text, which the tokenizer turns back into the same ids.
  const std::string text = tok.decode(prompt);
  ASSERT_EQ(tok.encode(text, /*add_bos=*/true), prompt) << text;
  ASSERT_EQ(text.find('\''), std::string::npos) << "the shell quoting below needs a prompt without quotes";
  const CliRun t = moelab("generate --model " + dir + " --prompt '" + text + "' --max-new-tokens 8 --print-ids");
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(generated_ids(t), want) << t.err;
  EXPECT_EQ(t.out, tok.decode(all) + "\n");
}

// Every subcommand the top-level help lists (read from it, so a new one is covered without editing this
// list), and at least the eleven known today.
TEST_F(Cli, EverySubcommandHasHelp) {
  const CliRun top = moelab("--help");
  ASSERT_EQ(top.exit_code, 0);
  std::vector<std::string> listed;
  std::istringstream lines(top.out.substr(std::min(top.out.find("Subcommands:"), top.out.size())));
  for (std::string line; std::getline(lines, line) && !line.empty();)  // the list ends at a blank line
    if (line.rfind("  ", 0) == 0 && line.size() > 2 && line[2] != ' ') listed.push_back(line.substr(2, line.find(' ', 2) - 2));
  for (const std::string known : {"inspect", "generate", "forward", "demo", "diff", "quantize", "eval", "trace",
                                  "profile", "stats", "devices"})
    EXPECT_NE(std::find(listed.begin(), listed.end(), known), listed.end()) << known << " missing from:\n" << top.out;
  for (const auto& sub : listed) {
    const CliRun r = moelab(sub + " --help");
    EXPECT_EQ(r.exit_code, 0) << sub;
    const size_t usage = r.out.find("Usage: ");
    ASSERT_NE(usage, std::string::npos) << sub << ":\n" << r.out;
    const std::string usage_line = r.out.substr(usage, r.out.find('\n', usage) - usage);
    EXPECT_NE(usage_line.find(" " + sub + " "), std::string::npos) << sub << "'s own usage: " << usage_line;
  }
}

TEST_F(Cli, BadArgumentsFail) {
  EXPECT_NE(moelab("").exit_code, 0);
  EXPECT_NE(moelab("frobnicate").exit_code, 0);
  EXPECT_NE(moelab("generate --prompt hi --top-p 2").exit_code, 0);
  EXPECT_NE(moelab("generate").exit_code, 0);  // --prompt is required
  expect_one_line_error(moelab("forward --token-ids 1,x,3 --output " + (tmp / "d.safetensors").string()), {"'x'"});
  expect_one_line_error(moelab("inspect --model /nonexistent/model"), {"/nonexistent/model"});
}

TEST_F(Cli, TruncatedShardIsOneClearError) {
  const auto dir = copy_model("mixtral-8e-bf16-sharded");
  const auto shard = dir / "model-00002-of-00004.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 100);
  expect_one_line_error(moelab("inspect --model " + dir.string()), {shard.string(), "truncated"});
}

TEST_F(Cli, HeaderPointingPastTheEndIsOneClearError) {
  const auto dir = copy_model("mixtral-4e-gqa-f32");
  const auto file = dir / "model.safetensors";
  const uint64_t too_long = fs::file_size(file) + 1000;
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  for (int i = 0; i < 8; ++i) f.put(char((too_long >> (8 * i)) & 0xff));
  f.close();
  expect_one_line_error(moelab("inspect --model " + dir.string()), {file.string(), "past the end"});
}

TEST_F(Cli, MissingTensorIsOneClearError) {
  // One more layer in config.json than the checkpoint has: layer 3's tensors are missing.
  const auto dir = copy_model("mixtral-8e-bf16-sharded");
  auto cfg = nlohmann::json::parse(read_file_bytes(dir / "config.json"));
  cfg["num_hidden_layers"] = 4;
  std::ofstream(dir / "config.json") << cfg.dump(2);
  expect_one_line_error(moelab("forward --model " + dir.string() + " --token-ids 1,2 --output " + (tmp / "x").string()),
                        {"missing tensor", "model.layers.3."});
  EXPECT_FALSE(fs::exists(tmp / "x"));
}

TEST_F(Cli, ShapeMismatchIsOneClearError) {
  const auto dir = copy_model("mixtral-4e-gqa-f32");
  auto cfg = nlohmann::json::parse(read_file_bytes(dir / "config.json"));
  cfg["intermediate_size"] = 100;
  std::ofstream(dir / "config.json") << cfg.dump(2);
  expect_one_line_error(moelab("inspect --model " + dir.string()),
                        {"model.layers.0.block_sparse_moe.experts.0.w1.weight", "[128, 64]", "[100, 64]"});
}

TEST_F(Cli, MissingShardIsOneClearError) {
  const auto dir = copy_model("mixtral-8e-bf16-sharded");
  fs::remove(dir / "model-00003-of-00004.safetensors");
  expect_one_line_error(moelab("inspect --model " + dir.string()), {"model-00003-of-00004.safetensors", "missing shard"});
}

TEST_F(Cli, ContextOverflowIsOneClearError) {
  expect_one_line_error(moelab("forward --model " + model_dir("mixtral-4e-gqa-f32") +
                               " --context 4 --token-ids 1,2,3,4,5 --output " + (tmp / "x").string()),
                        {"context overflow"});
}

TEST_F(Cli, ProfileTotalsOnlyCountsEveryTokenAndWritesJson) {
  const auto json_path = tmp / "profile.json";
  const auto r = moelab("profile --model " + model_dir("mixtral-8e-bf16-sharded") +
                        " --engine cpu-nf4 --n-prompt 9 --n-gen 3 --repetitions 2 --warmup 1 --totals-only --json " +
                        json_path.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("prefill: 2 calls, 18 tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("decode: 6 calls, 6 tokens"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("attention ms"), std::string::npos) << "no stage table without a probe:\n" << r.out;
  std::ifstream in(json_path);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "moelab-timings-v1");
  EXPECT_EQ(j["phases"]["prefill"]["tokens"], 18);
  EXPECT_EQ(j["phases"]["decode"]["calls"], 6);
  EXPECT_GT(j["phases"]["decode"]["wall_seconds"].get<double>(), 0.0);
  EXPECT_FALSE(j.contains("expert_cache"));  // cpu-nf4 has no expert cache
}

TEST_F(Cli, SyntheticAndExpertCacheOptionsFailClearly) {
  expect_one_line_error(moelab("profile --synthetic mixtral-8x7b --engine cpu-nf4"), {"--synthetic", "cuda-nf4"});
  expect_one_line_error(moelab("profile --synthetic mixtral-9x9b --engine cuda-nf4"), {"mixtral-9x9b", "mixtral-8x7b"});
  expect_one_line_error(moelab("generate --prompt hi --engine cpu-nf4 --gpu-expert-cache 2"),
                        {"--gpu-expert-cache", "cuda-nf4"});
  expect_one_line_error(moelab("profile --synthetic mixtral-8x7b --engine cuda-nf4 --prompt hello"),
                        {"synthetic", "--n-prompt"});
}

}  // namespace
}  // namespace moelab::test
