#include "reference/model.hpp"

// Every stage here is written for reading and kept apart from cpu-nf4's (optimized/cpu/) and cuda-nf4's
// on purpose: `moelab diff` and the engine tests compare them layer by layer against this model, and a
// stage shared between them would carry one bug into both sides of the comparison unseen. Do not merge
// them; share only what is not under comparison (checkpoint reading, the clock).

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/clock.hpp"
#include "core/error.hpp"

namespace moelab::ref {

namespace {
// The reference computes on float weights only; it names the engine that reads NF4 instead.
const ModelConfig& refuse_quantized(const Checkpoint& ck) {
  if (ck.config().quantization.nf4)
    throw Error(fmt::format("{}: a pre-quantized NF4 checkpoint; the reference needs float weights (run it with "
                            "--engine cpu-nf4)", ck.dir()));
  return ck.config();
}
}  // namespace

template <typename S>
Model<S>::Model(const Checkpoint& ck, ModelOptions options)
    : cfg_(refuse_quantized(ck)), weights_(ck, options.stream, options.show_progress, options.adapter) {
  max_context_ = options.max_context > 0 ? options.max_context : std::min(cfg_.max_position_embeddings, 4096);
  if (max_context_ > cfg_.max_position_embeddings)
    throw Error(fmt::format("context {} exceeds the model's max_position_embeddings {} ({})", max_context_,
                            cfg_.max_position_embeddings, cfg_.source));
  // RoPE frequencies as transformers computes them: inv_freq[i] = 1 / theta^(2i / head_dim), in S.
  const int half = cfg_.head_dim / 2;
  for (int i = 0; i < half; ++i)
    inv_freq_.push_back(S(1) / std::pow(S(cfg_.rope_theta), S(2 * i) / S(cfg_.head_dim)));
  const int kv_width = cfg_.num_kv_heads * cfg_.head_dim;
  k_cache_.assign(cfg_.num_layers, Mat<S>(max_context_, kv_width));
  v_cache_.assign(cfg_.num_layers, Mat<S>(max_context_, kv_width));
}

template <typename S>
void Model<S>::truncate(int position) {
  if (position < 0 || position > pos_)
    throw Error(fmt::format("truncate: position {} outside the {} cached tokens", position, pos_));
  pos_ = position;  // the cache is indexed by position: later entries are simply overwritten
}

template <typename S>
std::string Model<S>::name() const {
  return std::is_same_v<S, float> ? "ref" : "ref-f64";
}

// RMSNorm: x / sqrt(mean(x^2) + eps) * weight, row by row.            x: [n, hidden]
template <typename S>
Mat<S> Model<S>::rms_norm(const Mat<S>& x, const RowVec<S>& weight) const {
  Mat<S> out(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const S mean_sq = x.row(t).squaredNorm() / S(x.cols());
    const S inv = S(1) / std::sqrt(mean_sq + S(cfg_.rms_norm_eps));
    out.row(t) = (x.row(t) * inv).cwiseProduct(weight);
  }
  return out;
}

// Rotate-half RoPE on every head of x: [n, heads * head_dim]. Dimension d pairs with d + head_dim/2
// (the layout HF checkpoints are stored in), token t sits at position start_pos + t.
template <typename S>
void Model<S>::apply_rope(Mat<S>& x, int num_heads, int start_pos) const {
  const int hd = cfg_.head_dim, half = hd / 2;
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const S pos = S(start_pos + t);
    for (int i = 0; i < half; ++i) {
      const S angle = pos * inv_freq_[i];
      const S c = std::cos(angle), s = std::sin(angle);
      for (int h = 0; h < num_heads; ++h) {
        S& a = x(t, h * hd + i);
        S& b = x(t, h * hd + i + half);
        const S a0 = a, b0 = b;
        a = a0 * c - b0 * s;
        b = b0 * c + a0 * s;
      }
    }
  }
}

