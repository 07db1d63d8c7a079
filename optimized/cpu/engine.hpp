#pragma once
// cpu-nf4: the Engine with NF4 weights (attention projections, router, every expert matrix) and FP32
// activations, on all threads. Same semantics as the reference (transformers' MixtralForCausalLM);
// written independently of it so the layer diff between the two means something.
#include <memory>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "optimized/cpu/kernels.hpp"
#include "optimized/cpu/moe.hpp"

namespace moelab::cpu {

struct EngineOptions {
  int max_context = 0;  // 0: min(max_position_embeddings, 4096)
  int threads = 0;      // 0: all
  std::string isa = "auto";
  int blocksize = 64;
  bool double_quant = true;
  bool show_progress = false;
};

struct Nf4Layer {
  Eigen::RowVectorXf attn_norm, ffn_norm;
  Nf4Matrix wq, wk, wv, wo, router;  // router empty for dense models
  std::vector<Nf4Expert> experts;
};

class Nf4Engine final : public Engine {
 public:
  Nf4Engine(const Checkpoint& ck, EngineOptions options = {});

  std::string name() const override { return "cpu-nf4"; }
  const ModelConfig& config() const override { return cfg_; }
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override;
  void reset() override { pos_ = 0; }
  void truncate(int position) override;
  int position() const override { return pos_; }
  int max_context() const override { return max_context_; }

  double load_seconds() const { return load_seconds_; }
  int64_t weight_bytes() const;
  Isa isa() const { return isa_; }

 private:
  MatrixRF rms_norm(const MatrixRF& x, const Eigen::RowVectorXf& w) const;
  void rope(MatrixRF& x, int heads, int start) const;
  MatrixRF attention(int layer, const Nf4Layer& w, const MatrixRF& x, int start);
  void route(const Nf4Layer& w, const MatrixRF& x, MatrixRF& logits, MatrixRI& experts, MatrixRF& gates) const;

  ModelConfig cfg_;
  EngineOptions opt_;
  Isa isa_;
  int max_context_;
  int pos_ = 0;
  double load_seconds_ = 0;
  MatrixRF embedding_, lm_head_;  // FP32 [vocab, hidden] (lm_head_ empty when tied)
  Eigen::RowVectorXf final_norm_;
  std::vector<Nf4Layer> layers_;
  std::vector<float> inv_freq_;
  std::vector<MatrixRF> k_cache_, v_cache_;  // per layer [max_context, kv_heads * head_dim]
};

}  // namespace moelab::cpu
