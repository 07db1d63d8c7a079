#include "reference/weights.hpp"

#include "core/progress.hpp"

namespace moelab::ref {

template <typename S>
WeightStore<S>::WeightStore(const Checkpoint& ck, bool stream, bool show_progress, std::shared_ptr<const LoraAdapter> adapter)
    : ck_(ck), stream_(stream), adapter_(std::move(adapter)) {
  final_norm_ = load_vector("model.norm.weight");
  if (stream_) return;
  const auto& c = ck_.config();
  Progress progress("loading weights", c.num_layers + 2, show_progress);
  embedding_ = load_matrix("model.embed_tokens.weight");
  progress.advance();
  for (int i = 0; i < c.num_layers; ++i) {
    layers_.push_back(load_layer(i));
    progress.advance();
  }
  lm_head_ = c.tie_word_embeddings ? std::make_shared<const Mat<S>>(embedding_)
                                   : std::make_shared<const Mat<S>>(load_matrix("lm_head.weight"));
  progress.advance();
}

template <typename S>
Mat<S> WeightStore<S>::load_matrix(const std::string& name) const {
  const auto& t = ck_.info(name);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(t.shape[0], t.shape[1]);
  ck_.read_rows_f32(name, 0, t.shape[0], m.data());
  return m.template cast<S>();
}

template <typename S>
RowVec<S> WeightStore<S>::load_vector(const std::string& name) const {
  const auto v = ck_.read_f32(name);
  return Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>(v.data(), Eigen::Index(v.size()))
      .template cast<S>();
}

template <typename S>
LoraDelta<S> WeightStore<S>::lora(const std::string& weight_name) const {
  LoraDelta<S> d;
  if (const LoraFactors* f = adapter_ ? adapter_->find(weight_name) : nullptr) {
    d.a = f->a.template cast<S>();
    d.b = f->b.template cast<S>();
    d.scale = S(f->scale);
  }
  return d;
}

template <typename S>
std::shared_ptr<LayerWeights<S>> WeightStore<S>::load_layer(int i) const {
  const auto& c = ck_.config();
  const std::string p = "model.layers." + std::to_string(i) + ".";
  auto w = std::make_shared<LayerWeights<S>>();
  w->attn_norm = load_vector(p + "input_layernorm.weight");
  w->wq = load_matrix(p + "self_attn.q_proj.weight");
  w->wk = load_matrix(p + "self_attn.k_proj.weight");
  w->wv = load_matrix(p + "self_attn.v_proj.weight");
  w->wo = load_matrix(p + "self_attn.o_proj.weight");
  w->ffn_norm = load_vector(p + "post_attention_layernorm.weight");
  if (c.is_moe()) w->router = load_matrix(c.router_name(i));
  for (int e = 0; e < c.num_experts; ++e)
    w->experts.push_back({load_matrix(c.w1_name(i, e)), load_matrix(c.w3_name(i, e)), load_matrix(c.w2_name(i, e)),
                          lora(c.w1_name(i, e)), lora(c.w3_name(i, e)), lora(c.w2_name(i, e))});
  if (adapter_) {
    w->wq_lora = lora(p + "self_attn.q_proj.weight");
    w->wk_lora = lora(p + "self_attn.k_proj.weight");
    w->wv_lora = lora(p + "self_attn.v_proj.weight");
    w->wo_lora = lora(p + "self_attn.o_proj.weight");
    if (c.is_moe()) w->router_lora = lora(c.router_name(i));
  }
  return w;
}

template <typename S>
std::shared_ptr<const LayerWeights<S>> WeightStore<S>::layer(int i) const {
  return stream_ ? load_layer(i) : layers_.at(size_t(i));
}

template <typename S>
Mat<S> WeightStore<S>::embedding_rows(const std::vector<int32_t>& tokens) const {
  const int H = ck_.config().hidden_size;
  Mat<S> out(Eigen::Index(tokens.size()), H);
  Eigen::Matrix<float, 1, Eigen::Dynamic> row(H);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (stream_) {
      ck_.read_rows_f32("model.embed_tokens.weight", tokens[i], 1, row.data());
      out.row(Eigen::Index(i)) = row.template cast<S>();
    } else {
      out.row(Eigen::Index(i)) = embedding_.row(tokens[i]);
    }
  }
  return out;
}

template <typename S>
std::shared_ptr<const Mat<S>> WeightStore<S>::lm_head() const {
  return stream_ ? std::make_shared<const Mat<S>>(load_matrix(ck_.config().lm_head_name())) : lm_head_;
}

template class WeightStore<float>;
template class WeightStore<double>;

}  // namespace moelab::ref