// Grouped-query attention with a KV cache. x: [n, hidden] (already normed) → [n, hidden].
// Query head h reads KV head h / (heads / kv_heads). Query at position p sees keys j with j <= p and,
// with a sliding window W, j > p - W.
template <typename S>
Mat<S> Model<S>::attention(int layer, const LayerWeights<S>& w, const Mat<S>& x, int start_pos) {
  const int n = int(x.rows()), hd = cfg_.head_dim;
  const int heads = cfg_.num_heads, group = cfg_.num_heads / cfg_.num_kv_heads;
  Mat<S> q = linear(x, w.wq, w.wq_lora);  // [n, heads * hd]
  Mat<S> k = linear(x, w.wk, w.wk_lora);  // [n, kv_heads * hd]
  Mat<S> v = linear(x, w.wv, w.wv_lora);
  apply_rope(q, heads, start_pos);
  apply_rope(k, cfg_.num_kv_heads, start_pos);
  k_cache_[layer].middleRows(start_pos, n) = k;
  v_cache_[layer].middleRows(start_pos, n) = v;

  const int total = start_pos + n;
  const S scale = S(1) / std::sqrt(S(hd));
  Mat<S> out(n, heads * hd);
  RowVec<S> scores(total);
  for (int h = 0; h < heads; ++h) {
    const int kvh = h / group;
    const auto keys = k_cache_[layer].block(0, kvh * hd, total, hd);    // [total, hd]
    const auto values = v_cache_[layer].block(0, kvh * hd, total, hd);  // [total, hd]
    for (int t = 0; t < n; ++t) {
      const int p = start_pos + t;
      const int first = cfg_.sliding_window > 0 ? std::max(0, p - cfg_.sliding_window + 1) : 0;
      const int len = p - first + 1;
      auto s = scores.head(len);
      s = (q.block(t, h * hd, 1, hd) * keys.middleRows(first, len).transpose()) * scale;
      s = (s.array() - s.maxCoeff()).exp();
      s /= s.sum();
      out.block(t, h * hd, 1, hd) = s * values.middleRows(first, len);
    }
  }
  return linear(out, w.wo, w.wo_lora);
}

// Router: softmax over all experts, top-k of the probabilities, renormalized.  x: [n, hidden]
template <typename S>
RouterOutput<S> Model<S>::route(const LayerWeights<S>& w, const Mat<S>& x) const {
  const int n = int(x.rows()), k = cfg_.top_k;
  RouterOutput<S> r;
  r.experts.resize(n, k);
  r.gates.resize(n, k);
  if (!cfg_.is_moe()) {  // dense: the one MLP, weight 1
    r.experts.setZero();
    r.gates.setOnes();
    return r;
  }
  r.logits = linear(x, w.router, w.router_lora);  // [n, experts]
  std::vector<int> order(cfg_.num_experts);
  for (int t = 0; t < n; ++t) {
    RowVec<S> prob = (r.logits.row(t).array() - r.logits.row(t).maxCoeff()).exp();
    prob /= prob.sum();
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[a] > prob[b]; });
    S kept = 0;
    for (int j = 0; j < k; ++j) kept += prob[order[j]];
    for (int j = 0; j < k; ++j) {
      r.experts(t, j) = order[j];
      r.gates(t, j) = prob[order[j]] / kept;
    }
  }
  return r;
}

// A linear layer, as peft's lora.Linear computes it unmerged: the base product, then
// lora_B(lora_A(x)) * scaling added to it.
template <typename S>
Mat<S> Model<S>::linear(const Mat<S>& x, const Mat<S>& w, const LoraDelta<S>& lora) {
  Mat<S> y = x * w.transpose();
  if (!lora.empty()) y += ((x * lora.a.transpose()) * lora.b.transpose()) * lora.scale;
  return y;
}

// SwiGLU expert: w2(silu(w1 x) * w3 x).                                x: [m, hidden] → [m, hidden]
template <typename S>
Mat<S> Model<S>::expert_mlp(const ExpertWeights<S>& e, const Mat<S>& x) {
  Mat<S> gate = linear(x, e.w1, e.w1_lora);  // [m, intermediate]
  const Mat<S> up = linear(x, e.w3, e.w3_lora);
  gate = gate.array() / (S(1) + (-gate.array()).exp());  // silu
  return linear(gate.cwiseProduct(up), e.w2, e.w2_lora);
}

