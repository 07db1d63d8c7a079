#include "train/lora_model.hpp"

// The training forward over whole sequences and its backward, layer by layer (stages in train/stages.hpp).
// The batch's sequences are stacked into one matrix of rows (Rows below) and go through each layer together:
// every product with a frozen weight (the projections, the router, each expert over its tokens from all the
// sequences) is one product per batch. A small layer's NF4 weights are dequantized once per pass; a
// Mixtral-sized one is streamed through each product a tile at a time, so stacking is what makes that
// once per batch instead of once per sequence (and the GEMMs taller). Only attention, RoPE positions, the
// dropout masks and the cross-entropy see the sequences apart. The backward walks the layers in reverse and
// dequantizes them again.

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <map>

#include "core/error.hpp"
#include "optimized/cpu/thread_pool.hpp"
#include "train/frozen_base.hpp"
#include "train/stages.hpp"

namespace moelab::train {

namespace {

// One weight's adapter, if any: read through `p`, gradients written through `grad` (null in loss()).
template <typename S>
struct Adapted {
  const LoraParam<S>* p = nullptr;
  LoraParam<S>* grad = nullptr;
  uint64_t id = 0;  // index in LoraParams: names this weight's dropout streams
};

template <typename S>
struct LayerAdapters {
  Adapted<S> q, k, v, o, router;
  std::vector<Adapted<S>> w1, w3, w2;  // per expert
};

// The batch's sequences stacked: sequence s is rows [begin[s], begin[s] + len[s]).
struct Rows {
  std::vector<int64_t> begin, len;
  std::vector<int> pos;  // per row: its position in its sequence (RoPE)
  std::vector<int> seq;  // per row: its sequence (dropout streams)
  int64_t total = 0;
  explicit Rows(std::span<const TrainSequence> batch) {
    for (size_t s = 0; s < batch.size(); ++s) {
      begin.push_back(total);
      len.push_back(int64_t(batch[s].tokens.size()));
      for (size_t t = 0; t < batch[s].tokens.size(); ++t) {
        pos.push_back(int(t));
        seq.push_back(int(s));
      }
      total += int64_t(batch[s].tokens.size());
    }
  }
  size_t count() const { return begin.size(); }
};

template <typename S>
struct ExpertCache {
  std::vector<int> rows, slot;  // routed rows of the stacked batch (ascending) and the top-k rank that chose this expert
  std::vector<S> gate;
  Mat<S> x, a, b, m, y;  // input rows, w1 x, w3 x, silu(a) ⊙ b, output (before the gate)
  stage::LinearCache<S> c1, c3, c2;
};

// Everything a layer's backward reads. With gradient checkpointing only h_in (and the routing, for the
// auxiliary loss) survives the forward; the rest is recomputed, by the same code, in the backward.
template <typename S>
struct LayerCache {
  Mat<S> h_in, xn1, q, k, v, attn, h_mid, xn2;  // q, k after RoPE; attn before o_proj
  std::vector<S> inv1, inv2;                    // RMSNorm 1/rms per token
  std::vector<Mat<S>> p;                        // attention probabilities per (sequence, head) [n, n]
  stage::LinearCache<S> cq, ck, cv, co, cr;
  Mat<S> probs;        // router softmax [n, experts]
  MatrixRI experts;    // [n, top_k], highest probability first
  Mat<S> gates;        // [n, top_k] renormalized over the chosen experts
  std::vector<ExpertCache<S>> moe;
};

}  // namespace


template <typename S>
struct LoraModel<S>::Impl {
  FrozenBase<S> base;
  const ModelConfig& cfg;
  stage::Rope<S> rope;

  Products mm;  // the pool and the frozen weights' products
  // One layer's dequantized weights where the pass reads dense matrices (float64, or a float base without
  // NF4). Its storage is reused by every layer, forward and backward, and by every call (a fresh buffer per
  // call costs page faults: 5.8 GB of new pages for one Mixtral layer). A model runs one pass at a time.
  mutable LayerBase<S> layer_buffer;

