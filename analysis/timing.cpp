#include "analysis/timing.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>

namespace moelab::analysis {

// ---------------------------------------------------------------------------------------------------
// Probes

void TimingProbe::on_layer(const LayerObservation& obs) {
  auto& r = report_;
  if (obs.layer < 0) return;
  if (size_t(obs.layer) >= r.layers.size()) r.layers.resize(size_t(obs.layer) + 1);
  auto& l = r.layers[size_t(obs.layer)];
  l.attention += obs.attention_seconds;
  l.router += obs.router_seconds;
  l.experts += obs.experts_seconds;
  if (!obs.expert_timings) return;
  r.has_expert_times = true;
  if (size_t(obs.layer) >= r.experts.size()) r.experts.resize(size_t(obs.layer) + 1);
  auto& per_expert = r.experts[size_t(obs.layer)];
  for (const auto& t : *obs.expert_timings) {
    if (t.expert < 0 || t.tokens <= 0) continue;
    if (size_t(t.expert) >= per_expert.size()) per_expert.resize(size_t(t.expert) + 1);
    auto& e = per_expert[size_t(t.expert)];
    e.calls += 1;
    e.tokens += t.tokens;
    e.seconds += t.seconds;
    // Bucket b holds token counts [2^b, 2^(b+1) - 1].
    const int b = std::bit_width(unsigned(t.tokens)) - 1;
    if (size_t(b) >= r.by_token_count.size()) {
      const size_t old = r.by_token_count.size();
      r.by_token_count.resize(size_t(b) + 1);
      for (size_t i = old; i < r.by_token_count.size(); ++i)
        r.by_token_count[i] = {1 << i, (1 << (i + 1)) - 1, 0, 0, 0};
    }
    auto& bucket = r.by_token_count[size_t(b)];
    bucket.calls += 1;
    bucket.tokens += t.tokens;
    bucket.seconds += t.seconds;
  }
}

void TimingProbe::on_logits(const MatrixRF&, double lm_head_seconds) { report_.lm_head += lm_head_seconds; }

void TimingProbe::add_call(int64_t tokens, double wall_seconds) {
  report_.calls += 1;
  report_.tokens += tokens;
  report_.wall_seconds += wall_seconds;
}

void ProbeFanout::on_layer(const LayerObservation& obs) {
  for (Probe* p : probes_)
    if (p) p->on_layer(obs);
}

void ProbeFanout::on_logits(const MatrixRF& logits, double lm_head_seconds) {
  for (Probe* p : probes_)
    if (p) p->on_logits(logits, lm_head_seconds);
}

// ---------------------------------------------------------------------------------------------------
// Report

LayerTimes TimingReport::stage_totals() const {
  LayerTimes t;
  for (const auto& l : layers) t.attention += l.attention, t.router += l.router, t.experts += l.experts;
  return t;
}

double TimingReport::timed_seconds() const {
  const auto t = stage_totals();
  return t.attention + t.router + t.experts + lm_head;
}

double TimingReport::reference_seconds() const { return std::max(wall_seconds, timed_seconds()); }

namespace {

constexpr double kMs = 1e3;

std::string ms_pct(double seconds, double of) {
  return fmt::format("{:>10.3f} {:>5.1f}%", seconds * kMs, of > 0 ? 100.0 * seconds / of : 0.0);
}

std::string token_range(const TokenCountBucket& b) {
  return b.min_tokens == b.max_tokens ? fmt::format("{}", b.min_tokens) : fmt::format("{}-{}", b.min_tokens, b.max_tokens);
}

// Experts summed over layers (the same id in different layers is a different expert, but the per-id
// sum shows imbalance at a glance; the JSON keeps every layer).
std::vector<ExpertTimes> experts_over_layers(const TimingReport& r) {
  std::vector<ExpertTimes> sum;
  for (const auto& layer : r.experts) {
    if (layer.size() > sum.size()) sum.resize(layer.size());
    for (size_t e = 0; e < layer.size(); ++e)
      sum[e].calls += layer[e].calls, sum[e].tokens += layer[e].tokens, sum[e].seconds += layer[e].seconds;
  }
  return sum;
}

}  // namespace

std::string TimingReport::table() const {
  const double of = reference_seconds();
  const auto tot = stage_totals();
  std::string s;
  s += fmt::format("{}: {} call{}, {} tokens", phase, calls, calls == 1 ? "" : "s", tokens);
  if (wall_seconds > 0)
    s += fmt::format(", {:.3f} ms wall ({:.3f} ms per call, {:.1f} tokens/s)", wall_seconds * kMs,
                     calls ? wall_seconds * kMs / double(calls) : 0.0, double(tokens) / wall_seconds);
  s += "\n";
  s += fmt::format("{:>8} {:>17} {:>17} {:>17} {:>17}\n", "layer", "attention ms", "router ms", "experts ms", "layer ms");
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& x = layers[l];
    s += fmt::format("{:>8} {} {} {} {}\n", l, ms_pct(x.attention, of), ms_pct(x.router, of), ms_pct(x.experts, of),
                     ms_pct(x.attention + x.router + x.experts, of));
  }
  s += fmt::format("{:>8} {} {} {} {}\n", "layers", ms_pct(tot.attention, of), ms_pct(tot.router, of),
                   ms_pct(tot.experts, of), ms_pct(tot.attention + tot.router + tot.experts, of));
  s += fmt::format("{:<62} {}\n", "lm head", ms_pct(lm_head, of));
  if (wall_seconds > 0)
    s += fmt::format("{:<62} {}\n", "other (embedding, final norm, probes; untimed)", ms_pct(of - timed_seconds(), of));
  s += fmt::format("{:<62} {}\n", wall_seconds > 0 ? "total (wall)" : "total (timed stages)", ms_pct(of, of));