// Mixture of experts: each expert runs once on the tokens routed to it, and its output is added to
// those tokens with their gate weight (experts in ascending id order, as transformers does).
template <typename S>
Mat<S> Model<S>::moe(const LayerWeights<S>& w, const Mat<S>& x, const RouterOutput<S>& r,
                     std::vector<ExpertTiming>* timings) {
  const int n = int(x.rows());
  Mat<S> out = Mat<S>::Zero(n, x.cols());
  for (int e = 0; e < int(w.experts.size()); ++e) {
    std::vector<int> rows;
    std::vector<S> gate;
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < int(r.experts.cols()); ++j)
        if (r.experts(t, j) == e) {
          rows.push_back(t);
          gate.push_back(r.gates(t, j));
        }
    if (rows.empty()) continue;
    Mat<S> xe(Eigen::Index(rows.size()), x.cols());
    for (size_t i = 0; i < rows.size(); ++i) xe.row(Eigen::Index(i)) = x.row(rows[i]);
    const auto t0 = timings ? SteadyClock::now() : SteadyClock::time_point{};
    const Mat<S> ye = expert_mlp(w.experts[size_t(e)], xe);
    if (timings) timings->push_back({e, int(rows.size()), seconds_since(t0)});
    for (size_t i = 0; i < rows.size(); ++i) out.row(rows[i]) += gate[i] * ye.row(Eigen::Index(i));
  }
  return out;
}

template <typename S>
Mat<S> Model<S>::forward_native(std::span<const int32_t> tokens, Probe* probe) {
  const int n = int(tokens.size());
  if (n == 0) throw Error("forward: no tokens");
  if (pos_ + n > max_context_)
    throw Error(fmt::format("context overflow: {} cached + {} new tokens exceed the context of {} tokens "
                            "this engine was built for (see --context)", pos_, n, max_context_));
  for (int32_t id : tokens)
    if (id < 0 || id >= cfg_.vocab_size)
      throw Error(fmt::format("token id {} outside the vocabulary of {} ({})", id, cfg_.vocab_size, cfg_.source));

  Mat<S> h = weights_.embedding_rows(std::vector<int32_t>(tokens.begin(), tokens.end()));  // [n, hidden]
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const auto w = weights_.layer(l);
    LayerObservation obs;
    obs.layer = l;
    auto t0 = SteadyClock::now();
    h += attention(l, *w, rms_norm(h, w->attn_norm), pos_);
    obs.attention_seconds = seconds_since(t0);
    t0 = SteadyClock::now();
    const Mat<S> x = rms_norm(h, w->ffn_norm);
    const RouterOutput<S> r = route(*w, x);
    obs.router_seconds = seconds_since(t0);
    t0 = SteadyClock::now();
    std::vector<ExpertTiming> expert_times;  // filled only for a probe
    h += moe(*w, x, r, probe ? &expert_times : nullptr);
    obs.experts_seconds = seconds_since(t0);
    if (probe) {
      const MatrixRF hidden = h.template cast<float>();
      const MatrixRF logits = r.logits.template cast<float>();
      const MatrixRF gates = r.gates.template cast<float>();
      obs.hidden = &hidden;
      obs.router_logits = cfg_.is_moe() ? &logits : nullptr;
      obs.experts = &r.experts;
      obs.gates = &gates;
      obs.expert_timings = &expert_times;
      probe->on_layer(obs);
    }
  }
  pos_ += n;
  const auto t0 = SteadyClock::now();
  Mat<S> logits = rms_norm(h, weights_.final_norm()) * weights_.lm_head()->transpose();  // [n, vocab]
  if (probe) probe->on_logits(logits.template cast<float>(), seconds_since(t0));
  return logits;
}

template <typename S>
MatrixRF Model<S>::forward(std::span<const int32_t> tokens, Probe* probe) {
  if constexpr (std::is_same_v<S, float>) return forward_native(tokens, probe);
  else return forward_native(tokens, probe).template cast<float>();
}

template class Model<float>;
template class Model<double>;

}  // namespace moelab::ref
