#pragma once
// Throughput of repeated runs as llama-bench reports it: one row per test (pp<N>: a prompt of N tokens,
// tg<N>: N generated tokens), tokens per second as mean ± sample standard deviation over the runs, printed
// as text, markdown (llama-bench's `-o md` columns) or CSV (its avg_ts / stddev_ts / samples_ts fields).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moelab::cli {

struct ThroughputRow {
  std::string test;                     // "pp512", "tg64"
  int64_t n_prompt = 0, n_gen = 0;      // the test's token counts (one of them 0)
  std::vector<double> tokens_per_second;  // one sample per measured run
  double mean() const;
  double stddev() const;  // sample standard deviation (n - 1), 0 for one run
};

// Which run the rows came from, as llama-bench's leading columns say.
struct ThroughputContext {
  std::string model, engine;
  int threads = 0;  // 0: all cores
};

std::string throughput_text(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows);
std::string throughput_markdown(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows);
std::string throughput_csv(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows);
nlohmann::json throughput_json(const std::vector<ThroughputRow>& rows);

}  // namespace moelab::cli