  if (!has_expert_times) {
    s += "experts: this engine does not time experts one by one\n";
    return s;
  }
  s += "expert MLP time by expert id, summed over layers:\n";
  s += fmt::format("{:>8} {:>10} {:>10} {:>12} {:>10}\n", "expert", "calls", "tokens", "ms", "us/token");
  const auto per_id = experts_over_layers(*this);
  for (size_t e = 0; e < per_id.size(); ++e) {
    const auto& x = per_id[e];
    s += fmt::format("{:>8} {:>10} {:>10} {:>12.3f} {:>10.2f}\n", e, x.calls, x.tokens, x.seconds * kMs,
                     x.tokens ? x.seconds * 1e6 / double(x.tokens) : 0.0);
  }
  s += "expert MLP time by tokens routed to the expert in one call:\n";
  s += fmt::format("{:>8} {:>10} {:>10} {:>12} {:>10}\n", "tokens", "calls", "tokens", "ms/call", "us/token");
  for (const auto& b : by_token_count) {
    if (b.calls == 0) continue;
    s += fmt::format("{:>8} {:>10} {:>10} {:>12.4f} {:>10.2f}\n", token_range(b), b.calls, b.tokens,
                     b.seconds * kMs / double(b.calls), b.seconds * 1e6 / double(b.tokens));
  }
  return s;
}

// JSON layout (all times in seconds):
//   phase, calls, tokens, wall_seconds (null when not measured), timed_seconds,
//   stages: {attention, router, experts, lm_head, other (wall - timed; null without wall time)},
//   layers: [{layer, attention, router, experts}],
//   experts: null when the engine does not time experts, else [{layer, expert, calls, tokens, seconds}]
//            for every expert that ran,
//   by_token_count: [{min_tokens, max_tokens, calls, tokens, seconds}] for buckets 1, 2-3, 4-7, ... used.
nlohmann::json TimingReport::to_json() const {
  using nlohmann::json;
  const auto tot = stage_totals();
  json j;
  j["phase"] = phase;
  j["calls"] = calls;
  j["tokens"] = tokens;
  j["wall_seconds"] = wall_seconds > 0 ? json(wall_seconds) : json(nullptr);
  j["timed_seconds"] = timed_seconds();
  j["stages"] = {{"attention", tot.attention},
                 {"router", tot.router},
                 {"experts", tot.experts},
                 {"lm_head", lm_head},
                 {"other", wall_seconds > 0 ? json(reference_seconds() - timed_seconds()) : json(nullptr)}};
  j["layers"] = json::array();
  for (size_t l = 0; l < layers.size(); ++l)
    j["layers"].push_back(
        {{"layer", l}, {"attention", layers[l].attention}, {"router", layers[l].router}, {"experts", layers[l].experts}});
  j["experts"] = nullptr;
  if (has_expert_times) {
    j["experts"] = json::array();
    for (size_t l = 0; l < experts.size(); ++l)
      for (size_t e = 0; e < experts[l].size(); ++e)
        if (experts[l][e].calls > 0)
          j["experts"].push_back({{"layer", l},
                                  {"expert", e},
                                  {"calls", experts[l][e].calls},
                                  {"tokens", experts[l][e].tokens},
                                  {"seconds", experts[l][e].seconds}});
  }
  j["by_token_count"] = json::array();
  for (const auto& b : by_token_count)
    if (b.calls > 0)
      j["by_token_count"].push_back({{"min_tokens", b.min_tokens},
                                     {"max_tokens", b.max_tokens},
                                     {"calls", b.calls},
                                     {"tokens", b.tokens},
                                     {"seconds", b.seconds}});
  return j;
}

}  // namespace moelab::analysis
