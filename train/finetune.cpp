// The training loop (see finetune.hpp): batches from the per-epoch order, accumulation, clipping, AdamW, the
// schedule, held-out evaluation, the CSV log, checkpoints, resume and the final adapter.
#include "train/finetune.hpp"

#include <fmt/format.h>
#include <sys/resource.h>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <utility>

#include "core/checkpoint.hpp"
#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "core/regular_file.hpp"
#include "core/safetensors.hpp"
#include "core/safetensors_writer.hpp"
#include "core/sha256.hpp"
#include "core/tokenizer.hpp"
#include "train/products.hpp"
#include "train/train_state.hpp"

namespace moelab::train {

namespace fs = std::filesystem;

std::vector<std::string> parse_target_modules(const std::string& list, const ModelConfig& cfg) {
  if (list == "all" || list == "all-linear") {
    if (cfg.is_moe()) return {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"};
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  }
  std::vector<std::string> out;
  std::string cur;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || list[i] == ',') {
      if (cur.empty()) throw Error(fmt::format("--lora-target-modules '{}': an empty name", list));
      out.push_back(cur);
      cur.clear();
    } else if (list[i] != ' ') {
      cur += list[i];
    }
  }
  return out;
}

std::string checkpoint_name(int64_t step) { return fmt::format("checkpoint-{}", step); }

