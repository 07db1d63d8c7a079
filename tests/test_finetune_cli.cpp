// `moelab finetune` end to end, running the real binary on the bundled model: a short run lowers the held-out
// loss and writes the log, the summary, checkpoints and a peft adapter that `moelab generate --adapter` loads
// on both CPU engines; a resumed run equals an uninterrupted one bit for bit, also after a SIGTERM; bad data and
// bad options fail with one clear line.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/tokenizer.hpp"
#include "moelab_run_fixture.hpp"
#include "process_util.hpp"
#include "train/data.hpp"
#include "train/products.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
// A fixture model (random weights, 512-token vocabulary): a step takes a fraction of a second.
const std::string kModel = std::string(MOELAB_FIXTURES) + "/models/mixtral-4e-gqa-f32";

// Facts with a fixed form the base model has never seen: after a few steps the adapter should predict the
// pattern, so the held-out lines (other numbers, the same form) get a clearly lower loss.
std::string fact_line(int i) {
  return fmt::format("{{\"text\": \"Ticket {} is filed under shelf Q-{} in the zebra archive, row {}.\"}}\n", 100 + i,
                     7 * i % 90, i % 9);
}

class FinetuneCli : public MoelabRunsInATempDir {
 protected:
  FinetuneCli() : MoelabRunsInATempDir("moelab-finetune-cli") {}
  std::string train_path, eval_path;
  void SetUp() override {
    std::string train, eval;
    for (int i = 0; i < 24; ++i) train += fact_line(i);
    for (int i = 50; i < 54; ++i) eval += fact_line(i);
    train_path = write("train.jsonl", train);
    eval_path = write("eval.jsonl", eval);
  }
  // A short run's options: small batches, --max-seq-len within the lines, two micro-batches per step, the
  // default LoRA dropout (so the resume tests cover the dropout masks too).
  std::vector<std::string> base_args(const std::string& out, int steps, int accum = 2) const {
    return {"finetune",          "--model",         kModel,   "--data", train_path, "--eval-data", eval_path,
            "-o",                out,               "--max-steps", std::to_string(steps), "--batch-size", "4",
            "--gradient-accumulation-steps", std::to_string(accum), "--max-seq-len", "48", "--learning-rate", "3e-3",
            "--warmup-steps", "2", "--lr-scheduler-type", "cosine", "--threads", "1", "--progress", "none"};
  }
  static nlohmann::json json_file(const fs::path& p) { return nlohmann::json::parse(read_file_bytes(p)); }
  static std::vector<std::vector<std::string>> csv(const fs::path& p) {
    std::vector<std::vector<std::string>> rows;
    std::istringstream in(read_file_bytes(p));
    for (std::string line; std::getline(in, line);) {
      auto& row = rows.emplace_back();
      std::string cell;
      std::istringstream cells(line);
      while (std::getline(cells, cell, ',')) row.push_back(cell);
      if (!line.empty() && line.back() == ',') row.push_back("");
    }
    return rows;
  }
};

