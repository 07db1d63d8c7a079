#include "analysis/finetune_effect.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace moelab::analysis {

void add_window_loss(HeldoutLoss& into, std::span<const int32_t> tokens, const MatrixRF& logits) {
  if (logits.rows() != Eigen::Index(tokens.size()))
    throw Error(fmt::format("held-out loss: the engine returned {} rows of logits for a window of {} tokens",
                            logits.rows(), tokens.size()));
  for (size_t i = 0; i + 1 < tokens.size(); ++i) {
    const auto row = logits.row(Eigen::Index(i));
    const int32_t next = tokens[i + 1];
    if (next < 0 || next >= row.size())
      throw Error(fmt::format("held-out loss: token {} is outside the vocabulary of {}", next, row.size()));
    double max = row(0);
    for (Eigen::Index v = 1; v < row.size(); ++v) max = std::max(max, double(row(v)));
    double sum = 0;
    for (Eigen::Index v = 0; v < row.size(); ++v) sum += std::exp(double(row(v)) - max);
    into.nll += max + std::log(sum) - double(row(next));
    ++into.predicted;
  }
}

namespace {

void require_same(const TraceData& a, const TraceData& b) {
  if (a.num_layers != b.num_layers || a.top_k != b.top_k || a.num_experts != b.num_experts)
    throw Error("compare_finetune: the two traces come from models of different shapes");
  if (a.tokens != b.tokens || a.sequence_offsets != b.sequence_offsets)
    throw Error("compare_finetune: the two traces do not hold the same tokens in the same sequences");
  for (size_t s = 0; s < a.sequence_domain.size(); ++s)
    if (a.domain_names.at(size_t(a.sequence_domain[s])) != b.domain_names.at(size_t(b.sequence_domain[s])))
      throw Error(fmt::format("compare_finetune: sequence {} has different domains in the two traces", s));
}

double total_variation(const std::vector<double>& p, const std::vector<double>& q) {
  double tv = 0;
  for (size_t e = 0; e < p.size(); ++e) tv += std::abs(p[e] - q[e]);
  return tv / 2;
}

// Counts of one group of tokens, turned into DomainChange's shares by finish().
struct Tally {
  int64_t tokens = 0;
  std::vector<int64_t> changed;                          // [L]
  std::vector<std::vector<int64_t>> before, after;       // [L][E]
  Tally(int layers, int experts)
      : changed(size_t(layers)), before(size_t(layers), std::vector<int64_t>(size_t(experts))), after(before) {}
};

DomainChange finish(const std::string& name, const Tally& t, int top_k, const LossByDomain& lb, const LossByDomain& la) {
  DomainChange d;
  d.domain = name;
  d.tokens = t.tokens;
  if (name == "all") {
    for (const auto& [_, l] : lb) d.before.nll += l.nll, d.before.predicted += l.predicted;
    for (const auto& [_, l] : la) d.after.nll += l.nll, d.after.predicted += l.predicted;
  } else {
    if (auto it = lb.find(name); it != lb.end()) d.before = it->second;
    if (auto it = la.find(name); it != la.end()) d.after = it->second;
  }
  const size_t layers = t.changed.size();
  int64_t changed = 0;
  for (size_t l = 0; l < layers; ++l) {
    changed += t.changed[l];
    d.routing_changed_per_layer.push_back(t.tokens > 0 ? double(t.changed[l]) / double(t.tokens) : 0.0);
    std::vector<double> pb, pa;
    for (size_t e = 0; e < t.before[l].size(); ++e) {
      const double routed = double(t.tokens) * top_k;
      pb.push_back(routed > 0 ? double(t.before[l][e]) / routed : 0.0);
      pa.push_back(routed > 0 ? double(t.after[l][e]) / routed : 0.0);
    }
    d.load_shift += total_variation(pb, pa) / double(layers);
    d.load_before.push_back(std::move(pb));
    d.load_after.push_back(std::move(pa));
  }
  d.routing_changed = t.tokens > 0 ? double(changed) / (double(t.tokens) * double(layers)) : 0.0;
  return d;
}

}  // namespace

