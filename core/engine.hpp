#pragma once
// The one interface every engine (ref, cpu-nf4, cuda-nf4) implements, and the optional Probe through
// which analysis tools observe each layer. See DESIGN.md "The Engine contract".
#include <Eigen/Core>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/config.hpp"

namespace moelab {

using MatrixRF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixRI = Eigen::Matrix<int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One expert's share of a layer's expert stage: how many tokens were routed to it in this forward call
// and how long its MLP took on them. Engines that cannot time experts separately report none.
struct ExpertTiming {
  int expert = 0;
  int tokens = 0;
  double seconds = 0;
};

// What a Probe sees for one decoder layer, for the n tokens of one forward call.
// Names follow the shared per-layer scheme: layers.<i>.hidden, .router_logits, .experts, .gates.
struct LayerObservation {
  int layer = 0;
  const MatrixRF* hidden = nullptr;         // [n, hidden] the layer's output
  const MatrixRF* router_logits = nullptr;  // [n, experts] before softmax; null for dense models
  const MatrixRI* experts = nullptr;        // [n, top_k] chosen experts in rank order (dense: all 0)
  const MatrixRF* gates = nullptr;          // [n, top_k] renormalized gate weights (dense: all 1)
  double attention_seconds = 0, router_seconds = 0, experts_seconds = 0;
  const std::vector<ExpertTiming>* expert_timings = nullptr;  // experts that ran, if the engine times them
};

class Probe {
 public:
  virtual ~Probe() = default;
  virtual void on_layer(const LayerObservation& obs) = 0;
  // Called once per forward call after the lm_head.
  virtual void on_logits(const MatrixRF& /*logits*/, double /*lm_head_seconds*/) {}
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string name() const = 0;
  virtual const ModelConfig& config() const = 0;
  // Appends `tokens` to the KV cache at the next positions and returns their logits [n, vocab].
  // Prefill (n > 1) and decode (n == 1) are the same call. Throws moelab::Error past max_context().
  virtual MatrixRF forward(std::span<const int32_t> tokens, Probe* probe = nullptr) = 0;
  // forward() when only the logits of rows [first, n) are used (a generation's prefill needs the last
  // row, an eval the continuation's): returns those rows, [n - first, vocab]. Engines whose lm_head is
  // a large share of a prefill compute it for those rows only; the default slices forward()'s result.
  virtual MatrixRF forward_tail(std::span<const int32_t> tokens, int first, Probe* probe = nullptr) {
    check_tail(tokens.size(), first);
    MatrixRF all = forward(tokens, probe);
    return all.bottomRows(all.rows() - first);
  }
  virtual void reset() = 0;            // clears the KV cache
  // Keeps only the first `position` cached tokens (0 <= position <= position()), so a shared prefix
  // (an eval context) is computed once and each continuation runs from it. Throws moelab::Error else.
  virtual void truncate(int position) = 0;
  virtual int position() const = 0;    // tokens in the cache
  virtual int max_context() const = 0; // the context length the engine was built for

 protected:
  static void check_tail(size_t n, int first);  // 0 <= first < n, else moelab::Error
};

}  // namespace moelab
