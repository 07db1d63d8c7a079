#pragma once
// torch.optim.AdamW (amsgrad off, maximize off, the single-tensor "foreach=False" path) and
// torch.nn.utils.clip_grad_norm_ for the FP32 LoRA factors `moelab finetune` trains. Each update is
// written as torch's sequence of float32 tensor ops with the Python-float scalars rounded to float32, so
// the results stay within a few float32 ulps of torch's (tests/test_train_loop.cpp checks against torch).
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "train/lora_model.hpp"

namespace moelab::train {

// One trainable tensor: its values and its gradient (same length), named for saving and error messages.
// has_grad (null: always) says whether the tensor has a gradient this step; torch's is None for a tensor no
// pass reached (a LoRA factor of an expert no token was routed to: transformers' Mixtral runs only the experts
// it routes to), and then clip_grad_norm_ leaves it out and AdamW skips it: no decay, no moment update, no
// step counted.
struct ParamView {
  std::string name;
  std::span<float> value;
  std::span<float> grad;
  const bool* has_grad = nullptr;
  bool active() const { return !has_grad || *has_grad; }
};

// Every factor of `params` in a fixed order: for each adapted weight, "<weight>.lora_A" then "<weight>.lora_B".
std::vector<ParamView> param_views(LoraParams<float>& params);

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999;  // torch's defaults (transformers' adam_beta1/2)
  double eps = 1e-8;                  // transformers' adam_epsilon
  double weight_decay = 0.0;          // transformers' default (torch's own default is 0.01)
};

class AdamW {
 public:
  explicit AdamW(AdamWConfig cfg = {}) : cfg_(cfg) {}
  const AdamWConfig& config() const { return cfg_; }

  // One optimizer step over `params` at learning rate `lr` (the scheduler's value for this step). The first
  // call creates the state (zero moments, step 0) for each tensor; later calls must pass the same tensors in
  // the same order and sizes (moelab::Error otherwise). A tensor without a gradient (ParamView::active) is
  // skipped, as torch skips a parameter whose grad is None: each tensor counts its own steps.
  void step(std::span<const ParamView> params, double lr);

  // State for a checkpoint: the moments as tensors "exp_avg.<name>" / "exp_avg_sq.<name>" in `tensors`,
  // the per-tensor step counts in `steps`. restore() checks names and sizes against `params`.
  struct State {
    std::map<std::string, std::vector<float>> tensors;
    std::map<std::string, int64_t> steps;
  };
  State state(std::span<const ParamView> params) const;
  void restore(std::span<const ParamView> params, const State& state, const std::string& where);
  int64_t steps_taken() const;  // the most steps any tensor has taken

 private:
  AdamWConfig cfg_;
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;
  std::vector<int64_t> step_;
};

// torch.nn.utils.clip_grad_norm_(params, max_norm) with norm_type 2: the L2 norm of all gradients together
// (per-tensor norms, then the norm of those), and every gradient multiplied by min(max_norm / (total + 1e-6), 1)
// when max_norm > 0 (max_norm <= 0: no clipping, only the norm). Returns the total norm before clipping.
double clip_grad_norm(std::span<const ParamView> params, double max_norm);

}  // namespace moelab::train
