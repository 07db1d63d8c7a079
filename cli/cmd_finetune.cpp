// moelab finetune: QLoRA fine-tuning of LoRA factors on a 4-bit (NF4) base, as transformers' Trainer + trl's
// SFTTrainer + peft run it; option names and defaults are theirs (TrainingArguments, SFTConfig, LoraConfig).
// The loop is train/finetune.cpp; this file is its command line and the signal handling.
#include <fmt/format.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <filesystem>

#include "cli/commands.hpp"
#include "cli/engines.hpp"
#include "cli/options.hpp"
#include "core/checkpoint.hpp"
#include "core/error.hpp"
#include "core/lora.hpp"
#include "core/regular_file.hpp"
#include "train/finetune.hpp"

namespace moelab::cli {
namespace {

struct FinetuneArgs {
  train::FinetuneOptions o;
  std::string targets = "q_proj,k_proj,v_proj,o_proj";
  std::string scheduler = "linear";
  std::string base = "nf4";
};

std::atomic<bool> g_stop{false};

// The first SIGINT/SIGTERM asks the loop to stop after the current step (it writes a checkpoint first); the
// handler then steps aside, so a second one ends the process at once.
void on_signal(int sig) {
  g_stop = true;
  ::signal(sig, SIG_DFL);
}

void run(FinetuneArgs& a) {
  if (a.o.model.empty()) a.o.model = default_model_dir();
  if (a.o.data.empty()) {
    // The model's own corpus (the bundled model ships one): its training part, and its held-out part for the
    // evaluation unless --eval-data names another file.
    const std::filesystem::path corpus = std::filesystem::path(a.o.model) / "corpus";
    if (path_type(corpus / "train.jsonl.gz") == std::filesystem::file_type::not_found)
      throw Error(fmt::format("--data is required: {} has no corpus/train.jsonl.gz to default to", a.o.model));
    a.o.data = (corpus / "train.jsonl.gz").string();
    if (a.o.eval_data.empty() && path_type(corpus / "heldout.jsonl") != std::filesystem::file_type::not_found)
      a.o.eval_data = (corpus / "heldout.jsonl").string();
  }
  {
    const auto ck = Checkpoint::open(a.o.model);  // headers only: the config for "all"
    a.o.lora.target_modules = train::parse_target_modules(a.targets, ck->config());
  }
  a.o.schedule = train::parse_lr_schedule(a.scheduler);
  a.o.base.nf4 = a.base == "nf4";
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  const auto sum = train::run_finetune(a.o, &g_stop);
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  if (sum.interrupted) {
    std::printf("finetune: stopped by a signal after step %lld of %lld; checkpoint %s (continue with "
                "--resume-from-checkpoint %s)\n",
                (long long)sum.steps, (long long)sum.total_steps, sum.last_checkpoint.c_str(),
                sum.last_checkpoint.c_str());
    return;
  }
  std::string evals;
  if (!sum.evals.empty())
    evals = fmt::format("; held-out loss {:.4f} -> {:.4f}", sum.evals.front().loss, sum.evals.back().loss);
  std::printf("finetune: %lld steps in %.1f s (%.0f tokens/s; forward %.1f s, backward %.1f s, of which dequantizing "
              "the base %.1f s; optimizer %.2f s), peak RSS %.0f MiB, mean loss %.4f%s\n",
              (long long)(sum.steps - sum.start_step), sum.seconds,
              sum.seconds > 0 ? double(sum.tokens) / sum.seconds : 0.0, sum.forward_seconds, sum.backward_seconds,
              sum.dequantize_seconds, sum.optimizer_seconds, double(sum.peak_rss_bytes) / (1 << 20), sum.train_loss,
              evals.c_str());
  std::printf("wrote %s: the adapter (adapter_config.json, adapter_model.safetensors; use it with --adapter %s), "
              "train_log.csv, train_summary.json\n", a.o.output.c_str(), a.o.output.c_str());
}

}  // namespace

void register_finetune(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "finetune", "QLoRA fine-tuning: train a peft LoRA adapter on JSONL text over a 4-bit NF4 base (as peft + trl)");
  static FinetuneArgs a;
  auto& o = a.o;
  add_model_option(*cmd, o.model);
  cmd->add_option("--data", o.data,
                  "Training JSONL (or .jsonl.gz), one example a line, one kind a file (trl's): {\"text\": ...}, "
                  "{\"prompt\": ..., \"completion\": ...}, {\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]}, "
                  "or prompt/completion as message lists (chats use Mixtral-Instruct's [INST] template) "
                  "[default: the model's own corpus, MODEL/corpus/train.jsonl.gz, as the bundled model has]");
  cmd->add_option("--eval-data", o.eval_data,
                  "Held-out JSONL, same format: its loss before, during and after training [default with the model's "
                  "corpus: MODEL/corpus/heldout.jsonl]");
  cmd->add_option("--domain", o.data_options.domain,
                  "Use only the lines whose \"domain\" field is this (both --data and --eval-data)");
  add_output_option(*cmd, o.output,
                    "Output folder: the adapter, train_log.csv, train_summary.json, checkpoint-STEP/ (new or empty)")
      ->required();
  cmd->add_option("--resume-from-checkpoint", o.resume_from,
                  "Continue from OUTPUT/checkpoint-STEP with the same data and options (bit for bit)");
  // peft LoraConfig
  // The bound LoraAdapter::load reads: finetune never writes an adapter moelab would then refuse.
  cmd->add_option("--lora-r", o.lora.rank, "LoRA rank")->capture_default_str()->check(CLI::Range(1, kMaxLoraRank));
  cmd->add_option("--lora-alpha", o.lora.alpha, "LoRA alpha (scale alpha / r)")->capture_default_str();
  cmd->add_option("--lora-dropout", o.lora.dropout, "Dropout on the LoRA branch's input while training")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.999));
  cmd->add_option("--lora-target-modules", a.targets,
                  "Comma-separated module names (q_proj k_proj v_proj o_proj gate w1 w2 w3), or all")
      ->capture_default_str();
  cmd->add_flag("--use-rslora", o.lora.use_rslora, "Rank-stabilized LoRA: scale alpha / sqrt(r)");
  // transformers TrainingArguments
  cmd->add_option("--learning-rate", o.learning_rate, "Peak learning rate (AdamW)")->capture_default_str();
  cmd->add_option("--weight-decay", o.adam.weight_decay, "AdamW's decoupled weight decay")->capture_default_str();
  cmd->add_option("--adam-beta1", o.adam.beta1, "AdamW beta1")->capture_default_str();
  cmd->add_option("--adam-beta2", o.adam.beta2, "AdamW beta2")->capture_default_str();
  cmd->add_option("--adam-epsilon", o.adam.eps, "AdamW epsilon")->capture_default_str();
  cmd->add_option("--max-grad-norm", o.max_grad_norm, "Clip the gradients' total L2 norm to this (0: no clipping)")
      ->capture_default_str();
  cmd->add_option("--num-train-epochs", o.num_epochs, "Passes over --data (may be fractional)")->capture_default_str();
  cmd->add_option("--max-steps", o.max_steps, "Optimizer steps; > 0 overrides --num-train-epochs")->capture_default_str();
  cmd->add_option("--per-device-train-batch-size,--batch-size", o.batch_size, "Sequences per micro-batch")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  cmd->add_option("--per-device-eval-batch-size", o.eval_batch_size, "Sequences per held-out batch")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  cmd->add_option("--gradient-accumulation-steps", o.grad_accum, "Micro-batches per optimizer step")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  cmd->add_option("--lr-scheduler-type", a.scheduler, "linear, cosine, constant or constant_with_warmup")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "constant", "constant_with_warmup"}));
  cmd->add_option("--warmup-ratio", o.warmup_ratio, "Warmup as a fraction of the steps (ceil)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--warmup-steps", o.warmup_steps, "Warmup steps (> 0 overrides --warmup-ratio)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--logging-steps", o.logging_steps, "A progress line on stdout every N steps (the CSV log has every step)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--save-steps", o.save_steps, "A checkpoint every N steps and at the end (0: none)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--eval-steps", o.eval_steps, "Held-out loss every N steps (0: before and after training only)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_option("--seed", o.seed, "Seed of the LoRA init, the data order and the dropout masks")->capture_default_str();
  cmd->add_flag("--gradient-checkpointing", o.gradient_checkpointing,
                "Keep only each layer's input and recompute the layer in the backward (less memory, slower)");
  cmd->add_option("--router-aux-loss-coef", o.router_aux_coef,
                  "Add coef x Mixtral's load-balancing loss (transformers adds it only with output_router_logits; 0: off)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  // trl SFTConfig
  cmd->add_option("--max-seq-len", o.data_options.max_seq_len, "Truncate each example to this many tokens (trl max_length)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  cmd->add_option("--completion-only-loss", o.data_options.completion_only_loss,
                  "Prompt/completion data: learn only the completion (false: the prompt too)")
      ->capture_default_str();
  cmd->add_flag("--packing", o.data_options.packing,
                "Group whole examples into bins of at most --max-seq-len tokens (trl packing=True, best fit "
                "decreasing); a micro-batch is --batch-size bins, each example still attending only to itself");
  cmd->add_option("--base", a.base, "The frozen base: nf4 (QLoRA, bitsandbytes' NF4 with double quantization) or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"nf4", "f32"}));
  cmd->add_option("-t,--threads", o.threads, "Threads (0: all cores)")->check(threads_validator())->capture_default_str();
  add_progress_option(*cmd);
  cmd->callback([] { run(a); });
}

}  // namespace moelab::cli
