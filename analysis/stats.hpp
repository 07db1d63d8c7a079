#pragma once
// Routing statistics over a trace (analysis/trace_data.hpp): the figures the MoE literature uses, computed
// exactly (integer counts first, ratios last). docs/stats-json.md documents the JSON layout and every
// definition; the comments here are the short form.
//
//   load share       expert i's fraction of the N·k expert choices (sums to 1 over experts)
//   top-1 share      expert i's fraction of the N first choices
//   CV               population standard deviation of the load shares / their mean (Shazeer et al. 2017 use CV²)
//   max/mean         max load share · E (tensor2tensor's MaxOverload; DeepSeek's MaxVio = max/mean − 1)
//   entropy          −Σ s_i ln s_i / ln E of the load shares (1 = uniform, 0 = one expert; k > 1 caps it below 1)
//   aux loss         transformers' load_balancing_loss_func (models/mixtral/modeling_mixtral.py, 4.57):
//                    E · Σ_i f_i · P_i with f_i = (tokens whose top-k contains i) / N, the mean over tokens of
//                    the summed top-k one-hot mask, so Σ f_i = k, and P_i = mean over tokens of softmax(router
//                    logits)_i. Perfect balance gives k (the Switch paper's top-1 f gives 1). Needs router logits.
//   co-selection     C[i][j] = tokens whose top-k contains both i and j; C[i][i] = tokens choosing i (= count)
//   repetition       Mixtral paper §5, Table 5, over consecutive tokens (t, t+1) of the same sequence:
//                    first choice: same top-1 expert (random baseline 1/E);
//                    first or second choice: the top-k sets share an expert (baseline 1 − C(E−k,k)/C(E,k)).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "analysis/trace_data.hpp"

namespace moelab::analysis {

// Random-routing baselines (each token's top-k a uniformly random k-subset, its top-1 uniform).
double first_choice_baseline(int num_experts);                  // 1/E
double first_or_second_baseline(int num_experts, int top_k);    // 1 − C(E−k,k)/C(E,k)

// Load-balance figures of a share vector (non-negative, summing to 1).
double coefficient_of_variation(const std::vector<double>& shares);
double max_over_mean(const std::vector<double>& shares);
double normalized_entropy(const std::vector<double>& shares);  // 1 by convention when E == 1

// Repetition between consecutive tokens of the same sequence; pairs across sequences are never counted.
struct Repetition {
  int64_t pairs = 0;                 // consecutive pairs (t, t+1) inside one sequence
  int64_t first_choice_same = 0;     // pairs with the same top-1 expert
  int64_t topk_sets_overlap = 0;     // pairs whose top-k sets share at least one expert
  std::optional<double> first_choice() const;      // nullopt when there are no pairs
  std::optional<double> first_or_second() const;
};

struct LayerStats {
  int layer = 0;
  std::vector<int64_t> counts;       // [E] tokens whose top-k contains the expert
  std::vector<int64_t> top1_counts;  // [E] tokens whose first choice is the expert
  std::vector<double> load_share;    // counts / (N·k)
  std::vector<double> top1_share;    // top1_counts / N
  double cv = 0, max_over_mean = 0, normalized_entropy = 0;  // of load_share
  std::optional<std::vector<double>> mean_router_prob;       // [E] P_i, when router logits were recorded
  std::optional<double> aux_loss;                            // E · Σ f_i P_i, when router logits were recorded
  std::vector<int64_t> coselection;  // [E·E] row-major, symmetric
  Repetition repetition;

  int64_t cosel(int i, int j) const { return coselection[size_t(i) * counts.size() + size_t(j)]; }
};

// Statistics over a set of sequences: the whole trace, or one domain.
struct GroupStats {
  std::string name;  // "all", or the domain's name
  int64_t tokens = 0, sequences = 0;
  std::vector<LayerStats> layers;
  // transformers' loss as the model computes it: the layers' logits concatenated, so f and P are pooled
  // over all layers before the product (not the mean of per-layer losses).
  std::optional<double> aux_loss_all_layers;
};

struct StatsReport {
  int num_layers = 0, top_k = 0, num_experts = 0;
  int64_t tokens = 0, sequences = 0;
  bool has_router_logits = false;
  double baseline_first_choice = 0, baseline_first_or_second = 0;
  GroupStats overall;
  std::vector<GroupStats> domains;  // by domain index; domains without tokens left out; empty unless asked
  nlohmann::json trace_attributes;  // copied from the trace

  nlohmann::json to_json() const;  // layout "moelab-stats-v1", docs/stats-json.md
  // Readable tables: per layer load and balance, repetition vs baselines; with domains, the Mixtral paper's
  // Figure 7 (load per domain) and Table 5 (repetition per domain) for `domain_layers` (empty: first,
  // middle, last).
  std::string table(std::vector<int> domain_layers = {}) const;
};

// Throws moelab::Error when the arrays disagree with each other (sizes, offsets, expert ids, repeated
// experts in one token's top-k, domain ids).
void validate_trace(const TraceData& trace);

// Validates, then computes every statistic overall and, with by_domain, per domain.
// `source` names the trace in error messages (its file).
StatsReport compute_stats(const TraceData& trace, bool by_domain, const std::string& source = "trace");

}  // namespace moelab::analysis
