// Issue 13 ("Hardening"), items 6, 7, 8, 9, 11 and 12, as a user meets them through the moelab command:
// each bad input ends in one clear line naming the path (or option) and a non-zero exit, never a crash,
// a hang, an "internal error" or a silent wrong answer. The binary is run without a shell (posix_spawn
// with an argument vector) and under a time limit, so a regression fails the test instead of hanging it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "analysis/trace.hpp"
#include "core/checkpoint.hpp"
#include "core/dtype.hpp"
#include "core/safetensors.hpp"
#include "fixture_util.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using Outcome = ProgramRun;

class CliHardening : public ::testing::Test {
 protected:
  void SetUp() override {
    tmp = fs::temp_directory_path() /
          ("moelab-clih-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(tmp, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(tmp, ec);
  }

  // Starts moelab with `args` (no shell); stdout and stderr go to files in tmp.
  pid_t start(const std::vector<std::string>& args) {
    std::vector<std::string> all{MOELAB_BIN};
    all.insert(all.end(), args.begin(), args.end());
    const pid_t pid = spawn_program(all, tmp / "stdout.txt", tmp / "stderr.txt");
    EXPECT_GT(pid, 0) << "posix_spawn " << MOELAB_BIN;
    return pid;
  }

  // Waits for `pid` at most `seconds` (then kills it and says so).
  Outcome finish(pid_t pid, double seconds = 120) {
    return wait_program(pid, seconds, tmp / "stdout.txt", tmp / "stderr.txt");
  }

  Outcome moelab(const std::vector<std::string>& args, double seconds = 120) { return finish(start(args), seconds); }

  fs::path copy_model(const std::string& name, const std::string& as = "") {
    const auto dst = tmp / (as.empty() ? name : as);
    fs::copy(model_dir(name), dst, fs::copy_options::recursive);
    return dst;
  }

  // A clean failure: exit 1 (not a signal, not a time-out, not "internal error" = exit 2), stderr exactly
  // one line "moelab: error: ..." holding every needle.
  static void expect_one_line_error(const Outcome& r, const std::vector<std::string>& needles) {
    EXPECT_FALSE(r.timed_out) << "timed out (hung)";
    EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "; stderr: " << r.err;
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("moelab: error: ", 0), 0u) << r.err;
    EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
    for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
  }

  // The same, for runs that may print status lines (an engine's "loaded in ...") before the error: the
  // error is then the last line.
  static void expect_error_last(const Outcome& r, const std::vector<std::string>& needles) {
    EXPECT_FALSE(r.timed_out) << "timed out (hung)";
    EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "; stderr: " << r.err;
    EXPECT_EQ(r.exit_code, 1) << r.err;
    ASSERT_FALSE(r.err.empty());
    const auto start = r.err.rfind('\n', r.err.size() - 2);
    const std::string last = r.err.substr(start == std::string::npos ? 0 : start + 1);
    EXPECT_EQ(last.rfind("moelab: error: ", 0), 0u) << r.err;
    EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
    for (const auto& n : needles) EXPECT_NE(last.find(n), std::string::npos) << "missing '" << n << "' in: " << r.err;
  }

  fs::path tmp;
};

// Sets element `element` of float tensor `name` in the safetensors file at `path` to `value`, in place.
void poke(const fs::path& path, const std::string& name, int64_t element, float value) {
  uint64_t header_len = 0, offset = 0;
  DType dtype;
  {
    SafetensorsFile f(path.string());
    dtype = f.info(name).dtype;
    offset = f.info(name).begin;
    std::ifstream in(path, std::ios::binary);
    in.read(reinterpret_cast<char*>(&header_len), 8);
  }
  std::fstream io(path, std::ios::binary | std::ios::in | std::ios::out);
  const int size = dtype == DType::F32 ? 4 : 2;
  io.seekp(std::streamoff(8 + header_len + offset + uint64_t(element) * size));
  if (dtype == DType::F32) {
    io.write(reinterpret_cast<const char*>(&value), 4);
  } else {
    ASSERT_EQ(dtype, DType::BF16);
    const uint16_t h = f32_to_bf16(value);
    io.write(reinterpret_cast<const char*>(&h), 2);
  }
  ASSERT_TRUE(io.good());
}

