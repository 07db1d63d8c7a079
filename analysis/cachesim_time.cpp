// The cache simulator's decode-time model (analysis/cachesim_time.hpp).
#include "analysis/cachesim_time.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "optimized/cuda/weight_arena.hpp"

namespace moelab::analysis {

using cachesim::LayerCounts;

const std::vector<LinkPreset>& link_presets() {
  static const std::vector<LinkPreset> presets = {
      {"pcie4-x16", 25,
       "PCIe 4.0 x16: 31.5 GB/s a direction nominal (16 GT/s x 16 lanes, 128b/130b); 25 GB/s is about what pinned "
       "cudaMemcpy reaches (80%)"},
      {"pcie5-x16", 50, "PCIe 5.0 x16: 63 GB/s a direction nominal; 50 GB/s assumes the same 80%"},
      {"nvlink-c2c", 360,
       "NVLink-C2C (GH200): 450 GB/s a direction nominal (NVIDIA); 360 GB/s assumes the same 80%, not measured here"},
  };
  return presets;
}

LinkPreset parse_link(const std::string& text) {
  for (const auto& p : link_presets())
    if (p.name == text) return p;
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    if (used == text.size() && v > 0 && std::isfinite(v)) return {text + " GB/s", v, "given on the command line"};
  } catch (const std::logic_error&) {
  }
  std::string names;
  for (const auto& p : link_presets()) names += (names.empty() ? "" : ", ") + p.name;
  throw Error(fmt::format("--link {}: give a preset ({}) or a bandwidth in GB/s", text, names));
}

namespace {

// Bytes of one layer's attention projections and router as cuda-nf4 lays them out (engine_load.cpp).
int64_t attention_bytes_of(const ModelConfig& c) {
  cuda::WeightArena a;
  const int64_t q = int64_t(c.num_heads) * c.head_dim, kv = int64_t(c.num_kv_heads) * c.head_dim;
  a.add("q", q, c.hidden_size);
  a.add("k", kv, c.hidden_size);
  a.add("v", kv, c.hidden_size);
  a.add("o", c.hidden_size, q);
  a.add("router", c.num_experts, c.hidden_size);
  return cuda::align_up(a.bytes(), cuda::kArenaAlign) + 2 * int64_t(c.hidden_size) * 4;  // + two FP32 norms
}

std::string gb(double bytes) { return fmt::format("{:.2f} GB", bytes / 1e9); }

}  // namespace