TEST_F(FinetuneCli, ShortRunLowersHeldOutLossAndWritesAPeftAdapter) {
  const std::string out = dir.file("out");
  auto args = base_args(out, 12);
  args.insert(args.end(), {"--save-steps", "6"});
  const auto r = moelab(args);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "train_log.csv", "train_summary.json",
                        "checkpoint-6/adapter_model.safetensors", "checkpoint-6/optimizer.safetensors",
                        "checkpoint-6/trainer_state.json", "checkpoint-12/trainer_state.json"})
    EXPECT_TRUE(fs::is_regular_file(fs::path(out) / f)) << f;
  // No temporary folder is left behind.
  for (const auto& e : fs::directory_iterator(out)) EXPECT_NE(e.path().filename().string()[0], '.') << e.path();

  const auto sum = json_file(fs::path(out) / "train_summary.json");
  EXPECT_TRUE(sum["completed"].get<bool>());
  EXPECT_EQ(sum["steps"], 12);
  ASSERT_EQ(sum["eval"].size(), 2u);  // before and after
  const double before = sum["eval"][0]["eval_loss"], after = sum["eval"][1]["eval_loss"];
  // The base model has never seen the pattern; 12 steps at 3e-3 must take a clear bite out of the loss (measured:
  // see the commit message), not a rounding-level change.
  EXPECT_LT(after, before - 0.5) << "held-out loss " << before << " -> " << after;

  // The log: a header, the step-0 evaluation, then one row per step with a finite loss and the schedule's lr.
  const auto rows = csv(fs::path(out) / "train_log.csv");
  ASSERT_EQ(rows.size(), 14u);
  EXPECT_EQ(rows[0], (std::vector<std::string>{"step", "epoch", "loss", "ce", "aux", "lr", "grad_norm", "tokens",
                                                "tokens_per_s", "elapsed_s", "eval_loss"}));
  for (int s = 1; s <= 12; ++s) {
    ASSERT_EQ(rows[size_t(s) + 1].size(), 11u) << s;
    EXPECT_EQ(std::stoi(rows[size_t(s) + 1][0]), s);
    EXPECT_GT(std::stod(rows[size_t(s) + 1][2]), 0.0);
  }
  // warmup 2 then cosine: step 1 runs at lr 0, step 2 at half the peak, step 3 at the peak.
  EXPECT_EQ(std::stod(rows[2][5]), 0.0);
  EXPECT_DOUBLE_EQ(std::stod(rows[3][5]), 1.5e-3);
  EXPECT_DOUBLE_EQ(std::stod(rows[4][5]), 3e-3);
  // 24 sequences in micro-batches of 4, two per step: 3 steps an epoch.
  EXPECT_DOUBLE_EQ(std::stod(rows[13][1]), 4.0);

  // The adapter loads where every adapter loads: generate on the reference and the cpu-nf4 engines.
  for (const char* engine : {"ref", "cpu-nf4"}) {
    const auto g = moelab({"generate", "--model", kModel, "--engine", engine, "--adapter", out, "-p", "Ticket 160 is",
                           "--max-new-tokens", "6", "--temperature", "0"});
    EXPECT_EQ(g.status, 0) << engine << ": " << g.err;
  }
}

TEST_F(FinetuneCli, ResumeEqualsAnUninterruptedRunBitForBit) {
  const std::string straight = dir.file("straight"), resumed = dir.file("resumed");
  auto a = base_args(straight, 6);
  a.insert(a.end(), {"--save-steps", "3"});
  const auto r1 = moelab(a);
  ASSERT_EQ(r1.status, 0) << r1.err;
  // Steps 4..6 again from the straight run's step-3 checkpoint, into a new folder.
  auto b = base_args(resumed, 6);
  b.insert(b.end(), {"--save-steps", "3", "--resume-from-checkpoint", straight + "/checkpoint-3"});
  const auto r2 = moelab(b);
  ASSERT_EQ(r2.status, 0) << r2.err;
  EXPECT_NE(r2.out.find("resumed from"), std::string::npos) << r2.out;
  EXPECT_EQ(read_file_bytes(fs::path(straight) / "adapter_model.safetensors"),
            read_file_bytes(fs::path(resumed) / "adapter_model.safetensors"));
  EXPECT_EQ(read_file_bytes(fs::path(straight) / "checkpoint-6/optimizer.safetensors"),
            read_file_bytes(fs::path(resumed) / "checkpoint-6/optimizer.safetensors"));
  // The logs agree on every column but the timings (tokens_per_s, elapsed_s).
  const auto la = csv(fs::path(straight) / "train_log.csv"), lb = csv(fs::path(resumed) / "train_log.csv");
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i)
    for (size_t c : {0, 1, 2, 3, 4, 5, 6, 7, 10}) EXPECT_EQ(la[i][c], lb[i][c]) << "row " << i << " column " << c;
  // The dropout masks take part (and so are what the resume reproduced): without dropout the adapter differs.
  auto nd = base_args(dir.file("no-dropout"), 6);
  nd.insert(nd.end(), {"--lora-dropout", "0"});
  ASSERT_EQ(moelab(nd).status, 0);
  EXPECT_NE(read_file_bytes(fs::path(straight) / "adapter_model.safetensors"),
            read_file_bytes(fs::path(dir.file("no-dropout")) / "adapter_model.safetensors"));
  // Another batch size is refused, naming the option.
  auto c = base_args(dir.file("other"), 6);
  c.insert(c.end(), {"--resume-from-checkpoint", straight + "/checkpoint-3"});
  c[std::find(c.begin(), c.end(), "--batch-size") - c.begin() + 1] = "2";
  const auto r3 = moelab(c);
  EXPECT_EQ(r3.status, 1);
  EXPECT_NE(r3.err.find("trained with batch_size = 4, this run has 2"), std::string::npos) << r3.err;
}

