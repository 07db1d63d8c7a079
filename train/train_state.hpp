#pragma once
// A training checkpoint on disk (OUTPUT/checkpoint-STEP/), written whole into a temporary sibling folder and
// renamed into place:
//   adapter_config.json, adapter_model.safetensors  the adapter at this step (peft's format, loads anywhere)
//   optimizer.safetensors                           "param.<name>" (the factors, exact F32) and AdamW's
//                                                   "exp_avg.<name>" / "exp_avg_sq.<name>"
//   trainer_state.json                              step, epoch, counters, AdamW's per-tensor step counts,
//                                                   the held-out losses so far, and the run's fingerprint
//   train_log.csv                                   the log up to this step
// No random-generator state is saved: the data order and the dropout masks are functions of (seed, step).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "train/adamw.hpp"
#include "train/lora_model.hpp"

namespace moelab::train {

struct TrainCounters {
  int64_t step = 0;           // optimizer steps done
  double epoch = 0;
  double elapsed_s = 0;       // training seconds so far, over every run that led here
  int64_t tokens = 0, target_tokens = 0;
  nlohmann::json evals = nlohmann::json::array();  // [{"step": S, "eval_loss": L}, ...]
};

// Writes DIR (which must not be a half-written leftover: it is replaced whole). `fingerprint` lists the
// options a resume must share; `log_csv` is copied in as train_log.csv (skipped when it does not exist).
void write_train_checkpoint(const std::string& dir, const LoraParams<float>& params, const LoraRecipe& recipe,
                            const std::string& base_model, const AdamW& adam, std::span<const ParamView> views,
                            const TrainCounters& counters, const nlohmann::json& fingerprint, const std::string& log_csv);

// Reads DIR into params (values), adam and counters; checks every fingerprint key against `fingerprint`
// (a difference is a moelab::Error naming the key and both values) and every tensor against `views`.
// Three options may change on a resume, as after a run that diverged: learning_rate, weight_decay and
// max_grad_norm (they decide no data order, mask or tensor shape); each one changed is returned as
// "KEY = NEW (the checkpoint's run had OLD)", for the caller to say.
std::vector<std::string> read_train_checkpoint(const std::string& dir, std::span<const ParamView> views, AdamW& adam, TrainCounters& counters,
                           const nlohmann::json& fingerprint);

}  // namespace moelab::train
