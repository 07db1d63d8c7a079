#pragma once
// QLoRA training core (issue 15): a frozen base held in NF4, trainable LoRA factors, and the causal-LM loss
// with its gradient, the backward pass written stage by stage beside the forward (train/lora_model.cpp).
// Templated on the scalar: LoraModel<float> is what `moelab finetune` trains with; LoraModel<double> is the
// float64 oracle the finite-difference tests check (and the FP32 path is checked against).
//
// The forward is transformers' MixtralForCausalLM in training mode over whole sequences (no KV cache), with
// peft's unmerged lora.Linear on every targeted weight: y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ, W = dequantize(NF4(W))
// as bitsandbytes' Linear4bit computes it (QLoRA: the gradient reaches the input through the dequantized W).
// Layout and ownership (DESIGN: train/ depends on core/, reference/ types, optimized/nf4 and optimized/cpu's
// NF4 matrices, dequantization kernels and thread pool, plus OpenBLAS):
//   LoraParams<S>  the trainable factors and their gradients, keyed by checkpoint weight name
//   LoraModel<S>   the frozen base (NF4 or float) + loss_and_grad()
// Files: train/lora_params.cpp (targets, init, peft's save format), train/frozen_base.* (the NF4 base: a
// small layer dequantized whole once per pass, a Mixtral-sized one streamed through the products a tile at a
// time), train/products.* (threads and the frozen weights' products), train/stages.hpp (each forward stage
// beside its backward),
// train/lora_model.cpp (the pass over layers, cross-entropy, the auxiliary loss, checkpointing).
// Threads and products: train/products.hpp. One pool per model runs the frozen weights' products (OpenBLAS
// in float, Eigen in double) in column blocks or NF4 tiles, the attention heads and the experts (when a
// loop's work is over 2^26 multiply-adds) and the NF4 dequantization; every parallel write has one owner,
// sums run in a fixed order and the blocks depend on the shapes alone, so the results do not depend on the
// thread count.
//   (train/adamw.*, train/schedule.*, train/data.*, cli/cmd_finetune.cpp build the training loop on these)
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/lora.hpp"
#include "reference/weights.hpp"

namespace moelab::train {

template <typename S>
using Mat = ref::Mat<S>;
template <typename S>
using RowVec = ref::RowVec<S>;

// What to adapt and how: peft LoraConfig's fields, with peft/trl defaults.
struct LoraRecipe {
  int rank = 8;
  double alpha = 16;
  double dropout = 0.05;  // on the LoRA branch's input, training only (peft's lora_dropout)
  bool use_rslora = false;
  // Module names as peft's target_modules list (suffix match): q_proj k_proj v_proj o_proj gate w1 w2 w3.
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  double scale() const;  // alpha / rank, alpha / sqrt(rank) with rsLoRA
};

// One adapted weight: factors and their gradients (same shapes), in S.
template <typename S>
struct LoraParam {
  std::string weight_name;  // checkpoint name, e.g. "model.layers.0.self_attn.q_proj.weight"
  S scale = 0;
  Mat<S> a, b;              // [r, in], [out, r]
  Mat<S> grad_a, grad_b;    // accumulated by loss_and_grad (+=), cleared by zero_grad
  // Whether a pass since zero_grad reached these factors: an expert no token was routed to is not (its grad
  // in torch is None, and AdamW then leaves the tensor and its state alone; train/adamw.hpp).
  bool has_grad = false;
};

template <typename S>
class LoraParams {
 public:
  // peft's default init: A as nn.Linear's kaiming_uniform(a=sqrt(5)) (uniform in ±1/sqrt(in)), B zero,
  // from our own seeded generator (values differ from torch's; the parity tests start from a saved adapter).
  // Every Linear whose module name is a target or ends with "." + target (peft's list matching); a target
  // matching nothing, rank <= 0 or dropout outside [0, 1) is a moelab::Error.
  static LoraParams init(const ModelConfig& cfg, const LoraRecipe& recipe, uint64_t seed);
  // Start from a saved adapter (peft's or ours): the factors cast to S.
  static LoraParams from_adapter(const LoraAdapter& adapter);
  // Writes DIR/adapter_config.json + DIR/adapter_model.safetensors as peft's save_pretrained does (F32,
  // peft's key names), each file written to a temporary name and renamed.
  void save(const std::string& dir, const LoraRecipe& recipe, const std::string& base_model) const;

  std::vector<LoraParam<S>>& params() { return params_; }
  const std::vector<LoraParam<S>>& params() const { return params_; }
  const LoraParam<S>* find(const std::string& weight_name) const;
  void zero_grad();
  int64_t parameter_count() const;