TEST_F(FinetuneCli, SigtermWritesACheckpointThatResumesExactly) {
  const int steps = 10;
  const std::string straight = dir.file("straight"), stopped = dir.file("stopped");
  const auto r1 = moelab(base_args(straight, steps, 1));
  ASSERT_EQ(r1.status, 0) << r1.err;
  // The same run, stopped by SIGTERM once a few steps are logged.
  std::vector<std::string> argv = base_args(stopped, steps, 1);
  argv.insert(argv.begin(), MOELAB_BIN);
  const pid_t pid = spawn_program(argv, dir.path() / "stop.out", dir.path() / "stop.err");
  ASSERT_GT(pid, 0);
  const auto log = fs::path(stopped) / "train_log.csv";
  for (int i = 0; i < 6000 && csv(log).size() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(pid, SIGTERM);
  const auto r2 = wait_program(pid, 120, dir.path() / "stop.out", dir.path() / "stop.err");
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  const auto sum = json_file(fs::path(stopped) / "train_summary.json");
  ASSERT_TRUE(sum["interrupted"].get<bool>()) << "the run ended before the signal; make it longer";
  const int at = sum["steps"];
  EXPECT_LT(at, steps);
  EXPECT_NE(r2.out.find("stopped by a signal after step " + std::to_string(at)), std::string::npos) << r2.out;
  EXPECT_FALSE(fs::exists(fs::path(stopped) / "adapter_model.safetensors")) << "no final adapter before the end";
  // Continue it in the same folder: the result is the uninterrupted run's.
  auto b = base_args(stopped, steps, 1);
  b.insert(b.end(), {"--resume-from-checkpoint", stopped + "/checkpoint-" + std::to_string(at)});
  const auto r3 = moelab(b);
  ASSERT_EQ(r3.status, 0) << r3.err;
  EXPECT_EQ(read_file_bytes(fs::path(straight) / "adapter_model.safetensors"),
            read_file_bytes(fs::path(stopped) / "adapter_model.safetensors"));
}

// The summary's time breakdown and peak memory (what scripts/bench_train.sh tabulates): every field present and
// positive, the parts no more than the loop's wall time they are measured inside, and the peak resident set no
// more than the kernel's own figure for the finished child. No speed is asserted.
TEST_F(FinetuneCli, SummaryHasTheTimeBreakdownAndPeakMemory) {
  const std::string out = dir.file("out");
  const auto r = moelab(base_args(out, 4));
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  rusage children{};
  ASSERT_EQ(getrusage(RUSAGE_CHILDREN, &children), 0);
  const auto sum = json_file(fs::path(out) / "train_summary.json");
  for (const char* k : {"train_seconds", "tokens_per_s", "forward_seconds", "backward_seconds", "optimizer_seconds",
                        "dequantize_seconds", "eval_seconds", "peak_rss_bytes", "peak_rss_before_training_bytes", "threads"}) {
    ASSERT_TRUE(sum.contains(k) && sum[k].is_number()) << k;
    EXPECT_GT(sum[k].get<double>(), 0.0) << k;
  }
  ASSERT_TRUE(sum.contains("simd") && sum["simd"].is_string());
  EXPECT_EQ(sum["threads"].get<int>(), 1);  // base_args' --threads 1: the pool the products ran on
  // The child loads the same OpenBLAS on the same CPU (and environment) as this test: the same kernel set.
  ASSERT_TRUE(sum.contains("blas_kernels") && sum["blas_kernels"].is_string());
  EXPECT_EQ(sum["blas_kernels"].get<std::string>(), train::Products::blas_kernels());
  const double total = sum["train_seconds"], fwd = sum["forward_seconds"], bwd = sum["backward_seconds"],
               optim = sum["optimizer_seconds"], eval = sum["eval_seconds"];
  // Each part is timed inside the loop's interval and the parts do not overlap.
  EXPECT_LE(fwd + bwd + optim + eval, total) << fwd << " + " << bwd << " + " << optim << " + " << eval;
  EXPECT_LE(sum["dequantize_seconds"].get<double>(), fwd + bwd);  // a part of those two
  // tokens_per_s is the tokens over the loop's seconds (the same two figures the summary reports).
  EXPECT_DOUBLE_EQ(sum["tokens_per_s"].get<double>(), sum["tokens"].get<double>() / total);
  // The peak can only grow from the loop's start to its end, and the child's exit figure (ru_maxrss of every
  // child this process has reaped, in KiB) includes the moment the summary was measured.
  const int64_t peak = sum["peak_rss_bytes"], before = sum["peak_rss_before_training_bytes"];
  EXPECT_GE(peak, before);
  EXPECT_LE(peak, int64_t(children.ru_maxrss) * 1024);
  // The final line carries the same breakdown.
  EXPECT_NE(r.out.find("finetune: 4 steps in "), std::string::npos) << r.out;
  for (const char* part : {"tokens/s; forward ", " s, backward ", " s, of which dequantizing the base ", " s; optimizer ",
                           " s), peak RSS ", " MiB, mean loss "})
    EXPECT_NE(r.out.find(part), std::string::npos) << part << " in " << r.out;
}

// Conversational data end to end on the bundled model: both of trl's chat kinds train (finite losses, a held-out
// loss before and after, an adapter written), and the command counts the same sequences, tokens and targets that
// train::load_dataset gives for the file (whose chat tokenization tests/test_train_data.cpp checks against
// transformers).
TEST_F(FinetuneCli, ChatDataTrainsAndWritesAnAdapter) {
  const std::string bundled = MOELAB_BUNDLED_MODEL;
  auto chat = [](int i, bool prompt_completion) {
    const std::string sys = i % 3 == 0 ? "{\"role\": \"system\", \"content\": \"Answer with the shelf.\"}, " : "";
    const std::string user = fmt::format("{{\"role\": \"user\", \"content\": \"Where is ticket {}?\"}}", 100 + i);
    const std::string answer =
        fmt::format("{{\"role\": \"assistant\", \"content\": \"Shelf Q-{}, row {}.\"}}", 7 * i % 90, i % 9);
    if (prompt_completion) return "{\"prompt\": [" + sys + user + "], \"completion\": [" + answer + "]}\n";
    return "{\"messages\": [" + sys + user + ", " + answer + "]}\n";
  };
  const Tokenizer tok(bundled + "/tokenizer.model");
  for (const bool prompt_completion : {false, true}) {
    SCOPED_TRACE(prompt_completion ? "conversational prompt-completion" : "messages");
    std::string train, eval;
    for (int i = 0; i < 8; ++i) train += chat(i, prompt_completion);
    for (int i = 50; i < 53; ++i) eval += chat(i, prompt_completion);
    const std::string tag = prompt_completion ? "pc" : "msg";
    const std::string train_file = write("chat-" + tag + ".jsonl", train), eval_file = write("chat-eval-" + tag + ".jsonl", eval);
    const std::string out = dir.file("chat-out-" + tag);
    const auto r = moelab({"finetune", "--model", bundled, "--data", train_file, "--eval-data", eval_file, "-o", out,
                           "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "64", "--learning-rate", "3e-3",
                           "--threads", "1", "--progress", "none"});
    ASSERT_EQ(r.status, 0) << r.err << r.out;
    train::DataOptions o;
    o.max_seq_len = 64;
    const auto ds = train::load_dataset(train_file, tok, o);
    EXPECT_EQ(ds.kind, prompt_completion ? "conversational prompt-completion" : "conversational");
    EXPECT_NE(r.out.find(fmt::format("finetune: {} sequences ({} tokens, {} to learn) from {}", ds.sequences.size(),
                                     ds.tokens(), ds.target_tokens(), train_file)),
              std::string::npos)
        << r.out;
    // Completion-only loss leaves far fewer targets than tokens; "messages" learns all but each first token.
    if (prompt_completion) EXPECT_LT(ds.target_tokens() * 2, ds.tokens());
    else EXPECT_EQ(ds.target_tokens(), ds.tokens() - int64_t(ds.sequences.size()));
    for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "train_log.csv", "train_summary.json"})
      EXPECT_TRUE(fs::is_regular_file(fs::path(out) / f)) << f;
    const auto rows = csv(fs::path(out) / "train_log.csv");
    ASSERT_EQ(rows.size(), 5u);  // header, the step-0 evaluation, 3 steps
    for (size_t s = 2; s < rows.size(); ++s) {
      const double loss = std::stod(rows[s][2]);
      EXPECT_TRUE(std::isfinite(loss) && loss > 0) << "step " << rows[s][0] << " loss " << rows[s][2];
    }
    const auto sum = json_file(fs::path(out) / "train_summary.json");
    ASSERT_EQ(sum["eval"].size(), 2u);
    for (const auto& e : sum["eval"]) EXPECT_TRUE(std::isfinite(e["eval_loss"].get<double>())) << e;
  }
}