TimeModelReport predict_decode(const CacheSimReport& sim, const TimeModelParams& params) {
  const ModelConfig& m = params.model;
  if (!m.is_moe()) throw Error(fmt::format("cachesim: the time model needs a mixture-of-experts model ({})", params.model_name));
  if (sim.scored_steps == 0 || sim.scored_tokens == 0) throw Error("cachesim: no scored steps for the time model");
  if (params.gpu_gb_per_s <= 0 || params.link.gb_per_s <= 0) throw Error("cachesim: bandwidths must be positive");
  TimeModelReport r;
  r.params = params;
  const auto eb = expert_bytes_of({{"hidden_size", m.hidden_size}, {"intermediate_size", m.intermediate_size}});
  r.expert_bytes = eb.nf4;
  r.attention_bytes = attention_bytes_of(m);
  r.head_bytes = int64_t(m.vocab_size) * m.hidden_size * 4 + int64_t(m.hidden_size) * 4;
  const int64_t embedding = m.tie_word_embeddings ? 0 : int64_t(m.vocab_size) * m.hidden_size * 4;
  r.fixed_gpu_bytes = int64_t(m.num_layers) * r.attention_bytes + r.head_bytes + embedding;
  r.kv_bytes = int64_t(params.context) * m.kv_cache_bytes_per_token(4);
  r.tokens_per_step = double(sim.scored_tokens) / double(sim.scored_steps);
  const double G = params.gpu_gb_per_s * 1e9, X = params.link.gb_per_s * 1e9, b = double(r.expert_bytes);
  const bool same_layers = m.num_layers == sim.num_layers;

  r.assumptions = {
      fmt::format("decode is memory-bound: each weight a step uses is read once from GPU memory at {} GB/s; compute, "
                  "kernel launches and KV-cache reads are not counted (short contexts)", params.gpu_gb_per_s),
      fmt::format("shapes of {} ({} layers, hidden {}, intermediate {}, {} experts, vocabulary {}) as cuda-nf4 holds "
                  "them: NF4 attention, routers and experts with an FP32 absmax per 64 weights ({:.1f} MB an expert, "
                  "{:.1f} MB of attention and router a layer), FP32 lm_head ({:.1f} MB, read once a step)",
                  params.model_name, m.num_layers, m.hidden_size, m.intermediate_size, m.num_experts, m.vocab_size,
                  b / 1e6, double(r.attention_bytes) / 1e6, double(r.head_bytes) / 1e6),
      fmt::format("a copy moves one expert's NF4 bytes host->GPU over {} at {} GB/s ({}); copies run one at a time",
                  params.link.name, params.link.gb_per_s, params.link.source),
      params.overlap
          ? "copies overlap compute: a demand copy (known after the layer's router) hides behind the layer's other "
            "experts, and the last copied expert computes after it arrives; a prefetch copy hides behind the previous "
            "layer's compute"
          : "copies do not overlap compute: every copy stalls the step",
      "per layer, the simulated distribution of (experts used, misses, prefetch copies) per step is used, step by "
      "step; only the previous layer's compute a prefetch hides behind is its mean",
      same_layers ? fmt::format("the trace's {} layers map one to one onto the model's", sim.num_layers)
                  : fmt::format("the trace has {} layers, the model {}: every model layer gets the trace's mean over "
                                "its layers", sim.num_layers, m.num_layers),
      fmt::format("GPU memory = attention, routers, FP32 embedding, lm_head and norms ({}) + L x C experts (+ a staging "
                  "buffer of min(E, batch x top-k) experts for static and belady, which compute some experts without "
                  "caching them) + an FP32 KV cache of {} tokens ({}); activations, workspace and the CUDA context are "
                  "not counted", gb(double(r.fixed_gpu_bytes)), params.context, gb(double(r.kv_bytes))),
      "GB = 1e9 bytes; tokens/s = tokens per step (the batch) / seconds per step"};

  for (const auto& res : sim.results) {
    // Per layer, the distribution of (experts used, misses, prefetch copies) over the scored steps, mapped
    // onto the model's layers (pooled over the trace's layers when their counts differ).
    cachesim::StepMix pooled(sim.num_experts);
    if (!same_layers)
      for (const auto& mix : res.step_mix) pooled.merge(mix);
    TimePrediction p;
    p.policy = res.policy;
    p.cache_size = res.cache_size;
    const double h = double(r.head_bytes) / G, a = double(r.attention_bytes) / G;
    double step = h, prev_compute = h;
    p.head_seconds = h;
    for (int l = 0; l < m.num_layers; ++l) {
      const cachesim::StepMix& mix = same_layers ? res.step_mix[size_t(l)] : pooled;
      int64_t steps = 0;
      double layer = 0, compute = 0, attention = 0, experts = 0, demand = 0, prefetch = 0;
      mix.for_each([&](int u, int miss, int pf, int64_t n) {
        const double x = u * b / G, cd = miss * b / X, q = pf * b / X, w = double(n);
        steps += n;
        compute += w * (a + x);
        attention += w * a, experts += w * x, demand += w * cd, prefetch += w * q;
        if (params.overlap)
          layer += w * (a + std::max(x, cd + (u > 0 ? x / u : 0)) + std::max(0.0, q - prev_compute));
        else
          layer += w * (a + x + cd + q);
      });
      if (steps == 0) throw Error("cachesim: a layer without scored steps");
      const double per_step = 1.0 / double(steps);  // each layer's terms as means per step
      step += layer * per_step;
      prev_compute = compute * per_step;
      p.attention_seconds += attention * per_step, p.expert_seconds += experts * per_step;
      p.demand_copy_seconds += demand * per_step, p.prefetch_copy_seconds += prefetch * per_step;
    }
    p.step_seconds = step;
    p.tokens_per_second = r.tokens_per_step / step;
    const int staging = cachesim::is_bypass_policy(res.policy) ? std::min(m.num_experts, sim.options.batch * sim.top_k) : 0;
    p.gpu_bytes = r.fixed_gpu_bytes + int64_t(m.num_layers) * res.cache_size * r.expert_bytes +
                  int64_t(staging) * r.expert_bytes + r.kv_bytes;
    r.predictions.push_back(p);
  }
  return r;
}

nlohmann::json TimeModelReport::to_json() const {
  nlohmann::json preds = nlohmann::json::array();
  for (const auto& p : predictions)
    preds.push_back({{"policy", cachesim::policy_name(p.policy)},
                     {"cache_size", p.cache_size},
                     {"tokens_per_second", p.tokens_per_second},
                     {"step_seconds", p.step_seconds},
                     {"terms_seconds",
                      {{"lm_head", p.head_seconds},
                       {"attention", p.attention_seconds},
                       {"experts", p.expert_seconds},
                       {"demand_copies", p.demand_copy_seconds},
                       {"prefetch_copies", p.prefetch_copy_seconds}}},
                     {"gpu_memory_bytes", p.gpu_bytes}});
  return {{"model", params.model_name},
          {"gpu_bandwidth_gb_per_s", params.gpu_gb_per_s},
          {"link", {{"name", params.link.name}, {"gb_per_s", params.link.gb_per_s}, {"source", params.link.source}}},
          {"overlap", params.overlap},
          {"context", params.context},
          {"expert_bytes", expert_bytes},
          {"attention_bytes_per_layer", attention_bytes},
          {"lm_head_bytes", head_bytes},
          {"fixed_gpu_bytes", fixed_gpu_bytes},
          {"kv_cache_bytes", kv_bytes},
          {"tokens_per_step", tokens_per_step},
          {"assumptions", assumptions},
          {"predictions", preds}};
}

std::string TimeModelReport::table() const {
  std::string s = fmt::format("\ntime model: decode of {} on a GPU with {} GB/s, experts over {} ({} GB/s), copies {}\n",
                              params.model_name, params.gpu_gb_per_s, params.link.name, params.link.gb_per_s,
                              params.overlap ? "overlapping compute" : "not overlapping compute");
  for (const auto& a : assumptions) s += "  - " + a + "\n";
  s += fmt::format("{:<13} {:>3} {:>9} {:>10} {:>12}\n", "policy", "C", "tokens/s", "ms/step", "GPU GiB");
  for (const auto& p : predictions)
    s += fmt::format("{:<13} {:>3} {:>9.2f} {:>10.2f} {:>12.1f}\n", cachesim::policy_name(p.policy), p.cache_size,
                     p.tokens_per_second, 1e3 * p.step_seconds, double(p.gpu_bytes) / double(1ull << 30));
  return s;
}

}  // namespace moelab::analysis