namespace {

constexpr const char* kLogHeader = "step,epoch,loss,ce,aux,lr,grad_norm,tokens,tokens_per_s,elapsed_s,eval_loss\n";

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9e3779b97f4a7c15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The dropout seed of micro-batch `micro` of optimizer step `step`.
uint64_t dropout_seed(uint64_t seed, int64_t step, int64_t micro) {
  return mix(mix(seed, uint64_t(step)), uint64_t(micro));
}

void check_options(const FinetuneOptions& o) {
  if (o.batch_size < 1) throw Error(fmt::format("--batch-size {} must be at least 1", o.batch_size));
  if (o.grad_accum < 1) throw Error(fmt::format("--gradient-accumulation-steps {} must be at least 1", o.grad_accum));
  if (!(o.learning_rate > 0) || !std::isfinite(o.learning_rate))
    throw Error(fmt::format("--learning-rate {} must be positive", o.learning_rate));
  if (o.max_steps <= 0 && !(o.num_epochs > 0 && std::isfinite(o.num_epochs)))
    throw Error(fmt::format("--num-train-epochs {} must be positive and finite (or give --max-steps)", o.num_epochs));
  if (!(o.warmup_ratio >= 0 && o.warmup_ratio <= 1)) throw Error(fmt::format("--warmup-ratio {} is outside [0, 1]", o.warmup_ratio));
  if (o.warmup_steps < 0) throw Error("--warmup-steps must not be negative");
  if (!(o.adam.beta1 >= 0 && o.adam.beta1 < 1) || !(o.adam.beta2 >= 0 && o.adam.beta2 < 1))
    throw Error("--adam-beta1 and --adam-beta2 must be in [0, 1)");
  // torch.optim.AdamW refuses only eps < 0 and weight_decay < 0. Stricter here: eps = 0 divides 0 by 0 for a
  // value whose gradient has been exactly 0 so far (a fresh lora_A's, when lora_B starts at 0), and an infinite
  // eps or decay makes the update NaN; either would train a NaN adapter.
  if (!(o.adam.eps > 0 && std::isfinite(o.adam.eps)))
    throw Error(fmt::format("--adam-epsilon {} must be positive and finite", o.adam.eps));
  if (!(o.adam.weight_decay >= 0 && std::isfinite(o.adam.weight_decay)))
    throw Error(fmt::format("--weight-decay {} must be finite and not negative", o.adam.weight_decay));
  if (o.router_aux_coef < 0) throw Error("--router-aux-loss-coef must not be negative");
  if (o.eval_batch_size < 1) throw Error("--eval-batch-size must be at least 1");
}

// The base model's identity for the resume fingerprint, cheap (no pass over the weights): config.json's bytes,
// each shard's size and header (tensor names, dtypes, shapes, offsets), and 64 bytes at the start, middle and
// end of every tensor. Two checkpoints with the same shapes but other weights differ there (trained weights
// differ nearly everywhere); the folder's path is not part of it, so a moved model still resumes.
std::string base_model_identity(const Checkpoint& ck) {
  std::string h = read_regular_file((fs::path(ck.dir()) / "config.json").string(), "model config");
  for (const auto& shard : ck.shards()) {
    std::error_code ec;
    const auto size = fs::file_size(shard->path(), ec);
    h += fmt::format("\nshard {} {}\n", fs::path(shard->path()).filename().string(), ec ? 0 : size);
    for (const auto& [name, t] : shard->tensors()) {
      h += fmt::format("{} {} {} {} {}\n", name, dtype_name(t.dtype), shape_str(t.shape), t.begin, t.end);
      const auto bytes = shard->bytes(t);
      const size_t n = std::min<size_t>(64, bytes.size());
      for (const size_t at : {size_t(0), (bytes.size() - n) / 2, bytes.size() - n})
        h.append(reinterpret_cast<const char*>(bytes.data() + at), n);
    }
  }
  return sha256_hex(h);
}

// A hash of the tokenized training set (every sequence's tokens and targets, in file order): a resume on other
// text with the same counts would otherwise continue silently.
std::string train_data_sha256(const Dataset& train) {
  std::string h;
  for (const auto& seq : train.sequences) {
    const int64_t len = int64_t(seq.tokens.size());
    h.append(reinterpret_cast<const char*>(&len), sizeof len);
    h.append(reinterpret_cast<const char*>(seq.tokens.data()), seq.tokens.size() * sizeof(int32_t));
    h.append(reinterpret_cast<const char*>(seq.target.data()), seq.target.size());
  }
  return sha256_hex(h);
}

// The options a resumed run must share with the run that wrote the checkpoint (the step count may change, and
// so may the learning rate, the weight decay and the clipping: read_train_checkpoint says so).
nlohmann::json fingerprint(const FinetuneOptions& o, const Dataset& train, const std::string& model_identity) {
  std::vector<std::string> targets = o.lora.target_modules;
  std::sort(targets.begin(), targets.end());
  nlohmann::json fp = {
      {"train_sequences", int64_t(train.sequences.size())},
      {"train_tokens", train.tokens()},
      {"train_target_tokens", train.target_tokens()},
      {"batch_size", o.batch_size},
      {"gradient_accumulation_steps", o.grad_accum},
      {"seed", o.seed},
      {"learning_rate", o.learning_rate},
      {"lr_scheduler_type", lr_schedule_name(o.schedule)},
      {"warmup_steps", o.warmup_steps},
      {"warmup_ratio", o.warmup_ratio},
      {"max_grad_norm", o.max_grad_norm},
      {"adam_beta1", o.adam.beta1},
      {"adam_beta2", o.adam.beta2},
      {"adam_epsilon", o.adam.eps},
      {"weight_decay", o.adam.weight_decay},
      {"lora_r", o.lora.rank},
      {"lora_alpha", o.lora.alpha},
      {"lora_dropout", o.lora.dropout},
      {"use_rslora", o.lora.use_rslora},
      {"target_modules", targets},
      {"router_aux_loss_coef", o.router_aux_coef},
      {"nf4", o.base.nf4},
      {"base_model_identity", model_identity},
      {"train_data_sha256", train_data_sha256(train)},
  };
  // Only with --packing (the bins decide the batches), so checkpoints written before packing existed resume.
  if (o.data_options.packing) fp["train_units"] = int64_t(train.bins.size());
  return fp;
}

// Mean cross-entropy of the held-out set: every target token counted once, in batches, no dropout.
double eval_loss(LoraModel<float>& model, const Dataset& ds, const LoraParams<float>& params, int64_t batch_size) {
  const int64_t total = ds.target_tokens();
  LossOptions lo;
  lo.training = false;
  double ce = 0;
  const std::span<const TrainSequence> all(ds.sequences);
  for (size_t i = 0; i < all.size(); i += size_t(batch_size))
    ce += model.loss(all.subspan(i, std::min(all.size() - i, size_t(batch_size))), params, lo, total).ce;
  return ce;
}

// The process's peak resident set so far (Linux reports ru_maxrss in KiB).
int64_t peak_rss_bytes() {
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return int64_t(ru.ru_maxrss) * 1024;
}

std::string fmt_double(double v) { return std::isfinite(v) ? fmt::format("{:.9g}", v) : std::string(); }

void write_json_atomic(const fs::path& path, const nlohmann::ordered_json& j) {
  write_file_atomic(path.string(), j.dump(2) + "\n");
}

// A resume in the checkpoint's own folder continues that run from `step`: what the folder holds from later on
// (the final adapter and summary of a run that went further, its checkpoints past `step`) would otherwise sit
// beside the new run's files as if they were its own. They are moved, not deleted (a mistyped step must not
// throw work away), into OUT/superseded-at-step-STEP (-2, -3, ... when that exists), with a line saying so
// before anything moves. The checkpoint being resumed from stays where it is whatever its folder's name says.
void set_aside_later_outputs(const fs::path& out, int64_t step, const fs::path& resume_from) {
  std::vector<fs::path> later;
  std::error_code ec;
  for (const char* name : {"adapter_config.json", "adapter_model.safetensors", "train_summary.json"})
    if (fs::symlink_status(out / name, ec).type() != fs::file_type::not_found) later.push_back(out / name);
  for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("checkpoint-", 0) != 0) continue;
    const std::string digits = name.substr(11);
    if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    std::error_code same_ec;
    if (fs::equivalent(it->path(), resume_from, same_ec)) continue;
    if (std::stoll(digits) > step) later.push_back(it->path());
  }
  if (ec) throw Error(fmt::format("{}: cannot list the output folder: {}", out.string(), ec.message()));
  if (later.empty()) return;
  std::sort(later.begin(), later.end());
  fs::path aside = out / fmt::format("superseded-at-step-{}", step);
  for (int k = 2; path_type(aside) != fs::file_type::not_found; ++k) {  // path_type throws on a stat error
    if (k > 10000) throw Error(fmt::format("{}: 10000 superseded-at-step-{} folders already; remove some", out.string(), step));
    aside = out / fmt::format("superseded-at-step-{}-{}", step, k);
  }
  std::string names;
  for (const auto& p : later) names += (names.empty() ? "" : ", ") + p.filename().string();
  std::printf("finetune: resuming at step %lld in %s: moving the earlier run's outputs from after that step into %s "
              "(with a copy of its train_log.csv): %s\n",
              (long long)step, out.string().c_str(), aside.filename().string().c_str(), names.c_str());
  std::fflush(stdout);
  if (!fs::create_directory(aside, ec) || ec)
    throw Error(fmt::format("{}: cannot create it: {}", aside.string(), ec ? ec.message() : "it appeared meanwhile"));
  for (const auto& p : later) {
    fs::rename(p, aside / p.filename(), ec);
    if (ec) throw Error(fmt::format("{}: cannot move it into {}: {}", p.string(), aside.string(), ec.message()));
  }
  // The log is rewritten from the checkpoint's copy next: the later run's rows past its last checkpoint would
  // be lost, so its log is kept beside its other outputs.
  if (path_type(out / "train_log.csv") == fs::file_type::regular) {
    fs::copy_file(out / "train_log.csv", aside / "train_log.csv", ec);
    if (ec) throw Error(fmt::format("{}: cannot copy it into {}: {}", (out / "train_log.csv").string(), aside.string(),
                                    ec.message()));
  }
}