// --packing (trl's packing=True, "bfd"): one epoch over bins of whole examples learns every target token exactly
// once, as one epoch without packing does, in fewer steps (a micro-batch is --batch-size bins).
TEST_F(FinetuneCli, PackingLearnsEveryTargetOnceAnEpochInFewerSteps) {
  nlohmann::json sums[2];
  for (const bool packing : {false, true}) {
    const std::string out = dir.file(packing ? "packed" : "unpacked");
    std::vector<std::string> args = {"finetune", "--model", kModel, "--data", train_path, "-o", out,
                                     "--num-train-epochs", "1", "--batch-size", "2", "--max-seq-len", "160",
                                     "--threads", "1", "--progress", "none"};
    if (packing) args.push_back("--packing");
    const auto r = moelab(args);
    ASSERT_EQ(r.status, 0) << r.err << r.out;
    sums[packing] = json_file(fs::path(out) / "train_summary.json");
  }
  train::DataOptions o;
  o.max_seq_len = 160;  // no example is cut, with or without packing
  const auto ds = train::load_dataset(train_path, Tokenizer(kModel + "/tokenizer.model"), o);
  EXPECT_EQ(sums[0]["target_tokens"].get<int64_t>(), ds.target_tokens());
  EXPECT_EQ(sums[1]["target_tokens"].get<int64_t>(), ds.target_tokens());
  EXPECT_EQ(sums[0]["tokens"].get<int64_t>(), ds.tokens());
  EXPECT_EQ(sums[1]["tokens"].get<int64_t>(), ds.tokens());
  ASSERT_EQ(ds.truncated, 0);
  // Each example is a few dozen tokens: a bin of 160 holds several, so the epoch takes fewer steps.
  EXPECT_LT(sums[1]["steps"].get<int64_t>(), sums[0]["steps"].get<int64_t>());
}

