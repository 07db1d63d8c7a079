#pragma once
// Tracing texts into an HDF5 trace with any engine: the work of `moelab trace`, shared with `moelab demo`.
#include <cstdint>
#include <functional>
#include <map>
#include <span>
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
  bool prefetch_guess = false;  // also the next-layer gate's guesses (analysis/prefetch_guess.hpp)
  bool append = false;       // add to the trace in `out` (refused when it exists and this is false)
  std::vector<std::string> inputs;  // the input files, recorded in the trace (absolute)
  std::string adapter = {};          // the engine's LoRA adapter folder (--adapter), recorded in the trace ("": none)
  analysis::TimingProbe* timing = nullptr;  // also observes every call when given
  // Called after each window with its text's domain, its tokens and the logits the engine computed for it
  // (one row per token: row i predicts token i + 1), so a pass that needs the logits (the demo's held-out
  // loss per domain) rides on the trace instead of running the model again.
  std::function<void(const std::string& domain, std::span<const int32_t> tokens, const MatrixRF& logits)>
      on_window_logits = {};
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
// from an empty cache and writes its routing to `out`: a new file, or with options.append the trace
// in it (of the same model, tokenizer and engine; analysis::TraceWriter checks). Shows progress on a
// terminal.
TraceRunResult trace_texts(Engine& engine, const Checkpoint& ck, const Tokenizer& tok,
                           const std::vector<analysis::TraceText>& texts, const std::string& out,
                           const TraceRunOptions& options);

// What the trace records of a run: the model (config, directory), its tokenizer's hash, the engine,
// the inputs (absolute), the window, and the texts' domains.
analysis::TraceHeader trace_header(const Checkpoint& ck, const std::string& engine_name, int window,
                                   const TraceRunOptions& options, const std::vector<analysis::TraceText>& texts);

// One line: tokens, sequences, window, tokens per domain, time and speed.
std::string describe(const TraceRunResult& r, const std::string& engine_name);

}  // namespace moelab::cli
