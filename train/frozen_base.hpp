#pragma once
// The frozen base model of QLoRA training: the linear weights NF4 model quantizes held as NF4 (quantized
// here with bitsandbytes' rules, or read from a pre-quantized checkpoint) and dequantized a layer at a time
// when that layer is computed, so the resident base stays ~NF4 size; embedding, norms and lm_head in S.
// With BaseOptions{nf4 = false} the linear weights are the checkpoint's float values instead.
#include <map>
#include <string>
#include <vector>

#include "optimized/cpu/kernels.hpp"
#include "optimized/nf4/nf4.hpp"
#include "train/lora_model.hpp"
#include "train/products.hpp"

namespace moelab::train {

// One layer's frozen weights in S, dequantized for the time the layer is computed.
template <typename S>
struct LayerBase {
  RowVec<S> attn_norm, ffn_norm;
  Mat<S> wq, wk, wv, wo;  // [out, in]
  Mat<S> router;          // [experts, hidden]; empty for dense models
  std::vector<Mat<S>> w1, w3, w2;  // per expert (one for dense models)
};

// What the training pass reads of one layer. For S = float over an NF4 base whose layers are large in FP32
// (over 256 MiB: Mixtral's is 5.8 GB) the matrices are the NF4 codes themselves, dequantized a tile at a time
// inside each product (train/products.hpp), so no layer is held in FP32; otherwise they point into the
// LayerBase that layer_weights filled (dequantized once for every sequence of the pass).
template <typename S>
struct LayerWeights {
  RowVec<S> attn_norm, ffn_norm;
  FrozenMatrix<S> wq, wk, wv, wo, router;  // router: empty for dense models
  std::vector<FrozenMatrix<S>> w1, w3, w2;
};

template <typename S>
class FrozenBase {
 public:
  FrozenBase(const Checkpoint& ck, const BaseOptions& opt);
  const ModelConfig& config() const { return cfg_; }
  LayerBase<S> layer(int l) const;  // dequantizes (or copies) layer l's weights
  // The same into `w`, reusing its matrices' storage when their shapes already match (every layer of a
  // model has the same shapes): a caller that keeps one LayerBase across layers allocates once, instead
  // of mapping and faulting in fresh pages for every weight of every layer.
  // The NF4 blocks are dequantized on `mm`'s pool.
  void layer_into(int l, LayerBase<S>& w, const Products& mm) const;
  // Layer l's weights for the pass: NF4 matrices as they are (S = float, NF4 base), or dequantized (copied)
  // into `buffer` by layer_into and pointed to.
  void layer_weights(int l, LayerBase<S>& buffer, LayerWeights<S>& w, const Products& mm) const;
  const Mat<S>& embedding() const { return embedding_; }  // [vocab, hidden]
  const RowVec<S>& final_norm() const { return final_norm_; }
  const Mat<S>& lm_head() const { return lm_head_; }      // [vocab, hidden]

 private:
  void matrix_into(const std::string& name, Mat<S>& out, const Products& mm) const;

  ModelConfig cfg_;
  bool nf4_ = true;
  // nf4 == true. S = float: cpu-nf4's matrices (a pre-quantized checkpoint's codes mapped, not copied: the
  // Checkpoint must outlive the model), dequantized by its SIMD kernels. S = double (the float64 oracle):
  // optimized/nf4's tensors and its scalar dequantization, the same float32 values widened.
  std::map<std::string, cpu::Nf4Matrix> matrices_;
  cpu::Isa dequantize_isa_ = cpu::Isa::Scalar;
  static constexpr int64_t kStreamLayersAboveBytes = int64_t(256) << 20;  // a layer's size in FP32
  bool stream_nf4_ = false;  // layer_weights hands out the NF4 matrices (S = float, a layer above that size)
  std::map<std::string, nf4::QuantizedTensor> quantized_;
  std::map<std::string, Mat<S>> dense_;                    // nf4 == false
  std::vector<RowVec<S>> attn_norm_, ffn_norm_;
  Mat<S> embedding_, lm_head_;
  RowVec<S> final_norm_;
};

extern template class FrozenBase<float>;
extern template class FrozenBase<double>;

}  // namespace moelab::train
