#include "train/frozen_base.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <type_traits>

#include "core/error.hpp"
#include "optimized/cpu/quantize.hpp"

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
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& spec : cfg_.expected_tensors()) shapes[spec.name] = spec.shape;
  dequantize_isa_ = cpu::best_isa();
  // Stream NF4 tiles through the products (no FP32 layer at all) when a layer would be large in FP32; a small
  // layer is dequantized once per pass and shared by every sequence of the batch, where the products would
  // dequantize each weight again per sequence (the bundled model trained at 2,803 tokens/s streaming against
  // 3,950 dequantizing, AVX2, load 0.9).
  int64_t layer_values = 0;
  for (const auto& name : cfg_.nf4_weight_names())
    if (name.rfind("model.layers.0.", 0) == 0) {
      const auto& shape = shapes.at(name);
      layer_values += shape.at(0) * shape.at(1);
    }
  using Nf4Layers = BaseOptions::Nf4Layers;
  stream_nf4_ = std::is_same_v<S, float> &&
                (opt.nf4_layers == Nf4Layers::Streamed ||
                 (opt.nf4_layers == Nf4Layers::Auto && layer_values * int64_t(sizeof(float)) > kStreamLayersAboveBytes));
  for (const auto& name : cfg_.nf4_weight_names()) {
    if (!nf4_) {
      dense_.emplace(name, read_matrix<S>(ck, name));
    } else if constexpr (std::is_same_v<S, float>) {
      const auto& shape = shapes.at(name);
      matrices_.emplace(name, prequantized ? cpu::map_prequantized(ck, name, shape.at(0), shape.at(1))
                                           : cpu::quantize_matrix(ck.read_f32(name), shape.at(0), shape.at(1),
                                                                  opt.blocksize, opt.double_quant));
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
void FrozenBase<S>::matrix_into(const std::string& name, Mat<S>& out, const Products& mm) const {
  if (!nf4_) {
    out = dense_.at(name);
    return;
  }
  if constexpr (std::is_same_v<S, float>) {
    // The SIMD kernels give float(code * absmax) bit for bit (tests/ops: Nf4Dequantize, every instruction
    // set), as bitsandbytes' dequantize_4bit does; rows in chunks of ~512 KiB of output on the pool.
    const auto& m = matrices_.at(name);
    out.resize(m.rows, m.cols);
    const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, m.cols));
    const int64_t chunks = (m.rows + rows_per_chunk - 1) / rows_per_chunk;
    mm.parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
      const int64_t r0 = c0 * rows_per_chunk, r1 = std::min(m.rows, c1 * rows_per_chunk);
      cpu::dequantize_rows(dequantize_isa_, m, r0, r1, out.data() + r0 * m.cols);
    });
    return;
  }
  const auto& q = quantized_.at(name);
  const Eigen::Index rows = Eigen::Index(q.shape.at(0)), cols = Eigen::Index(q.numel()) / rows;
  out.resize(rows, cols);  // keeps the storage when the shape is unchanged
  // float32 as bitsandbytes' dequantize_4bit returns it (widened exactly for S = double), in chunks of 2,048
  // blocks (512 KiB of float output at blocksize 64) on the trainer's pool; every element is written by
  // one chunk, so the values do not depend on the threads.
  constexpr int64_t kChunkBlocks = 2048;
  const int64_t chunks = (q.nblocks() + kChunkBlocks - 1) / kChunkBlocks;
  mm.parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    nf4::dequantize_blocks_into(q, c0 * kChunkBlocks, c1 * kChunkBlocks, out.data());
  });
}

template <typename S>
void FrozenBase<S>::layer_into(int l, LayerBase<S>& w, const Products& mm) const {
  const std::string p = fmt::format("model.layers.{}.self_attn.", l);
  w.attn_norm = attn_norm_.at(size_t(l));
  w.ffn_norm = ffn_norm_.at(size_t(l));
  matrix_into(p + "q_proj.weight", w.wq, mm);
  matrix_into(p + "k_proj.weight", w.wk, mm);
  matrix_into(p + "v_proj.weight", w.wv, mm);
  matrix_into(p + "o_proj.weight", w.wo, mm);
  if (cfg_.is_moe()) matrix_into(cfg_.router_name(l), w.router, mm);
  else w.router.resize(0, 0);
  const size_t E = size_t(cfg_.num_experts);
  w.w1.resize(E);
  w.w3.resize(E);
  w.w2.resize(E);
  for (size_t e = 0; e < E; ++e) {
    matrix_into(cfg_.w1_name(l, int(e)), w.w1[e], mm);
    matrix_into(cfg_.w3_name(l, int(e)), w.w3[e], mm);
    matrix_into(cfg_.w2_name(l, int(e)), w.w2[e], mm);
  }
}

template <typename S>
void FrozenBase<S>::layer_weights(int l, LayerBase<S>& buffer, LayerWeights<S>& w, const Products& mm) const {
  const size_t E = size_t(cfg_.num_experts);
  w.w1.resize(E);
  w.w3.resize(E);
  w.w2.resize(E);
  if constexpr (std::is_same_v<S, float>) {
    if (nf4_ && stream_nf4_) {
      const std::string p = fmt::format("model.layers.{}.self_attn.", l);
      const auto nf4 = [&](const std::string& name) { return FrozenMatrix<S>(matrices_.at(name)); };
      w.attn_norm = attn_norm_.at(size_t(l));
      w.ffn_norm = ffn_norm_.at(size_t(l));
      w.wq = nf4(p + "q_proj.weight");
      w.wk = nf4(p + "k_proj.weight");
      w.wv = nf4(p + "v_proj.weight");
      w.wo = nf4(p + "o_proj.weight");
      w.router = cfg_.is_moe() ? nf4(cfg_.router_name(l)) : FrozenMatrix<S>();
      for (size_t e = 0; e < E; ++e) {
        w.w1[e] = nf4(cfg_.w1_name(l, int(e)));
        w.w3[e] = nf4(cfg_.w3_name(l, int(e)));
        w.w2[e] = nf4(cfg_.w2_name(l, int(e)));
      }
      return;
    }
  }
  layer_into(l, buffer, mm);
  w.attn_norm = buffer.attn_norm;
  w.ffn_norm = buffer.ffn_norm;
  w.wq = buffer.wq;
  w.wk = buffer.wk;
  w.wv = buffer.wv;
  w.wo = buffer.wo;
  w.router = cfg_.is_moe() ? FrozenMatrix<S>(buffer.router) : FrozenMatrix<S>();
  for (size_t e = 0; e < E; ++e) {
    w.w1[e] = buffer.w1[e];
    w.w3[e] = buffer.w3[e];
    w.w2[e] = buffer.w2[e];
  }
}

template <typename S>
LayerBase<S> FrozenBase<S>::layer(int l) const {
  LayerBase<S> w;
  const Products one_thread(1);
  layer_into(l, w, one_thread);
  return w;
}

template class FrozenBase<float>;
template class FrozenBase<double>;

}  // namespace moelab::train
