#include "optimized/cpu/engine.hpp"

// Every stage here (attention, router, experts, norms, lm_head) has its own code, apart from
// reference/model.cpp on purpose: `moelab diff` and the engine tests compare the two layer by layer,
// and a stage shared between them would carry one bug into both sides of the comparison unseen. Do not
// merge them; share only what is not under comparison (checkpoint reading, the clock). The layer ops
// (RMSNorm, RoPE, attention's per-query loop, the router's top-k) are cpu-nf4's own too, in
// layer_ops.cpp, where the op table (tests/ops) runs them against float64; they belong to this side.

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "core/clock.hpp"
#include "core/error.hpp"
#include "core/progress.hpp"
#include "optimized/cpu/layer_ops.hpp"
#include "optimized/cpu/linear.hpp"
#include "optimized/cpu/moe.hpp"
#include "optimized/cpu/quantize.hpp"

namespace moelab::cpu {
namespace {

MatrixRF load_f32_matrix(const Checkpoint& ck, const std::string& name) {
  const auto& t = ck.info(name);
  MatrixRF m(t.shape[0], t.shape[1]);
  ck.read_rows_f32(name, 0, t.shape[0], m.data());
  return m;
}

Eigen::RowVectorXf load_vector(const Checkpoint& ck, const std::string& name) {
  const auto v = ck.read_f32(name);
  return Eigen::Map<const Eigen::RowVectorXf>(v.data(), Eigen::Index(v.size()));
}

}  // namespace

Nf4Engine::Nf4Engine(const Checkpoint& ck, EngineOptions options)
    : cfg_(ck.config()), opt_(options) {
  const auto t0 = SteadyClock::now();
  const int threads = opt_.threads > 0 ? opt_.threads : physical_cores();
  pool_ = std::make_unique<ThreadPool>(threads);
  ctx_ = LinearContext{parse_isa(options.isa), parse_activations(options.activations), pool_.get()};
  omp_set_num_threads(threads);  // the load's quantization loop
  max_context_ = opt_.max_context > 0 ? opt_.max_context : std::min(cfg_.max_position_embeddings, 4096);
  if (max_context_ > cfg_.max_position_embeddings)
    throw Error(fmt::format("context {} exceeds the model's max_position_embeddings {} ({})", max_context_,
                            cfg_.max_position_embeddings, cfg_.source));

  ck_ = &ck;
  {
    const std::string head = opt_.lm_head == "auto" ? (ctx_.activations == Activations::Int8 ? "q8" : "fp32") : opt_.lm_head;
    if (head != "fp32" && head != "bf16" && head != "q8")
      throw Error(fmt::format("cpu-nf4: unknown lm_head format '{}' (auto, fp32, bf16, q8)", opt_.lm_head));
    MatrixRF w = load_f32_matrix(ck, cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    if (head == "q8") lm_head_q8_ = quantize_rows_q8(w);
    else if (head == "bf16") lm_head_bf16_ = round_rows_bf16(w);
    else lm_head_ = std::move(w);
  }
  final_norm_ = load_vector(ck, "model.norm.weight");

  // Quantize every linear weight, one tensor per thread at a time (the conversion from BF16 and the
  // quantization are both per-tensor work).
  // A pre-quantized checkpoint is mapped as it is; float weights are quantized here.
  const bool prequantized = cfg_.quantization.nf4;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& spec : cfg_.expected_tensors()) shapes[spec.name] = spec.shape;
  const auto names = cfg_.nf4_weight_names();
  std::vector<Nf4Matrix> quantized(names.size());
  Progress progress(prequantized ? "mapping NF4 weights" : "quantizing to NF4", int64_t(names.size()),
                    opt_.show_progress);
  std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < names.size(); ++i) {
    try {
      const auto& shape = shapes.at(names[i]);
      quantized[i] = prequantized ? map_prequantized(ck, names[i], shape[0], shape[1])
                                  : quantize_matrix(ck.read_f32(names[i]), shape[0], shape[1], opt_.blocksize,
                                                    opt_.double_quant);
    } catch (...) {
#pragma omp critical
      if (!failure) failure = std::current_exception();
    }
#pragma omp critical
    progress.advance();
  }
  progress.finish();
  if (failure) std::rethrow_exception(failure);

