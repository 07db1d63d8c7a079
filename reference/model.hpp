#pragma once
// The reference engine: a plain Eigen forward pass of Hugging Face's MixtralForCausalLM (and
// MistralForCausalLM as the dense case), written to be read, one function per stage. Templated on its
// scalar type: Model<float> is the FP32 engine `ref`; Model<double> is the float64 oracle that tests
// use to measure how far FP32 results (ours and transformers') stray.
#include <memory>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "reference/weights.hpp"

namespace moelab::ref {

struct ModelOptions {
  int max_context = 0;  // 0: min(max_position_embeddings, 4096)
  bool stream = false;  // stream layer weights from the checkpoint instead of keeping an FP32 copy
  bool show_progress = false;
  // A LoRA adapter applied unmerged: every adapted product is x Wᵀ + scale · (x Aᵀ) Bᵀ, in S.
  std::shared_ptr<const LoraAdapter> adapter = nullptr;
};

template <typename S>
struct RouterOutput {
  Mat<S> logits;                  // [n, experts]
  MatrixRI experts;               // [n, top_k] rank order (highest probability first)
  Mat<S> gates;                   // [n, top_k] renormalized to sum to 1
};

template <typename S>
class Model final : public Engine {
 public:
  Model(const Checkpoint& ck, ModelOptions options = {});

  std::string name() const override;
  const ModelConfig& config() const override { return cfg_; }
  MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) override;
  void reset() override { pos_ = 0; }
  void truncate(int position) override;
  int position() const override { return pos_; }
  int max_context() const override { return max_context_; }

  // The same forward pass, returning logits in the model's own precision (the f64 oracle's output).
  Mat<S> forward_native(std::span<const int32_t> tokens, Probe* probe = nullptr);

  // Stages, public so tests can check them one at a time.
  Mat<S> rms_norm(const Mat<S>& x, const RowVec<S>& weight) const;
  void apply_rope(Mat<S>& x, int num_heads, int start_pos) const;
  Mat<S> attention(int layer, const LayerWeights<S>& w, const Mat<S>& x, int start_pos);
  RouterOutput<S> route(const LayerWeights<S>& w, const Mat<S>& x) const;
  // The expert half of the MoE block needs no config: static, so benchmarks can run it on its own.
  // With `timings`, each expert's MLP call is timed (for a Probe); without, nothing is measured.
  static Mat<S> moe(const LayerWeights<S>& w, const Mat<S>& x, const RouterOutput<S>& r,
                    std::vector<ExpertTiming>* timings = nullptr);
  static Mat<S> expert_mlp(const ExpertWeights<S>& e, const Mat<S>& x);
  // x Wᵀ, plus the LoRA term scale · (x Aᵀ) Bᵀ when the weight is adapted.   x: [n, in] → [n, out]
  static Mat<S> linear(const Mat<S>& x, const Mat<S>& w, const LoraDelta<S>& lora);

 private:
  ModelConfig cfg_;
  WeightStore<S> weights_;
  int max_context_;
  int pos_ = 0;
  std::vector<S> inv_freq_;           // [head_dim / 2] RoPE frequencies
  std::vector<Mat<S>> k_cache_;       // per layer [max_context, kv_heads * head_dim]
  std::vector<Mat<S>> v_cache_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace moelab::ref
