#pragma once
// cpu-nf4: the Engine with NF4 weights (attention projections, router, every expert matrix), int8
// activations in the weight products (or FP32: the exact check mode), on its own thread pool. Same semantics as the reference (transformers' MixtralForCausalLM);
// written independently of it so the layer diff between the two means something.
#include <memory>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/moe.hpp"
#include "optimized/cpu/bf16_matrix.hpp"
#include "optimized/cpu/q8_matrix.hpp"
#include "optimized/cpu/thread_pool.hpp"

namespace moelab::cpu {

struct EngineOptions {
  int max_context = 0;  // 0: min(max_position_embeddings, 4096)
  int threads = 0;      // 0: one per physical core
  std::string isa = "auto";
  // "int8": activations quantized per 32 for integer dot products (the fast path); "fp32": the exact
  // check mode, equal to the reference on the dequantized weights to FP32 rounding.
  std::string activations = "int8";
  // The lm_head: "fp32" (exact), "bf16" (half the bytes, FP32 activations; exact for a BF16
  // checkpoint), "q8" (int8 per row, a quarter of the bytes), "auto" (q8 with int8 activations, fp32 in
  // the check mode).
  std::string lm_head = "auto";
  int blocksize = 64;
  bool double_quant = true;
  bool show_progress = false;
  // A LoRA adapter applied unmerged: FP32 factors beside the NF4 products, y = W x + scale · B (A x).
  std::shared_ptr<const LoraAdapter> adapter = nullptr;
};

struct Nf4Layer {
  Eigen::RowVectorXf attn_norm, ffn_norm;
  Nf4Matrix wq, wk, wv, wo, router;  // router empty for dense models
  std::vector<Nf4Expert> experts;
  // LoRA factors (null: not adapted), owned by the engine's adapter.
  const LoraFactors *wq_lora = nullptr, *wk_lora = nullptr, *wv_lora = nullptr, *wo_lora = nullptr,
                    *router_lora = nullptr;
};

class Nf4Engine final : public Engine {
 public:
  Nf4Engine(const Checkpoint& ck, EngineOptions options = {});

  std::string name() const override { return "cpu-nf4"; }
  const ModelConfig& config() const override { return cfg_; }
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override {
    return run(tokens, 0, probe);
  }
  MatrixRF forward_tail(std::span<const int32_t> tokens, int first, Probe* probe = nullptr) override {
    check_tail(tokens.size(), first);
    return run(tokens, first, probe);
  }
  void reset() override { pos_ = 0; }
  void truncate(int position) override;
  int position() const override { return pos_; }
  int max_context() const override { return max_context_; }

  double load_seconds() const { return load_seconds_; }
  int64_t weight_bytes() const;
  Isa isa() const { return ctx_.isa; }
  Activations activations() const { return ctx_.activations; }
  int threads() const { return pool_->threads(); }
  std::string lm_head_format() const {
    return lm_head_q8_.rows > 0 ? "q8" : lm_head_bf16_.rows > 0 ? "bf16" : "fp32";
  }

 private:
  MatrixRF run(std::span<const int32_t> tokens, int first_logits_row, Probe* probe);
  MatrixRF attention(int layer, const Nf4Layer& w, const MatrixRF& x, int start);
  void route(const Nf4Layer& w, const MatrixRF& x, MatrixRF& logits, MatrixRI& experts, MatrixRF& gates) const;

  ModelConfig cfg_;
  EngineOptions opt_;
  std::unique_ptr<ThreadPool> pool_;
  LinearContext ctx_;
  int max_context_;
  int pos_ = 0;
  double load_seconds_ = 0;
  // The embedding is gathered row by row from the checkpoint's own tensor (no FP32 copy of it); the
  // lm_head is FP32 [vocab, hidden], BF16 or int8 per row (the embedding's values when tied).
  const Checkpoint* ck_ = nullptr;
  MatrixRF lm_head_;
  Q8Matrix lm_head_q8_;
  Bf16Matrix lm_head_bf16_;
  Eigen::RowVectorXf final_norm_;
  std::vector<Nf4Layer> layers_;
  std::shared_ptr<const LoraAdapter> adapter_;  // null: none
  std::vector<float> inv_freq_;
  std::vector<MatrixRF> k_cache_, v_cache_;  // per layer [max_context, kv_heads * head_dim]
};

}  // namespace moelab::cpu
