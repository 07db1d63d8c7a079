#pragma once
// The reference model's weights in its scalar type, either resident (converted once at load) or
// streamed (converted from the mmap'd checkpoint layer by layer on each forward, so a checkpoint larger
// than RAM in FP32 still runs).
#include <Eigen/Core>
#include <memory>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/lora.hpp"

namespace moelab::ref {

template <typename S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename S>
using RowVec = Eigen::Matrix<S, 1, Eigen::Dynamic>;

// A LoRA adapter's factors for one weight (core/lora.hpp) in S: the product becomes
// x Wᵀ + scale · (x Aᵀ) Bᵀ. Empty when the weight is not adapted (or there is no adapter).
template <typename S>
struct LoraDelta {
  Mat<S> a;  // [r, in]
  Mat<S> b;  // [out, r]
  S scale = 0;
  bool empty() const { return a.size() == 0; }
};

template <typename S>
struct ExpertWeights {
  Mat<S> w1;  // [intermediate, hidden] gate projection
  Mat<S> w3;  // [intermediate, hidden] up projection
  Mat<S> w2;  // [hidden, intermediate] down projection
  LoraDelta<S> w1_lora{}, w3_lora{}, w2_lora{};
};

template <typename S>
struct LayerWeights {
  RowVec<S> attn_norm;  // [hidden] input_layernorm
  Mat<S> wq;            // [heads * head_dim, hidden]
  Mat<S> wk;            // [kv_heads * head_dim, hidden]
  Mat<S> wv;            // [kv_heads * head_dim, hidden]
  Mat<S> wo;            // [hidden, heads * head_dim]
  RowVec<S> ffn_norm;   // [hidden] post_attention_layernorm
  Mat<S> router;        // [experts, hidden]; empty for dense models
  std::vector<ExpertWeights<S>> experts;  // one for dense models
  LoraDelta<S> wq_lora{}, wk_lora{}, wv_lora{}, wo_lora{}, router_lora{};
};

template <typename S>
class WeightStore {
 public:
  // With an adapter, every layer carries its LoRA factors beside the weights they adapt.
  WeightStore(const Checkpoint& ck, bool stream, bool show_progress, std::shared_ptr<const LoraAdapter> adapter = nullptr);

  std::shared_ptr<const LayerWeights<S>> layer(int i) const;
  Mat<S> embedding_rows(const std::vector<int32_t>& tokens) const;  // [n, hidden]
  const RowVec<S>& final_norm() const { return final_norm_; }
  std::shared_ptr<const Mat<S>> lm_head() const;  // [vocab, hidden]
  bool streaming() const { return stream_; }

 private:
  std::shared_ptr<LayerWeights<S>> load_layer(int i) const;
  Mat<S> load_matrix(const std::string& name) const;
  RowVec<S> load_vector(const std::string& name) const;
  LoraDelta<S> lora(const std::string& weight_name) const;

  const Checkpoint& ck_;
  bool stream_;
  std::shared_ptr<const LoraAdapter> adapter_;  // null: none
  std::vector<std::shared_ptr<const LayerWeights<S>>> layers_;  // empty when streaming
  Mat<S> embedding_;                                            // empty when streaming
  std::shared_ptr<const Mat<S>> lm_head_;                       // null when streaming
  RowVec<S> final_norm_;
};

}  // namespace moelab::ref
