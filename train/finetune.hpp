#pragma once
// The QLoRA training loop behind `moelab finetune` (issue 15), as transformers' Trainer + trl's SFTTrainer run
// it for peft LoRA on a 4-bit base: micro-batches of --batch-size sequences, --grad-accum of them per
// optimizer step, the cross-entropy normalized by the target tokens of the whole accumulated batch,
// clip_grad_norm_, AdamW, a learning-rate schedule with warmup; a held-out loss now and then, a CSV log,
// checkpoints that resume bit for bit, and the final adapter in peft's format.
//
// Everything random is a function of (seed, step): the data order of epoch e is epoch_order(n, seed, e), the
// dropout masks of micro-batch m of step s come from a seed mixed from (seed, s, m). A checkpoint therefore
// only needs the step, the factors and the optimizer's moments to continue exactly as an uninterrupted run.
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "train/adamw.hpp"
#include "train/data.hpp"
#include "train/lora_model.hpp"
#include "train/schedule.hpp"

namespace moelab::train {

struct FinetuneOptions {
  std::string model;              // checkpoint folder (FP32/BF16 weights, quantized to NF4 here unless base.nf4 off)
  std::string data;               // training JSONL (data.hpp)
  std::string eval_data;          // held-out JSONL ("" = none)
  std::string output;             // the output folder
  std::string resume_from;        // OUTPUT/checkpoint-STEP to continue from ("" = start fresh)
  DataOptions data_options;
  LoraRecipe lora;
  BaseOptions base;
  AdamWConfig adam;
  double learning_rate = 2e-4;
  double max_grad_norm = 1.0;     // <= 0: no clipping
  double num_epochs = 1.0;
  int64_t max_steps = -1;         // > 0: overrides num_epochs (transformers' rule)
  int64_t batch_size = 8;         // sequences per micro-batch (per_device_train_batch_size)
  int64_t grad_accum = 1;         // micro-batches per optimizer step
  LrScheduleKind schedule = LrScheduleKind::Linear;
  int64_t warmup_steps = 0;
  double warmup_ratio = 0.0;
  int64_t logging_steps = 10;     // a console line every N steps (the CSV has every step)
  int64_t save_steps = 500;       // a checkpoint every N steps (0: none but the final adapter)
  int64_t eval_steps = 0;         // the held-out loss every N steps (0: before and after training only)
  int64_t eval_batch_size = 8;
  double router_aux_coef = 0.0;   // 0: off, as transformers does without output_router_logits
  bool gradient_checkpointing = false;
  uint64_t seed = 42;             // transformers' TrainingArguments.seed default
  int threads = 0;                // the trainer's pool, including the calling thread (0: the physical cores)
  bool show_progress = true;
};

struct EvalPoint {
  int64_t step = 0;
  double loss = 0;  // mean cross-entropy over the held-out target tokens (no dropout, no aux)
};

struct FinetuneSummary {
  int64_t start_step = 0, steps = 0, total_steps = 0;  // this run began at start_step and ended at steps
  double epochs = 0;
  bool interrupted = false;        // stopped by a signal (a checkpoint was written)
  bool completed = false;          // reached total_steps (the final adapter was written)
  double train_loss = 0;           // mean of the per-step losses of this run
  double last_loss = 0;
  int64_t tokens = 0, target_tokens = 0;  // processed by this run
  double seconds = 0;               // wall seconds of this run's loop (the model and data were loaded before)
  // Where the loop's seconds went (this run's steps): the micro-batches' forward and backward (LossResult's
  // split), the optimizer (clip_grad_norm_, AdamW, zero_grad), the held-out evaluations inside the loop. The
  // rest of `seconds` is batching, the log and checkpoints.
  double forward_seconds = 0, backward_seconds = 0, optimizer_seconds = 0, eval_seconds = 0;
  double dequantize_seconds = 0;  // of forward + backward: whole NF4 layers dequantized (0 when streamed)
  // The process's peak resident memory (getrusage ru_maxrss) when the loop began (loading the checkpoint,
  // quantizing it, the data) and when it ended (the larger of that and the training's own peak).
  int64_t peak_rss_before_training_bytes = 0, peak_rss_bytes = 0;
  std::vector<EvalPoint> evals;
  std::string last_checkpoint;     // "" when none was written
  int64_t trainable_parameters = 0;
};

// peft's target_modules from a comma-separated list, or "all" / "all-linear": every Linear of `cfg` LoRA can
// adapt (the MoE names q/k/v/o_proj, gate, w1, w2, w3; the dense ones q/k/v/o_proj, gate/up/down_proj).
// Throws moelab::Error for an empty name.
std::vector<std::string> parse_target_modules(const std::string& list, const ModelConfig& cfg);

// The folder name of the checkpoint after `step` optimizer steps.
std::string checkpoint_name(int64_t step);

// Runs the loop. `stop` (may be null) is polled after every optimizer step: when it becomes true a checkpoint
// of the current step is written and the function returns with interrupted set. Throws moelab::Error on bad
// options or data, an output folder in the way, a checkpoint that does not match the options, or a loss that
// stops being finite.
FinetuneSummary run_finetune(const FinetuneOptions& opt, const std::atomic<bool>* stop = nullptr);

}  // namespace moelab::train