TEST_F(FinetuneCli, BadDataAndOptionsFailWithOneLine) {
  auto one_line = [](const MoelabRun& r) { return std::count(r.err.begin(), r.err.end(), '\n') == 1; };
  const std::string bad = write("bad.jsonl", fact_line(0) + fact_line(1) + "{\"text\": \"x\", \"label\": 1}\n");
  auto args = base_args(dir.file("o1"), 2);
  args[std::find(args.begin(), args.end(), "--data") - args.begin() + 1] = bad;
  const auto r = moelab(args);
  EXPECT_EQ(r.status, 1);
  EXPECT_TRUE(one_line(r)) << r.err;
  EXPECT_NE(r.err.find("moelab: error: " + bad + ":3: unknown field \"label\""), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir.file("o1") + "/adapter_model.safetensors"));
  // A chat line the template cannot render: the same one line, naming the message.
  const std::string bad_chat = write("bad-chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, "
                                                       "{\"role\": \"user\", \"content\": \"b\"}]}\n");
  args[std::find(args.begin(), args.end(), "--data") - args.begin() + 1] = bad_chat;
  const auto rc = moelab(args);
  EXPECT_EQ(rc.status, 1);
  EXPECT_TRUE(one_line(rc)) << rc.err;
  EXPECT_NE(rc.err.find("moelab: error: " + bad_chat + ":1: messages[1] is \"user\" where the chat template needs"),
            std::string::npos)
      << rc.err;

  // A folder as --data, a missing --eval-data: one line naming the path.
  args = base_args(dir.file("o2"), 2);
  args[std::find(args.begin(), args.end(), "--data") - args.begin() + 1] = dir.str();
  const auto d = moelab(args);
  EXPECT_EQ(d.status, 1);
  EXPECT_NE(d.err.find(dir.str() + ": training data is a directory"), std::string::npos) << d.err;
  args = base_args(dir.file("o3"), 2);
  args[std::find(args.begin(), args.end(), "--eval-data") - args.begin() + 1] = dir.file("nope.jsonl");
  const auto m = moelab(args);
  EXPECT_EQ(m.status, 1);
  EXPECT_TRUE(one_line(m)) << m.err;
  EXPECT_NE(m.err.find(dir.file("nope.jsonl")), std::string::npos) << m.err;

  // Options out of range are command-line mistakes (exit 2), one line naming the option.
  for (const auto& [opt, value] : std::vector<std::pair<std::string, std::string>>{
           {"--lora-r", "0"}, {"--lr-scheduler-type", "cosine_restarts"}, {"--warmup-ratio", "2"},
           {"--batch-size", "0"}, {"--lora-dropout", "1.5"}}) {
    auto a = base_args(dir.file("o4"), 2);
    a.insert(a.end(), {opt, value});
    const auto e = moelab(a);
    EXPECT_EQ(e.status, 2) << opt << ": " << e.err;
    EXPECT_TRUE(one_line(e)) << e.err;
    EXPECT_NE(e.err.find(opt == "--batch-size" ? "batch-size" : opt), std::string::npos) << e.err;
  }
  // A target module the model does not have.
  auto t = base_args(dir.file("o5"), 2);
  t.insert(t.end(), {"--lora-target-modules", "q_proj,qkv_proj"});
  const auto te = moelab(t);
  EXPECT_EQ(te.status, 1);
  EXPECT_NE(te.err.find("'qkv_proj' matches no Linear"), std::string::npos) << te.err;
  // An output folder with something in it is never trained into.
  fs::create_directories(dir.file("busy"));
  std::ofstream(dir.file("busy/keep.txt")) << "x";
  const auto busy = moelab(base_args(dir.file("busy"), 2));
  EXPECT_EQ(busy.status, 1);
  EXPECT_NE(busy.err.find("--output is not empty"), std::string::npos) << busy.err;
}

}  // namespace
}  // namespace moelab::test
