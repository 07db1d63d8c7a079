#pragma once
// Stage latency of forward calls, from any engine, through a Probe (DESIGN.md "Timing"): per layer the
// attention, router and expert stages as the engine times them, the lm head per call, and, where the
// engine times each expert's MLP (the reference does), time per expert and by the number of tokens an
// expert received. Nothing is estimated: stages an engine does not time are absent, and the time a call
// spends outside the timed stages (embedding, norms, the probes themselves) is reported as "other" when
// the caller gives the calls' wall time.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/engine.hpp"

namespace moelab::analysis {

struct LayerTimes {
  double attention = 0, router = 0, experts = 0;  // seconds, summed over calls
};

// One expert of one layer, summed over calls.
struct ExpertTimes {
  int64_t calls = 0;   // forward calls in which the expert ran
  int64_t tokens = 0;  // tokens routed to it, summed
  double seconds = 0;  // its MLP time
};

// Expert MLP calls grouped by how many tokens the expert got in the call: [min_tokens, max_tokens].
struct TokenCountBucket {
  int min_tokens = 0, max_tokens = 0;
  int64_t calls = 0, tokens = 0;
  double seconds = 0;
};

struct TimingReport {
  std::string phase;          // e.g. "prefill", "decode", "trace"
  int64_t calls = 0;          // forward calls
  int64_t tokens = 0;         // tokens over all calls
  double wall_seconds = 0;    // the calls' wall time as the caller measured it (0: not given)
  std::vector<LayerTimes> layers;
  double lm_head = 0;
  bool has_expert_times = false;
  std::vector<std::vector<ExpertTimes>> experts;  // [layer][expert] when has_expert_times
  std::vector<TokenCountBucket> by_token_count;   // buckets 1, 2-3, 4-7, ... that were used

  LayerTimes stage_totals() const;  // summed over layers
  double timed_seconds() const;     // all timed stages incl. the lm head
  // The denominator of the percentages: the wall time if given (and not below the timed sum), else the timed sum.
  double reference_seconds() const;

  // The breakdown as a terminal table: per layer, totals, lm head and other, ms and %; then experts.
  std::string table() const;
  // Layout: docs in timing.cpp above to_json (format "moelab-timings-v1" is set by the caller).
  nlohmann::json to_json() const;
};

// Accumulates stage times over any number of forward calls. Attach it as the call's probe (or next to
// another one) and call add_call() with the call's token count and wall time.
class TimingProbe : public Probe {
 public:
  explicit TimingProbe(std::string phase = "forward") { report_.phase = std::move(phase); }
  void on_layer(const LayerObservation& obs) override;
  void on_logits(const MatrixRF& logits, double lm_head_seconds) override;
  void add_call(int64_t tokens, double wall_seconds);
  const TimingReport& report() const { return report_; }

 private:
  TimingReport report_;
};

// Passes each observation to every probe given (null entries skipped), so a timing probe can ride along
// with one that records routing.
class ProbeFanout : public Probe {
 public:
  explicit ProbeFanout(std::vector<Probe*> probes) : probes_(std::move(probes)) {}
  void on_layer(const LayerObservation& obs) override;
  void on_logits(const MatrixRF& logits, double lm_head_seconds) override;

 private:
  std::vector<Probe*> probes_;
};

}  // namespace moelab::analysis
