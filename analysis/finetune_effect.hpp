#pragma once
// What a fine-tuning run changed, domain by domain, on a held-out corpus: the loss and the routing of the base
// model against the same model with its adapter, from two traces of the same windows (moelab demo's step 7).
// It answers "does fine-tuning one domain move the routing, and where?" with three figures per domain:
//   - the held-out loss before and after (mean cross-entropy in nats per predicted token);
//   - routing changed: the share of (token, layer) pairs whose set of top-k experts is not the same;
//   - load shift: the total-variation distance between the domain's expert load before and after (half the
//     L1 distance of the load shares), averaged over layers; 0 when the load is the same, 1 when disjoint.
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "analysis/trace_data.hpp"
#include "core/engine.hpp"

namespace moelab::analysis {

struct HeldoutLoss {
  double nll = 0;          // sum of -log p(token) in nats
  int64_t predicted = 0;   // tokens predicted
  double mean() const { return predicted > 0 ? nll / double(predicted) : 0.0; }
};
using LossByDomain = std::map<std::string, HeldoutLoss>;

// Adds the cross-entropy of a window's tokens 1..n-1, each predicted by the logits row before it (log-softmax
// in double precision). The first token has no context inside the window and is not scored. Throws
// moelab::Error when the logits do not have one row per token.
void add_window_loss(HeldoutLoss& into, std::span<const int32_t> tokens, const MatrixRF& logits);

struct DomainChange {
  std::string domain;                  // "all" for the whole corpus
  int64_t tokens = 0;
  HeldoutLoss before, after;
  double routing_changed = 0;          // share of (token, layer) pairs whose top-k set differs
  std::vector<double> routing_changed_per_layer;  // [L]
  std::vector<std::vector<double>> load_before, load_after;  // [L][E] share of the routed choices
  double load_shift = 0;               // total-variation distance of the load, mean over layers
};

struct FinetuneEffect {
  std::string trained_domain;
  int num_layers = 0, num_experts = 0, top_k = 0;
  std::vector<DomainChange> domains;   // each domain of the traces (by name), then "all"
  const DomainChange& overall() const { return domains.back(); }

  // Per domain: tokens, loss before and after, routing changed, load shift; then the expert load of
  // `layer` per domain, before and after, side by side.
  std::string table(int layer) const;
  nlohmann::json to_json() const;  // layout "moelab-finetune-effect-v1"
};

// Compares two traces of the same windows (the base model's, then the adapted model's) and the held-out
// losses gathered while they were written. Throws moelab::Error when the traces do not hold the same tokens,
// sequences, domains and shapes.
FinetuneEffect compare_finetune(const TraceData& before, const TraceData& after, const LossByDomain& loss_before,
                                const LossByDomain& loss_after, const std::string& trained_domain);

}  // namespace moelab::analysis
