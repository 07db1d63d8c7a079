#pragma once
// Tracing texts into an HDF5 trace with any engine: the work of `moelab trace`, shared with `moelab demo`.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "analysis/timing.hpp"
#include "analysis/trace.hpp"
#include "core/checkpoint.hpp"
#include "core/engine.hpp"
#include "core/tokenizer.hpp"

namespace moelab::cli {

struct TraceRunOptions {
  int window = 0;            // tokens per sequence; 0: min(512, the engine's context)
  int64_t max_tokens = 0;    // stop after this many tokens in all (0: every text)
  bool router_logits = false;
  analysis::TimingProbe* timing = nullptr;  // also observes every call when given
};

struct TraceRunResult {
  int64_t tokens = 0, sequences = 0, empty_texts = 0;
  int window = 0;
  double seconds = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> per_domain;  // tokens, sequences
  bool appended = false, recovered = false;
  int64_t tokens_before = 0, sequences_before = 0, dropped_tokens = 0;
};

// Tokenizes each text with BOS, cuts it into windows (only the first starts with BOS), runs each window
// from an empty cache and appends its routing to `out` (created, or appended to when it is a trace of
// the same model). Shows progress on a terminal.
TraceRunResult trace_texts(Engine& engine, const Checkpoint& ck, const Tokenizer& tok,
                           const std::vector<analysis::TraceText>& texts, const std::string& out,
                           const TraceRunOptions& options);

// One line: tokens, sequences, window, tokens per domain, time and speed.
std::string describe(const TraceRunResult& r, const std::string& engine_name);

}  // namespace moelab::cli
