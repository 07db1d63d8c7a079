#include "cli/throughput_table.hpp"

#include <fmt/format.h>

#include <cmath>
#include <numeric>

namespace moelab::cli {

double ThroughputRow::mean() const {
  if (tokens_per_second.empty()) return 0;
  return std::accumulate(tokens_per_second.begin(), tokens_per_second.end(), 0.0) / double(tokens_per_second.size());
}

double ThroughputRow::stddev() const {
  const size_t n = tokens_per_second.size();
  if (n < 2) return 0;
  const double m = mean();
  double ss = 0;
  for (const double v : tokens_per_second) ss += (v - m) * (v - m);
  return std::sqrt(ss / double(n - 1));
}

namespace {

std::string threads_text(int threads) { return threads > 0 ? std::to_string(threads) : "all"; }

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (const char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

}  // namespace

std::string throughput_text(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows) {
  std::string t;
  for (const auto& r : rows)
    t += fmt::format("{:<8} {:>12.2f} ± {:<10.2f} tokens/s over {} runs ({}, {} threads)\n", r.test, r.mean(),
                     r.stddev(), r.tokens_per_second.size(), ctx.engine, threads_text(ctx.threads));
  return t;
}

std::string throughput_markdown(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows) {
  std::string t = "| model | engine | threads | test | t/s |\n| --- | --- | ---: | ---: | ---: |\n";
  for (const auto& r : rows)
    t += fmt::format("| {} | {} | {} | {} | {:.2f} ± {:.2f} |\n", ctx.model, ctx.engine, threads_text(ctx.threads),
                     r.test, r.mean(), r.stddev());
  return t;
}

std::string throughput_csv(const ThroughputContext& ctx, const std::vector<ThroughputRow>& rows) {
  std::string t = "model,engine,threads,test,n_prompt,n_gen,avg_ts,stddev_ts,samples_ts\n";
  for (const auto& r : rows) {
    std::string samples;
    for (const double v : r.tokens_per_second) samples += (samples.empty() ? "" : ", ") + fmt::format("{:.6g}", v);
    t += fmt::format("{},{},{},{},{},{},{:.6f},{:.6f},\"[{}]\"\n", csv_field(ctx.model), csv_field(ctx.engine),
                     ctx.threads, r.test, r.n_prompt, r.n_gen, r.mean(), r.stddev(), samples);
  }
  return t;
}

nlohmann::json throughput_json(const std::vector<ThroughputRow>& rows) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& r : rows)
    j.push_back({{"test", r.test}, {"n_prompt", r.n_prompt}, {"n_gen", r.n_gen}, {"avg_ts", r.mean()},
                 {"stddev_ts", r.stddev()}, {"samples_ts", r.tokens_per_second}});
  return j;
}

}  // namespace moelab::cli