const std::string kF32 = "mixtral-4e-gqa-f32";
const std::string kSharded = "mixtral-8e-bf16-sharded";

// ------------------------------------------------------------------ item 6: --threads

TEST_F(CliHardening, ThreadsOutOfRangeIsAClearArgumentError) {
  const auto model = model_dir(kF32);
  for (const std::string threads : {"100000", "-7", "2147483647", "many"}) {
    SCOPED_TRACE(threads);
    // 100000 used to segfault inside libgomp; -7 failed with a 300-digit range.
    const Outcome r = moelab({"generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2", "--engine", "cpu-nf4",
                          "--threads", threads});
    EXPECT_EQ(r.signal, 0) << r.err;
    EXPECT_EQ(r.exit_code, 2) << r.err;  // a command-line mistake
    EXPECT_EQ(r.err.rfind("moelab: error: moelab generate: --threads: must be 0 (all cores) or 1 to ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find("got " + threads), std::string::npos) << r.err;
    EXPECT_LT(r.err.size(), 200u) << r.err;
  }
  // Every subcommand that takes --threads checks it.
  for (const std::vector<std::string> args :
       {std::vector<std::string>{"forward", "--model", model, "--token-ids", "1,2"},
        std::vector<std::string>{"trace", "--model", model, "--input", model + "/config.json", "--output",
                                 (tmp / "t.h5").string()},
        std::vector<std::string>{"profile", "--model", model},
        std::vector<std::string>{"eval", "--model", model, "--tasks", "hellaswag", "--data", "x"},
        std::vector<std::string>{"demo"}}) {
    SCOPED_TRACE(args[0]);
    auto with = args;
    with.insert(with.end(), {"--threads", "100000"});
    const Outcome r = moelab(with);
    EXPECT_EQ(r.signal, 0) << r.err;
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("--threads: must be 0 (all cores) or 1 to "), std::string::npos) << r.err;
  }
  // In range: 0 (all cores) and 1 work.
  for (const std::string threads : {"0", "1"}) {
    const Outcome r = moelab({"generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2", "--engine", "cpu-nf4",
                          "--threads", threads});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
}

// ------------------------------------------------------------------ item 7: FIFOs and other non-files

TEST_F(CliHardening, FifoNamedAsShardConfigOrTokenizerFailsAtOnce) {
  for (const std::string file : {"model.safetensors", "config.json", "tokenizer.model"}) {
    SCOPED_TRACE(file);
    const auto model = copy_model(kF32, "m-" + file);
    fs::remove(model / file);
    ASSERT_EQ(::mkfifo((model / file).c_str(), 0600), 0);
    // Before: open() blocked forever waiting for a writer.
    const Outcome r = moelab({"generate", "--model", model.string(), "--prompt", "hi", "--max-new-tokens", "1"}, 30);
    expect_one_line_error(r, {(model / file).string(), "is a FIFO (named pipe), not a regular file"});
  }
  {  // a sharded checkpoint's index and one of its shards
    const auto model = copy_model(kSharded);
    for (const std::string file : {"model.safetensors.index.json", "model-00002-of-00004.safetensors"}) {
      SCOPED_TRACE(file);
      ASSERT_TRUE(fs::exists(model / file));
      fs::rename(model / file, tmp / "aside");
      ASSERT_EQ(::mkfifo((model / file).c_str(), 0600), 0);
      const Outcome r = moelab({"inspect", "--model", model.string()}, 30);
      expect_one_line_error(r, {(model / file).string(), "FIFO"});
      fs::remove(model / file);
      fs::rename(tmp / "aside", model / file);
    }
  }
}

// ------------------------------------------------------------------ item 8: absurd configs

TEST_F(CliHardening, TenMillionLayersIsRefusedBeforeAllocating) {
  auto cfg = json::parse(read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json")));
  cfg["num_hidden_layers"] = 10'000'000;
  std::ofstream(tmp / "config.json") << cfg.dump();
  Outcome r = moelab({"inspect", "--config", (tmp / "config.json").string()}, 60);
  expect_one_line_error(r, {(tmp / "config.json").string(), "'num_hidden_layers' is 10000000, more than the 1024"});

  // The same in a checkpoint folder: refused at parse, before the tensor list is built.
  const auto model = copy_model(kF32);
  auto mc = json::parse(read_file_bytes(model / "config.json"));
  mc["num_hidden_layers"] = 10'000'000;
  std::ofstream(model / "config.json") << mc.dump();
  r = moelab({"inspect", "--model", model.string()}, 60);
  expect_one_line_error(r, {(model / "config.json").string(), "num_hidden_layers"});

  // Within the bound but more than the checkpoint holds: compared with the real tensors one by one.
  mc["num_hidden_layers"] = 1000;
  std::ofstream(model / "config.json", std::ios::trunc) << mc.dump();
  r = moelab({"inspect", "--model", model.string()}, 60);
  expect_one_line_error(r, {model.string(), "missing tensor 'model.layers.2.input_layernorm.weight'"});
}

// JSON nested 300,000 levels deep (600 KB) in a config, a data line, an eval record, a trace input: parsing
// it is harmless, but describing, copying or comparing it recurses once per level; it is refused while parsed,
// with one line naming the file (and line). Before: a stack overflow (SIGSEGV) where the value was later shown
// in a message or copied.
TEST_F(CliHardening, DeeplyNestedJsonIsOneLineNeverAStackOverflow) {
  const std::string deep = std::string(300000, '[') + std::string(300000, ']');
  auto cfg = json::parse(read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json")));
  std::string text = cfg.dump();
  text.insert(text.size() - 1, ", \"rope_scaling\": " + deep);
  std::ofstream(tmp / "config.json") << text;
  expect_one_line_error(moelab({"inspect", "--config", (tmp / "config.json").string()}, 60),
                        {(tmp / "config.json").string() + ": JSON nested more than 64 levels deep"});
  const std::string model = model_dir(kF32);
  std::ofstream(tmp / "lines.jsonl") << "\n{\"text\": \"x\", \"extra\": " << deep << "}\n";
  const std::string lines = (tmp / "lines.jsonl").string();
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"finetune", "--model", model, "--data", lines, "--output", (tmp / "ft").string(), "--max-steps", "1"},
           {"trace", "--model", model, "--input", lines, "--output", (tmp / "t.h5").string()},
           {"eval", "--model", model, "--tasks", "hellaswag", "--data", lines}}) {
    const Outcome r = moelab(args, 60);
    expect_error_last(r, {lines + ":2: JSON nested more than 64 levels deep"});
  }
}

TEST_F(CliHardening, InspectNeverPrintsNegativeSizes) {
  // The largest config the bounds allow: every count and MiB figure inspect prints is positive.
  auto cfg = json::parse(read_file_bytes(fixture("configs/mixtral-8x7b-v0.1.json")));
  cfg["vocab_size"] = 1 << 22;
  cfg["hidden_size"] = 1 << 16;
  cfg["intermediate_size"] = 1 << 20;
  cfg["num_hidden_layers"] = 1024;
  cfg["num_local_experts"] = 255;
  std::ofstream(tmp / "big.json") << cfg.dump();
  Outcome r = moelab({"inspect", "--config", (tmp / "big.json").string(), "--context", "1000000"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (size_t at = r.out.find("parameters"); at + 2 < r.out.size(); ++at)  // no negative number (" -5")
    EXPECT_FALSE(r.out[at] == ' ' && r.out[at + 1] == '-' && std::isdigit(static_cast<unsigned char>(r.out[at + 2])))
        << r.out;
  EXPECT_NE(r.out.find("GiB"), std::string::npos) << r.out;
  // Sizes that overflowed int64 before (each dimension was allowed up to 2^30): a clear error now.
  cfg["hidden_size"] = 1 << 30;
  cfg["intermediate_size"] = 1 << 30;
  std::ofstream(tmp / "huge.json") << cfg.dump();
  r = moelab({"inspect", "--config", (tmp / "huge.json").string()});
  expect_one_line_error(r, {(tmp / "huge.json").string(), "'hidden_size' is 1073741824"});
}

// ------------------------------------------------------------------ item 9: NaN / Inf weights

TEST_F(CliHardening, NonFiniteWeightsFailNamingTensorAndFile) {
  const auto model = copy_model(kF32);
  const auto st = model / "model.safetensors";
  const std::string expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
  poke(st, expert, 5, std::nanf(""));
  // inspect validates structure only, and says so; --check-values scans every value.
  Outcome r = moelab({"inspect", "--model", model.string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("values            not scanned"), std::string::npos) << r.out;
  r = moelab({"inspect", "--model", model.string(), "--check-values"});
  expect_one_line_error(r, {st.string(), "tensor '" + expert + "': element 5 is NaN"});
  // ref and cpu-nf4 (which quantizes it) fail at load with the same message, not "NF4: element 0 is nan".
  for (const std::string engine : {"ref", "cpu-nf4"}) {
    SCOPED_TRACE(engine);
    r = moelab({"generate", "--model", model.string(), "--prompt", "hi", "--max-new-tokens", "2", "--engine", engine});
    expect_one_line_error(r, {st.string(), "tensor '" + expert + "': element 5 is NaN"});
  }
  r = moelab({"quantize", "--model", model.string(), "--output", (tmp / "q").string()});
  expect_one_line_error(r, {st.string(), "tensor '" + expert + "': element 5 is NaN"});
  EXPECT_FALSE(fs::exists(tmp / "q"));  // nothing half-written left behind
}

TEST_F(CliHardening, InfInEmbeddingOrLmHeadFailsOnEveryEngine) {
  // cpu-nf4 keeps the embedding and lm_head in FP32: it used to run on them and print garbage, exit 0.
  for (const std::string tensor : {"model.embed_tokens.weight", "lm_head.weight"}) {
    SCOPED_TRACE(tensor);
    const auto model = copy_model(kSharded, "m-" + tensor);
    const auto index = json::parse(read_file_bytes(model / "model.safetensors.index.json"));
    const auto st = model / index["weight_map"][tensor].get<std::string>();
    // The embedding's row 1 (BOS, in every prompt; engines may read only the prompt's rows), element 0.
    const int64_t element = tensor == "lm_head.weight" ? 0 : 64;
    const std::string message = "tensor '" + tensor + "': element " + std::to_string(element) + " is +Inf";
    poke(st, tensor, element, INFINITY);
    for (const std::string engine : {"ref", "cpu-nf4"}) {
      SCOPED_TRACE(engine);
      const Outcome r = moelab({"generate", "--model", model.string(), "--prompt", "hi", "--max-new-tokens", "2",
                            "--engine", engine});
      // cpu-nf4 reads embedding rows as tokens come, after its "loaded" line.
      expect_error_last(r, {st.string(), message});
    }
    // ref --stream reads the embedding row by row: the prompt's rows are checked as they are read.
    const Outcome r = moelab({"generate", "--model", model.string(), "--prompt", "hi", "--max-new-tokens", "2", "--stream"});
    expect_one_line_error(r, {st.string(), message});
    const Outcome scan = moelab({"inspect", "--model", model.string(), "--check-values"});
    expect_one_line_error(scan, {st.string(), message});
  }
  // A healthy checkpoint passes the full scan.
  const Outcome ok = moelab({"inspect", "--model", model_dir(kSharded), "--check-values"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("values of the"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("float tensors are finite"), std::string::npos) << ok.out;
}

// ------------------------------------------------------------------ item 11: quantize --output

// A --model that is a symlink loop: std::filesystem's throwing calls ended every command as "internal
// error" (exit 2) without the file named as a moelab error; now one line naming it (core/regular_file.hpp
// path_type), through Checkpoint::open and finetune's default corpus.
TEST_F(CliHardening, ModelFolderThatIsASymlinkLoopIsOneLine) {
  const auto a = tmp / "loop-a", b = tmp / "loop-b";
  fs::create_directory_symlink(b, a);
  fs::create_directory_symlink(a, b);
  const std::vector<std::vector<std::string>> commands = {
      {"inspect", "--model", a.string()},
      {"generate", "--model", a.string(), "-p", "hi", "-n", "1"},
      {"quantize", "--model", a.string(), "--output", (tmp / "q-loop").string()},
      {"finetune", "--model", a.string(), "--output", (tmp / "ft-loop").string(), "--max-steps", "1"},
  };
  for (const auto& args : commands) {
    SCOPED_TRACE(args[0]);
    expect_one_line_error(moelab(args), {a.string(), "Too many levels of symbolic links"});
  }
  // The same for the tokenizer inside a good folder (before: "internal error: filesystem error", exit 2).
  const auto model = copy_model(kF32);
  const auto tok = model / "tokenizer.model";
  fs::remove(tok);
  fs::create_symlink(tok, tok);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"inspect", "--model", model.string()},
           {"generate", "--model", model.string(), "-p", "hi", "-n", "1"},
           {"quantize", "--model", model.string(), "--output", (tmp / "q-tok").string()}}) {
    SCOPED_TRACE(args[0]);
    expect_error_last(moelab(args), {tok.string(), "Too many levels of symbolic links"});
  }
}

// Out of memory ends in one line whose advice names only options the command has: it said "try --stream, or
// a smaller --context" on every command, and finetune has neither. finetune on 64 sequences of 1024 tokens
// keeps 64 x 4 heads x 1024^2 floats of attention probabilities per layer (1 GiB): past a 2 GB address
// space (ulimit -v, set by /bin/sh for the child; the arguments are passed as "$@", not interpolated).
TEST_F(CliHardening, OutOfMemoryAdviceNamesOnlyTheCommandsOwnOptions) {
  const auto data = tmp / "long.jsonl";
  {
    std::ofstream f(data);
    for (int i = 0; i < 64; ++i) {
      std::string text;
      for (int w = 0; w < 1500; ++w) text += "word" + std::to_string((i * 7 + w) % 97) + " ";
      f << "{\"text\": \"" << text << "\"}\n";
    }
  }
  std::vector<std::string> all{"/bin/sh", "-c", "ulimit -v 2000000 && exec \"$0\" \"$@\"", MOELAB_BIN, "finetune",
                               "--model", MOELAB_BUNDLED_MODEL, "--data", data.string(), "--output", (tmp / "ft").string(),
                               "--batch-size", "64", "--max-seq-len", "1024", "--max-steps", "1", "--progress", "none"};
  const Outcome r = wait_program(spawn_program(all, tmp / "stdout.txt", tmp / "stderr.txt"), 120, tmp / "stdout.txt",
                                 tmp / "stderr.txt");
  expect_error_last(r, {"out of memory (try a smaller --batch-size, a smaller --max-seq-len, or --gradient-checkpointing)"});
  EXPECT_EQ(r.err.find("--stream"), std::string::npos) << r.err;
  // With --gradient-checkpointing given (one layer's 1 GiB of probabilities still does not fit), the advice
  // no longer suggests it.
  all.push_back("--gradient-checkpointing");
  *std::find(all.begin(), all.end(), (tmp / "ft").string()) = (tmp / "ft-checkpointing").string();
  const Outcome c = wait_program(spawn_program(all, tmp / "stdout.txt", tmp / "stderr.txt"), 120, tmp / "stdout.txt",
                                 tmp / "stderr.txt");
  expect_error_last(c, {"out of memory (try a smaller --batch-size, or a smaller --max-seq-len)"});
  EXPECT_EQ(c.err.find("--gradient-checkpointing"), std::string::npos) << c.err;
}

// --shard-size-mb is one shared option (cli/options.hpp) on quantize and merge, its range checked while
// parsing: quantize used to take nan and 1e300 and convert them to bytes (undefined behaviour).
TEST_F(CliHardening, QuantizeShardSizeMustBeASaneNumber) {
  for (const char* size : {"nan", "1e300", "inf", "0", "-1", "1e-9", "2e6", "x"}) {
    SCOPED_TRACE(size);
    const auto out = tmp / "q-shards";
    const Outcome r = moelab({"quantize", "--model", model_dir(kF32), "--output", out.string(),
                              std::string("--shard-size-mb=") + size});
    EXPECT_FALSE(r.timed_out);
    EXPECT_EQ(r.signal, 0) << r.err;
    EXPECT_NE(r.exit_code, 0) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find("--shard-size-mb"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out));  // refused before anything is written
  }
  const Outcome ok = moelab({"quantize", "--model", model_dir(kF32), "--output", (tmp / "q-ok").string(),
                             "--shard-size-mb", "0.001"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
}

TEST_F(CliHardening, QuantizeNeverMixesTwoCheckpointsInOneFolder) {
  const auto out = tmp / "q";
  // A sharded NF4 checkpoint of the 8-expert model first.
  Outcome r = moelab({"quantize", "--model", model_dir(kSharded), "--output", out.string(), "--shard-size-mb", "0.1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  const auto before = read_file_bytes(out / "model.safetensors.index.json");
  // Then the 4-expert model into the same folder. Before: it wrote model.safetensors beside the old index
  // and shards, and the folder went on loading the OLD 8-expert weights (exit 0).
  r = moelab({"quantize", "--model", model_dir(kF32), "--output", out.string()});
  expect_one_line_error(r, {out.string(), "--output is not empty; pass --force"});
  EXPECT_EQ(read_file_bytes(out / "model.safetensors.index.json"), before);  // untouched
  // With --force the folder holds the new checkpoint and nothing of the old one.
  r = moelab({"quantize", "--model", model_dir(kF32), "--output", out.string(), "--force"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(out)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"config.json", "model.safetensors", "tokenizer.model"}));
  const auto ck = Checkpoint::open(out.string());
  EXPECT_EQ(ck->config().num_experts, 4);
  EXPECT_TRUE(ck->config().quantization.nf4);
  // No temporary folders are left beside it.
  for (const auto& e : fs::directory_iterator(tmp))
    EXPECT_EQ(e.path().filename().string().find(".q.tmp-"), std::string::npos) << e.path();
  // --force does not delete a folder that holds no checkpoint; a file as --output is refused.
  fs::create_directories(tmp / "notes");
  std::ofstream(tmp / "notes" / "todo.txt") << "keep me\n";
  r = moelab({"quantize", "--model", model_dir(kF32), "--output", (tmp / "notes").string(), "--force"});
  expect_one_line_error(r, {(tmp / "notes").string(), "holds none"});
  EXPECT_TRUE(fs::exists(tmp / "notes" / "todo.txt"));
  r = moelab({"quantize", "--model", model_dir(kF32), "--output", (tmp / "notes" / "todo.txt").string()});
  expect_one_line_error(r, {"todo.txt", "not a folder"});
  // An empty folder is fine without --force.
  fs::create_directories(tmp / "empty");
  r = moelab({"quantize", "--model", model_dir(kF32), "--output", (tmp / "empty").string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(tmp / "empty" / "config.json"));
}

// ------------------------------------------------------------------ item 12: the rest

TEST_F(CliHardening, GenerateSaysWhenItStopsAtTheContextLimit) {
  // The prompt is 15 tokens for this fixture's tokenizer: 4 more fit a context of 18.
  const Outcome r = moelab({"generate", "--model", model_dir(kF32), "--prompt", "The quick brown fox", "--context", "18",
                            "--max-new-tokens", "20"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("generated 4 tokens"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("note: stopped after 4 of the 20 tokens asked for: the prompt (15 tokens) and the output "
                       "filled the context of 18 tokens (see --context)"),
            std::string::npos)
      << r.err;
  // Not said when the limit was not reached.
  const Outcome ok = moelab({"generate", "--model", model_dir(kF32), "--prompt", "The quick brown fox", "--context", "64",
                         "--max-new-tokens", "4"});
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.err.find("note: stopped"), std::string::npos) << ok.err;
}

TEST_F(CliHardening, SigtermDuringTraceWritesWhatWasComputedThenStops) {
  // Enough text for a long run: many short windows of the fixture model.
  const auto input = tmp / "texts.jsonl";
  {
    std::ofstream f(input);
    for (int i = 0; i < 20000; ++i)
      f << json{{"text", "The quick brown fox jumps over the lazy dog, number " + std::to_string(i) + "."},
                {"domain", "prose"}}.dump()
        << "\n";
  }
  const auto out = tmp / "trace.h5";
  const pid_t pid = start({"trace", "--model", model_dir(kF32), "--input", input.string(), "--output", out.string(),
                           "--window", "8"});
  // The trace file appears once the run is set up (signals are handled from before then); let some
  // windows be computed, then ask it to stop as a job scheduler would.
  // (Reading and checking the 20,000 inputs comes first: a few seconds here, over a minute in the
  // ASan+UBSan build on a loaded machine, so the wait is generous.)
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(out) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(300))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(fs::exists(out)) << "no trace file after 300 s";
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ::kill(pid, SIGTERM);
  const Outcome r = finish(pid, 120);
  // Before: killed by SIGTERM with the buffered sequences lost and no word.
  expect_one_line_error(r, {"trace: stopped by SIGTERM after ", "are written to " + out.string()});
  const auto at = r.err.find("after ") + 6;
  const int64_t done = std::stoll(r.err.substr(at));
  EXPECT_GT(done, 0) << r.err;
  EXPECT_LT(done, 20000) << r.err;
  const auto tr = analysis::read_trace(out.string());
  EXPECT_EQ(int64_t(tr.num_sequences()), done);
}

TEST_F(CliHardening, DirectoriesAndUnwritablePathsAreOneLineErrors) {
  {  // tokenizer.model that is a directory (was: "internal error")
    const auto model = copy_model(kF32);
    fs::remove(model / "tokenizer.model");
    fs::create_directory(model / "tokenizer.model");
    const Outcome r = moelab({"generate", "--model", model.string(), "--prompt", "hi"});
    expect_one_line_error(r, {(model / "tokenizer.model").string(), "is a directory, not a regular file"});
  }
  {  // quantize --output under a file (read-only /proc: "Not a directory"; was "internal error")
    const Outcome r = moelab({"quantize", "--model", model_dir(kF32), "--output", "/proc/version/x"});
    expect_one_line_error(r, {"/proc/version/x"});
  }
  {  // quantize --output in a folder where nothing can be created (procfs)
    const Outcome r = moelab({"quantize", "--model", model_dir(kF32), "--output", "/proc/sys/moelab-q"});
    expect_one_line_error(r, {"/proc/sys/moelab-q"});
  }
  {  // eval --data and --reported naming a directory (--reported was read only after the whole run)
    fs::create_directories(tmp / "dir");
    Outcome r = moelab({"eval", "--model", model_dir(kF32), "--tasks", "hellaswag", "--data", (tmp / "dir").string()});
    expect_one_line_error(r, {(tmp / "dir").string()});
    ASSERT_TRUE(fs::exists(fixture("evals/tasks/mc_test.jsonl")));
    r = moelab({"eval", "--model", model_dir(kF32), "--tasks", "multiple_choice", "--data",
                fixture("evals/tasks/mc_test.jsonl"), "--reported", (tmp / "dir").string()});
    expect_one_line_error(r, {(tmp / "dir").string(), "is a directory"});
  }
}

}  // namespace
}  // namespace moelab::test
