#pragma once
// A routing trace in memory: which experts each token chose, with gate weights, per layer. The HDF5
// layout (analysis/trace.hpp) stores exactly these arrays; statistics (analysis/stats.hpp) read them.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moelab::analysis {

struct TraceData {
  int num_layers = 0;
  int top_k = 0;
  int num_experts = 0;
  std::vector<int32_t> tokens;             // [N]
  std::vector<int64_t> sequence_offsets;   // [S + 1], offsets into tokens; sequences never mix
  std::vector<int32_t> sequence_domain;    // [S], index into domain_names
  std::vector<std::string> domain_names;   // label names
  std::vector<uint8_t> experts;            // [N, L, k], rank order (highest probability first)
  std::vector<float> gates;                // [N, L, k], renormalized
  std::vector<float> router_logits;        // [N, L, E] or empty when not recorded
  // [N, L, k] or empty when not recorded: the top-k of layer l's router applied to layer l-1's output hidden
  // state (analysis/prefetch_guess.hpp); 255 at layer 0, which nothing precedes
  std::vector<uint8_t> prefetch_guess;
  nlohmann::json attributes;               // model config, engine, tool version, creation time

  int64_t num_tokens() const { return int64_t(tokens.size()); }
  int64_t num_sequences() const { return int64_t(sequence_offsets.empty() ? 0 : sequence_offsets.size() - 1); }
  bool has_router_logits() const { return !router_logits.empty(); }
  bool has_prefetch_guess() const { return !prefetch_guess.empty(); }
  uint8_t expert(int64_t t, int l, int j) const { return experts[size_t((t * num_layers + l) * top_k + j)]; }
  float gate(int64_t t, int l, int j) const { return gates[size_t((t * num_layers + l) * top_k + j)]; }
  float router_logit(int64_t t, int l, int e) const {
    return router_logits[size_t((t * num_layers + l) * num_experts + e)];
  }
};

}  // namespace moelab::analysis