  adapter_ = opt_.adapter;
  const auto lora = [&](const std::string& weight) { return adapter_ ? adapter_->find(weight) : nullptr; };
  size_t next = 0;  // quantized_weight_names lists, per layer: q, k, v, o, router (MoE), experts' w1, w3, w2
  for (int l = 0; l < cfg_.num_layers; ++l) {
    Nf4Layer layer;
    const auto p = fmt::format("model.layers.{}.", l);
    layer.attn_norm = load_vector(ck, p + "input_layernorm.weight");
    layer.ffn_norm = load_vector(ck, p + "post_attention_layernorm.weight");
    layer.wq = std::move(quantized[next++]);
    layer.wk = std::move(quantized[next++]);
    layer.wv = std::move(quantized[next++]);
    layer.wo = std::move(quantized[next++]);
    layer.wq_lora = lora(p + "self_attn.q_proj.weight");
    layer.wk_lora = lora(p + "self_attn.k_proj.weight");
    layer.wv_lora = lora(p + "self_attn.v_proj.weight");
    layer.wo_lora = lora(p + "self_attn.o_proj.weight");
    if (cfg_.is_moe()) {
      layer.router = std::move(quantized[next++]);
      layer.router_lora = lora(cfg_.router_name(l));
    }
    for (int e = 0; e < cfg_.num_experts; ++e) {
      Nf4Expert ex;
      ex.w1 = std::move(quantized[next++]);
      ex.w3 = std::move(quantized[next++]);
      ex.w2 = std::move(quantized[next++]);
      ex.w1_lora = lora(cfg_.w1_name(l, e));
      ex.w3_lora = lora(cfg_.w3_name(l, e));
      ex.w2_lora = lora(cfg_.w2_name(l, e));
      layer.experts.push_back(std::move(ex));
    }
    layers_.push_back(std::move(layer));
  }
  // The int8 kernels read the compact absmax; the FP32 copy (0.5 bits per weight) serves only the check
  // mode, so it is not kept without it.
  if (ctx_.activations == Activations::Int8)
    for (auto& l : layers_) {
      for (Nf4Matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.router})
        if (m->double_quantized()) std::vector<float>().swap(m->absmax);
      for (auto& e : l.experts)
        for (Nf4Matrix* m : {&e.w1, &e.w3, &e.w2})
          if (m->double_quantized()) std::vector<float>().swap(m->absmax);
    }

  inv_freq_ = rope_inv_freq(cfg_.rope_theta, cfg_.head_dim);
  const int kv_width = cfg_.num_kv_heads * cfg_.head_dim;
  k_cache_.assign(size_t(cfg_.num_layers), MatrixRF(max_context_, kv_width));
  v_cache_.assign(size_t(cfg_.num_layers), MatrixRF(max_context_, kv_width));
  load_seconds_ = seconds_since(t0);
}

void Nf4Engine::truncate(int position) {
  if (position < 0 || position > pos_)
    throw Error(fmt::format("truncate: position {} outside the {} cached tokens", position, pos_));
  pos_ = position;  // the cache is indexed by position: later entries are simply overwritten
}

int64_t Nf4Engine::weight_bytes() const {
  int64_t b = (lm_head_.size() + final_norm_.size()) * int64_t(sizeof(float)) + lm_head_q8_.bytes() + lm_head_bf16_.bytes();
  for (const auto& l : layers_) {
    b += l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes() + l.router.bytes();
    b += (l.attn_norm.size() + l.ffn_norm.size()) * int64_t(sizeof(float));
    for (const auto& e : l.experts) b += e.w1.bytes() + e.w3.bytes() + e.w2.bytes();
  }
  return b + (adapter_ ? adapter_->bytes() : 0);
}

