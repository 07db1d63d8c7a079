#include "train/frozen_base.hpp"

#include <fmt/format.h>

#include "core/error.hpp"

namespace moelab::train {

namespace {

template <typename S>
Mat<S> read_matrix(const Checkpoint& ck, const std::string& name) {
  const auto& t = ck.info(name);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(t.shape[0], t.shape[1]);
  ck.read_rows_f32(name, 0, t.shape[0], m.data());
  return m.template cast<S>();
}

template <typename S>
RowVec<S> read_vector(const Checkpoint& ck, const std::string& name) {
  const auto v = ck.read_f32(name);
  return Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>(v.data(), Eigen::Index(v.size())).template cast<S>();
}

}  // namespace

template <typename S>
FrozenBase<S>::FrozenBase(const Checkpoint& ck, const BaseOptions& opt) : cfg_(ck.config()) {
  const bool prequantized = cfg_.quantization.nf4;
  nf4_ = opt.nf4 || prequantized;
  if (prequantized && !opt.nf4)
    throw Error(fmt::format("{}: a pre-quantized NF4 checkpoint has no float weights to train on without NF4", ck.dir()));
  if (nf4_ && !nf4::is_valid_blocksize(opt.blocksize))
    throw Error(fmt::format("NF4 blocksize {} is not one bitsandbytes accepts", opt.blocksize));
  const auto lookup = [&](const std::string& n) { return ck.contains(n) ? &ck.file_of(n) : nullptr; };
  for (const auto& name : cfg_.nf4_weight_names()) {
    if (!nf4_) {
      dense_.emplace(name, read_matrix<S>(ck, name));
    } else if (prequantized) {
      quantized_.emplace(name, nf4::read_nf4(lookup, name));
    } else {
      const auto& t = ck.info(name);
      const auto v = ck.read_f32(name);
      auto q = nf4::quantize_nf4(v.data(), int64_t(v.size()), opt.blocksize, opt.double_quant);
      q.shape = t.shape;
      quantized_.emplace(name, std::move(q));
    }
  }
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    attn_norm_.push_back(read_vector<S>(ck, p + "input_layernorm.weight"));
    ffn_norm_.push_back(read_vector<S>(ck, p + "post_attention_layernorm.weight"));
  }
  embedding_ = read_matrix<S>(ck, "model.embed_tokens.weight");
  lm_head_ = cfg_.tie_word_embeddings ? embedding_ : read_matrix<S>(ck, "lm_head.weight");
  final_norm_ = read_vector<S>(ck, "model.norm.weight");
}

template <typename S>
Mat<S> FrozenBase<S>::matrix(const std::string& name) const {
  if (!nf4_) return dense_.at(name);
  const auto& q = quantized_.at(name);
  const auto v = nf4::dequantize(q);  // float32, as bitsandbytes' dequantize_4bit returns it
  const Eigen::Index rows = Eigen::Index(q.shape.at(0)), cols = Eigen::Index(v.size()) / rows;
  return Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(v.data(), rows, cols)
      .template cast<S>();
}

template <typename S>
LayerBase<S> FrozenBase<S>::layer(int l) const {
  const std::string p = fmt::format("model.layers.{}.self_attn.", l);
  LayerBase<S> w;
  w.attn_norm = attn_norm_.at(size_t(l));
  w.ffn_norm = ffn_norm_.at(size_t(l));
  w.wq = matrix(p + "q_proj.weight");
  w.wk = matrix(p + "k_proj.weight");
  w.wv = matrix(p + "v_proj.weight");
  w.wo = matrix(p + "o_proj.weight");
  if (cfg_.is_moe()) w.router = matrix(cfg_.router_name(l));
  for (int e = 0; e < cfg_.num_experts; ++e) {
    w.w1.push_back(matrix(cfg_.w1_name(l, e)));
    w.w3.push_back(matrix(cfg_.w3_name(l, e)));
    w.w2.push_back(matrix(cfg_.w2_name(l, e)));
  }
  return w;
}

template class FrozenBase<float>;
template class FrozenBase<double>;

}  // namespace moelab::train