  Impl(const Checkpoint& ck, const BaseOptions& opt, int threads)
      : base(ck, opt), cfg(base.config()), rope(cfg.rope_theta, cfg.head_dim), mm(threads) {}

  // body(i) for i in [0, count) (attention heads, experts), one item per chunk on the pool, when the loop's
  // work (`macs`, multiply-adds, estimated) is worth it; else on the calling thread. Every parallel section
  // can stall on a pool thread the OS has descheduled (another process wants its core) for a scheduler
  // slice, milliseconds: on small layers (the bundled model's experts, ~3 M multiply-adds each) the stalls
  // cost more than the second thread gives. Each item writes only its own outputs, so the result does not
  // depend on which thread ran it.
  static constexpr double kMinParallelLoopMacs = double(int64_t(1) << 26);
  // The forward's multiply-adds of a sequence of n tokens: all heads' scores and weighted values; all experts
  // (top_k of them per token, three products each).
  double attention_macs(int n) const { return 2.0 * double(n) * double(n) * cfg.head_dim * cfg.num_heads; }
  double expert_macs(int n) const {
    return 3.0 * double(n) * cfg.top_k * double(cfg.hidden_size) * double(cfg.intermediate_size);
  }

  template <class Body>
  void for_each(double macs, int count, const Body& body) const {
    if (macs < kMinParallelLoopMacs) {
      for (int i = 0; i < count; ++i) body(i);
      return;
    }
    mm.parallel_for(count, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) body(int(i));
    });
  }

  struct Call {
    double dropout = 0;
    uint64_t seed = 0;
  };

  // The mask stream of weight `a` for sequence `seq`: the same whether the sequence is alone or stacked.
  static uint64_t stream_of(const Adapted<S>& a, const Call& call, int seq) {
    return stage::mix(stage::mix(call.seed) ^ (a.id << 24) ^ uint64_t(seq));
  }

  // Dropout over the stacked batch: each sequence's rows from its own stream.
  stage::Dropout dropout_of(const Adapted<S>& a, const Call& call, const Rows& rows) const {
    stage::Dropout d;
    if (!a.p || call.dropout <= 0) return d;
    d.p = call.dropout;
    for (size_t s = 0; s < rows.count(); ++s) d.ranges.push_back({rows.begin[s], rows.len[s], stream_of(a, call, int(s))});
    return d;
  }

  // Dropout over an expert's gathered rows (ascending, so each sequence's are consecutive).
  stage::Dropout dropout_of(const Adapted<S>& a, const Call& call, const Rows& rows, const std::vector<int>& picked) const {
    stage::Dropout d;
    if (!a.p || call.dropout <= 0) return d;
    d.p = call.dropout;
    for (size_t i = 0; i < picked.size(); ++i) {
      const int seq = rows.seq[size_t(picked[i])];
      if (i == 0 || rows.seq[size_t(picked[i - 1])] != seq) d.ranges.push_back({int64_t(i), 0, stream_of(a, call, seq)});
      ++d.ranges.back().rows;
    }
    return d;
  }

  // The attention's multiply-adds over the batch's sequences.
  double attention_macs(const Rows& rows) const {
    double macs = 0;
    for (const int64_t n : rows.len) macs += attention_macs(int(n));
    return macs;
  }

  // ---- one layer of the stacked batch ----

  Mat<S> layer_forward(const LayerWeights<S>& w, const LayerAdapters<S>& ad, const Call& call, const Rows& rows,
                       const Mat<S>& h_in, LayerCache<S>& c) const {
    using namespace stage;
    const int hd = cfg.head_dim, heads = cfg.num_heads, group = cfg.num_heads / cfg.num_kv_heads;
    c.h_in = h_in;
    c.xn1 = rms_norm(h_in, w.attn_norm, cfg.rms_norm_eps, &c.inv1);
    c.q = linear_forward(mm, c.xn1, w.wq, ad.q.p, dropout_of(ad.q, call, rows), &c.cq);
    c.k = linear_forward(mm, c.xn1, w.wk, ad.k.p, dropout_of(ad.k, call, rows), &c.ck);
    c.v = linear_forward(mm, c.xn1, w.wv, ad.v.p, dropout_of(ad.v, call, rows), &c.cv);
    rope.apply(c.q, heads, +1, rows.pos);
    rope.apply(c.k, cfg.num_kv_heads, +1, rows.pos);
    c.attn.resize(rows.total, heads * hd);
    c.p.assign(rows.count() * size_t(heads), Mat<S>());
    // One item per (sequence, head): each sequence attends only to its own rows.
    for_each(attention_macs(rows), int(rows.count()) * heads, [&](int item) {
      const int s = item / heads, h = item % heads, kvh = h / group;
      const int64_t r0 = rows.begin[size_t(s)], n = rows.len[size_t(s)];
      c.attn.block(r0, h * hd, n, hd) =
          attention_head<S>(c.q.block(r0, h * hd, n, hd), c.k.block(r0, kvh * hd, n, hd), c.v.block(r0, kvh * hd, n, hd),
                            cfg.sliding_window, c.p[size_t(item)]);
    });
    c.h_mid = h_in + linear_forward(mm, c.attn, w.wo, ad.o.p, dropout_of(ad.o, call, rows), &c.co);
    c.xn2 = rms_norm(c.h_mid, w.ffn_norm, cfg.rms_norm_eps, &c.inv2);
    route(w, ad, call, rows, c);
    return c.h_mid + moe_forward(w, ad, call, rows, c);
  }

  // Router: softmax over all experts, top-k (ties to the lower id), renormalized over the k chosen.
  void route(const LayerWeights<S>& w, const LayerAdapters<S>& ad, const Call& call, const Rows& rows, LayerCache<S>& c) const {
    const int n = int(c.xn2.rows()), k = cfg.top_k, E = cfg.num_experts;
    c.experts.resize(n, k);
    c.gates.resize(n, k);
    if (!cfg.is_moe()) {  // dense: the one MLP, weight 1
      c.experts.setZero();
      c.gates.setOnes();
      return;
    }
    const Mat<S> logits = stage::linear_forward(mm, c.xn2, w.router, ad.router.p, dropout_of(ad.router, call, rows), &c.cr);
    c.probs.resize(n, E);
    std::vector<int> order(static_cast<size_t>(E));
    for (int t = 0; t < n; ++t) {
      RowVec<S> prob = (logits.row(t).array() - logits.row(t).maxCoeff()).exp();
      prob /= prob.sum();
      c.probs.row(t) = prob;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[a] > prob[b]; });
      S kept = 0;
      for (int j = 0; j < k; ++j) kept += prob[order[size_t(j)]];
      for (int j = 0; j < k; ++j) {
        c.experts(t, j) = order[size_t(j)];
        c.gates(t, j) = prob[order[size_t(j)]] / kept;
      }
    }
  }

  // Each expert once over its tokens (of every sequence); outputs added with their gates in ascending expert order.
  Mat<S> moe_forward(const LayerWeights<S>& w, const LayerAdapters<S>& ad, const Call& call, const Rows& rows,
                     LayerCache<S>& c) const {
    using namespace stage;
    const int n = int(c.xn2.rows()), E = cfg.num_experts;
    c.moe.assign(size_t(E), ExpertCache<S>());
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < int(c.experts.cols()); ++j) {
        auto& x = c.moe[size_t(c.experts(t, j))];
        x.rows.push_back(t);
        x.slot.push_back(j);
        x.gate.push_back(c.gates(t, j));
      }
    for_each(expert_macs(n), E, [&](int e) {
      auto& x = c.moe[size_t(e)];
      if (x.rows.empty()) return;
      x.x.resize(Eigen::Index(x.rows.size()), c.xn2.cols());
      for (size_t i = 0; i < x.rows.size(); ++i) x.x.row(Eigen::Index(i)) = c.xn2.row(x.rows[i]);
      const auto& a1 = ad.w1[size_t(e)], &a3 = ad.w3[size_t(e)], &a2 = ad.w2[size_t(e)];
      x.a = linear_forward(mm, x.x, w.w1[size_t(e)], a1.p, dropout_of(a1, call, rows, x.rows), &x.c1);
      x.b = linear_forward(mm, x.x, w.w3[size_t(e)], a3.p, dropout_of(a3, call, rows, x.rows), &x.c3);
      x.m = x.a.unaryExpr([](S v) { return silu(v); }).cwiseProduct(x.b);
      x.y = linear_forward(mm, x.m, w.w2[size_t(e)], a2.p, dropout_of(a2, call, rows, x.rows), &x.c2);
    });
    Mat<S> out = Mat<S>::Zero(n, c.xn2.cols());
    for (const auto& x : c.moe)
      for (size_t i = 0; i < x.rows.size(); ++i) out.row(x.rows[i]) += x.gate[i] * x.y.row(Eigen::Index(i));
    return out;
  }

  // dL/dh_in from dL/dh_out; `aux_dprob` (per expert, empty when off) is d(coef · aux)/d(router probability),
  // the same for every token.
  Mat<S> layer_backward(const LayerWeights<S>& w, const LayerAdapters<S>& ad, const Rows& rows, const LayerCache<S>& c,
                        const Mat<S>& dh_out, const std::vector<double>& aux_dprob) const {
    using namespace stage;
    const int n = int(dh_out.rows()), hd = cfg.head_dim, heads = cfg.num_heads, group = cfg.num_heads / cfg.num_kv_heads;
    const int E = cfg.num_experts, k = cfg.top_k;

    // Experts: out[t] += g · y, y = w2(silu(a) ⊙ b).
    Mat<S> dgates = Mat<S>::Zero(n, k);
    std::vector<Mat<S>> dx_expert(static_cast<size_t>(E));
    for_each(2 * expert_macs(n), E, [&](int e) {
      const auto& x = c.moe[size_t(e)];
      if (x.rows.empty()) return;
      const Eigen::Index m = Eigen::Index(x.rows.size());
      Mat<S> dy(m, dh_out.cols());
      for (Eigen::Index i = 0; i < m; ++i) {
        const int t = x.rows[size_t(i)];
        dy.row(i) = dh_out.row(t) * x.gate[size_t(i)];
        dgates(t, x.slot[size_t(i)]) = dh_out.row(t).dot(x.y.row(i));  // one expert per (t, slot): no race
      }
      const Mat<S> dmid = linear_backward(mm, dy, x.m, w.w2[size_t(e)], ad.w2[size_t(e)].grad, x.c2);
      Mat<S> da(x.a.rows(), x.a.cols()), db(x.a.rows(), x.a.cols());
      for (Eigen::Index i = 0; i < da.size(); ++i) {
        const SiluAndGrad<S> sa = silu_and_grad(x.a.data()[i]);
        da.data()[i] = dmid.data()[i] * x.b.data()[i] * sa.grad;
        db.data()[i] = dmid.data()[i] * sa.value;
      }
      dx_expert[size_t(e)] = linear_backward(mm, da, x.x, w.w1[size_t(e)], ad.w1[size_t(e)].grad, x.c1);
      dx_expert[size_t(e)] += linear_backward(mm, db, x.x, w.w3[size_t(e)], ad.w3[size_t(e)].grad, x.c3);
    });
    Mat<S> dxn2 = Mat<S>::Zero(n, dh_out.cols());
    for (int e = 0; e < E; ++e) {
      const auto& x = c.moe[size_t(e)];
      for (size_t i = 0; i < x.rows.size(); ++i) dxn2.row(x.rows[i]) += dx_expert[size_t(e)].row(Eigen::Index(i));
    }

    // Router: the gates are the softmax of the chosen logits alone, so only those get dL/dgate's share;
    // the auxiliary loss reaches every logit through the full softmax.
    if (cfg.is_moe()) {
      Mat<S> dlogits = Mat<S>::Zero(n, E);
      for (int t = 0; t < n; ++t) {
        S dot = 0;
        for (int j = 0; j < k; ++j) dot += c.gates(t, j) * dgates(t, j);
        for (int j = 0; j < k; ++j) dlogits(t, c.experts(t, j)) += c.gates(t, j) * (dgates(t, j) - dot);
        if (!aux_dprob.empty()) {
          S pd = 0;
          for (int e = 0; e < E; ++e) pd += c.probs(t, e) * S(aux_dprob[size_t(e)]);
          for (int e = 0; e < E; ++e) dlogits(t, e) += c.probs(t, e) * (S(aux_dprob[size_t(e)]) - pd);
        }
      }
      dxn2 += linear_backward(mm, dlogits, c.xn2, w.router, ad.router.grad, c.cr);
    }
    Mat<S> dh_mid = dh_out + rms_norm_backward(dxn2, c.h_mid, w.ffn_norm, c.inv2);

    // Attention.
    const Mat<S> dattn = linear_backward(mm, dh_mid, c.attn, w.wo, ad.o.grad, c.co);
    Mat<S> dq(n, heads * hd);
    const int items = int(rows.count()) * heads;  // (sequence, head) as in the forward
    std::vector<Mat<S>> dk_head(static_cast<size_t>(items)), dv_head(static_cast<size_t>(items));
    for_each(2 * attention_macs(rows), items, [&](int item) {
      const int s = item / heads, h = item % heads, kvh = h / group;
      const int64_t r0 = rows.begin[size_t(s)], len = rows.len[size_t(s)];
      Mat<S> dqh;
      attention_head_backward<S>(dattn.block(r0, h * hd, len, hd), c.q.block(r0, h * hd, len, hd),
                                 c.k.block(r0, kvh * hd, len, hd), c.v.block(r0, kvh * hd, len, hd), c.p[size_t(item)], dqh,
                                 dk_head[size_t(item)], dv_head[size_t(item)]);
      dq.block(r0, h * hd, len, hd) = dqh;
    });
    Mat<S> dk = Mat<S>::Zero(n, cfg.num_kv_heads * hd), dv = Mat<S>::Zero(n, cfg.num_kv_heads * hd);
    for (int item = 0; item < items; ++item) {  // the query heads sharing a KV head add up, in head order
      const int s = item / heads, h = item % heads;
      const int64_t r0 = rows.begin[size_t(s)], len = rows.len[size_t(s)];
      dk.block(r0, (h / group) * hd, len, hd) += dk_head[size_t(item)];
      dv.block(r0, (h / group) * hd, len, hd) += dv_head[size_t(item)];
    }
    rope.apply(dq, heads, -1, rows.pos);
    rope.apply(dk, cfg.num_kv_heads, -1, rows.pos);
    Mat<S> dxn1 = linear_backward(mm, dq, c.xn1, w.wq, ad.q.grad, c.cq);
    dxn1 += linear_backward(mm, dk, c.xn1, w.wk, ad.k.grad, c.ck);
    dxn1 += linear_backward(mm, dv, c.xn1, w.wv, ad.v.grad, c.cv);
    return dh_mid + rms_norm_backward(dxn1, c.h_in, w.attn_norm, c.inv1);
  }

  // ---- the adapters of the model's weights ----

  std::vector<LayerAdapters<S>> adapters(const LoraParams<S>& params, LoraParams<S>* grads) const {
    std::map<std::string, size_t> index;
    for (size_t i = 0; i < params.params().size(); ++i) index[params.params()[i].weight_name] = i;
    size_t used = 0;
    const auto get = [&](const std::string& name, int64_t out, int64_t in) {
      Adapted<S> a;
      const auto it = index.find(name);
      if (it == index.end()) return a;
      const auto& p = params.params()[it->second];
      if (p.a.cols() != in || p.b.rows() != out || p.a.rows() != p.b.cols() || p.a.rows() == 0)
        throw Error(fmt::format("LoRA factors for '{}' are A [{}, {}], B [{}, {}]; the weight is [{}, {}]", name,
                                p.a.rows(), p.a.cols(), p.b.rows(), p.b.cols(), out, in));
      a.p = &p;
      a.grad = grads ? &grads->params()[it->second] : nullptr;
      a.id = it->second;
      ++used;
      return a;
    };
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
    const int64_t q = int64_t(cfg.num_heads) * cfg.head_dim, kv = int64_t(cfg.num_kv_heads) * cfg.head_dim;
    std::vector<LayerAdapters<S>> out(size_t(cfg.num_layers));
    for (int l = 0; l < cfg.num_layers; ++l) {
      auto& a = out[size_t(l)];
      const std::string p = fmt::format("model.layers.{}.self_attn.", l);
      a.q = get(p + "q_proj.weight", q, H);
      a.k = get(p + "k_proj.weight", kv, H);
      a.v = get(p + "v_proj.weight", kv, H);
      a.o = get(p + "o_proj.weight", H, q);
      if (cfg.is_moe()) a.router = get(cfg.router_name(l), cfg.num_experts, H);
      for (int e = 0; e < cfg.num_experts; ++e) {
        a.w1.push_back(get(cfg.w1_name(l, e), I, H));
        a.w3.push_back(get(cfg.w3_name(l, e), I, H));
        a.w2.push_back(get(cfg.w2_name(l, e), H, I));
      }
    }
    if (used != index.size())
      for (const auto& [name, i] : index) {
        bool found = false;
        for (const auto& la : out)
          for (const Adapted<S>* a : {&la.q, &la.k, &la.v, &la.o, &la.router}) found = found || (a->id == i && a->p);
        for (const auto& la : out)
          for (const auto* list : {&la.w1, &la.w3, &la.w2})
            for (const auto& a : *list) found = found || (a.id == i && a.p);
        if (!found) throw Error(fmt::format("LoRA factors for '{}': not a weight of this model ({})", name, cfg.source));
      }
    return out;
  }

  void check_batch(std::span<const TrainSequence> batch) const {
    if (batch.empty()) throw Error("training batch is empty: no sequences");
    for (size_t s = 0; s < batch.size(); ++s) {
      const auto& q = batch[s];
      if (q.tokens.empty()) throw Error(fmt::format("training sequence {} has no tokens", s));
      if (q.target.size() != q.tokens.size())
        throw Error(fmt::format("training sequence {}: {} target flags for {} tokens (one per token expected)", s,
                                q.target.size(), q.tokens.size()));
      if (int64_t(q.tokens.size()) > cfg.max_position_embeddings)
        throw Error(fmt::format("training sequence {} has {} tokens, more than max_position_embeddings {} ({})", s,
                                q.tokens.size(), cfg.max_position_embeddings, cfg.source));
      for (size_t t = 0; t < q.tokens.size(); ++t)
        if (q.tokens[t] < 0 || q.tokens[t] >= cfg.vocab_size)
          throw Error(fmt::format("training sequence {}, token {}: id {} outside the vocabulary of {} ({})", s, t,
                                  q.tokens[t], cfg.vocab_size, cfg.source));
    }
  }

  // ---- the whole pass ----

  LossResult run(std::span<const TrainSequence> batch, const LoraParams<S>& params, LoraParams<S>* grads,
                 const LossOptions& opt, int64_t normalizer, double dropout) const {
    using Clock = std::chrono::steady_clock;
    const auto secs = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
    const auto t_start = Clock::now();
    const cpu::OneOpenMpThread one_openmp_thread;  // this thread's Eigen products stay on it; the pool does the rest
    double head_backward_s = 0;  // lm_head's and the final norm's backward, inside the cross-entropy loop
    check_batch(batch);
    if (!(dropout >= 0 && dropout < 1)) throw Error(fmt::format("LoRA dropout {} is outside [0, 1)", dropout));
    const auto ad = adapters(params, grads);
    const bool grad = grads != nullptr;
    const bool aux_on = opt.router_aux_coef != 0 && cfg.is_moe();
    const Call call{opt.training ? dropout : 0.0, opt.dropout_seed};
    const Rows rows(batch);
    const size_t B = batch.size();
    const int L = cfg.num_layers;

    LossResult r;
    for (const auto& s : batch)
      for (size_t t = 1; t < s.target.size(); ++t) r.targets += s.target[t] != 0;
    const int64_t norm = normalizer > 0 ? normalizer : r.targets;
    if (norm <= 0) throw Error("training batch has no target tokens (every target flag after the first token is 0)");

    // Forward: the stacked batch through each layer.
    Mat<S> h(rows.total, cfg.hidden_size);
    for (size_t s = 0; s < B; ++s)
      for (size_t t = 0; t < batch[s].tokens.size(); ++t)
        h.row(rows.begin[s] + Eigen::Index(t)) = base.embedding().row(batch[s].tokens[t]);
    std::vector<LayerCache<S>> kept(static_cast<size_t>(L));
    LayerWeights<S> w;  // one layer's frozen weights: NF4 as stored (float), or in layer_buffer
    for (int l = 0; l < L; ++l) {
      const auto t_layer = Clock::now();
      base.layer_weights(l, layer_buffer, w, mm);
      r.dequantize_s += secs(t_layer, Clock::now());
      LayerCache<S> c;
      Mat<S> out = layer_forward(w, ad[size_t(l)], call, rows, h, c);
      auto& k = kept[size_t(l)];
      if (grad && !opt.gradient_checkpointing) {
        k = std::move(c);
      } else {
        if (grad) k.h_in = std::move(c.h_in);
        if (aux_on) {
          k.probs = std::move(c.probs);
          k.experts = std::move(c.experts);
        }
      }
      h = std::move(out);
    }

    // Cross-entropy: token t (target) predicted from the logits at t - 1. One sequence at a time: the logits
    // are [n, vocab], the largest matrix of the pass, and lm_head is dense (nothing to dequantize).
    double ce_sum = 0;
    Mat<S> dh;
    if (grad) dh.resize(rows.total, cfg.hidden_size);
    const S inv_norm = S(1) / S(norm);
    for (size_t s = 0; s < B; ++s) {
      const auto& seq = batch[s];
      std::vector<S> inv;
      const Mat<S> hs = h.middleRows(rows.begin[s], rows.len[s]);
      const Mat<S> xf = stage::rms_norm(hs, base.final_norm(), cfg.rms_norm_eps, &inv);
      const Mat<S> logits = mm.x_wt(xf, base.lm_head());  // [n, vocab]
      Mat<S> dlogits;
      if (grad) dlogits = Mat<S>::Zero(logits.rows(), logits.cols());
      for (size_t t = 1; t < seq.tokens.size(); ++t) {
        if (!seq.target[t]) continue;
        const Eigen::Index row = Eigen::Index(t - 1);
        const S mx = logits.row(row).maxCoeff();
        S sum;
        if (grad) {  // the exponentials once, in dlogits' row (a lazy expression would compute them twice)
          dlogits.row(row) = (logits.row(row).array() - mx).exp().matrix();
          sum = dlogits.row(row).sum();
          dlogits.row(row) *= inv_norm / sum;
          dlogits(row, seq.tokens[t]) -= inv_norm;
        } else {
          sum = (logits.row(row).array() - mx).exp().sum();
        }
        ce_sum += double(mx + std::log(sum) - logits(row, seq.tokens[t]));
      }
      if (grad) {
        const auto t = Clock::now();
        dh.middleRows(rows.begin[s], rows.len[s]) =
            stage::rms_norm_backward<S>(mm.dy_w(dlogits, base.lm_head()), hs, base.final_norm(), inv);
        head_backward_s += secs(t, Clock::now());
      }
    }
    r.ce = ce_sum / double(norm);

    // transformers' load_balancing_loss_func over every layer's router logits of the batch's tokens:
    // E · Σ_e f_e P_e, f_e the share of (token, layer) pairs that chose e among their top-k (no gradient),
    // P_e the mean router probability of e.
    std::vector<double> aux_dprob;
    if (aux_on) {
      const int E = cfg.num_experts;
      std::vector<double> count(size_t(E), 0), prob(size_t(E), 0);
      double N = 0;
      for (size_t s = 0; s < B; ++s)  // sequence by sequence, then layer by layer: a fixed summation order
        for (int l = 0; l < L; ++l) {
          const auto& k = kept[size_t(l)];
          N += double(rows.len[s]);
          for (Eigen::Index t = rows.begin[s]; t < rows.begin[s] + rows.len[s]; ++t) {
            for (int e = 0; e < E; ++e) prob[size_t(e)] += double(k.probs(t, e));
            for (Eigen::Index j = 0; j < k.experts.cols(); ++j) count[size_t(k.experts(t, j))] += 1;
          }
        }
      double aux = 0;
      aux_dprob.resize(size_t(E));
      for (int e = 0; e < E; ++e) {
        aux += (count[size_t(e)] / N) * (prob[size_t(e)] / N);
        aux_dprob[size_t(e)] = opt.router_aux_coef * double(E) * (count[size_t(e)] / N) / N;
      }
      r.aux = aux * double(E);
    }
    r.loss = r.ce + opt.router_aux_coef * r.aux;
    const auto t_loss = Clock::now();
    r.forward_s = secs(t_start, t_loss) - head_backward_s;
    if (!grad) return r;

    // Backward, layers in reverse.
    for (int l = L - 1; l >= 0; --l) {
      const auto t_layer = Clock::now();
      base.layer_weights(l, layer_buffer, w, mm);
      r.dequantize_s += secs(t_layer, Clock::now());
      auto& k = kept[size_t(l)];
      if (opt.gradient_checkpointing) {
        LayerCache<S> c;
        const Mat<S> h_in = std::move(k.h_in);
        layer_forward(w, ad[size_t(l)], call, rows, h_in, c);  // the same code, masks and routing as the forward
        dh = layer_backward(w, ad[size_t(l)], rows, c, dh, aux_dprob);
      } else {
        dh = layer_backward(w, ad[size_t(l)], rows, k, dh, aux_dprob);
      }
      k = LayerCache<S>();
    }
    r.backward_s = head_backward_s + secs(t_loss, Clock::now());
    return r;
  }
};

template <typename S>
LoraModel<S>::LoraModel(const Checkpoint& ck, BaseOptions base, int threads)
    : impl_(std::make_shared<Impl>(ck, base, threads)) {}

template <typename S>
int LoraModel<S>::threads() const {
  return impl_->mm.threads();
}

template <typename S>
const ModelConfig& LoraModel<S>::config() const {
  return impl_->cfg;
}

template <typename S>
LossResult LoraModel<S>::loss_and_grad(std::span<const TrainSequence> batch, LoraParams<S>& params, const LossOptions& opt,
                                       int64_t normalizer) {
  return impl_->run(batch, params, &params, opt, normalizer, opt.lora_dropout);
}

template <typename S>
LossResult LoraModel<S>::loss(std::span<const TrainSequence> batch, const LoraParams<S>& params, const LossOptions& opt,
                              int64_t normalizer) {
  LossOptions eval = opt;
  eval.training = false;
  return impl_->run(batch, params, nullptr, eval, normalizer, 0.0);
}

template class LoraModel<float>;
template class LoraModel<double>;

}  // namespace moelab::train