// A run that stops with an error before its first step is logged (std::bad_alloc, a non-finite loss or
// update at step 1, a non-finite held-out loss at step 0, ...) has written nothing but its log (the header and
// perhaps the step-0 held-out row, or a resume's copy of the checkpoint's log): it takes the log back, and the
// folders the run made for --output (all of new/a/b when none was there), so the same command with a fix goes
// into the same --output (the folder rule refused it before). A resume in the checkpoint's own folder keeps
// the log it rewrote. Once a step is logged, the log is the user's record and stays. (A process the kernel kills outright, as its out-of-memory
// killer does, runs no destructor: its log stays.)
class UndoOutputsOfAFailedStart {
 public:
  explicit UndoOutputsOfAFailedStart(fs::path log) : log_(std::move(log)) {}
  UndoOutputsOfAFailedStart(const UndoOutputsOfAFailedStart&) = delete;
  UndoOutputsOfAFailedStart& operator=(const UndoOutputsOfAFailedStart&) = delete;
  // Creates `out` folder by folder, remembering each one this call made (--output new/a/b makes three; new/../x
  // makes new, then x), so the undo removes exactly those and never a folder that was there.
  void create_folders(const fs::path& out) {
    fs::path p;
    for (const fs::path& part : out) {
      p /= part;
      if (part.empty() || part == "." || part == ".." || !p.has_relative_path()) continue;  // (or the root)
      std::error_code ec;
      if (fs::create_directory(p, ec)) made_.push_back(p);
      if (ec) throw Error(fmt::format("{}: cannot create the output folder: {}", out.string(), ec.message()));
    }
  }
  void keep() { armed_ = false; }
  ~UndoOutputsOfAFailedStart() {
    if (!armed_ || std::uncaught_exceptions() <= uncaught_at_start_) return;  // only when an error leaves the run
    std::error_code ec;  // best effort: the error being reported matters more than a file left behind
    fs::remove(log_, ec);
    for (auto it = made_.rbegin(); it != made_.rend(); ++it)  // innermost first; only while empty
      if (!fs::remove(*it, ec)) break;
  }

