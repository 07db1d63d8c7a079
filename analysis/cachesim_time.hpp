#pragma once
// The cache simulator's time model (docs/cachesim.md): from the simulated traffic per layer, a predicted
// decode speed and the GPU memory each cache size needs, for a model held as cuda-nf4 holds it (NF4
// attention, routers and experts with an FP32 absmax per 64 weights; FP32 embedding, lm_head and norms).
//
// Per decode step (one token, or one of each sequence of a batch) and layer l, from the simulated
// distribution of (u_l experts used, m_l demand misses, p_l prefetch copies) over the steps (StepMix; the
// expectation is taken of each layer's term, step by step). With b the NF4 bytes of an expert, G the GPU
// memory bandwidth and X the host→GPU link bandwidth:
//   a_l = layer l's attention and router bytes / G        x_l = u_l·b / G
//   c_l = m_l·b / X (demand copies)                          q_l = p_l·b / X (prefetch copies)
//   h   = (lm_head + final norm bytes) / G, once a step
//   no overlap:  step = h + Σ_l (a_l + x_l + c_l + q_l)
//   overlap:     step = h + Σ_l (a_l + max(x_l, c_l + x_l/u_l) + max(0, q_l − (a_{l−1} + x_{l−1})))
// (a demand copy is known only after layer l's router, so it can hide behind the layer's other experts,
// and the last copied expert still computes after it arrives; a prefetch copy hides behind the previous
// layer's mean compute a_{l−1} + x_{l−1}, h for layer 0). Tokens/s = tokens a step / step. GPU memory = the non-expert weights +
// L·C experts (+ a staging buffer of min(E, B·k) experts for the bypass policies, static and belady) + an
// FP32 KV cache of `context` tokens. Every assumption is listed in the output (assumptions()).
#include <string>
#include <vector>

#include "analysis/cachesim.hpp"
#include "core/config.hpp"

namespace moelab::analysis {

struct LinkPreset {
  std::string name;
  double gb_per_s;     // effective host→GPU bandwidth, 1e9 bytes/s
  std::string source;  // where the figure comes from
};
const std::vector<LinkPreset>& link_presets();
// A preset name or a number of GB/s; throws moelab::Error naming the presets.
LinkPreset parse_link(const std::string& text);

struct TimeModelParams {
  ModelConfig model;                 // the shapes the prediction is for
  std::string model_name = "mixtral-8x7b";
  double gpu_gb_per_s = 900;
  LinkPreset link;
  bool overlap = true;
  int context = 4096;                // tokens of KV cache in the memory figure
};

struct TimePrediction {
  cachesim::Policy policy;
  int cache_size = 0;
  double step_seconds = 0, tokens_per_second = 0;
  double head_seconds = 0, attention_seconds = 0, expert_seconds = 0, demand_copy_seconds = 0,
         prefetch_copy_seconds = 0;  // the sums of the formula's terms (before overlap)
  int64_t gpu_bytes = 0;
};

struct TimeModelReport {
  TimeModelParams params;
  std::vector<std::string> assumptions;
  int64_t expert_bytes = 0, attention_bytes = 0, head_bytes = 0, fixed_gpu_bytes = 0, kv_bytes = 0;
  double tokens_per_step = 0;
  std::vector<TimePrediction> predictions;  // in the simulation report's order
  nlohmann::json to_json() const;
  std::string table() const;
};

// Throws moelab::Error when the simulation scored nothing or the model is not a mixture of experts.
TimeModelReport predict_decode(const CacheSimReport& sim, const TimeModelParams& params);

}  // namespace moelab::analysis
