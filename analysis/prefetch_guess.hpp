#pragma once
// The "next-layer gate" prefetch guess (mixtral-offloading's speculative loading; cuda-nf4's
// --gpu-expert-prefetch): layer l's router applied to the hidden state layer l-1 hands on, so that a
// prefetcher knows, one layer early, which experts layer l will probably want. Recorded in a trace as the
// optional /prefetch_guess (`moelab trace --record-prefetch-guess`, analysis/trace.hpp) and replayed by the
// cache simulator's next-layer-gate policy (analysis/cachesim.hpp).
//
// The guess for layer l >= 1 of a token: the top-k experts (highest logit first, ties to the lower id) of
//   router_l( RMSNorm(h_{l-1}) · post_attention_layernorm_l )
// where h_{l-1} is layer l-1's output (the residual stream entering layer l; a Probe sees it on every
// engine) and RMSNorm(x) = x / sqrt(mean(x²) + eps). The router's true input adds layer l's attention
// before that norm: the guess skips it, which is what makes it available early. Layer 0 has no guess (255).
// Computed in double from the FP32 weights, on any engine's hidden states.
#include <cstdint>
#include <vector>

#include "core/checkpoint.hpp"
#include "core/engine.hpp"

namespace moelab::analysis {

class PrefetchGuesser {
 public:
  // norms[l]: layer l's post_attention_layernorm weight [H]; routers[l]: its router weight [E, H], row-major.
  PrefetchGuesser(const ModelConfig& config, std::vector<std::vector<float>> norms, std::vector<std::vector<float>> routers);
  // Reads those weights from the checkpoint as FP32. Throws moelab::Error naming the tensor for a model that
  // is not a mixture of experts or a router it cannot read as floats (a pre-quantized NF4 checkpoint).
  static PrefetchGuesser from_checkpoint(const Checkpoint& ck);

  int num_layers() const { return layers_; }
  int top_k() const { return k_; }
  // The guesses for layer `layer` (1..L-1) from layer-1's output `hidden` [n, H]: k ids for each row r at
  // out + r * stride.
  void guess(int layer, const MatrixRF& hidden, uint8_t* out, size_t stride) const;

 private:
  int layers_, hidden_, experts_, k_;
  double eps_;
  std::vector<std::vector<float>> norms_, routers_;
};

}  // namespace moelab::analysis
