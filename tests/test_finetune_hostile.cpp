// `moelab finetune` and `moelab demo` on hostile input (the twelfth session's review): a damaged trainer state,
// options that make AdamW's update non-finite, a resume into someone else's folder or beside a later run's
// outputs, another model or other data under the same checkpoint, epochs that do not fit, paths the filesystem
// refuses, and a demo folder the demo did not write. Each gets one line naming the file and exit status 1, and
// nothing of anyone else's is overwritten or removed. Runs the real binary on a small fixture model.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <tuple>
#include <nlohmann/json.hpp>

#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "moelab_run_fixture.hpp"
#include "process_util.hpp"

namespace moelab::test {
namespace {

namespace fs = std::filesystem;
const std::string kModel = std::string(MOELAB_FIXTURES) + "/models/mixtral-4e-gqa-f32";

bool one_line(const MoelabRun& r) { return std::count(r.err.begin(), r.err.end(), '\n') == 1; }

class FinetuneHostile : public MoelabRunsInATempDir {
 protected:
  FinetuneHostile() : MoelabRunsInATempDir("moelab-finetune-hostile") {}
  std::string data;
  void SetUp() override {
    std::string text;
    for (int i = 0; i < 8; ++i)
      text += fmt::format("{{\"text\": \"Ticket {} is filed under shelf Q-{} in the zebra archive.\"}}\n", 100 + i, 7 * i);
    data = write("train.jsonl", text);
  }
  std::vector<std::string> args(const std::string& out, int steps, const std::string& model = kModel) const {
    return {"finetune", "--model", model, "--data", data, "-o", out, "--max-steps", std::to_string(steps),
            "--batch-size", "2", "--max-seq-len", "32", "--save-steps", "1", "--threads", "1", "--progress", "none"};
  }
  static std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& more) {
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  // A copy of `checkpoint` whose trainer_state.json has been changed by `edit`.
  std::string edited_checkpoint(const std::string& checkpoint, const std::string& name,
                                const std::function<void(nlohmann::json&)>& edit) {
    const fs::path copy = dir.path() / "edited" / name / "checkpoint-1";
    fs::create_directories(copy.parent_path());
    fs::copy(checkpoint, copy, fs::copy_options::recursive);
    auto j = nlohmann::json::parse(read_file_bytes(copy / "trainer_state.json"));
    edit(j);
    std::ofstream(copy / "trainer_state.json") << j.dump();
    return copy.string();
  }
};

// Negative or impossible counters, evaluations of the wrong shape, AdamW step counts outside 0 to the
// checkpoint's, a negative second moment: one line naming the file; before, a step of -1 crashed (SIGSEGV),
// a wrong "evals" ended in an internal error, and the AdamW values trained a NaN adapter reported complete.
TEST_F(FinetuneHostile, DamagedTrainerStateIsOneErrorNamingIt) {
  const std::string run = dir.file("run");
  ASSERT_EQ(moelab(args(run, 2)).status, 0);
  const std::string good = run + "/checkpoint-1";
  const std::vector<std::pair<std::string, std::function<void(nlohmann::json&)>>> cases = {
      {"step-minus-1", [](nlohmann::json& j) { j["step"] = -1; }},
      {"step-min", [](nlohmann::json& j) { j["step"] = std::numeric_limits<int64_t>::min(); }},
      {"step-fraction", [](nlohmann::json& j) { j["step"] = 1.5; }},
      {"tokens-negative", [](nlohmann::json& j) { j["tokens"] = -5; }},
      {"fingerprint-not-object", [](nlohmann::json& j) { j["fingerprint"] = nlohmann::json::array({1}); }},
      {"evals-number-list", [](nlohmann::json& j) { j["evals"] = nlohmann::json::array({1}); }},
      {"evals-string", [](nlohmann::json& j) { j["evals"] = "abc"; }},
      {"evals-null-loss", [](nlohmann::json& j) { j["evals"] = {{{"step", 0}, {"eval_loss", nullptr}}}; }},
      {"evals-no-step", [](nlohmann::json& j) { j["evals"] = {{{"eval_loss", 1.0}}}; }},
      {"adamw-steps-minus-1", [](nlohmann::json& j) { for (auto& [k, v] : j["adamw_steps"].items()) v = -1; }},
      {"adamw-steps-past-the-step", [](nlohmann::json& j) { for (auto& [k, v] : j["adamw_steps"].items()) v = 2; }},
      {"nested-past-16-levels", [](nlohmann::json& j) {
         nlohmann::json deep = 1;
         for (int i = 0; i < 20; ++i) deep = nlohmann::json::array({deep});
         j["extra"] = deep;
       }},
  };
  for (const auto& [name, edit] : cases) {
    const std::string ck = edited_checkpoint(good, name, edit);
    const auto r = moelab(with(args(dir.file("out-" + name), 2), {"--resume-from-checkpoint", ck}));
    EXPECT_EQ(r.status, 1) << name << ": " << r.err;
    EXPECT_TRUE(one_line(r)) << name << ": " << r.err;
    EXPECT_NE(r.err.find("moelab: error: " + ck + "/trainer_state.json: "), std::string::npos) << name << ": " << r.err;
    EXPECT_FALSE(fs::exists(dir.file("out-" + name) + "/adapter_model.safetensors")) << name;
  }
  // Sets the first element of every optimizer tensor whose name starts with `prefix` to `value`.
  auto edit_moments = [](const std::string& ck_dir, const std::string& prefix, float value) {
    const std::string path = ck_dir + "/optimizer.safetensors";
    std::vector<std::vector<float>> values;
    std::vector<std::string> names;
    std::map<std::string, std::string> meta;
    {
      const SafetensorsFile f(path);
      meta = f.metadata();
      for (const auto& [name, t] : f.tensors()) {
        names.push_back(name);
        values.push_back(f.read_f32(name));
        if (name.rfind(prefix, 0) == 0 && values.back().size() > 0) values.back()[0] = value;
      }
    }
    std::vector<TensorToWrite> tensors;
    for (size_t i = 0; i < names.size(); ++i)
      tensors.push_back(make_f32_tensor(names[i], {int64_t(values[i].size())}, values[i].data()));
    write_safetensors(path, tensors, meta);
  };
  // A first moment of 3e38 (finite, as the reader requires): the resumed step's update overflows. The new
  // folder the resume made (with its copy of the checkpoint's log) is taken back, as for a fresh run.
  {
    const std::string huge = edited_checkpoint(good, "huge-exp-avg", [](nlohmann::json&) {});
    edit_moments(huge, "exp_avg.", 3e38f);
    const std::string out = dir.file("out-huge-exp-avg");
    const auto h = moelab(with(args(out, 2), {"--resume-from-checkpoint", huge}));
    EXPECT_EQ(h.status, 1) << h.err;
    EXPECT_NE(h.err.find("step 2: AdamW's update made"), std::string::npos) << h.err;
    EXPECT_FALSE(fs::exists(out)) << "the resume made " << out << " and should have taken it back";
  }
  // A negative second moment in optimizer.safetensors (finite, so the reader's own check passes it).
  const std::string ck = edited_checkpoint(good, "negative-exp-avg-sq", [](nlohmann::json&) {});
  edit_moments(ck, "exp_avg_sq.", -1.0f);
  const auto r = moelab(with(args(dir.file("out-negative"), 2), {"--resume-from-checkpoint", ck}));
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_TRUE(one_line(r)) << r.err;
  EXPECT_NE(r.err.find("a second moment is never negative"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(ck + "/optimizer.safetensors: "), std::string::npos) << "names the file: " << r.err;
  // Step counts of 0 (a tensor that never had a gradient, as an unrouted expert's factors) with moments that
  // are not zero: the two files disagree.
  const std::string zero = edited_checkpoint(good, "adamw-steps-zero",
                                             [](nlohmann::json& j) { for (auto& [k, v] : j["adamw_steps"].items()) v = 0; });
  const auto z = moelab(with(args(dir.file("out-zero"), 2), {"--resume-from-checkpoint", zero}));
  EXPECT_EQ(z.status, 1) << z.err;
  EXPECT_TRUE(one_line(z)) << z.err;
  EXPECT_NE(z.err.find(zero + "/optimizer.safetensors: "), std::string::npos) << z.err;
  EXPECT_NE(z.err.find("has taken no step but its moments are not zero"), std::string::npos) << z.err;
  EXPECT_FALSE(fs::exists(dir.file("out-negative") + "/adapter_model.safetensors"));
}

// --adam-epsilon 0 (0/0 on a gradient that has been exactly 0) and a non-finite --weight-decay are refused up
// front; a finite decay so large the update overflows stops at that step with one line, and writes no adapter
// (before: exit 0, "completed": true, a NaN adapter).
TEST_F(FinetuneHostile, AdamWOptionsAndANonFiniteUpdate) {
  for (const auto& [opt, value, want] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"--adam-epsilon", "0", "--adam-epsilon 0 must be positive and finite"},
           {"--adam-epsilon", "inf", "--adam-epsilon inf must be positive and finite"},
           {"--weight-decay", "inf", "--weight-decay inf must be finite and not negative"},
           {"--weight-decay", "nan", "--weight-decay nan must be finite and not negative"}}) {
    const std::string out = dir.file("opt" + std::to_string(runs_));
    const auto r = moelab(with(args(out, 1), {opt, value}));
    EXPECT_EQ(r.status, 1) << opt << " " << value << ": " << r.err;
    EXPECT_TRUE(one_line(r)) << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out + "/adapter_model.safetensors"));
  }
  const std::string out = dir.file("overflow");
  const auto r = moelab(with(args(out, 1), {"--weight-decay", "1e300", "--learning-rate", "1e-3"}));
  EXPECT_EQ(r.status, 1) << r.err << r.out;
  EXPECT_TRUE(one_line(r)) << r.err;
  EXPECT_NE(r.err.find("step 1: AdamW's update made"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--weight-decay"), std::string::npos) << "the advice names the decay too: " << r.err;
  EXPECT_FALSE(fs::exists(out + "/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(out + "/train_summary.json"));
  EXPECT_FALSE(fs::exists(out + "/checkpoint-1"));
  // Nothing of a run that stopped before its first step stays behind (its log held only a header), so the same
  // command with a sane decay goes into the same folder; a folder that was there and empty is left empty.
  EXPECT_FALSE(fs::exists(out)) << "the run made " << out << " and should have taken it back";
  fs::create_directories(dir.file("was-empty"));
  const auto e = moelab(with(args(dir.file("was-empty"), 1), {"--weight-decay", "1e300", "--learning-rate", "1e-3"}));
  EXPECT_EQ(e.status, 1) << e.err;
  EXPECT_TRUE(fs::is_directory(dir.file("was-empty")));
  EXPECT_TRUE(fs::is_empty(dir.file("was-empty")));
  const auto retry = moelab(args(out, 1));
  EXPECT_EQ(retry.status, 0) << retry.err;
  EXPECT_TRUE(fs::exists(out + "/adapter_model.safetensors"));
  // Every folder the run made on the way is taken back (before: only the last of new/a/b), none that was there
  // (the empty folders e and e/kept), also through a ".." (new/../x makes new and x; new/../kept makes new only).
  fs::create_directories(dir.file("e") + "/kept");
  for (const std::string& o : {dir.file("e") + "/new/a/b/", dir.file("e") + "/new/../x/a", dir.file("e") + "/new/../kept/a"}) {
    const auto nested = moelab(with(args(o, 1), {"--weight-decay", "1e300", "--learning-rate", "1e-3"}));
    EXPECT_EQ(nested.status, 1) << nested.err;
    EXPECT_TRUE(fs::is_directory(dir.file("e") + "/kept")) << o << " removed a folder it did not make";
    EXPECT_TRUE(fs::is_empty(dir.file("e") + "/kept")) << o;
    EXPECT_EQ(std::distance(fs::directory_iterator(dir.file("e")), fs::directory_iterator()), 1) << o << " left folders behind";
  }
}

// A held-out loss that becomes NaN stops the run at that step with one line naming the data and the last
// checkpoint (a NaN would be written as null into trainer_state.json, which a resume refuses). The steps
// before it stay: their log rows and their checkpoint, which resumes; no adapter or summary is written as if
// the run had ended. Learning rate 0 at step 1 (warmup), then 5e29: every lora_B element moves by about
// the learning rate, so the layer outputs overflow FP32 and the RMSNorm that follows makes inf / inf.
TEST_F(FinetuneHostile, ANonFiniteHeldOutLossStopsAtThatStep) {
  const std::string held = write("held.jsonl", "{\"text\": \"Ticket 301 is filed under shelf Q-9.\"}\n");
  const std::string out = dir.file("held-out");
  const auto r = moelab(with(args(out, 3), {"--eval-data", held, "--eval-steps", "1", "--warmup-steps", "2",
                                            "--learning-rate", "1e30"}));
  EXPECT_EQ(r.status, 1) << r.err << r.out;
  EXPECT_TRUE(one_line(r)) << r.err;
  EXPECT_NE(r.err.find("the held-out loss on " + held + " became"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("nan at step 2; the last checkpoint is " + out + "/checkpoint-1: resume from it with a lower "
                       "--learning-rate"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("step 1: held-out loss"), std::string::npos) << r.out;
  const std::string log = read_file_bytes(fs::path(out) / "train_log.csv");
  EXPECT_NE(log.find("\n1,"), std::string::npos) << log;
  EXPECT_EQ(log.find("\n2,"), std::string::npos) << "step 2 is not logged: " << log;
  EXPECT_FALSE(fs::exists(out + "/checkpoint-2"));
  EXPECT_FALSE(fs::exists(out + "/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(out + "/train_summary.json"));
  const auto state = nlohmann::json::parse(read_file_bytes(fs::path(out) / "checkpoint-1" / "trainer_state.json"));
  EXPECT_EQ(state.dump().find("null"), std::string::npos) << state.dump();
  // The checkpoint it names resumes with a lower learning rate, as the line advises, and says so; the options
  // that decide the data order, the masks or the shapes still may not change.
  const std::vector<std::string> resume = {"--eval-data", held, "--eval-steps", "1", "--warmup-steps", "2",
                                           "--resume-from-checkpoint", out + "/checkpoint-1"};
  const auto other_seed = moelab(with(with(args(out, 3), resume), {"--learning-rate", "1e-3", "--seed", "7"}));
  EXPECT_EQ(other_seed.status, 1) << other_seed.err;
  EXPECT_NE(other_seed.err.find("the checkpoint was trained with seed = 42, this run has 7"), std::string::npos)
      << other_seed.err;
  const auto resumed = moelab(with(with(args(out, 3), resume), {"--learning-rate", "1e-3", "--max-grad-norm", "0.5"}));
  EXPECT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.out.find("finetune: resuming with learning_rate = 0.001 (the checkpoint's run had 1e+30)\n"),
            std::string::npos) << resumed.out;
  EXPECT_NE(resumed.out.find("finetune: resuming with max_grad_norm = 0.5 (the checkpoint's run had 1.0)\n"),
            std::string::npos) << resumed.out;
  EXPECT_TRUE(fs::exists(out + "/adapter_model.safetensors"));
  const auto ck3 = nlohmann::json::parse(read_file_bytes(fs::path(out) / "checkpoint-3" / "trainer_state.json"));
  EXPECT_EQ(ck3.at("fingerprint").at("learning_rate"), 1e-3) << "a later resume compares with the new rate";
}

// A resume writes into the checkpoint's own folder or a new one, never into another folder with files in it;
// in its own folder, the final adapter, the summary and the checkpoints of a run that went further are moved
// aside (with a line naming them) so they never sit beside the new run's files. A mistyped checkpoint is said to
// be one (it was reported as the folder rule's "not empty").
TEST_F(FinetuneHostile, ResumeOnlyInItsOwnFolderAndNeverBesideALaterRunsOutputs) {
  const std::string run = dir.file("run");
  ASSERT_EQ(moelab(args(run, 3)).status, 0);
  ASSERT_TRUE(fs::exists(run + "/checkpoint-3") && fs::exists(run + "/adapter_model.safetensors"));
  // Someone else's folder.
  const std::string victim = dir.file("victim");
  fs::create_directories(victim);
  std::ofstream(victim + "/train_log.csv") << "precious\n";
  std::ofstream(victim + "/adapter_config.json") << "{\"precious\": true}\n";
  const auto v = moelab(with(args(victim, 3), {"--resume-from-checkpoint", run + "/checkpoint-1"}));
  EXPECT_EQ(v.status, 1) << v.err;
  EXPECT_TRUE(one_line(v)) << v.err;
  EXPECT_NE(v.err.find(victim + ": --output is not empty"), std::string::npos) << v.err;
  EXPECT_EQ(read_file_bytes(fs::path(victim) / "train_log.csv"), "precious\n");
  EXPECT_EQ(read_file_bytes(fs::path(victim) / "adapter_config.json"), "{\"precious\": true}\n");
  const auto typo = moelab(with(args(victim, 3), {"--resume-from-checkpoint", run + "/checkpoint-99"}));
  EXPECT_EQ(typo.status, 1) << typo.err;
  EXPECT_TRUE(one_line(typo)) << typo.err;
  EXPECT_NE(typo.err.find(run + "/checkpoint-99: --resume-from-checkpoint is not a checkpoint folder"), std::string::npos)
      << typo.err;
  EXPECT_EQ(read_file_bytes(fs::path(victim) / "train_log.csv"), "precious\n");
  // Into a new folder: refused before the folder is made (a failed resume left it behind, empty).
  const std::string fresh = dir.file("fresh-out");
  const auto typo_new = moelab(with(args(fresh, 3), {"--resume-from-checkpoint", run + "/checkpoint-99"}));
  EXPECT_EQ(typo_new.status, 1) << typo_new.err;
  EXPECT_FALSE(fs::exists(fresh));
  // Its own folder (given with a trailing slash): the later run's outputs are moved aside first, nothing deleted.
  // No checkpoint is saved by this run (--save-steps 0), so every checkpoint left at the top is from before step 1.
  const std::string adapter_before = read_file_bytes(fs::path(run) / "adapter_model.safetensors");
  auto a = with(args(run, 2), {"--resume-from-checkpoint", run + "/checkpoint-1/"});
  a[std::find(a.begin(), a.end(), "--save-steps") - a.begin() + 1] = "0";
  const auto r = moelab(a);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("finetune: resuming at step 1 in " + run + ": moving the earlier run's outputs from after that "
                       "step into superseded-at-step-1 (with a copy of its train_log.csv): adapter_config.json, "
                       "adapter_model.safetensors, checkpoint-2, checkpoint-3, train_summary.json"),
            std::string::npos)
      << r.out;
  EXPECT_TRUE(fs::exists(run + "/checkpoint-1"));
  EXPECT_FALSE(fs::exists(run + "/checkpoint-2"));
  EXPECT_FALSE(fs::exists(run + "/checkpoint-3"));
  EXPECT_TRUE(fs::exists(run + "/superseded-at-step-1/checkpoint-2/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(run + "/superseded-at-step-1/checkpoint-3/adapter_model.safetensors"));
  EXPECT_EQ(read_file_bytes(fs::path(run) / "superseded-at-step-1" / "adapter_model.safetensors"), adapter_before);
  EXPECT_NE(read_file_bytes(fs::path(run) / "superseded-at-step-1" / "train_log.csv").find("\n3,"), std::string::npos)
      << "the later run's log, with its step 3";
  const auto sum = nlohmann::json::parse(read_file_bytes(fs::path(run) / "train_summary.json"));
  EXPECT_EQ(sum["steps"], 2);
  EXPECT_EQ(sum["total_steps"], 2);
}

// The checkpoint resumed from is never moved, whatever its folder's name says: checkpoint-1 renamed
// checkpoint-10 and resumed from (its state says step 1) was deleted as "later than step 1", and the log,
// read from it afterwards, silently restarted. A second resume moves into a numbered sibling.
TEST_F(FinetuneHostile, ResumeNeverMovesTheCheckpointItResumesFrom) {
  const std::string run = dir.file("run");
  ASSERT_EQ(moelab(args(run, 3)).status, 0);
  fs::rename(run + "/checkpoint-1", run + "/checkpoint-10");
  auto a = with(args(run, 3), {"--resume-from-checkpoint", run + "/checkpoint-10"});
  a[std::find(a.begin(), a.end(), "--save-steps") - a.begin() + 1] = "0";
  const auto r = moelab(a);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(run + "/checkpoint-10/trainer_state.json"));
  EXPECT_TRUE(fs::exists(run + "/superseded-at-step-1/checkpoint-2"));
  const std::string log = read_file_bytes(fs::path(run) / "train_log.csv");
  EXPECT_NE(log.find("\n1,"), std::string::npos) << "the step-1 row from the checkpoint's log is gone:\n" << log;
  // Again from the same checkpoint: the run just finished is set aside beside the first one.
  const auto again = moelab(a);
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_TRUE(fs::exists(run + "/superseded-at-step-1-2/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(run + "/superseded-at-step-1/checkpoint-2"));
}

// The fingerprint holds the base model's identity and the tokenized data's hash: a model with the same shapes
// but other weights, or the same lines in another order (every count equal), is refused naming what differs.
TEST_F(FinetuneHostile, ResumeNoticesAnotherModelOrOtherData) {
  const std::string run = dir.file("run");
  ASSERT_EQ(moelab(args(run, 2)).status, 0);
  const std::string ck = run + "/checkpoint-1";
  // The same model copied elsewhere resumes (the path is not part of its identity).
  const std::string copy = dir.file("model-copy");
  fs::copy(kModel, copy, fs::copy_options::recursive);
  const auto same = moelab(with(args(dir.file("same"), 2, copy), {"--resume-from-checkpoint", ck}));
  EXPECT_EQ(same.status, 0) << same.err;
  // One weight's lowest mantissa byte changed: the same shapes, another model.
  {
    std::string bytes = read_file_bytes(fs::path(copy) / "model.safetensors");
    uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    bytes[8 + header] = char(bytes[8 + header] ^ 1);
    std::ofstream(fs::path(copy) / "model.safetensors", std::ios::binary | std::ios::trunc) << bytes;
  }
  const auto m = moelab(with(args(dir.file("other-model"), 2, copy), {"--resume-from-checkpoint", ck}));
  EXPECT_EQ(m.status, 1) << m.err;
  EXPECT_TRUE(one_line(m)) << m.err;
  EXPECT_NE(m.err.find("the checkpoint was trained with base_model_identity = "), std::string::npos) << m.err;
  // The same lines in reverse order.
  std::string text = read_file_bytes(data), reversed;
  std::vector<std::string> lines;
  for (size_t p = 0, e; p < text.size(); p = e + 1) lines.push_back(text.substr(p, (e = text.find('\n', p)) - p + 1));
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) reversed += *it;
  data = write("reversed.jsonl", reversed);
  const auto d = moelab(with(args(dir.file("other-data"), 2), {"--resume-from-checkpoint", ck}));
  EXPECT_EQ(d.status, 1) << d.err;
  EXPECT_TRUE(one_line(d)) << d.err;
  EXPECT_NE(d.err.find("the checkpoint was trained with train_data_sha256 = "), std::string::npos) << d.err;
}

// --num-train-epochs that is not finite, or makes more steps than fit, is one line (before: 1e300 and inf
// silently trained one step, an out-of-range float-to-integer conversion).
TEST_F(FinetuneHostile, EpochsMustBeFiniteAndFit) {
  for (const auto& [epochs, want] : std::vector<std::pair<std::string, std::string>>{
           {"inf", "--num-train-epochs inf must be positive and finite"},
           {"nan", "--num-train-epochs nan must be positive and finite"},
           {"1e300", "--num-train-epochs 1e+300 makes 4e+300 steps of 4 per epoch, more than 1099511627776"}}) {
    const std::string out = dir.file("epochs" + std::to_string(runs_));
    auto a = args(out, 1);
    const auto at = std::find(a.begin(), a.end(), "--max-steps") - a.begin();
    a.erase(a.begin() + at, a.begin() + at + 2);
    const auto r = moelab(with(a, {"--num-train-epochs", epochs}));
    EXPECT_EQ(r.status, 1) << epochs << ": " << r.err;
    EXPECT_TRUE(one_line(r)) << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << r.err;
  }
}

// Paths the filesystem refuses are one line naming the path, not a standard-library exception: an output
// under a file, a symbolic-link loop as the checkpoint; a symbolic link as --output is named as one.
TEST_F(FinetuneHostile, PathsTheFilesystemRefusesAreOneLine) {
  const std::string file = write("afile", "x");
  const auto under = moelab(args(file + "/sub", 1));
  EXPECT_EQ(under.status, 1) << under.err;
  EXPECT_TRUE(one_line(under)) << under.err;
  EXPECT_NE(under.err.find("moelab: error: " + file + "/sub: "), std::string::npos) << under.err;
  const std::string loop = dir.file("loop");
  fs::create_symlink(loop, loop);
  const auto l = moelab(with(args(dir.file("out-loop"), 1), {"--resume-from-checkpoint", loop}));
  EXPECT_EQ(l.status, 1) << l.err;
  EXPECT_TRUE(one_line(l)) << l.err;
  EXPECT_NE(l.err.find("moelab: error: " + loop + ": cannot be read (Too many levels of symbolic links)"), std::string::npos)
      << l.err;
  EXPECT_FALSE(fs::exists(dir.file("out-loop")));  // checked before the output folder is made
  fs::create_directories(dir.file("empty"));
  fs::create_directory_symlink(dir.file("empty"), dir.file("link"));
  const auto s = moelab(args(dir.file("link"), 1));
  EXPECT_EQ(s.status, 1) << s.err;
  EXPECT_NE(s.err.find(dir.file("link") + ": --output is a symbolic link"), std::string::npos) << s.err;
}

// The demo replaces its own earlier outputs only: a folder with files no demo wrote is refused before anything
// runs, and they stay (before: OUT/finetune was removed whole).
TEST_F(FinetuneHostile, DemoNeverRemovesAFolderItDidNotWrite) {
  const std::string out = dir.file("demo");
  fs::create_directories(out + "/finetune");
  std::ofstream(out + "/finetune/precious.txt") << "important\n";
  const auto r = moelab({"demo", "--model", kModel, "--finetune-data", data, "--finetune-domain", "", "--finetune-steps",
                         "1", "--hellaswag-items", "1", "-o", out, "--no-plots", "--threads", "1"});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_TRUE(one_line(r)) << r.err;
  EXPECT_NE(r.err.find(out + ": --output holds files no demo wrote"), std::string::npos) << r.err;
  EXPECT_EQ(read_file_bytes(fs::path(out) / "finetune/precious.txt"), "important\n");
  // A file as --output: one line, not a filesystem exception.
  const auto f = moelab({"demo", "--model", kModel, "-o", write("afile", "x") + "/sub", "--no-plots"});
  EXPECT_EQ(f.status, 1) << f.err;
  EXPECT_TRUE(one_line(f)) << f.err;
}

}  // namespace
}  // namespace moelab::test