// GQA attention over the KV cache: q/k/v projections, RoPE, the cache write, then layer_ops' attention.
MatrixRF Nf4Engine::attention(int layer, const Nf4Layer& w, const MatrixRF& x, int start) {
  const int n = int(x.rows()), hd = cfg_.head_dim, heads = cfg_.num_heads;
  const Nf4Matrix* qkv_weights[] = {&w.wq, &w.wk, &w.wv};
  auto qkv = nf4_linear_many(ctx_, qkv_weights, x);
  MatrixRF& q = qkv[0];
  MatrixRF& k = qkv[1];
  MatrixRF& v = qkv[2];
  add_lora(w.wq_lora, x, q);
  add_lora(w.wk_lora, x, k);
  add_lora(w.wv_lora, x, v);
  cpu::rope(q, heads, hd, start, inv_freq_);
  cpu::rope(k, cfg_.num_kv_heads, hd, start, inv_freq_);
  auto& kc = k_cache_[size_t(layer)];
  auto& vc = v_cache_[size_t(layer)];
  kc.middleRows(start, n) = k;
  vc.middleRows(start, n) = v;
  MatrixRF out(n, heads * hd);
  cpu::attention(q, kc, vc, start, heads, cfg_.num_kv_heads, hd, cfg_.sliding_window, out, pool_.get());
  MatrixRF o = nf4_linear(ctx_, w.wo, out);
  add_lora(w.wo_lora, out, o);
  return o;
}

// The router's logits (an NF4 product), then layer_ops' softmax over all experts, top-k, renormalized.
void Nf4Engine::route(const Nf4Layer& w, const MatrixRF& x, MatrixRF& logits, MatrixRI& experts,
                      MatrixRF& gates) const {
  const int n = int(x.rows()), k = cfg_.top_k;
  if (!cfg_.is_moe()) {
    experts.resize(n, k);
    gates.resize(n, k);
    experts.setZero();
    gates.setOnes();
    return;
  }
  logits = nf4_linear(ctx_, w.router, x);
  add_lora(w.router_lora, x, logits);
  route_top_k(logits, k, experts, gates);
}

MatrixRF Nf4Engine::run(std::span<const int32_t> tokens, int first_logits_row, Probe* probe) {
  const int n = int(tokens.size());
  if (n == 0) throw Error("forward: no tokens");
  if (pos_ + n > max_context_)
    throw Error(fmt::format("context overflow: {} cached + {} new tokens exceed the context of {} tokens "
                            "this engine was built for (see --context)", pos_, n, max_context_));
  MatrixRF h(n, cfg_.hidden_size);
  for (int t = 0; t < n; ++t) {
    if (tokens[size_t(t)] < 0 || tokens[size_t(t)] >= cfg_.vocab_size)
      throw Error(fmt::format("token id {} outside the vocabulary of {} ({})", tokens[size_t(t)], cfg_.vocab_size,
                              cfg_.source));
    ck_->read_rows_f32("model.embed_tokens.weight", tokens[size_t(t)], 1, h.row(t).data());
  }
  const float eps = float(cfg_.rms_norm_eps);
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const auto& w = layers_[size_t(l)];
    LayerObservation obs;
    obs.layer = l;
    auto t0 = SteadyClock::now();
    h += attention(l, w, rms_norm(h, w.attn_norm, eps), pos_);
    obs.attention_seconds = seconds_since(t0);
    t0 = SteadyClock::now();
    const MatrixRF x = rms_norm(h, w.ffn_norm, eps);
    MatrixRF logits;
    MatrixRI experts;
    MatrixRF gates;
    route(w, x, logits, experts, gates);
    obs.router_seconds = seconds_since(t0);
    t0 = SteadyClock::now();
    h += moe_block(ctx_, w.experts, x, experts, gates);
    obs.experts_seconds = seconds_since(t0);
    if (probe) {
      obs.hidden = &h;
      obs.router_logits = cfg_.is_moe() ? &logits : nullptr;
      obs.experts = &experts;
      obs.gates = &gates;
      probe->on_layer(obs);
    }
  }
  pos_ += n;
  const auto t0 = SteadyClock::now();
  // The lm_head only for the rows whose logits are used.
  const MatrixRF normed = rms_norm(h.bottomRows(n - first_logits_row), final_norm_, eps);
  const MatrixRF logits = lm_head_q8_.rows > 0     ? q8_linear(ctx_.isa, lm_head_q8_, normed, pool_.get())
                          : lm_head_bf16_.rows > 0 ? bf16_linear(ctx_.isa, lm_head_bf16_, normed, pool_.get())
                                                   : fp32_linear(normed, lm_head_, pool_.get());
  if (probe) probe->on_logits(logits, seconds_since(t0));
  return logits;
}

}  // namespace moelab::cpu