 private:
  fs::path log_;
  std::vector<fs::path> made_;
  bool armed_ = true;
  int uncaught_at_start_ = std::uncaught_exceptions();
};

}  // namespace

FinetuneSummary run_finetune(const FinetuneOptions& o, const std::atomic<bool>* stop) {
  check_options(o);
  const fs::path out(o.output);
  const bool resuming = !o.resume_from.empty();
  // --output is new or empty; a resume may also continue in the checkpoint's own folder (OUTPUT of
  // OUTPUT/checkpoint-STEP), and only there, so a resume never writes into a folder of something else.
  bool resume_in_place = false;
  // A mistyped checkpoint is that, not a folder-rule error (which would name the wrong problem), and is found
  // before --output is created (a failed resume left an empty new folder behind).
  if (resuming && path_type(o.resume_from) != fs::file_type::directory)
    throw Error(fmt::format("{}: --resume-from-checkpoint is not a checkpoint folder", o.resume_from));
  {
    std::error_code ec;
    const auto st = fs::symlink_status(out, ec);
    if (ec && st.type() != fs::file_type::not_found)
      throw Error(fmt::format("{}: --output: {}", out.string(), ec.message()));
    if (st.type() == fs::file_type::symlink)
      throw Error(fmt::format("{}: --output is a symbolic link; give the folder it points to, or a new folder",
                              out.string()));
    if (st.type() != fs::file_type::not_found) {
      if (st.type() != fs::file_type::directory)
        throw Error(fmt::format("{}: --output exists and is not a folder", out.string()));
      const bool empty = fs::is_empty(out, ec);
      if (ec) throw Error(fmt::format("{}: --output: {}", out.string(), ec.message()));
      if (resuming) {
        const fs::path ck_dir = fs::path(o.resume_from).lexically_normal();
        // (A trailing slash leaves an empty last name: its parent is then the checkpoint itself.)
        const fs::path ck_parent = (ck_dir.has_filename() ? ck_dir : ck_dir.parent_path()).parent_path();
        resume_in_place = fs::equivalent(ck_parent.empty() ? fs::path(".") : ck_parent, out, ec) && !ec;
      }
      if (!empty && !resume_in_place)
        throw Error(fmt::format("{}: --output is not empty; choose a new folder, or continue a run in it with "
                                "--resume-from-checkpoint {}/checkpoint-STEP{}", out.string(), out.string(),
                                resuming ? fmt::format(" (a resume writes into the checkpoint's own folder or a new "
                                                       "one; {} is in neither)", o.resume_from)
                                         : std::string()));
    }
  }
  const auto ck = Checkpoint::open(o.model, o.show_progress);
  const Tokenizer tok(ck->tokenizer_path());
  const Dataset train = load_dataset(o.data, tok, o.data_options);
  Dataset held_out;
  if (!o.eval_data.empty()) {
    DataOptions eo = o.data_options;
    held_out = load_dataset(o.eval_data, tok, eo);
  }
  const int64_t n = int64_t(train.bins.size());  // training units: one sequence each, or --packing's bins
  const int64_t micro_per_epoch = (n + o.batch_size - 1) / o.batch_size;
  const int64_t steps_per_epoch = (micro_per_epoch + o.grad_accum - 1) / o.grad_accum;
  // The epochs' step count is checked as a double before it becomes an integer (1e300 epochs would not fit).
  constexpr int64_t kMaxTotalSteps = int64_t(1) << 40;
  const double epoch_steps = std::ceil(o.num_epochs * double(steps_per_epoch));
  if (o.max_steps <= 0 && !(epoch_steps <= double(kMaxTotalSteps)))
    throw Error(fmt::format("--num-train-epochs {} makes {:.4g} steps of {} per epoch, more than {}", o.num_epochs,
                            epoch_steps, steps_per_epoch, kMaxTotalSteps));
  const int64_t total_steps = o.max_steps > 0 ? o.max_steps : std::max<int64_t>(1, int64_t(epoch_steps));
  LrSchedule schedule{o.schedule, warmup_steps_for(o.warmup_steps, o.warmup_ratio, total_steps), total_steps};

  LoraModel<float> model(*ck, o.base, o.threads);
  LoraParams<float> params = LoraParams<float>::init(ck->config(), o.lora, o.seed);
  const std::vector<ParamView> views = param_views(params);
  AdamW adam(o.adam);
  TrainCounters counters;
  const nlohmann::json print = fingerprint(o, train, base_model_identity(*ck));

  const fs::path log_path = out / "train_log.csv";
  UndoOutputsOfAFailedStart undo_failed_start(log_path);
  undo_failed_start.create_folders(out);
  if (resume_in_place) undo_failed_start.keep();
  if (resuming) {
    for (const auto& change : read_train_checkpoint(o.resume_from, views, adam, counters, print))
      std::printf("finetune: resuming with %s\n", change.c_str());
    if (counters.step > total_steps)
      throw Error(fmt::format("{}: the checkpoint is at step {}, past this run's {} steps",
                              (fs::path(o.resume_from) / "trainer_state.json").string(), counters.step, total_steps));
    if (resume_in_place) set_aside_later_outputs(out, counters.step, fs::path(o.resume_from));
    // The log continues from the checkpoint's copy: rows of steps after it (an earlier run went further) go.
    const fs::path saved_log = fs::path(o.resume_from) / "train_log.csv";
    std::error_code ec;
    const bool has_log = fs::exists(saved_log, ec);
    write_file_atomic(log_path.string(), has_log ? read_regular_file(saved_log.string(), "training log")
                                                 : std::string(kLogHeader));
  } else {
    write_file_atomic(log_path.string(), kLogHeader);
  }
  std::ofstream log(log_path, std::ios::app);
  if (!log) throw Error(fmt::format("{}: cannot open the training log for writing", log_path.string()));

  FinetuneSummary sum;
  sum.start_step = counters.step;
  sum.total_steps = total_steps;
  sum.trainable_parameters = params.parameter_count();
  for (const auto& e : counters.evals) sum.evals.push_back({e.at("step").get<int64_t>(), e.at("eval_loss").get<double>()});

  std::printf("finetune: %lld sequences (%lld tokens, %lld to learn) from %s; %lld steps (%lld per epoch) of %lld x %lld "
              "sequences; %lld trainable parameters (LoRA r=%d on %zu weights); warmup %lld\n",
              (long long)n, (long long)train.tokens(), (long long)train.target_tokens(), o.data.c_str(),
              (long long)total_steps, (long long)steps_per_epoch, (long long)o.batch_size, (long long)o.grad_accum,
              (long long)sum.trainable_parameters, o.lora.rank, params.params().size(), (long long)schedule.warmup_steps);
  if (train.truncated > 0)
    std::printf("finetune: %lld sequences cut to --max-seq-len %lld\n", (long long)train.truncated,
                (long long)o.data_options.max_seq_len);
  if (train.dropped_no_target > 0)
    std::printf("finetune: %lld examples skipped: no completion token within --max-seq-len\n",
                (long long)train.dropped_no_target);
  if (resuming) std::printf("finetune: resumed from %s at step %lld\n", o.resume_from.c_str(), (long long)counters.step);
  std::fflush(stdout);

  // What to do after a stop on a non-finite value: lower `what`, from the last good checkpoint where there is
  // one (a resume may change the learning rate, the weight decay and the clipping; read_train_checkpoint).
  const std::string resumed_from = resuming ? o.resume_from : std::string();
  auto lower = [&](const char* what) {
    const std::string& ck = sum.last_checkpoint.empty() ? resumed_from : sum.last_checkpoint;
    return ck.empty() ? fmt::format("; try a lower {}", what)
                      : fmt::format("; the last checkpoint is {}: resume from it with a lower {}", ck, what);
  };
  auto evaluate = [&](int64_t step) {
    if (held_out.sequences.empty()) return double(NAN);
    const double l = eval_loss(model, held_out, params, o.eval_batch_size);
    // A NaN or Inf would be written as null into trainer_state.json, which a resume then refuses: stop here,
    // as for the training loss.
    if (!std::isfinite(l))
      throw Error(fmt::format("the held-out loss on {} became {} at step {}{}", o.eval_data, l, step,
                              lower("--learning-rate")));
    counters.evals.push_back({{"step", step}, {"eval_loss", l}});
    sum.evals.push_back({step, l});
    std::printf("finetune: step %lld: held-out loss %.4f (%lld target tokens of %s)\n", (long long)step, l,
                (long long)held_out.target_tokens(), o.eval_data.c_str());
    std::fflush(stdout);
    return l;
  };
  if (!resuming) {
    const double l = evaluate(0);
    if (std::isfinite(l)) log << fmt::format("0,0,,,,,,0,,0,{}\n", fmt_double(l)) << std::flush;
  }
  auto save_checkpoint = [&](int64_t step) {
    const fs::path dir = out / checkpoint_name(step);
    log.flush();
    write_train_checkpoint(dir.string(), params, o.lora, o.model, adam, views, counters, print, log_path.string());
    sum.last_checkpoint = dir.string();
  };

  Progress progress("finetune", total_steps - counters.step, o.show_progress);
  sum.peak_rss_before_training_bytes = peak_rss_bytes();
  const auto t0 = std::chrono::steady_clock::now();
  const double elapsed_before = counters.elapsed_s;
  std::vector<int64_t> order;
  int64_t order_epoch = -1;
  double loss_sum = 0;
  LossOptions lo;
  lo.router_aux_coef = o.router_aux_coef;
  lo.lora_dropout = o.lora.dropout;  // peft applies it on the LoRA branch while training
  lo.gradient_checkpointing = o.gradient_checkpointing;
  while (counters.step < total_steps) {
    const int64_t s = counters.step;
    const int64_t epoch = s / steps_per_epoch, k = s % steps_per_epoch;
    if (epoch != order_epoch) {
      order = epoch_order(n, o.seed, epoch);
      order_epoch = epoch;
    }
    const int64_t micro_begin = k * o.grad_accum, micro_end = std::min(micro_begin + o.grad_accum, micro_per_epoch);
    // The accumulated batch's sequences and its target-token count (the normalizer of every micro-batch).
    std::vector<std::vector<TrainSequence>> micro;
    int64_t targets = 0, tokens = 0;
    for (int64_t m = micro_begin; m < micro_end; ++m) {
      auto& batch = micro.emplace_back();
      for (int64_t i = m * o.batch_size; i < std::min((m + 1) * o.batch_size, n); ++i)
        for (int64_t e : train.bins[size_t(order[size_t(i)])]) {
          const auto& seq = train.sequences[size_t(e)];
          batch.push_back(seq);
          tokens += int64_t(seq.tokens.size());
          for (uint8_t t : seq.target) targets += t != 0;
        }
    }
    double loss = 0, ce = 0, aux = 0;
    for (size_t m = 0; m < micro.size(); ++m) {
      lo.dropout_seed = dropout_seed(o.seed, s, int64_t(m));
      const LossResult r = model.loss_and_grad(micro[m], params, lo, targets);
      sum.forward_seconds += r.forward_s;
      sum.backward_seconds += r.backward_s;
      sum.dequantize_seconds += r.dequantize_s;
      loss += r.loss;
      ce += r.ce;
      aux += r.aux / double(micro.size());
    }
    const auto t_optimizer = std::chrono::steady_clock::now();
    const double grad_norm = clip_grad_norm(views, o.max_grad_norm);
    if (!std::isfinite(loss) || !std::isfinite(grad_norm))
      throw Error(fmt::format("the training loss became {} at step {} (gradient norm {}){}", loss, s + 1, grad_norm,
                              lower("--learning-rate")));
    const double lr = o.learning_rate * schedule.factor(s);
    adam.step(views, lr);
    // The update itself can overflow (a finite gradient and a huge step) where the loss and gradient were fine:
    // stop before anything of this step is written, so the last checkpoint stays the last good state and no
    // NaN adapter is ever saved as complete.
    for (const auto& v : views)
      for (size_t i = 0; i < v.value.size(); ++i)
        if (!std::isfinite(v.value[i]))
          throw Error(fmt::format("step {}: AdamW's update made {} element {} {} (learning rate {:.3g}); nothing of "
                                  "this step was written{}", s + 1, v.name, i, v.value[i], lr,
                                  lower("--learning-rate or --weight-decay")));
    params.zero_grad();
    sum.optimizer_seconds += seconds_since(t_optimizer);

    counters.step = s + 1;
    counters.epoch = double(epoch) + double(k + 1) / double(steps_per_epoch);
    counters.tokens += tokens;
    counters.target_tokens += targets;
    sum.tokens += tokens;
    sum.target_tokens += targets;
    loss_sum += loss;
    sum.last_loss = loss;
    const double run_s = seconds_since(t0);
    counters.elapsed_s = elapsed_before + run_s;
    const double tps = run_s > 0 ? double(sum.tokens) / run_s : 0;
    double el = NAN;
    const auto t_eval = std::chrono::steady_clock::now();
    if (!held_out.sequences.empty() && o.eval_steps > 0 && counters.step % o.eval_steps == 0 && counters.step < total_steps)
      el = evaluate(counters.step);
    if (!held_out.sequences.empty() && counters.step == total_steps) el = evaluate(counters.step);
    sum.eval_seconds += seconds_since(t_eval);
    log << fmt::format("{},{:.6g},{},{},{},{},{},{},{:.1f},{:.3f},{}\n", counters.step, counters.epoch, fmt_double(loss),
                       fmt_double(ce), fmt_double(aux), fmt_double(lr), fmt_double(grad_norm), counters.tokens, tps,
                       counters.elapsed_s, fmt_double(el));
    log.flush();
    undo_failed_start.keep();
    if (o.logging_steps > 0 && (counters.step % o.logging_steps == 0 || counters.step == total_steps)) {
      std::printf("step %lld/%lld  epoch %.2f  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tok/s\n", (long long)counters.step,
                  (long long)total_steps, counters.epoch, loss, lr, grad_norm, tps);
      std::fflush(stdout);
    }
    progress.set_detail(fmt::format("loss {:.3f}, {:.0f} tok/s", loss, tps));
    progress.advance();
    const bool stopping = stop && stop->load();
    if ((o.save_steps > 0 && (counters.step % o.save_steps == 0 || counters.step == total_steps)) ||
        (stopping && counters.step < total_steps))
      save_checkpoint(counters.step);
    if (stopping && counters.step < total_steps) {
      sum.interrupted = true;
      break;
    }
  }
  progress.finish();
  sum.steps = counters.step;
  sum.epochs = counters.epoch;
  sum.seconds = seconds_since(t0);
  sum.peak_rss_bytes = peak_rss_bytes();
  sum.train_loss = counters.step > sum.start_step ? loss_sum / double(counters.step - sum.start_step) : 0;
  sum.completed = counters.step == total_steps;
  if (sum.completed) params.save(out.string(), o.lora, o.model);

  nlohmann::ordered_json j;
  j["model"] = o.model;
  j["data"] = o.data;
  j["eval_data"] = o.eval_data;
  j["completed"] = sum.completed;
  j["interrupted"] = sum.interrupted;
  j["resumed_from"] = o.resume_from;
  j["start_step"] = sum.start_step;
  j["steps"] = sum.steps;
  j["total_steps"] = total_steps;
  j["epochs"] = sum.epochs;
  j["train_loss"] = sum.train_loss;
  j["last_loss"] = sum.last_loss;
  j["tokens"] = sum.tokens;
  j["target_tokens"] = sum.target_tokens;
  j["train_seconds"] = sum.seconds;
  j["tokens_per_s"] = sum.seconds > 0 ? double(sum.tokens) / sum.seconds : 0.0;
  j["forward_seconds"] = sum.forward_seconds;
  j["backward_seconds"] = sum.backward_seconds;
  j["optimizer_seconds"] = sum.optimizer_seconds;
  j["dequantize_seconds"] = sum.dequantize_seconds;
  j["eval_seconds"] = sum.eval_seconds;
  j["peak_rss_bytes"] = sum.peak_rss_bytes;
  j["peak_rss_before_training_bytes"] = sum.peak_rss_before_training_bytes;
  j["threads"] = model.threads();
  // What the products ran on: OpenBLAS's kernel set for the frozen weights' products, and the SIMD Eigen was
  // compiled for (the LoRA factors' small products, attention, norms).
  j["blas_kernels"] = Products::blas_kernels();
  j["simd"] = Eigen::SimdInstructionSetsInUse();
  j["trainable_parameters"] = sum.trainable_parameters;
  j["eval"] = nlohmann::json::array();
  for (const auto& e : sum.evals) j["eval"].push_back({{"step", e.step}, {"eval_loss", e.loss}});
  j["last_checkpoint"] = sum.last_checkpoint;
  j["adapter"] = sum.completed ? out.string() : std::string();
  j["options"] = print;
  write_json_atomic(out / "train_summary.json", j);
  return sum;
}

}  // namespace moelab::train