 private:
  std::vector<LoraParam<S>> params_;  // sorted by weight_name (init and from_adapter alike)
};

// One training sequence: the tokens and which positions are labels. target[t] != 0: token t is predicted from
// tokens [0, t) (t >= 1), i.e. transformers' labels with -100 where target is 0 (prompt tokens, padding).
struct TrainSequence {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> target;  // same length as tokens
};

struct LossOptions {
  double router_aux_coef = 0;          // transformers' router_aux_loss_coef with output_router_logits (0: off)
  bool gradient_checkpointing = false; // keep only each layer's input; recompute the layer in backward
  double lora_dropout = 0;             // peft's lora_dropout (LoraRecipe::dropout), applied when training
  uint64_t dropout_seed = 0;           // the LoRA dropout masks of this call (same seed: same masks)
  bool training = true;                // false: no dropout (evaluation loss)
};

struct LossResult {
  double loss = 0;        // ce + router_aux_coef * aux, as transformers' MixtralForCausalLM returns it
  double ce = 0;          // mean cross-entropy over the target tokens (sum / normalizer)
  double aux = 0;         // load_balancing_loss_func over the batch's tokens and all layers (0 when off);
                          // per call, not divided by anything: accumulation adds coef * aux per micro-batch
  int64_t targets = 0;    // target tokens in this batch
  // Wall seconds of this call, split where the loss is known (two clock reads per sequence, no more):
  // forward = embedding, the layers, final norm, lm_head, the cross-entropy (with its softmax gradient,
  // computed in the same loop) and the auxiliary loss; backward = lm_head's and the final norm's backward and
  // the layers in reverse, each layer's NF4 weights dequantized again (with gradient checkpointing, the
  // recomputed layer forward too, as torch counts it). loss() fills forward_s only. dequantize_s: the part of
  // both spent dequantizing whole layers of the frozen NF4 weights to S (FrozenBase::layer_weights); 0 where
  // the layers are streamed (the products' tile dequantization is inside forward_s and backward_s).
  double forward_s = 0, backward_s = 0, dequantize_s = 0;
};

// How the base weights are held: NF4 as QLoRA does (bitsandbytes' quantization, blocksize 64, double quant)
// or the checkpoint's float values (for checks that want no quantization at all).
struct BaseOptions {
  bool nf4 = true;
  int blocksize = 64;
  bool double_quant = true;
  // How a float pass reads an NF4 layer (train/frozen_base.hpp, LayerWeights): dequantized whole once per
  // pass, or streamed (tiles dequantized inside each product, no FP32 layer). Auto: streamed when a layer is
  // over 256 MiB in FP32. The float64 path always dequantizes.
  enum class Nf4Layers { Auto, Dequantized, Streamed } nf4_layers = Nf4Layers::Auto;
};

template <typename S>
class LoraModel {
 public:
  // threads: the pool's size, including the calling thread (0: the physical cores). The checkpoint must
  // outlive the model (a pre-quantized one's NF4 codes are read where they are mapped). One model runs one
  // pass at a time (it keeps one layer's dequantized weights between calls): call it from one thread; it
  // cannot be copied.
  LoraModel(const Checkpoint& ck, BaseOptions base = {}, int threads = 0);
  LoraModel(const LoraModel&) = delete;
  LoraModel& operator=(const LoraModel&) = delete;
  const ModelConfig& config() const;
  int threads() const;

  // Forward and backward over a batch of sequences (each attends only to itself: no padding needed).
  // Cross-entropy is summed over the batch's target tokens and divided by `normalizer` (the target tokens of
  // the whole accumulated batch; <= 0: this batch's), so gradient accumulation gives the full batch's mean.
  // Gradients are ADDED to params' grad_a/grad_b. Throws moelab::Error on an empty batch or sequence, a
  // token outside the vocabulary, a sequence longer than max_position_embeddings, a mismatched target
  // length, no target tokens (with normalizer <= 0), or factors whose shapes or names fit no weight.
  // Deterministic: the same inputs give the same bits, with or without gradient_checkpointing.
  LossResult loss_and_grad(std::span<const TrainSequence> batch, LoraParams<S>& params, const LossOptions& opt,
                           int64_t normalizer = 0);
  // The same loss without gradients (held-out evaluation; dropout off whatever opt.training says).
  LossResult loss(std::span<const TrainSequence> batch, const LoraParams<S>& params, const LossOptions& opt,
                  int64_t normalizer = 0);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

extern template class LoraParams<float>;
extern template class LoraParams<double>;
extern template class LoraModel<float>;
extern template class LoraModel<double>;

}  // namespace moelab::train
