// The cache simulator's report: JSON ("moelab-cachesim-v1", docs/cachesim.md) and tables.
#include <fmt/format.h>

#include <algorithm>

#include "analysis/cachesim.hpp"

namespace moelab::analysis {

using cachesim::LayerCounts;
using cachesim::Policy;

namespace {

nlohmann::json ratio(int64_t num, int64_t den) {
  return den > 0 ? nlohmann::json(double(num) / double(den)) : nlohmann::json(nullptr);
}

nlohmann::json bytes_json(const LayerCounts& c, int64_t tokens, const ExpertBytes& b) {
  if (!b.known() || tokens == 0) return {{"nf4", nullptr}, {"bf16", nullptr}};
  const double copies = double(c.copies()) / double(tokens);
  return {{"nf4", copies * double(b.nf4)}, {"bf16", copies * double(b.bf16)}};
}

nlohmann::json counts_json(const LayerCounts& c, int64_t tokens, const ExpertBytes& b, bool prefetch) {
  nlohmann::json j = {{"steps", c.steps},
                      {"requests", c.requests},
                      {"hits", c.hits},
                      {"prefetch_hits", c.prefetch_hits},
                      {"misses", c.misses},
                      {"prefetch_copies", c.prefetch_copies},
                      {"hit_rate", ratio(c.hits, c.requests)},
                      {"experts_per_step", ratio(c.requests, c.steps)},
                      {"misses_per_token", ratio(c.misses, tokens)},
                      {"copies_per_token", ratio(c.copies(), tokens)},
                      {"bytes_per_token", bytes_json(c, tokens, b)}};
  j["prefetch"] = prefetch ? nlohmann::json{{"guessed", c.guessed},
                                            {"guess_used", c.guess_used},
                                            {"guess_needed", c.guess_needed},
                                            {"precision", ratio(c.guess_used, c.guessed)},
                                            {"recall", ratio(c.guess_used, c.guess_needed)}}
                           : nlohmann::json(nullptr);
  return j;
}

std::string pct(int64_t num, int64_t den) { return den > 0 ? fmt::format("{:.1f}", 100.0 * double(num) / double(den)) : "-"; }

}  // namespace

nlohmann::json CacheSimReport::to_json() const {
  nlohmann::json policies = nlohmann::json::array(), results_json = nlohmann::json::array();
  for (Policy p : options.policies)
    policies.push_back({{"name", cachesim::policy_name(p)}, {"description", cachesim::policy_description(p)}});
  for (const auto& res : results) {
    const bool pf = cachesim::is_prefetch_policy(res.policy);
    nlohmann::json j = {{"policy", cachesim::policy_name(res.policy)}, {"cache_size", res.cache_size}};
    j.update(counts_json(res.total(), scored_tokens, expert_bytes, pf));
    nlohmann::json layers = nlohmann::json::array();
    for (size_t l = 0; l < res.layers.size(); ++l) {
      nlohmann::json lj = {{"layer", int(l)}};
      lj.update(counts_json(res.layers[l], scored_tokens, expert_bytes, pf));
      layers.push_back(lj);
    }
    j["layers"] = layers;
    results_json.push_back(j);
  }
  return {{"format", "moelab-cachesim-v1"},
          {"traces", traces},
          {"trace",
           {{"num_layers", num_layers},
            {"top_k", top_k},
            {"num_experts", num_experts},
            {"tokens", tokens},
            {"sequences", sequences},
            {"model_config", model_config}}},
          {"settings",
           {{"batch", options.batch},
            {"cache_sizes", options.cache_sizes},
            {"policies", policies},
            {"calibration_tokens", calibration_tokens},
            {"lfu_aging_steps", options.lfu_aging_steps},
            {"belady_window_steps", options.belady_window}}},
          {"scored", {{"tokens", scored_tokens}, {"steps", scored_steps}}},
          {"expert_bytes", expert_bytes.known() ? nlohmann::json{{"hidden_size", expert_bytes.hidden},
                                                                  {"intermediate_size", expert_bytes.intermediate},
                                                                  {"nf4", expert_bytes.nf4},
                                                                  {"bf16", expert_bytes.bf16}}
                                                : nlohmann::json(nullptr)},
          {"belady", belady_simulated ? nlohmann::json{{"undecided", belady_undecided}, {"exact", belady_undecided == 0}}
                                      : nlohmann::json(nullptr)},
          {"results", results_json}};
}

std::string CacheSimReport::table() const {
  std::string s = fmt::format(
      "expert cache simulation: {} tokens in {} sequences, {} layers, top-{} of {} experts; batch {}\n"
      "scored: {} tokens ({} steps) after a warm-up of {} calibration tokens\n",
      tokens, sequences, num_layers, top_k, num_experts, options.batch, scored_tokens, scored_steps, calibration_tokens);
  if (expert_bytes.known())
    s += fmt::format("one expert (3 matrices {}x{}): {:.1f} MB in NF4 as cuda-nf4 holds it, {:.1f} MB in BF16\n",
                     expert_bytes.hidden, expert_bytes.intermediate, double(expert_bytes.nf4) / 1e6,
                     double(expert_bytes.bf16) / 1e6);
  else
    s += "expert size unknown (the trace records no hidden_size/intermediate_size): no bytes per token\n";
  if (belady_simulated && belady_undecided > 0)
    s += fmt::format("belady: {} evictions tied beyond the {}-step look-ahead (the bound is approximate there; "
                     "raise --belady-window)\n", belady_undecided, options.belady_window);

  s += "\n" + hit_rate_table();

  // Traffic.
  s += fmt::format("\ncopies per token (all {} layers; misses + prefetches) and bytes moved per token\n", num_layers);
  s += fmt::format("{:<13} {:>3} {:>9} {:>11} {:>12} {:>12} {:>14}\n", "policy", "C", "hit %", "misses/tok", "copies/tok",
                   "MB/tok NF4", "MB/tok BF16");
  for (const auto& res : results) {
    const auto t = res.total();
    const double per_tok = scored_tokens ? double(t.copies()) / double(scored_tokens) : 0;
    s += fmt::format("{:<13} {:>3} {:>9} {:>11.3f} {:>12.3f} {:>12} {:>14}\n", cachesim::policy_name(res.policy),
                     res.cache_size, pct(t.hits, t.requests), scored_tokens ? double(t.misses) / double(scored_tokens) : 0,
                     per_tok, expert_bytes.known() ? fmt::format("{:.1f}", per_tok * double(expert_bytes.nf4) / 1e6) : "-",
                     expert_bytes.known() ? fmt::format("{:.1f}", per_tok * double(expert_bytes.bf16) / 1e6) : "-");
  }

  // Prefetch guesses.
  for (const auto& res : results) {
    if (!cachesim::is_prefetch_policy(res.policy) || res.cache_size != options.cache_sizes.front()) continue;
    s += fmt::format("\n{}: precision and recall of the guessed experts per layer, %\n{:>5} {:>10} {:>8}\n",
                     cachesim::policy_name(res.policy), "layer", "precision", "recall");
    for (size_t l = 0; l < res.layers.size(); ++l)
      s += fmt::format("{:>5} {:>10} {:>8}\n", l, pct(res.layers[l].guess_used, res.layers[l].guessed),
                       pct(res.layers[l].guess_used, res.layers[l].guess_needed));
  }
  return s;
}

std::string CacheSimReport::hit_rate_table() const {
  // Cache sizes down, policies across.
  std::string s = "hit rate, % of the experts each step needs (per layer, cache of C experts)\n";
  s += fmt::format("{:>3}", "C");
  for (Policy p : options.policies) s += fmt::format(" {:>13}", cachesim::policy_name(p));
  s += "\n";
  for (int c : options.cache_sizes) {
    s += fmt::format("{:>3}", c);
    for (Policy p : options.policies) {
      const auto* res = find(p, c);
      const auto t = res ? res->total() : LayerCounts{};
      s += fmt::format(" {:>13}", pct(t.hits, t.requests));
    }
    s += "\n";
  }
  return s;
}

std::string CacheSimReport::layer_table(int cache_size) const {
  std::string s = fmt::format("hit rate per layer at C = {}, %\n{:>5}", cache_size, "layer");
  for (Policy p : options.policies) s += fmt::format(" {:>13}", cachesim::policy_name(p));
  s += "\n";
  for (int l = 0; l < num_layers; ++l) {
    s += fmt::format("{:>5}", l);
    for (Policy p : options.policies) {
      const auto* res = find(p, cache_size);
      s += fmt::format(" {:>13}", res ? pct(res->layers[size_t(l)].hits, res->layers[size_t(l)].requests) : "-");
    }
    s += "\n";
  }
  return s;
}

}  // namespace moelab::analysis