FinetuneEffect compare_finetune(const TraceData& before, const TraceData& after, const LossByDomain& loss_before,
                                const LossByDomain& loss_after, const std::string& trained_domain) {
  require_same(before, after);
  const int L = before.num_layers, E = before.num_experts, k = before.top_k;
  std::vector<Tally> per_domain(before.domain_names.size(), Tally(L, E));
  Tally all(L, E);
  std::vector<uint8_t> set_b(static_cast<size_t>(k)), set_a(static_cast<size_t>(k));
  for (int64_t s = 0; s < before.num_sequences(); ++s) {
    Tally& dom = per_domain.at(size_t(before.sequence_domain[size_t(s)]));
    for (int64_t t = before.sequence_offsets[size_t(s)]; t < before.sequence_offsets[size_t(s) + 1]; ++t) {
      ++dom.tokens;
      ++all.tokens;
      for (int l = 0; l < L; ++l) {
        for (int j = 0; j < k; ++j) {
          set_b[size_t(j)] = before.expert(t, l, j);
          set_a[size_t(j)] = after.expert(t, l, j);
          if (set_b[size_t(j)] >= E || set_a[size_t(j)] >= E)
            throw Error(fmt::format("compare_finetune: token {} layer {}: an expert id out of range", t, l));
          for (Tally* g : {&dom, &all}) {
            ++g->before[size_t(l)][set_b[size_t(j)]];
            ++g->after[size_t(l)][set_a[size_t(j)]];
          }
        }
        std::sort(set_b.begin(), set_b.end());
        std::sort(set_a.begin(), set_a.end());
        if (set_b != set_a) {
          ++dom.changed[size_t(l)];
          ++all.changed[size_t(l)];
        }
      }
    }
  }
  FinetuneEffect fx;
  fx.trained_domain = trained_domain;
  fx.num_layers = L;
  fx.num_experts = E;
  fx.top_k = k;
  for (size_t d = 0; d < per_domain.size(); ++d)
    if (per_domain[d].tokens > 0) fx.domains.push_back(finish(before.domain_names[d], per_domain[d], k, loss_before, loss_after));
  fx.domains.push_back(finish("all", all, k, loss_before, loss_after));
  return fx;
}

std::string FinetuneEffect::table(int layer) const {
  std::string out = fmt::format("{:<16} {:>8} {:>12} {:>8} {:>8} {:>16} {:>11}\n", "domain", "tokens", "loss before",
                                "after", "change", "experts changed", "load shift");
  for (const auto& d : domains) {
    const std::string name = d.domain + (d.domain == trained_domain ? " *" : "");
    out += fmt::format("{:<16} {:>8} {:>12.4f} {:>8.4f} {:>+8.4f} {:>15.1f}% {:>11.3f}\n", name, d.tokens, d.before.mean(),
                       d.after.mean(), d.after.mean() - d.before.mean(), 100 * d.routing_changed, d.load_shift);
  }
  out += fmt::format("(* fine-tuned on this domain; loss: nats per held-out token; experts changed: share of the "
                     "token-layer pairs whose top-{} set differs; load shift: total-variation distance of the expert "
                     "load, mean over layers)\n\n", top_k);
  out += fmt::format("expert load in layer {} (% of the routed choices), base | adapted:\n{:<16}", layer, "domain");
  for (int side = 0; side < 2; ++side) {
    for (int e = 0; e < num_experts; ++e) out += fmt::format(" {:>3}", fmt::format("e{}", e));
    if (side == 0) out += "  |";
  }
  out += "\n";
  for (const auto& d : domains) {
    out += fmt::format("{:<16}", d.domain + (d.domain == trained_domain ? " *" : ""));
    for (const auto* side : {&d.load_before, &d.load_after}) {
      for (double share : (*side)[size_t(layer)]) out += fmt::format(" {:>3.0f}", 100 * share);
      if (side == &d.load_before) out += "  |";
    }
    out += "\n";
  }
  return out;
}

nlohmann::json FinetuneEffect::to_json() const {
  nlohmann::json doms = nlohmann::json::array();
  for (const auto& d : domains)
    doms.push_back({{"domain", d.domain},
                    {"tokens", d.tokens},
                    {"loss_before", d.before.mean()},
                    {"loss_after", d.after.mean()},
                    {"predicted_tokens", d.before.predicted},
                    {"routing_changed", d.routing_changed},
                    {"routing_changed_per_layer", d.routing_changed_per_layer},
                    {"load_shift", d.load_shift},
                    {"load_before", d.load_before},
                    {"load_after", d.load_after}});
  return {{"format", "moelab-finetune-effect-v1"},
          {"trained_domain", trained_domain},
          {"layers", num_layers},
          {"experts", num_experts},
          {"top_k", top_k},
          {"domains", doms}};
}

}  // namespace moelab::analysis
