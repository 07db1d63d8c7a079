#pragma once
// The expert-cache simulator (DESIGN.md "analysis/", docs/cachesim.md): routing traces replayed through
// per-layer caches of C experts out of E, under several policies at once, in one streaming pass.
//
// Decode. With batch 1, the trace's sequences are decoded one after another, token by token: each token
// is a step. With batch B, sequences [0, B) are decoded together, then [B, 2B), ... (static batching, in
// file order; a batch shrinks as its shorter sequences end): a step is one token of every sequence still
// running, and at each layer it needs the union of their experts. Several traces are replayed one after
// another as one stream (same layers, top-k and experts); the caches carry over between sequences, batches
// and files, as an engine's would.
// Calibration and warm-up. The first `calibration tokens` of the stream (file order) are the calibration
// part: the static policy keeps, per layer, the C experts they chose most. Every policy runs over the
// steps holding calibration tokens (so its cache is warm), but only the steps after them are scored:
// every policy is measured on the same steps.
// Memory: the current batch's routing (B sequences × L × k bytes a token), the sequence offsets, and
// Belady's look-ahead (analysis/cachesim_belady.hpp): it does not grow with the number of sequences.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "analysis/cachesim_types.hpp"
#include "analysis/trace_data.hpp"

namespace moelab::analysis {

// Where the simulator reads routing from: a trace file (TraceStream) or a TraceData in memory (tests).
class RoutingSource {
 public:
  virtual ~RoutingSource() = default;
  virtual std::string name() const = 0;
  virtual int num_layers() const = 0;
  virtual int top_k() const = 0;
  virtual int num_experts() const = 0;
  virtual const std::vector<int64_t>& sequence_offsets() const = 0;
  virtual nlohmann::json model_config() const = 0;  // the trace's config.json (null when not recorded)
  // Experts of tokens [first, first + n): [n, L, k]. Throws moelab::Error naming the source on bad data.
  virtual void read_experts(int64_t first, int64_t n, std::vector<uint8_t>& out) const = 0;
  // The recorded next-layer gate guesses (analysis/prefetch_guess.hpp), [n, L, k], 255 where none.
  virtual bool has_prefetch_guess() const = 0;
  virtual void read_prefetch_guess(int64_t first, int64_t n, std::vector<uint8_t>& out) const = 0;
};
std::unique_ptr<RoutingSource> open_routing_source(const std::string& trace_path);
// Validates the trace first (validate_trace); the source refers to `trace`, which must outlive it.
std::unique_ptr<RoutingSource> memory_routing_source(const TraceData& trace, std::string name = "memory");

// Bytes of one expert (w1, w3: [I, H]; w2: [H, I]) as cuda-nf4 holds it (NF4 codes and one FP32 absmax per
// 64 weights, each matrix on a 256-byte boundary: optimized/cuda/weight_arena.hpp) and in BF16.
struct ExpertBytes {
  int hidden = 0, intermediate = 0;
  int64_t nf4 = 0, bf16 = 0;
  bool known() const { return nf4 > 0; }
};
// From a config.json (hidden_size, intermediate_size); unknown (zeros) when it lacks them.
ExpertBytes expert_bytes_of(const nlohmann::json& model_config);

// --calibrate: a token count, or a fraction of the stream's tokens.
struct Calibration {
  int64_t tokens = 0;
  double fraction = 0;  // used when tokens == 0
  int64_t resolve(int64_t total_tokens) const;
};
Calibration parse_calibration(const std::string& text);  // "4096", "0.1", "10%"; throws moelab::Error

struct CacheSimOptions {
  std::vector<int> cache_sizes;  // each in 1..E; empty: 1..E
  std::vector<cachesim::Policy> policies;  // empty: all (next-layer-gate only when every trace has guesses)
  int batch = 1;
  Calibration calibrate;
  int lfu_aging_steps = 64;
  int64_t belady_window = 16384;  // steps of look-ahead
  bool progress = false;          // a Progress line on stderr
};
// "1-8", "2,4,8", "1-3,8" -> sorted, distinct; throws moelab::Error naming the text.
std::vector<int> parse_cache_sizes(const std::string& text);
// "lru,lfu" or "all"; throws moelab::Error naming the known policies.
std::vector<cachesim::Policy> parse_policies(const std::string& text);

struct CacheSimResult {
  cachesim::Policy policy;
  int cache_size = 0;
  std::vector<cachesim::LayerCounts> layers;
  std::vector<cachesim::StepMix> step_mix;  // per layer, over the scored steps
  cachesim::LayerCounts total() const;
};

struct CacheSimReport {
  std::vector<std::string> traces;
  int num_layers = 0, top_k = 0, num_experts = 0;
  int64_t tokens = 0, sequences = 0;               // the whole stream
  int64_t calibration_tokens = 0;
  int64_t scored_tokens = 0, scored_steps = 0;     // after the warm-up
  int64_t belady_undecided = 0;
  bool belady_simulated = false;
  nlohmann::json model_config;                     // of the first trace
  ExpertBytes expert_bytes;
  CacheSimOptions options;                         // as run (cache sizes and policies filled in)
  std::vector<CacheSimResult> results;             // policy-major, cache sizes ascending

  const CacheSimResult* find(cachesim::Policy p, int cache_size) const;
  nlohmann::json to_json() const;  // "moelab-cachesim-v1", docs/cachesim.md
  std::string table() const;       // per policy and cache size: hit rate, misses and bytes per token
  std::string hit_rate_table() const;  // the hit rate alone: cache sizes down, policies across
  std::string layer_table(int cache_size) const;  // hit rate per layer and policy at one cache size
};

// Replays the sources (in order, as one stream) through every policy and cache size of `options`.
// Throws moelab::Error naming the source for sources that disagree (layers, top-k, experts), a cache size
// outside 1..E, static without calibration tokens, next-layer-gate on a trace without prefetch guesses, and
// bad rows.
CacheSimReport simulate_cache(const std::vector<const RoutingSource*>& sources, const CacheSimOptions& options);
CacheSimReport simulate_cache(const std::vector<std::string>& trace_paths, const CacheSimOptions& options);

}  // namespace moelab::analysis
